"""Built-in tuning tasks of ``msk tune``: the sorter, the fusion heads and the recommender.

The tasks themselves (:class:`msk.core.stages.tuning.search.Task` subclasses) are imported when one is built,
so that listing plugins stays cheap.
"""

from __future__ import annotations

import functools
from typing import Any

from msk.core.hookspecs import hookimpl
from msk.core.specs import TuningTaskSpec


def _build(cls_name: str, name: str, **options: Any) -> Any:
    from msk.core.stages.tuning import search as tuning

    return getattr(tuning, cls_name)(**options)


TUNING_TASKS = (
    TuningTaskSpec(
        "sorter", functools.partial(_build, "SorterTask"),
        "the sorter on fold 1 of its CV plan; metric val_accuracy",
        command="msk train sorter INGEST LABELS OUT", labels="weak labels (sorter)"),
    TuningTaskSpec(
        "fusion", functools.partial(_build, "FusionTask"),
        "the first fusion head of `heads` on fold 1; metric val_accuracy",
        command="msk eval fusion INGEST METADATA OUT", labels="metadata CSV (fusion)"),
    TuningTaskSpec(
        "recommender", functools.partial(_build, "RecommenderTask"),
        "the first classifier of the recommender, seed 1; metric val_vote_accuracy (k-NN vote)",
        command="msk eval recommender INGEST LABELS OUT", labels="image_id,entity CSV (recommender)"),
)


@hookimpl
def msk_tuning_tasks() -> list[TuningTaskSpec]:
    return list(TUNING_TASKS)
