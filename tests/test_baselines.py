"""Metadata-only baselines: patient-level folds, XGBoost and MLP cross-validation, ensembles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from msk.core.data.metadata import MetadataSchema
from msk.core.data.splits import patient_split
from msk.core.io.clinical import read_btxrd
from msk.core.models.baselines import (
    CVResult,
    MlpConfig,
    XgbConfig,
    classification_metrics,
    cross_validate,
    fit_majority,
    fit_mlp,
    fit_xgboost,
)
from msk.plugins.entity_sets import btxrd

SITES = ["hand", "femur", "tibia", "humerus"]
SCHEMA = MetadataSchema(sites=SITES, unknown="ignore")
FAST_MLP = MlpConfig(hidden=[16], max_epochs=60, patience=8, batch_size=32, lr=0.01)
FAST_XGB = XgbConfig(n_estimators=40, early_stopping_rounds=10, n_jobs=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def patients(n_patients: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Two images per patient; the class follows site and age (3 classes, 90 % clean)."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for p in range(n_patients):
        site, age, sex = rng.choice(SITES), rng.uniform(3, 85), rng.choice(["M", "F"])
        label = 0 if site in ("hand", "humerus") else (1 if age < 30 else 2)
        if rng.random() < 0.1:
            label = int(rng.integers(3))
        for view in ("frontal", "lateral"):
            rows.append({"image_id": f"p{p}-{view}", "patient_group": f"p{p}", "age": age,
                         "sex": sex, "site": site, "view": view})
            labels.append(label)
    return pd.DataFrame(rows), np.array(labels)


# -- metrics ------------------------------------------------------------------------------------


def test_classification_metrics_are_macro_averaged():
    m = classification_metrics(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]))
    assert m["accuracy"] == 0.75
    assert m["precision"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["recall"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert m["f1"] == pytest.approx((0.8 + 2 / 3) / 2)


# -- cross-validation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_and_test():
    df, y = patients(150, seed=0)
    dev, test = patient_split(df["patient_group"], y, test_size=0.2, seed=0)
    return df.iloc[dev], y[dev], df.iloc[test], y[test]


@pytest.mark.parametrize("name, fit, config", [("xgboost", fit_xgboost, FAST_XGB),
                                               ("mlp", fit_mlp, FAST_MLP)])
def test_metadata_models_learn_and_ensemble(dev_and_test, name, fit, config):
    df, y, test_df, test_y = dev_and_test
    groups = df["patient_group"].to_numpy()
    result = cross_validate(name, fit, df, y, groups, num_classes=3, schema=SCHEMA,
                            config=config, n_splits=5, seed=0)
    majority = cross_validate("majority", fit_majority, df, y, groups, 3, SCHEMA, n_splits=5)
    assert isinstance(result, CVResult) and len(result.folds) == len(result.models) == 5
    assert sum(f.n_test for f in result.folds) == len(df)
    summary = result.summary()
    assert set(summary) == {"accuracy", "precision", "recall", "f1"}
    assert summary["accuracy"][0] > 0.75 > majority.summary()["accuracy"][0] + 0.2
    assert summary["accuracy"][1] > 0  # a sample SD over the 5 folds

    logits = result.ensemble_logits(test_df)
    np.testing.assert_allclose(logits, sum(m.logits(test_df) for m in result.models), rtol=1e-5)
    held_out = result.evaluate(test_df, test_y)
    assert held_out["ensemble"]["accuracy"] > 0.75
    assert set(held_out["single"]["f1"]) and len(held_out["single"]["f1"]) == 2  # (mean, sd)


def test_folds_are_patient_level_and_cover_every_row_once():
    df, y = patients(60)
    groups = df["patient_group"].to_numpy()
    result = cross_validate("majority", fit_majority, df, y, groups, 3, SCHEMA, n_splits=5)
    tested = np.concatenate([f.test_index for f in result.folds])
    assert sorted(tested) == list(range(len(df)))
    for fold in result.folds:
        test_groups = set(groups[fold.test_index])
        train_groups = set(np.delete(groups, fold.test_index))
        assert not test_groups & train_groups
        assert set(y[fold.test_index]) == {0, 1, 2}  # stratified: every class in every fold
        assert fold.n_train == len(df) - fold.n_test


def test_mlp_stops_early_and_keeps_its_best_weights(dev_and_test):
    df, y, _, _ = dev_and_test
    model = fit_mlp(df, y, df["patient_group"].to_numpy(), 3, SCHEMA,
                    MlpConfig(hidden=[16], max_epochs=300, patience=5, lr=0.05))
    assert model.epochs == model.best_epoch + 5 < 300
    assert model.module.classifier.in_features == 16 and not model.module.training


def test_balanced_class_weights(dev_and_test):
    from msk.core.models.baselines import _class_weights

    np.testing.assert_allclose(_class_weights(np.array([0, 0, 0, 1]), 3), [4 / 9, 4 / 3, 0.0])
    df, y, test_df, test_y = dev_and_test
    groups = df["patient_group"].to_numpy()
    for fit, config in ((fit_mlp, FAST_MLP.model_copy(update={"class_weight": "balanced"})),
                        (fit_xgboost, FAST_XGB.model_copy(update={"class_weight": "balanced"}))):
        model = fit(df, y, groups, 3, SCHEMA, config)
        assert (model.logits(test_df).argmax(1) == test_y).mean() > 0.75


def test_each_fold_fits_its_own_encoder(dev_and_test):
    df, y, _, _ = dev_and_test
    result = cross_validate("xgboost", fit_xgboost, df, y, df["patient_group"], 3, SCHEMA,
                            FAST_XGB, n_splits=3)
    medians = {m.encoder.age_median for m in result.models}
    assert len(medians) == 3  # fitted on different training rows


def test_cross_validate_checks_lengths():
    df, y = patients(10)
    with pytest.raises(ValueError, match="differ in length"):
        cross_validate("x", fit_majority, df, y[:-1], df["patient_group"], 3)


# -- real BTXRD metadata -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*site value")  # rare joints absent from a training fold
def test_xgboost_on_real_btxrd_beats_the_majority_class(shared_data):
    csv = shared_data / "btxrd-meta" / "dataset.csv"
    if not csv.is_file():
        pytest.skip(f"{csv} not found")
    df = read_btxrd(csv)
    y = df["entity"].map(btxrd.index).to_numpy()
    groups = df["patient_group"].to_numpy()
    schema = MetadataSchema(unknown="ignore")
    xgb = cross_validate("xgboost", fit_xgboost, df, y, groups, len(btxrd), schema,
                         XgbConfig(n_estimators=100, n_jobs=1), n_splits=5)
    majority = cross_validate("majority", fit_majority, df, y, groups, len(btxrd), schema)
    acc, maj = xgb.summary()["accuracy"][0], majority.summary()["accuracy"][0]
    assert 0.40 < maj < 0.47  # osteochondroma: 707 of 1,635 images
    assert acc > maj + 0.05, (acc, maj)
    assert xgb.summary()["f1"][0] > 2 * majority.summary()["f1"][0]
