"""``msk build recommender``: an ingest, its confirmed entities and (optionally) lesion boxes or
masks -> a saved :class:`msk.core.models.recommender.Recommender`, ready for ``msk serve``.

The entities come from a truth file (:func:`msk.core.io.truth.read_truth`): a labels CSV
``image_id,label[,patient_id]`` (what ``msk import`` writes; an ``entity`` column is taken
before ``label``) or a synthetic export's ``ground_truth.csv`` (lesion images only). Lesion
boxes, in source-image pixels, come from, in this order:

1. ``boxes``: a CSV ``image_id,x0,y0,x1,y1`` (:func:`msk.core.models.embed.read_rois`);
2. ``masks``: a masks table ``image_id,mask_path`` (:func:`msk.core.io.masks.read_mask_table`);
   each box is the extent of its mask (:func:`msk.core.data.roi.mask_box`), the mask checked
   against its image's size;
3. the truth file's own ``x0,y0,x1,y1`` columns (a synthetic ground truth has them).

With boxes, every indexed image is embedded from its lesion's region of interest (box +
``roi_margin``, as ``msk embed`` and ``msk eval recommender`` crop it) and labelled images
without a box are left out (counted): an index must not mix crops and whole images. The
recommender then records ``roi_margin`` with its encoder, which tells serving to compare lesion
crops (:mod:`msk.serve.recommender`). Without boxes (or with ``whole_images``) whole images are
indexed.

Images are embedded in this process, streamed shard batch by shard batch through
:class:`msk.core.models.embed.Embedder` (the class ``msk embed`` runs on Ray Data; same crops, same
vectors). ``OUT`` holds the recommender's files and ``build.json`` (inputs, counts, what was
left out and why).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from msk.core.config import MskConfig
from msk.core.errors import MskError
from msk.core.io.paths import store_path

__all__ = ["BuildReport", "RecommenderBuildConfig", "RecommenderBuildError", "build_recommender",
           "boxes_from_masks"]

BUILD_FILE = "build.json"


class RecommenderBuildError(MskError, ValueError):
    """Inputs a recommender cannot be built from; the message names the file and the fix."""


class RecommenderBuildConfig(MskConfig):
    """Options of ``msk build recommender`` (YAML keys of ``--config``)."""

    k: int = Field(3, ge=1, description="neighbours that vote (odd for weighting 'none')")
    weighting: Literal["none", "distance", "inverse_frequency"] = Field(
        "none", description="vote weighting (msk.core.models.vote)")
    retriever: str = Field("lsh", description="retriever registry name (`msk plugins retriever`)")
    retriever_options: dict[str, Any] = Field(default_factory=dict, description="options of the retriever")
    roi_margin: float = Field(
        0.15, ge=0, description="with lesion boxes: margin on each side, a fraction of the lesion's longer side")
    whole_images: bool = Field(False, description="index whole images even when the labels file has lesion boxes")
    entity_set: str | None = Field(
        None, description="check the entity names against this set (e.g. bone-tumours); None: any name")
    image_size: int | None = Field(None, ge=8, description="encoder input side; default: the checkpoint's")
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    use_gpu: bool = Field(False, description="embed on the GPU")

    @model_validator(mode="after")
    def _odd_k(self) -> RecommenderBuildConfig:
        if self.weighting == "none" and self.k % 2 == 0:
            raise ValueError(f"an unweighted vote needs an odd k (no two-way ties); got k={self.k}")
        return self


@dataclass
class BuildReport:
    """What :func:`build_recommender` indexed and where it saved it."""

    out: Path
    n_images: int
    n_patients: int
    by_entity: dict[str, int]
    input: Literal["lesion_crop", "whole_image"]
    boxes_from: str | None
    left_out: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """What to tell the user, one line each."""
        what = ("whole images" if self.input == "whole_image" else
                f"lesion crops (boxes from {self.boxes_from})")
        out = [f"indexed {self.n_images} images of {self.n_patients} patients as {what} "
               f"in {self.seconds:.1f} s",
               "per entity: " + ", ".join(f"{k} {v}" for k, v in self.by_entity.items())]
        if self.left_out:
            out.append("left out: " + ", ".join(f"{v} {k}" for k, v in self.left_out.items()))
        return out


def boxes_from_masks(masks: str | os.PathLike, shapes: dict[str, tuple[int, int]]
                     ) -> tuple[dict[str, tuple[float, float, float, float]], int]:
    """Lesion boxes (the extent of each mask, source pixels) of a masks table
    ``image_id,mask_path``, for the images of ``shapes`` (``image_id -> (height, width)`` of the
    source image); returns the boxes and the number of rows naming images not in ``shapes``."""
    from msk.core.data.roi import mask_box
    from msk.core.io.masks import MaskError, load_mask, read_mask_table

    boxes: dict[str, tuple[float, float, float, float]] = {}
    elsewhere = 0
    for row in read_mask_table(masks):
        if row.image_id not in shapes:
            elsewhere += 1
            continue
        try:
            mask = load_mask(row.mask_path, shapes[row.image_id])
        except MaskError as exc:
            raise RecommenderBuildError(f"{exc} ({row.where})") from None
        x0, y0, x1, y1 = mask_box(mask)
        boxes[row.image_id] = (float(x0), float(y0), float(x1), float(y1))
    return boxes, elsewhere


def build_recommender(ingest: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike,
                      encoder: str | os.PathLike, config: RecommenderBuildConfig | None = None, *,
                      boxes: str | os.PathLike | None = None, masks: str | os.PathLike | None = None
                      ) -> BuildReport:
    """Embed the labelled images of ``ingest`` with the encoder checkpoint ``encoder``, index
    them with their entities and save the recommender to ``out`` (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from msk.core.io.dataset import read_shards
    from msk.core.io.manifest import committed_shards, ingest_resize
    from msk.core.io.truth import canonical_labels, check_overlap, read_truth
    from msk.core.models.embed import (
        Embedder,
        EmbedError,
        embedding_matrix,
        embeddings_table,
        read_rois,
    )
    from msk.core.models.recommender import Recommender

    started = time.perf_counter()
    config = config or RecommenderBuildConfig()
    ingest, labels, out, encoder = Path(ingest), Path(labels), Path(out), Path(encoder).absolute()
    if boxes is not None and masks is not None:
        raise RecommenderBuildError("give lesion boxes (--boxes) or masks (--masks), not both")
    if not encoder.is_file():
        raise RecommenderBuildError(
            f"encoder checkpoint {encoder} does not exist; pass a DeepCluster checkpoint "
            "(RUN/checkpoints/epoch-NNN.pt) or a trained model's best.pt")
    truth = read_truth(labels, what="entity", ingest=ingest)
    if config.entity_set:
        truth = canonical_labels(truth, config.entity_set)
    shards = read_shards(ingest, columns=["image_id", "source_height", "source_width"])
    shapes = {i: (h, w) for i, h, w in zip(shards.column("image_id").to_pylist(),
                                           shards.column("source_height").to_pylist(),
                                           shards.column("source_width").to_pylist())}
    check_overlap(truth, shapes, ingest)
    left_out: Counter[str] = Counter()
    left_out["labelled images not in the ingest"] = len(set(truth.labels) - set(shapes))
    truth = truth.restrict(shapes)

    rois, boxes_from = None, None
    if boxes is not None:
        try:
            rois = read_rois(boxes)
        except EmbedError as exc:
            raise RecommenderBuildError(str(exc)) from None
        boxes_from = str(boxes)
    elif masks is not None:
        rois, elsewhere = boxes_from_masks(masks, {i: shapes[i] for i in truth.labels})
        left_out["masks of images not labelled or not in the ingest"] = elsewhere
        boxes_from = f"the extent of the masks in {masks}"
    elif truth.boxes and not config.whole_images:
        rois, boxes_from = dict(truth.boxes), str(labels)
    if rois is not None:
        keep = set(truth.labels) & set(rois)
        if not keep:
            raise RecommenderBuildError(f"no labelled image of {labels} has a lesion box in {boxes_from}; "
                                        "are the boxes for this ingest?")
        left_out["labelled images without a lesion box"] = len(truth.labels) - len(keep)
        truth, rois = truth.restrict(keep), {i: rois[i] for i in keep}

    embedder = Embedder(encoder, image_size=config.image_size, batch_size=config.batch_size,
                        use_gpu=config.use_gpu, rois=rois, roi_margin=config.roi_margin,
                        resize=ingest_resize(ingest))
    wanted = pa.array(sorted(truth.labels), pa.string())
    columns = ["image_id", "image", "height", "width", "source_height", "source_width",
               "patient_id", "study_id"]
    parts = []
    for batch in pads.dataset([str(f) for f in committed_shards(ingest)], format="parquet").to_batches(
            columns=columns, filter=pads.field("image_id").isin(wanted), batch_size=max(config.batch_size, 256)):
        if batch.num_rows:
            parts.append(embedder(pa.Table.from_batches([batch])))
    table = pa.concat_tables(parts)
    patients = [p or truth.patients.get(i) for p, i in zip(table.column("patient_id").to_pylist(),
                                                            table.column("image_id").to_pylist())]
    ids = {"image_id": table.column("image_id").to_pylist(), "patient_id": patients,
           "study_id": table.column("study_id").to_pylist()}
    table = embeddings_table(ids, embedding_matrix(table), embedder.info)
    try:
        recommender = Recommender.build(table, truth.labels, retriever=config.retriever, k=config.k,
                                        weighting=config.weighting,
                                        retriever_options=config.retriever_options)
    except TypeError as exc:  # retriever options it does not take
        raise RecommenderBuildError(f"retriever {config.retriever!r}: {exc}") from None
    recommender.save(out)
    report = BuildReport(out, len(recommender), len({p for p in patients if p}), recommender.entities,
                         "whole_image" if rois is None else "lesion_crop", boxes_from,
                         {k: v for k, v in left_out.items() if v}, time.perf_counter() - started)
    summary = {"labels": store_path(labels, out), "ingest": store_path(ingest, out),
               "encoder": store_path(encoder, out), "boxes": store_path(boxes, out),
               "masks": store_path(masks, out), "input": report.input,
               "roi_margin": config.roi_margin if rois is not None else None,
               "n_images": report.n_images, "n_patients": report.n_patients,
               "by_entity": report.by_entity, "left_out": report.left_out,
               "seconds": round(report.seconds, 3), "config": config.model_dump(mode="json")}
    (out / BUILD_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return report
