"""Retrieval and classification metrics: plain functions of labels, neighbours and logits.

Labels are strings (entity names) unless a function says otherwise. Macro averages are taken
over the classes present in ``y_true`` or ``y_pred`` (scikit-learn's default) unless ``labels``
is given; a class with no predictions (or no true samples) contributes 0 to the precision (or
recall) average instead of a warning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msk.core.specs import EntitySet

if TYPE_CHECKING:
    import pandas as pd

    from msk.core.models.retrieval import Retriever
    from msk.core.models.vote import Weighting


def precision_at_k(neighbour_labels: Sequence[Sequence[str]], query_labels: Sequence[str],
                   k: int) -> float:
    """Mean over queries of the share of the ``k`` nearest neighbours whose label is the query's.

    :param neighbour_labels: per query, its neighbours' labels, nearest first (at least ``k``).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(neighbour_labels) != len(query_labels):
        raise ValueError(f"{len(neighbour_labels)} neighbour lists for {len(query_labels)} queries")
    if not len(query_labels):
        raise ValueError("precision_at_k needs at least one query")
    hits = []
    for i, (row, label) in enumerate(zip(neighbour_labels, query_labels)):
        row = list(row)
        if len(row) < k:
            raise ValueError(f"query {i} has {len(row)} neighbours, fewer than k={k}")
        hits.append(sum(n == label for n in row[:k]) / k)
    return float(np.mean(hits))


def softmax(logits: Any) -> np.ndarray:
    """Softmax over the last axis of ``[..., C]`` logits (row-wise for ``[N, C]``), in float64 so
    that each row sums to 1; the one softmax of msk (sorter ensembles, transfer, serving)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def accuracy(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray) -> float:
    """Share of predictions equal to the truth."""
    y_true, y_pred = _pair(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def macro_precision(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray,
                    labels: Sequence[Any] | None = None) -> float:
    """Unweighted mean over classes of precision (0 for a class never predicted)."""
    return _prf(y_true, y_pred, labels)[0]


def macro_recall(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray,
                 labels: Sequence[Any] | None = None) -> float:
    """Unweighted mean over classes of recall (0 for a class with no true samples)."""
    return _prf(y_true, y_pred, labels)[1]


def macro_f1(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray,
             labels: Sequence[Any] | None = None) -> float:
    """Unweighted mean over classes of F1 (0 for a class with neither hits nor predictions)."""
    return _prf(y_true, y_pred, labels)[2]


def confusion_matrix(y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray,
                     labels: EntitySet | Sequence[str]) -> np.ndarray:
    """int64 ``[C, C]`` counts: row = true class, column = predicted class, in ``labels`` order.

    :param labels: an :class:`EntitySet` (its entity order; ``y`` may use names, codes or
        aliases) or a list of class names. A label outside it is an error, not silently dropped.
    """
    names, canonical = _label_order(labels)
    y_true, y_pred = _pair([canonical(v) for v in y_true], [canonical(v) for v in y_pred])
    position = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in (*y_true, *y_pred) if v not in position})
    if unknown:
        raise ValueError(f"labels not in the class list: {', '.join(unknown[:10])}")
    cm = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(cm, ([position[v] for v in y_true], [position[v] for v in y_pred]), 1)
    return cm


def confusion_matrix_png(cm: np.ndarray, labels: EntitySet | Sequence[str], path: str | Path, *,
                         normalize: bool = False, title: str | None = None) -> Path:
    """Draw ``cm`` (rows true, columns predicted) as a PNG heat map with counts in the cells.

    :param normalize: show each row as shares of its true class instead of counts.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(labels.names) if isinstance(labels, EntitySet) else [str(v) for v in labels]
    cm = np.asarray(cm)
    if cm.shape != (len(names), len(names)):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {len(names)} labels")
    values = cm.astype(np.float64)
    if normalize:
        values = values / np.maximum(values.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.55 * len(names) + 2.5)
    fig = Figure(figsize=(size, size * 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of true class" if normalize else "images")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted",
           ylabel="true", title=title or "")
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    threshold = values.max() / 2 if values.size else 0
    for (i, j), v in np.ndenumerate(values):
        text = f"{v:.2f}" if normalize else f"{int(cm[i, j])}"
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="white" if v > threshold else "black")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def top_k_accuracy(logits: Any, y: Any, k: int) -> float:
    """Share of samples whose true class is among the ``k`` highest logits.

    :param logits: float ``[N, C]`` (numpy array or torch tensor).
    :param y: int ``[N]`` true class indices.
    A true class tied with others counts as ranked at its best position.
    """
    logits, y = _numpy(logits).astype(np.float64), _numpy(y)
    if logits.ndim != 2 or y.shape != (len(logits),):
        raise ValueError(f"logits must be [N, C] and y [N]; got {logits.shape} and {y.shape}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be between 1 and the number of classes {logits.shape[1]}, got {k}")
    if not len(y):
        raise ValueError("top_k_accuracy needs at least one sample")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= logits.shape[1]:
        raise ValueError(f"y must hold class indices in 0..{logits.shape[1] - 1}")
    true_score = logits[np.arange(len(y)), y][:, None]
    rank = (logits > true_score).sum(axis=1)  # classes strictly ahead of the true one
    return float(np.mean(rank < k))


def cluster_purity(assignments: Sequence[Any] | np.ndarray, truth: Sequence[Any] | np.ndarray) -> float:
    """Share of items whose cluster's most frequent true label is their own label.

    The usual external measure of a clustering next to NMI: 1.0 when every cluster holds one
    label only; it rises with the number of clusters (singletons are pure), so report ``k``.
    """
    a, t = _pair(truth, assignments)
    if not len(a):
        raise ValueError("cluster_purity needs at least one item")
    majority = 0
    for cluster in np.unique(t):
        _, counts = np.unique(a[t == cluster], return_counts=True)
        majority += int(counts.max())
    return majority / len(a)


def evaluate_retrieval(index: Retriever, train_labels: Mapping[str, str] | Sequence[str],
                       test_x: np.ndarray, test_labels: Sequence[str],
                       ks: Sequence[int] = (1, 3, 5, 7), *, weighting: Weighting = "none",
                       class_frequencies: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Search ``test_x`` in ``index`` once and score the retrieval and the vote for each ``k``.

    :param train_labels: label of every stored vector: ``id -> label`` or a sequence in
        insertion order.
    :param weighting: vote weighting, see :func:`msk.core.models.vote.vote`.
    :return: one row per ``k`` with columns ``k``, ``precision_at_k`` (share of neighbours of
        the query's label), ``accuracy``, ``macro_precision``, ``macro_recall``, ``macro_f1``
        (of the vote's prediction) and ``n_queries``.
    """
    import pandas as pd

    from msk.core.models.vote import vote

    ks = sorted({int(k) for k in ks})
    if not ks:
        raise ValueError("ks must name at least one k")
    test_labels = [str(v) for v in test_labels]
    if len(test_labels) != len(test_x):
        raise ValueError(f"{len(test_x)} test vectors but {len(test_labels)} test labels")
    result = index.search(test_x, max(ks))
    neighbours = result.labels(train_labels)
    rows = []
    for k in ks:
        pred = vote(neighbours, result.distances, k=k, weighting=weighting,
                    class_frequencies=class_frequencies).labels
        rows.append({
            "k": k,
            "precision_at_k": precision_at_k(neighbours, test_labels, k),
            "accuracy": accuracy(test_labels, pred),
            "macro_precision": macro_precision(test_labels, pred),
            "macro_recall": macro_recall(test_labels, pred),
            "macro_f1": macro_f1(test_labels, pred),
            "n_queries": len(test_labels),
        })
    return pd.DataFrame(rows)


# -- helpers -----------------------------------------------------------------------------------


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _pair(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = _numpy(y_true), _numpy(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length; got {y_true.shape} "
                         f"and {y_pred.shape}")
    if not len(y_true):
        raise ValueError("metrics need at least one sample")
    return y_true, y_pred


def _prf(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray,
         labels: Sequence[Any] | None) -> tuple[float, float, float]:
    from sklearn.metrics import precision_recall_fscore_support

    y_true, y_pred = _pair(y_true, y_pred)
    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=None if labels is None else list(labels), average="macro",
        zero_division=0,
    )
    return float(p), float(r), float(f)


def _label_order(labels: EntitySet | Sequence[str]):
    if isinstance(labels, EntitySet):
        entity_set = labels

        def canonical(value: Any) -> str:
            try:
                return entity_set.names[entity_set.index(str(value))]
            except KeyError:
                return str(value)  # reported as unknown by the caller

        return entity_set.names, canonical
    names = [str(v) for v in labels]
    if len(set(names)) != len(names):
        raise ValueError("labels contain duplicates")
    return names, str


def overlap_scores(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image IoU and Dice of boolean masks ``[N, H, W]``; 1 where both are empty."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    inter = (pred & truth).sum(axis=(-2, -1)).astype(np.float64)
    union = (pred | truth).sum(axis=(-2, -1)).astype(np.float64)
    total = pred.sum(axis=(-2, -1)) + truth.sum(axis=(-2, -1)).astype(np.float64)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    return iou, dice
