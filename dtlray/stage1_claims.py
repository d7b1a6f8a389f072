"""Single-flight for stage 1: of the trials that need the same stage-1 result, one computes it.

A named Ray actor holds the claims for one storage path. A trial whose stage-1 result is not
stored yet asks for the claim on its key: the first one gets it and computes stage 1 (its trainer
stores the result); the others wait until the result appears, then load it. A claim is a lease the
holder renews while it runs, so a holder that dies without releasing (a crashed driver) hands the
work to a waiting trial after ``lease_s`` instead of blocking it forever. Completed results live in
storage (see :mod:`dtlray.stage1_cache`), so reuse survives restarts even though claims do not.

A waiting trial does nothing with the CPUs it holds, so it lends them to the holder while it
waits: the holder's :class:`CpuLoan` says how many CPUs trials on its node are lending it, and a
holder that trains stage 1 in its own process trains on that many more threads (see
:func:`dtlray.worker.follow_loan`). At the end of a search, where the last trials all wait for
the last stage 1, that stage 1 is trained on every CPU they hold instead of on one slot's.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import ray

from dtlray.stage1_cache import has_stage1

log = logging.getLogger(__name__)

NAMESPACE = "dtlray"
LEASE_S = 120.0
POLL_S = 2.0
# A waiter's loan lapses this long after its last poll (it died, or stopped waiting unseen).
LOAN_TTL_S = 3 * POLL_S
_DRIVER_HANDLES: dict[str, ray.actor.ActorHandle] = {}


@dataclass
class CpuLoan:
    """The CPUs that trials waiting for this trial's stage 1 lend it now, on its node (updated
    every :data:`POLL_S` by :func:`stage1_claim` while it holds the claim)."""

    cpus: float = 0.0


@ray.remote(num_cpus=0)
class Stage1Claims:
    """Who is computing which stage-1 key (in memory; results themselves are in storage)."""

    def __init__(self) -> None:
        self._holders: dict[str, tuple[str, float]] = {}  # key -> (holder, lease expiry)
        # key -> waiter -> (node id, CPUs it holds, loan expiry)
        self._waiting: dict[str, dict[str, tuple[str, float, float]]] = {}

    def claim(self, key: str, holder: str, lease_s: float) -> bool:
        now = time.monotonic()
        current = self._holders.get(key)
        if current is None or current[0] == holder or current[1] < now:
            self._holders[key] = (holder, now + lease_s)
            return True
        return False

    def renew(self, key: str, holder: str, lease_s: float) -> None:
        current = self._holders.get(key)
        if current is not None and current[0] == holder:
            self._holders[key] = (holder, time.monotonic() + lease_s)

    def release(self, key: str, holder: str) -> None:
        if self._holders.get(key, ("", 0.0))[0] == holder:
            del self._holders[key]
            self._waiting.pop(key, None)  # only a holder asks; one still waiting says so again

    def wait(self, key: str, waiter: str, node: str, cpus: float) -> None:
        """``waiter`` (on ``node``, holding ``cpus``) is still waiting for ``key``."""
        self._waiting.setdefault(key, {})[waiter] = (node, cpus, time.monotonic() + LOAN_TTL_S)

    def stop_waiting(self, key: str, waiter: str) -> None:
        self._waiting.get(key, {}).pop(waiter, None)

    def lent(self, key: str, holder: str, node: str) -> float:
        """The CPUs that live waiters on ``node`` lend ``holder`` of ``key`` (0 if it is not
        the holder)."""
        if self._holders.get(key, ("", 0.0))[0] != holder:
            return 0.0
        now = time.monotonic()
        live = {w: v for w, v in self._waiting.get(key, {}).items() if v[2] > now}
        self._waiting[key] = live
        return sum(cpus for where, cpus, _ in live.values() if where == node)


def _actor_name(storage_path: str) -> str:
    return "stage1-claims-" + hashlib.sha256(storage_path.encode()).hexdigest()[:12]


def start_claims(storage_path: str) -> ray.actor.ActorHandle:
    """Start (or find) the claims actor of ``storage_path``; call it from the search's driver.

    The actor belongs to the process that starts it. Started by the driver it lives as long as
    the search; started inside a trial it would die with the first trial Tune stops.
    """
    handle = Stage1Claims.options(
        name=_actor_name(storage_path), namespace=NAMESPACE, get_if_exists=True
    ).remote()
    # A named actor still dies when its owner drops the last handle: keep one for the driver's
    # lifetime.
    _DRIVER_HANDLES[storage_path] = handle
    return handle


def _find_claims(storage_path: str) -> ray.actor.ActorHandle | None:
    try:
        return ray.get_actor(_actor_name(storage_path), namespace=NAMESPACE)
    except ValueError:
        return None


def _wait_for_claim(
    claims: ray.actor.ActorHandle,
    key: str,
    result_dir: str,
    holder: str,
    lease_s: float,
    cpus: float,
) -> Literal["claimed", "load", "compute"]:
    announced = False
    node = ray.get_runtime_context().get_node_id()
    try:
        while not ray.get(claims.claim.remote(key, holder, lease_s), timeout=60):
            if has_stage1(result_dir):
                return "load"
            if not announced:
                log.info("stage 1 %s is being computed by another trial; waiting for it", key)
                announced = True
            if cpus > 0:
                claims.wait.remote(key, holder, node, cpus)
            time.sleep(POLL_S)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
        log.warning("stage-1 claims unavailable (%s); computing stage 1 here", err)
        return "compute"
    finally:
        if announced and cpus > 0:
            claims.stop_waiting.remote(key, holder)
    return "claimed"


@contextmanager
def stage1_claim(
    storage_path: str,
    key: str,
    result_dir: str,
    holder: str,
    lease_s: float = LEASE_S,
    *,
    cpus: float = 0.0,
    loan: CpuLoan | None = None,
) -> Iterator[Literal["load", "compute"]]:
    """Decide whether this trial loads or computes stage 1, and hold the claim while it runs.

    Yields ``"load"`` when the result is stored (or appeared while waiting), else ``"compute"``
    with the claim held (renewed in the background) until the ``with`` block ends. Without a
    claims actor (no search driver started one, or it died) the trial computes stage 1 itself:
    correct, only not deduplicated.

    Args:
        cpus: the CPUs this trial holds and leaves idle while it waits (lent to the holder).
        loan: kept up to date, while this trial holds the claim, with what waiters lend it.
    """
    if has_stage1(result_dir):
        yield "load"
        return
    claims = _find_claims(storage_path)
    if claims is None:
        log.warning("no stage-1 claims actor for %s; computing stage 1 here", storage_path)
        yield "compute"
        return
    outcome = _wait_for_claim(claims, key, result_dir, holder, lease_s, cpus)
    if outcome != "claimed":
        # Yield outside any try: the with-body's own exceptions must propagate untouched.
        yield outcome
        return
    if has_stage1(result_dir):  # stored between our check and the claim
        claims.release.remote(key, holder)
        yield "load"
        return

    stop = threading.Event()
    node = ray.get_runtime_context().get_node_id()

    def renew() -> None:
        renewed = time.monotonic()
        while not stop.wait(POLL_S if loan is not None else lease_s / 4):
            if time.monotonic() - renewed >= lease_s / 4:
                claims.renew.remote(key, holder, lease_s)
                renewed = time.monotonic()
            if loan is not None:
                try:
                    loan.cpus = ray.get(claims.lent.remote(key, holder, node), timeout=30)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    loan.cpus = 0.0

    renewer = threading.Thread(target=renew, name=f"stage1-lease-{key}", daemon=True)
    renewer.start()
    try:
        yield "compute"
    finally:
        stop.set()
        renewer.join()
        if loan is not None:
            loan.cpus = 0.0
        claims.release.remote(key, holder)
