"""Benchmark ``msk embed`` (Ray Data, one actor) against a plain timm forward pass over the same shards.

Both contestants embed every image of the same synthetic ingest output with the same encoder
(``--encoder`` with random weights, 1 grey channel, saved as an msk checkpoint: resnet18 from timm
by default, any encoder of msk's registry), ``--batch`` images per forward pass and one torch
thread:

* **plain**: ``pyarrow`` reads the shards batch by batch (streamed), the image bytes become one
  ``float32 [B, 1, S, S]`` tensor, normalised as in training, the encoder runs and the features
  are L2-normalised; they are kept in memory (``N x D`` floats), nothing is written;
* **msk**: :func:`msk.core.models.embed.embed` end to end, as ``msk embed`` runs it, with each
  ``--engines`` value: ``auto`` (the default; one CPU replica: ``local``, this process reads the
  shards batch by batch with pyarrow, an :class:`~msk.core.models.embed.Embedder` embeds them)
  and ``ray`` (Ray Data reads the shards, one ``Embedder`` actor embeds them); both write
  ``embeddings.parquet``. With ``ray`` in the list Ray is started once before the rounds, as a
  session would (its start-up is not counted; the actor's is).

Reported per size: images/s over the wall time of the whole call, images per CPU second (CPU
of this process and every process it started: Ray's workers, raylet, GCS; so Ray's own
background work counts against msk), the ratio msk / plain of each, and the peak resident
memory of the process tree during the call above what it held before (Ray's idle processes).
The contestants take turns ``--rounds`` times; mean ± sd over the rounds, with the load average. Usage::

    OMP_NUM_THREADS=1 python bench/embed.py --sizes 2000 --image-size 64 --rounds 3
    OMP_NUM_THREADS=1 python bench/embed.py --sizes 2000,20000 --image-size 64 --rounds 1 --encoder tiny-cnn
    OMP_NUM_THREADS=1 python bench/embed.py --sizes 2000 --image-size 128 --rounds 3 --cluster

``--cluster`` runs ``engine: ray`` on a ``ray.cluster_utils.Cluster`` of one node of 2 CPUs and
of two (two raylets and object stores on this 2-core machine, so the 2-node run shares its cores),
one actor per node, the cluster started and stopped inside each timed call, against the same
plain loop. Compare the images per CPU-s: the wall time of the 2-node run is not a speed-up here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_ingest(out: Path, n: int, size: int, per_shard: int = 1000) -> None:
    """A committed ingest output of ``n`` smooth random ``size`` px images in shards of ``per_shard``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from msk.core.io.manifest import shard_path, write_manifest_part
    from msk.core.stages.ingest.pipeline import SHARD_SCHEMA

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (64, size, size), dtype=np.uint8)
    for chunk, start in enumerate(range(0, n, per_shard)):
        ids = range(start, min(n, start + per_shard))
        shard = shard_path(out, chunk, 0)
        shard.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"image_id": f"IMG-{i:07d}", "image": (base[i % 64] + (i // 64) % 255).astype(np.uint8).tobytes(),
                 "height": size, "width": size, "source_height": size, "source_width": size,
                 "patient_id": f"PAT-{i // 2:07d}", "study_id": f"STU-{i:07d}"} for i in ids]
        pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), shard)
        write_manifest_part(out, chunk, [{"path": f"{i}.dcm", "image_id": f"IMG-{i:07d}", "status": "ok",
                                          "shard": shard.relative_to(out).as_posix()} for i in ids])


def make_checkpoint(path: Path, encoder: str, size: int) -> Path:
    import torch

    from msk.core.io.checkpoint import save_checkpoint
    from msk.core.registry import build_encoder

    torch.manual_seed(0)
    model = build_encoder(encoder, in_chans=1)
    return save_checkpoint(path, model, arch=encoder, in_chans=1, config={"image_size": size, "sobel": False},
                           epoch=1)


def plain(ingest: Path, checkpoint: Path, batch: int) -> int:
    """Read the shards with pyarrow, forward with the bare encoder, L2-normalise; returns rows."""
    import pyarrow.parquet as pq
    import torch

    from msk.core.data.augment import GREY_MEAN, GREY_STD
    from msk.core.io.checkpoint import load_checkpoint, load_state
    from msk.core.io.dataset import _shard_files
    from msk.core.registry import build_encoder

    ckpt = load_checkpoint(checkpoint)
    model = build_encoder(ckpt.arch, in_chans=1)
    load_state(model, ckpt, arch=ckpt.arch)
    model.eval()
    out, n = [], 0
    with torch.no_grad():
        for file in _shard_files(ingest):
            for record in pq.ParquetFile(file).iter_batches(batch_size=batch, columns=["image_id", "image", "height",
                                                                                        "width"]):
                h, w = record.column("height")[0].as_py(), record.column("width")[0].as_py()
                column = record.column("image")
                offsets = np.frombuffer(column.buffers()[1], np.int32)[column.offset:column.offset + len(column) + 1]
                data = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
                x = torch.from_numpy(data.reshape(len(column), 1, h, w).astype(np.float32) / 255.0)
                features = model((x - GREY_MEAN) / GREY_STD)
                out.append(torch.nn.functional.normalize(features, dim=1).numpy())
                n += len(column)
    return n


def msk_embed(ingest: Path, checkpoint: Path, batch: int, out: Path, engine: str, **options: float) -> int:
    from msk.core.models.embed import EmbedConfig, embed

    shutil.rmtree(out, ignore_errors=True)
    config = EmbedConfig.model_validate({"batch_size": batch, "engine": engine, **options})
    return embed(ingest, checkpoint, out, config, progress=False).n_images


def msk_embed_on_nodes(ingest: Path, checkpoint: Path, batch: int, out: Path, nodes: int) -> int:
    """``engine: ray`` on a fresh ``ray.cluster_utils.Cluster`` of ``nodes`` nodes of 2 CPUs, one
    actor of 1 CPU per node (``concurrency`` = nodes; a Ray Data read task needs a whole CPU beside
    it: on 1-CPU nodes the read never starts); the cluster's start and stop are timed too."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        return msk_embed(ingest, checkpoint, batch, out, "ray", concurrency=nodes)
    finally:
        ray.shutdown()
        cluster.shutdown()


class TreeMeter:
    """CPU seconds and peak RSS of this process and all its descendants (Ray's raylet, GCS and
    workers), sampled every 0.1 s: a process's CPU counts from its first sample to its last, so a
    worker that starts and ends during the call counts (up to the last 0.1 s)."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()

    def _sample(self, cpu: dict[int, list[float]]) -> int:
        rss = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    rss += p.memory_info().rss
                seen = cpu.setdefault(p.pid, [t.user + t.system, 0.0])
                seen[1] = t.user + t.system
            except Exception:  # noqa: BLE001 - a worker that ended
                pass
        return rss

    def run(self, fn: Callable[..., int], *args) -> tuple[int, float, float, float]:
        """``(rows, wall s, CPU s, peak RSS above the start in GiB)`` of ``fn(*args)``."""
        cpu: dict[int, list[float]] = {}
        lock, done = threading.Lock(), threading.Event()
        start = self._sample(cpu)
        peak = [start]

        def sample() -> None:
            while not done.wait(0.1):
                with lock:
                    peak[0] = max(peak[0], self._sample(cpu))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        began = time.perf_counter()
        rows = fn(*args)
        wall = time.perf_counter() - began
        done.set()
        sampler.join()
        peak[0] = max(peak[0], self._sample(cpu))
        used = sum(last - first for first, last in cpu.values())
        return rows, wall, used, (peak[0] - start) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2000", help="comma-separated image counts")
    ap.add_argument("--image-size", type=int, default=64, help="shard image side = network input side")
    ap.add_argument("--encoder", default="resnet18", help="timm encoder (random weights)")
    ap.add_argument("--batch", type=int, default=64, help="images per forward pass (EmbedConfig.batch_size)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default="auto,ray", help="EmbedConfig.engine values to run, comma-separated")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--cluster", action="store_true",
                    help="instead of --engines: engine ray on 1 node vs 2 nodes of 2 CPUs (ray.cluster_utils)")
    args = ap.parse_args()

    import torch

    from msk.core.runtime.ray_start import start_ray

    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="msk-bench-embed-"))
    checkpoint = make_checkpoint(work / "encoder.pt", args.encoder, args.image_size)
    print(f"{args.encoder} (random weights) at {args.image_size} px, batch {args.batch}, 1 torch thread; "
          f"{os.cpu_count()} CPUs; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    engines = [] if args.cluster else args.engines.split(",")
    if "ray" in engines:
        start_ray(include_dashboard=False, log_to_driver=False)  # as `msk embed` starts it; once, before the rounds
    meter = TreeMeter()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        ingest = work / f"ingest-{n}"
        if not ingest.exists():
            write_ingest(ingest, n, args.image_size)
        results: dict[str, list[tuple[int, float, float, float]]] = {"plain": []}
        loads = []
        for _ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            results["plain"].append(meter.run(plain, ingest, checkpoint, args.batch))
            for engine in engines:
                run = meter.run(msk_embed, ingest, checkpoint, args.batch, work / "out", engine)
                results.setdefault(f"msk {engine}", []).append(run)
                assert run[0] == n, (run, n)
            for nodes in (1, 2) if args.cluster else ():
                run = meter.run(msk_embed_on_nodes, ingest, checkpoint, args.batch, work / "out", nodes)
                results.setdefault(f"msk ray, {nodes} node{'s' * (nodes > 1)}", []).append(run)
                assert run[0] == n, (run, n)
        rows.append((n, results, loads))

    print(f"\n{'N':>7} {'contestant':<18} {'img/s':>15} {'ratio':>13} {'img per CPU-s':>15} {'CPU ratio':>13} "
          f"{'peak +RSS GiB':>13} {'load (1 min)':>13}")
    for n, results, loads in rows:
        base = results["plain"]
        for name, runs in results.items():
            rate = [r[0] / r[1] for r in runs]
            per_cpu = [r[0] / r[2] for r in runs]
            ratio = [a / (b[0] / b[1]) for a, b in zip(rate, base)]
            cpu_ratio = [a / (b[0] / b[2]) for a, b in zip(per_cpu, base)]
            print(f"{n:>7} {name:<18} {_pm(rate):>15} {_pm(ratio, 2):>13} {_pm(per_cpu):>15} "
                  f"{_pm(cpu_ratio, 2):>13} {max(r[3] for r in runs):>13.2f} "
                  f"{f'{min(loads):.1f}-{max(loads):.1f}':>13}")
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def _pm(values: list[float], digits: int = 1) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


if __name__ == "__main__":
    main()
