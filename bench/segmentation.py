"""Lesion segmentation on held-out synthetic patients: U-Net against U-Net++ (same encoder, same
patient splits, same schedule), IoU and Dice per entity and overall.

Steps, all through msk's own pipeline:

1. ``msk synth`` (every patient with a lesion, no corrupt files; lesion outlines are real BTXRD
   polygons where ``../shared/data/btxrd-meta/annotations`` is present) and ``msk ingest`` at
   ``--size`` px, unless ``--synth-dir``/``--ingest-dir`` name an existing pair;
2. ``msk train segmenter`` for each of ``--models``: a fixed patient-level test set (20 %) and
   ``--folds``-fold patient-level cross-validation over the other patients, BCE + Dice, the
   shared training loop (in this process: ``num_workers=0``), ``--epochs`` per fold;
3. ``msk eval segmenter``: the fold ensemble on the test patients (IoU/Dice per image, averaged
   per entity and overall), overlay sheet in ``work/<model>-eval/overlays.html``.

Prints one table per model, a summary table and the wall time of every phase, and the
per-image-step training time that ``docs/segmentation.md`` extrapolates to the paper's
settings. Never run by pytest. The numbers in docs/segmentation.md::

    python bench/segmentation.py --synth 240 --size 64 --epochs 6 --folds 2 --work /tmp/bench-seg
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def make_data(work: Path, n: int, seed: int, size: int) -> tuple[Path, Path]:
    """``msk synth`` (lesions only) + ``msk ingest`` into ``work/synth`` and ``work/ingest``."""
    from msk.core.ingest import IngestConfig, ingest
    from msk.core.synth import SynthConfig, synthesize

    synth, ingested = work / "synth", work / "ingest"
    if not (synth / "ground_truth.csv").is_file():
        synthesize(synth, SynthConfig(n_images=n, seed=seed, image_size=max(2 * size, 128), lesion_fraction=1.0,
                                      corrupt_fraction=0.0), overwrite=True, progress=False)
    if not (ingested / "ingest.json").is_file():
        ingest(synth / "export", ingested, IngestConfig(image_size=size, key_file=work / "bench.key",
                                                        create_key=True), progress=False)
    return synth, ingested


def step_time(segmenter: str, encoder: str, size: int, batch: int = 4) -> float:
    """Seconds per image of one training step (forward, backward, AdamW) here."""
    import torch

    from msk.core.segmentation import DiceBCELoss, SegmentationModel

    model, loss = SegmentationModel(segmenter, encoder), DiceBCELoss()
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.rand(batch, 1, size, size), (torch.rand(batch, 1, size, size) > 0.5).float()
    times = []
    for _ in range(3):
        began = time.perf_counter()
        value = loss(model(x), y)
        opt.zero_grad()
        value.backward()
        opt.step()
        times.append(time.perf_counter() - began)
    return min(times[1:]) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synth-dir", type=Path, help="synthetic export with ground_truth.csv (and masks/)")
    parser.add_argument("--ingest-dir", type=Path, help="its ingest output")
    parser.add_argument("--synth", type=int, default=240, help="make N synthetic lesion images + ingest them")
    parser.add_argument("--work", type=Path, default=Path("out/bench-segmentation"), help="work folder")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--size", type=int, default=64, help="ingest and network image side")
    parser.add_argument("--models", default="unet,unetplusplus")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--step-sizes", default="64,256", help="image sides whose training step time is measured")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from msk.core.segmentation import SegmenterConfig, load_segmentation_data, train_segmenter
    from msk.core.segmentation_eval import evaluate_segmenter

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    began = time.perf_counter()
    if args.synth_dir and args.ingest_dir:
        synth, ingested = args.synth_dir, args.ingest_dir
    else:
        synth, ingested = make_data(work, args.synth, args.seed, args.size)
    phases["synth + ingest"] = time.perf_counter() - began
    began = time.perf_counter()
    data = load_segmentation_data(ingested, synth)
    phases["load masks"] = time.perf_counter() - began
    n_patients = len(set(data.patient_ids))
    print(f"data: {len(data)} masked images of {n_patients} patients at {data.images.shape[1]} px; "
          f"mean lesion share {data.masks.mean():.3f} of the image", flush=True)
    for note in data.notes:
        print(f"note: {note}")
    results = {}
    for name in args.models.split(","):
        config = SegmenterConfig(segmenter=name, encoder=args.encoder, image_size=args.size, epochs=args.epochs,
                                 folds=args.folds, batch_size=args.batch_size, lr=args.lr, num_workers=0,
                                 seed=args.seed)
        began = time.perf_counter()
        run = train_segmenter(data, config, out=work / name)
        phases[f"train {name}"] = time.perf_counter() - began
        print(run.summary(), flush=True)
        began = time.perf_counter()
        results[name] = evaluate_segmenter(work / name, ingested, synth, work / f"{name}-eval")
        phases[f"eval {name}"] = time.perf_counter() - began
        print(f"\n{name} ({args.encoder}), {results[name].n_images} test images:\n{results[name].table()}\n", flush=True)
    print(f"{'model':<14} {'encoder':<10} {'size':>5} {'epochs':>6} {'folds':>5} {'test':>5} {'IoU':>7} {'Dice':>7}")
    for name, r in results.items():
        print(f"{name:<14} {args.encoder:<10} {args.size:>5} {args.epochs:>6} {args.folds:>5} {r.n_images:>5} "
              f"{r.iou:>7.3f} {r.dice:>7.3f}")
    for phase, seconds in phases.items():
        print(f"[{phase}: {seconds:.0f} s]")
    for name in results:
        for size in [int(v) for v in args.step_sizes.split(",") if v]:
            print(f"[step time {name} {args.encoder} {size} px: {1000 * step_time(name, args.encoder, size):.0f} "
                  f"ms per image, {args.threads} thread(s)]", flush=True)


if __name__ == "__main__":
    main()
