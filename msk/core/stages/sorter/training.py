"""The anatomical sorter: weak region labels -> a supervised classifier, cross-validated by patient.

The SAM-X workflow's last step. DeepCluster (:mod:`msk.core.models.deepcluster`) trained an encoder
without labels, a person named its clusters (:mod:`msk.core.stages.cluster.labelling`), and the resulting weak
label per image now fine-tunes *the same network* (``init`` = the DeepCluster checkpoint) as a
region classifier:

* **splits** (:func:`plan_splits`): a fixed, patient-level, class-stratified **test set**
  (``test_size``, 20 %), and ``folds``-fold patient-level cross-validation over the remaining
  patients (5 folds of 80 %: 64 % train and 16 % validation per fold; ``folds: 4`` gives exactly
  60/20/20). No patient is on two sides of any split;
* **training**: one :func:`msk.core.models.train.fit_classifier` run per fold in ``out/fold-k/``
  (in this process or as a Ray Train ``TorchTrainer``, a checkpoint per epoch, ``best.pt`` by
  validation loss). A rerun skips finished folds and resumes an interrupted one;
* **evaluation**: every fold model on the test set (top-1, top-2) and their ensemble (mean of
  the softmax outputs), a confusion matrix PNG, the same on an optional external hold-out, and
  Grad-CAM overlays averaged over the fold models (:mod:`msk.core.models.gradcam`);
* **unknown inputs** (:mod:`msk.core.models.ood`): a threshold on the ensemble's score, calibrated on
  the out-of-fold validation images to keep ``ood_keep`` of them; the ensemble answers
  ``unknown`` below it. The default score (``mahalanobis``) keeps per fold the class means and
  shared covariance of the training features (``fold-k/ood_density.npz``). A rerun of a run finished before
  calibration existed calibrates it without retraining.

Labels come from a CSV ``image_id,label`` (the ``row,image_id,label`` weak labels that
``msk clusters apply`` writes, or any such file) or, with the DeepCluster run folder, straight
from the filled-in cluster labels file. See ``docs/sorter.md``.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from msk.core.data.labelled import LabelledImages, ingest_info, load_labelled
from msk.core.data.splits import CrossValidation, patients_per_class, plan_from_parts, plan_splits
from msk.core.data.squaring import recorded_squaring
from msk.core.errors import TrainingDataError
from msk.core.io.checkpoint import CheckpointError
from msk.core.models.metrics import softmax
from msk.core.models.ood import FEATURE_SCORES, FeatureDensity, UnknownCalibration, calibrate
from msk.core.models.sorter import DENSITY_FILE, SorterEnsemble, SorterError, logits_and_features
from msk.core.models.train import TrainConfig, TrainError, build_classifier, fit_classifier, load_model, predict_logits
from msk.core.runtime.progress import follow_history, progress_bar

__all__ = [
    "Evaluation", "FoldResult", "SorterConfig", "SorterResult", "calibrate_unknown",
    "init_from_weak_labels", "sorter_from_ingest", "train_sorter",
]

#: Options that may differ between a sorter run and its resumption in the same folder.
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "num_workers", "use_gpu", "max_failures", "gradcam_images",
                               "keep_checkpoints", "ood_keep", "ood_score"})


class SorterConfig(TrainConfig):
    """Options of ``msk train sorter``: the training options of :class:`TrainConfig` plus the
    evaluation design. ``init`` is the DeepCluster checkpoint to fine-tune."""

    region_set: str = Field("samx-regions", description="entity set the labels must belong to")
    folds: int = Field(5, ge=2, description="patient-level cross-validation folds")
    test_size: float = Field(0.2, gt=0, lt=1, description="share of patients in the fixed test set")
    small_classes: Literal["error", "drop"] = Field(
        "error", description="a class with fewer than folds + 1 patients: stop, or leave it out")
    gradcam_images: int = Field(16, ge=0, description="test images with a Grad-CAM overlay")
    num_workers: int = Field(1, ge=0, description="Ray Train workers per fold; 0 runs in this process")
    ood_score: Literal["mahalanobis", "msp", "energy"] = Field(
        "mahalanobis", description="score of 'not an image like the training images': mahalanobis "
        "(feature distance to the nearest class mean), msp (max softmax of the fold ensemble) or "
        "energy (mean log-sum-exp of the fold logits); see docs/sorter.md, 'Unknown inputs'")
    ood_keep: float = Field(0.95, gt=0, le=1, description="share of the out-of-fold validation "
                            "images scored at or above the 'unknown' threshold")
    splits_from: Path | None = Field(None, description="an earlier run's splits.csv: reuse its test "
                                     "set and folds (by image id) instead of drawing them, e.g. to "
                                     "compare two label files on the same test patients; it must "
                                     "name every image of this run, and may name more")

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` part, as each fold's run is given it."""
        return TrainConfig.model_validate(self.model_dump(include=set(TrainConfig.model_fields)))


# -- labelled images ---------------------------------------------------------------------------


# -- splits ------------------------------------------------------------------------------------


def _check_classes(data: LabelledImages, config: SorterConfig) -> tuple[LabelledImages, dict[str, int]]:
    """Enforce ``folds + 1`` patients per class: raise, or drop the class (``small_classes``)."""
    need = config.folds + 1
    per_class = patients_per_class(data.patient_ids, data.labels)
    small = {c: n for c, n in per_class.items() if n < need}
    dropped: dict[str, int] = {}
    if small:
        images = Counter(data.labels)
        listing = ", ".join(f"{c!r} ({images[c]} images, {n} patients)" for c, n in sorted(small.items()))
        if config.small_classes == "error":
            raise SorterError(
                f"{len(small)} class(es) have fewer than {need} patients, the least that one test "
                f"patient and {config.folds} validation folds need: {listing}. Label more images, "
                "lower folds, merge the class into a neighbour in the labels file, or set "
                "small_classes: drop")
        keep = [i for i, c in enumerate(data.labels) if c not in small]
        dropped = {c: images[c] for c in sorted(small)}
        data = data.subset(keep)
        data.notes.append(f"left out {sum(dropped.values())} images of {len(dropped)} small "
                          f"class(es): {listing}")
    if len(set(data.labels)) < 2:
        raise SorterError(f"the labels name {len(set(data.labels))} class(es); a sorter needs two "
                          "or more")
    return data, dropped


# -- evaluation --------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Scores of the fold models and their ensemble on one labelled set.

    :param fold_top1: top-1 accuracy of each fold model; ``fold_top2`` likewise.
    :param top1: top-1 accuracy of the ensemble (mean softmax); ``top2`` likewise.
    :param confusion: ensemble confusion counts ``[C, C]``, rows true, in ``classes`` order.
    :param left_out: images of classes the sorter was not trained on, per class (not scored).
    :param unknown: share of the scored images the ensemble calls ``unknown`` (None: the
        sorter has no calibrated threshold).
    """

    name: str
    n: int
    fold_top1: list[float]
    fold_top2: list[float]
    top1: float
    top2: float
    macro_f1: float
    confusion: np.ndarray
    confusion_png: Path
    predictions_csv: Path
    left_out: dict[str, int] = field(default_factory=dict)
    unknown: float | None = None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "n": self.n, "top1": self.top1, "top2": self.top2,
                "macro_f1": self.macro_f1, "unknown": self.unknown, "fold_top1": self.fold_top1,
                "fold_top2": self.fold_top2, "left_out": self.left_out,
                "confusion_png": self.confusion_png.name, "predictions_csv": self.predictions_csv.name}


def _evaluate(name: str, data: LabelledImages, ensemble: SorterEnsemble, out: Path) -> Evaluation:
    from msk.core.models.metrics import confusion_matrix, confusion_matrix_png, macro_f1, top_k_accuracy

    classes = ensemble.classes
    unknown = Counter(c for c in data.labels if c not in classes)
    if unknown:
        data = data.subset([i for i, c in enumerate(data.labels) if c in classes])
    if not len(data):
        raise SorterError(f"{name}: no image of a class the sorter was trained on "
                          f"({', '.join(sorted(unknown))} only)")
    y = np.array([classes.index(c) for c in data.labels])
    logits, features = ensemble.fold_outputs(data.images)
    per_fold = softmax(logits)
    probs = per_fold.mean(axis=0)
    scores = ensemble.scores_of(logits, features)
    known = ensemble.known(scores)
    k2 = min(2, len(classes))
    order = np.argsort(-probs, axis=1)
    predicted = [classes[i] for i in order[:, 0]]
    cm = confusion_matrix(data.labels, predicted, classes)
    png = confusion_matrix_png(cm, classes, out / f"confusion_{name}.png",
                               title=f"sorter, {name} ({len(ensemble.models)}-fold ensemble, "
                                     f"{len(y)} images)")
    csv_path = out / f"predictions_{name}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "patient_id", "label", "predicted", "second", "probability",
                         "score", "unknown"])
        for i in range(len(y)):
            writer.writerow([data.image_ids[i], data.patient_ids[i], data.labels[i], predicted[i],
                             classes[order[i, 1]] if len(classes) > 1 else "",
                             f"{probs[i, order[i, 0]]:.4f}", f"{scores[i]:.6g}", int(not known[i])])
    return Evaluation(
        name, len(y),
        [round(top_k_accuracy(p, y, 1), 4) for p in per_fold],
        [round(top_k_accuracy(p, y, k2), 4) for p in per_fold],
        round(top_k_accuracy(probs, y, 1), 4), round(top_k_accuracy(probs, y, k2), 4),
        round(macro_f1(data.labels, predicted, labels=classes), 4), cm, png, csv_path,
        dict(sorted(unknown.items())),
        None if ensemble.unknown is None else round(float((~known).mean()), 4))


# -- the trained sorter ------------------------------------------------------------------------


# -- training ----------------------------------------------------------------------------------


@dataclass
class FoldResult:
    """One fold's run: its folder, best epoch, and sizes."""

    fold: int
    out: Path
    best_epoch: int
    val_top1: float
    n_train: int
    n_val: int
    skipped: bool = False


@dataclass
class SorterResult:
    """Outcome of :func:`train_sorter`; also written to ``out/sorter.json``."""

    out: Path
    classes: list[str]
    folds: list[FoldResult]
    test: Evaluation
    holdout: Evaluation | None
    gradcam: Path | None
    dropped: dict[str, int]
    notes: list[str]
    unknown: UnknownCalibration | None = None

    def table(self):
        """Per-fold and ensemble scores as a rich table."""
        from rich.table import Table

        table = Table(title=f"sorter: {len(self.classes)} classes, {self.test.n} test images",
                      title_justify="left")
        for name in ("model", "best epoch", "val top-1", "test top-1", "test top-2"):
            table.add_column(name, justify="right")
        if self.holdout is not None:
            table.add_column("hold-out top-1", justify="right")
            table.add_column("hold-out top-2", justify="right")
        for i, f in enumerate(self.folds):
            row = [f"fold {f.fold}", str(f.best_epoch), f"{f.val_top1:.3f}",
                   f"{self.test.fold_top1[i]:.3f}", f"{self.test.fold_top2[i]:.3f}"]
            if self.holdout is not None:
                row += [f"{self.holdout.fold_top1[i]:.3f}", f"{self.holdout.fold_top2[i]:.3f}"]
            table.add_row(*row)
        row = ["[b]ensemble[/b]", "", "", f"[b]{self.test.top1:.3f}[/b]", f"[b]{self.test.top2:.3f}[/b]"]
        if self.holdout is not None:
            row += [f"[b]{self.holdout.top1:.3f}[/b]", f"[b]{self.holdout.top2:.3f}[/b]"]
        table.add_row(*row)
        if self.unknown is not None:
            u = self.unknown
            table.caption = (f"unknown below {u.score} {u.threshold:.4g} (keeps {u.kept:.1%} of "
                             f"{u.n_images} out-of-fold validation images; target {u.keep:.0%}); "
                             f"test images called unknown: {self.test.unknown:.1%}")
            table.caption_justify = "left"
        return table


def _check_resumable(out: Path, config, resumable: frozenset[str] = RESUMABLE_CHANGES,
                     what: str = "sorter") -> None:
    """Raise :class:`SorterError` if ``out/config.yaml`` differs from ``config`` outside
    ``resumable``."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return
    import yaml

    saved = yaml.safe_load(saved_path.read_text()) or {}
    changed = sorted(k for k, v in config.model_dump(mode="json").items()
                     if k not in resumable and k in saved and saved[k] != v)
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {v!r}" for k in changed
                            for v in [config.model_dump(mode="json")[k]])
        raise SorterError(f"{out} holds a {what} run with other options ({details}); use a new "
                          f"output folder, or the same options (only "
                          f"{', '.join(sorted(resumable))} may change)")


def _write_splits(out: Path, data: LabelledImages, plan: CrossValidation) -> None:
    """Write ``out/splits.csv``, or check that an earlier run's is the same."""
    part, fold = plan.parts(len(data))
    rows = [[data.image_ids[i], data.patient_ids[i], data.labels[i], part[i],
             "" if fold[i] is None else str(fold[i])] for i in range(len(data))]
    header = ["image_id", "patient_id", "label", "part", "val_fold"]
    path = out / "splits.csv"
    if path.is_file():
        with path.open(newline="") as f:
            saved = list(csv.reader(f))
        if saved != [header, *rows]:
            raise SorterError(f"{path} was written for other images or labels than this run's; "
                              "use a new output folder for new data")
        return
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def _read_splits(path: Path, data: LabelledImages, folds: int) -> CrossValidation:
    """The test set and folds an earlier run's ``splits.csv`` (:func:`_write_splits`) gives the
    images of ``data``, by image id; its labels and the images it names beyond ``data`` are ignored."""
    try:
        with Path(path).open(newline="") as f:
            rows = {r["image_id"]: r for r in csv.DictReader(f)}
    except (OSError, KeyError, csv.Error, UnicodeDecodeError) as exc:
        raise SorterError(f"splits_from {path}: not a readable splits.csv ({exc})") from exc
    missing = [i for i in data.image_ids if i not in rows]
    if missing:
        raise SorterError(f"splits_from {path}: {len(missing)} of this run's {len(data)} images are not in it "
                          f"(e.g. {missing[0]}); it must come from a run on the same images")
    try:
        parts = [(rows[i]["part"], int(rows[i]["val_fold"]) if rows[i]["val_fold"] else None)
                 for i in data.image_ids]
        return plan_from_parts(data.patient_ids, parts, folds)
    except (KeyError, ValueError, TrainingDataError) as exc:
        raise SorterError(f"splits_from {path}: {exc}") from exc


def _train_fold(k: int, data: LabelledImages, y: np.ndarray, train: np.ndarray, val: np.ndarray,
                classes: list[str], config: SorterConfig, out: Path,
                extra: tuple[np.ndarray, np.ndarray] | None = None) -> FoldResult:
    fold_out = out / f"fold-{k}"
    marker = fold_out / "fold.json"
    budget = {"epochs": config.epochs, "patience": config.patience,
              "extra_train": 0 if extra is None else len(extra[1])}
    if marker.is_file() and (fold_out / "best.pt").is_file():
        done = json.loads(marker.read_text())
        if done.get("budget") == budget:
            return FoldResult(k, fold_out, done["best_epoch"], done["val_top1"], len(train),
                              len(val), skipped=True)
    try:
        images, labels = data.images[train], y[train]
        if extra is not None:
            images, labels = np.concatenate([images, extra[0]]), np.concatenate([labels, extra[1]])
        squaring = ingest_info(data, out)
        record = {"task": "sorter", "entity_set": config.region_set, "data": {"source": data.source or None},
                  "squaring": recorded_squaring(squaring)}
        result = fit_classifier(images, labels, len(classes), config.train_config(), out=fold_out,
                                val=(data.images[val], y[val]), classes=classes, record=record)
    except (TrainError, CheckpointError) as exc:
        raise SorterError(f"fold {k} ({fold_out}): {exc}") from exc
    logits = predict_logits(result.model, data.images[val], image_size=config.image_size)
    val_top1 = round(float((logits.argmax(1) == y[val]).mean()), 4)
    marker.write_text(json.dumps({"fold": k, "best_epoch": result.best_epoch, "val_top1": val_top1,
                                  "n_train": len(train), "n_val": len(val), "budget": budget}))
    return FoldResult(k, fold_out, result.best_epoch, val_top1, len(train), len(val))


def _extra_training(extra: LabelledImages | None, data: LabelledImages,
                    classes: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(images, class indices)`` of the ``extra_train`` images of ``classes``; notes what
    was left out on ``data``."""
    if extra is None:
        return None
    if extra.images.shape[1:] != data.images.shape[1:]:
        raise SorterError(f"extra training images ({extra.source}) are {extra.images.shape[1:]}, the "
                          f"labelled images {data.images.shape[1:]}: ingest both at one image size")
    keep = [i for i, c in enumerate(extra.labels) if c in classes]
    if not keep:
        raise SorterError(f"no extra training image ({extra.source}) is of a class the sorter trains "
                          f"on ({', '.join(classes)})")
    data.notes.append(f"every fold also trained on {len(keep)} images of {extra.source or 'an extra set'}"
                      + (f" ({len(extra) - len(keep)} of other classes left out)" if len(keep) < len(extra) else ""))
    return extra.images[keep], np.array([classes.index(extra.labels[i]) for i in keep], dtype=np.int64)


def _gradcam(data: LabelledImages, ensemble: SorterEnsemble, count: int, out: Path) -> Path | None:
    """Overlays of the fold-averaged Grad-CAM of the ensemble's prediction, ``count`` images
    taken round-robin over the classes (deterministic)."""
    from PIL import Image

    from msk.core.models.gradcam import mean_cam, overlay, save_overlays

    if count == 0 or not len(data):
        return None
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(data.labels):
        by_class[c].append(i)
    queues = [by_class[c] for c in ensemble.classes if by_class[c]]
    picked: list[int] = []
    for rank in range(max(len(q) for q in queues)):
        picked += [q[rank] for q in queues if rank < len(q)]
    chosen = np.array(sorted(picked[:count]))
    images = data.images[chosen]
    probs = ensemble.predict_proba(images)
    targets = probs.argmax(axis=1)
    cams = mean_cam(ensemble.models, images, targets, image_size=ensemble.image_size)
    folder = out / "gradcam"
    folder.mkdir(parents=True, exist_ok=True)
    titles = []
    for j, i in enumerate(chosen):
        pred = ensemble.classes[targets[j]]
        titles.append(f"{data.labels[i]} -> {pred} ({probs[j, targets[j]]:.2f})")
        Image.fromarray(overlay(images[j], cams[j])).save(folder / f"{data.image_ids[i]}.png")
    np.savez_compressed(folder / "cams.npz", image_ids=np.array([data.image_ids[i] for i in chosen]),
                        cams=cams.astype(np.float16), targets=targets)
    return save_overlays(images, cams, out / "gradcam.png", titles=titles,
                         title=f"Grad-CAM, mean of {len(ensemble.models)} fold models "
                               "(label -> predicted)")


def _check_external(data: LabelledImages, holdout: LabelledImages) -> None:
    from msk.core.data.splits import PatientOverlapError, assert_disjoint_patients

    try:
        assert_disjoint_patients(data.patient_ids, holdout.patient_ids)
    except PatientOverlapError as exc:
        raise SorterError(f"the external hold-out {holdout.source} shares patients with the "
                          f"training data {data.source}: {exc}") from exc


def calibrate_unknown(models: Sequence, data: LabelledImages, y: np.ndarray, plan: CrossValidation,
                      config: SorterConfig, out: Path | None = None):
    """``(calibration, densities)``: the ``unknown`` threshold of a run
    (:func:`msk.core.models.ood.calibrate`). Fold model ``k`` scores the validation images of fold
    ``k``, and the threshold keeps ``config.ood_keep`` of them. A feature score first fits each
    fold model's :class:`FeatureDensity` on its training images (saved as
    ``out/fold-k/ood_density.npz``); ``densities`` is None for the other scores."""
    if config.ood_score not in FEATURE_SCORES:
        val_logits = [predict_logits(model, data.images[val], image_size=config.image_size)
                      for model, (_, val) in zip(models, plan.folds)]
        return calibrate(val_logits, score=config.ood_score, keep=config.ood_keep), None
    densities, val_logits, val_features = [], [], []
    for k, (model, (train, val)) in enumerate(zip(models, plan.folds), 1):
        _, train_features = logits_and_features(model, data.images[train], config.image_size)
        densities.append(FeatureDensity.fit(train_features, y[train]))
        if out is not None:
            densities[-1].save(out / f"fold-{k}" / DENSITY_FILE)
        logits, features = logits_and_features(model, data.images[val], config.image_size)
        val_logits.append(logits)
        val_features.append(features)
    calibration = calibrate(val_logits, score=config.ood_score, keep=config.ood_keep,
                            val_features=val_features, densities=densities)
    return calibration, densities


def prepare_sorter_data(data: LabelledImages, config: SorterConfig):
    """``(data, dropped, classes, y, plan)``: the images :func:`train_sorter` keeps (small
    classes dropped or refused as configured), their class names in region-set order, class
    indices, and the patient-level test set + folds. Tuning trains on ``plan.folds[0]``."""
    from msk.core.registry import entity_set

    entities = entity_set(config.region_set)
    outside = sorted({c for c in data.labels if c not in entities.names})
    if outside:
        raise SorterError(f"{data.source}: labels {outside} are not regions of {entities.name}")
    data, dropped = _check_classes(data, config)
    classes = [c for c in entities.names if c in set(data.labels)]
    y = np.array([classes.index(c) for c in data.labels], dtype=np.int64)
    if config.splits_from is not None:
        plan = _read_splits(config.splits_from, data, config.folds)
    else:
        plan = plan_splits(data.patient_ids, data.labels, folds=config.folds,
                           test_size=config.test_size, seed=config.seed)
    return data, dropped, classes, y, plan


def train_sorter(data: LabelledImages, config: SorterConfig | None = None, *,
                 out: str | os.PathLike, holdout: LabelledImages | None = None,
                 extra_train: LabelledImages | None = None,
                 progress: bool = True) -> SorterResult:
    """Cross-validate a region sorter on ``data`` and evaluate it; see the module docstring.

    :param holdout: an external labelled set (another ingest), scored like the test set.
    :param extra_train: images added to the training part of every fold and never validated
        or tested on, e.g. synthetic images next to real ones (so the sorter is scored on real
        images only); those of classes ``data`` does not keep are left out (noted).
    :param out: run folder::

        config.yaml  splits.csv  sorter.json  fold-k/ (a train.py run: checkpoints/, best.pt,
        history.csv, fold.json)  confusion_test.png  predictions_test.csv  gradcam.png
        gradcam/  [confusion_holdout.png  predictions_holdout.csv]

    A rerun with the same ``out`` skips finished folds and resumes an interrupted one; other
    options than :data:`RESUMABLE_CHANGES` are an error. The ``unknown`` threshold
    (:func:`calibrate_unknown`) is fitted after the folds, before the test set is scored, so a
    rerun of a finished run only recalibrates and re-evaluates.
    """
    config = config or SorterConfig()
    out = Path(out).absolute()
    if holdout is not None:
        _check_external(data, holdout)
    data, dropped, classes, y, plan = prepare_sorter_data(data, config)
    extra = _extra_training(extra_train, data, classes)
    out.mkdir(parents=True, exist_ok=True)
    _check_resumable(out, config)
    try:
        build_classifier(config.train_config(), len(classes))  # a bad init fails here, not in fold 1
    except CheckpointError as exc:
        raise SorterError(f"cannot fine-tune from init={config.init}: {exc}") from exc
    _write_splits(out, data, plan)
    (out / "config.yaml").write_text(config.to_yaml())

    folds = []
    with _progress(progress) as bar:  # one step per epoch of every fold
        task = bar.add_task(f"sorter: {config.folds} folds", total=config.folds * config.epochs)
        for k, (train, val) in enumerate(plan.folds, 1):
            bar.update(task, description=f"sorter: fold {k}/{config.folds} ({len(train)} train, "
                                         f"{len(val)} val images), epochs")
            with follow_history(bar, task, out / f"fold-{k}" / "history.csv", (k - 1) * config.epochs):
                folds.append(_train_fold(k, data, y, train, val, classes, config, out, extra))
            bar.update(task, completed=k * config.epochs)  # early stopping ends a fold sooner

    models = [load_model(f.out / "best.pt")[0] for f in folds]
    unknown, densities = calibrate_unknown(models, data, y, plan, config, out)
    ensemble = SorterEnsemble(models, classes, config.image_size, unknown, densities)
    test = _evaluate("test", data.subset(plan.test), ensemble, out)
    held = _evaluate("holdout", holdout, ensemble, out) if holdout is not None else None
    cam = _gradcam(data.subset(plan.test), ensemble, config.gradcam_images, out)
    notes = list(data.notes) + (list(holdout.notes) if holdout is not None else [])
    result = SorterResult(out, classes, folds, test, held, cam, dropped, notes, unknown)
    (out / "sorter.json").write_text(json.dumps({
        "classes": classes, "folds": config.folds, "image_size": config.image_size,
        "n_images": len(data), "n_test": len(plan.test), "dropped": dropped, "notes": notes,
        "unknown": unknown.to_json(), "ingest": ingest_info(data, out),
        "fold_results": [{"fold": f.fold, "best_epoch": f.best_epoch, "val_top1": f.val_top1,
                          "n_train": f.n_train, "n_val": f.n_val} for f in folds],
        "test": test.summary(), "holdout": held.summary() if held else None,
    }, indent=2))
    from msk.core.stages.sorter.report import write_sorter_report

    write_sorter_report(out)  # report.html: the numbers and pictures above, in msk's look
    return result


def init_from_weak_labels(config: SorterConfig, labels: str | os.PathLike) -> tuple[SorterConfig, str | None]:
    """``config`` starting from the DeepCluster run the weak labels came from, and a line saying so.

    When ``init`` is not set (nor pretrained weights) and ``labels`` was written by
    ``msk clusters apply`` / ``label`` (:func:`msk.core.io.labels.weak_labels_run`), ``init``
    becomes that run's last checkpoint and ``encoder`` its architecture (unless ``encoder`` is
    set to another one: then training starts from random weights, as the line says). Otherwise
    ``config`` is returned unchanged, with a line only where something could not be done.
    """
    if "init" in config.model_fields_set or config.encoder_options.get("pretrained"):
        return config, None
    from msk.core.io.checkpoint import load_checkpoint
    from msk.core.io.labels import weak_labels_run
    from msk.core.models.deepcluster import latest_checkpoint

    run = weak_labels_run(labels)
    if run is None:
        return config, None
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        return config, (f"{labels} came from the DeepCluster run {run}, which holds no checkpoint: "
                        "training starts from random weights")
    arch = load_checkpoint(checkpoint).arch
    if "encoder" in config.model_fields_set and config.encoder != arch:
        return config, (f"{labels} came from the DeepCluster run {run}, whose encoder is {arch!r}, not "
                        f"{config.encoder!r}: training starts from random weights (drop --encoder to "
                        "start from that run)")
    data = {**config.model_dump(exclude_unset=True), "init": str(checkpoint), "encoder": arch}
    return type(config).model_validate(data), (
        f"init: {checkpoint}, the last checkpoint of the DeepCluster run the weak labels came from "
        "(--init random trains from scratch)")


def sorter_from_ingest(ingest: str | os.PathLike, labels: str | os.PathLike,
                       config: SorterConfig | None = None, *, out: str | os.PathLike,
                       cluster_run: str | os.PathLike | None = None,
                       holdout_ingest: str | os.PathLike | None = None,
                       holdout_labels: str | os.PathLike | None = None,
                       progress: bool = True) -> SorterResult:
    """:func:`train_sorter` on the labelled images of an ingest output (``msk train sorter``).

    :param labels: weak labels CSV (``row,image_id,label`` or ``image_id,label``), or with
        ``cluster_run`` the filled-in cluster labels file.
    :param holdout_ingest: a second ingest output with ``holdout_labels`` (``image_id,label``),
        the external hold-out.
    """
    config = config or SorterConfig()
    if (holdout_ingest is None) != (holdout_labels is None):
        raise SorterError("an external hold-out needs both its ingest folder and its labels file")
    data = load_labelled(ingest, labels, entity_set=config.region_set, cluster_run=cluster_run)
    holdout = None
    if holdout_ingest is not None and holdout_labels is not None:  # both or neither (above)
        holdout = load_labelled(holdout_ingest, holdout_labels, entity_set=config.region_set)
    return train_sorter(data, config, out=out, holdout=holdout, progress=progress)


def _progress(enabled: bool):
    """The fold/epoch progress bar (:func:`msk.core.runtime.progress.progress_bar`; disabled: shows nothing)."""
    return progress_bar(enabled, description="{task.description}")
