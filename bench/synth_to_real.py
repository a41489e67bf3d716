"""Synthetic -> real: a sorter trained on ``msk synth`` images only, scored on all of ``real-xr``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/synth_to_real.py --styles basic,radiograph

For each phantom style (``SynthConfig.style``; ``basic`` is the original drawing and export,
``radiograph`` the realistic one) it renders ``--n`` synthetic images in memory (the true region
of each is its label; every image goes through the DICOM writer and :func:`msk.core.io.dicom.read_image`
exactly as ``msk synth`` + ``msk ingest`` would), trains a classifier on all 28 synthetic regions
with :func:`msk.core.models.train.fit_classifier` (in this process, no Ray), decodes every real-xr image
with ``read_image`` + :func:`msk.core.data.squaring.square_image` at the same size, and scores top-1 and
top-2 per real region with the predictions restricted to the 9 regions real-xr has (chance 11 %).
No real image is used for training or model selection. The tables of all styles are printed side
by side; :func:`synthetic_only_on_real` is the function other benchmarks (``bench/real.py``) import.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-xr"
CACHE = Path(tempfile.gettempdir()) / "msk-synth-to-real"


def real_images(root: Path, size: int) -> tuple[np.ndarray, list[str]]:
    """Every real-xr image as ``uint8 [N, size, size]`` (read_image + square_image) and its
    region; cached under the temp folder by size and the labels file's digest."""
    from msk.core.data.squaring import square_image
    from msk.core.io.dicom import read_image

    labels = root / "labels.csv"
    key = hashlib.sha1(labels.read_bytes()).hexdigest()[:12]
    cache = CACHE / f"real-{key}-{size}.npz"
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        return z["x"], [str(r) for r in z["y"]]
    with labels.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    x = np.stack([square_image(read_image(root / r["path"]).pixels, size) for r in rows])
    y = [r["region"] for r in rows]
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, y=np.array(y))
    return x, y


def synthetic_images(n: int, size: int, *, render_size: int, style: str, seed: int = 0,
                     regions: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """``n`` synthetic images (no corrupt files) as ``uint8 [n, size, size]`` and their true
    regions, decoded by ``read_image`` from the DICOM bytes ``msk synth`` would write.
    With ``regions`` only images of those regions are kept (indices are drawn until ``n``)."""
    from msk.core.data.squaring import square_image
    from msk.core.io.dicom import read_image
    from msk.core.synth import SynthConfig, render_case
    from msk.core.synth.cases import plan_case
    from msk.core.synth.dicom_writer import encode

    cfg = SynthConfig(n_images=max(n * 40, 1000), seed=seed, image_size=render_size, corrupt_fraction=0.0,
                      transfer_syntaxes=["explicit-le"], priors="defaults", style=style)
    x, y = [], []
    i = 0
    while len(x) < n:
        if regions is None or plan_case(i, cfg).region in regions:
            case = render_case(i, cfg)
            x.append(square_image(read_image(encode(case)).pixels, size))
            y.append(case.region)
        i += 1
    return np.stack(x), y


def synthetic_only_on_real(real_root: Path = DEFAULT_REAL, *, style: str = "radiograph", n_images: int = 3000,
                           render_size: int = 128, image_size: int = 64, epochs: int = 6,
                           encoder: str = "resnet18", batch_size: int = 64, lr: float = 1e-3,
                           seed: int = 0, train_regions: str = "all", verbose: bool = True,
                           encoder_options: dict | None = None) -> pd.DataFrame:
    """Train on synthetic images of ``style`` only; score on every real-xr image.

    Returns one row per real region (``n``, ``top1``, ``top2`` in [0, 1]) plus ``all`` (over
    images) and ``mean`` (macro over regions); ``attrs`` carries the synthetic accuracy of the
    training set's last 10 % (held out) and the timings. ``train_regions="real"`` trains on the
    9 real-xr regions only (the default trains on all 28 and restricts predictions to the 9).
    ``encoder_options`` are the encoder's (e.g. ``{"pretrained": "imagenet"}``).
    """
    import torch

    from msk.core.models.train import TrainConfig, fit_classifier, predict_logits
    from msk.core.synth.phantoms import REGIONS

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    rx, ry = real_images(real_root, image_size)
    real_classes = sorted(set(ry))
    classes = sorted(REGIONS) if train_regions == "all" else real_classes
    sx, sy = synthetic_images(n_images, image_size, render_size=render_size, style=style, seed=seed,
                              regions=None if train_regions == "all" else real_classes)
    t_data = time.perf_counter() - t0
    labels = np.array([classes.index(r) for r in sy])
    n_val = max(len(sx) // 10, 1)
    config = TrainConfig(encoder=encoder, image_size=image_size, epochs=epochs, batch_size=batch_size,
                         lr=lr, num_workers=0, seed=seed, keep_checkpoints=1, encoder_options=encoder_options or {})
    with tempfile.TemporaryDirectory(prefix="msk-s2r-") as out:
        result = fit_classifier(sx[:-n_val], labels[:-n_val], len(classes), config, out=out,
                                val=(sx[-n_val:], labels[-n_val:]), classes=classes)
        model = result.model
        synth_acc = float((predict_logits(model, sx[-n_val:], image_size=image_size).argmax(1)
                           == labels[-n_val:]).mean())
        logits = predict_logits(model, rx, image_size=image_size)
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1).numpy()
    table = score_real(probs, classes, ry)
    table.attrs.update(style=style, synthetic_val_top1=synth_acc, data_s=t_data,
                       total_s=time.perf_counter() - t0, n_train=len(sx) - n_val, probs=probs,
                       classes=classes, truth=ry)
    confusion = table.attrs["confusion"]
    if verbose:
        print(f"[{style}] synthetic held-out top-1 {synth_acc:.3f}; real top-1 {table.top1.iloc[-2]:.3f} "
              f"({table.attrs['total_s']:.0f} s)\nreal images, true region (rows) by predicted region:\n"
              f"{confusion.to_string()}", flush=True)
    return table


def score_real(probs: np.ndarray, classes: list[str], ry: list[str]) -> pd.DataFrame:
    """Per real region ``n``, ``top1``, ``top2`` (predictions restricted to the real regions),
    ``top1_unrestricted`` (argmax over every trained class) and the most predicted region, plus
    ``all`` (over images) and ``mean`` (over regions); ``attrs["confusion"]`` is the true x
    predicted count table. ``probs`` are class probabilities ``[N, len(classes)]``."""
    real_classes = sorted(set(ry))
    keep = [classes.index(c) for c in real_classes]
    order = np.argsort(-probs[:, keep], axis=1)
    truth = np.array([real_classes.index(r) for r in ry])
    top1 = order[:, 0] == truth
    top2 = top1 | (order[:, 1] == truth)
    pred_names = np.array(real_classes)[order[:, 0]]
    unrestricted = np.array(classes)[probs.argmax(1)] == np.array(ry)
    rows = []
    for c in real_classes:
        m = truth == real_classes.index(c)
        common = pd.Series(pred_names[m]).value_counts()
        rows.append(dict(region=c, n=int(m.sum()), top1=float(top1[m].mean()), top2=float(top2[m].mean()),
                         top1_unrestricted=float(unrestricted[m].mean()),
                         most_predicted=f"{common.index[0]} {common.iloc[0] / m.sum():.0%}"))
    table = pd.DataFrame(rows)
    table.loc[len(table)] = dict(region="all", n=len(truth), top1=float(top1.mean()), top2=float(top2.mean()),
                                 top1_unrestricted=float(unrestricted.mean()), most_predicted="")
    table.loc[len(table)] = dict(region="mean", n=len(real_classes), top1=float(table.top1[:-1].mean()),
                                 top2=float(table.top2[:-1].mean()),
                                 top1_unrestricted=float(table.top1_unrestricted[:-1].mean()), most_predicted="")
    table.attrs["confusion"] = pd.crosstab(pd.Series(ry, name="true"), pd.Series(pred_names, name="predicted"))
    return table


def side_by_side(tables: dict[str, pd.DataFrame]) -> str:
    """One text table: per region ``n`` then top-1/top-2 (%) of each style."""
    first = next(iter(tables.values()))
    head = f"{'region':<10} {'n':>5}" + "".join(f" {s + ' top1':>17} {'top2':>6} {'top1/all':>8} "
                                                 f"{'most predicted':>18}" for s in tables)
    lines = [head]
    for i, region in enumerate(first.region):
        line = f"{region:<10} {int(first.n[i]):>5}"
        for t in tables.values():
            line += (f" {100 * t.top1[i]:>17.1f} {100 * t.top2[i]:>6.1f} {100 * t.top1_unrestricted[i]:>8.1f} "
                     f"{t.most_predicted[i]:>18}")
        lines.append(line)
    lines.append("synthetic held-out top-1: " + ", ".join(
        f"{s} {100 * t.attrs['synthetic_val_top1']:.1f} %" for s, t in tables.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL, help="real-xr folder")
    ap.add_argument("--styles", default="basic,radiograph", help="comma-separated SynthConfig.style values")
    ap.add_argument("--n", type=int, default=3000, help="synthetic training images")
    ap.add_argument("--render-size", type=int, default=128, help="msk synth image_size (long side)")
    ap.add_argument("--size", type=int, default=64, help="network input size")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0",
                    help="comma list of seeds (synthetic images, initialisation, order); with several, "
                         "each seed's real top-1, their mean and spread, and the seed ensemble are printed")
    ap.add_argument("--train-regions", choices=("all", "real"), default="all",
                    help="train on all 28 synthetic regions or only the 9 real-xr ones")
    ap.add_argument("--pretrained", default=None,
                    help="the encoder's starting weights, e.g. imagenet (with --encoder mobilenet_v2)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # one thread unless asked
    seeds = [int(x) for x in args.seeds.split(",")]
    tables: dict[str, pd.DataFrame] = {}
    spread: list[str] = []
    for style in args.styles.split(","):
        runs = [synthetic_only_on_real(
            args.real, style=style, n_images=args.n, render_size=args.render_size, image_size=args.size,
            epochs=args.epochs, encoder=args.encoder, lr=args.lr, seed=seed,
            train_regions=args.train_regions,
            encoder_options={"pretrained": args.pretrained} if args.pretrained else None) for seed in seeds]
        if len(runs) == 1:
            tables[style] = runs[0]
            continue
        first = runs[0].attrs
        ensemble = score_real(np.mean([r.attrs["probs"] for r in runs], axis=0), first["classes"], first["truth"])
        ensemble.attrs["synthetic_val_top1"] = float(np.mean([r.attrs["synthetic_val_top1"] for r in runs]))
        tables[f"{style} x{len(runs)}"] = ensemble
        top1 = np.array([r.top1.iloc[-2] for r in runs])
        mean_top1 = np.array([r.top1.iloc[-1] for r in runs])
        per_seed = ", ".join(f"{seed}: {100 * t:.1f} %" for seed, t in zip(seeds, top1, strict=True))
        spread.append(f"{style}: real top-1 per seed {per_seed}; mean {100 * top1.mean():.1f} % "
                      f"(sd {100 * top1.std(ddof=1):.1f}, range {100 * top1.min():.1f}-{100 * top1.max():.1f}); "
                      f"mean over regions {100 * mean_top1.mean():.1f} %; "
                      f"the {len(runs)}-seed ensemble (mean probability) {100 * ensemble.top1.iloc[-2]:.1f} %\n"
                      f"ensemble, true region (rows) by predicted region:\n{ensemble.attrs['confusion'].to_string()}")
    start = f" from {args.pretrained}" if args.pretrained else ""
    print(f"\nsynthetic-only -> real-xr (all 1258 images), {args.encoder}{start} {args.size} px, {args.n} synthetic "
          f"images ({args.train_regions} regions), {args.epochs} epochs, seeds {args.seeds}; top-1/top-2 % over the "
          f"9 real regions (top1/all: argmax over every trained class; `xN`: the N-seed ensemble)")
    print(side_by_side(tables))
    for line in spread:
        print(line)


if __name__ == "__main__":
    main()
