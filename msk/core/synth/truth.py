"""Join a synthetic export's ground truth to the output of ``msk ingest`` run on its ``export/``.

``ground_truth.csv`` names files relative to the synth output folder (``export/<...>.dcm``);
the ingest manifest names them relative to the ingest source (the ``export/`` folder) and maps
each to its pseudonymous ``image_id``, which is the key of the shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class TextBox:
    """A box of text the synthetic export burned into an image, in source pixels (x1, y1 exclusive).

    ``kind`` is ``marker`` (a lead side marker, "L"/"R") or ``text`` (institution code, date and
    sometimes the patient's name); ``contrast`` is |text value - median of what it was burned on|
    in display units [0, 1] (near 0: the text is invisible, e.g. white on a white border).
    """

    kind: str
    x0: int
    y0: int
    x1: int
    y1: int
    contrast: float


def parse_text_boxes(value: object) -> list[TextBox]:
    """The boxes of a ground-truth ``text_boxes`` cell (``kind x0 y0 x1 y1 contrast;...``); an empty
    or missing cell (NaN in pandas, files without an image) gives none."""
    if not isinstance(value, str) or not value.strip():
        return []
    boxes = []
    for item in value.split(";"):
        kind, x0, y0, x1, y1, contrast = item.split()
        boxes.append(TextBox(kind, int(x0), int(y0), int(x1), int(y1), float(contrast)))
    return boxes


def ground_truth_for_ingest(synth_out: str | os.PathLike, ingest_out: str | os.PathLike,
                            *, status: str | None = "ok") -> pd.DataFrame:
    """Ground-truth rows with the ingest's ``image_id``, ``status`` and ``reason`` added.

    :param status: keep only manifest rows with this status (``None``: all rows).
    :raises ValueError: when a manifest row has no ground-truth row (not this export's ingest).
    """
    from msk.core.io.manifest import read_manifest

    truth = pd.read_csv(Path(synth_out) / "ground_truth.csv", dtype={"patient_id": str, "entity": str})
    manifest = read_manifest(ingest_out, columns=["path", "image_id", "status", "reason"]).to_pandas()
    manifest["path"] = "export/" + manifest["path"]
    joined = manifest.merge(truth, on="path", how="left", indicator=True)
    orphans = joined.loc[joined["_merge"] == "left_only", "path"].tolist()
    if orphans:
        raise ValueError(f"{len(orphans)} ingested files are not in {synth_out}/ground_truth.csv "
                         f"(e.g. {orphans[:3]}); was {ingest_out} ingested from {synth_out}/export?")
    joined = joined.drop(columns="_merge")
    return joined if status is None else joined[joined["status"] == status].reset_index(drop=True)
