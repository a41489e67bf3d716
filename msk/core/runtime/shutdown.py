"""One shutdown path for the command line: SIGTERM and SIGINT stop the command and every Ray
process it started, within 10 s.

:func:`msk.core.cli.main` calls :func:`install` before running a command: both signals then
raise :class:`Interrupted` in the main thread, so ``finally`` blocks run (run locks are
released; ``msk serve`` shuts Serve down). Then :func:`exit_after_signal` exits ``128 + signal``
(130 for SIGINT, 143 for SIGTERM) and a detached reaper ends the Ray instance the command
started (GCS, raylet, workers, agents); ``msk serve`` shuts Ray down and exits ``0`` instead
(stopping is how a server ends). :func:`begin_shutdown` bounds it all: a detached reaper ends
processes of the command still alive after it exited (Ray's dashboard and runtime-env agents
can outlive their raylet), and a watchdog exits if the shutdown hangs. The reaper is started
when the signal arrives, with the processes alive then: if the command then dies on its own
(Ray's core worker aborts the process on an internal check, ray-project/ray#54846), nothing it
started outlives it. A second signal during the shutdown exits at once.

``ray.init`` replaces the SIGTERM handler with its own (``sys.exit(15)``): code that starts Ray
calls :func:`reinstall` afterwards, and :func:`signal_of` also recognises Ray's exit, so commands
whose library code calls ``ray.init`` (ingest, embed, Ray Train/Tune) take the same path.
A command that connects to a running cluster (``RAY_ADDRESS``) only disconnects from it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from types import FrameType

__all__ = ["Interrupted", "begin_shutdown", "exit_after_signal", "install", "received", "reinstall", "signal_of",
           "stop_ray"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_state: dict = {"installed": False, "received": None, "deadline": False, "reaper": False}
#: Seconds after the signal (or after begin_shutdown) at which the reaper ends what is left.
REAPER_GRACE_S = 7.0


class Interrupted(BaseException):
    """The command was stopped by ``signum`` (a ``BaseException``, like ``KeyboardInterrupt``)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state["received"] is not None:  # a second signal while shutting down: stop now
        _kill_children()
        os._exit(128 + signum)
    _state["received"] = signum
    _start_reaper()  # before anything else can go wrong: the processes alive now end with this one
    raise Interrupted(signum)


def received() -> int | None:
    """The signal this process received (``None`` if none): code that cleans up after an
    exception can skip what the shutdown does anyway (ending Ray's workers)."""
    return _state["received"]


def install() -> None:
    """Make SIGTERM and SIGINT raise :class:`Interrupted` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        signal.signal(s, _handler)
    _state["installed"] = True


def reinstall() -> None:
    """Put the handlers back after ``ray.init`` replaced the SIGTERM one (only if installed)."""
    if _state["installed"]:
        install()


def signal_of(exc: BaseException) -> int | None:
    """The signal that ``exc`` stands for, or ``None`` for any other exception."""
    if isinstance(exc, Interrupted):
        return exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return int(signal.SIGINT)
    if isinstance(exc, SystemExit) and exc.code not in (0, None) and _state["received"] is not None:
        return int(_state["received"])  # e.g. click's "Aborted!" after a KeyboardInterrupt inside Ray
    if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
        handler = signal.getsignal(signal.SIGTERM)
        if getattr(handler, "__module__", "").startswith("ray"):  # ray.init's handler: sys.exit(15)
            return int(signal.SIGTERM)
    return None


def exit_after_signal(signum: int, say=print) -> None:
    """The end of a command stopped by ``signum``: exit ``128 + signum`` and leave no Ray process.

    Called once the interrupted command's exception is gone. The local Ray instance the command
    started is *not* shut down through ``ray.shutdown()`` here: after a signal, a thread still
    inside Ray (a Ray Data iterator, a pending ``ray.get``) can touch the core worker while it
    shuts down, and the core worker then ends the process itself with exit code 1 (seen in
    ``tests/test_run_lifecycle.py`` about one run in ten). Instead :func:`begin_shutdown`'s
    detached reaper ends every process the command started (GCS, raylet, workers, agents) as
    soon as this one has exited, and this process exits at once with ``os._exit``. A command
    connected to a running cluster (``RAY_ADDRESS``) has no such children: it only disconnects.
    """
    import logging

    _state["received"] = _state["received"] or signum
    reinstall()  # a second signal now exits at once
    say(f"msk: {Interrupted(signum)}; shutting down")
    begin_shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(128 + signum)


def _children() -> list:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with Ray
        return []
    with contextlib.suppress(Exception):
        return psutil.Process().children(recursive=True)
    return []


def _kill_children() -> None:
    for p in _children():
        with contextlib.suppress(Exception):
            p.kill()


_REAPER = """
import sys, time, psutil
parent, grace, procs = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
end = time.monotonic() + grace
def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
while time.monotonic() < end and alive(parent):
    time.sleep(0.1)
mine = []
for item in procs:
    pid, created = item.split(":")
    try:
        p = psutil.Process(int(pid))
        if abs(p.create_time() - float(created)) < 0.5:
            mine.append(p)
    except psutil.Error:
        pass
_, left = psutil.wait_procs(mine, timeout=max(0.1, min(2.0, end - time.monotonic())))
for p in left:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, left = psutil.wait_procs(left, timeout=1.0)
for p in left:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def _spawn_reaper(children: list, grace_s: float) -> None:
    """A detached process that ends ``children`` (this command's processes, e.g. Ray's agents)
    still alive once this process has exited, or after ``grace_s`` seconds: it also works when
    Ray's core worker ends this process in the middle of ``ray.shutdown()``."""
    import subprocess

    procs = []
    for p in children:
        with contextlib.suppress(Exception):
            procs.append(f"{p.pid}:{p.create_time()}")
    if not procs:
        return
    with contextlib.suppress(OSError):
        subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), str(grace_s), *procs],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)


def _start_reaper() -> None:
    """Spawn the reaper once, with this process's children now (idempotent)."""
    if _state["reaper"]:
        return
    _state["reaper"] = True
    _spawn_reaper(_children(), REAPER_GRACE_S)


def begin_shutdown(grace_s: float = REAPER_GRACE_S + 1.0) -> None:
    """Bound the shutdown after a signal (idempotent): a detached reaper ends this command's
    processes still alive once it has exited (or after :data:`REAPER_GRACE_S` s; the reaper of
    the signal, if there was one), and a watchdog ends this process ``grace_s + 1`` s from now
    if the shutdown hangs."""
    if _state["deadline"]:
        return
    _state["deadline"] = True
    _start_reaper()

    def watchdog() -> None:
        time.sleep(grace_s + 1.0)
        _kill_children()
        os._exit(128 + int(_state["received"] or signal.SIGTERM))

    threading.Thread(target=watchdog, name="msk-shutdown-watchdog", daemon=True).start()


def stop_ray(*, interrupted: bool = False) -> None:
    """Shut down Ray if this process started it (a no-op when Ray was never used).

    :param interrupted: after a signal (also implied once one was received): the shutdown is
        bounded by :func:`begin_shutdown`.
    """
    if interrupted or _state["received"] is not None:  # msk serve ends normally after a signal
        begin_shutdown()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():  # (msk serve shuts Serve down itself; ray.shutdown() ends its actors too)
            with contextlib.suppress(Exception):
                ray.shutdown()
