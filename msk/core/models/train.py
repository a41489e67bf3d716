"""Supervised training of image models (sorter, transfer learning, baselines, fusion models).

One loop, written against :class:`msk.core.runtime.workers.Workers`, runs in this process
(``num_workers=0``) or as one Ray Train run over all epochs (``num_workers>=1``; CPU or GPU,
DDP). Every epoch it trains on an equal share of a seeded shuffle per worker, evaluates on the
validation arrays on rank 0, writes ``history.csv`` and a checkpoint (the latest
``keep_checkpoints`` are kept), keeps ``best.pt`` (lowest validation loss, or last epoch without
validation) and stops early after ``patience`` epochs without improvement: by default the run
folder keeps ``best.pt`` and the last epoch's checkpoint only, once (nothing is copied to Ray
Train's storage, see :meth:`msk.core.runtime.workers.RayWorkers.report`). A run folder that holds
checkpoints is resumed after its last epoch.

Models take ``images [B, 1, S, S]`` (normalised grey, see :mod:`msk.core.data.augment`) and, for
fusion models, ``meta [B, D]``: ``model(images)`` or ``model(images, meta)`` -> logits.
Every image is first preprocessed as ``TrainConfig.preprocess`` says
(:mod:`msk.core.data.preprocess`); the model carries that as its ``input_config`` (saved in the
checkpoint's config, restored by :func:`load_model`), and :func:`predict_logits` applies it.
Checkpoints are :mod:`msk.core.io.checkpoint` encoder checkpoints (so any trained model's encoder
can initialise the next one: DeepCluster -> sorter -> downstream task) with the rest of the model
under ``extra["head"]``.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from msk.core.config import MskConfig
from msk.core.data.augment import augmented_view, encoder_in_chans, eval_transform, input_layer, to_tensor
from msk.core.data.preprocess import AugmentConfig, InputConfig, PreprocessConfig, input_config_of
from msk.core.errors import MskError
from msk.core.io.checkpoint import CheckpointError, load_checkpoint, load_state, save_checkpoint
from msk.core.models.pretrained import weights_from_checkpoint
from msk.core.registry import build_encoder
from msk.core.runtime.workers import Workers, run_workers

__all__ = [
    "FitResult", "ImageClassifier", "TrainConfig", "TrainError", "build_classifier",
    "class_weights", "fit", "fit_classifier", "init_checkpoint", "load_model", "predict_logits",
]


class TrainError(MskError):
    """Bad training input or a run folder that cannot be resumed."""


class TrainConfig(MskConfig):
    """Options of supervised training (YAML keys of ``--config``)."""

    encoder: str = Field("resnet18", description="encoder registry name (`msk plugins encoder`)")
    encoder_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the encoder, e.g. a ViT's img_size, or "
                                          "pretrained: a weights file or hf-hub:org/name (msk.core.models.pretrained); "
                                          "recorded in checkpoints")
    init: str = Field("random", description="'random' or an msk checkpoint whose encoder starts training")
    sobel: bool | None = Field(None, description="Sobel input layer; None: as the init checkpoint (else off)")
    image_size: int = Field(128, ge=8, description="side of the network input")
    epochs: int = Field(10, ge=1, description="training epochs (per fold where there are folds)")
    batch_size: int = Field(32, ge=2, description="images per training step (per worker)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    augment: bool = Field(True, description="augment training images (the transforms of `augmentation`)")
    aug_prob: float = Field(0.8, ge=0, le=1, description="share of training images augmented")
    preprocess: PreprocessConfig = Field(
        default_factory=PreprocessConfig,
        description="intensity normalisation of every input (training, evaluation, serving); saved with the model")
    augmentation: AugmentConfig = Field(
        default_factory=AugmentConfig, description="probability and strength of each training transform")
    class_weighting: Literal["none", "median_frequency"] = Field(
        "none", description="loss weights per class: median frequency balancing (Eigen & Fergus)")
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without a better val loss")
    keep_checkpoints: int | None = Field(1, ge=1, description="epoch checkpoints kept, the latest ones "
                                         "(best.pt is kept apart): 1 keeps best + last; None: every epoch's")
    num_workers: int = Field(0, ge=0, description="Ray Train workers; 0 runs in this process")
    use_gpu: bool = Field(False, description="one GPU per worker")
    max_failures: int = Field(2, ge=0, description="Ray Train: times a run whose worker died (killed, "
                              "out of memory, node lost) is restarted; it resumes after the run folder's last "
                              "epoch checkpoint")
    seed: int = Field(0, description="seed of the splits, shuffling, augmentation and initial weights")

    @field_validator("encoder")
    @classmethod
    def _registered_encoder(cls, name: str) -> str:
        """A mistyped encoder is a config error before any data is read, naming the close ones.
        ``<segmenter>:<encoder>`` (a segmentation model, :mod:`msk.core.stages.segmentation.training`) is checked
        for its segmenter; smp checks the encoder part when it builds it."""
        from msk.core.registry import UnknownComponentError, get_registry

        kind, component = ("segmenter", name.split(":", 1)[0]) if ":" in name else ("encoder", name)
        try:
            get_registry().get(kind, component)
        except UnknownComponentError as exc:
            raise ValueError(str(exc)) from None
        return name

    @model_validator(mode="after")
    def _one_start(self):
        if self.init != "random" and self.encoder_options.get("pretrained"):
            raise ValueError("init and encoder_options.pretrained both name the starting weights (the init "
                             "checkpoint's would replace the pretrained ones); keep one")
        return self


class ImageClassifier(nn.Module):
    """Fixed input layer (Sobel or identity) -> encoder -> optional fusion head or linear head."""

    def __init__(self, encoder_name: str, num_classes: int, *, sobel: bool = False,
                 head: nn.Module | None = None, encoder_options: dict[str, Any] | None = None):
        super().__init__()
        self.encoder_name, self.sobel, self.num_classes = encoder_name, sobel, num_classes
        self.encoder_options = dict(encoder_options or {})
        self.input = input_layer(sobel)
        self.encoder = build_encoder(encoder_name, in_chans=encoder_in_chans(sobel), **self.encoder_options)
        self.head = head if head is not None else nn.Linear(self.encoder.feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.input(images))

    def forward(self, images: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.features(images)
        return self.head(feats) if isinstance(self.head, nn.Linear) else self.head(feats, meta)


def init_checkpoint(config: TrainConfig):
    """``(checkpoint or None, sobel)``: the ``config.init`` checkpoint and the input layer it
    needs (``config.sobel`` when given, which must then agree with the checkpoint)."""
    if config.init == "random":
        return None, bool(config.sobel)
    ckpt = load_checkpoint(config.init)
    saved = bool(ckpt.config.get("sobel", False))
    if config.sobel is not None and config.sobel != saved:
        raise CheckpointError(f"{config.init}: encoder was trained with sobel={saved}; "
                              f"the config asks for sobel={config.sobel}")
    trained = InputConfig.from_config({**ckpt.config, "image_size": config.image_size}).preprocess
    if trained != config.preprocess:
        import warnings

        warnings.warn(f"{config.init}: the encoder was trained on inputs preprocessed as {trained!r}; this run "
                      f"feeds {config.preprocess!r} (set `preprocess` to match, unless the change is meant)",
                      stacklevel=2)
    return ckpt, saved


def build_classifier(config: TrainConfig, num_classes: int, head: nn.Module | None = None) -> ImageClassifier:
    """The model ``config`` describes, with the encoder weights of ``config.init`` loaded."""
    ckpt, sobel = init_checkpoint(config)
    model = ImageClassifier(config.encoder, num_classes, sobel=sobel, head=head,
                            encoder_options=config.encoder_options)
    if ckpt is not None:
        load_state(model.encoder, ckpt, arch=config.encoder)
    return model


# -- data ------------------------------------------------------------------------------------


class _Arrays(Dataset):
    """``((image[, meta]), label)`` items; augmentation applied with probability ``aug_prob``.

    Every image is preprocessed with ``preprocess`` (none by default); augmented ones get the
    random view of ``augmentation`` (:func:`msk.core.data.augment.augmented_view`), the others the
    deterministic view that :func:`predict_logits` uses.
    """

    def __init__(self, images, labels, meta, image_size: int, augment: bool, aug_prob: float, seed: int,
                 *, preprocess: PreprocessConfig | None = None, augmentation: AugmentConfig | None = None):
        self.images, self.labels, self.meta = images, labels, meta
        self.plain = eval_transform(image_size, preprocess)
        self.augmented = augmented_view(image_size, augmentation or AugmentConfig(), preprocess) if augment else None
        self.aug_prob = aug_prob
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = to_tensor(self.images[i])
        use_aug = self.augmented is not None and self.rng.random() < self.aug_prob
        x = (self.augmented if use_aug else self.plain)(image)
        inputs = (x,) if self.meta is None else (x, torch.from_numpy(self.meta[i]))
        return inputs, int(self.labels[i])


def _check_arrays(images, labels, meta, what: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 3:
        raise TrainError(f"{what} images must be uint8 [N, S, S]; got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise TrainError(f"{what}: {len(labels)} labels for {len(images)} images")
    if meta is not None and (len(meta) != len(images) or not np.isfinite(meta).all()):
        raise TrainError(f"{what}: metadata must be finite with one row per image")


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Median frequency balancing: ``w_c = median(f) / f_c`` over the classes present."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = np.median(counts[present]) / counts[present]
    return weights.astype(np.float32)


# -- the loop ----------------------------------------------------------------------------------


HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_accuracy", "seconds")


@dataclass
class FitResult:
    """Outcome of :func:`fit`: the best model (on the CPU, eval mode) and the run's history."""

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    best: Path
    out: Path


def _ckpt_path(out: Path, epoch: int) -> Path:
    return out / "checkpoints" / f"epoch-{epoch:03d}.pt"


def _latest(out: Path) -> Path | None:
    files = sorted((out / "checkpoints").glob("epoch-*.pt"))
    return files[-1] if files else None


def _prune(out: Path, keep: int | None) -> None:
    """Delete all but the ``keep`` latest epoch checkpoints (a run folder per tuning trial or
    fold of a large model would otherwise hold every epoch's weights)."""
    if keep is not None:
        for old in sorted((out / "checkpoints").glob("epoch-*.pt"))[:-keep]:
            old.unlink(missing_ok=True)


def _save(path: Path, model: nn.Module, config: TrainConfig, epoch: int, **extra) -> Path:
    inner = getattr(model, "module", model)
    if getattr(inner, "architecture", None) is not None:  # e.g. a fusion model's head options
        extra["architecture"] = inner.architecture
    if getattr(inner, "encoder_options", None):  # load_model and the embedder rebuild the encoder
        extra["encoder_options"] = inner.encoder_options
    return save_checkpoint(  # the config's image_size and preprocess are the model's InputConfig
        path, inner.encoder, arch=inner.encoder_name, in_chans=encoder_in_chans(inner.sobel),
        config={**config.model_dump(mode="json"), "sobel": inner.sobel}, epoch=epoch,
        head={k: v.detach().cpu() for k, v in inner.head.state_dict().items()},
        num_classes=inner.num_classes, **extra)


def _top1_hits(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).sum())


def _evaluate(model: nn.Module, loader: DataLoader, loss_fn, device, hits=_top1_hits) -> tuple[float, float]:
    """Mean loss and mean per-item score (``hits`` sums it over a batch; top-1 by default)."""
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for inputs, y in loader:
            inputs = [t.to(device) for t in inputs]
            logits = model(*inputs)
            y = y.to(device)
            loss_sum += float(loss_fn(logits, y)) * len(y)
            correct += hits(logits, y)
            total += len(y)
    return loss_sum / max(total, 1), correct / max(total, 1)


def _loop(payload: dict[str, Any], workers: Workers) -> None:
    """All epochs on one worker; rank 0 evaluates, checkpoints and writes ``history.csv``."""
    config = TrainConfig.model_validate(payload["config"])
    out = Path(payload["out"])
    images, labels, meta = payload["images"], payload["labels"], payload.get("meta")
    items = payload.get("dataset") or _Arrays  # e.g. a segmenter's (image, mask) pairs
    torch.manual_seed(config.seed)
    resume = workers.restored_checkpoint() or _latest(out)
    with weights_from_checkpoint() if resume is not None else contextlib.nullcontext():
        model = payload["build"]()
    model.input_config = InputConfig(image_size=config.image_size, preprocess=config.preprocess)
    start, history, best_loss, best_epoch = 1, [], float("inf"), 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if resume is not None:
        ckpt = load_checkpoint(resume)
        load_state(model.encoder, ckpt, arch=model.encoder_name)
        model.head.load_state_dict(ckpt.extra["head"])
        optimizer.load_state_dict(ckpt.extra["optimizer"])
        start, history = ckpt.epoch + 1, list(ckpt.extra.get("history", []))
        best_loss, best_epoch = float(ckpt.extra.get("best_loss", best_loss)), int(ckpt.extra.get("best_epoch", 0))
    model = workers.prepare(model)
    device = workers.device
    weights = None
    if config.class_weighting == "median_frequency":
        weights = torch.from_numpy(class_weights(labels, payload["num_classes"])).to(device)
    loss_fn = payload.get("loss") or nn.CrossEntropyLoss(weight=weights)
    eval_loss = payload.get("loss") or nn.CrossEntropyLoss()
    val = None
    if payload.get("val_images") is not None and workers.rank == 0:
        val = DataLoader(items(payload["val_images"], payload["val_labels"], payload.get("val_meta"),
                                 config.image_size, False, 0.0, 0, preprocess=config.preprocess),
                         batch_size=config.batch_size)
    rank, world = workers.rank, workers.world_size
    per_worker = (len(images) // world // config.batch_size) * config.batch_size or len(images) // world
    for epoch in range(start, config.epochs + 1):
        began = time.perf_counter()
        # every random draw of an epoch (order, augmentation, dropout) depends on (seed, epoch, rank)
        # only, so a resumed run repeats the epochs an uninterrupted one would have run
        torch.manual_seed(config.seed + 7919 * epoch + rank)
        order = np.random.default_rng(config.seed + epoch).permutation(len(images))
        mine = order[rank * per_worker:(rank + 1) * per_worker]
        data = items(images[mine], labels[mine], None if meta is None else meta[mine],
                       config.image_size, config.augment, config.aug_prob, config.seed + 1000 * epoch + rank,
                       preprocess=config.preprocess, augmentation=config.augmentation)
        loader = DataLoader(data, batch_size=config.batch_size, shuffle=True, drop_last=len(mine) > config.batch_size,
                            generator=torch.Generator().manual_seed(config.seed + epoch))
        model.train()
        loss_sum, seen = 0.0, 0
        for inputs, y in loader:
            inputs = [t.to(device) for t in inputs]
            y = y.to(device)
            loss = loss_fn(model(*inputs), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        totals = workers.all_sum(np.array([loss_sum, seen], np.float64))
        row = {"epoch": epoch, "train_loss": round(float(totals[0] / max(totals[1], 1)), 5),
               "val_loss": None, "val_accuracy": None}
        stop = np.zeros(1, np.int64)
        path = None
        if rank == 0:
            inner = getattr(model, "module", model)
            if val is not None:
                row["val_loss"], row["val_accuracy"] = (
                    round(v, 5) for v in _evaluate(inner, val, eval_loss, device, payload.get("hits") or _top1_hits))
            if payload.get("score") is not None:
                inner.eval()
                with torch.no_grad():
                    row.update(payload["score"](inner))
            row["seconds"] = round(time.perf_counter() - began, 3)
            history.append(row)
            score = row["val_loss"] if row["val_loss"] is not None else -epoch
            improved = score < best_loss
            if improved:
                best_loss, best_epoch = score, epoch
            named = {"classes": payload["classes"]} if payload.get("classes") else {}
            named["record"] = _record(inner, config, payload, row)
            path = _save(_ckpt_path(out, epoch), inner, config, epoch, **named, optimizer=optimizer.state_dict(),
                         history=history, best_loss=best_loss, best_epoch=best_epoch)
            if improved:
                _save(out / "best.pt", inner, config, epoch, **named, history=history)
            _prune(out, config.keep_checkpoints)
            _write_history(out, history)
            if config.patience is not None and epoch - best_epoch >= config.patience:
                stop[0] = 1
        workers.report(row, path)
        if workers.broadcast(stop, (1,), torch.int64)[0]:
            break


def _record(inner: nn.Module, config: TrainConfig, payload: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~msk.core.models.record.ModelRecord` of an epoch's checkpoint: what the stage said
    (``fit(record=...)``: task, entity set, squaring, metadata encoder, source) plus what the loop knows."""
    import msk
    from msk.core.models.record import ModelRecord, epoch_metrics

    given = dict(payload.get("record") or {})
    record = {"task": "classifier", **given, "classes": payload.get("classes") or given.get("classes") or [],
              "input": {"image_size": config.image_size, "preprocess": config.preprocess.model_dump(mode="json")},
              "encoder": {"name": inner.encoder_name, "options": dict(getattr(inner, "encoder_options", None) or {}),
                          "in_chans": encoder_in_chans(inner.sobel), "sobel": bool(inner.sobel)},
              "head": dict(getattr(inner, "architecture", None) or {}),
              "data": {**(given.get("data") or {}), "fingerprint": payload.get("fingerprint"),
                       "n_images": len(payload["images"])},
              "metrics": epoch_metrics(row),
              "msk_version": msk.__version__}
    return ModelRecord.model_validate(record).model_dump(mode="json")


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    tmp = out / ".history.csv"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, out / "history.csv")


def fit(build: Callable[[], nn.Module], images: np.ndarray, labels: Sequence[int] | np.ndarray,
        num_classes: int, config: TrainConfig, *, out: str | os.PathLike,
        meta: np.ndarray | None = None, val: tuple | None = None,
        score: Callable[[nn.Module], dict[str, float]] | None = None,
        classes: Sequence[str] | None = None, dataset: type[Dataset] | None = None,
        loss: nn.Module | None = None, hits: Callable | None = None,
        record: Mapping[str, Any] | None = None) -> FitResult:
    """Train the model ``build()`` returns on ``images`` (``uint8 [N, S, S]``) and ``labels``.

    :param build: a picklable zero-argument factory (it runs on every Ray Train worker); the
        model has ``encoder``, ``encoder_name``, ``sobel``, ``head`` and ``num_classes``
        attributes like :class:`ImageClassifier`.
    :param meta: ``float32 [N, D]`` metadata for fusion models (``model(images, meta)``).
    :param val: ``(images, labels)`` or ``(images, labels, meta)`` evaluated after every epoch;
        early stopping and ``best.pt`` follow its loss.
    :param score: a picklable ``score(model) -> {metric: value}`` called on rank 0 after every
        epoch (model in eval mode, on the worker's device); its metrics join the epoch's report
        (e.g. a retrieval metric that Ray Tune schedules on).
    :param classes: class names in label order, saved in the checkpoints (``extra["classes"]``)
        so that a served model names its outputs.
    :param dataset: a picklable ``Dataset`` class called like :class:`_Arrays` (images, labels,
        meta, image_size, augment, aug_prob, seed, keyword options) whose items are
        ``((image,), target)``; with it ``labels`` may be any per-image targets (e.g. lesion
        masks, :mod:`msk.core.stages.segmentation.training`) and are not checked against ``num_classes``.
    :param loss: picklable ``loss(outputs, targets)`` for training and validation (default
        cross-entropy, class-weighted as the config says).
    :param hits: picklable ``hits(outputs, targets) -> float``, the sum over a batch of a
        per-item score in [0, 1]; its mean is the history's ``val_accuracy`` (default top-1).
    :param record: what the stage knows of the model for its :class:`~msk.core.models.record.ModelRecord`
        (``task``, ``entity_set``, ``squaring``, ``metadata_encoder``, ``data.source``); the loop adds the
        input, encoder, head, data fingerprint and metrics, and saves it in every checkpoint.
    """
    from msk.core.models.record import data_fingerprint

    labels = np.asarray(labels) if dataset is not None else np.asarray(labels, dtype=np.int64)
    _check_arrays(images, labels, meta, "training")
    if classes is not None and len(classes) != num_classes:
        raise TrainError(f"{len(classes)} class names for {num_classes} classes")
    if dataset is None and (labels.min() < 0 or labels.max() >= num_classes):
        raise TrainError(f"labels must lie in 0..{num_classes - 1}; got {labels.min()}..{labels.max()}")
    if len(images) < max(2, config.num_workers):
        raise TrainError(f"{len(images)} training images are too few for {max(1, config.num_workers)} worker(s)")
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    latest = _latest(out)
    if latest is not None:
        saved = load_checkpoint(latest)
        if saved.arch != config.encoder or saved.extra.get("num_classes") != num_classes:
            raise TrainError(f"{out} holds a run of a {saved.arch!r} encoder with "
                             f"{saved.extra.get('num_classes')} classes; use a new folder for "
                             f"{config.encoder!r} with {num_classes} classes")
    (out / "config.yaml").write_text(config.to_yaml())
    payload = {"config": config.model_dump(mode="json"), "out": str(out), "build": build,
               "images": images, "labels": labels, "meta": meta, "num_classes": num_classes,
               "score": score, "classes": None if classes is None else [str(c) for c in classes],
               "dataset": dataset, "loss": loss, "hits": hits, "record": dict(record or {}),
               "fingerprint": data_fingerprint(images, labels)}
    if val is not None:
        v_images, v_labels, *rest = val
        v_labels = np.asarray(v_labels) if dataset is not None else np.asarray(v_labels, dtype=np.int64)
        _check_arrays(v_images, v_labels, rest[0] if rest else None, "validation")
        payload.update(val_images=v_images, val_labels=v_labels, val_meta=rest[0] if rest else None)
    run_workers(_loop, payload, num_workers=config.num_workers, use_gpu=config.use_gpu,
                storage=out, name="train", max_failures=config.max_failures)
    model, ckpt = load_model(out / "best.pt", build)
    latest = _latest(out)
    # best.pt of the last epoch holds the whole history: no second read of the larger epoch checkpoint
    history = ckpt.extra.get("history") if latest == _ckpt_path(out, ckpt.epoch) else None
    if history is None:
        history = load_checkpoint(latest).extra.get("history", [])
    return FitResult(model, list(history), ckpt.epoch, out / "best.pt", out)


def _classifier_factory(config: dict[str, Any], num_classes: int) -> ImageClassifier:
    return build_classifier(TrainConfig.model_validate(config), num_classes)


def fit_classifier(images: np.ndarray, labels, num_classes: int, config: TrainConfig, *,
                   out: str | os.PathLike, val: tuple | None = None, score=None,
                   classes: Sequence[str] | None = None, record: Mapping[str, Any] | None = None) -> FitResult:
    """Encoder + linear head, initialised from ``config.init``; see :func:`fit`."""
    import functools

    build = functools.partial(_classifier_factory, config.model_dump(mode="json"), num_classes)
    return fit(build, images, labels, num_classes, config, out=out, val=val, score=score, classes=classes,
               record=record)


def load_model(path: str | os.PathLike, build: Callable[[], nn.Module] | None = None):
    """A trained model from its checkpoint (CPU, eval mode) and the checkpoint itself.

    Without ``build`` the model is an :class:`ImageClassifier` with a linear head, its encoder
    built with the options the checkpoint records. The model's ``input_config``
    (:class:`msk.core.data.preprocess.InputConfig`) is the checkpoint's image size and
    preprocessing; a checkpoint from before preprocessing existed gets none.
    """
    ckpt = load_checkpoint(path)
    if "head" not in ckpt.extra:
        raise CheckpointError(f"{path} holds an encoder without a classifier head "
                              "(a DeepCluster checkpoint?); use it as `init` for training")
    with weights_from_checkpoint():  # the checkpoint's weights win over `pretrained` (not loaded)
        if build is None:
            model = ImageClassifier(ckpt.arch, int(ckpt.extra["num_classes"]),
                                    sobel=bool(ckpt.config.get("sobel", False)),
                                    encoder_options=ckpt.extra.get("encoder_options"))
        else:
            model = build()
    load_state(model.encoder, ckpt, arch=model.encoder_name)
    model.head.load_state_dict(ckpt.extra["head"])
    model.input_config = InputConfig.from_config(ckpt.config)
    return model.eval(), ckpt


def predict_logits(model: nn.Module, images: np.ndarray, *, image_size: int | None = None,
                   meta: np.ndarray | None = None, batch_size: int = 64,
                   preprocess: PreprocessConfig | None = None) -> np.ndarray:
    """Logits ``float32 [N, C]`` of ``model`` on ``images`` (deterministic view, no grad).

    The input size and preprocessing are the model's own (its ``input_config``, as trained);
    ``image_size`` and ``preprocess`` override them, and are what a model without an input
    config is fed (``image_size`` is then required; no preprocessing by default).
    """
    known = input_config_of(model)
    if image_size is None:
        if known is None:
            raise TrainError("predict_logits: the model carries no input_config; pass image_size")
        image_size = known.image_size
    if preprocess is None and known is not None:
        preprocess = known.preprocess
    data = _Arrays(images, np.zeros(len(images), np.int64), meta, image_size, False, 0.0, 0,
                   preprocess=preprocess)
    model.eval()
    device = next(model.parameters()).device
    outs = []
    with torch.no_grad():
        for inputs, _ in DataLoader(data, batch_size=batch_size):
            outs.append(model(*[t.to(device) for t in inputs]).float().cpu())
    return torch.cat(outs).numpy() if outs else np.zeros((0, getattr(model, "num_classes", 0)), np.float32)
