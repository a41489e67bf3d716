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
