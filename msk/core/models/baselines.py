"""Metadata-only baselines: what age, sex, site and view alone say about the tumour entity.

Two classifiers over :class:`~msk.core.data.metadata.MetadataEncoder` features, both evaluated
with patient-level (group) stratified k-fold cross-validation:

* gradient-boosted trees (XGBoost, ``multi:softprob``);
* the ``concat`` fusion head with ``image_dim=0`` (an MLP), trained with AdamW and early
  stopping on a validation part of the training fold.

Each fold fits its own encoder on its training rows (age statistics never see the test
rows) and keeps a group-disjoint ``val_fraction`` of them for early stopping. The fold models
form an ensemble for a held-out set: their logits (XGBoost: raw margins) are summed.

Every split is patient-level (:mod:`msk.core.data.splits`): all images of one patient group land
on one side, classes stratified over patients. Metrics come from :mod:`msk.core.models.metrics`
(macro averages over the classes present in the fold's truth or predictions).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
from pydantic import Field

from msk.core.config import MskConfig
from msk.core.data.metadata import MetadataEncoder, MetadataSchema
from msk.core.data.splits import patient_kfold, patient_split
from msk.core.models import metrics
from msk.core.specs import FUSION_DROPOUT, FUSION_HIDDEN

METRICS = ("accuracy", "precision", "recall", "f1")


# -- configs ------------------------------------------------------------------------------------


class MlpConfig(MskConfig):
    """Training of the metadata-only MLP (a fusion head with ``image_dim=0``)."""

    head: str = "concat"
    hidden: list[int] = list(FUSION_HIDDEN)
    dropout: float = FUSION_DROPOUT
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_epochs: int = 300
    patience: int = 20  # epochs without a lower validation loss before stopping
    val_fraction: float = 0.15  # of the training fold, group-disjoint, for early stopping
    class_weight: Literal["none", "balanced"] = "none"
    seed: int = 0


class XgbConfig(MskConfig):
    """XGBoost metadata classifier."""

    n_estimators: int = Field(500, description="boosting rounds at most (early stopping may end sooner)")
    max_depth: int = Field(3, description="depth of each tree")
    learning_rate: float = Field(0.05, description="shrinkage of each tree (XGBoost eta)")
    subsample: float = Field(0.9, description="share of training rows each tree sees")
    colsample_bytree: float = Field(0.9, description="share of features each tree sees")
    min_child_weight: float = Field(1.0, description="least hessian weight in a leaf")
    early_stopping_rounds: int = Field(30, description="stop after this many rounds without a lower "
                                       "validation loss")
    val_fraction: float = Field(0.15, description="patients of the training fold kept for early stopping")
    class_weight: Literal["none", "balanced"] = Field("none", description="'balanced': rows weighted "
                                                      "inversely to their class frequency")
    n_jobs: int = Field(2, description="XGBoost threads")
    seed: int = Field(0, description="seed of the validation split and of XGBoost")


# -- metrics ------------------------------------------------------------------------------------


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1 (classes present in truth or prediction)."""
    return {"accuracy": metrics.accuracy(y_true, y_pred),
            "precision": metrics.macro_precision(y_true, y_pred),
            "recall": metrics.macro_recall(y_true, y_pred),
            "f1": metrics.macro_f1(y_true, y_pred)}


def _class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(y, minlength=num_classes).astype(float)
    w = np.where(counts > 0, len(y) / (num_classes * np.maximum(counts, 1)), 0.0)
    return w


# -- fitted models ------------------------------------------------------------------------------


class FittedModel(Protocol):
    """A model trained on one fold, with the encoder fitted on the same rows."""

    encoder: MetadataEncoder

    def logits(self, df: pd.DataFrame) -> np.ndarray:
        """``float32 [len(df), num_classes]``; argmax is the prediction."""


@dataclass
class MlpModel:
    encoder: MetadataEncoder
    module: Any  # torch.nn.Module: a fusion head with image_dim=0
    epochs: int = 0  # epochs run
    best_epoch: int = 0  # the epoch whose weights were kept
    best_val_loss: float = float("nan")

    def logits(self, df: pd.DataFrame) -> np.ndarray:
        import torch

        x = torch.from_numpy(self.encoder.transform(df))
        self.module.eval()
        with torch.no_grad():
            return self.module(None, x).numpy()


@dataclass
class XgbModel:
    encoder: MetadataEncoder
    booster: Any  # xgboost.Booster
    best_iteration: int = 0

    def logits(self, df: pd.DataFrame) -> np.ndarray:
        import xgboost as xgb

        x = xgb.DMatrix(self.encoder.transform(df), feature_names=_xgb_names(self.encoder))
        return self.booster.predict(x, output_margin=True,
                                    iteration_range=(0, self.best_iteration + 1))


@dataclass
class MajorityModel:
    """Predicts the most frequent training class: the floor any model must clear."""

    encoder: MetadataEncoder
    majority: int
    num_classes: int

    def logits(self, df: pd.DataFrame) -> np.ndarray:
        out = np.zeros((len(df), self.num_classes), dtype=np.float32)
        out[:, self.majority] = 1.0
        return out


def _xgb_names(encoder: MetadataEncoder) -> list[str]:
    # xgboost rejects '[', ']' and '<' in feature names; ours have none but spaces are fine
    return [n.replace(" ", "_") for n in encoder.feature_names]


# -- training one fold --------------------------------------------------------------------------


def _inner_split(y: np.ndarray, groups: np.ndarray, fraction: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and early-stopping rows of a training fold, patient-disjoint."""
    return patient_split(groups, y, test_size=fraction, seed=seed)


def fit_mlp(df: pd.DataFrame, y: np.ndarray, groups: np.ndarray, num_classes: int,
            schema: MetadataSchema, config: MlpConfig | None = None) -> MlpModel:
    """Train the metadata-only MLP on ``df`` with early stopping on a group-disjoint part."""
    import torch
    import torch.nn.functional as F

    from msk.core.registry import build_fusion_head

    cfg = config or MlpConfig()
    tr, va = _inner_split(y, groups, cfg.val_fraction, cfg.seed)
    encoder = MetadataEncoder(schema).fit(df.iloc[tr])
    x_tr = torch.from_numpy(encoder.transform(df.iloc[tr]))
    x_va = torch.from_numpy(encoder.transform(df.iloc[va]))
    y_tr, y_va = torch.from_numpy(y[tr]).long(), torch.from_numpy(y[va]).long()
    weight = (torch.from_numpy(_class_weights(y[tr], num_classes)).float()
              if cfg.class_weight == "balanced" else None)

    torch.manual_seed(cfg.seed)
    module = build_fusion_head(cfg.head, image_dim=0, meta_dim=encoder.dim,
                               num_classes=num_classes, hidden=cfg.hidden, dropout=cfg.dropout)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, best_epoch, epoch = float("inf"), None, 0, 0
    for epoch in range(1, cfg.max_epochs + 1):
        module.train()
        order = torch.randperm(len(x_tr), generator=gen)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single sample
                continue
            loss = F.cross_entropy(module(None, x_tr[idx]), y_tr[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        module.eval()
        with torch.no_grad():
            val = float(F.cross_entropy(module(None, x_va), y_va, weight=weight))
        if val < best - 1e-4:
            best, best_state, best_epoch = val, copy.deepcopy(module.state_dict()), epoch
        elif epoch - best_epoch >= cfg.patience:
            break
    module.load_state_dict(best_state)
    module.eval()
    return MlpModel(encoder, module, epochs=epoch, best_epoch=best_epoch, best_val_loss=best)


def fit_xgboost(df: pd.DataFrame, y: np.ndarray, groups: np.ndarray, num_classes: int,
                schema: MetadataSchema, config: XgbConfig | None = None) -> XgbModel:
    """Train XGBoost on ``df`` with early stopping on a group-disjoint part."""
    import xgboost as xgb

    cfg = config or XgbConfig()
    tr, va = _inner_split(y, groups, cfg.val_fraction, cfg.seed)
    encoder = MetadataEncoder(schema).fit(df.iloc[tr])
    names = _xgb_names(encoder)
    weight = (_class_weights(y[tr], num_classes)[y[tr]] if cfg.class_weight == "balanced"
              else None)
    dtrain = xgb.DMatrix(encoder.transform(df.iloc[tr]), label=y[tr], weight=weight,
                         feature_names=names)
    dval = xgb.DMatrix(encoder.transform(df.iloc[va]), label=y[va], feature_names=names)
    params = {
        "objective": "multi:softprob", "num_class": num_classes, "eval_metric": "mlogloss",
        "max_depth": cfg.max_depth, "eta": cfg.learning_rate, "subsample": cfg.subsample,
        "colsample_bytree": cfg.colsample_bytree, "min_child_weight": cfg.min_child_weight,
        "nthread": cfg.n_jobs, "seed": cfg.seed, "tree_method": "hist",
    }
    booster = xgb.train(params, dtrain, num_boost_round=cfg.n_estimators,
                        evals=[(dval, "val")], early_stopping_rounds=cfg.early_stopping_rounds,
                        verbose_eval=False)
    return XgbModel(encoder, booster, best_iteration=booster.best_iteration)


def fit_majority(df: pd.DataFrame, y: np.ndarray, groups: np.ndarray, num_classes: int,
                 schema: MetadataSchema, config: Any = None) -> MajorityModel:
    return MajorityModel(MetadataEncoder(schema), int(np.bincount(y).argmax()), num_classes)


# -- cross-validation ---------------------------------------------------------------------------

FitFn = Callable[..., FittedModel]


@dataclass
class FoldResult:
    fold: int
    n_train: int
    test_index: np.ndarray  # positions in the cross-validated frame
    metrics: dict[str, float]

    @property
    def n_test(self) -> int:
        return len(self.test_index)


@dataclass
class CVResult:
    """Per-fold metrics of one model and the fold models themselves."""

    name: str
    folds: list[FoldResult] = field(default_factory=list)
    models: list[FittedModel] = field(default_factory=list)

    def summary(self) -> dict[str, tuple[float, float]]:
        """``metric -> (mean, sample SD)`` over folds."""
        out = {}
        for m in METRICS:
            v = np.array([f.metrics[m] for f in self.folds])
            out[m] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
        return out

    def ensemble_logits(self, df: pd.DataFrame) -> np.ndarray:
        """Sum of the fold models' logits on ``df`` (each with its own encoder)."""
        return np.sum([m.logits(df) for m in self.models], axis=0)

    def evaluate(self, df: pd.DataFrame, y: np.ndarray) -> dict[str, Any]:
        """Held-out metrics of the ensemble, and mean/SD of the single fold models."""
        single = [classification_metrics(y, m.logits(df).argmax(1)) for m in self.models]
        return {
            "ensemble": classification_metrics(y, self.ensemble_logits(df).argmax(1)),
            "single": {k: (float(np.mean([s[k] for s in single])),
                           float(np.std([s[k] for s in single], ddof=1)) if len(single) > 1
                           else 0.0) for k in METRICS},
        }


def cross_validate(
    name: str,
    fit: FitFn,
    df: pd.DataFrame,
    y: np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    num_classes: int,
    schema: MetadataSchema | None = None,
    config: Any = None,
    n_splits: int = 5,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> CVResult:
    """Fit ``fit(df_train, y_train, groups_train, num_classes, schema, config)`` on each of
    ``n_splits`` patient-level stratified folds and score it on the fold's test rows."""
    schema = schema or MetadataSchema()
    y = np.asarray(y, dtype=np.int64)
    groups = np.asarray(groups)
    if len(df) != len(y) or len(y) != len(groups):
        raise ValueError(f"df, y and groups differ in length: {len(df)}, {len(y)}, {len(groups)}")
    result = CVResult(name)
    for k, (tr, te) in enumerate(patient_kfold(groups, y, n_splits=n_splits, seed=seed)):
        model = fit(df.iloc[tr], y[tr], groups[tr], num_classes, schema, config)
        pred = model.logits(df.iloc[te]).argmax(1)
        result.folds.append(FoldResult(k, len(tr), te, classification_metrics(y[te], pred)))
        result.models.append(model)
        if progress:
            progress(k)
    return result
