"""Known labels of an ingest's images, read from a truth file, for every command that names or
scores against them (``msk build recommender``, ``msk clusters label``, ``msk eval sorter``).

Two file kinds are read, told apart by their columns:

* a **labels CSV** keyed by ``image_id``: the ``image_id,label[,patient_id]`` file that
  ``msk import`` writes (and ``msk train sorter`` reads), or any CSV with an ``image_id`` column
  and a ``region`` or ``entity`` column; optional lesion boxes ``x0,y0,x1,y1`` (source-image
  pixels);
* a synthetic export's **ground_truth.csv** (``msk synth``), keyed by file ``path``: its paths
  are matched to the ingest's ``image_id`` through the ingest manifest (paths relative to the
  ingest source, the export folder or its ``export/``), so the ingest folder is needed. Regions
  come from ``region``, lesion entities from ``entity`` (images without a lesion have none),
  boxes from ``x0..y1`` and mask files from ``mask`` (relative to the file's folder).

Which column is the label depends on what is asked for: ``region`` (``region`` column, else
``label``) or ``entity`` (``entity`` column, else ``label``). Rows with an empty label are left
out. Checks that name the file: a missing file or column, an image labelled twice, a truth file
that shares no image with the ingest or run it is used with (:func:`check_overlap`), and names
outside an entity set (:func:`canonical_labels` lists every unknown name at once).
"""

from __future__ import annotations

import csv
import difflib
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from msk.core.errors import MskError

__all__ = ["BOX_COLUMNS", "Truth", "TruthError", "canonical_labels", "check_overlap", "read_truth"]

BOX_COLUMNS = ("x0", "y0", "x1", "y1")
Box = tuple[float, float, float, float]


class TruthError(MskError, ValueError):
    """A truth file that cannot be used; the message names the file and the fix."""


@dataclass
class Truth:
    """The known label (and lesion box) of images, by ``image_id``.

    :param path: the file read.
    :param kind: ``labels`` (keyed by image id) or ``synthetic`` (a ``ground_truth.csv``).
    :param labels: ``image_id -> label`` as written in the file.
    :param lines: ``image_id -> line`` of the file (for error messages).
    :param boxes: ``image_id -> (x0, y0, x1, y1)`` lesion boxes, source pixels (rows with one).
    :param masks: ``image_id -> mask file`` (synthetic exports with masks).
    :param patients: ``image_id -> patient_id`` where a labels CSV gives one (``msk import``
        writes keyed pseudonyms); never taken from a synthetic ground truth (raw ids).
    """

    path: Path
    kind: Literal["labels", "synthetic"]
    labels: dict[str, str]
    lines: dict[str, int] = field(default_factory=dict)
    boxes: dict[str, Box] = field(default_factory=dict)
    masks: dict[str, Path] = field(default_factory=dict)
    patients: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def restrict(self, image_ids: Collection[str]) -> Truth:
        """The same truth for the images of ``image_ids`` only."""
        keep = set(image_ids)
        pick = lambda d: {k: v for k, v in d.items() if k in keep}  # noqa: E731
        return Truth(self.path, self.kind, pick(self.labels), pick(self.lines), pick(self.boxes),
                     pick(self.masks), pick(self.patients))


def _rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    if not path.is_file():
        raise TruthError(f"truth file {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [x.strip().lower() for x in reader.fieldnames or []]
            reader.fieldnames = fields
            rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k})
                    for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TruthError(f"{path}: not a readable CSV file ({exc})") from None
    return fields, rows


def _box(row: dict[str, str], path: Path, line: int) -> Box | None:
    values = [row.get(c, "") for c in BOX_COLUMNS]
    if not any(values):
        return None
    try:
        box = tuple(float(v) for v in values)
    except ValueError:
        raise TruthError(f"{path}, line {line}: lesion box {', '.join(values)} is not four numbers "
                         "x0, y0, x1, y1") from None
    if not (box[2] > box[0] and box[3] > box[1]):
        raise TruthError(f"{path}, line {line}: lesion box {box} is empty (needs x1 > x0 and y1 > y0)")
    return box  # type: ignore[return-value]


def read_truth(path: str | os.PathLike, *, what: Literal["region", "entity"],
               ingest: str | os.PathLike | None = None) -> Truth:
    """Read a labels CSV or a synthetic ``ground_truth.csv`` (see the module docstring).

    :param what: the label asked for: ``region`` or ``entity``.
    :param ingest: the ingest output whose manifest maps a ``ground_truth.csv``'s paths to
        image ids (required for that kind; unused for labels CSVs).
    """
    path = Path(path)
    fields, rows = _rows(path)
    if "image_id" not in fields and "path" in fields and "region" in fields:
        return _synthetic(path, rows, what, ingest)
    if "image_id" not in fields:
        raise TruthError(f"{path}, line 1: expected an image_id column (a labels CSV image_id,label "
                         f"as `msk import` writes) or a synthetic ground_truth.csv; found {fields}")
    column = what if what in fields else "label"
    if column not in fields:
        raise TruthError(f"{path}, line 1: no {what} or label column; found {fields}")
    truth = Truth(path, "labels", {})
    for line, row in rows:
        image_id, label = row.get("image_id", ""), row.get(column, "")
        if not image_id or not label:
            continue
        if image_id in truth.labels and truth.labels[image_id] != label:
            raise TruthError(f"{path}, line {line}: image {image_id} is labelled {label!r} but line "
                             f"{truth.lines[image_id]} says {truth.labels[image_id]!r}")
        truth.labels[image_id], truth.lines[image_id] = label, line
        if (box := _box(row, path, line)) is not None:
            truth.boxes[image_id] = box
        if row.get("patient_id"):
            truth.patients[image_id] = row["patient_id"]
    if not truth.labels:
        raise TruthError(f"{path}: no row has both an image_id and a {column}")
    return truth


def _synthetic(path: Path, rows: list[tuple[int, dict[str, str]]], what: str,
               ingest: str | os.PathLike | None) -> Truth:
    from msk.core.io.manifest import read_manifest

    if ingest is None:
        raise TruthError(f"{path} is a synthetic ground truth keyed by file path; give the ingest "
                         "folder of its export (--ingest) so its paths can be matched to image ids")
    ingest = Path(ingest)
    manifest = read_manifest(ingest, columns=["path", "image_id", "status"]).to_pylist()
    if not manifest:
        raise TruthError(f"{ingest} holds no ingest manifest; give the `msk ingest` output folder "
                         f"of the export that {path} describes")
    by_path = {r["path"]: r["image_id"] for r in manifest if r["status"] == "ok"}
    best: dict[int, str] = {}
    for prefix in ("", "export/"):  # the ingest source: the synth folder or its export/
        found = {line: by_path[row["path"].removeprefix(prefix)] for line, row in rows
                 if row.get("path", "").removeprefix(prefix) in by_path}
        if len(found) > len(best):
            best = found
    if not best:
        raise TruthError(f"{path} names no file of the ingest {ingest} (no path in common with its "
                         "manifest); was that ingest made from this synthetic export?")
    truth = Truth(path, "synthetic", {})
    for line, row in rows:
        image_id = best.get(line)
        label = row.get(what, "")
        if image_id is None or not label:
            continue
        truth.labels[image_id], truth.lines[image_id] = label, line
        if what == "entity" and (box := _box(row, path, line)) is not None:
            truth.boxes[image_id] = box
        if row.get("mask"):
            truth.masks[image_id] = path.parent / row["mask"]
        # its patient_id is the raw one the export wrote, never copied: the shards hold the pseudonym
    if not truth.labels:
        raise TruthError(f"{path}: none of the ingested images of {ingest} has a {what}")
    return truth


def check_overlap(truth: Truth, image_ids: Collection[str], other: str | os.PathLike) -> int:
    """The number of ``image_ids`` (the images of ``other``: an ingest or run folder) that
    ``truth`` labels; none is a :class:`TruthError` naming both files."""
    n = len(set(truth.labels) & set(image_ids))
    if n == 0:
        raise TruthError(f"{truth.path} labels none of the {len(image_ids)} images of {other} (no "
                         f"image_id in common): were the labels made for another ingest? Use the "
                         "labels file written for that ingest")
    return n


def canonical_labels(truth: Truth, entity_set: str) -> Truth:
    """``truth`` with every label mapped to its canonical name in ``entity_set`` (names, codes
    and aliases, case-insensitive); unknown names are one :class:`TruthError` naming them all."""
    from msk.core.registry import entity_set as get_entity_set

    entities = get_entity_set(entity_set)
    spellings = {s.lower(): name for name in entities.names
                 for s in (name, entities.get(name).code, *entities.get(name).aliases)}
    unknown: dict[str, int] = {}
    labels: dict[str, str] = {}
    for image_id, label in truth.labels.items():
        name = spellings.get(label.strip().lower())
        if name is None:
            unknown.setdefault(label, truth.lines.get(image_id, 0))
        else:
            labels[image_id] = name
    if unknown:
        def hint(label: str) -> str:
            close = difflib.get_close_matches(label.lower(), list(spellings), n=1, cutoff=0.6)
            return f", did you mean {spellings[close[0]]!r}?" if close else ""

        shown = "; ".join(f"{label!r} (line {line}{hint(label)})"
                          for label, line in sorted(unknown.items(), key=lambda kv: kv[1])[:8])
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise TruthError(f"{truth.path}: {len(unknown)} name(s) are not in {entities.name}: {shown}{more}; "
                         "fix them (`msk plugins entity_set` lists the names)")
    return Truth(truth.path, truth.kind, labels, dict(truth.lines), dict(truth.boxes),
                 dict(truth.masks), dict(truth.patients))
