"""Retrieval and classification metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from msk.core.models.metrics import (
    accuracy,
    confusion_matrix,
    confusion_matrix_png,
    evaluate_retrieval,
    macro_f1,
    macro_precision,
    macro_recall,
    precision_at_k,
    top_k_accuracy,
)
from msk.core.registry import build_retriever
from msk.core.specs import Entity, EntitySet

TUMOURS = EntitySet("toy-tumours", "tumour", (
    Entity("osteosarcoma", "OS", aliases=("osteogenic sarcoma",)),
    Entity("ewing sarcoma", "ES"),
    Entity("giant cell tumour", "GCT"),
))


def test_precision_at_k():
    neighbours = [["a", "a", "b"], ["b", "a", "a"]]
    assert precision_at_k(neighbours, ["a", "a"], k=1) == pytest.approx((1 + 0) / 2)
    assert precision_at_k(neighbours, ["a", "a"], k=3) == pytest.approx((2 / 3 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="fewer than k=4"):
        precision_at_k(neighbours, ["a", "a"], k=4)
    with pytest.raises(ValueError, match="2 neighbour lists for 1 queries"):
        precision_at_k(neighbours, ["a"], k=1)


def test_accuracy_and_macro_averages():
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "c", "c"]
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # per class precision: a 2/2, b 1/2, c 1/2; recall: a 2/3, b 1/2, c 1/1
    assert macro_precision(y_true, y_pred) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert macro_recall(y_true, y_pred) == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    f1 = [2 * p * r / (p + r) for p, r in ((1, 2 / 3), (0.5, 0.5), (0.5, 1))]
    assert macro_f1(y_true, y_pred) == pytest.approx(np.mean(f1))


def test_a_class_never_predicted_counts_as_zero_without_warning(recwarn):
    assert macro_precision(["a", "b"], ["a", "a"]) == pytest.approx((0.5 + 0) / 2)
    assert macro_f1(["a", "b"], ["a", "a"], labels=["a", "b", "c"]) == pytest.approx((2 / 3) / 3)
    assert not [w for w in recwarn if "zero_division" in str(w.message) or "ill-defined" in str(w.message)]


def test_confusion_matrix_in_entity_set_order():
    y_true = ["OS", "ewing sarcoma", "giant cell tumour", "osteogenic sarcoma"]
    y_pred = ["osteosarcoma", "OS", "GCT", "ES"]
    cm = confusion_matrix(y_true, y_pred, TUMOURS)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [1, 0, 0], [0, 0, 1]])
    assert cm.dtype == np.int64 and cm.sum() == 4


def test_confusion_matrix_refuses_unknown_labels():
    with pytest.raises(ValueError, match="labels not in the class list: chondroma"):
        confusion_matrix(["OS"], ["chondroma"], TUMOURS)
    with pytest.raises(ValueError, match="not in the class list: z"):
        confusion_matrix(["a"], ["z"], ["a", "b"])


def test_confusion_matrix_png(tmp_path):
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 4]])
    path = confusion_matrix_png(cm, TUMOURS, tmp_path / "cm.png", normalize=True, title="toy")
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 200
    with pytest.raises(ValueError, match=r"shape \(3, 3\) for 2 labels"):
        confusion_matrix_png(cm, ["a", "b"], tmp_path / "bad.png")


def test_top_k_accuracy():
    logits = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    y = np.array([2, 0, 0])
    assert top_k_accuracy(logits, y, k=1) == pytest.approx(1 / 3)
    assert top_k_accuracy(logits, y, k=2) == pytest.approx(2 / 3)
    assert top_k_accuracy(logits, y, k=3) == pytest.approx(1)
    with pytest.raises(ValueError, match="k must be between 1 and the number of classes 3"):
        top_k_accuracy(logits, y, k=4)
    with pytest.raises(ValueError, match="class indices in 0..2"):
        top_k_accuracy(logits, np.array([0, 1, 3]), k=1)


def test_top_k_accuracy_takes_torch_tensors():
    torch = pytest.importorskip("torch")
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2]], requires_grad=True)
    assert top_k_accuracy(logits, torch.tensor([1, 1]), k=1) == pytest.approx(0.5)


def test_evaluate_retrieval():
    # three well separated classes; queries sit next to their class
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:3] * 10
    train_y = np.repeat(["OS", "ES", "GCT"], 30)
    train_x = centres[np.repeat([0, 1, 2], 30)] + rng.standard_normal((90, 8)).astype(np.float32)
    test_y = ["OS", "ES", "GCT", "ES"]
    test_x = centres[[0, 1, 2, 1]] + 0.1 * rng.standard_normal((4, 8)).astype(np.float32)
    index = build_retriever("flat", dim=8).build(train_x, [f"i{i}" for i in range(90)])
    table = evaluate_retrieval(index, list(train_y), test_x, test_y)
    assert list(table["k"]) == [1, 3, 5, 7]
    assert list(table.columns) == ["k", "precision_at_k", "accuracy", "macro_precision",
                                   "macro_recall", "macro_f1", "n_queries"]
    assert (table[["precision_at_k", "accuracy", "macro_f1"]] == 1.0).all().all()

    # mislabel the nearest neighbours of query 0: precision drops by exactly what was changed
    nearest = index.search(test_x[:1], k=3).ids[0]
    by_id = dict(zip(index.ids, train_y))
    by_id.update({i: "ES" for i in nearest})
    table = evaluate_retrieval(index, by_id, test_x, test_y, ks=(3,)).iloc[0]
    assert table["precision_at_k"] == pytest.approx((0 + 1 + 1 + 1) / 4)
    assert table["accuracy"] == pytest.approx(3 / 4)


def test_cluster_purity_counts_each_cluster_majority():
    from msk.core.models.metrics import cluster_purity

    assert cluster_purity([0, 0, 1, 1], ["a", "a", "b", "b"]) == 1.0
    assert cluster_purity([0, 0, 0, 1], ["a", "b", "b", "a"]) == pytest.approx(0.75)
    assert cluster_purity([0, 0, 0, 0], ["a", "b", "c", "c"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        cluster_purity([0, 1], ["a"])
