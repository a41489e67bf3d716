"""Benchmark msk's training loops against a plain torch loop: images per second and the ratio.

Contestants, on the same model, data and batch size (synthetic ``uint8`` images, ``--source``
px, resized to ``--image-size``; random labels: throughput does not depend on them):

* **sorter** (supervised): ``plain`` (a ``TensorDataset`` of the images preprocessed once,
  ``DataLoader``, AdamW, cross-entropy, nothing else), msk's :func:`msk.core.models.train.fit_classifier`
  in this process (``num_workers=0``) and with one Ray Train worker (``num_workers=1``). msk's
  loop also preprocesses every image every epoch, evaluates nothing (no validation set),
  writes ``history.csv`` and a checkpoint per epoch (encoder, head, optimizer) and reloads the
  best model at the end: that is the price being measured. Augmentation is off on both sides.
* **deepcluster** (one epoch: features of every image, PCA-whitening + k-means, a pass of
  training on uniformly sampled pseudo-labels): ``plain`` (the same :class:`DeepClusterNet`,
  faiss ``PCAMatrix`` + ``Kmeans``, SGD) against :func:`msk.core.models.deepcluster.run_deepcluster`
  in this process.

img/s counts training images (sorter: images x epochs; deepcluster: images of the epoch) over
the wall time of the call, end to end (model built, data prepared, checkpoints written). For the
Ray Train run the ``epoch img/s`` column also gives the rate inside the worker (the epochs'
``seconds`` in ``history.csv``), without the ~15-20 s of starting the Train run. ``img per
CPU-s`` divides by this process's CPU time instead of wall time (in-process contestants only):
barely affected by other jobs on the machine, so its ratio is the one to trust on a shared
machine. Every
contestant uses ``--threads`` torch threads (Ray Train gives its worker one CPU, hence
``OMP_NUM_THREADS=1`` there: keep ``--threads 1`` for a fair ratio). Rounds interleave the
contestants; the table gives mean ± standard deviation over rounds and the load average.
Never run by pytest. Example (the numbers in docs/performance.md)::

    python bench/train.py --n 256 --epochs 2 --image-size 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def synthetic_images(n: int, source: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``uint8 [n, source, source]`` smooth random images and labels in 0..3."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 1, source // 8, source // 8), generator=g)
    images = F.interpolate(coarse, size=(source, source), mode="bilinear", align_corners=False)
    images = (images[:, 0] * 255).round().to(torch.uint8).numpy()
    return images, np.random.default_rng(seed).integers(0, 4, n)


def preprocessed(images: np.ndarray, image_size: int, preprocess) -> torch.Tensor:
    """Every image through msk's deterministic network view, once."""
    import torch

    from msk.core.data.augment import eval_transform, to_tensor

    view = eval_transform(image_size, preprocess)
    return torch.stack([view(to_tensor(image)) for image in images])


def train_pass(model, loader, optimizer) -> None:
    """One plain pass: cross-entropy, zero_grad, backward, step."""
    import torch

    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# -- sorter ------------------------------------------------------------------------------------


def sorter_config(args, num_workers: int):
    from msk.core.models.train import TrainConfig

    return TrainConfig(encoder=args.encoder, image_size=args.image_size, epochs=args.epochs,
                       batch_size=args.batch_size, augment=False, num_workers=num_workers, seed=0)


def plain_sorter(images: np.ndarray, labels: np.ndarray, args) -> float:
    """Seconds of a plain torch loop: same model class, optimizer, batches and epochs."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from msk.core.models.train import build_classifier

    began = time.perf_counter()
    config = sorter_config(args, 0)
    torch.manual_seed(0)
    model = build_classifier(config, 4)
    data = TensorDataset(preprocessed(images, args.image_size, config.preprocess), torch.from_numpy(labels))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(args.epochs):
        train_pass(model, loader, optimizer)
    return time.perf_counter() - began


def msk_sorter(images: np.ndarray, labels: np.ndarray, args, num_workers: int) -> tuple[float, float]:
    """(seconds end to end, seconds of the epochs themselves) of msk's fit_classifier."""
    from msk.core.models.train import fit_classifier

    with tempfile.TemporaryDirectory(dir=args.tmp) as out:
        began = time.perf_counter()
        result = fit_classifier(images, labels, 4, sorter_config(args, num_workers), out=out)
        wall = time.perf_counter() - began
        epochs = sum(float(row["seconds"]) for row in result.history)
    return wall, epochs


# -- deepcluster -------------------------------------------------------------------------------


def deepcluster_config(args):
    from msk.core.models.deepcluster import DeepClusterConfig

    return DeepClusterConfig(encoder=args.encoder, epochs=1, image_size=args.image_size,
                             batch_size=args.batch_size, augment=False, num_workers=0, seed=0,
                             pca_dim=min(64, args.n))


def plain_deepcluster(images: np.ndarray, args) -> float:
    """Seconds of one DeepCluster epoch written plainly: features, PCA + k-means, one pass."""
    import faiss
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from msk.core.models.deepcluster import DeepClusterNet

    began = time.perf_counter()
    config = deepcluster_config(args).with_k(len(images))
    torch.manual_seed(0)
    model = DeepClusterNet(config)
    x = preprocessed(images, args.image_size, config.preprocess)
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.features(b) for b in x.split(args.batch_size)]).numpy()
    pca = faiss.PCAMatrix(feats.shape[1], min(config.pca_dim, *feats.shape), -0.5)
    pca.train(feats)
    z = pca.apply(feats)
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
    kmeans = faiss.Kmeans(z.shape[1], config.k, niter=20, seed=0)
    kmeans.train(z)
    pseudo = kmeans.index.search(z, 1)[1][:, 0]
    sizes = np.bincount(pseudo, minlength=config.k)
    weights = 1.0 / sizes[pseudo]
    drawn = np.random.default_rng(0).choice(len(x), size=len(x), p=weights / weights.sum())
    loader = DataLoader(TensorDataset(x[drawn], torch.from_numpy(pseudo[drawn]).long()),
                        batch_size=args.batch_size, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    train_pass(model, loader, optimizer)
    return time.perf_counter() - began


def msk_deepcluster(images: np.ndarray, args) -> float:
    from msk.core.models.deepcluster import run_deepcluster

    with tempfile.TemporaryDirectory(dir=args.tmp) as out:
        began = time.perf_counter()
        run_deepcluster(images, deepcluster_config(args), out=out, progress=False)
        return time.perf_counter() - began


# -- the rounds --------------------------------------------------------------------------------


def _stat(values: list[float], spec: str) -> str:
    """Mean ± standard deviation over the rounds that completed."""
    done = [v for v in values if np.isfinite(v)]
    if not done:
        return "-"
    missing = f" ({len(values) - len(done)} failed)" if len(done) < len(values) else ""
    return f"{format(float(np.mean(done)), spec)} ± {format(float(np.std(done)), spec)}{missing}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="training images")
    parser.add_argument("--source", type=int, default=96, help="side of the stored images")
    parser.add_argument("--image-size", type=int, default=64, help="network input side (64-128)")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--epochs", type=int, default=2, help="sorter epochs per run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every contestant")
    parser.add_argument("--parts", default="sorter,ray,deepcluster",
                        help="sorter (plain + in process), ray (one Ray Train worker), deepcluster")
    parser.add_argument("--tmp", default=None, help="folder for the run folders (default: system temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))

    import torch

    torch.set_num_threads(args.threads)
    images, labels = synthetic_images(args.n, args.source, 0)
    from msk.core.models import deepcluster, train  # imports and the first model build are not timed

    train.build_classifier(sorter_config(args, 0), 4)
    del deepcluster
    if "ray" in parts:
        from msk.core.runtime.ray_start import start_ray

        start_ray()  # once: the cluster's start is not the training loop's cost
    contestants: dict[str, Callable[[], tuple[float, float | None]]] = {}
    if "sorter" in parts or "ray" in parts:
        contestants["sorter plain"] = lambda: (plain_sorter(images, labels, args), None)
    if "sorter" in parts:
        contestants["sorter msk"] = lambda: msk_sorter(images, labels, args, 0)
    if "ray" in parts:
        contestants["sorter msk Ray Train (1 worker)"] = lambda: msk_sorter(images, labels, args, 1)
    if "deepcluster" in parts:
        contestants["deepcluster plain"] = lambda: (plain_deepcluster(images, args), None)
        contestants["deepcluster msk"] = lambda: (msk_deepcluster(images, args), None)
    seen = {name: args.n * (args.epochs if name.startswith("sorter") else 1) for name in contestants}
    rate: dict[str, list[float]] = {name: [] for name in contestants}
    epoch_rate: dict[str, list[float]] = {name: [] for name in contestants}
    cpu_rate: dict[str, list[float]] = {name: [] for name in contestants}
    loads = [os.getloadavg()[0]]
    print(f"{args.n} images {args.source}->{args.image_size} px, {args.encoder}, batch {args.batch_size}, "
          f"{args.threads} torch thread(s), load average {os.getloadavg()}", flush=True)
    for r in range(args.rounds):
        for name, run in contestants.items():
            cpu = time.process_time()
            try:
                wall, epochs = run()
            except Exception as exc:  # e.g. a Ray worker killed for memory: the round still counts the others
                print(f"round {r + 1}: {name} failed: {str(exc)[:300]}", flush=True)
                wall, epochs = float("nan"), (None if name.endswith("plain") else float("nan"))
            rate[name].append(seen[name] / wall)
            if "Ray" not in name:  # a Ray worker's CPU time is not this process's
                cpu_rate[name].append(seen[name] / (time.process_time() - cpu))
            if epochs is not None:
                epoch_rate[name].append(seen[name] / epochs)
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}: {name}: {rate[name][-1]:.2f} img/s end to end"
                  + (f", {cpu_rate[name][-1]:.2f} img per CPU-s" if "Ray" not in name else "")
                  + (f", {epoch_rate[name][-1]:.2f} in the epochs" if epochs is not None else "")
                  + f" (load {loads[-1]:.1f})", flush=True)
    print("\n| contestant | img/s | ratio to plain | img per CPU-s | CPU ratio | epoch img/s | epoch ratio |"
          "\n|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in contestants:
        base = "sorter plain" if name.startswith("sorter") else "deepcluster plain"
        ratio = [a / b for a, b in zip(rate[name], rate[base])]
        epoch_ratio = [a / b for a, b in zip(epoch_rate[name], rate[base])]
        cpu_ratio = [a / b for a, b in zip(cpu_rate[name], cpu_rate[base])]
        rows.append({"contestant": name, "img_s": rate[name], "ratio": ratio, "img_per_cpu_s": cpu_rate[name],
                     "cpu_ratio": cpu_ratio, "epoch_img_s": epoch_rate[name], "epoch_ratio": epoch_ratio})
        print(f"| {name} | {_stat(rate[name], '.2f')} | {_stat(ratio, '.2f')} | {_stat(cpu_rate[name], '.2f')} | "
              f"{_stat(cpu_ratio, '.2f')} | {_stat(epoch_rate[name], '.2f')} | {_stat(epoch_ratio, '.2f')} |")
    print(f"\nmean ± sd over {args.rounds} interleaved rounds; 1-min load average {min(loads):.1f}-{max(loads):.1f} "
          f"(mean {np.mean(loads):.1f}) on {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "loads": loads,
                                         "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
