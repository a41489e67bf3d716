"""``msk import DATASET SRC OUT``: a labelled dataset layout -> an ingest plus ``OUT/labels.csv``.

A dataset plugin (hook ``msk_datasets``, built-ins in :mod:`msk.plugins.datasets`) reads the
layout's label files into records: a path under SRC, a label, a patient or group and extra
columns. This module does the rest, the same for every layout:

1. **Check** every record before any image is read: the label must be a name, code or alias of
   the options' entity set (or one of ``extra_labels``) and is written in its canonical form;
   the path must be relative and stay inside SRC; no file may be labelled twice. Errors name
   the file and line the plugin read the record from.
2. **Ingest** exactly the labelled files (:func:`msk.core.stages.ingest.pipeline.ingest` with ``paths=``), so
   it is resumable and idempotent like ``msk ingest``. A labelled file that does not exist or
   does not decode is quarantined with its reason (``read_error``, ``corrupt``, ``duplicate``
   ...) and gets no label row; the report counts them.
3. **Write** ``OUT/labels.csv`` (temp file + rename): ``image_id,label,patient_id`` then, for a
   tumour entity set, ``entity`` (= label, the column the tumour evaluations read), then the
   plugin's extra columns. ``patient_id`` is the keyed pseudonym of the record's patient
   (:meth:`msk.core.io.pseudonym.Pseudonymiser.pseudonym`, kind ``patient``, the same key as the
   ingest), never the raw value; empty where the layout has no patient. ``OUT/import.json``
   records the dataset, its options and the counts.

``msk train sorter OUT OUT/labels.csv`` reads the file as it is (the sorter takes
``patient_id`` from it for images whose shard row has none, e.g. PNG/JPEG inputs);
``msk eval recommender`` and ``msk eval fusion`` read the ``entity``, box and metadata columns.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field

import msk
from msk.core.config import MskConfig
from msk.core.errors import DatasetError
from msk.core.specs import DatasetOptions, DatasetRecord, DatasetSpec
from msk.core.stages.ingest.pipeline import IngestConfig, IngestReport

__all__ = ["IMPORT_FILE", "LABELS_FILE", "ImportConfig", "ImportReport", "import_dataset", "read_records"]

LABELS_FILE = "labels.csv"
IMPORT_FILE = "import.json"


class ImportConfig(MskConfig):
    """Options of ``msk import`` (YAML keys of ``--config``)."""

    options: dict[str, Any] = Field({}, description="options of the dataset plugin (`msk plugins dataset`)")
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="options of the ingest")


@dataclass
class ImportReport:
    """The outcome of :func:`import_dataset`."""

    dataset: str
    n_records: int  # labelled files the layout lists
    n_labelled: int  # rows of labels.csv (ingested ok)
    quarantined: dict[str, int]  # reason -> labelled files the ingest quarantined (no label row)
    by_label: dict[str, int]
    n_patients: int  # distinct patients/groups among the labelled rows (0: the layout has none)
    labels: Path
    ingest: IngestReport
    seconds: float
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one quarantined path

    @property
    def n_quarantined(self) -> int:
        return sum(self.quarantined.values())


def read_records(dataset: str | DatasetSpec, src: str | os.PathLike,
                 options: dict[str, Any] | DatasetOptions | None = None) -> list[DatasetRecord]:
    """The checked records of ``dataset`` under ``src``: canonical labels, normalised paths.

    Raises :class:`~msk.core.errors.ConfigError` for invalid options and
    :class:`~msk.core.errors.DatasetError` (naming the file and line) for an unknown label,
    an empty label, a path outside SRC, a file labelled twice or a layout without any record.
    """
    from msk.core.registry import get_registry

    spec = get_registry().get("dataset", dataset) if isinstance(dataset, str) else dataset
    opts = options if isinstance(options, DatasetOptions) else spec.parse_options(options)
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(f"source folder {src} does not exist or is not a folder")
    check = _label_checker(opts)
    records: list[DatasetRecord] = []
    first: dict[str, str] = {}
    for record in spec.read(src, opts):
        where = record.where or str(src)
        path = _relative(record.path, where)
        if path in first:
            raise DatasetError(f"{where}: {path} is labelled twice (first at {first[path]})")
        first[path] = where
        records.append(DatasetRecord(path, check(record.label, where), record.patient,
                                     dict(record.extra), where))
    if not records:
        raise DatasetError(f"{src}: the {spec.name} layout labels no file here; check SRC and the "
                           f"options (`msk import {spec.name} --help`, docs/datasets.md)")
    return records


def _relative(path: str, where: str) -> str:
    text = (path or "").strip().replace("\\", "/")
    norm = posixpath.normpath(text) if text else ""
    if not norm or norm.startswith(("/", "../")) or norm in (".", ".."):
        raise DatasetError(f"{where}: path {path!r} must be a file path relative to SRC")
    return norm


def _label_checker(options: DatasetOptions):
    """``(label, where) -> canonical label``; unknown labels raise a one-line DatasetError."""
    from msk.core.registry import entity_set

    extras = {x.strip().lower(): x for x in options.extra_labels}
    entities = entity_set(options.entity_set) if options.entity_set else None

    def check(label: str, where: str) -> str:
        text = (label or "").strip()
        if not text:
            raise DatasetError(f"{where}: empty label")
        if text.lower() in extras:
            return extras[text.lower()]
        if entities is None:
            return text.lower()
        try:
            return entities.names[entities.index(text)]
        except KeyError:
            close = difflib.get_close_matches(text.lower(), entities.names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DatasetError(
                f"{where}: label {text!r} is not in entity set {entities.name!r}{hint} (known: "
                f"{', '.join(entities.names)}; option entity_set: null takes any label, "
                f"extra_labels adds some)") from None

    return check


def import_dataset(dataset: str, src: str | os.PathLike, out: str | os.PathLike,
                   config: ImportConfig | None = None, *, progress: bool = True) -> ImportReport:
    """Import the labelled layout ``dataset`` under ``src`` into ``out`` (see the module docstring)."""
    from msk.core.io.manifest import OK, read_manifest
    from msk.core.io.pseudonym import Pseudonymiser
    from msk.core.registry import get_registry
    from msk.core.stages.ingest.pipeline import ingest

    started = time.perf_counter()
    config = config or ImportConfig()
    spec = get_registry().get("dataset", dataset)
    options = spec.parse_options(config.options)
    records = read_records(spec, src, options)
    # The key is checked before the ingest starts: the labels need it as much as the shards.
    pseudonymiser = Pseudonymiser.from_env_or_file(config.ingest.key_file, create=config.ingest.create_key)
    _check_same_key(pseudonymiser, Path(out))
    report = ingest(src, out, config.ingest, progress=progress, paths=[r.path for r in records])

    manifest = read_manifest(report.out, columns=["path", "image_id", "status", "reason"]).to_pylist()
    by_path = {row["path"]: row for row in manifest}
    tumour = options.entity_set is not None and _is_tumour(options.entity_set)
    extras: dict[str, None] = {}
    for r in records:
        extras.update(dict.fromkeys(k for k in r.extra if k not in ("image_id", "label", "patient_id")))
    columns = ["image_id", "label", "patient_id", *(["entity"] if tumour and "entity" not in extras else []),
               *extras]
    rows: list[dict[str, Any]] = []
    quarantined: Counter[str] = Counter()
    examples: dict[str, Any] = {}
    for r in records:
        row = by_path[r.path]
        if row["status"] != OK:
            quarantined[row["reason"]] += 1
            examples.setdefault(row["reason"], r.path)
            continue
        values = {"entity": r.label, **r.extra, "image_id": row["image_id"], "label": r.label,
                  "patient_id": pseudonymiser.pseudonym(r.patient, "patient") or ""}
        rows.append({c: _cell(values.get(c)) for c in columns})
    labels = report.out / LABELS_FILE
    _write_csv(labels, columns, rows)
    result = ImportReport(
        dataset=spec.name, n_records=len(records), n_labelled=len(rows),
        quarantined=dict(sorted(quarantined.items())),
        by_label=dict(sorted(Counter(row["label"] for row in rows).items())),
        n_patients=len({row["patient_id"] for row in rows if row["patient_id"]}),
        labels=labels, ingest=report, seconds=time.perf_counter() - started, examples=examples)
    _write_summary(report.out, src, options, result)
    return result


def _check_same_key(pseudonymiser: Any, out: Path) -> None:
    """Image ids are keyed hashes of the paths: adding to an ingest with another key would mix
    two keys' image ids and pair them with patient pseudonyms of the new key."""
    from msk.core.io.manifest import read_manifest

    first = read_manifest(out, columns=["path", "image_id"]).slice(0, 1).to_pylist() if out.is_dir() else []
    if first and pseudonymiser.record_id(first[0]["path"]) != first[0]["image_id"]:
        raise DatasetError(f"{out} was ingested with another pseudonymisation key than this run's "
                           f"(key id {pseudonymiser.key_id}); use that key, or a new OUT folder")


def _is_tumour(name: str) -> bool:
    from msk.core.registry import entity_set

    return entity_set(name).kind == "tumour"


def _cell(value: Any) -> Any:
    """A CSV cell: missing values (None, NaN) are empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _write_summary(out: Path, src: str | os.PathLike, options: DatasetOptions, report: ImportReport) -> None:
    """``OUT/import.json``: what was imported, with which options, and the counts."""
    summary = {
        "msk_version": msk.__version__,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": report.dataset,
        "src": str(Path(src).resolve()),
        "options": options.model_dump(mode="json"),
        "n_records": report.n_records,
        "n_labelled": report.n_labelled,
        "quarantined": report.quarantined,
        "by_label": report.by_label,
        "n_patients": report.n_patients,
        "seconds": round(report.seconds, 3),
    }
    tmp = out / f".{IMPORT_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / IMPORT_FILE)
