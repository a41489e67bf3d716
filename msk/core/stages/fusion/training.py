"""Image + clinical metadata fusion: models trained end to end, and the comparison protocol.

A fusion model is an :class:`~msk.core.models.train.ImageClassifier` whose head is a registered fusion
head (:mod:`msk.plugins.fusion_models`): ``encoder(image) -> features``, then
``head(features, encoded metadata) -> logits``, trained jointly by :func:`msk.core.models.train.fit`
(in this process or on Ray Train). The same code gives the two single-branch models the fused
ones are judged against: ``meta_dim=0`` is the image-only model, ``use_image=False`` the
metadata-only MLP (``image_dim=0``; the encoder is kept for the checkpoint format but frozen and
never run).

:func:`evaluate_fusion` is ``msk eval fusion``: on labelled lesion images with clinical metadata
it holds out a patient-level test split, runs patient-level k-fold cross-validation on the rest
for every model of :class:`FusionConfig` (image only, metadata only, one row per fusion head,
XGBoost on the metadata, optionally an image-only vision transformer), sums the fold models'
logits into an ensemble for the held-out split, and explains the fused model: GradientShap per
metadata feature (:mod:`msk.core.models.explain`) and Grad-CAM of its image branch
(:mod:`msk.core.models.gradcam`).

Every split is by patient (:mod:`msk.core.data.splits`). Each training fold keeps a patient-disjoint
``val_fraction`` for early stopping (``train.patience``) and fits its own
:class:`~msk.core.data.metadata.MetadataEncoder` on its training rows only; all models of a fold see
the same rows. Before anything is trained, every fold's encoder is fitted and applied to every
row it will meet, so bad metadata (an age of -1 or 200, a sex outside M/F, a site or view the
fold never saw, with ``metadata.unknown="error"``) fails in seconds with the
:class:`~msk.core.io.clinical.MetadataError` of :mod:`msk.core.data.metadata`, naming the fold and rows.

Input images are ROI crops when the metadata carries lesion boxes (``x0, y0, x1, y1`` in the
pixel coordinates of the original image, end exclusive): boxes are mapped into the letterboxed
ingest image (:func:`msk.core.data.squaring.map_box_to_square`), widened to a square with a margin
(:func:`msk.core.data.roi.roi_box`) and resized to ``roi_size`` (:func:`msk.core.data.roi.crop_roi`).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from msk.core.data.metadata import MetadataEncoder
from msk.core.data.splits import patient_kfold, patient_split
from msk.core.errors import ConfigError
from msk.core.io.clinical import MetadataError
from msk.core.models.baselines import METRICS, classification_metrics, fit_xgboost
from msk.core.models.fusion import FusionClassifier, build_fusion_model
from msk.core.models.train import (
    FitResult,
    TrainConfig,
    fit,
    load_model,
    predict_logits,
)
from msk.core.specs import FUSION_DROPOUT, FUSION_HIDDEN
from msk.core.stages.fusion.config import FusionConfig
from msk.core.stages.fusion.data import FusionData, load_fusion_data
from msk.core.stages.fusion.figures import confusion_png, explain_folds, gradcam_png, spread_picks

__all__ = ["FusionResult", "evaluate_fusion", "fit_fusion", "plan_folds"]



# -- configuration ------------------------------------------------------------------------------


# -- models -------------------------------------------------------------------------------------


def fit_fusion(images: np.ndarray, labels: Sequence[int] | np.ndarray, meta: np.ndarray | None,
               num_classes: int, config: TrainConfig, *, out: str | os.PathLike,
               head: str = "concat", use_image: bool = True, hidden: Sequence[int] = FUSION_HIDDEN,
               dropout: float = FUSION_DROPOUT, encoder_options: dict[str, Any] | None = None,
               val: tuple | None = None, classes: Sequence[str] | None = None,
               record: dict[str, Any] | None = None) -> FitResult:
    """Train a :class:`FusionClassifier` end to end with :func:`msk.core.models.train.fit`.

    :param images: ``uint8 [N, S, S]``; also required by the metadata-only model (the loader
        is shared), which then trains without augmentation.
    :param meta: ``float32 [N, D]`` encoded metadata, or ``None`` for the image-only model.
    :param val: ``(images, labels)`` or ``(images, labels, meta)`` for early stopping.
    :param classes: class names in label order (saved in the checkpoints for serving).
    :param record: what the caller knows for the model's record (``metadata_encoder``, ``entity_set``).
    """
    if not use_image and meta is None:
        raise ValueError("a model without the image branch needs metadata (meta is None)")
    if not use_image:
        config = config.model_copy(update={"augment": False})
    build = functools.partial(build_fusion_model, config.model_dump(mode="json"), num_classes,
                              head=head, meta_dim=0 if meta is None else int(meta.shape[1]),
                              use_image=use_image, hidden=tuple(hidden), dropout=dropout,
                              encoder_options=encoder_options)
    return fit(build, images, labels, num_classes, config, out=out, meta=meta, val=val, classes=classes,
               record={"task": "fusion", **(record or {})})


# -- data ---------------------------------------------------------------------------------------


# -- the protocol -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Model:
    """One model of the comparison: a :class:`FusionClassifier` or XGBoost on the metadata."""

    key: str  # folder and file name
    name: str  # table label
    kind: Literal["torch", "xgboost"]
    head: str = "concat"
    use_image: bool = True
    use_meta: bool = True
    train: TrainConfig | None = None
    convolutional: bool = True  # Grad-CAM applies


def _models(config: FusionConfig) -> list[_Model]:
    first, enc = config.heads[0], config.train.encoder
    models = []
    if config.image_only:
        models.append(_Model("image", f"image only ({enc})", "torch", first, True, False, config.train))
    if config.transformer is not None:
        t = config.transformer
        train = config.train.model_copy(update={"encoder": t.encoder, "image_size": t.image_size,
                                                "encoder_options": {**t.options, "img_size": t.image_size},
                                                "lr": t.lr, "init": "random", "sobel": None})
        models.append(_Model("transformer", f"image only ({t.encoder.removeprefix('timm/')})",
                             "torch", first, True, False, train, convolutional=False))
    if config.metadata_only:
        models.append(_Model("metadata", f"metadata only (MLP, {first} head)", "torch", first,
                             False, True, config.train))
    if config.xgboost is not None:
        models.append(_Model("xgboost", "metadata only (XGBoost)", "xgboost"))
    for head in config.heads:
        models.append(_Model(f"fusion-{head}", f"fusion: {head} ({enc})", "torch", head, True,
                             True, config.train))
    if len(set(config.heads)) != len(config.heads):
        raise ConfigError(f"heads names a head twice: {config.heads}")
    return models


@dataclass
class _Fold:
    """One training fold: positions in the development rows, and its metadata encoder."""

    k: int
    fit: np.ndarray  # the training fold: train + val
    train: np.ndarray  # fitted on
    val: np.ndarray  # early stopping
    test: np.ndarray  # scored
    encoder: MetadataEncoder


def _plan(data: FusionData, dev: np.ndarray, test: np.ndarray, config: FusionConfig) -> list[_Fold]:
    """Patient-level folds of ``dev``, each with its encoder fitted on the training rows and
    tried on every row it will encode, so that bad metadata fails before any training."""
    y, groups = data.labels[dev], data.groups[dev]
    folds = []
    for k, (tr, te) in enumerate(patient_kfold(groups, y, n_splits=config.folds, seed=config.seed)):
        # the split fit_xgboost makes of the same rows: every model early-stops on the same patients
        inner_tr, inner_va = patient_split(groups[tr], y[tr], test_size=config.val_fraction,
                                           seed=config.seed)
        encoder = MetadataEncoder(config.metadata)
        try:
            encoder.fit(data.meta.iloc[dev[tr[inner_tr]]])
            for rows in (dev[tr[inner_va]], dev[te], test):
                encoder.transform(data.meta.iloc[rows])
        except MetadataError as exc:
            raise MetadataError(f"fold {k}: {exc}") from None
        folds.append(_Fold(k, tr, tr[inner_tr], tr[inner_va], te, encoder))
    return folds


def plan_folds(data: FusionData, config: FusionConfig) -> tuple[np.ndarray, np.ndarray, list[_Fold]]:
    """``(dev, test, folds)``: the patient-level held-out split and the folds of the development
    rows that :func:`evaluate_fusion` trains on (tuning uses ``folds[0]``)."""
    dev, test = patient_split(data.groups, data.labels, test_size=config.test_fraction,
                              seed=config.seed)
    return dev, test, _plan(data, dev, test, config)


@dataclass
class _Trained:
    """A fold model: ``logits(rows)`` for any rows of the data, and how its training went."""

    logits: Callable[[np.ndarray], np.ndarray]
    net: FusionClassifier | None  # None for XGBoost
    epochs: int
    best_epoch: int
    seconds: float  # training wall time (torch: the epochs in history.csv, also when resumed)


def _train_fold(model: _Model, data: FusionData, dev: np.ndarray, fold: _Fold,
                config: FusionConfig, run: Path) -> _Trained:
    """Train ``model`` on ``fold``, or load it when ``run`` holds the finished run."""
    num_classes = len(data.classes)

    if model.kind == "xgboost":
        assert config.xgboost is not None  # _models adds the XGBoost model only with its config
        rows = dev[fold.fit]
        xgb_config = config.xgboost.model_copy(update={"val_fraction": config.val_fraction,
                                                       "seed": config.seed})
        began = time.perf_counter()
        xgb = fit_xgboost(data.meta.iloc[rows], data.labels[rows], data.groups[rows], num_classes,
                          config.metadata, xgb_config)
        return _Trained(lambda r: xgb.logits(data.meta.iloc[r]), None,
                        int(xgb.booster.num_boosted_rounds()), xgb.best_iteration + 1,
                        time.perf_counter() - began)

    def meta_of(rows: np.ndarray) -> np.ndarray | None:
        return fold.encoder.transform(data.meta.iloc[rows]) if model.use_meta else None

    train_config = model.train
    assert train_config is not None  # every torch model has one (_models)
    options: dict[str, Any] = dict(head=model.head, use_image=model.use_image, hidden=tuple(config.hidden),
                                   dropout=config.dropout)
    done = run / "done.json"
    if done.is_file() and (run / "best.pt").is_file():
        build = functools.partial(build_fusion_model, train_config.model_dump(mode="json"),
                                  num_classes, meta_dim=fold.encoder.dim if model.use_meta else 0,
                                  **options)
        net, _ = load_model(run / "best.pt", build)
        info = json.loads(done.read_text())
    else:
        train, val = dev[fold.train], dev[fold.val]
        val_set = (data.images[val], data.labels[val], *([meta_of(val)] if model.use_meta else []))
        result = fit_fusion(data.images[train], data.labels[train], meta_of(train), num_classes,
                            train_config, out=run, val=val_set, classes=data.classes, **options,
                            record={"entity_set": config.entity_set or None,
                                    "metadata_encoder": fold.encoder.to_dict() if model.use_meta else None})
        net = result.model
        info = {"epochs": len(result.history), "best_epoch": result.best_epoch}
        fold.encoder.save(run / "metadata_encoder.json")
        done.write_text(json.dumps(info))

    def logits(rows: np.ndarray) -> np.ndarray:
        return predict_logits(net, data.images[rows], image_size=train_config.image_size,
                              meta=meta_of(rows))

    seconds = float(pd.read_csv(run / "history.csv")["seconds"].sum())
    return _Trained(logits, net, info["epochs"], info["best_epoch"], seconds)


@dataclass
class FusionResult:
    """What :func:`evaluate_fusion` measured (also written to ``out``).

    :ivar table: one row per model and set: ``CV <k>-fold`` (mean and SD over the folds),
        ``held-out, fold models`` (mean and SD of the k fold models on the held-out split) and
        ``held-out, ensemble`` (their summed logits; SD empty); columns ``model``, ``set``,
        ``accuracy``, ``precision``, ``recall``, ``f1`` (macro), ``<metric>_sd`` and
        ``seconds`` (training wall time of the model's k folds, on the CV row).
    :ivar folds: one row per model and fold: sizes, metrics, ``epochs`` run (XGBoost: trees),
        ``best_epoch`` and training ``seconds``.
    :ivar predictions: the held-out images: ``image_id``, ``entity`` and, per model key, the
        ensemble's prediction.
    :ivar explanation: entity x metadata feature, mean |GradientShap| of the first fusion head.
    """

    table: pd.DataFrame
    folds: pd.DataFrame
    predictions: pd.DataFrame
    out: Path
    explanation: pd.DataFrame | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def markdown(self) -> str:
        """The table as Markdown, ``mean ± sd`` per cell."""
        header = ["model", "set", *(m if m == "accuracy" else f"macro {m}" for m in METRICS), "train s"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        previous = None
        for r in self.table.to_dict("records"):
            cells = [r["model"] if r["model"] != previous else "", r["set"]]
            for m in METRICS:
                sd = r[f"{m}_sd"]
                cells.append(f"{r[m]:.3f}" if pd.isna(sd) else f"{r[m]:.3f} ± {sd:.3f}")
            cells.append("" if pd.isna(r["seconds"]) else f"{r['seconds']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
            previous = r["model"]
        return "\n".join(lines)


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean and sample SD per metric over ``rows``."""
    out: dict[str, float] = {}
    for m in METRICS:
        v = np.array([r[m] for r in rows], dtype=float)
        out[m] = float(v.mean())
        out[f"{m}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return out


def _check_out(out: Path, config: FusionConfig, fingerprint: str) -> None:
    """Stamp ``out`` with the config and data; a folder stamped otherwise is refused."""
    stamp = json.loads(json.dumps({"config": config.model_dump(mode="json"), "data": fingerprint}))
    path = out / "evaluation.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != stamp:
            what = "config" if saved.get("config") != stamp["config"] else "data"
            raise ConfigError(f"{out} holds an evaluation of a different {what}; use a new "
                              "folder (a re-run in the same folder with the same config resumes)")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp, indent=2))
    (out / "config.yaml").write_text(config.to_yaml())


def evaluate_fusion(source: str | os.PathLike | np.ndarray | FusionData,
                    metadata: pd.DataFrame | str | os.PathLike | None = None,
                    config: FusionConfig | None = None, *, out: str | os.PathLike,
                    progress: Callable[[str], None] | None = None) -> FusionResult:
    """Compare image-only, metadata-only and fused models under patient-level cross-validation.

    :param source: an ingest output folder, a ``uint8 [N, S, S]`` image array, or a
        :class:`FusionData` from :func:`load_fusion_data` (then without ``metadata``).
    :param metadata: canonical metadata frame or CSV (see :func:`load_fusion_data`).
    :param out: result folder: ``results.csv`` and ``results.md`` (the table), ``folds.csv``,
        ``predictions.csv``, ``confusion-<model>.png`` (held-out ensemble),
        ``runs/<model>/fold-<k>/`` (training runs: ``history.csv``, ``best.pt``, the fold's
        ``metadata_encoder.json``); with ``explain``: ``metadata_importance.csv/.png`` and
        ``gradcam-<model>.png``. A re-run with the same config and data resumes.
    :param progress: called with a short message after each fold model.
    """
    config = config or FusionConfig()
    if isinstance(source, FusionData):
        if metadata is not None:
            raise ValueError("FusionData already holds its metadata; do not pass metadata too")
        data = source
    elif metadata is None:
        raise ValueError("evaluate_fusion needs metadata with an ingest folder or image array")
    else:
        data = load_fusion_data(source, metadata, config)
    out = Path(out)
    models = _models(config)
    dev, test, folds = plan_folds(data, config)
    _check_out(out, config, data.fingerprint())

    y_test = data.labels[test]
    fold_rows: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    predictions: dict[str, Any] = {"image_id": data.meta["image_id"].iloc[test].to_numpy(),
                                   "entity": [data.classes[i] for i in y_test]}
    nets: dict[str, list[FusionClassifier | None]] = {}
    files: dict[str, Path] = {}
    for model in models:
        cv, held, nets[model.key] = [], [], []
        ensemble: np.ndarray | float = 0.0
        for fold in folds:
            trained = _train_fold(model, data, dev, fold, config,
                                  out / "runs" / model.key / f"fold-{fold.k}")
            rows_k = dev[fold.test]
            scores = classification_metrics(data.labels[rows_k], trained.logits(rows_k).argmax(1))
            cv.append(scores)
            fold_rows.append({"model": model.name, "fold": fold.k, "n_train": len(fold.train),
                              "n_val": len(fold.val), "n_test": len(rows_k), **scores,
                              "epochs": trained.epochs, "best_epoch": trained.best_epoch,
                              "seconds": trained.seconds})
            logits = trained.logits(test)
            held.append(classification_metrics(y_test, logits.argmax(1)))
            ensemble = ensemble + logits
            nets[model.key].append(trained.net)
            if progress:
                progress(f"{model.name}, fold {fold.k}: macro F1 {scores['f1']:.3f}")
        pred = np.asarray(ensemble).argmax(1)
        predictions[model.key] = [data.classes[i] for i in pred]
        no_sd = {f"{m}_sd": np.nan for m in METRICS}
        rows += [
            {"model": model.name, "set": f"CV {config.folds}-fold", **_summary(cv),
             "seconds": sum(r["seconds"] for r in fold_rows if r["model"] == model.name)},
            {"model": model.name, "set": "held-out, fold models", **_summary(held), "seconds": np.nan},
            {"model": model.name, "set": "held-out, ensemble",
             **classification_metrics(y_test, pred), **no_sd, "seconds": np.nan},
        ]
        files[f"confusion-{model.key}"] = confusion_png(
            data, y_test, pred, out / f"confusion-{model.key}.png",
            f"{model.name}: held-out ensemble, {len(test)} images")

    result = FusionResult(pd.DataFrame(rows), pd.DataFrame(fold_rows), pd.DataFrame(predictions),
                          out, files=files)
    result.table.to_csv(out / "results.csv", index=False, float_format="%.4f")
    result.folds.to_csv(out / "folds.csv", index=False, float_format="%.4f")
    result.predictions.to_csv(out / "predictions.csv", index=False)
    (out / "results.md").write_text(result.markdown() + "\n")
    fused = [m for m in models if m.kind == "torch" and m.use_image and m.use_meta]
    if config.explain and fused:
        result.explanation = explain_folds(data, dev, test, folds, fused[0], nets[fused[0].key],
                                      config, out, files)
        if config.gradcam_images:
            picks = test[spread_picks(y_test, config.gradcam_images, config.seed)]
            for model in models:
                if model.kind == "torch" and model.use_image and model.convolutional:
                    files[f"gradcam-{model.key}"] = gradcam_png(
                        data, picks, folds, nets[model.key], model, out / f"gradcam-{model.key}.png")
    return result


