"""``/v1/classify``: radiograph + clinical metadata -> entity probabilities, as a Ray Serve deployment.

Two kinds of checkpoint are served, both written by :func:`msk.core.models.train.fit`:

* a **fusion model** (:class:`msk.core.models.fusion.FusionClassifier`, from ``msk eval fusion`` /
  :func:`msk.core.stages.fusion.training.fit_fusion`): its checkpoint records the head, ``hidden`` and
  ``dropout`` (older checkpoints: set them as trained); set ``metadata_encoder``, the fitted
  :class:`~msk.core.data.metadata.MetadataEncoder` saved with ``MetadataEncoder.save``. The request's
  metadata is encoded exactly as the training rows were;
* an **image-only** classifier (linear head, :func:`msk.core.models.train.fit_classifier`): the
  metadata is still validated, and the answer says ``metadata_used: false``.

With ``roi`` set the model sees the lesion crop, as fusion models are trained: the gateway maps
the metadata's ``box`` (pixels of the uploaded image) into the square image, or asks the
segmenter for the lesion when there is no box (:mod:`msk.serve.segmenter`); the crop is the box
widened by the margin, square (:func:`msk.core.data.roi.lesion_crop`). Without a box and without a
segmenter such a model refuses the request (422 ``box_required``): a whole radiograph is never
classified by a model that learnt from lesion crops.
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from msk.core.data.squaring import SquaringConfig
from msk.core.errors import ConfigError
from msk.core.specs import FUSION_DROPOUT, FUSION_HIDDEN
from msk.serve.config import ClassifyConfig, RoiConfig
from msk.serve.replica import ModelReplica, Rejection, gradcam_png, softmax

__all__ = ["ClassifierDeployment", "ClassifierModel", "load_classifier_model"]


def _word(value: str) -> str:
    """A vocabulary word as :mod:`msk.core.data.metadata` compares them."""
    return str(value).strip().lower().replace("_", " ")


def _classes(config: ClassifyConfig, checkpoint: Path, num_classes: int, saved: list[str] | None) -> list[str]:
    from msk.core.registry import entity_set

    classes = config.classes or saved
    if classes is None and config.entity_set:
        classes = entity_set(config.entity_set).names
    if classes is None:
        raise ConfigError(f"classifier: {checkpoint} has {num_classes} outputs and no class names; set "
                          "classifier.classes (in output order) or classifier.entity_set")
    if len(classes) != num_classes:
        raise ConfigError(f"classifier: {checkpoint} has {num_classes} outputs but {len(classes)} class names")
    return [str(c) for c in classes]


class ClassifierModel:
    """The classifier, its metadata encoder and class names, with the per-request preparation."""

    def __init__(self, model, encoder, classes: list[str], image_size: int,
                 config: ClassifyConfig, preprocess: SquaringConfig):
        self.model, self.encoder, self.classes = model, encoder, classes
        self.image_size, self.config, self.preprocess = image_size, config, preprocess

    @property
    def uses_metadata(self) -> bool:
        return self.encoder is not None

    def prepare(self, pixels: np.ndarray, box: tuple[float, float, float, float] | None,
                metadata: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None] | Rejection:
        """``(network image uint8, encoded metadata or None)``, or why the request is refused.

        :param box: the lesion ``(x0, y0, x1, y1)`` in the square image's pixels (needed with ``roi``).
        """
        image = pixels
        if self.config.roi is not None:
            crop = self._crop(pixels, box, self.config.roi)
            if isinstance(crop, Rejection):
                return crop
            image = crop
        if self.encoder is None:
            return image, None
        meta = self._encode(metadata)
        return meta if isinstance(meta, Rejection) else (image, meta)

    def _crop(self, pixels: np.ndarray, box, roi: RoiConfig) -> np.ndarray | Rejection:
        from msk.core.data.roi import RoiError, lesion_crop

        if box is None:
            return Rejection(422, "box_required", "this classifier was trained on lesion crops: send metadata "
                                                  "'box' [x0, y0, x1, y1] in pixels of the uploaded image, or "
                                                  "serve it with a segmenter")
        try:
            return lesion_crop(pixels, box, roi.size, margin=roi.margin)
        except RoiError as exc:
            return Rejection(422, "invalid_metadata", f"metadata box: {exc}")

    def _encode(self, metadata: dict[str, Any]) -> np.ndarray | Rejection:
        import pandas as pd

        from msk.core.io.clinical import MetadataError

        schema = self.encoder.schema
        for field, vocabulary in (("site", schema.sites), ("view", schema.views)):
            value = metadata.get(field)
            if value is not None and _word(value) not in vocabulary:
                return Rejection(422, "invalid_metadata", f"metadata.{field} {value!r} is not in the model's "
                                                          f"vocabulary: {', '.join(vocabulary)}")
        row = {"image_id": "request", "sex": metadata["sex"],
               "age": math.nan if metadata.get("age") is None else float(metadata["age"]),
               "site": metadata.get("site"), "view": metadata.get("view"), "position": metadata.get("position")}
        try:
            return self.encoder.transform(pd.DataFrame([row]))[0]
        except MetadataError as exc:
            return Rejection(422, "invalid_metadata", f"metadata: {exc}")

    def probabilities(self, images: np.ndarray, meta: np.ndarray | None) -> np.ndarray:
        from msk.core.models.train import predict_logits

        return softmax(predict_logits(self.model, images, image_size=self.image_size, meta=meta))

    def gradcam(self, image: np.ndarray, meta: np.ndarray | None, target: int) -> str:
        import torch
        from torch import nn

        from msk.core.models.gradcam import grad_cam

        class WithMetadata(nn.Module):
            """``images -> logits`` with this request's metadata bound (Grad-CAM feeds images only)."""

            def __init__(self, model: nn.Module, meta: np.ndarray | None):
                super().__init__()
                self.model, self.encoder = model, model.encoder
                self.input_config = getattr(model, "input_config", None)  # Grad-CAM preprocesses as trained
                device = next(model.parameters()).device
                self.meta = None if meta is None else torch.as_tensor(meta[None], device=device)

            def forward(self, images: torch.Tensor) -> torch.Tensor:
                meta = None if self.meta is None else self.meta.expand(len(images), -1)
                return self.model(images, meta)

        cam = grad_cam(WithMetadata(self.model, meta), image[None], [target], image_size=self.image_size)[0]
        return gradcam_png(image, cam)


_FUSION_DEFAULTS = {"hidden": list(FUSION_HIDDEN), "dropout": FUSION_DROPOUT}


def _fusion_options(config: ClassifyConfig, saved: dict[str, Any], path: Path):
    """``(head, hidden, dropout)``: the config's where set, else the checkpoint's record, else
    the defaults; a config value that contradicts the record is an error."""
    chosen = {}
    for key in ("head", "hidden", "dropout"):
        given, recorded = getattr(config, key), saved.get(key)
        if given is not None and recorded is not None and given != recorded:
            raise ConfigError(f"classifier.{key}={given!r} but {path} was trained with {key}={recorded!r}; "
                              f"leave {key} out to use the checkpoint's")
        chosen[key] = given if given is not None else recorded if recorded is not None \
            else _FUSION_DEFAULTS.get(key)
    return chosen["head"], chosen["hidden"], chosen["dropout"]


def load_classifier_model(config: ClassifyConfig, preprocess: SquaringConfig) -> ClassifierModel:
    """Build the classifier the config describes; :class:`ConfigError` says what does not fit."""
    from msk.core.data.metadata import MetadataEncoder
    from msk.core.io.checkpoint import CheckpointError, load_checkpoint
    from msk.core.io.clinical import MetadataError
    from msk.core.models.record import read_record
    from msk.core.models.train import TrainConfig, load_model

    path = Path(config.checkpoint)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise ConfigError(f"classifier.checkpoint: {exc}") from None
    if "head" not in ckpt.extra or "image_size" not in ckpt.config:
        raise ConfigError(f"classifier.checkpoint: {path} is not a trained classifier (no head or image_size)")
    linear = set(ckpt.extra["head"]) == {"weight", "bias"}
    num_classes = int(ckpt.extra["num_classes"])
    encoder = None
    recorded = read_record(ckpt).metadata_encoder  # a fusion model carries its own since records exist
    if config.metadata_encoder is not None:
        try:
            encoder = MetadataEncoder.load(config.metadata_encoder)
        except (OSError, ValueError, KeyError, MetadataError) as exc:
            raise ConfigError(f"classifier.metadata_encoder: {config.metadata_encoder} is not a saved "
                              f"MetadataEncoder ({exc})") from None
    elif recorded is not None:
        try:
            encoder = MetadataEncoder.from_dict(recorded)
        except (ValueError, KeyError, MetadataError) as exc:
            raise ConfigError(f"classifier.checkpoint: {path} records an unusable metadata encoder ({exc}); "
                              "set classifier.metadata_encoder to its metadata_encoder.json") from None
    head, hidden, dropout = _fusion_options(config, ckpt.extra.get("architecture") or {}, path)
    if head is None:
        if not linear:
            from msk.core.registry import get_registry

            heads = ", ".join(get_registry().names("fusion_head"))
            raise ConfigError(f"classifier.checkpoint: {path} holds a fusion head; set classifier.head (one of "
                              f"{heads}), hidden and dropout as trained, and metadata_encoder")
        if encoder is not None:
            raise ConfigError(f"classifier: {path} is an image-only model (linear head); it cannot use "
                              "metadata_encoder: drop it, or name the fusion checkpoint")
        build = None
    else:
        if linear:
            raise ConfigError(f"classifier.head={head!r} but {path} has a linear head (an image-only "
                              "model); leave head out")
        from msk.core.models.fusion import build_fusion_model

        train = {k: v for k, v in ckpt.config.items() if k in TrainConfig.model_fields}
        build = functools.partial(build_fusion_model, {**train, "init": "random"}, num_classes,
                                  head=head, meta_dim=0 if encoder is None else encoder.dim,
                                  hidden=tuple(hidden), dropout=dropout)
    try:
        model, _ = load_model(path, build)
    except (CheckpointError, RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"classifier: {path} does not fit head={head!r}, hidden={hidden}, "
                          f"metadata width {0 if encoder is None else encoder.dim}: {first}") from None
    classes = _classes(config, path, num_classes, ckpt.extra.get("classes"))
    return ClassifierModel(model, encoder, classes, int(ckpt.config["image_size"]), config, preprocess)


@serve.deployment(name="classifier")
class ClassifierDeployment(ModelReplica):
    """One replica of the classifier; concurrent requests share forward passes (``@serve.batch``)."""

    batched = "_probabilities"

    def __init__(self, config: dict[str, Any], preprocess: dict[str, Any], debug: bool = False):
        self.config = ClassifyConfig.model_validate(config)
        self.classifier = load_classifier_model(self.config, SquaringConfig.model_validate(preprocess))
        self.configure(self.config, debug=debug)
        self.classifier.model.to(self.device)
        self.lock = threading.Lock()  # Grad-CAM hooks must not see another request's forward pass

    def _predict(self, images: np.ndarray, meta: np.ndarray | None) -> np.ndarray:
        with self.lock:
            return self.classifier.probabilities(images, meta)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _probabilities(self, items: list[tuple[np.ndarray, np.ndarray | None]]) -> list[np.ndarray]:
        images = np.stack([image for image, _ in items])
        # a replica's model takes metadata for every request or for none
        meta = None if items[0][1] is None else np.stack([m for _, m in items if m is not None]).astype(np.float32)
        return list(await asyncio.to_thread(self._predict, images, meta))

    def _gradcam(self, image: np.ndarray, meta: np.ndarray | None, target: int) -> str:
        with self.lock:
            return self.classifier.gradcam(image, meta, target)

    async def classify(self, pixels: np.ndarray, box: tuple[float, float, float, float] | None,
                       metadata: dict[str, Any], gradcam: bool = False) -> dict[str, Any] | Rejection:
        """Entity probabilities (most probable first) of a square image, the lesion ``box`` in its
        pixels (``None``: none given) and the validated metadata."""
        prepared = self.classifier.prepare(pixels, box, metadata)
        if isinstance(prepared, Rejection):
            return prepared
        image, meta = prepared
        probs = await self._probabilities((image, meta))
        order = np.argsort(-probs, kind="stable")
        result: dict[str, Any] = {
            "entities": [{"name": self.classifier.classes[i], "probability": float(probs[i])} for i in order],
            "metadata_used": self.classifier.uses_metadata}
        if gradcam:
            result["gradcam_png"] = await asyncio.to_thread(self._gradcam, image, meta, int(order[0]))
        return result

    async def describe(self) -> dict[str, Any]:
        enc = self.classifier.encoder
        return {"classes": list(self.classifier.classes), "image_size": self.classifier.image_size,
                "metadata_used": self.classifier.uses_metadata,
                "sites": None if enc is None else list(enc.schema.sites),
                "views": None if enc is None else list(enc.schema.views),
                "input": "whole_image" if self.config.roi is None else "lesion_crop",
                "roi": None if self.config.roi is None else self.config.roi.model_dump()}
