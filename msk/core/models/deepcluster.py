"""DeepCluster: self-supervised training of an image encoder by clustering its own features.

Caron, Bojanowski, Joulin and Douze, *Deep Clustering for Unsupervised Learning of Visual
Features*, ECCV 2018, as used by the SAM-X anatomical sorter. Each epoch:

1. compute the features of every image with the current encoder (centre view, eval mode);
2. reduce them with a whitening PCA to ``pca_dim``, L2-normalise, and k-means them into ``k``
   clusters; repair empty clusters (:func:`fix_empty_clusters`) and watch for collapse;
3. re-initialise the classifier head and train encoder + head for one pass to predict the
   cluster assignments, sampling clusters uniformly (:func:`uniform_cluster_indices`), on
   augmented views;
4. log the NMI between this epoch's and the previous epoch's assignments (and against ground
   truth where given), save a checkpoint to ``out/``.

The loop (:func:`deepcluster_loop`) runs in this process (``num_workers=0``) or as **one** Ray
Train run (``num_workers >= 1``): starting a ``TorchTrainer`` costs about 17-19 s on a small
machine, so the whole multi-epoch loop is a single ``train_loop_per_worker``. Inside it every
worker extracts the features of its share of the images, rank 0 clusters the gathered features
and broadcasts the assignments, and all workers train the DDP-wrapped model on their share of
the uniformly sampled indices. ``out/`` is the source of truth for resuming: rerunning with the
same ``out`` continues after the last saved epoch. See ``docs/deepcluster.md``.

Images are preprocessed as ``preprocess`` says (:mod:`msk.core.data.preprocess`; recorded in the
checkpoints, so that :mod:`msk.core.models.embed` and a sorter fine-tuned from them see the same
inputs) and augmented as ``augmentation`` says. A run folder written before these options
existed is resumed as it was trained: no preprocessing and the classic augmentation.
"""

from __future__ import annotations

import csv
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from msk.core.config import MskConfig
from msk.core.data.augment import ImageArrayDataset, augmented_view, encoder_in_chans, eval_transform, input_layer
from msk.core.data.preprocess import AugmentConfig, PreprocessConfig
from msk.core.errors import ConfigError, MskError
from msk.core.io.checkpoint import load_checkpoint, load_state, save_checkpoint
from msk.core.io.labels import load_assignments
from msk.core.models.metrics import cluster_purity
from msk.core.registry import build_clusterer, build_encoder
from msk.core.runtime.workers import Workers, run_workers

__all__ = [
    "CollapseWarning", "DeepClusterConfig", "DeepClusterError", "DeepClusterNet",
    "DeepClusterResult", "cluster_features", "deepcluster_loop", "default_k",
    "extract_features", "fix_empty_clusters", "from_ingest", "history_table", "l2_normalize",
    "latest_checkpoint", "legacy_inputs", "pca_whiten", "read_history", "run_deepcluster",
    "train_one_epoch", "uniform_cluster_indices",
]

#: Per-epoch history columns, in the order written to ``history.csv``.
HISTORY_FIELDS = ("epoch", "nmi_prev", "nmi_truth", "purity_truth", "loss", "n_nonempty",
                  "largest_cluster_share", "n_empty_fixed", "seconds")

#: Options that may change between a run and its resumption.
RESUMABLE_CHANGES = frozenset({"epochs", "num_workers", "use_gpu", "loader_workers",
                               "collapse_threshold", "keep_checkpoints"})


class DeepClusterError(MskError):
    """A DeepCluster run that cannot start or continue."""


class CollapseWarning(UserWarning):
    """One cluster holds more than ``collapse_threshold`` of the images."""


def default_k(n_images: int) -> int:
    """DeepCluster's ``k`` for ``n_images``: about one cluster per 20 images, at least 10 and at
    most 1000 (the paper's 1000 was for ~100,000 radiographs; k=1000 on 800 images leaves most
    clusters with one image)."""
    return int(min(1000, max(10, n_images // 20)))


class DeepClusterConfig(MskConfig):
    """Options of ``msk cluster`` (DeepCluster)."""

    encoder: str = Field("resnet18", description="encoder registry name (`msk plugins encoder`)")
    pretrained: str | bool | None = Field(
        None, description="start the encoder from a weights file, hf-hub:org/name or true: timm's default "
                          "weights (msk.core.models.pretrained)")
    k: int | None = Field(None, ge=2, description="number of k-means clusters (pseudo-classes); None: from the "
                          "number of images, about one per 20 (default_k), recorded in the run's config.yaml")
    epochs: int = Field(10, ge=1, description="total epochs; a resumed run continues up to it")
    pca_dim: int = Field(256, ge=1, description="whitening-PCA dimension before k-means")
    batch_size: int = Field(64, ge=1, description="images per training step and feature batch")
    lr: float = Field(0.05, gt=0, description="SGD learning rate (encoder and head)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(1e-5, ge=0, description="SGD weight decay")
    image_size: int = Field(128, ge=8, description="side of the resized, centre-cropped input")
    sobel: bool = Field(True, description="feed the encoder Sobel gradients of the grey image")
    augment: bool = Field(True, description="train on augmented views (the transforms of `augmentation`)")
    preprocess: PreprocessConfig = Field(
        default_factory=PreprocessConfig,
        description="intensity normalisation of every input; recorded in the checkpoints")
    augmentation: AugmentConfig = Field(
        default_factory=AugmentConfig, description="probability and strength of each training transform")
    clusterer: str = Field("faiss-kmeans", description="clusterer registry name")
    seed: int = Field(0, description="seed of k-means, shuffling and augmentation")
    empty_cluster: Literal["split", "resample"] = Field(
        "split", description="how an empty cluster is refilled (see fix_empty_clusters)")
    collapse_threshold: float = Field(
        0.5, gt=0, le=1, description="warn when one cluster holds more than this share")
    num_workers: int = Field(
        1, ge=0, description="Ray Train workers; 0 runs in this process without Ray")
    use_gpu: bool = Field(False, description="one GPU per worker")
    loader_workers: int = Field(
        0, ge=0, description="DataLoader processes per worker preparing augmented images")
    keep_checkpoints: int | None = Field(
        1, ge=1, description="epoch checkpoints kept, the latest ones (each holds the encoder, its optimizer "
                             "state and the epoch's assignments; the last resumes the run); None: every epoch's")

    def with_k(self, n_images: int, saved: dict[str, Any] | None = None) -> DeepClusterConfig:
        """This config with ``k`` resolved: as set, else the resumed run's (``saved``, its
        checkpoint's config), else :func:`default_k` of ``n_images``."""
        if self.k is not None:
            return self
        k = (saved or {}).get("k") or default_k(n_images)
        return self.model_copy(update={"k": int(k)})

    def resolved_k(self) -> int:
        """``k`` of a config :meth:`with_k` returned."""
        if self.k is None:
            raise ValueError("k is not resolved yet: call with_k(n_images) first")
        return self.k


@dataclass
class DeepClusterResult:
    """Outcome of :func:`run_deepcluster`.

    :param assignments: cluster of each image, int64 ``[N]``, from the last epoch's k-means.
    :param history: one dict per epoch with the keys of :data:`HISTORY_FIELDS`.
    :param checkpoint: the last epoch's encoder checkpoint.
    :param out: the run folder (``history.csv``, ``assignments.npy``, ``checkpoints/``).
    """

    assignments: np.ndarray
    history: list[dict[str, Any]]
    checkpoint: Path
    out: Path
    k: int = 0

    def table(self):
        """The history as a rich table (see :func:`history_table`)."""
        return history_table(self.history)


# -- data ------------------------------------------------------------------------------------


def from_ingest(out_dir: str | os.PathLike, *, columns: Sequence[str] | None = None):
    """Images and row metadata of an ingest output, ready for :func:`run_deepcluster`.

    :return: ``(images uint8 [N, S, S], table)``; the table's rows are the images' rows.
    """
    from msk.core.io.dataset import images_from_table, read_shards

    table = read_shards(out_dir, columns=columns)
    return images_from_table(table), table


def _check_images(images: np.ndarray, config: DeepClusterConfig) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise DeepClusterError(f"images must be a uint8 array [N, S, S]; got {dtype} {shape}")
    if config.k is not None and len(images) < config.k:
        raise DeepClusterError(
            f"k={config.k} clusters need at least {config.k} images; got {len(images)} "
            f"— lower --k"
        )


# -- features, PCA and clustering --------------------------------------------------------------


def extract_features(model, images: np.ndarray, *, image_size: int, batch_size: int,
                     device=None, indices: np.ndarray | None = None, loader_workers: int = 0,
                     progress=None, preprocess: PreprocessConfig | None = None) -> np.ndarray:
    """Features ``float32 [len(indices), D]`` of ``images[indices]`` (all by default).

    ``model`` is a :class:`DeepClusterNet` (or anything with ``features(x)``); it is put in eval
    mode and fed the centre view (:func:`msk.core.data.augment.eval_transform`) of the images
    preprocessed with ``preprocess`` (none by default).
    """
    dataset: Dataset = ImageArrayDataset(images, None, eval_transform(image_size, preprocess))
    if indices is not None:
        dataset = Subset(dataset, indices.tolist())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=loader_workers)
    model.eval()
    chunks = []
    with torch.no_grad():
        for x, _ in loader:
            chunks.append(model.features(x.to(device)).float().cpu())
            if progress is not None:
                progress(len(x))
    if not chunks:
        return np.zeros((0, 0), np.float32)
    return torch.cat(chunks).numpy()


def pca_whiten(x: np.ndarray, dim: int, *, eps: float = 1e-5) -> np.ndarray:
    """Project ``x [N, D]`` on its top ``dim`` principal axes, scaled to unit variance.

    ``dim`` is clipped to ``min(N, D)``. ``eps`` is added to the variances before whitening, so
    directions of (near) zero variance stay small instead of exploding.
    """
    x = np.asarray(x, dtype=np.float64)
    dim = min(dim, *x.shape)
    centred = x - x.mean(axis=0)
    cov = centred.T @ centred / max(len(x) - 1, 1)
    variances, axes = np.linalg.eigh(cov)  # ascending
    top = np.argsort(variances)[::-1][:dim]
    projected = centred @ axes[:, top]
    return (projected / np.sqrt(np.clip(variances[top], 0, None) + eps)).astype(np.float32)


def l2_normalize(x: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)


def fix_empty_clusters(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, *,
                       strategy: Literal["split", "resample"] = "split",
                       rng: np.random.Generator, eps: float = 1e-4,
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """Refill empty clusters by splitting a non-empty one, as in DeepCluster.

    For each empty cluster a *donor* cluster is drawn among those with two or more points, with
    probability proportional to its size minus one (faiss's rule), and given a second centroid:

    * ``"split"`` (the DeepCluster paper and faiss): the donor centroid perturbed by a small
      random ``eps`` vector, the donor centroid itself moved by the opposite vector;
    * ``"resample"``: one of the donor's points, drawn at random.

    The donor's points are then re-assigned to the nearer of the two centroids and both
    centroids recomputed as the means of their points. A donor whose points cannot be told apart
    (all identical) stays whole and the cluster stays empty.

    :return: ``(labels, centroids, n_fixed)``: new arrays and the number of clusters refilled.
    """
    x = np.asarray(x, dtype=np.float32)
    labels, centroids = labels.copy(), centroids.astype(np.float32, copy=True)
    k = len(centroids)
    sizes = np.bincount(labels, minlength=k)
    fixed = 0
    for empty in np.flatnonzero(sizes == 0):
        spare = np.clip(sizes - 1, 0, None).astype(np.float64)
        if spare.sum() == 0:
            break
        donor = int(rng.choice(k, p=spare / spare.sum()))
        members = np.flatnonzero(labels == donor)
        if strategy == "split":
            delta = eps * rng.standard_normal((x.shape[1],)).astype(np.float32)
            a, b = centroids[donor] - delta, centroids[donor] + delta
        elif strategy == "resample":
            a, b = centroids[donor], x[rng.choice(members)]
        else:
            raise ValueError(f"unknown empty-cluster strategy {strategy!r}; use split or resample")
        to_b = (((x[members] - b) ** 2).sum(1) < ((x[members] - a) ** 2).sum(1))
        if to_b.all() or not to_b.any():
            continue  # the donor's points are indistinguishable: nothing to split
        labels[members[to_b]] = empty
        centroids[donor] = x[members[~to_b]].mean(0)
        centroids[empty] = x[members[to_b]].mean(0)
        sizes[donor], sizes[empty] = (~to_b).sum(), to_b.sum()
        fixed += 1
    return labels, centroids, fixed


@dataclass
class Clustering:
    """One epoch's k-means: assignments and the statistics logged for them."""

    labels: np.ndarray
    n_nonempty: int
    largest_cluster_share: float
    n_empty_fixed: int
    pca_dim: int
    notes: list[str] = field(default_factory=list)
    #: ``[k, pca_dim]`` mean of each cluster's whitened, normalised features (zeros when empty);
    #: saved as ``centroids.npy`` for the nearest clusters of ``msk clusters review``
    centroids: np.ndarray | None = None


def cluster_features(features: np.ndarray, config: DeepClusterConfig, *, epoch: int) -> Clustering:
    """PCA-whiten, L2-normalise and k-means ``features`` into ``config.k`` clusters
    (``k`` unset: :func:`default_k` of the number of rows)."""
    config = config.with_k(len(features))
    k = config.resolved_k()
    notes = []
    dim = min(config.pca_dim, *features.shape)
    if dim < config.pca_dim:
        notes.append(f"pca_dim {config.pca_dim} clipped to {dim} "
                     f"(min of {len(features)} images and {features.shape[1]} features)")
    x = l2_normalize(pca_whiten(features, dim))
    seed = config.seed * 10_000 + epoch
    result = build_clusterer(config.clusterer).fit(x, k, seed=seed)
    labels, fixed = result.labels.astype(np.int64), 0
    if k > len(np.unique(labels)):
        labels, _, fixed = fix_empty_clusters(x, labels, result.centroids,
                                              strategy=config.empty_cluster,
                                              rng=np.random.default_rng(seed))
    sizes = np.bincount(labels, minlength=k)
    centroids = np.zeros((len(sizes), x.shape[1]), np.float32)
    np.add.at(centroids, labels, x)
    centroids /= np.maximum(sizes, 1)[:, None]
    return Clustering(labels, int((sizes > 0).sum()), float(sizes.max() / len(labels)), fixed,
                      dim, notes, centroids)


def uniform_cluster_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` image indices drawn so that every non-empty cluster is equally likely.

    DeepCluster's remedy for trivial solutions: each image is drawn with weight ``1 / size`` of
    its cluster (with replacement), so large clusters do not dominate the pseudo-label loss.
    """
    sizes = np.bincount(labels)
    weights = 1.0 / sizes[labels]
    return rng.choice(len(labels), size=n, replace=True, p=weights / weights.sum())


# -- the model and one training pass -----------------------------------------------------------


class DeepClusterNet(nn.Module):
    """Fixed input layer (Sobel or identity) -> encoder -> linear head over ``k`` pseudo-classes."""

    def __init__(self, config: DeepClusterConfig) -> None:
        super().__init__()
        if config.k is None:
            raise DeepClusterError("DeepClusterNet needs a resolved k; use config.with_k(number of images)")
        self.input = input_layer(config.sobel)
        self.encoder = build_encoder(config.encoder, in_chans=encoder_in_chans(config.sobel),
                                     pretrained=config.pretrained)
        self.head = nn.Linear(self.encoder.feature_dim, config.k)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def reset_head(self, seed: int) -> None:
        """Re-initialise the head (DeepCluster: every epoch), identically on every worker."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * 0.01)
            self.head.bias.zero_()


def train_one_epoch(model, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                    config: DeepClusterConfig, *, optimizers, device=None, progress=None) -> float:
    """One pass of ``model`` over ``images[indices]`` with ``labels`` as targets; mean loss."""
    transform = (augmented_view(config.image_size, config.augmentation, config.preprocess) if config.augment
                 else eval_transform(config.image_size, config.preprocess))
    loader = DataLoader(ImageArrayDataset(images, labels, transform), batch_size=config.batch_size,
                        sampler=indices.tolist(), drop_last=len(indices) > config.batch_size,
                        num_workers=config.loader_workers)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    total, seen = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = criterion(model(x), y)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        total += float(loss.detach()) * len(x)
        seen += len(x)
        if progress is not None:
            progress(len(x))
    return total / max(seen, 1)


# -- the run folder ----------------------------------------------------------------------------


def _checkpoint_path(out: Path, epoch: int) -> Path:
    return out / "checkpoints" / f"epoch-{epoch:03d}.pt"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The checkpoint of the last completed epoch in the run folder ``out``, if any."""
    files = sorted((Path(out) / "checkpoints").glob("epoch-*.pt"))
    return files[-1] if files else None


def _parse(value: str) -> Any:
    if value == "":
        return None
    number = float(value)
    return int(number) if number.is_integer() and "." not in value else number


def read_history(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch rows of ``out/history.csv`` (empty if the run has none)."""
    path = Path(out) / "history.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    tmp = out / ".history.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in HISTORY_FIELDS})
    os.replace(tmp, out / "history.csv")


def _write_assignments(out: Path, labels: np.ndarray, image_ids: Sequence[str] | None) -> None:
    np.save(out / ".assignments.npy", labels)
    os.replace(out / ".assignments.npy", out / "assignments.npy")
    with (out / "assignments.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "image_id", "cluster"])
        for i, c in enumerate(labels.tolist()):
            writer.writerow([i, image_ids[i] if image_ids is not None else "", c])


def _check_resumable(ckpt, config: DeepClusterConfig, n_images: int) -> None:
    saved = ckpt.config
    changed = sorted(k for k, v in config.model_dump(mode="json").items()
                     if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v)
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in changed)
        raise ConfigError(
            f"{ckpt.path} was trained with other options ({details}); use a new --out folder "
            f"or the same options (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
        )
    saved_n = int(ckpt.extra.get("n_images", n_images))
    if saved_n != n_images:
        raise ConfigError(f"{ckpt.path} was trained on {saved_n} images, this run has "
                          f"{n_images}; use a new --out folder")


# -- the loop ----------------------------------------------------------------------------------


def _nmi(a: np.ndarray | Sequence, b: np.ndarray | Sequence) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(a, b))


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _warn_collapse(row: dict[str, Any], threshold: float, console=None) -> None:
    share = row["largest_cluster_share"]
    if share is None or share <= threshold:
        return
    message = (f"epoch {row['epoch']}: one cluster holds {share:.0%} of the images (> "
               f"collapse_threshold {threshold:.0%}); the features are collapsing. Try more "
               "data, a lower lr, sobel=True or augment=True.")
    if console is not None:
        console.print(f"[bold red]COLLAPSE WARNING[/bold red] {message}")
    warnings.warn(message, CollapseWarning, stacklevel=3)


def _restore(model, optimizer, config: DeepClusterConfig, n: int, out: Path,
             workers: Workers) -> tuple[int, np.ndarray | None]:
    """Load the newest checkpoint (``out``'s or Ray's); return ``(epochs done, assignments)``."""
    candidates = [p for p in (workers.restored_checkpoint(), latest_checkpoint(out)) if p]
    if not candidates:
        return 0, None
    ckpt = max((load_checkpoint(p) for p in candidates), key=lambda c: c.epoch)
    _check_resumable(ckpt, config, n)
    load_state(model.encoder, ckpt, arch=config.encoder)
    if "optimizer" in ckpt.extra:
        optimizer.load_state_dict(ckpt.extra["optimizer"])
    return ckpt.epoch, ckpt.extra["assignments"].numpy()


def _record(config: DeepClusterConfig, labels: np.ndarray, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The :class:`~msk.core.models.record.ModelRecord` of a DeepCluster checkpoint (an encoder, no classes)."""
    import msk
    from msk.core.models.record import ModelRecord, epoch_metrics

    return ModelRecord(
        task="deepcluster", input={"image_size": config.image_size, "preprocess": config.preprocess},
        encoder={"name": config.encoder, "in_chans": encoder_in_chans(config.sobel), "sobel": config.sobel},
        head={"k": int(config.k)} if isinstance(config.k, int) else {},
        data={"n_images": len(labels)}, msk_version=msk.__version__,
        metrics=epoch_metrics(history[-1] if history else {}),
    ).model_dump(mode="json")


def _save_epoch(out: Path, net, optimizer, config: DeepClusterConfig, epoch: int,
                labels: np.ndarray, history: list[dict[str, Any]],
                image_ids: Sequence[str] | None, centroids: np.ndarray | None = None) -> Path:
    """Rank 0's end of an epoch: checkpoint, ``history.csv``, the assignments and the cluster
    centroids (``centroids.npy``)."""
    path = save_checkpoint(
        _checkpoint_path(out, epoch), net.encoder, arch=config.encoder,
        in_chans=encoder_in_chans(config.sobel), config=config.model_dump(mode="json"),
        epoch=epoch, assignments=torch.from_numpy(labels.copy()), n_images=len(labels),
        optimizer=optimizer.state_dict(), record=_record(config, labels, history),
    )
    if config.keep_checkpoints is not None:  # older epochs' weights are not needed to resume
        for old in sorted((out / "checkpoints").glob("epoch-*.pt"))[:-config.keep_checkpoints]:
            old.unlink(missing_ok=True)
    _write_history(out, history)
    _write_assignments(out, labels, image_ids)
    if centroids is not None:
        np.save(out / ".centroids.npy", centroids)
        os.replace(out / ".centroids.npy", out / "centroids.npy")
    return path


def deepcluster_loop(config: DeepClusterConfig, images: np.ndarray, out: Path, workers: Workers, *,
                     ground_truth: Sequence[str] | None = None,
                     image_ids: Sequence[str] | None = None, progress: bool = False) -> None:
    """All epochs of DeepCluster on one worker; rank 0 clusters and writes ``out``.

    Runs unchanged in this process (:class:`msk.core.runtime.workers.LocalWorkers`) and inside a Ray Train worker
    (:class:`msk.core.runtime.workers.RayWorkers`). Continues after the newest checkpoint in ``out`` (or the one Ray
    restores after a failure). Every worker extracts the features of its share of the images;
    rank 0 clusters all of them and broadcasts the assignments; every worker trains on its share
    of the uniformly sampled indices, with gradients averaged by DDP.
    """
    out = Path(out)
    n, rank, world = len(images), workers.rank, workers.world_size
    config = config.with_k(n)
    torch.manual_seed(config.seed)
    model = DeepClusterNet(config)
    def sgd(params) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)

    encoder_opt = sgd(model.encoder.parameters())
    start, previous = _restore(model, encoder_opt, config, n, out, workers)
    model = workers.prepare(model)
    net = getattr(model, "module", model)  # without the DDP wrapper
    history = [row for row in read_history(out) if row["epoch"] <= start] if rank == 0 else []
    console = _console()  # only rank 0 prints
    # a collapse is said on the console by the process the user watches: this one when in process,
    # the driver (from the history) for Ray Train workers
    collapse_console = console if config.num_workers == 0 else None
    shard = np.arange(rank, n, world)

    with _Progress(progress and rank == 0) as bar:
        for epoch in range(start + 1, config.epochs + 1):
            began = time.perf_counter()
            title = f"epoch {epoch}/{config.epochs}"

            # (a) features of every image, gathered on all workers
            bar.start(f"{title}: features", n)
            features = np.zeros((n, net.encoder.feature_dim), np.float32)
            if len(shard):  # more workers than images leaves some without a share
                features[shard] = extract_features(
                    net, images, image_size=config.image_size, batch_size=config.batch_size,
                    device=workers.device, indices=shard, loader_workers=config.loader_workers,
                    progress=bar.advance, preprocess=config.preprocess)
            features = workers.all_sum(features)

            # (b) k-means on rank 0, assignments broadcast to all
            row: dict[str, Any] = {"epoch": epoch}
            labels = centroids = None
            if rank == 0:
                bar.start(f"{title}: k-means k={config.k}", None)
                clustering = cluster_features(features, config, epoch=epoch)
                labels, centroids = clustering.labels, clustering.centroids
                for note in clustering.notes if epoch == start + 1 else ():
                    console.print(f"[yellow]note[/yellow]: {note}")
                row.update(
                    nmi_prev=None if previous is None else _nmi(previous, labels),
                    nmi_truth=None if ground_truth is None else _nmi(ground_truth, labels),
                    purity_truth=None if ground_truth is None else cluster_purity(labels, ground_truth),
                    n_nonempty=clustering.n_nonempty,
                    largest_cluster_share=clustering.largest_cluster_share,
                    n_empty_fixed=clustering.n_empty_fixed,
                )
                _warn_collapse(row, config.collapse_threshold, collapse_console)
            labels = workers.broadcast(labels, (n,), torch.int64)

            # (c) a fresh head, one pass over uniformly sampled pseudo-labelled images
            net.reset_head(config.seed * 10_000 + epoch)
            head_opt = sgd(net.head.parameters())
            # the same draw on every worker, cut to equal shares (DDP needs equal batch counts)
            drawn = uniform_cluster_indices(labels, n - n % world,
                                            np.random.default_rng([config.seed, epoch]))
            mine = drawn[rank::world]
            torch.manual_seed(config.seed * 10_000 + epoch * 100 + rank)  # augmentations
            bar.start(f"{title}: training", len(mine))
            loss = train_one_epoch(model, images, labels, mine, config,
                                   optimizers=(encoder_opt, head_opt), device=workers.device,
                                   progress=bar.advance)
            row["loss"] = float(workers.all_sum(np.array([loss], np.float64))[0] / world)
            row["seconds"] = round(time.perf_counter() - began, 3)

            # (d) log and save
            path = None
            if rank == 0:
                history.append(row)
                path = _save_epoch(out, net, encoder_opt, config, epoch, labels, history, image_ids, centroids)
                if not progress:
                    console.print(_epoch_line(row), highlight=False)
            workers.report(row, path)
            previous = labels


def _epoch_line(row: dict[str, Any]) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    return (f"epoch {row['epoch']}: loss {fmt(row.get('loss'), '.3f')}  "
            f"nmi_prev {fmt(row.get('nmi_prev'), '.3f')}  nmi_truth {fmt(row.get('nmi_truth'), '.3f')}  "
            f"purity {fmt(row.get('purity_truth'), '.3f')}  "
            f"clusters {row.get('n_nonempty')}  largest {fmt(row.get('largest_cluster_share'), '.1%')}  "
            f"{fmt(row.get('seconds'), '.1f')} s")


class _Progress:
    """A rich progress bar with one task that is re-labelled per phase (or nothing)."""

    def __init__(self, enabled: bool):
        self.progress = None
        if enabled:
            from msk.core.runtime.progress import progress_bar

            self.progress = progress_bar(True, description="{task.description}")
        self.task = None

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def start(self, description: str, total: int | None) -> None:
        if self.progress is None:
            return
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, n)


# -- the entry point ---------------------------------------------------------------------------


def run_deepcluster(images: np.ndarray, config: DeepClusterConfig | None = None, *,
                    out: str | os.PathLike, ground_truth: Sequence[str] | None = None,
                    image_ids: Sequence[str] | None = None,
                    progress: bool = True) -> DeepClusterResult:
    """Train an encoder with DeepCluster on ``images`` (``uint8 [N, S, S]``).

    :param out: run folder: ``config.yaml``, ``history.csv``, ``assignments.npy`` /
        ``assignments.csv``, ``checkpoints/epoch-NNN.pt`` (and ``ray/`` for Ray Train runs). A
        folder that holds a checkpoint is resumed after its last epoch.
    :param ground_truth: a label per image (e.g. the true region), for ``nmi_truth`` only.
    :param image_ids: an id per image, written next to the assignments.
    :param progress: rich progress bar (in-process runs); the history table is
        :meth:`DeepClusterResult.table` (``msk cluster`` prints it once, on stdout).
    """
    config = config or DeepClusterConfig()
    _check_images(images, config)
    n = len(images)
    existing = latest_checkpoint(Path(out))
    saved = load_checkpoint(existing) if existing is not None else None
    chosen = config.k
    config = config.with_k(n, saved.config if saved is not None else None)
    _check_images(images, config)
    if chosen is None:
        why = ("the resumed run's" if saved is not None and saved.config.get("k")
               else f"about one cluster per 20 of the {n} images, 10..1000")
        _console().print(f"k = {config.k} ({why}; set k / --k to choose)", highlight=False, soft_wrap=True)
    for name, values in (("ground_truth", ground_truth), ("image_ids", image_ids)):
        if values is not None and len(values) != n:
            raise DeepClusterError(f"{name} has {len(values)} entries for {n} images")
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if saved is not None:
        config = legacy_inputs(config, saved.config)
        _check_resumable(saved, config, n)
    (out / "config.yaml").write_text(config.to_yaml())
    ground_truth = None if ground_truth is None else [str(g) for g in ground_truth]
    image_ids = None if image_ids is None else [str(i) for i in image_ids]

    payload = {"config": config.model_dump(mode="json"), "images": images, "out": str(out),
               "ground_truth": ground_truth, "image_ids": image_ids,
               "progress": progress and config.num_workers == 0}
    try:
        run_workers(_worker_loop, payload, num_workers=config.num_workers,
                    use_gpu=config.use_gpu, storage=out, name="deepcluster")
    except DeepClusterError:
        raise
    except MskError as exc:
        raise DeepClusterError(str(exc)) from exc
    if config.num_workers:
        for row in read_history(out):  # the workers' warnings stay in their processes: say them here once
            _warn_collapse(row, config.collapse_threshold, _console())

    history = read_history(out)
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        raise DeepClusterError(f"{out}: the run saved no checkpoint")
    return DeepClusterResult(load_assignments(out), history, checkpoint, out, config.resolved_k())


def legacy_inputs(config: DeepClusterConfig, saved: dict[str, Any]) -> DeepClusterConfig:
    """``config`` for resuming a run whose checkpoint config is ``saved``: a run from before
    ``preprocess`` / ``augmentation`` existed keeps its inputs (no preprocessing, the classic
    augmentation) unless the config sets them explicitly."""
    update: dict[str, Any] = {}
    if "preprocess" not in saved and "preprocess" not in config.model_fields_set:
        update["preprocess"] = PreprocessConfig.none()
    if "augmentation" not in saved and "augmentation" not in config.model_fields_set:
        update["augmentation"] = AugmentConfig.legacy()
    return config.model_copy(update=update) if update else config


def _worker_loop(payload: dict[str, Any], workers: Workers) -> None:
    """The loop as :func:`msk.core.runtime.workers.run_workers` calls it (here or on a Ray worker)."""
    deepcluster_loop(DeepClusterConfig.model_validate(payload["config"]), payload["images"],
                     Path(payload["out"]), workers, ground_truth=payload["ground_truth"],
                     image_ids=payload["image_ids"], progress=payload["progress"])


def history_table(history: list[dict[str, Any]]):
    """The per-epoch history as a rich table."""
    from rich.table import Table

    table = Table(title="DeepCluster", title_justify="left")
    for name in HISTORY_FIELDS:
        table.add_column(name, justify="right")
    for row in history:
        cells = []
        for name in HISTORY_FIELDS:
            v = row.get(name)
            if v is None:
                cells.append("-")
            elif name == "largest_cluster_share":
                cells.append(f"{v:.1%}")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}" if name != "seconds" else f"{v:.1f}")
            else:
                cells.append(str(v))
        table.add_row(*cells)
    return table
