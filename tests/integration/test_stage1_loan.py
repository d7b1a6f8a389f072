"""A trial waiting for another's stage 1 lends its CPUs to the one computing it (real Ray)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from dtlray.stage1_cache import Stage1Record, save_stage1, stage1_dir
from dtlray.stage1_claims import POLL_S, CpuLoan, stage1_claim, start_claims
from dtlray.worker import WorkerEnv, follow_loan

pytestmark = pytest.mark.slow  # starts a real local Ray


def _until(condition, timeout: float = 10 * POLL_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_waiter_lends_its_cpus_until_the_result_is_stored(
    ray_cluster: None, tmp_path: Path
) -> None:
    storage = str(tmp_path)
    start_claims(storage)
    key = "k" * 16
    result_dir = stage1_dir(storage, key)
    loan = CpuLoan()
    waited: list[str] = []

    def waiter() -> None:
        with stage1_claim(storage, key, result_dir, holder="waiter", cpus=0.9) as mode:
            waited.append(mode)

    env = WorkerEnv(
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        seed=0,
        image_size=8,
        channels=1,
        threads=1,
        loan=loan,
    )
    before = torch.get_num_threads()
    try:
        with stage1_claim(storage, key, result_dir, holder="holder", loan=loan) as mode:
            assert mode == "compute"
            assert loan.cpus == 0.0  # nobody waits yet
            thread = threading.Thread(target=waiter, daemon=True)
            thread.start()
            assert _until(lambda: loan.cpus == pytest.approx(0.9)), loan
            follow_loan(env)
            assert torch.get_num_threads() == 2  # one thread of its own, one lent
            save_stage1(result_dir, {"w": torch.zeros(1)}, Stage1Record(0.5, 1.0, {}))
            thread.join(timeout=10 * POLL_S)
            assert waited == ["load"]
            # The waiter is gone: its loan ends (it said so; a silent one lapses by itself).
            assert _until(lambda: loan.cpus == 0.0), loan
            follow_loan(env)
            assert torch.get_num_threads() == 1
        assert loan.cpus == 0.0
    finally:
        torch.set_num_threads(before)


def test_a_waiter_that_lends_nothing_changes_nothing(ray_cluster: None, tmp_path: Path) -> None:
    """A multi-worker trial waits holding only its driver's sliver: it lends no CPUs."""
    storage = str(tmp_path)
    start_claims(storage)
    key = "m" * 16
    result_dir = stage1_dir(storage, key)
    loan = CpuLoan()
    with stage1_claim(storage, key, result_dir, holder="holder", loan=loan) as mode:
        assert mode == "compute"
        done = threading.Event()

        def waiter() -> None:
            with stage1_claim(storage, key, result_dir, holder="waiter", cpus=0.0):
                done.set()

        threading.Thread(target=waiter, daemon=True).start()
        time.sleep(3 * POLL_S)
        assert loan.cpus == 0.0
        save_stage1(result_dir, {"w": torch.zeros(1)}, Stage1Record(0.5, 1.0, {}))
        assert done.wait(timeout=10 * POLL_S)
