"""Names of the metrics dtlray reports beyond the per-epoch contract, shared by the worker loop
(which reports them) and the search, console and report (which read them). No imports."""

STAGE1_MODE = "stage1/mode"  # how the trial got stage 1: computed, reused or scratch
DIVERGED_METRIC = "diverged"  # True in the one report of a trial whose loss went non-finite
DIVERGED_REASON = "diverged/reason"  # stage, epoch, step, the loss, and the fix
DIVERGED_STAGE = "diverged/stage"  # pretrain or finetune
STAGE1_REUSED_EPOCHS = "stage1/reused_epochs"  # stage-1 epochs a stored result covered
