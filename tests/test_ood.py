"""Scores and thresholds of 'unknown' inputs (msk.core.models.ood), without a trained model."""

from __future__ import annotations

import numpy as np
import pytest

from msk.core.models.ood import FeatureDensity, UnknownCalibration, calibrate, calibrate_threshold, ood_score


def test_threshold_keeps_at_least_the_requested_share():
    scores = np.random.default_rng(0).normal(size=200)
    for keep in (0.5, 0.9, 0.95, 0.99):
        threshold = calibrate_threshold(scores, keep)
        kept = (scores >= threshold).mean()
        assert keep <= kept <= keep + 1 / 200  # no ties in continuous scores: at most one over
    assert calibrate_threshold(scores, 1.0) == scores.min()
    with pytest.raises(ValueError, match="keep must lie in"):
        calibrate_threshold(scores, 0.0)


def test_msp_and_energy_of_fold_logits():
    logits = np.array([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]]])  # 2 folds, 2 images
    p = np.exp(2) / (np.exp(2) + 1)
    # image 0: the folds disagree, so the mean softmax is flat (0.5), though each fold is sure
    assert ood_score(logits, "msp") == pytest.approx([0.5, 0.5])
    assert ood_score(logits[:1], "msp") == pytest.approx([p, 0.5])
    assert ood_score(logits, "energy") == pytest.approx([np.log(np.exp(2) + 1), np.log(2)])
    with pytest.raises(ValueError, match="unknown score 'softmax'"):
        ood_score(logits, "softmax")
    with pytest.raises(ValueError, match="needs the features and density of every fold model"):
        ood_score(logits, "mahalanobis")


def test_feature_density_prefers_points_near_a_class(tmp_path):
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    labels = np.arange(200) % 2
    features = centres[labels] + rng.normal(size=(200, 3))
    density = FeatureDensity.fit(features, labels)
    np.testing.assert_allclose(density.means, [features[labels == c].mean(0) for c in (0, 1)], rtol=1e-5)
    near = centres + rng.normal(scale=0.5, size=(2, 3))
    far = np.array([[5.0, 8.0, 0.0], [-6.0, -6.0, 6.0]])
    assert density.score(near).min() > density.score(far).max()
    again = FeatureDensity.load(density.save(tmp_path / "d.npz"))
    np.testing.assert_array_equal(again.precision, density.precision)


def test_calibrate_scores_each_fold_with_its_own_density():
    rng = np.random.default_rng(2)
    labels = np.arange(100) % 2
    folds = []
    for shift in (0.0, 50.0):  # fold 2 lives elsewhere in feature space: its own density fits it
        train = shift + np.eye(4)[labels] * 5 + rng.normal(size=(100, 4))
        val = shift + np.eye(4)[labels[:40]] * 5 + rng.normal(size=(40, 4))
        folds.append((FeatureDensity.fit(train, labels), val))
    calibration = calibrate([np.zeros((40, 2))] * 2, score="mahalanobis", keep=0.9,
                            val_features=[v for _, v in folds], densities=[d for d, _ in folds])
    assert calibration.n_images == 80 and 0.9 <= calibration.kept <= 0.9 + 1 / 80
    # a chi-square-like distance in 4 dimensions: a far-off threshold would mean cross-fold scoring
    assert -30 < calibration.threshold < 0
    assert UnknownCalibration.from_json(calibration.to_json(), "x") == calibration
