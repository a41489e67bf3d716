"""One run per folder: a lock file that names its holder.

Every command that writes a run folder holds ``FOLDER/.lock`` while it runs
(:func:`run_lock`). The file holds JSON naming the holder (``pid``, ``host``, ``command``,
``started``) and is ``flock``-ed for as long as the holder lives, so:

* a second run on the folder stops at once with a :class:`RunLockedError` naming the holder;
* a lock left by a run that died on **this** host (its ``flock`` is gone with it; its PID is
  dead) is taken over with a warning;
* a lock written on **another** host is respected (``flock`` need not reach across a network
  file system) unless ``force=True`` (``--force-unlock``) or the file is removed by hand;
* the lock file is removed when the run ends, on success or error, and a folder the lock
  itself created is removed again if the run left it empty;
* a run that fails after writing into a folder it created leaves ``FOLDER/FAILED`` saying
  which command failed, when and why (the files next to it are incomplete); a later run of
  the same command that ends well removes it.

Locks are re-entrant within a process (``msk import`` locks its folder and then runs an
ingest on it). Older msk versions ``flock``-ed an empty ``.lock`` only in ``msk ingest``; such a
holder is reported as ``msk ingest``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from msk.core.errors import MskError

__all__ = ["FAILED_FILE", "LOCK_FILE", "Holder", "RunLockedError", "read_holder", "run_lock"]

LOCK_FILE = ".lock"
FAILED_FILE = "FAILED"
logger = logging.getLogger(__name__)

_held: dict[Path, int] = {}  # folder -> nesting depth, for re-entrant locks in this process
_held_guard = threading.Lock()


class RunLockedError(MskError):
    """The run folder is held by another run."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run folder's lock."""

    pid: int | None
    host: str | None
    command: str | None
    started: str | None

    def describe(self) -> str:
        where = f"pid {self.pid}" if self.pid is not None else "an unknown process"
        if self.host:
            where += f" on {self.host}"
        if self.started:
            where += f", started {self.started}"
        return f"{self.command or 'msk ingest'} ({where})"


def read_holder(lock_file: str | os.PathLike) -> Holder | None:
    """The holder recorded in ``lock_file``; ``None`` when the file is missing; fields are
    ``None`` when it is empty or unreadable (an older msk's lock)."""
    try:
        text = Path(lock_file).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    pid = data.get("pid")
    return Holder(pid if isinstance(pid, int) else None, data.get("host"), data.get("command"),
                  data.get("started"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _command_line() -> str:
    """This process's command line, shortened (a Python caller of the library: its script)."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    line = " ".join([prog, *sys.argv[1:]])
    return line if len(line) <= 120 else line[:117] + "..."


def _open_locked(lock_file: Path) -> int | None:
    """An fd of ``lock_file`` holding its ``flock``, or ``None`` when another process holds it."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:  # the file we locked must still be the one at the path (a releasing holder unlinks it)
            if os.fstat(fd).st_ino == os.stat(lock_file).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, command: str | None = None, *,
             force: bool = False) -> Iterator[Path]:
    """Hold ``folder``'s run lock for the ``with`` block (creating ``folder`` if needed).

    :param command: what runs, recorded for whoever is refused (default: this command line).
    :param force: take over a lock recorded by another host (``--force-unlock``).
    :raises RunLockedError: the folder is held by another live run, or by another host.
    """
    folder = Path(folder).expanduser().absolute()
    with _held_guard:
        if folder in _held:
            _held[folder] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield folder
        finally:
            with _held_guard:
                _held[folder] -= 1
        return

    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MskError(f"cannot create the output folder {folder}: {exc.strerror}") from None
    lock_file = folder / LOCK_FILE
    fd = _open_locked(lock_file)
    if fd is None:
        locker = read_holder(lock_file) or Holder(None, None, None, None)
        raise RunLockedError(
            f"{folder} is being written by another {locker.describe()}; wait for it to end or "
            "use another folder")
    try:
        holder = read_holder(lock_file)
        host = socket.gethostname()
        if holder is not None and holder.pid is not None:
            if holder.host not in (None, host):
                if not force:
                    raise RunLockedError(
                        f"{folder} is locked by {holder.describe()} on another host; if that run "
                        f"is gone, rerun with --force-unlock or delete {lock_file}")
                logger.warning("taking over %s from %s (forced)", lock_file, holder.describe())
            elif holder.pid != os.getpid():
                state = "still running but not holding it" if _pid_alive(holder.pid) else "no longer running"
                logger.warning("%s: taking over the stale lock of %s (%s)", folder, holder.describe(), state)
        command_line = command or _command_line()
        record = {"pid": os.getpid(), "host": host, "command": command_line,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _remove_if_created(folder, created)
        raise
    with _held_guard:
        _held[folder] = 1
    failure: BaseException | None = None
    try:
        yield folder
    except BaseException as exc:
        failure = exc
        raise
    finally:
        with _held_guard:
            del _held[folder]
        try:
            _record_outcome(folder, command_line, failure, created=bool(created))
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock_file.unlink()  # while still holding the flock: a waiting opener re-checks the inode
            os.close(fd)
            _remove_if_created(folder, created)


def _failed(exc: BaseException | None) -> bool:
    """Whether ``exc`` ended the run as a failure (an exit with status 0 is not one)."""
    if exc is None or isinstance(exc, GeneratorExit):
        return False
    if isinstance(exc, SystemExit):
        return exc.code not in (0, None)
    return getattr(exc, "exit_code", 1) != 0  # click's Exit(0) is a normal end


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, MskError) or type(exc).__name__ == "Interrupted":
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _record_outcome(folder: Path, command: str, failure: BaseException | None, *, created: bool) -> None:
    """Leave ``FOLDER/FAILED`` when a run fails after writing into a folder it created (or one
    already marked failed), saying what failed and why; a run of the same command that ends well
    removes the marker. A folder the failed run left empty gets no marker: it is removed."""
    marker = folder / FAILED_FILE

    def marked_by_this_command() -> bool:
        try:
            return marker.read_text().startswith(f"{command} failed")
        except OSError:
            return False

    if failure is None or not _failed(failure):
        if failure is None and marked_by_this_command():
            with contextlib.suppress(OSError):
                marker.unlink()
        return
    try:
        wrote = any(p.name not in (LOCK_FILE, FAILED_FILE) for p in folder.iterdir())
    except OSError:
        return
    if not wrote or not (created or marked_by_this_command()):
        return
    with contextlib.suppress(OSError):
        marker.write_text(
            f"{command} failed: {_reason(failure)}\n"
            f"at {time.strftime('%Y-%m-%dT%H:%M:%S%z')} (pid {os.getpid()} on {socket.gethostname()})\n"
            "The files in this folder are what it wrote before it stopped: incomplete. Remove the folder, "
            "or rerun the command on it where it resumes (this file goes when a rerun succeeds).\n")


def _remove_if_created(folder: Path, created: list[Path]) -> None:
    """Remove the folders this lock created (``folder`` and new parents) that the run left empty."""
    for path in created:
        try:
            path.rmdir()
        except OSError:
            return
