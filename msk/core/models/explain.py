"""Which clinical features drive a fusion head's prediction: GradientShap on the metadata input.

GradientShap (Lundberg & Lee 2017, as implemented by captum) averages ``gradient x (input -
baseline)`` over random baselines drawn from a background set and random points on the path
to the input; the attributions of one sample add up, in expectation, to its logit minus the
mean logit over the background. Because they are additive, the attribution of a feature that
spans several columns (the one-hot site block, the age value + age bins + missing flag) is the
*sum* of its columns' attributions: :func:`group_attributions`. The summary table is the mean
absolute group attribution per entity (:func:`importance_table`), shown by
:func:`plot_importance` as stacked horizontal bars like SHAP's multi-class bar plot.

Image features, when the head has an image branch, are held fixed at the sample's own
features: the attributions answer "what did the metadata add for *this* image".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


def metadata_attributions(
    model,
    meta: np.ndarray,
    target: Sequence[int] | np.ndarray,
    *,
    background: np.ndarray,
    image_features: np.ndarray | None = None,
    n_samples: int = 50,
    stdevs: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """GradientShap attributions of ``target`` logits to each metadata column.

    :param model: a fusion head, ``model(image_features | None, meta) -> logits``; put in
        eval mode (BatchNorm must not use batch statistics).
    :param meta: encoded metadata ``[N, D]`` to explain.
    :param target: class index per row (the true entity, or the predicted one).
    :param background: encoded reference rows ``[M, D]`` (training rows), baselines are drawn
        from them.
    :param image_features: ``[N, image_dim]`` for heads with an image branch, else ``None``.
    :return: ``float32 [N, D]``.
    """
    import torch
    from captum.attr import GradientShap

    model.eval()
    x = torch.as_tensor(np.asarray(meta, dtype=np.float32))
    base = torch.as_tensor(np.asarray(background, dtype=np.float32))
    if x.ndim != 2 or base.ndim != 2 or base.shape[1] != x.shape[1]:
        raise ValueError(f"meta [N, D] and background [M, D] disagree: {tuple(x.shape)} vs "
                         f"{tuple(base.shape)}")
    tgt = torch.as_tensor(np.asarray(target, dtype=np.int64))
    if tgt.shape != (len(x),):
        raise ValueError(f"target needs one class per row ({len(x)}), got shape {tuple(tgt.shape)}")
    img = None if image_features is None else torch.as_tensor(
        np.asarray(image_features, dtype=np.float32))

    def forward(m: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        return model(image, m)

    torch.manual_seed(seed)
    attr = GradientShap(forward).attribute(
        x, baselines=base, target=tgt, n_samples=n_samples, stdevs=stdevs,
        additional_forward_args=(img,) if img is not None else None)
    return attr.detach().numpy().astype(np.float32)


def group_attributions(attributions: np.ndarray, feature_groups: Mapping[str, Sequence[int]]
                       ) -> pd.DataFrame:
    """Signed per-feature attributions ``[N, groups]``: each group's columns summed."""
    attributions = np.asarray(attributions)
    covered = sorted(i for cols in feature_groups.values() for i in cols)
    if covered != list(range(attributions.shape[1])):
        raise ValueError(f"feature groups cover columns {covered}, attributions have "
                         f"{attributions.shape[1]}")
    return pd.DataFrame({g: attributions[:, list(cols)].sum(axis=1)
                         for g, cols in feature_groups.items()})


def importance_table(groups: pd.DataFrame, target: Sequence[int],
                     class_names: Sequence[str]) -> pd.DataFrame:
    """Mean absolute group attribution per entity (rows, by ``target``) plus an ``all`` row."""
    classes = np.asarray(target)
    absolute = groups.abs()
    rows = {class_names[c]: absolute[classes == c].mean() for c in sorted(set(classes.tolist()))}
    rows["all"] = absolute.mean()
    table = pd.DataFrame(rows).T
    table.index.name = "entity"
    return table


def plot_importance(table: pd.DataFrame, path: str | Path,
                    title: str = "Metadata feature importance (mean |GradientShap|)") -> Path:
    """Stacked horizontal bars: one bar per feature, one segment per entity; PNG at ``path``."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_entity = table.drop(index="all", errors="ignore")
    order = list(per_entity.sum(axis=0).sort_values().index)
    fig = Figure(figsize=(7, 0.5 * len(order) + 1.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    left = np.zeros(len(order))
    colours = colormaps["tab10"]
    for i, (entity, row) in enumerate(per_entity.iterrows()):
        values = row[order].to_numpy(dtype=float)
        ax.barh(order, values, left=left, label=str(entity), color=colours(i % 10))
        left += values
    ax.set_xlabel("mean |attribution| (stacked over entities)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right", frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


@dataclass
class MetadataExplanation:
    columns: pd.DataFrame  # [N, D] attributions per encoded column
    groups: pd.DataFrame  # [N, groups] attributions per clinical feature
    table: pd.DataFrame  # entity x feature: mean |attribution|

    def plot(self, path: str | Path) -> Path:
        return plot_importance(self.table, path)


def explain_metadata(
    model,
    encoder,
    df: pd.DataFrame,
    target: Sequence[int] | None,
    class_names: Sequence[str],
    *,
    background: pd.DataFrame | None = None,
    image_features: np.ndarray | None = None,
    max_background: int = 200,
    n_samples: int = 50,
    seed: int = 0,
) -> MetadataExplanation:
    """Explain ``model``'s predictions on the canonical metadata ``df``.

    :param encoder: the fitted :class:`~msk.core.data.metadata.MetadataEncoder` of the model.
    :param target: class per row to explain (the true entity); ``None`` explains the
        predicted class.
    :param background: reference rows (the training rows); default ``df`` itself. At most
        ``max_background`` random rows are used.
    """
    import torch

    meta = encoder.transform(df)
    if target is None:
        model.eval()
        with torch.no_grad():
            img = (None if image_features is None
                   else torch.from_numpy(np.asarray(image_features, dtype=np.float32)))
            target = model(img, torch.from_numpy(meta)).argmax(1).numpy()
    ref = encoder.transform(background if background is not None else df)
    if len(ref) > max_background:
        ref = ref[np.random.default_rng(seed).choice(len(ref), max_background, replace=False)]
    attr = metadata_attributions(model, meta, target, background=ref,
                                 image_features=image_features, n_samples=n_samples, seed=seed)
    columns = pd.DataFrame(attr, columns=encoder.feature_names, index=df.index)
    groups = group_attributions(attr, encoder.feature_groups)
    groups.index = df.index
    return MetadataExplanation(columns, groups, importance_table(groups, target, class_names))
