"""Labelled images: an ingest's images joined to a labels file, the unit every supervised stage trains on.

:func:`load_labelled` reads the labels (:mod:`msk.core.io.labels`: an ``image_id,label`` CSV or a
DeepCluster run's filled-in cluster labels), checks them against the ingest and returns
:class:`LabelledImages` (images, label, patient and image id per image).
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from msk.core.errors import TrainingDataError
from msk.core.io.labels import apply_labels, cluster_run_k, load_assignments, read_image_labels, read_label_patients
from msk.core.io.paths import store_path

__all__ = ["LabelledImages", "ingest_info", "load_labelled"]


@dataclass
class LabelledImages:
    """Images with a label each: what the sorter and transfer learning train on.

    :param images: ``uint8 [N, S, S]``.
    :param labels: canonical class name per image.
    :param patient_ids: pseudonymised patient id per image (the split unit).
    :param image_ids: ingest image id per image.
    :param source: where the images came from (for messages).
    :param notes: what loading had to assume (e.g. images without a patient id).
    """

    images: np.ndarray
    labels: list[str]
    patient_ids: list[str]
    image_ids: list[str]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.images)
        if not (len(self.labels) == len(self.patient_ids) == len(self.image_ids) == n):
            raise ValueError(f"{n} images, {len(self.labels)} labels, {len(self.patient_ids)} "
                             f"patient ids and {len(self.image_ids)} image ids")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray | Sequence[int]) -> LabelledImages:
        index = np.asarray(index, dtype=np.int64)
        return LabelledImages(self.images[index], [self.labels[i] for i in index],
                              [self.patient_ids[i] for i in index],
                              [self.image_ids[i] for i in index], self.source, list(self.notes))


def _cluster_labels(labels: Path, cluster_run: Path, region_set: str) -> dict[str, str]:
    """Weak labels from a filled-in cluster labels file and its DeepCluster run folder."""
    k = cluster_run_k(cluster_run)
    weak = apply_labels(labels, load_assignments(cluster_run), region_set=region_set, k=k)
    with (cluster_run / "assignments.csv").open(newline="") as f:
        image_ids = [row["image_id"] for row in csv.DictReader(f)]
    if len(image_ids) != len(weak.labels) or not all(image_ids):
        raise TrainingDataError(f"{cluster_run / 'assignments.csv'} does not give an image id for every "
                          "image of the run; rerun `msk cluster` from an ingest output")
    return {i: label for i, label in zip(image_ids, weak.labels) if label is not None}


def load_labelled(ingest: str | os.PathLike, labels: str | os.PathLike, *,
                  entity_set: str | None = "samx-regions", extra_labels: Sequence[str] = (),
                  cluster_run: str | os.PathLike | None = None) -> LabelledImages:
    """The labelled images of an ingest output.

    :param labels: a CSV ``image_id,label`` (:func:`read_image_labels`) or, with
        ``cluster_run``, the filled-in ``labels.csv``/YAML of ``msk clusters export``, applied
        with :func:`msk.core.io.labels.apply_labels` (whose errors are raised unchanged).
    :param entity_set: the set the labels must belong to; ``None`` takes any label.
    :param extra_labels: labels accepted besides the entity set's names (``"normal"``).
    Every labelled image id must be in the ingest output. An image whose shard row has no
    patient id (PNG/JPEG inputs) takes the labels file's ``patient_id`` column where there is
    one (``msk import`` writes it); images still without one count as patients of their own
    (noted in :attr:`LabelledImages.notes`, with a warning).
    """
    import pyarrow.compute as pc

    from msk.core.io.dataset import images_from_table, read_shards
    from msk.core.registry import entity_set as get_entity_set

    labels = Path(labels)
    if cluster_run is not None:
        by_id = _cluster_labels(labels, Path(cluster_run), entity_set or "samx-regions")
    else:
        entities = get_entity_set(entity_set) if entity_set is not None else None
        by_id = read_image_labels(labels, entities, extra=extra_labels)
    known = set(read_shards(ingest, columns=["image_id"]).column("image_id").to_pylist())
    missing = sorted(set(by_id) - known)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TrainingDataError(f"{labels} labels {len(missing)} of {len(by_id)} image(s) that are not in "
                          f"the ingest output {ingest}: {shown}; were the labels made for another "
                          "ingest?")
    table = read_shards(ingest, columns=["image_id", "image", "height", "width", "patient_id"],
                        filter=pc.field("image_id").isin(sorted(by_id)))
    image_ids = table.column("image_id").to_pylist()
    patients = table.column("patient_id").to_pylist()
    if cluster_run is None and not all(patients):  # PNG/JPEG: the labels file may carry them
        from_labels = read_label_patients(labels)
        patients = [p or from_labels.get(i) for p, i in zip(patients, image_ids)]
    notes = []
    anonymous = sum(1 for p in patients if not p)
    if anonymous:
        notes.append(f"{anonymous} image(s) have no patient id; each counts as a patient of its own")
        warnings.warn(f"{ingest}: {notes[-1]}", stacklevel=2)
    patients = [p if p else f"image:{i}" for p, i in zip(patients, image_ids)]
    return LabelledImages(images_from_table(table), [by_id[i] for i in image_ids], patients,
                          image_ids, str(ingest), notes)


class SquareImages(Protocol):
    """What :func:`ingest_info` reads: square images and the ingest folder they came from
    (:class:`LabelledImages`, the segmenter's training data)."""

    images: np.ndarray
    source: str


def ingest_info(data: SquareImages, out: Path) -> dict[str, Any]:
    """How the training images were made (``msk sort`` prepares new images the same way):
    the square side, and the ingest's other squaring options where its folder is known
    (its path relative to the run folder ``out``)."""
    info: dict[str, Any] = {"path": store_path(data.source, out) if data.source else None,
                            "image_size": int(data.images.shape[-1])}
    if data.source:
        from msk.core.io.manifest import read_ingest_summary

        saved = (read_ingest_summary(data.source) or {}).get("config") or {}
        from msk.core.data.squaring import recorded_squaring

        info.update({k: v for k, v in recorded_squaring(saved).items() if k != "image_size"})
    return info
