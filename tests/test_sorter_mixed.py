"""Mixed training: extra images (e.g. synthetic) in every fold's training part, never scored."""

from __future__ import annotations

import json

import numpy as np
import pytest

import msk.core.stages.sorter.training as sorter_module
from msk.core.data.labelled import LabelledImages
from msk.core.models.sorter import SorterError
from msk.core.stages.sorter.training import train_sorter

from test_sorter import fast, labelled  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def extra_images(n: int, labels: list[str], size: int = 32) -> LabelledImages:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 255, (n, size, size), dtype=np.uint8)
    ids = [f"synth:{i}" for i in range(n)]
    return LabelledImages(images, [labels[i % len(labels)] for i in range(n)], ids, ids, "synthetic")


def test_extra_images_join_every_fold_and_are_never_scored(tmp_path, monkeypatch):
    seen = []
    original = sorter_module.fit_classifier

    def recording(images, labels, *args, **kwargs):
        seen.append((len(images), np.bincount(labels, minlength=3).tolist()))
        return original(images, labels, *args, **kwargs)

    monkeypatch.setattr(sorter_module, "fit_classifier", recording)
    data = labelled(40)
    extra = extra_images(12, ["hand", "knee", "pelvis"])  # pelvis: not a class of the data
    train_sorter(data, fast(epochs=1, gradcam_images=0), out=tmp_path, extra_train=extra, progress=False)
    folds = [json.loads((tmp_path / f"fold-{k}" / "fold.json").read_text()) for k in (1, 2)]
    # each fold trained on its own real images plus the 8 extra hand/knee images
    assert [n for n, _ in seen] == [f["n_train"] + 8 for f in folds]
    assert all(f["budget"]["extra_train"] == 8 for f in folds)
    summary = json.loads((tmp_path / "sorter.json").read_text())
    assert any("8 images of synthetic (4 of other classes left out)" in note for note in summary["notes"])
    scored = (tmp_path / "predictions_test.csv").read_text()
    assert "synth:" not in scored


def test_extra_images_must_match_the_size_and_the_classes(tmp_path):
    data = labelled(40)
    with pytest.raises(SorterError, match="ingest both at one image size"):
        train_sorter(data, fast(), out=tmp_path / "a", extra_train=extra_images(4, ["hand"], size=16),
                     progress=False)
    with pytest.raises(SorterError, match="no extra training image"):
        train_sorter(data, fast(), out=tmp_path / "b", extra_train=extra_images(4, ["pelvis"]),
                     progress=False)
