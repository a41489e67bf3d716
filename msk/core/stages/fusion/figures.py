"""What ``msk eval fusion`` draws: confusion matrices, metadata importance (GradientShap) and Grad-CAM of
the image branch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from msk.core.data.augment import eval_transform, to_tensor
from msk.core.models.fusion import FusionClassifier
from msk.core.models.train import (
    ImageClassifier,
    predict_logits,
)
from msk.core.stages.fusion.data import FusionData

if TYPE_CHECKING:
    from msk.core.stages.fusion.config import FusionConfig
    from msk.core.stages.fusion.training import _Fold, _Model


def image_features(model: ImageClassifier, images: np.ndarray, *, image_size: int,
                   batch_size: int = 64) -> np.ndarray:
    """Encoder features ``float32 [N, feature_dim]`` of ``images`` (deterministic view, with
    the model's preprocessing when it carries an input config)."""
    from msk.core.data.preprocess import input_config_of

    known = input_config_of(model)
    view = eval_transform(image_size, None if known is None else known.preprocess)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.stack([view(to_tensor(im)) for im in images[start:start + batch_size]])
            out.append(model.features(x).float())
    return torch.cat(out).numpy() if out else np.zeros((0, model.encoder.feature_dim), np.float32)


class _BoundMeta(nn.Module):
    """``images -> logits`` of a fusion model with the metadata of those images bound in
    advance, so that image-only tools (Grad-CAM) can drive it. A call must pass the bound
    rows' images in order; a shorter batch (a blank-image trace) takes the first rows."""

    def __init__(self, model: FusionClassifier, meta: np.ndarray | None):
        super().__init__()
        self.model, self.encoder = model, model.encoder
        self.input_config = getattr(model, "input_config", None)  # Grad-CAM preprocesses as trained
        self.meta = None if meta is None else torch.from_numpy(np.asarray(meta, np.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, None if self.meta is None else self.meta[: len(images)])


def confusion_png(data: FusionData, y_true: np.ndarray, pred: np.ndarray, path: Path,
                   title: str) -> Path:
    from msk.core.models.metrics import confusion_matrix, confusion_matrix_png

    cm = confusion_matrix([data.classes[i] for i in y_true], [data.classes[i] for i in pred],
                          data.classes)
    return confusion_matrix_png(cm, data.classes, path, title=title)


def explain_folds(data: FusionData, dev: np.ndarray, test: np.ndarray, folds: list[_Fold],
             model: _Model, nets: list, config: FusionConfig, out: Path,
             files: dict[str, Path]) -> pd.DataFrame:
    """GradientShap per metadata feature of ``model`` on the held-out rows, each fold model
    with its own encoder and its image features held fixed; the mean table over folds."""
    from msk.core.models.explain import explain_metadata, plot_importance

    tables = []
    for fold, net in zip(folds, nets):
        assert model.train is not None  # torch models have a training config
        features = image_features(net, data.images[test], image_size=model.train.image_size)
        explanation = explain_metadata(
            net.head, fold.encoder, data.meta.iloc[test], data.labels[test], data.classes,
            background=data.meta.iloc[dev[fold.train]], image_features=features,
            n_samples=config.explain_samples, seed=config.seed)
        tables.append(explanation.table)
    table = sum(tables[1:], tables[0]) / len(tables)
    table.to_csv(out / "metadata_importance.csv", float_format="%.4f")
    files["metadata_importance"] = plot_importance(
        table, out / "metadata_importance.png",
        title=f"{model.name}: metadata importance\n(mean |GradientShap|, {len(tables)} fold models)")
    return table


def spread_picks(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` positions in ``labels``, taking the classes in turn (seeded), sorted."""
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    picks: list[int] = []
    while len(picks) < min(n, len(labels)):
        for pool in pools:
            if pool and len(picks) < n:
                picks.append(int(pool.pop()))
    return np.array(sorted(picks), dtype=np.int64)


def gradcam_png(data: FusionData, rows: np.ndarray, folds: list[_Fold], nets: list,
                 model: _Model, path: Path) -> Path:
    """Grad-CAM of the true class on ``rows``, averaged over the fold models (each with its
    fold's metadata encoding bound), over the network's input image."""
    from msk.core.models.gradcam import grad_cam, save_overlays

    assert model.train is not None  # torch models have a training config
    size = model.train.image_size
    cams = np.zeros((len(rows), size, size), np.float32)
    logits = np.zeros((len(rows), len(data.classes)), np.float64)
    for fold, net in zip(folds, nets):
        meta = fold.encoder.transform(data.meta.iloc[rows]) if model.use_meta else None
        cams += grad_cam(_BoundMeta(net, meta), data.images[rows], data.labels[rows],
                         image_size=size, batch_size=len(rows))
        logits += predict_logits(net, data.images[rows], image_size=size, meta=meta)
    titles = [f"{data.classes[t]}\n-> {data.classes[p]}"
              for t, p in zip(data.labels[rows], logits.argmax(1))]
    return save_overlays(data.images[rows], cams / len(nets), path, titles=titles,
                         title=f"Grad-CAM of the true class, {model.name}\n"
                               f"(mean of {len(nets)} fold models; true -> ensemble prediction)")
