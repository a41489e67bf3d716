"""The one progress bar of msk's long work (ingest, synth, embed, DeepCluster, the sorter's folds).

A rich :class:`~rich.progress.Progress` on stderr (stdout stays for results and ``--json``):
description, bar, done/total, any extra columns a caller adds, elapsed time and, where asked,
the time remaining. ``enabled=False`` gives the same object, disabled, so callers never branch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(enabled: bool, *columns: Any, remaining: bool = False, description: str = "[bold]{task.description}"):
    """A rich progress bar on stderr: ``description``, bar, M/N, ``columns`` (rich columns or
    format strings of task fields, e.g. ``"{task.fields[rate]} files/s"``), elapsed [, remaining]."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    extra = [TextColumn(c) if isinstance(c, str) else c for c in columns]
    tail = [TimeElapsedColumn()] + ([TimeRemainingColumn()] if remaining else [])
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), *extra, *tail,
                    console=Console(stderr=True), disable=not enabled)


class follow_history:
    """While a training run writes ``history.csv`` (one row per finished epoch), move ``bar``'s
    ``task`` to ``done_before + rows`` about once a second: progress per epoch whether the run is
    in this process or on Ray Train workers. Use as ``with follow_history(bar, task, path, n):``."""

    def __init__(self, bar, task, history_csv, done_before: int, *, every_s: float = 1.0):
        import threading

        self.bar, self.task, self.path, self.base, self.every_s = bar, task, history_csv, done_before, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="msk-progress", daemon=True)

    def _rows(self) -> int:
        try:
            with open(self.path) as fh:
                return max(sum(1 for _ in fh) - 1, 0)
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.bar.update(self.task, completed=self.base + self._rows())

    def __enter__(self) -> follow_history:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
