"""Single-flight for stage 1: of the trials that need the same stage-1 result, one computes it.

A named Ray actor holds the claims for one storage path. A trial whose stage-1 result is not
stored yet asks for the claim on its key: the first one gets it and computes stage 1 (its trainer
stores the result); the others wait until the result appears, then load it. A claim is a lease the
holder renews while it runs, so a holder that dies without releasing (a crashed driver) hands the
work to a waiting trial after ``lease_s`` instead of blocking it forever. Completed results live in
storage (see :mod:`dtlray.stage1_cache`), so reuse survives restarts even though claims do not.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import ray

from dtlray.stage1_cache import has_stage1

log = logging.getLogger(__name__)

NAMESPACE = "dtlray"
LEASE_S = 120.0
POLL_S = 2.0
_DRIVER_HANDLES: dict[str, ray.actor.ActorHandle] = {}


@ray.remote(num_cpus=0)
class Stage1Claims:
    """Who is computing which stage-1 key (in memory; results themselves are in storage)."""

    def __init__(self) -> None:
        self._holders: dict[str, tuple[str, float]] = {}  # key -> (holder, lease expiry)

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
    claims: ray.actor.ActorHandle, key: str, result_dir: str, holder: str, lease_s: float
) -> Literal["claimed", "load", "compute"]:
    announced = False
    try:
        while not ray.get(claims.claim.remote(key, holder, lease_s), timeout=60):
            if has_stage1(result_dir):
                return "load"
            if not announced:
                log.info("stage 1 %s is being computed by another trial; waiting for it", key)
                announced = True
            time.sleep(POLL_S)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
        log.warning("stage-1 claims unavailable (%s); computing stage 1 here", err)
        return "compute"
    return "claimed"


@contextmanager
def stage1_claim(
    storage_path: str, key: str, result_dir: str, holder: str, lease_s: float = LEASE_S
) -> Iterator[Literal["load", "compute"]]:
    """Decide whether this trial loads or computes stage 1, and hold the claim while it runs.

    Yields ``"load"`` when the result is stored (or appeared while waiting), else ``"compute"``
    with the claim held (renewed in the background) until the ``with`` block ends. Without a
    claims actor (no search driver started one, or it died) the trial computes stage 1 itself:
    correct, only not deduplicated.
    """
    if has_stage1(result_dir):
        yield "load"
        return
    claims = _find_claims(storage_path)
    if claims is None:
        log.warning("no stage-1 claims actor for %s; computing stage 1 here", storage_path)
        yield "compute"
        return
    outcome = _wait_for_claim(claims, key, result_dir, holder, lease_s)
    if outcome != "claimed":
        # Yield outside any try: the with-body's own exceptions must propagate untouched.
        yield outcome
        return
    if has_stage1(result_dir):  # stored between our check and the claim
        claims.release.remote(key, holder)
        yield "load"
        return

    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 4):
            claims.renew.remote(key, holder, lease_s)

    renewer = threading.Thread(target=renew, name=f"stage1-lease-{key}", daemon=True)
    renewer.start()
    try:
        yield "compute"
    finally:
        stop.set()
        renewer.join()
        claims.release.remote(key, holder)
