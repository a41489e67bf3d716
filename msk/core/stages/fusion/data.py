"""Fusion's input: lesion images (ROI crops where the metadata has boxes) joined to their canonical metadata.

:func:`load_fusion_data` reads an ingest (or an image array) and a metadata frame or CSV into
:class:`FusionData`; :func:`read_synth_truth` turns a synthetic export's ground truth into such a
frame. Boxes in the original image's pixels are mapped into the ingest's square image
(:func:`msk.core.data.squaring.map_box_to_square`) and cropped the way every msk model crops
(:mod:`msk.core.data.roi`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from msk.core.data.metadata import MetadataEncoder, join_images
from msk.core.data.squaring import map_box_to_square
from msk.core.errors import ConfigError, MskError
from msk.core.io.clinical import DICOM_VIEWS, MetadataError
from msk.core.io.manifest import ingest_resize
from msk.core.registry import entity_set
from msk.core.stages.fusion.config import BOX_COLUMNS, FusionConfig

__all__ = ["FusionData", "load_fusion_data", "read_synth_truth"]

Resize = Literal["pad", "stretch"]


@dataclass
class FusionData:
    """Images with their canonical metadata rows (:mod:`msk.core.data.metadata`), aligned."""

    images: np.ndarray  # uint8 [N, S, S]: network inputs (ROI crops when boxes are given)
    meta: pd.DataFrame  # canonical frame, one row per image
    labels: np.ndarray  # int64 [N]: class index of meta["entity"]
    classes: list[str]

    @property
    def groups(self) -> np.ndarray:
        return self.meta["patient_group"].astype(str).to_numpy()

    def fingerprint(self) -> str:
        """Hash of the image ids, labels and pixels: a re-run must see the same data."""
        h = hashlib.sha256()
        h.update("\n".join(self.meta["image_id"].astype(str)).encode())
        h.update(self.labels.tobytes())
        h.update(np.ascontiguousarray(self.images).tobytes())
        return h.hexdigest()[:16]


#: Lesion boxes in source pixels -> ingest image pixels (see :func:`msk.core.data.squaring.map_box_to_square`).



def _read_metadata(metadata: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    if isinstance(metadata, pd.DataFrame):
        return metadata.reset_index(drop=True)
    path = Path(metadata)
    if not path.is_file():
        raise MetadataError(f"{path}: no such metadata file")
    df = pd.read_csv(path, dtype={"image_id": str, "patient_group": str, "patient_id": str})
    if "patient_group" not in df.columns and "patient_id" in df.columns:  # `msk import` labels
        df["patient_group"] = df["patient_id"]
    if "sites" in df.columns:  # a CSV holds several sites as "tibia|fibula"
        df["sites"] = [tuple(s for s in str(v).split("|") if s) if isinstance(v, str) else ()
                       for v in df["sites"]]
    return df


def _ingest_images(ingest_dir: Path, meta: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """The shard rows of the images in ``meta`` and ``meta`` joined to them (same order)."""
    import pyarrow.compute as pc

    from msk.core.io.dataset import images_from_table, read_shards

    ids = read_shards(ingest_dir, columns=["image_id"]).column("image_id").to_pylist()
    with warnings.catch_warnings():  # images without a metadata row: normal (non-lesion) images
        warnings.filterwarnings("ignore", message=".*images have no metadata row")
        joined = join_images(meta, ids)  # a metadata row that matches no image is refused
    table = read_shards(ingest_dir, columns=["image_id", "image", "height", "width",
                                             "source_height", "source_width"],
                        filter=pc.field("image_id").isin(list(joined["image_id"])))
    position = {v: i for i, v in enumerate(table.column("image_id").to_pylist())}
    order = [position[i] for i in joined["image_id"]]
    table = table.take(order)
    shapes = table.select(["source_height", "source_width", "height", "width"]).to_pandas()
    return joined, images_from_table(table), shapes


def _roi_crops(images: np.ndarray, meta: pd.DataFrame, shapes: pd.DataFrame | None,
               config: FusionConfig, resize: Resize, source: str) -> np.ndarray:
    from msk.core.data.roi import lesion_crop

    absent = [c for c in BOX_COLUMNS if c not in meta.columns]
    if absent:
        raise ConfigError(f"{source}: roi is on but the metadata has no box columns {absent}; "
                          "add the lesion boxes or set roi: false")
    boxes = meta[list(BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    missing = meta.loc[boxes.isna().any(axis=1), "image_id"].tolist()
    if missing:
        raise MetadataError(f"{source}: {len(missing)} rows have no lesion box: "
                            f"{', '.join(map(str, missing[:5]))}; set roi: false to use whole images")
    crops = np.empty((len(images), config.roi_size, config.roi_size), np.uint8)
    for i, (image, box) in enumerate(zip(images, boxes.to_numpy(dtype=float))):
        if shapes is not None:
            row = shapes.iloc[i]
            box = map_box_to_square(box, (row["source_height"], row["source_width"]),
                                int(row["height"]), resize)
        try:
            crops[i] = lesion_crop(image, box, config.roi_size, margin=config.roi_margin)
        except MskError as exc:
            raise MetadataError(f"{source}: image {meta['image_id'].iloc[i]}: {exc}") from None
    return crops


def load_fusion_data(source: str | os.PathLike | np.ndarray,
                     metadata: pd.DataFrame | str | os.PathLike,
                     config: FusionConfig | None = None) -> FusionData:
    """Images and canonical metadata (a frame or a CSV file), joined, cropped and checked.

    :param source: an ingest output folder (images joined by ``image_id``; a metadata row that
        matches no image is a :class:`MetadataError`; images without a row are skipped), or a
        ``uint8 [N, S, S]`` array with one image per metadata row, in order.
    :param metadata: canonical columns (``image_id``, ``patient_group`` (in a CSV, ``patient_id``
        stands in for it, as ``msk import`` writes), ``age``, ``sex``,
        ``site``/``sites``, ``view``, ``entity``; ``position`` with ``metadata.positions``;
        ``x0, y0, x1, y1`` with ``roi``). In a CSV, several sites are written ``tibia|fibula``.

    Every row needs an entity; the metadata is encoded once here so that unusable values
    (ages outside the schema's ``age_bins``, a sex other than M/F, a site outside the vocabulary) are
    reported before any training.
    """
    config = config or FusionConfig()
    meta = _read_metadata(metadata)
    shapes = None
    resize: Resize = "pad"
    if isinstance(source, np.ndarray):
        where = "image array"
        if source.dtype != np.uint8 or source.ndim != 3:
            raise ValueError(f"images must be uint8 [N, S, S]; got {source.dtype} {source.shape}")
        if len(source) != len(meta):
            raise MetadataError(f"{len(source)} images but {len(meta)} metadata rows; the array "
                                "needs one image per row, in order")
        images = source
    else:
        ingest_dir = Path(source)
        where = str(ingest_dir)
        meta, images, shapes = _ingest_images(ingest_dir, meta)
        resize = ingest_resize(ingest_dir)
    if not len(meta):
        raise MetadataError(f"{where}: no image has a metadata row")
    for column in ("image_id", "patient_group", "entity"):
        if column not in meta.columns:
            raise MetadataError(f"metadata has no {column!r} column; columns: {list(meta.columns)}")
    unlabelled = meta.loc[meta["entity"].isna(), "image_id"].tolist()
    if unlabelled:
        raise MetadataError(f"{len(unlabelled)} metadata rows have no entity (fusion models "
                            f"learn from labelled lesions): {', '.join(map(str, unlabelled[:5]))}")
    if config.entity_set:
        entities = entity_set(config.entity_set)
        classes = list(entities.names)
        indices: list[int] = []
        unknown: list[str] = []
        for image_id, entity in zip(meta["image_id"], meta["entity"]):
            try:
                indices.append(entities.index(str(entity)))
            except KeyError:
                unknown.append(f"{image_id}={entity!r}")
        if unknown:
            raise MetadataError(f"{len(unknown)} rows name an entity outside entity set "
                                f"{config.entity_set!r} ({', '.join(classes)}): "
                                f"{', '.join(unknown[:5])}")
        labels = np.array(indices, np.int64)
    else:
        classes = sorted(meta["entity"].astype(str).unique())
        labels = meta["entity"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    MetadataEncoder(config.metadata).fit_transform(meta)  # raises MetadataError naming bad rows
    if config.roi:
        images = _roi_crops(images, meta, shapes, config, resize, where)
    return FusionData(images, meta, labels, classes)


def read_synth_truth(synth_dir: str | os.PathLike, ingest_dir: str | os.PathLike, *,
                     lesions_only: bool = True) -> pd.DataFrame:
    """The canonical metadata of an ``msk synth`` export, keyed by the ingest's ``image_id``.

    ``ground_truth.csv`` paths (relative to ``synth_dir``) are joined to the ingest manifest's
    paths (relative to the ingest source, ``synth_dir`` or ``synth_dir/export``). ``site`` is
    the lesion's region, ``view`` the DICOM view mapped by
    :data:`msk.core.io.clinical.DICOM_VIEWS`, ``patient_group`` the patient id; ``position`` and
    the lesion box (``x0, y0, x1, y1``, pixels of the written image) are kept. Files the
    ingest quarantined are left out.
    """
    from msk.core.io.manifest import read_manifest

    synth_dir = Path(synth_dir)
    truth_csv = synth_dir / "ground_truth.csv"
    if not truth_csv.is_file():
        raise MetadataError(f"{truth_csv}: no such file (not an `msk synth` output folder?)")
    truth = pd.read_csv(truth_csv, dtype={"patient_id": str, "path": str})
    manifest = read_manifest(ingest_dir, columns=["path", "image_id", "status"]).to_pandas()
    manifest = manifest[manifest["status"] == "ok"]
    by_path = dict(zip(manifest["path"], manifest["image_id"]))
    best = None
    for prefix in ("", "export/"):
        ids = truth["path"].map(lambda p, pre=prefix: by_path.get(p.removeprefix(pre)))
        if best is None or ids.notna().sum() > best.notna().sum():
            best = ids
    if best is None or best.notna().sum() == 0:
        raise MetadataError(f"no path of {truth_csv} is in the manifest of {ingest_dir}; was "
                            f"{synth_dir} (or its export/ folder) the ingest source?")
    truth = truth.assign(image_id=best)[best.notna()]
    if lesions_only:
        truth = truth[truth["entity"].notna()]
    return pd.DataFrame({
        "image_id": truth["image_id"].astype(str),
        "patient_group": truth["patient_id"].astype(str),
        "age": pd.to_numeric(truth["age"], errors="coerce").astype(float),
        "sex": truth["sex"],
        "site": truth["site"].fillna(truth["region"]),  # a lesion's site is its image's region
        "entity": truth["entity"],
        "view": [None if pd.isna(v) else DICOM_VIEWS.get(str(v).strip().upper()) for v in truth["view"]],
        "center": None,
        "position": truth["position"],
        **{c: pd.to_numeric(truth[c], errors="coerce") for c in BOX_COLUMNS},
    }).reset_index(drop=True)
