"""The one per-worker training loop, used by both stages.

Runs inside a Ray Train worker. The first line rebuilds the typed :class:`TrialConfig`; after that
no code reads loose dict keys. Stage 1 (pretrain) and stage 2 (finetune) are
:class:`~dtlray.stages.StageSpec` values run by the same :func:`run_stage`, which is split the
torchvision way into :func:`train_one_epoch` and :func:`evaluate`.

Correctness under DDP:
  * train splits are sharded by Ray Data with ``equal=True`` so every rank takes the same number
    of steps (DDP all-reduces every step; uneven ranks would hang); the steps are counted from
    the shard sizes before an epoch starts, a streamed shard's from the rows the driver counted
    (:attr:`~dtlray.worker.WorkerPlan.stream_rows`), and it contributes to every step what it
    would if it were held in memory;
  * val/test splits are sharded with ``equal=False`` (every example on exactly one rank) and the
    per-task sums of correct, loss and count are all-reduced, so every rank reports the same,
    exact accuracy whatever the number of workers.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dtlray.checkpoints import (
    Resume,
    checkpoint_now,
    diverged_report,
    load_resume,
    write_checkpoint,
    write_verdict,
)
from dtlray.config import StageConfig, TrialConfig
from dtlray.logme import logme
from dtlray.metrics import DIVERGED_METRIC, DIVERGED_REASON, DIVERGED_STAGE
from dtlray.models import TransferModel, load_trunk
from dtlray.stage1_cache import (
    Stage1Record,
    has_stage1,
    load_constant_phase,
    load_stage1,
    longest_constant_phase,
    save_constant_phase,
    save_stage1,
)
from dtlray.stage1_claims import CpuLoan
from dtlray.stages import (
    StageSpec,
    TaskSpec,
    build_model,
    finetune_stage,
    pretrain_stage,
)
from dtlray.worker import (
    Diverged,
    InMemorySplit,
    Stage1Outcome,
    StreamingSplit,
    TrainSession,
    WorkerEnv,
    WorkerPlan,
    WorkerSession,
    agree_on_sizes,
    epoch_steps,
    follow_loan,
    model_input,
    read_shard,
    resolve_precision,
    step_batches,
    train_source,
)

_EVAL_BATCH_ROWS = 512


# -- entry point --------------------------------------------------------------------------------


def train_loop_per_worker(worker_config: dict[str, Any]) -> None:
    """Run both stages of one trial on this Ray Train worker.

    Args:
        worker_config: ``{"trial": TrialConfig.to_dict(), "plan": WorkerPlan.to_dict()}``.
    """
    context = ray.train.get_context()
    run_worker(
        worker_config,
        TrainSession(),
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
    )


def run_worker(
    worker_config: dict[str, Any],
    session: WorkerSession,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    loan: CpuLoan | None = None,
) -> None:
    """The worker loop: stage 1 (computed or loaded), then finetune, reporting every epoch.

    Args:
        worker_config: ``{"trial": TrialConfig.to_dict(), "plan": WorkerPlan.to_dict()}``.
        session: what runs this loop (a Train worker, or a one-worker Tune trial itself).
        rank: this worker's rank; world_size: how many workers train together (DDP).
        device: where to train (default: the CPU).
        loan: CPUs that trials waiting for this stage 1 lend it (stage 1 follows it).
    """
    cfg = TrialConfig.from_dict(worker_config["trial"])
    plan = WorkerPlan.from_dict(worker_config["plan"])
    device = device or torch.device("cpu")
    # Threads = the CPUs Ray gave this worker: oversubscribing 2 cores with 2 workers x N threads
    # costs far more than it gains, and a fixed count keeps one-worker runs reproducible.
    threads = max(1, int(cfg.resources.cpus_per_worker))
    env = WorkerEnv(
        rank=rank,
        world_size=world_size,
        device=device,
        seed=cfg.seed,
        image_size=cfg.data.image_size,
        channels=cfg.data.channels,
        session=session,
        threads=threads,
        **resolve_precision(cfg.resources.precision, device, cfg.resources.channels_last),
    )
    torch.set_num_threads(threads)
    finetune = finetune_stage(cfg, plan.datasets)

    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, finetune.heads).to(env.device, memory_format=env.memory_format)

    checkpoint = session.checkpoint()
    diverged = diverged_report(checkpoint)
    if diverged is not None:
        # Restarted after the trial diverged: say so again, train nothing.
        session.report(diverged)
        return
    resume = load_resume(checkpoint)
    stage1: Stage1Outcome | None = None
    if resume is not None:
        model.load_state_dict(resume.model_state)
        stage1 = Stage1Outcome(**resume.meta["stage1"])
        env.log(f"[dtlray] resuming finetune at epoch {resume.meta['epoch'] + 1}")

    last_checkpoint = time.monotonic()

    def report(epoch: int, metrics: dict[str, Any], state: Callable[[], dict[str, Any]]) -> None:
        nonlocal last_checkpoint
        assert stage1 is not None
        metrics = {**metrics, **stage1.metrics()}
        if not checkpoint_now(cfg, plan, epoch + 1, time.monotonic() - last_checkpoint):
            session.report(metrics)
            return
        last_checkpoint = time.monotonic()
        meta = {"epoch": epoch, "stage1": asdict(stage1), "metrics": metrics}
        with tempfile.TemporaryDirectory() as tmp:
            if env.rank == 0:
                write_checkpoint(tmp, state(), meta, cfg)
            # Every rank reports (a barrier under DDP); only rank 0 attaches the checkpoint.
            session.report(metrics, tmp if env.rank == 0 else None)

    try:
        if resume is None:
            stage1 = _run_or_load_stage1(cfg, plan, model, replace(env, loan=loan))
            torch.set_num_threads(env.threads)  # what it borrowed goes back with stage 1
            # Fresh target heads, seeded so every rank starts from the same ones.
            torch.manual_seed(cfg.seed + 1)
            model.reset_heads(finetune.heads)
            model.to(env.device)
        # Read once: LogME scores the trunk on the same train data the finetune then trains on.
        train_data = {t.name: train_source(t, plan.stream_rows, env) for t in finetune.tasks}
        if resume is None and stage1.mode != "scratch":
            stage1.logme = target_logme(model, finetune, train_data, env)
        run_stage(
            finetune,
            model,
            env,
            train_data=train_data,
            resume=resume,
            on_epoch_end=report,
            run_test=plan.run_test,
            test_every_epoch=plan.test_every_epoch,
        )
    except Diverged as err:
        # One last report, then the trial ends. The finetune metrics are there as NaN so a
        # scheduler and a searcher that expect them read "no value", never a low score. Its
        # checkpoint holds no weights, only the verdict: Train's result shows the latest
        # checkpoint's metrics, and a restart must not train a diverged trial again.
        env.log(f"[dtlray] {err.reason}")
        metrics: dict[str, Any] = {
            **_stage_metrics(
                finetune, _NAN_TRAIN, {t.name: _NAN_EVAL for t in finetune.tasks}, "val"
            ),
            "epoch": err.epoch if err.stage == "finetune" else 0,
            DIVERGED_METRIC: True,
            DIVERGED_REASON: err.reason,
            DIVERGED_STAGE: err.stage,
        }
        if stage1 is not None:
            metrics.update(stage1.metrics())
        with tempfile.TemporaryDirectory() as tmp:
            if env.rank == 0:
                write_verdict(tmp, metrics)
            session.report(metrics, tmp if env.rank == 0 else None)


_NAN_EVAL = (math.nan, math.nan)
_NAN_TRAIN = {
    "train/loss": math.nan,
    "train/samples_per_s": math.nan,
    "train/epoch_seconds": math.nan,
}


def _run_or_load_stage1(
    cfg: TrialConfig, plan: WorkerPlan, model: TransferModel, env: WorkerEnv
) -> Stage1Outcome:
    start = time.perf_counter()
    if plan.stage1_mode == "none":
        return Stage1Outcome("scratch", None, 0.0, 0.0)
    assert plan.stage1_dir is not None
    # A restarted worker group (FailureConfig) may find the result its first attempt stored.
    if plan.stage1_mode == "load" or has_stage1(plan.stage1_dir):
        state, record = load_stage1(plan.stage1_dir)
        load_trunk(model, state)
        env.log(f"[dtlray] stage 1 reused from {plan.stage1_dir}")
        return Stage1Outcome(
            "reused",
            record.source_val_acc,
            time.perf_counter() - start,
            record.seconds,
            reused_epochs=cfg.stage1.epochs,
        )

    pretrain = pretrain_stage(cfg, plan.datasets)
    model.reset_heads(pretrain.heads)
    model.to(env.device)
    train_data = {t.name: train_source(t, plan.stream_rows, env) for t in pretrain.tasks}
    per_epoch = epoch_steps(pretrain, train_data)
    streamed = any(isinstance(split, StreamingSplit) for split in train_data.values())
    resume, reused, before = _stage1_tree_start(cfg, plan, env, per_epoch, streamed)
    if resume is not None:
        model.load_state_dict(resume.model_state)  # run_stage continues its optimizer

    def store_constant_phase(steps: int, state: Callable[[], dict]) -> None:
        # The end of the constant phase is what a longer budget of this configuration continues.
        if plan.stage1_tree_dir and env.rank == 0:
            seconds = before + time.perf_counter() - start
            save_constant_phase(plan.stage1_tree_dir, steps, per_epoch, state(), seconds)

    final = run_stage(
        pretrain,
        model,
        env,
        train_data=train_data,
        resume=resume,
        on_constant_end=store_constant_phase if plan.stage1_tree_dir else None,
    )
    seconds = time.perf_counter() - start
    source_val_acc = final[f"{pretrain.tasks[0].name}/val_acc"]
    if env.rank == 0:
        save_stage1(
            plan.stage1_dir,
            model.trunk_state_dict(),
            Stage1Record(
                source_val_acc=source_val_acc, seconds=before + seconds, config=cfg.to_dict()
            ),
        )
    env.log(f"[dtlray] stage 1 done in {seconds:.1f}s: source/val_acc={source_val_acc:.4f}")
    return Stage1Outcome("computed", source_val_acc, seconds, before + seconds, reused)


def _stage1_tree_start(
    cfg: TrialConfig, plan: WorkerPlan, env: WorkerEnv, per_epoch: int, streamed: bool
) -> tuple[Resume | None, float, float]:
    """Where a computed stage 1 starts: the longest stored constant phase of its configuration
    that fits its own (the stage tree), else step 0. A streamed source reads whole passes, so it
    continues only a phase that ends at an epoch's end.

    Returns:
        ``(resume, reused_epochs, their compute seconds)``; ``(None, 0.0, 0.0)`` from scratch.
    """
    if not plan.stage1_tree_dir:
        return None, 0.0, 0.0
    _, constant, _ = cfg.stage1.wsd_steps(per_epoch)
    phase = longest_constant_phase(plan.stage1_tree_dir, constant, per_epoch, streamed)
    if phase is None:
        return None, 0.0, 0.0
    state = load_constant_phase(phase)
    env.log(
        f"[dtlray] stage 1 continues a stored constant phase: {phase.epochs:.3g} of "
        f"{cfg.stage1.epochs} epochs reused"
    )
    meta = {"step": phase.steps}
    resume = Resume(state["model"], state["optimizer"], state["scheduler"], meta, rng=state["rng"])
    return resume, phase.epochs, phase.seconds


@torch.inference_mode()
def target_logme(
    model: TransferModel,
    spec: StageSpec,
    train_data: Mapping[str, InMemorySplit | StreamingSplit],
    env: WorkerEnv,
) -> dict[str, float]:
    """LogME of the trunk's features on each target's train split: a zero-training estimate of
    how well this stage 1 suits the target (see :mod:`dtlray.logme`). Streamed splits are left
    out (a second pass over data too large to hold is not worth it)."""
    model.eval()
    scores = {}
    for task in spec.tasks:
        split = train_data[task.name]
        if not isinstance(split, InMemorySplit) or len(split) < 2:
            continue
        features = [
            model.features(model_input(split.images[i : i + _EVAL_BATCH_ROWS], env, False))
            .float()
            .cpu()
            for i in range(0, len(split), _EVAL_BATCH_ROWS)
        ]
        scores[f"target/{task.name}/logme"] = logme(
            torch.cat(features).numpy(), split.labels.numpy()
        )
    model.train()
    return scores


# -- one stage ----------------------------------------------------------------------------------


def run_stage(
    spec: StageSpec,
    model: TransferModel,
    env: WorkerEnv,
    *,
    stream_rows: Mapping[str, int] | None = None,
    train_data: Mapping[str, InMemorySplit | StreamingSplit] | None = None,
    resume: Resume | None = None,
    on_epoch_end: Callable[[int, dict[str, Any], Callable[[], dict[str, Any]]], None] | None = None,
    on_constant_end: Callable[[int, Callable[[], dict[str, Any]]], None] | None = None,
    run_test: bool = False,
    test_every_epoch: bool = False,
) -> dict[str, float]:
    """Train ``model`` through one stage; return the last epoch's metrics (per task too).

    A ``schedule: wsd`` stage trains ``round(epochs * steps per epoch)`` steps and steps its
    learning rate per step, so its budget (and its constant phase) may end mid-epoch; the last
    epoch is then a part of one, validated like a whole one.

    Args:
        spec: the stage.
        model: the (unwrapped) model; its heads must match ``spec.heads``.
        env: where this worker runs.
        stream_rows: the train keys to stream each epoch instead of keeping in memory, with
            the rows of each whole dataset (:attr:`~dtlray.worker.WorkerPlan.stream_rows`).
        train_data: the stage's train splits, when the caller read them already (then
            ``stream_rows`` is not used).
        resume: a finetune checkpoint, or a stored constant phase, to continue from.
        on_epoch_end: called as ``(epoch, metrics, state)`` after every epoch; ``state()``
            builds the checkpoint state, only when one is written.
        on_constant_end: ``wsd`` only: called as ``(steps, state)`` right after the constant
            phase's last step, if this run trained it (``state()`` adds the RNG state).
        run_test: evaluate the test splits after the last epoch.
        test_every_epoch: with ``run_test``, after every epoch.
    """
    if train_data is None:
        train_data = {t.name: train_source(t, stream_rows or {}, env) for t in spec.tasks}
    agree_on_sizes(train_data, env)
    streamed = {name: s for name, s in train_data.items() if isinstance(s, StreamingSplit)}
    if streamed and env.rank == 0:
        shown = ", ".join(f"{name} ({len(split)} rows)" for name, split in streamed.items())
        env.log(f"[dtlray] {spec.name} streams from Ray Data every epoch, per worker: {shown}")
    assert env.session is not None
    val_data = {t.name: read_shard(env.session.dataset(t.val_key), t.meta) for t in spec.tasks}
    per_epoch = epoch_steps(spec, train_data)
    per_step = spec.optim.schedule == "wsd"
    if per_step:
        _, constant, total = spec.optim.wsd_steps(per_epoch)
    else:
        constant, total = 0, int(spec.optim.epochs) * per_epoch
    assert not (streamed and total % per_epoch), "plan_trial refuses a streamed part-epoch"
    optimizer = build_optimizer(model, spec)
    scheduler = build_scheduler(optimizer, spec.optim, per_epoch)
    # fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(env.device.type) if env.amp_dtype == torch.float16 else None
    if scaler is not None and resume is not None and resume.scaler_state is not None:
        scaler.load_state_dict(resume.scaler_state)
    start = 0  # optimizer steps already taken
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer_state)
        scheduler.load_state_dict(resume.scheduler_state)
        meta = resume.meta
        start = int(meta["step"]) if "step" in meta else (int(meta["epoch"]) + 1) * per_epoch
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            # wsd: the rate of the step it resumes at under *this* run's budget -- a stage-1
            # budget continuing a shorter one's constant phase decays on its own schedule.
            groups = optimizer.param_groups
            rates = zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
            for group, base, factor in rates:
                group["lr"] = base * factor(start)

    def state() -> dict[str, Any]:
        saved = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        if scaler is not None:
            saved["scaler"] = scaler.state_dict()
        return saved

    metrics: dict[str, float] = {}
    test_data: dict[str, InMemorySplit] | None = None
    wrapped_for: bool | None = None
    wrapped: nn.Module = model
    epochs = math.ceil(total / per_epoch)
    for epoch in range(start // per_epoch, epochs):
        frozen = epoch < spec.freeze_backbone_epochs
        if frozen != wrapped_for:
            # DDP registers the parameters that need grads when it is built, so freezing or
            # unfreezing the backbone means building it again.
            _set_backbone_frozen(model, frozen)
            wrapped = _wrap_ddp(model, env)
            wrapped_for = frozen
        # Each epoch's randomness (dropout, augmentation) from its own seed: a resumed run, or
        # a stage-1 budget continuing a stored constant phase, trains as one that never stopped.
        stage_offset = 0 if spec.name == "pretrain" else 500_009
        torch.manual_seed(env.seed * 1_000_003 + stage_offset + epoch * 101 + env.rank)
        first = max(0, start - epoch * per_epoch)
        if first and resume is not None and resume.rng is not None and env.world_size == 1:
            # Mid-epoch: where the stored run's generator was. (Only rank 0's is stored: under
            # DDP each rank keeps its own epoch seed, so the ranks' draws stay apart.)
            torch.set_rng_state(resume.rng)

        def after_step(step: int, done_before: int = epoch * per_epoch) -> None:
            done = done_before + step + 1
            if per_step:
                scheduler.step()
            if on_constant_end is not None and done == constant and done > start:
                on_constant_end(done, lambda: {**state(), "rng": torch.get_rng_state()})

        train_stats = train_one_epoch(
            wrapped,
            model,
            spec,
            train_data,
            optimizer,
            epoch,
            env,
            scaler=scaler,
            steps=(first, min(per_epoch, total - epoch * per_epoch)),
            after_step=after_step if per_step or on_constant_end else None,
        )
        if not per_step:
            scheduler.step()
        val_start = time.perf_counter()
        val = evaluate(model, spec.tasks, val_data, env)
        val_seconds = time.perf_counter() - val_start
        for task, (_, loss) in val.items():
            if not math.isfinite(loss):  # the weights blew up although each step's loss did not
                where = f"after training: the {task} validation loss"
                raise Diverged(spec.name, epoch + 1, where, loss, spec.optim.lr)
        metrics = _stage_metrics(spec, train_stats, val, "val")
        metrics["val/epoch_seconds"] = val_seconds  # what the per-epoch metric costs to measure
        metrics["epoch"] = epoch + 1
        last = epoch == epochs - 1
        if run_test and (last or test_every_epoch):
            if test_data is None:
                test_data = {
                    t.name: read_shard(env.session.dataset(t.test_key), t.meta)
                    for t in spec.tasks
                    if t.test_key
                }
            test = evaluate(model, spec.tasks, test_data, env)
            metrics.update(_stage_metrics(spec, None, test, "test"))
        if env.rank == 0:
            shown = ", ".join(
                f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith("acc") or "loss" in k
            )
            env.log(f"[dtlray] {spec.name} epoch {epoch + 1}/{epochs}: {shown}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics, state)
    _set_backbone_frozen(model, False)
    return metrics


def _stage_metrics(
    spec: StageSpec,
    train_stats: dict[str, float] | None,
    evals: dict[str, tuple[float, float]],
    split: str,
) -> dict[str, float]:
    # Finetune metrics use the contract's names (target/...); pretrain ones are per task only.
    prefix = "target/" if spec.name == "finetune" else ""
    metrics: dict[str, float] = {}
    for task, (acc, loss) in evals.items():
        metrics[f"{prefix}{task}/{split}_acc"] = acc
        metrics[f"{prefix}{task}/{split}_loss"] = loss
    if spec.name == "finetune":
        metrics[f"target/{split}_acc"] = float(np.mean([acc for acc, _ in evals.values()]))
        metrics[f"target/{split}_loss"] = float(np.mean([loss for _, loss in evals.values()]))
    if train_stats is not None:
        metrics.update(train_stats)
    return metrics


# -- optimiser ----------------------------------------------------------------------------------


def build_optimizer(model: TransferModel, spec: StageSpec) -> torch.optim.SGD:
    """SGD with Nesterov momentum, one parameter group per model part at ``lr * multiplier``."""
    groups = []
    for name, params in model.param_groups().items():
        if params:
            groups.append(
                {"params": params, "lr": spec.optim.lr * spec.lr_mult[name], "name": name}
            )
    return torch.optim.SGD(
        groups,
        lr=spec.optim.lr,
        momentum=spec.optim.momentum,
        nesterov=spec.optim.nesterov,
        weight_decay=spec.optim.weight_decay,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: StageConfig, steps_per_epoch: int = 1
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of a stage: stepped per epoch, but ``wsd``'s per optimizer
    step (its epochs take ``steps_per_epoch`` steps)."""
    if optim.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=optim.epochs)
    if optim.schedule == "wsd":
        warmup, constant, total = optim.wsd_steps(steps_per_epoch)
        decay = total - constant

        def factor(step: int) -> float:
            # A linear warmup, constant, then a linear decay to 0 over the last steps; each
            # step runs at the line's value at its midpoint (one decay step: half the rate).
            if step < warmup:
                return (step + 0.5) / warmup
            if step < constant:
                return 1.0
            return max(0.0, 1.0 - (step - constant + 0.5) / decay)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if optim.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, optim.step_epochs, optim.step_gamma)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def _set_backbone_frozen(model: TransferModel, frozen: bool) -> None:
    for p in model.backbone.parameters():
        p.requires_grad_(not frozen)


def _wrap_ddp(model: TransferModel, env: WorkerEnv) -> nn.Module:
    if env.world_size == 1:
        return model
    device_ids = [env.device] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def train_one_epoch(
    wrapped: nn.Module,
    model: TransferModel,
    spec: StageSpec,
    data: Mapping[str, InMemorySplit | StreamingSplit],
    optimizer: torch.optim.Optimizer,
    epoch: int,
    env: WorkerEnv,
    scaler: torch.amp.GradScaler | None = None,
    steps: tuple[int, int | None] = (0, None),
    after_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One pass over the stage's train data, in ``env``'s precision; returns loss and global
    samples/s.

    Args:
        scaler: fp16's gradient scaler.
        steps: ``(first, stop)``: train only these of the epoch's steps (a stage-1 budget that
            starts or ends mid-epoch); the epoch's batches are the same whichever are trained.
        after_step: called with each step's index in the epoch after its optimizer step.
    """
    model.train()
    if epoch < spec.freeze_backbone_epochs:
        model.backbone.eval()  # frozen means frozen: BN running stats stay as stage 1 left them
    start = time.perf_counter()
    seen = 0
    loss_sum = torch.zeros((), device=env.device)
    # The first step whose loss is not finite, tracked on the device (no host sync per step).
    no_step = torch.iinfo(torch.int64).max
    first_bad = torch.full((), no_step, dtype=torch.int64, device=env.device)
    first, stop = steps
    batches_of = itertools.islice(step_batches(spec, data, epoch, env), first, stop)
    for step, batches in enumerate(batches_of, start=first):
        follow_loan(env)
        # Tasks are stored at their own sizes; each is resized to the model input, then joined.
        x = torch.cat([model_input(b[1], env, spec.optim.augment) for b in batches])
        with _autocast(env):
            logits = wrapped(x)
            losses = []
            offset = 0
            for task, _, labels in batches:
                n = labels.shape[0]
                target = labels.to(env.device, non_blocking=True)
                losses.append(F.cross_entropy(logits[task][offset : offset + n], target))
                offset += n
            loss = torch.stack(losses).mean()  # every task weighs the same
        bad = ~torch.isfinite(loss.detach()) & (first_bad == no_step)
        first_bad = torch.where(bad, torch.full_like(first_bad, step), first_bad)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
            scaler.update()
        if after_step is not None:
            after_step(step)
        loss_sum += loss.detach() * offset
        seen += offset
    elapsed = time.perf_counter() - start
    totals = torch.tensor(
        [float(seen), loss_sum.item(), elapsed], dtype=torch.float64, device=env.device
    )
    if env.world_size > 1:
        seen_loss = totals[:2].clone()
        dist.all_reduce(seen_loss)
        slowest = totals[2:].clone()
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        totals = torch.cat([seen_loss, slowest])
    if env.world_size > 1:
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    samples, loss_total, seconds = totals.tolist()
    if int(first_bad) != no_step:
        where = f"step {int(first_bad) + 1}: the training loss"
        raise Diverged(spec.name, epoch + 1, where, loss_total / max(samples, 1), spec.optim.lr)
    return {
        "train/loss": loss_total / max(samples, 1.0),
        "train/samples_per_s": samples / max(seconds, 1e-9),
        "train/epoch_seconds": seconds,
    }


def _autocast(env: WorkerEnv) -> torch.autocast:
    return torch.autocast(env.device.type, dtype=env.amp_dtype, enabled=env.amp_dtype is not None)


@torch.inference_mode()
def evaluate(
    model: TransferModel,
    tasks: tuple[TaskSpec, ...],
    data: Mapping[str, InMemorySplit],
    env: WorkerEnv,
    predictions: dict[str, torch.Tensor] | None = None,
) -> dict[str, tuple[float, float]]:
    """Accuracy and mean loss per task over this rank's exactly-once shard, all-reduced.

    Args:
        predictions: if given, filled with each task's predicted class per example of this
            rank's shard, in its order.

    Returns:
        ``{task: (accuracy, mean cross-entropy)}``, identical on every rank.
    """
    model.eval()
    names = [t.name for t in tasks if t.name in data]
    # Per task: correct, loss sum, count — summed over ranks so each example counts once.
    sums = torch.zeros(len(names), 3, dtype=torch.float64, device=env.device)
    for i, name in enumerate(names):
        split = data[name]
        predicted = []
        for start in range(0, len(split), _EVAL_BATCH_ROWS):
            images = split.images[start : start + _EVAL_BATCH_ROWS]
            labels = split.labels[start : start + _EVAL_BATCH_ROWS].to(env.device)
            with _autocast(env):
                logits = model(model_input(images, env, augment=False))[name]
            logits = logits.float()
            predicted.append(logits.argmax(dim=1))
            sums[i, 0] += (predicted[-1] == labels).sum().item()
            sums[i, 1] += F.cross_entropy(logits, labels, reduction="sum").item()
            sums[i, 2] += labels.shape[0]
        if predictions is not None:
            predictions[name] = torch.cat(predicted).cpu() if predicted else torch.empty(0)
    if env.world_size > 1:
        dist.all_reduce(sums)
    model.train()
    results = {}
    for i, name in enumerate(names):
        correct, loss, count = sums[i].tolist()
        if count == 0:
            raise RuntimeError(f"no {name} evaluation examples reached any worker")
        results[name] = (correct / count, loss / count)
    return results
