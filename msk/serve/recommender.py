"""``/v1/recommend``: similar previous patients and a vote on their entity, as a Ray Serve deployment.

The model is a saved :class:`msk.core.models.recommender.Recommender` (index + pseudonymised records)
and the encoder that made its embeddings (:class:`msk.core.models.embed.Embedder`, from the
checkpoint recorded in ``recommender.json`` unless the config names another). Query images
are embedded in batches (``@serve.batch``); each request then searches the index and votes.
The answer carries only what the recommender stores: pseudonymised ``patient_id``,
``study_id``, ``image_id``, the distance and the confirmed entity of every neighbour.

A recommender built from lesion crops (``recommender.json`` records the encoder's
``roi_margin``) is queried with the same crop: the lesion box the caller sends, or the
segmenter's when it is configured (:mod:`msk.serve.segmenter`), widened by that margin
(:func:`msk.core.data.roi.lesion_crop`). Without either it refuses the request (422
``box_required``): a whole radiograph compared with lesion crops gave confident wrong answers.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from msk.core.errors import ConfigError
from msk.serve.config import RecommendConfig
from msk.serve.replica import ModelReplica, Rejection

__all__ = ["RecommenderDeployment", "inspect_recommender"]


def inspect_recommender(config: RecommendConfig) -> dict[str, Any]:
    """The recommender's description and its encoder checkpoint, checked without loading the index."""
    from msk.core.models.recommender import META_FILE, resolved_encoder

    meta_path = Path(config.path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recommender.path: {config.path} is not a saved recommender (no {META_FILE})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"recommender.path: {meta_path} is unreadable ({exc})") from None
    encoder = resolved_encoder(meta, config.path) if isinstance(meta, dict) else {}
    checkpoint = config.encoder or encoder.get("checkpoint")
    if not checkpoint:
        raise ConfigError(f"recommender: {meta_path} does not record the encoder checkpoint its embeddings "
                          "came from; set recommender.encoder")
    if not Path(checkpoint).is_file():
        if config.encoder:
            raise ConfigError(f"recommender.encoder: the encoder checkpoint {checkpoint} does not exist")
        stored = (meta.get("encoder") or {}).get("checkpoint")
        raise ConfigError(f"recommender: the encoder checkpoint {checkpoint} (recorded in {meta_path} as "
                          f"{stored}) does not exist: the recommender folder was moved without it; move the "
                          "checkpoint along (same place relative to the folder) or set recommender.encoder")
    k = config.k or int(meta["k"])
    if k > int(meta["n_images"]):
        raise ConfigError(f"recommender.k={k} exceeds the {meta['n_images']} images of {config.path}")
    return {"checkpoint": Path(checkpoint), "image_size": encoder.get("image_size"), "dim": int(meta["dim"]),
            "k": k, "n_images": int(meta["n_images"]), "retriever": meta.get("retriever"),
            "weighting": meta.get("weighting"), "entities": sorted(meta.get("entities") or {}),
            "roi_margin": encoder.get("roi_margin")}


@serve.deployment(name="recommender")
class RecommenderDeployment(ModelReplica):
    """One replica: the encoder (batched) and the index (searched per request)."""

    batched = "_embed"

    def __init__(self, config: dict[str, Any], debug: bool = False):
        from msk.core.models.embed import Embedder
        from msk.core.models.recommender import Recommender

        self.config = RecommendConfig.model_validate(config)
        self.info = inspect_recommender(self.config)
        self.configure(self.config, debug=debug)
        self.embedder = Embedder(self.info["checkpoint"], image_size=self.info["image_size"],
                                 use_gpu=self.config.use_gpu)
        self.recommender = Recommender.load(self.config.path, expect_dim=self.embedder.dim)
        self.margin = self.info["roi_margin"]  # None: built from whole images

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return list(await asyncio.to_thread(self.embedder.embed_images, np.stack(images)))

    async def recommend(self, image: np.ndarray, k: int | None = None,
                        box: tuple[float, float, float, float] | None = None) -> dict[str, Any] | Rejection:
        """The ``k`` nearest previous images of a square ``uint8`` image and the vote on their entity;
        ``box``: the lesion in the image's pixels (needed when the index holds lesion crops)."""
        from msk.core.data.roi import RoiError, lesion_crop
        from msk.core.models.recommender import RecommenderError

        if self.margin is not None:
            if box is None:
                return Rejection(422, "box_required", "this recommender was built from lesion crops: send the "
                                                      "lesion box (?box=x0,y0,x1,y1 in pixels of the uploaded "
                                                      "image), or serve it with a segmenter")
            try:
                image = lesion_crop(image, box, self.embedder.info.image_size, margin=self.margin)
            except RoiError as exc:
                return Rejection(422, "invalid_request", f"box: {exc}")
        embedding = await self._embed(image)
        try:
            [proposal] = await asyncio.to_thread(self.recommender.recommend, embedding[None], k or self.info["k"])
        except RecommenderError as exc:
            return Rejection(422, "invalid_request", str(exc))
        return proposal.to_dict()

    async def describe(self) -> dict[str, Any]:
        return {"k": self.info["k"], "images": len(self.recommender), "dim": self.recommender.dim,
                "retriever": self.recommender.index.kind, "weighting": self.recommender.weighting,
                "entities": sorted(self.recommender.entities),
                "input": "whole_image" if self.margin is None else "lesion_crop", "roi_margin": self.margin}
