"""Built-in labelled dataset layouts for ``msk import``: a CSV of paths and labels, a folder per
class, MURA and BTXRD.

Each layout is a reader ``read(src, options) -> records`` over the layout's label files (the
images are never opened here), a pydantic options model and a tiny example layout for the
plugin contract test. ``msk import`` (:mod:`msk.core.stages.ingest.importing`) does everything the
layouts share: label checks against the entity set, path checks, the ingest, the keyed
pseudonyms and the labels file. See ``docs/datasets.md``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from msk.core.errors import DatasetError
from msk.core.hookspecs import hookimpl
from msk.core.specs import DatasetOptions, DatasetRecord, DatasetSpec

#: Columns the ``csv`` layout copies into the labels file by default, where the CSV has them.
CSV_EXTRAS = ("finding", "source")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")

#: MURA's study-type folders -> names of the ``samx-regions`` entity set.
MURA_REGIONS = {
    "XR_ELBOW": "elbow", "XR_FINGER": "finger", "XR_FOREARM": "forearm", "XR_HAND": "hand",
    "XR_HUMERUS": "humerus", "XR_SHOULDER": "shoulder", "XR_WRIST": "wrist",
}
_MURA = re.compile(r"(?:^|/)(XR_[A-Z]+)/patient(\d+)/study(\d+)_(positive|negative)/[^/]+$")


def _files(src: Path) -> list[str]:
    """Every non-hidden file under ``src``, relative POSIX paths, sorted (as ``msk ingest`` lists)."""
    from msk.core.stages.ingest.pipeline import list_inputs

    return list_inputs(src, ["*"], [".*"])


def _within(src: Path, name: str) -> Path:
    return Path(name) if Path(name).is_absolute() else src / name


# -- csv: a table with a path and a label column ----------------------------------------------


class CsvOptions(DatasetOptions):
    """Options of the ``csv`` layout; the defaults read ``real-xr/labels.csv``."""

    file: str = Field("labels.csv", description="the CSV, relative to SRC (or absolute)")
    path_column: str = Field("path", description="column of image paths, relative to SRC")
    label_column: str = Field("region", description="column of labels")
    patient_column: str | None = Field("group", description="column of patient/group ids; null: none")
    extra_columns: list[str] | None = Field(
        None, description="columns copied into the labels file; default: finding, source and the "
        "lesion box x0, y0, x1, y1 where the CSV has them")


def read_csv(src: Path, options: CsvOptions) -> Iterator[DatasetRecord]:
    table = _within(src, options.file)
    if not table.is_file():
        raise DatasetError(f"{table}: no such file (option file); the CSV is looked up relative to SRC")
    with table.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        box = list(BOX_COLUMNS) if set(BOX_COLUMNS) <= set(columns) else []
        extras = options.extra_columns if options.extra_columns is not None else \
            [c for c in CSV_EXTRAS if c in columns] + box
        wanted = [("path_column", options.path_column), ("label_column", options.label_column),
                  ("patient_column", options.patient_column)] + [("extra_columns", c) for c in extras]
        for option, column in wanted:
            if column is not None and column not in columns:
                raise DatasetError(f"{table}, line 1: no column {column!r} (option {option}); "
                                   f"columns: {', '.join(columns)}")
        for row in reader:
            patient = (row[options.patient_column] or "").strip() if options.patient_column else ""
            yield DatasetRecord((row[options.path_column] or "").strip(),
                                (row[options.label_column] or "").strip(), patient or None,
                                {c: row[c] for c in extras}, f"{table}, line {reader.line_num}")


def _csv_example(folder: Path) -> dict[str, Any]:
    _png(folder / "images" / "a.png")
    _png(folder / "images" / "b.png", 200)
    (folder / "labels.csv").write_text("path,region,group,finding\nimages/a.png,elbow,p1,fracture\n"
                                       "images/b.png,knee,p2,\n")
    return {}


# -- folders: one folder per class --------------------------------------------------------------


class FoldersOptions(DatasetOptions):
    """Options of the ``folders`` layout: ``SRC/<class>/**/<image>``."""

    label_map: dict[str, str] = Field({}, description="class folder name -> label (others: the name)")
    patient_pattern: str | None = Field(
        None, description="regular expression searched in each relative path; its first group "
        "(or the whole match) is the patient; null: no patient ids")

    @field_validator("patient_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value


def read_folders(src: Path, options: FoldersOptions) -> Iterator[DatasetRecord]:
    pattern = re.compile(options.patient_pattern) if options.patient_pattern else None
    for rel in _files(src):
        folder, sep, _ = rel.partition("/")
        if not sep:  # a file at the top (README, a labels file) belongs to no class
            continue
        patient = None
        if pattern is not None:
            match = pattern.search(rel)
            if match is None:
                raise DatasetError(f"{src / rel}: patient_pattern {options.patient_pattern!r} "
                                   "does not match its path")
            patient = match.group(1) if match.groups() else match.group(0)
        yield DatasetRecord(rel, options.label_map.get(folder, folder), patient,
                            where=f"{src / folder}/ (class folder)")


def _folders_example(folder: Path) -> dict[str, Any]:
    _png(folder / "elbow" / "p1_a.png")
    _png(folder / "LOWER_LEG" / "p2_a.png", 200)
    return {"patient_pattern": r"/(p\d+)_"}


# -- MURA: XR_<REGION>/patient<id>/study<n>_<positive|negative>/image<n>.png ---------------------


def read_mura(src: Path, options: DatasetOptions) -> Iterator[DatasetRecord]:
    for rel in _files(src):
        if not any(part.startswith("XR_") for part in rel.split("/")[:-1]):
            continue  # the release's CSV files, READMEs
        match = _MURA.search(rel)
        if match is None:
            raise DatasetError(f"{src / rel}: not in the MURA layout "
                               "XR_<REGION>/patient<id>/study<n>_<positive|negative>/<image>")
        region = MURA_REGIONS.get(match[1])
        if region is None:
            raise DatasetError(f"{src / rel}: unknown MURA region folder {match[1]} "
                               f"(known: {', '.join(MURA_REGIONS)})")
        yield DatasetRecord(rel, region, f"patient{match[2]}", {"finding": match[4]}, str(src / rel))


def _mura_example(folder: Path) -> dict[str, Any]:
    _png(folder / "train" / "XR_ELBOW" / "patient00001" / "study1_positive" / "image1.png")
    _png(folder / "valid" / "XR_WRIST" / "patient00002" / "study1_negative" / "image1.png", 200)
    (folder / "train_image_paths.csv").write_text("train/XR_ELBOW/patient00001/study1_positive/image1.png\n")
    return {}


# -- BTXRD: dataset.csv + annotations/ + images/ -------------------------------------------------


class BtxrdOptions(DatasetOptions):
    """Options of the ``btxrd`` layout (Yao et al., Sci Data 2025)."""

    entity_set: str | None = Field("btxrd", description="entity set the labels must belong to")
    csv: str = Field("dataset.csv", description="BTXRD's metadata table, relative to SRC")
    images: str = Field("images", description="folder of the images, relative to SRC")
    annotations: str | None = Field(
        "annotations", description="folder of the LabelMe JSONs (lesion boxes); null: no boxes")
    grouping: Literal["image", "run"] = Field(
        "image", description="patient of an image: BTXRD has no patient id, so image = each image "
        "its own patient; run = consecutive images of identical metadata (msk.core.io.clinical.read_btxrd)")


def read_btxrd_layout(src: Path, options: BtxrdOptions) -> Iterator[DatasetRecord]:
    import pandas as pd

    from msk.core.data.roi import lesion_box, read_labelme
    from msk.core.io.clinical import read_btxrd

    table = _within(src, options.csv)
    annotations = _within(src, options.annotations) if options.annotations else None
    frame = read_btxrd(table, grouping=options.grouping, annotations=annotations)
    for line, row in enumerate(frame.itertuples(index=False), start=2):
        if pd.isna(row.entity):  # a normal image (tumor = 0): no tumour entity to learn
            continue
        where = f"{table}, line {line}"
        extra: dict[str, Any] = {"age": row.age, "sex": row.sex, "site": row.site,
                                 "sites": "|".join(row.sites), "view": row.view, "center": row.center}
        if annotations is not None:
            json_file = annotations / f"{Path(row.image_id).stem}.json"
            if not json_file.is_file():
                raise DatasetError(f"{where}: no annotation {json_file} for {row.image_id} "
                                   "(option annotations: null imports without lesion boxes)")
            extra.update(zip(BOX_COLUMNS, lesion_box(read_labelme(json_file))))
        yield DatasetRecord(f"{options.images}/{row.image_id}", row.entity, row.patient_group, extra, where)


def _btxrd_example(folder: Path) -> dict[str, Any]:
    import json

    from msk.core.io.btxrd import BTXRD_SITES
    from msk.core.io.clinical import VIEWS
    from msk.plugins.entity_sets import btxrd

    header = ["image_id", "center", "age", "gender", *BTXRD_SITES, "tumor", "benign", "malignant",
              *btxrd.names, "upper limb", "lower limb", "pelvis", *VIEWS]
    rows = []
    for number, (entity, site, age, sex) in enumerate(
            [("osteochondroma", "femur", 14, "M"), ("osteosarcoma", "tibia", 17, "F")], start=1):
        image_id = f"IMG{number:06d}.jpeg"
        values = {"image_id": image_id, "center": 1, "age": age, "gender": sex, site: 1, "tumor": 1,
                  entity: 1, "frontal": 1}
        rows.append(",".join(str(values.get(c, 0)) for c in header))
        _png(folder / "images" / image_id, 60 * number, size=(48, 64))
        (folder / "annotations").mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / f"IMG{number:06d}.json").write_text(json.dumps({
            "imageWidth": 48, "imageHeight": 64, "imagePath": image_id,
            "shapes": [{"label": entity, "shape_type": "rectangle", "points": [[10, 12], [30, 40]]}]}))
    (folder / "dataset.csv").write_text(",".join(header) + "\n" + "\n".join(rows) + "\n")
    return {}


def _png(path: Path, value: int = 100, size: tuple[int, int] = (16, 16)) -> None:
    """A small grey placeholder image (JPEG for ``.jpg``/``.jpeg`` names, PNG otherwise)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, value, size[0] * size[1]).reshape(size[1], size[0]).astype(np.uint8)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(ramp).save(path, format=fmt)


@hookimpl
def msk_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec("csv", read_csv, CsvOptions,
                    "a CSV with a path and a label column (defaults: real-xr/labels.csv)", _csv_example),
        DatasetSpec("folders", read_folders, FoldersOptions,
                    "a folder per class: SRC/<label>/**/<image>", _folders_example),
        DatasetSpec("mura", read_mura, DatasetOptions,
                    "MURA: XR_<REGION>/patient<id>/study<n>_<positive|negative>/<image>", _mura_example),
        DatasetSpec("btxrd", read_btxrd_layout, BtxrdOptions,
                    "BTXRD bone tumours: dataset.csv + annotations/ (LabelMe) + images/", _btxrd_example),
    ]
