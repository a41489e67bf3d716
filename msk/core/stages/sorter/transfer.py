"""Transfer learning: does a pretrained encoder help a small labelled downstream task?

Each **arm** fine-tunes the same classifier (:func:`msk.core.models.train.fit_classifier`) from a
different starting point: ``random`` initialisation, the DeepCluster checkpoint, the sorter's
checkpoint, any other msk checkpoint, or weights from outside msk, ``pretrained:FILE`` or
``pretrained:hf-hub:org/name`` (e.g. ImageNet weights, :mod:`msk.core.models.pretrained`). All arms see the
same patient-level folds (stratified group k-fold over patients, every patient in exactly one test fold),
the same options and the same budget: a fixed number of epochs without early stopping, the last epoch evaluated. Every
image is thus predicted once per arm by a model that never saw its patient, and the arms are
compared on these out-of-fold predictions (pooled) and per fold (mean and spread).

A task is **flat** (one classifier over all labels) or a two-phase **cascade**: phase 1 tells
``normal`` from pathological images, phase 2, trained on the pathological images only, tells
the entities apart; an image phase 1 calls pathological gets phase 2's entity. Losses are
class-balanced by median frequency (``class_weighting``). Reported: accuracy, balanced accuracy,
macro F1, sensitivity and specificity (of ``positive`` for two classes, else the mean over
classes one-vs-rest) and, for two classes, the ROC AUC. See ``docs/sorter.md``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from msk.core.data.labelled import LabelledImages, load_labelled
from msk.core.data.splits import patients_per_class
from msk.core.io.checkpoint import CheckpointError, load_checkpoint
from msk.core.models.metrics import softmax
from msk.core.models.pretrained import PretrainedError
from msk.core.models.sorter import SorterError
from msk.core.models.train import TrainConfig, TrainError, build_classifier, fit_classifier, predict_logits
from msk.core.stages.sorter.training import _check_resumable, _progress

__all__ = ["ArmResult", "TransferConfig", "TransferError", "TransferResult", "binary_rates",
           "class_rates", "run_transfer", "task_metrics", "transfer_from_ingest"]

#: Options that may differ between a transfer run and its resumption in the same folder (arms
#: may be added; an arm's start may not change).
RESUMABLE_CHANGES = frozenset({"arms", "num_workers", "use_gpu", "max_failures", "keep_checkpoints"})

#: Label of phase 1's positive class in a cascade.
PATHOLOGICAL = "pathological"

#: Prefix of an arm that starts from weights outside msk (``pretrained:FILE`` or a hub id).
PRETRAINED = "pretrained:"


class TransferError(SorterError):
    """A transfer-learning task or run folder that cannot be used."""


class TransferConfig(TrainConfig):
    """Options of ``msk train transfer``: the training options of :class:`TrainConfig`, shared
    by all arms, plus the arms and the task. ``patience`` must stay unset (same budget)."""

    init: Literal["random"] = Field("random", description="unused: each arm sets its own (see arms)")
    arms: dict[str, str] = Field(
        {"random": "random"}, description="arm name -> 'random', an msk checkpoint to start from, or "
                                          "'pretrained:' + a weights file or hub id (ImageNet weights)")
    entity_set: str | None = Field("bone-tumours", description="entity set of the labels (None: any label)")
    normal_label: str = Field("normal", description="label of images without a lesion")
    cascade: bool = Field(False, description="phase 1 normal vs pathological, phase 2 entity vs entity")
    positive: str | None = Field(None, description="class whose sensitivity is reported in a two-class task")
    folds: int = Field(5, ge=2, description="patient-level folds; each is the test set once")
    class_weighting: Literal["none", "median_frequency"] = Field(
        "median_frequency", description="loss weights per class: median frequency balancing (Eigen & Fergus)")
    num_workers: int = Field(0, ge=0, description="Ray Train workers per run; 0 runs in this process")

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, arms: dict[str, str]) -> dict[str, str]:
        if not arms:
            raise ValueError("name at least one arm, e.g. {random: random}")
        bad = [n for n in arms if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", n)]
        if bad:
            raise ValueError(f"arm names become folder names; use letters, digits, '_', '-', '.': {bad}")
        return arms

    @field_validator("patience")
    @classmethod
    def _same_budget(cls, patience: int | None) -> int | None:
        if patience is not None:
            raise ValueError("arms are compared at the same budget: leave patience unset")
        return patience

    @field_validator("encoder_options")
    @classmethod
    def _pretrained_per_arm(cls, options: dict[str, Any]) -> dict[str, Any]:
        if options.get("pretrained"):
            raise ValueError("pretrained weights are an arm's start, not an option of all arms: "
                             f"drop encoder_options.pretrained and add an arm NAME: pretrained:{options['pretrained']}")
        return options

    def arm_config(self, init: str) -> TrainConfig:
        """The :class:`TrainConfig` of the arm starting from ``init`` (``'random'``, an msk
        checkpoint, or ``'pretrained:'`` + weights: random ``init`` and the encoder option
        ``pretrained``)."""
        options = self.model_dump(include=set(TrainConfig.model_fields))
        if init.startswith(PRETRAINED):
            weights = init.removeprefix(PRETRAINED)
            return TrainConfig.model_validate({**options, "init": "random", "encoder_options": {
                **options["encoder_options"], "pretrained": weights}})
        return TrainConfig.model_validate({**options, "init": init})


# -- metrics -----------------------------------------------------------------------------------


def binary_rates(y_true: Sequence[str], y_pred: Sequence[str], positive: str) -> tuple[float, float]:
    """``(sensitivity, specificity)`` of ``positive``: recall of the positive and of the other
    images; ``nan`` where a side has no image."""
    t = np.asarray(y_true) == positive
    p = np.asarray(y_pred) == positive
    sens = float((t & p).sum() / t.sum()) if t.any() else float("nan")
    spec = float((~t & ~p).sum() / (~t).sum()) if (~t).any() else float("nan")
    return sens, spec


def class_rates(y_true: Sequence[str], y_pred: Sequence[str],
                classes: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Per class, one-vs-rest ``(sensitivity, specificity)``."""
    return {c: binary_rates(y_true, y_pred, c) for c in classes}


def task_metrics(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str], *,
                 positive: str | None = None, scores: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1, sensitivity, specificity (and AUC).

    :param positive: for two classes, the class whose sensitivity is reported; otherwise
        sensitivity and specificity are the means of :func:`class_rates`.
    :param scores: for two classes, the probability of ``positive`` per image (for the AUC).
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from msk.core.models.metrics import accuracy, macro_f1

    result = {"n": len(y_true), "accuracy": accuracy(y_true, y_pred),
              "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
              "macro_f1": macro_f1(y_true, y_pred, labels=list(classes))}
    if len(classes) == 2 and positive is not None:
        result["sensitivity"], result["specificity"] = binary_rates(y_true, y_pred, positive)
        truth = np.asarray(y_true) == positive
        if scores is not None and 0 < truth.sum() < len(truth):
            result["auc"] = float(roc_auc_score(truth, scores))
    else:
        rates = np.array(list(class_rates(y_true, y_pred, classes).values()))
        result["sensitivity"], result["specificity"] = (float(v) for v in np.nanmean(rates, axis=0))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


# -- the task ----------------------------------------------------------------------------------


@dataclass
class _Task:
    """The classes of a flat task or of a cascade's two phases."""

    classes: list[str]          # final labels, in order
    phase1: list[str] | None    # [normal, pathological] (cascade)
    phase2: list[str] | None    # entities (cascade)
    positive: str | None        # flat two-class task: the class whose sensitivity is reported


def _task(labels: Sequence[str], config: TransferConfig) -> _Task:
    present = set(labels)
    normal = config.normal_label
    if config.entity_set:
        from msk.core.registry import entity_set

        order = [normal, *entity_set(config.entity_set).names]
    else:
        order = sorted(present - {normal}, key=str)
        order.insert(0, normal)
    classes = [c for c in order if c in present]
    if len(classes) < len(present):
        raise TransferError(f"labels {sorted(present - set(classes))} are neither "
                            f"{normal!r} nor entities of {config.entity_set}")
    if len(classes) < 2:
        raise TransferError(f"the labels name {len(classes)} class(es); a task needs two or more")
    if config.positive is not None and config.positive not in classes and not (
            config.cascade and config.positive == PATHOLOGICAL):
        raise TransferError(f"positive class {config.positive!r} is not among the labels {classes}")
    if not config.cascade:
        positive = config.positive or (classes[1] if len(classes) == 2 else None)
        return _Task(classes, None, None, positive)
    entities = [c for c in classes if c != normal]
    if normal not in present or len(entities) < 2:
        raise TransferError(f"a cascade needs {normal!r} images and two or more entities; the "
                            f"labels name {classes}")
    return _Task(classes, [normal, PATHOLOGICAL], entities, None)


def _folds(data: LabelledImages, config: TransferConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    from msk.core.data.splits import patient_kfold

    per_class = patients_per_class(data.patient_ids, data.labels)
    small = {c: n for c, n in sorted(per_class.items()) if n < config.folds}
    if small:
        raise TransferError(f"{config.folds} folds need every class in at least {config.folds} "
                            f"patients; too few: {small}. Label more images or lower folds")
    return list(patient_kfold(data.patient_ids, data.labels, config.folds, seed=config.seed))


# -- running the arms --------------------------------------------------------------------------


def _resolve_arms(config: TransferConfig, n_classes: int) -> dict[str, TrainConfig]:
    """Each arm's config; all arms share one architecture (sobel as the first checkpoint's)."""
    sobel = config.sobel
    for name, init in config.arms.items():
        if sobel is None and init != "random" and not init.startswith(PRETRAINED):
            try:
                sobel = bool(load_checkpoint(init).config.get("sobel", False))
            except CheckpointError as exc:
                raise TransferError(f"arm {name!r}: {exc}") from exc
    arms = {}
    for name, init in config.arms.items():
        arm = config.arm_config(init).model_copy(update={"sobel": bool(sobel)})
        try:
            build_classifier(arm, n_classes)  # a missing or unfit start fails here, before any training
        except (CheckpointError, PretrainedError) as exc:
            raise TransferError(f"arm {name!r} cannot start from {init}: {exc}") from exc
        arms[name] = arm
    return arms


def _fit_predict(images: np.ndarray, labels: Sequence[str], classes: list[str], config: TrainConfig,
                 out: Path, test_images: np.ndarray) -> np.ndarray:
    """Train on ``images`` (labels in ``classes``) in ``out``; probabilities on ``test_images``."""
    y = np.array([classes.index(c) for c in labels], dtype=np.int64)
    try:
        result = fit_classifier(images, y, len(classes), config, out=out, classes=classes, record={"task": "transfer"})
    except (TrainError, CheckpointError) as exc:
        raise TransferError(f"{out}: {exc}") from exc
    return softmax(predict_logits(result.model, test_images, image_size=config.image_size))


def _run_fold(data: LabelledImages, train: np.ndarray, test: np.ndarray, task: _Task,
              arm: TrainConfig, out: Path, start: str) -> dict[str, Any]:
    """One arm (starting from ``start``, its entry in ``arms``) on one fold; the test images'
    probabilities (per phase), saved in ``out``."""
    marker = out / "result.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done["init"] != start:
            raise TransferError(f"{out.parent} was trained from {done['init']}, the config now "
                                f"says {start}; give this start another arm name")
        return done
    labels = [data.labels[i] for i in train]
    result: dict[str, Any] = {"init": start, "test": [int(i) for i in test]}
    if task.phase1 is None:
        result["probs"] = _fit_predict(data.images[train], labels, task.classes, arm, out,
                                       data.images[test]).tolist()
    else:
        assert task.phase2 is not None  # a cascade has both phases (_task)
        normal = task.phase1[0]
        coarse = [normal if c == normal else PATHOLOGICAL for c in labels]
        result["phase1"] = _fit_predict(data.images[train], coarse, task.phase1, arm,
                                        out / "phase-1", data.images[test]).tolist()
        sick = np.array([i for i, c in zip(train, labels) if c != normal])
        result["phase2"] = _fit_predict(data.images[sick], [data.labels[i] for i in sick],
                                        task.phase2, arm, out / "phase-2", data.images[test]).tolist()
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(result))
    return result


@dataclass
class ArmResult:
    """One arm's scores: pooled over all out-of-fold predictions and per fold.

    ``metrics`` maps a part (``"task"``, or ``"phase1"``, ``"phase2"`` and ``"cascade"``) to
    :func:`task_metrics` of the pooled predictions; ``fold_accuracy`` to each fold's accuracy.
    """

    name: str
    init: str
    metrics: dict[str, dict[str, float]]
    fold_accuracy: dict[str, list[float]]
    predictions: list[str]


def _score(name: str, init: str, data: LabelledImages, folds: list[dict[str, Any]],
           task: _Task, config: TransferConfig) -> ArmResult:
    n = len(data)
    truth = np.array(data.labels, dtype=object)
    metrics: dict[str, dict[str, float]] = {}
    fold_acc: dict[str, list[float]] = {}
    final = np.empty(n, dtype=object)
    if task.phase1 is None:
        probs = np.zeros((n, len(task.classes)))
        for f in folds:
            probs[f["test"]] = f["probs"]
        final[:] = [task.classes[i] for i in probs.argmax(1)]
        pos = task.classes.index(task.positive) if task.positive else None
        metrics["task"] = task_metrics(list(truth), list(final), task.classes, positive=task.positive,
                                       scores=None if pos is None else probs[:, pos])
        fold_acc["task"] = [_acc(truth[f["test"]], final[f["test"]]) for f in folds]
    else:
        assert task.phase2 is not None  # a cascade has both phases (_task)
        normal = task.phase1[0]
        p1, p2 = np.zeros((n, 2)), np.zeros((n, len(task.phase2)))
        for f in folds:
            p1[f["test"]], p2[f["test"]] = f["phase1"], f["phase2"]
        coarse_truth = np.where(truth == normal, normal, PATHOLOGICAL)
        coarse_pred = np.where(p1[:, 1] >= 0.5, PATHOLOGICAL, normal)
        metrics["phase1"] = task_metrics(list(coarse_truth), list(coarse_pred), task.phase1,
                                         positive=PATHOLOGICAL, scores=p1[:, 1])
        sick = truth != normal
        entity_pred = np.array([task.phase2[i] for i in p2.argmax(1)], dtype=object)
        positive = config.positive if config.positive in task.phase2 else task.phase2[0]
        metrics["phase2"] = task_metrics(
            list(truth[sick]), list(entity_pred[sick]), task.phase2, positive=positive,
            scores=p2[sick, task.phase2.index(positive)] if len(task.phase2) == 2 else None)
        final[:] = np.where(coarse_pred == normal, normal, entity_pred)
        metrics["cascade"] = task_metrics(list(truth), list(final), task.classes)
        for part, (t, p) in {"phase1": (coarse_truth, coarse_pred), "cascade": (truth, final)}.items():
            fold_acc[part] = [_acc(t[f["test"]], p[f["test"]]) for f in folds]
    return ArmResult(name, init, metrics, fold_acc, list(final))


def _acc(t: np.ndarray, p: np.ndarray) -> float:
    return round(float(np.mean(t == p)), 4)


@dataclass
class TransferResult:
    """All arms side by side; written to ``out/transfer.json`` and ``out/comparison.csv``."""

    out: Path
    classes: list[str]
    cascade: bool
    arms: list[ArmResult]

    @property
    def reference(self) -> ArmResult | None:
        """The first arm that starts from random weights: what the others are compared with."""
        return next((a for a in self.arms if a.init == "random"), None)

    def rows(self) -> list[dict[str, Any]]:
        """One row per arm and part: pooled metrics, mean/std of the per-fold accuracy and,
        against :attr:`reference`, the pooled accuracy gap and the folds the arm did better on
        (a paired comparison: both arms saw the same patients in every fold)."""
        ref = self.reference
        rows = []
        for arm in self.arms:
            for part, m in arm.metrics.items():
                accs = arm.fold_accuracy.get(part, [])
                row = {"arm": arm.name, "init": arm.init, "part": part, **m,
                       "fold_accuracy_mean": round(float(np.mean(accs)), 4) if accs else None,
                       "fold_accuracy_std": round(float(np.std(accs)), 4) if accs else None,
                       "accuracy_gap": None, "folds_better": None}
                if ref is not None and arm is not ref:
                    row["accuracy_gap"] = round(m["accuracy"] - ref.metrics[part]["accuracy"], 4)
                    if accs:
                        better = sum(a > b for a, b in zip(accs, ref.fold_accuracy[part]))
                        row["folds_better"] = f"{better}/{len(accs)}"
                rows.append(row)
        return rows

    def table(self):
        """The comparison as a rich table."""
        from rich.table import Table

        table = Table(title=f"transfer: {' / '.join(self.classes)}"
                            f"{' (cascade)' if self.cascade else ''}", title_justify="left")
        columns = ("arm", "part", "n", "accuracy", "fold acc.", "bal. acc.", "sens.", "spec.", "AUC",
                   f"gap vs {self.reference.name}" if self.reference else "gap")
        for c in columns:
            table.add_column(c, justify="left" if c in ("arm", "part") else "right")
        for r in self.rows():
            fold = "-"
            if r["fold_accuracy_mean"] is not None:
                fold = f"{r['fold_accuracy_mean']:.3f} ± {r['fold_accuracy_std']:.3f}"
            gap = "-"
            if r["accuracy_gap"] is not None:
                gap = f"{r['accuracy_gap']:+.3f}"
                if r["folds_better"]:
                    gap += f" ({r['folds_better']} folds)"
            table.add_row(r["arm"], r["part"], str(r["n"]), f"{r['accuracy']:.3f}", fold,
                          f"{r['balanced_accuracy']:.3f}", _fmt(r["sensitivity"]),
                          _fmt(r["specificity"]), _fmt(r.get("auc")), gap)
        return table


def _fmt(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def run_transfer(data: LabelledImages, config: TransferConfig | None = None, *,
                 out: str | os.PathLike, progress: bool = True) -> TransferResult:
    """Fine-tune every arm of ``config`` on ``data`` over the same folds and compare them.

    :param out: run folder: ``config.yaml``, ``folds.csv``, ``<arm>/fold-k/`` (a
        :mod:`msk.core.models.train` run, or ``phase-1/`` and ``phase-2/`` runs for a cascade, plus
        ``result.json`` with the test fold's probabilities), ``transfer.json`` and
        ``comparison.csv``. A rerun skips the finished (arm, fold) pairs.
    """
    import csv

    config = config or TransferConfig()
    out = Path(out).absolute()
    task = _task(data.labels, config)
    folds = _folds(data, config)
    arms = _resolve_arms(config, len(task.classes))
    out.mkdir(parents=True, exist_ok=True)
    _check_resumable(out, config, RESUMABLE_CHANGES, "transfer")
    fold_of = np.zeros(len(data), np.int64)
    for k, (_, test) in enumerate(folds, 1):
        fold_of[test] = k
    rows = [["image_id", "patient_id", "label", "test_fold"],
            *([data.image_ids[i], data.patient_ids[i], data.labels[i], str(fold_of[i])]
              for i in range(len(data)))]
    folds_csv = out / "folds.csv"
    if folds_csv.is_file():
        with folds_csv.open(newline="") as f:
            if list(csv.reader(f)) != rows:
                raise TransferError(f"{folds_csv} was written for other images or labels; use a "
                                    "new output folder for new data")
    else:
        with folds_csv.open("w", newline="") as f:
            csv.writer(f).writerows(rows)
    (out / "config.yaml").write_text(config.to_yaml())

    results = []
    with _progress(progress) as bar:
        task_id = bar.add_task("transfer", total=len(arms) * len(folds))
        for name, arm in arms.items():
            per_fold = []
            for k, (train, test) in enumerate(folds, 1):
                bar.update(task_id, description=f"transfer: arm {name}, fold {k}/{len(folds)}")
                per_fold.append(_run_fold(data, train, test, task, arm, out / name / f"fold-{k}",
                                          config.arms[name]))
                bar.advance(task_id)
            results.append(_score(name, config.arms[name], data, per_fold, task, config))

    result = TransferResult(out, task.classes, config.cascade, results)
    rows_out = result.rows()
    fields = list(dict.fromkeys(k for r in rows_out for k in r))
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows_out)
    (out / "transfer.json").write_text(json.dumps({
        "classes": task.classes, "cascade": config.cascade, "folds": config.folds,
        "n_images": len(data), "n_patients": len(set(data.patient_ids)), "rows": rows_out,
    }, indent=2))
    return result


def transfer_from_ingest(ingest: str | os.PathLike, labels: str | os.PathLike,
                         config: TransferConfig | None = None, *, out: str | os.PathLike,
                         progress: bool = True) -> TransferResult:
    """:func:`run_transfer` on the images of an ingest output labelled by a CSV
    ``image_id,label`` (labels: ``normal_label`` or names of ``entity_set``; any label when
    ``entity_set`` is None)."""
    config = config or TransferConfig()
    data = load_labelled(ingest, labels, entity_set=config.entity_set,
                         extra_labels=[config.normal_label])
    return run_transfer(data, config, out=out, progress=progress)
