"""Modules behind the built-in fusion heads (imported only when one is built): image features + encoded
clinical metadata -> entity logits.

All heads share one structure. Metadata ``[B, meta_dim]`` goes through an MLP of
``Linear -> BatchNorm1d -> ReLU -> Dropout`` blocks (``hidden`` sizes) into a metadata
embedding; image features ``[B, image_dim]`` (from any registered encoder) are combined with it
in a head-specific way; a final ``Linear`` gives logits. Heads return **logits**: softmax
belongs to the loss (``cross_entropy``) or to inference.

``concat``
    joint fusion: ``Linear([dropout(image), meta_embedding])``.
``gated``
    the metadata embedding yields a sigmoid gate per image feature,
    ``image * sigmoid(W meta_embedding)``, which is then concatenated as in ``concat``.
``film``
    feature-wise linear modulation (Perez et al., AAAI 2018):
    ``image * (1 + gamma(meta)) + beta(meta)``, then concatenated; ``gamma`` and ``beta`` start at
    zero so training starts from the unmodulated image features.

``image_dim=0`` gives the metadata-only model and ``meta_dim=0`` the image-only model (a
linear probe), through the same code path: a zero-width branch is absent, and the heads'
interactions (gate, FiLM) exist only when both branches do. Passing a tensor for an absent
branch, or ``None`` for a present one, is an error. BatchNorm needs batches of two or more
samples in training mode (``drop_last=True`` in the loader); evaluation works on any batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def metadata_mlp(meta_dim: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    """``Linear -> BatchNorm1d -> ReLU -> Dropout`` per entry of ``hidden``."""
    layers: list[nn.Module] = []
    width = meta_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
                   nn.Dropout(dropout)]
        width = h
    return nn.Sequential(*layers)


class FusionHead(nn.Module):
    """Base of the built-in heads: input checks, the metadata MLP and the classifier.

    Subclasses override :meth:`combine` (image features, metadata embedding) -> image part.
    """

    kind = "concat"

    def __init__(self, image_dim: int, meta_dim: int, num_classes: int,
                 hidden: Sequence[int] = (64, 32), dropout: float = 0.2):
        super().__init__()
        if image_dim < 0 or meta_dim < 0:
            raise ValueError(f"image_dim and meta_dim must be >= 0, got {image_dim}, {meta_dim}")
        if image_dim == 0 and meta_dim == 0:
            raise ValueError(f"{self.kind} head: image_dim and meta_dim are both 0; "
                             "a fusion head needs at least one input branch")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if meta_dim and not hidden:
            raise ValueError("hidden must list at least one layer width for the metadata MLP")
        self.image_dim, self.meta_dim, self.num_classes = image_dim, meta_dim, num_classes
        self.meta_mlp = metadata_mlp(meta_dim, hidden, dropout) if meta_dim else None
        self.embed_dim = hidden[-1] if meta_dim else 0
        self.image_dropout = nn.Dropout(dropout) if image_dim else None
        self.classifier = nn.Linear(image_dim + self.embed_dim, num_classes)

    def _check(self, name: str, x: torch.Tensor | None, dim: int) -> None:
        if dim == 0 and x is not None:
            raise ValueError(f"{self.kind} head was built with {name}_dim=0 but was given "
                             f"{name} input of shape {tuple(x.shape)}; pass None")
        if dim and x is None:
            raise ValueError(f"{self.kind} head expects {name} input [B, {dim}], got None")
        if dim and x is not None and (x.ndim != 2 or x.shape[1] != dim):
            raise ValueError(f"{self.kind} head expects {name} input [B, {dim}], "
                             f"got shape {tuple(x.shape)}")

    def combine(self, image: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Image features after the head's interaction with the metadata embedding."""
        return image

    def forward(self, image_features: torch.Tensor | None,
                meta: torch.Tensor | None) -> torch.Tensor:
        self._check("image", image_features, self.image_dim)
        self._check("meta", meta, self.meta_dim)
        if image_features is not None and meta is not None and len(image_features) != len(meta):
            raise ValueError(f"batch sizes differ: image {len(image_features)}, meta {len(meta)}")
        parts = []
        embedding = self.meta_mlp(meta) if self.meta_mlp is not None else None
        if image_features is not None:
            assert self.image_dropout is not None  # image_dim > 0 (_check)
            image = self.image_dropout(image_features)
            if embedding is not None:
                image = self.combine(image, embedding)
            parts.append(image)
        if embedding is not None:
            parts.append(embedding)
        return self.classifier(torch.cat(parts, dim=1))


class ConcatHead(FusionHead):
    """Joint fusion by concatenation of image features and the metadata embedding."""

    kind = "concat"


class GatedHead(FusionHead):
    """Metadata gates the image features (sigmoid per feature), then concatenation."""

    kind = "gated"

    def __init__(self, image_dim: int, meta_dim: int, num_classes: int, **options):
        super().__init__(image_dim, meta_dim, num_classes, **options)
        self.gate = nn.Linear(self.embed_dim, image_dim) if image_dim and meta_dim else None

    def combine(self, image: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        assert self.gate is not None  # forward combines only when both inputs are there
        return image * torch.sigmoid(self.gate(embedding))


class FilmHead(FusionHead):
    """Metadata scales and shifts the image features (FiLM), then concatenation."""

    kind = "film"

    def __init__(self, image_dim: int, meta_dim: int, num_classes: int, **options):
        super().__init__(image_dim, meta_dim, num_classes, **options)
        self.film = nn.Linear(self.embed_dim, 2 * image_dim) if image_dim and meta_dim else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def combine(self, image: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        assert self.film is not None  # forward combines only when both inputs are there
        gamma, beta = self.film(embedding).chunk(2, dim=1)
        return image * (1 + gamma) + beta


HEADS: dict[str, type[FusionHead]] = {"concat": ConcatHead, "gated": GatedHead, "film": FilmHead}


def build(name: str, image_dim: int, meta_dim: int, num_classes: int,
          hidden: Sequence[int] = (64, 32), dropout: float = 0.2) -> FusionHead:
    """Build the head ``name`` (``concat``, ``gated`` or ``film``)."""
    try:
        cls = HEADS[name]
    except KeyError:
        raise ValueError(f"no built-in fusion head {name!r}; known: {', '.join(HEADS)}") from None
    return cls(image_dim, meta_dim, num_classes, hidden=tuple(hidden), dropout=dropout)

