"""Starting Ray for msk: one ``ray.init``, quiet unless asked (``msk -v``).

A local Ray instance prints its start-up (token authentication, "Started a local Ray
instance"), Ray Train's worker-group and checkpoint messages, the INFO logs of libraries in the
workers (faiss's "Loading faiss...") and the output of Ray's own actors (Train's controller,
placement-group cleaner): about 75 lines for a one-epoch ``msk cluster``, around the few lines
msk prints. :func:`start_ray` starts Ray with its loggers at WARNING on the driver and in every
worker, keeps what msk code prints in the workers (epoch lines, warnings), and drops the output
of Ray's internal actors. ``msk -v`` (:func:`set_verbose`, env ``MSK_VERBOSE=1``) starts Ray as
Ray would on its own, with all of it.

Every command that starts Ray goes through :func:`start_ray` (it also puts back the CLI's
signal handlers, see :mod:`msk.core.runtime.shutdown`); ``RAY_ADDRESS`` still joins a running cluster.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any

__all__ = ["RAY_INTERNAL_ACTORS", "VERBOSE_ENV", "quiet_worker", "set_verbose", "start_ray",
           "train_logging_config", "verbose"]

VERBOSE_ENV = "MSK_VERBOSE"

#: Ray's own actors whose output is dropped unless verbose (their failures reach msk as errors).
RAY_INTERNAL_ACTORS = frozenset({
    "TrainController", "PlacementGroupCleaner", "PreemptionWatcher", "TrainStateActor",
    "SynchronizationActor", "_StatsActor", "StatsActor", "AutoscalingRequester", "ProxyActor",
    "ServeController", "TunerInternal", "_TrainingRunActor",
})

#: Environment of a quiet Ray, set before it starts (workers inherit it) unless already set.
QUIET_ENV = {
    "RAY_LOGGER_LEVEL": "warning",  # the "ray" loggers of the driver and every worker
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # msk's prints in Train workers stay prints (not INFO logs)
}


def verbose() -> bool:
    """Whether Ray's own output is wanted (``msk -v`` or ``MSK_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """Turn Ray's output on or off for this process and the processes it starts."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def start_ray(**options: Any) -> bool:
    """Start (or join, with ``RAY_ADDRESS``) Ray unless it is running; ``options`` go to
    ``ray.init`` (e.g. ``include_dashboard=False``). Quiet unless :func:`verbose`.

    :return: whether this call started it.
    """
    import ray

    from msk.core.runtime import shutdown

    if ray.is_initialized():
        return False
    quiet = not verbose()
    if quiet:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        options.setdefault("logging_level", logging.ERROR)  # the driver: no start-up or token notices
    ray.init(**options)
    shutdown.reinstall()  # ray.init replaced the CLI's SIGTERM handler
    if quiet and options.get("log_to_driver", True):
        _drop_internal_actor_output()
    if quiet:
        for name in ("ray.train", "ray.tune", "ray.data"):
            logger = logging.getLogger(name)
            if logger.level < logging.WARNING:
                logger.setLevel(logging.WARNING)
    return True


def quiet_worker() -> None:
    """In a Ray worker msk runs code on: INFO logs of libraries (faiss's "Loading faiss...",
    Ray Train's "Reporting training result") off unless verbose; warnings still show."""
    if not verbose():
        logging.getLogger().setLevel(logging.WARNING)


def train_logging_config():
    """Ray Train's ``RunConfig(logging_config=...)``: its worker-group and checkpoint messages
    at WARNING unless verbose; ``None`` (Ray's default) when verbose or not available."""
    if verbose():
        return None
    try:
        from ray.train import LoggingConfig
    except ImportError:  # an older Ray Train
        return None
    return LoggingConfig(log_level="WARNING")


def _drop_internal_actor_output() -> None:
    """Print the workers' output as Ray does, less that of :data:`RAY_INTERNAL_ACTORS`.

    Ray forwards each worker's stdout/stderr to the driver through a dispatcher whose handler is
    named ``ray_print_logs``; this wraps that handler (a Ray without it is left as it is)."""
    with contextlib.suppress(Exception):
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        original = next((handler for name, handler in dispatcher.handlers if name == "ray_print_logs"), None)
        if original is None or getattr(original, "_msk_filtered", False):
            return

        @functools.wraps(original)
        def filtered(data: dict) -> None:
            if data.get("actor_name") in RAY_INTERNAL_ACTORS:
                return
            original(data)

        filtered._msk_filtered = True  # type: ignore[attr-defined]
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", filtered)
