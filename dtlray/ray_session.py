"""The Ray session of a dtlray command: join a cluster or start an embedded local Ray, and keep
the console readable.

``init_ray`` is what every command that trains calls first. Joining by address checks first
that something answers there (Ray's own client waits minutes in reconnect loops otherwise). The
embedded Ray gets its dashboard on a free 127.0.0.1 port, told to every Ray process (see
:func:`init_ray`). Unless ``verbose``, the driver filters the lines Ray's processes print that
are internal noise to a user (a fixed list, :data:`NOISE`); every other line, real warnings and
errors included, still shows.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable
from typing import Any

from dtlray.errors import DtlrayError

log = logging.getLogger(__name__)

ADDRESS_TIMEOUT_S = 10.0

EMBEDDED_RAY_ENV = {
    # Train V2's controller looks at its workers every 2 s by default, and only then sees a
    # report or the end of the train function: a one-worker ``TorchTrainer`` run spent ~5 s of
    # its ~20 s fixed cost waiting for those looks after its last report. A look is one small
    # actor call per worker; a missed one is tolerated for minutes
    # (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S), so a shorter interval risks nothing.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
"""Environment the embedded local Ray's processes get unless the user set it (cluster.yaml sets
the same on a cluster's nodes)."""

# Lines Ray's processes print that say nothing a dtlray user can act on. Each is matched
# anywhere in a line, so Ray's "(Actor pid=...)" prefix and colours do not matter.
NOISE = tuple(
    re.compile(pattern)
    for pattern in (
        # Train V2's controller, once per trial: an internal actor's restart policy.
        r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher'",
        # Train V2's workers, once per report: every metric again, at INFO.
        r"Reporting training result \d+: TrainingReport\(",
        # Ray Data's own DataConfig path uses an option it deprecated (plus the source line).
        r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources` is deprecated",
        r"^\s*self\.exclude_resources = exclude_resources\s*$",
        # Ray Data: progress bars are off on purpose; per-dataset completion lines.
        r"Progress bars disabled\. To enable, set",
        r"Dataset \S+ execution finished in [\d.]+ seconds",
        # The raylet on a small machine where every trial starts a few actors.
        r"PYTHON worker processes have been started on node",
        # Tune, for every checkpoint a one-worker trial reports.
        r"Checkpoint successfully created at: Checkpoint\(",
        # Train's placement-group cleaner after Tune stops a trial: the expected clean-up.
        r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up",
    )
)


def is_noise(line: str) -> bool:
    """Whether a line printed by a Ray process is on the :data:`NOISE` list."""
    return any(pattern.search(line) for pattern in NOISE)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_address(address: str, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Make sure something listens at a ``HOST:PORT`` or ``ray://HOST:PORT`` address.

    ``auto`` is left to Ray, which fails at once when no cluster runs on this node.

    Raises:
        DtlrayError: a malformed address, or nothing answering there (says what to do).
    """
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise DtlrayError(
            f"--address {address!r}: expected HOST:PORT (e.g. 127.0.0.1:6379), "
            "ray://HOST:PORT or auto"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise DtlrayError(_no_cluster(address, why)) from None


def _no_cluster(address: str, why: str) -> str:
    return (
        f"no Ray cluster answers at {address} ({why}); start one with `ray start --head` (it "
        "prints the address to pass), or drop --address to run on an embedded local Ray"
    )


def quiet_ray_data() -> None:
    """No per-dataset progress bars: from every worker they drown the per-epoch lines.

    Datasets carry the context they were created under to the workers that read them, so this
    runs in whichever process builds the datasets (the CLI driver or a Tune trial).
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def init_ray(address: str | None, *, verbose: bool = False, **local_options: Any) -> str | None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start an embedded local Ray.

    The embedded Ray is always a new instance with its dashboard on a free 127.0.0.1 port, and
    its processes are told that address (``RAY_API_SERVER_ADDRESS``). Train's placement-group
    cleaner asks that API when Tune stops a trial; with two Ray instances on one host it cannot
    tell which is its own, leaks the stopped trial's placement group, and the search hangs.

    Args:
        address: a cluster address (``auto``, ``HOST:PORT``, ``ray://...``) or None.
        verbose: show every line Ray's processes print (default: drop :data:`NOISE`).
        local_options: extra ``ray.init`` arguments for the embedded Ray (e.g. ``num_cpus``).

    Returns:
        The Ray dashboard's URL when this call started Ray with a dashboard, else None.

    Raises:
        DtlrayError: nothing answers at ``address``.
    """
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return None
    if not verbose:
        _quiet_driver_logs()
    # Ray's own convention: RAY_ADDRESS names the cluster to join when no address is given.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        except ConnectionError as err:
            raise DtlrayError(_no_cluster(address, str(err).split(".")[0])) from None
        url = None
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # Set before ray.init: the raylet and every worker inherit this process's environment.
        os.environ["RAY_API_SERVER_ADDRESS"] = url
        for name, value in EMBEDDED_RAY_ENV.items():
            os.environ.setdefault(name, value)
        options: dict[str, Any] = {
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": port,
            "log_to_driver": True,  # rank 0's one line per epoch is the progress
            "logging_level": logging.WARNING,
        }
        ray.init(address="local", **{**options, **local_options})
    if not verbose:
        _filter_worker_logs()
    return url


def _quiet_driver_logs() -> None:
    # The embedded Ray's token notice and Tune's snapshot advice say nothing a user can act on.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    # Tune, when short trials end close together: advice about its own snapshot cadence.
    logging.getLogger("ray.tune.execution.experiment_state").addFilter(
        lambda record: "snapshotting has been triggered" not in record.getMessage()
    )


def _filter_worker_logs() -> None:
    """Drop :data:`NOISE` from the lines Ray forwards from its processes to this driver.

    Ray has no public hook for this. The driver prints forwarded lines in two places: the
    handler ``ray_print_logs`` of its standard-stream dispatcher (worker output) and
    ``ray._private.worker.print_to_stdstream`` called directly (raylet messages); both are
    wrapped with the same filter.
    """
    from ray._private import ray_logging
    from ray._private import worker as ray_worker

    def filtered(print_lines: Callable[..., None]) -> Callable[..., None]:
        def print_filtered(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            lines = [line for line in data.get("lines", []) if not is_noise(line)]
            if lines:
                print_lines({**data, "lines": lines}, *args, **kwargs)

        print_filtered._dtlray_filter = True  # type: ignore[attr-defined]
        return print_filtered

    if not getattr(ray_worker.print_to_stdstream, "_dtlray_filter", False):
        ray_worker.print_to_stdstream = filtered(ray_worker.print_to_stdstream)
    dispatcher = ray_logging.global_worker_stdstream_dispatcher
    with dispatcher._lock:
        handlers = dict(dispatcher.handlers)
    printer = handlers.get("ray_print_logs")
    if printer is not None and not getattr(printer, "_dtlray_filter", False):
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", filtered(printer))
