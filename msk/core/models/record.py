"""What a saved model is: the typed record every msk checkpoint carries.

A checkpoint (:mod:`msk.core.io.checkpoint`) holds weights; its ``extra["record"]`` is a
:class:`ModelRecord` that says, without any other file, what those weights are for:

* ``task`` (``classifier``, ``sorter``, ``fusion``, ``segmenter``, ``transfer``, ``deepcluster``, ...),
  the ``classes`` in output order and the ``entity_set`` they belong to;
* ``input``: the network input side and the preprocessing it was trained with (timm's
  ``pretrained_cfg`` idea), and ``squaring``: how the ingest made the square images it was
  trained on, so a new file is prepared the same way;
* ``encoder`` (registry name, options, input channels, Sobel layer) and ``head`` (the head's
  options, e.g. a fusion head's ``hidden`` and ``dropout``), enough to rebuild the network;
* ``metadata_encoder``: the fitted clinical-metadata encoder of a fusion model;
* ``data``: what it was trained on, by content hash (``fingerprint`` of the training images and
  labels), count and source;
* ``metrics``: the validation metrics of the saved epoch.

Checkpoints written before the record existed are converted when read (:func:`read_record`):
the record is rebuilt from the fields they do carry (``format`` 0 marks it) and what they never
recorded stays empty. ``msk checkpoint show FILE`` prints the record.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field

from msk.core.config import MskConfig
from msk.core.data.preprocess import InputConfig
from msk.core.data.squaring import SquaringConfig
from msk.core.io.checkpoint import EncoderCheckpoint, load_checkpoint

__all__ = ["RECORD_FORMAT", "DataRecord", "EncoderRecord", "ModelRecord", "data_fingerprint", "epoch_metrics",
           "read_record"]

#: Version of the record's layout; 0 is a record converted from a checkpoint without one.
RECORD_FORMAT = 1


class EncoderRecord(MskConfig):
    """The encoder of a saved model: enough to rebuild it from the registry."""

    name: str = Field(description="registry name (`msk plugins encoder`), or <segmenter>:<encoder>")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options it was built with")
    in_chans: int = Field(1, ge=1, description="input channels (2 after a Sobel layer)")
    sobel: bool = False


class DataRecord(MskConfig):
    """What a model was trained on."""

    fingerprint: str | None = Field(None, description="SHA-256 of the training images and labels (data_fingerprint)")
    n_images: int | None = Field(None, ge=0, description="training images")
    source: str | None = Field(None, description="the ingest (or other source) they came from, as given")


class ModelRecord(MskConfig):
    """The typed record of a saved model (see the module docstring)."""

    format: int = Field(RECORD_FORMAT, description="record layout version; 0 = converted from an older checkpoint")
    task: str = Field(description="what the model does: classifier, sorter, fusion, segmenter, transfer, deepcluster")
    classes: list[str] = Field(default_factory=list, description="output names in output order")
    entity_set: str | None = Field(None, description="the entity set the classes belong to")
    input: InputConfig | None = Field(None, description="network input side and preprocessing as trained")
    squaring: SquaringConfig | None = Field(None, description="how the ingest squared the training images")
    encoder: EncoderRecord
    head: dict[str, Any] = Field(default_factory=dict, description="head options (fusion head, segmenter architecture)")
    metadata_encoder: dict[str, Any] | None = Field(None, description="a fusion model's fitted MetadataEncoder")
    data: DataRecord = Field(default_factory=DataRecord)
    metrics: dict[str, float] = Field(default_factory=dict, description="validation metrics of the saved epoch")
    msk_version: str = ""

    def summary(self) -> list[tuple[str, str]]:
        """``(field, value)`` lines for people (``msk checkpoint show``)."""
        size = f"{self.input.image_size} px" if self.input else "not recorded"
        squaring = (f"{self.squaring.image_size} px, {self.squaring.resize}" if self.squaring else "not recorded")
        data = (f"{self.data.n_images} images, sha256 {self.data.fingerprint[:16]}..." if self.data.fingerprint
                else "not recorded")
        return [("task", self.task), ("classes", ", ".join(self.classes) or "-"),
                ("entity set", self.entity_set or "-"), ("input", size), ("ingest squaring", squaring),
                ("encoder", f"{self.encoder.name} ({self.encoder.in_chans} channel(s))"),
                ("head", ", ".join(f"{k}={v}" for k, v in self.head.items()) or "linear"),
                ("metadata encoder", "yes" if self.metadata_encoder else "no"),
                ("trained on", data + (f" from {self.data.source}" if self.data.source else "")),
                ("metrics", ", ".join(f"{k}={v:g}" for k, v in self.metrics.items()) or "-"),
                ("format", f"{self.format}" + (" (converted from an older checkpoint)" if self.format == 0 else "")),
                ("msk", self.msk_version or "-")]


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of one ``history.csv`` row (the epoch number and empty values left out)."""
    return {k: float(v) for k, v in row.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def data_fingerprint(images: np.ndarray, labels: np.ndarray | Sequence[Any] | None = None) -> str:
    """SHA-256 of training images (their shape and bytes) and labels: the same data gives the same
    fingerprint, any changed pixel or label another."""
    digest = hashlib.sha256()
    images = np.ascontiguousarray(images)
    digest.update(repr((images.dtype.str, images.shape)).encode())
    digest.update(images.tobytes())
    if labels is not None:
        digest.update(np.ascontiguousarray(np.asarray(labels)).tobytes())
    return digest.hexdigest()


def _legacy(ckpt: EncoderCheckpoint) -> dict[str, Any]:
    """The record of a checkpoint written before records existed, from the fields it carries."""
    extra, config = ckpt.extra, ckpt.config
    architecture = extra.get("architecture") or {}
    if "segmenter" in architecture:
        task = "segmenter"
    elif "head" in architecture:
        task = "fusion"
    elif "head" in extra:
        task = "classifier"
    else:
        task = "deepcluster" if "assignments" in extra else "encoder"
    return {"format": 0, "task": task, "classes": list(extra.get("classes") or []),
            "input": InputConfig.from_config(config),
            "encoder": {"name": ckpt.arch, "options": dict(extra.get("encoder_options") or {}),
                        "in_chans": ckpt.in_chans, "sobel": bool(config.get("sobel", False))},
            "head": dict(architecture), "msk_version": ckpt.msk_version}


def read_record(source: str | os.PathLike | EncoderCheckpoint) -> ModelRecord:
    """The record of a checkpoint file (or a loaded checkpoint); an older checkpoint's is converted."""
    ckpt = source if isinstance(source, EncoderCheckpoint) else load_checkpoint(source)
    raw = ckpt.extra.get("record")
    return ModelRecord.model_validate(raw if isinstance(raw, Mapping) else _legacy(ckpt))
