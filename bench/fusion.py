"""Fusion evidence on a synthetic export: image only vs metadata only vs fused models.

From scratch (``--synth N``): ``msk synth`` writes N DICOM files with ground truth into
``WORK/synth``, ``msk ingest`` turns them into 128 px shards in ``WORK/ingest``; or point
``--synth-dir``/``--ingest-dir`` at an existing pair. Then, on the lesion images only:

* metadata from the ground truth (age, sex, site = the image's region, bone position, view),
  joined to the shards through the ingest manifest (``msk.core.stages.fusion.data.read_synth_truth``);
* ROI crops: the lesion box, mapped into the letterboxed 128 px image, made square with a
  15 % margin and resized to 64 px grey;
* ``msk.core.stages.fusion.training.evaluate_fusion``: a patient-level held-out test split (20 % of the
  patients), 5-fold patient-level CV on the rest for the image-only CNN, the metadata-only MLP
  (same head, ``image_dim=0``), XGBoost on the metadata, the fused CNN with each head and,
  with ``--transformer``, an image-only ViT; the 5 fold models' summed logits on the held-out
  split; GradientShap per metadata feature and Grad-CAM overlays.

Never run by pytest. Example (the numbers in docs/fusion.md)::

    python bench/fusion.py --synth 5000 --work out/bench-fusion
    python bench/fusion.py --synth-dir /work/evidence/synth5k --ingest-dir /work/evidence/ingest5k \
        --work out/bench-fusion-shared --transformer
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from msk.core.data.metadata import MetadataSchema
from msk.core.models.baselines import METRICS, XgbConfig
from msk.core.registry import entity_set
from msk.core.stages.fusion.config import FusionConfig, TransformerConfig
from msk.core.stages.fusion.data import load_fusion_data, read_synth_truth
from msk.core.stages.fusion.training import evaluate_fusion

console = Console()


def make_export(n: int, work: Path, seed: int) -> tuple[Path, Path]:
    """``msk synth`` + ``msk ingest`` (128 px) into ``work``; reused when already there."""
    from msk.core.stages.ingest.pipeline import IngestConfig, ingest
    from msk.core.synth import SynthConfig, synthesize

    synth_dir, ingest_dir = work / "synth", work / "ingest"
    if not (synth_dir / "ground_truth.csv").is_file():
        began = time.perf_counter()
        report = synthesize(synth_dir, SynthConfig(n_images=n, seed=seed, workers=2))
        console.print(f"synth: {report.n_files} files, {report.n_lesions} with a lesion, "
                      f"{time.perf_counter() - began:.0f} s")
    if not (ingest_dir / "ingest.json").is_file():
        began = time.perf_counter()
        os.environ.setdefault("MSK_PSEUDONYM_KEY", "bench-fusion-key-not-secret")  # synthetic data
        report = ingest(synth_dir / "export", ingest_dir, IngestConfig(image_size=128))
        console.print(f"ingest: {report.n_ok} ok, {report.n_quarantined} quarantined, "
                      f"{time.perf_counter() - began:.0f} s")
        import ray

        ray.shutdown()  # free its workers' CPU; a Ray Train run (--num-workers) starts its own
    return synth_dir, ingest_dir


def config_from(args: argparse.Namespace) -> FusionConfig:
    train = dict(encoder=args.encoder, init=args.init, image_size=64, epochs=args.epochs,
                 batch_size=32, lr=2e-3, patience=args.patience, num_workers=args.num_workers)
    return FusionConfig(
        train=train,
        metadata=MetadataSchema(sites=entity_set("samx-regions").names, positions=True),
        entity_set="bone-tumours",
        heads=args.heads.split(","),
        xgboost=XgbConfig(n_jobs=2),
        transformer=TransformerConfig() if args.transformer else None,
        folds=args.folds,
        seed=args.seed,
    )


def print_table(result, title: str) -> None:
    table = Table(title=title)
    table.add_column("model")
    table.add_column("set")
    for m in METRICS:
        table.add_column(m if m == "accuracy" else f"macro {m}", justify="right")
    table.add_column("train s", justify="right")
    previous = None
    for r in result.table.to_dict("records"):
        cells = [f"{r[m]:.3f}" if np.isnan(r[f"{m}_sd"]) else f"{r[m]:.3f} ± {r[f'{m}_sd']:.3f}"
                 for m in METRICS]
        table.add_row(r["model"] if r["model"] != previous else "", r["set"], *cells,
                      "" if np.isnan(r["seconds"]) else f"{r['seconds']:.0f}")
        previous = r["model"]
    console.print(table)


def paired_differences(result) -> None:
    """Per-fold macro F1 of each model minus the image-only model's on the same fold."""
    folds = result.folds.pivot(index="fold", columns="model", values="f1")
    base = [c for c in folds.columns if c.startswith("image only") and "vit" not in c]
    if not base:
        return
    for model in folds.columns:
        if model == base[0]:
            continue
        d = folds[model] - folds[base[0]]
        console.print(f"CV macro F1, {model} minus {base[0]}: {d.mean():+.3f} ± {d.std(ddof=1):.3f} "
                      f"(per fold: {', '.join(f'{v:+.3f}' for v in d)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synth", type=int, default=None, metavar="N",
                    help="make a new export of N files in WORK (synth + ingest)")
    ap.add_argument("--synth-seed", type=int, default=7,
                    help="seed of the new export (7: the shared evidence export)")
    ap.add_argument("--synth-dir", type=Path, help="existing `msk synth` output")
    ap.add_argument("--ingest-dir", type=Path, help="its `msk ingest` output")
    ap.add_argument("--work", type=Path, default=Path("out/bench-fusion"))
    ap.add_argument("--encoder", default="tiny-cnn")
    ap.add_argument("--init", default="random", help="msk checkpoint for the encoder")
    ap.add_argument("--heads", default="concat,gated")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--transformer", action="store_true",
                    help="add the image-only ViT baseline (more than doubles the run time)")
    ap.add_argument("--num-workers", type=int, default=0,
                    help="Ray Train workers per training run (0: in this process)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: small models on a shared 2-core machine run "
                         "steadier than with 2, which oversubscribe)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    if args.synth:
        synth_dir, ingest_dir = make_export(args.synth, args.work, args.synth_seed)
    elif args.synth_dir and args.ingest_dir:
        synth_dir, ingest_dir = args.synth_dir, args.ingest_dir
    else:
        ap.error("give --synth N, or --synth-dir and --ingest-dir")

    config = config_from(args)
    meta = read_synth_truth(synth_dir, ingest_dir)
    data = load_fusion_data(ingest_dir, meta, config)
    counts = np.bincount(data.labels, minlength=len(data.classes))
    console.print(f"{len(data.images)} lesion images ({data.images.shape[1]} px ROI crops) of "
                  f"{len(set(data.groups))} patients from {ingest_dir}; "
                  + ", ".join(f"{c} {n}" for c, n in zip(data.classes, counts)))

    out = args.work / "eval"
    n_models = (2 + len(config.heads) + bool(config.transformer)) * config.folds
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("training", total=n_models + config.folds)
        result = evaluate_fusion(data, config=config, out=out,
                                 progress=lambda msg: progress.update(task, advance=1, description=msg))
    print_table(result, f"Entity classification on ROI crops, {len(data.classes)} classes, "
                        f"patient-level {config.folds}-fold CV + held-out {config.test_fraction:.0%}")
    print(result.markdown(), flush=True)  # plain: Markdown lines must not wrap
    paired_differences(result)
    epochs = result.folds.groupby("model", sort=False)["epochs"].apply(list)
    console.print("epochs run per fold (XGBoost: trees): "
                  + "; ".join(f"{m} {v}" for m, v in epochs.items()))
    if result.explanation is not None:
        console.print(f"GradientShap, {config.heads[0]} fusion model (mean over folds):")
        print(result.explanation.round(3).to_string(), flush=True)
    console.print(f"files: {', '.join(str(p) for p in result.files.values())}")
    console.print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
