"""The recommender evaluation's input: an ingest's lesion images (ROI crops where boxes are given) with an
entity each."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
from msk.core.stages.recommender.config import EvalError

BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass
class EvalData:
    """The labelled images of an evaluation: model inputs and ids, one row per image."""

    images: np.ndarray  # uint8 [N, S, S], the ROI crops (roi) or the ingest images
    entities: np.ndarray  # str [N]
    image_ids: list[str]
    patient_ids: list[str]
    study_ids: list[str]
    classes: list[str]  # label order (confusion matrices, class indices)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def y(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[e] for e in self.entities], np.int64)

    def ids(self, idx: np.ndarray) -> dict[str, list[str]]:
        return {"image_id": [self.image_ids[i] for i in idx],
                "patient_id": [self.patient_ids[i] for i in idx],
                "study_id": [self.study_ids[i] for i in idx]}


def read_labels(path_or_frame: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """Labels of an evaluation: ``image_id``, ``entity`` (or ``label``, as ``msk import`` writes)
    and optional lesion box ``x0, y0, x1, y1`` (source-image pixels) and ``patient_id`` (used
    where the ingest has none); a CSV or Parquet file, or a DataFrame."""
    import pandas as pd

    if isinstance(path_or_frame, pd.DataFrame):
        df, where = path_or_frame.copy(), "labels"
    else:
        where = str(path_or_frame)
        path = Path(path_or_frame)
        if not path.is_file():
            raise EvalError(f"labels file {path} does not exist")
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if "entity" not in df.columns and "label" in df.columns:  # an `msk import` labels file
        df = df.rename(columns={"label": "entity"})
    missing = [c for c in ("image_id", "entity") if c not in df.columns]
    if missing:
        raise EvalError(f"{where}: missing column(s) {', '.join(missing)}; columns are {list(df.columns)}")
    df = df[df["entity"].notna() & (df["entity"].astype(str).str.strip() != "")]
    dupes = df["image_id"][df["image_id"].duplicated()]
    if len(dupes):
        raise EvalError(f"{where}: {len(dupes)} image ids appear twice (first: {dupes.iloc[0]!r})")
    return df.reset_index(drop=True)


def synth_labels(synth_dir: str | os.PathLike, ingest_dir: str | os.PathLike) -> pd.DataFrame:
    """Labels of a synthetic export (``msk synth``) after ingest: lesion images only.

    Joins ``ground_truth.csv`` (paths relative to the synth folder) to the ingest manifest
    (paths relative to the ingest's source folder, read from ``ingest.json``) and returns
    ``image_id, entity, site, x0, y0, x1, y1`` of the images ingest accepted.
    """
    import pandas as pd

    from msk.core.io.manifest import read_ingest_summary, read_manifest

    synth_dir, ingest_dir = Path(synth_dir).resolve(), Path(ingest_dir)
    truth = pd.read_csv(synth_dir / "ground_truth.csv")
    truth = truth[truth["entity"].notna()]
    summary = read_ingest_summary(ingest_dir) or {}
    if not summary.get("src"):
        raise EvalError(f"{ingest_dir}: no readable ingest.json with its source folder; run `msk ingest` first")
    src = Path(summary["src"]).resolve()
    try:
        prefix = src.relative_to(synth_dir).as_posix() + "/"
    except ValueError:
        raise EvalError(f"{ingest_dir} ingested {src}, which is not inside the synthetic export "
                        f"{synth_dir}") from None
    truth = truth[truth["path"].str.startswith(prefix)].assign(
        path=lambda t: t["path"].str.slice(len(prefix)))
    manifest = read_manifest(ingest_dir, columns=["path", "image_id", "status"]).to_pandas()
    joined = truth.merge(manifest[manifest["status"] == "ok"], on="path", how="inner")
    if joined.empty:
        raise EvalError(f"no lesion image of {synth_dir} is in the ingest {ingest_dir}")
    return joined[["image_id", "entity", "site", *BOX_COLUMNS]].reset_index(drop=True)


def load_eval_data(ingest_dir: str | os.PathLike, labels: pd.DataFrame, *, image_size: int,
                   roi: bool, roi_margin: float = 0.15, entity_set: str | None = None) -> EvalData:
    """The labelled images of ``ingest_dir``, as ROI crops (``roi``) or whole ingest images."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from msk.core.io.dataset import images_from_table, read_shards
    from msk.core.io.manifest import ingest_resize
    from msk.core.models.embed import map_source_box, roi_crops

    if roi and not set(BOX_COLUMNS) <= set(labels.columns):
        raise EvalError("roi=True needs lesion boxes: columns x0, y0, x1, y1 in the labels "
                        "(or set roi: false)")
    wanted = pa.array(labels["image_id"].astype(str).tolist(), pa.string())
    table = read_shards(ingest_dir, columns=["image_id", "image", "height", "width", "source_height",
                                             "source_width", "patient_id", "study_id"],
                        filter=pc.field("image_id").isin(wanted))
    if table.num_rows == 0:
        raise EvalError(f"none of the {len(labels)} labelled images is in {ingest_dir}")
    ids = table.column("image_id").to_pylist()
    rows = labels.set_index("image_id").loc[ids]
    patients = table.column("patient_id").to_pylist()
    if "patient_id" in rows.columns:  # PNG/JPEG inputs: the labels file's (`msk import`)
        patients = [p or (q if isinstance(q, str) and q.strip() else None)
                    for p, q in zip(patients, rows["patient_id"].tolist())]
    no_patient = [i for i, p in zip(ids, patients) if not p]
    if no_patient:
        raise EvalError(f"{len(no_patient)} images have no patient id (first {no_patient[0]!r}); "
                        f"a patient-level split needs one")
    images = images_from_table(table)
    if roi:
        resize = ingest_resize(Path(ingest_dir))
        boxes = [map_source_box(b, (h, w), images.shape[1], resize) for b, h, w in zip(
            rows[list(BOX_COLUMNS)].to_numpy(float), table.column("source_height").to_pylist(),
            table.column("source_width").to_pylist())]
        images = roi_crops(images, boxes, image_size, margin=roi_margin, ids=ids)
    entities = rows["entity"].astype(str).to_numpy()
    return EvalData(images, entities, ids, patients,
                    table.column("study_id").to_pylist(), _class_order(entities, entity_set))


def _class_order(entities: np.ndarray, entity_set: str | None) -> list[str]:
    present = sorted(set(entities.tolist()))
    if entity_set is None:
        return present
    from msk.core.registry import entity_set as get_entity_set

    names = get_entity_set(entity_set).names
    unknown = [e for e in present if e not in names]
    if unknown:
        raise EvalError(f"labels {unknown} are not in entity set {entity_set!r} ({', '.join(names)}); "
                        f"fix the labels or set entity_set: null")
    return [n for n in names if n in present]
