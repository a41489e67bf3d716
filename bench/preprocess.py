"""Model-input preprocessing on real radiographs: how much source a pipeline leaves, and what it buys.

Two measurements on an ingest of ``../shared/data/real-xr/images`` (``msk ingest ... --image-size
128``; the source of an image is the first folder of its manifest ``path``, its region and group
come from ``real-xr/labels.csv``):

* ``histograms``: how well the grey-level histogram of the foreground (16 bins, mean, standard
  deviation) alone tells the 4 real sources apart, and real from synthetic images (``--synth``,
  an ingest of ``msk synth``), after each preprocessing. Logistic regression, 5-fold stratified
  CV, balanced accuracy: lower means less source information left in the intensities.
* ``robustness``: a small sorter (tiny-cnn, 64 px, 8 epochs) per input pipeline (preprocessing x
  augmentation), trained on a group-aware, region-stratified 80 % of real-xr and scored (top-1)
  on the other 20 % as stored and after source-like changes of the test images (darker, flatter,
  JPEG, noise, inverted, letterboxed). Scores on real-xr are source-confounded (see its README):
  read the *drop* from the clean column, not the level.

Never run by pytest. The numbers in docs/preprocessing.md::

    export MSK_PSEUDONYM_KEY=$(openssl rand -hex 32)
    msk ingest ../shared/data/real-xr/images /tmp/real128 --image-size 128
    msk synth /tmp/synth400 --n 400 --seed 3 && msk ingest /tmp/synth400 /tmp/synth128 --image-size 128
    python bench/preprocess.py histograms /tmp/real128 --synth /tmp/synth128
    python bench/preprocess.py robustness /tmp/real128 --work /tmp/bench-preprocess --seeds 0 1 2 --epochs 12 \
        --arm 'window, weaker source-like augmentation (letterbox 0.2, border 0.2, invert 0.05)={"augmentation":
               {"letterbox": {"p": 0.2}, "border": {"p": 0.2}, "invert": 0.05}}' \
        --arm 'window, stronger (letterbox 0.5, border 0.4, invert 0.2, jpeg 0.3, noise 0.3)={"augmentation":
               {"letterbox": {"p": 0.5}, "border": {"p": 0.4}, "invert": 0.2, "jpeg": {"p": 0.3}, "noise": {"p": 0.3}}}'
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import time
from pathlib import Path

import numpy as np

LABELS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-xr" / "labels.csv"


def load(ingest: str):
    """``(images uint8 [N, S, S], relative source paths)`` of an ingest output."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from msk.core.io.dataset import images_from_table, read_shards

    table = read_shards(ingest, columns=["image_id", "image", "height", "width"])
    manifest = pa.concat_tables([pq.read_table(f) for f in sorted(Path(ingest, "manifest").glob("*.parquet"))])
    path = dict(zip(manifest.column("image_id").to_pylist(), manifest.column("path").to_pylist()))
    return images_from_table(table), [path[i] for i in table.column("image_id").to_pylist()]


def histograms(args) -> None:
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from msk.core.data.augment import to_tensor
    from msk.core.data.preprocess import PreprocessConfig, preprocess_image

    torch.set_num_threads(1)
    real, paths = load(args.real)
    source = np.array([p.split("/")[0] for p in paths])
    synth = load(args.synth)[0] if args.synth else None
    print(f"real: {len(real)} images, sources {dict(zip(*np.unique(source, return_counts=True)))}; "
          f"synthetic: {0 if synth is None else len(synth)}")

    def features(images, config):
        rows = []
        for image in images:
            x = to_tensor(image)
            values = preprocess_image(x, config)[x > config.background_level].numpy()
            counts, _ = np.histogram(values, bins=16, range=(0, 1))
            rows.append(np.r_[counts / max(len(values), 1), values.mean(), values.std()])
        return np.array(rows)

    configs = {"none": PreprocessConfig.none(),
               "window 0.5-99.5 %": PreprocessConfig(low_percentile=0.5, high_percentile=99.5),
               "window 1-99 % (default)": PreprocessConfig(),
               "window 2-98 %": PreprocessConfig(low_percentile=2, high_percentile=98),
               "CLAHE only": PreprocessConfig(window=False, clahe=True),
               "window 1-99 % + CLAHE": PreprocessConfig(clahe=True)}
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced"))
    print("| preprocessing | real-xr: which of the 4 sources (chance 0.25) | synthetic vs real (chance 0.5) |")
    print("|---|---:|---:|")
    for name, config in configs.items():
        fr = features(real, config)
        a = cross_val_score(model, fr, source, cv=cv, scoring="balanced_accuracy").mean()
        b = "-"
        if synth is not None:
            fs = features(synth, config)
            y = np.r_[np.zeros(len(fr)), np.ones(len(fs))]
            b = f"{cross_val_score(model, np.r_[fr, fs], y, cv=cv, scoring='balanced_accuracy').mean():.3f}"
        print(f"| {name} | {a:.3f} | {b} |", flush=True)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("L"))


def _letterbox(image: np.ndarray, aspect: float = 1.6) -> np.ndarray:
    from PIL import Image

    side = image.shape[0]
    inner = round(side / aspect)
    out = np.zeros_like(image)
    left = (side - inner) // 2
    out[:, left:left + inner] = np.asarray(Image.fromarray(image).resize((inner, side), Image.Resampling.BILINEAR))
    return out


def robustness(args) -> None:
    import torch

    from msk.core.data.preprocess import AugmentConfig, PreprocessConfig
    from msk.core.data.splits import patient_split
    from msk.core.models.train import TrainConfig, fit_classifier, predict_logits

    torch.set_num_threads(1)
    images, paths = load(args.real)
    with open(args.labels, newline="") as f:
        rows = {r["path"].removeprefix("images/"): r for r in csv.DictReader(f)}
    meta = [rows[p] for p in paths]
    regions = sorted({r["region"] for r in meta})
    y = np.array([regions.index(r["region"]) for r in meta])
    groups = np.array([f"{r['source']}:{r['group']}" for r in meta], dtype=object)
    train, test = patient_split(groups, [r["region"] for r in meta], 0.2, seed=0)
    print(f"{len(train)} training and {len(test)} test images (group-aware, region-stratified), "
          f"{len(regions)} regions")
    rng = np.random.default_rng(0)

    def grey(image):
        return image.astype(np.float32) / 255.0

    def to_uint8(x):
        return np.clip(np.round(255.0 * x), 0, 255).astype(np.uint8)

    changes = {
        "as stored": lambda im: im,
        "darker (0.5x, gamma 1.6)": lambda im: to_uint8((0.5 * grey(im)) ** 1.6),
        "flatter (0.4 + 0.4x)": lambda im: to_uint8(0.4 + 0.4 * grey(im)),
        "JPEG q10": lambda im: _jpeg(im, 10),
        "noise 0.05": lambda im: to_uint8(grey(im) + rng.normal(0, 0.05, im.shape)),
        "inverted": lambda im: 255 - im,
        "letterboxed 1:1.6": _letterbox,
    }
    tests = {name: np.stack([change(im) for im in images[test]]) for name, change in changes.items()}
    arms = {} if args.only_extra else {
        "no preprocessing, classic augmentation (before)": (PreprocessConfig.none(), AugmentConfig.legacy()),
        "window, classic augmentation": (PreprocessConfig(), AugmentConfig.legacy()),
        "no preprocessing, new augmentation": (PreprocessConfig.none(), AugmentConfig()),
        "window, new augmentation (defaults)": (PreprocessConfig(), AugmentConfig()),
        "window + CLAHE, new augmentation": (PreprocessConfig(clahe=True), AugmentConfig()),
    }
    for arm in args.arm:  # NAME={"preprocess": {...}, "augmentation": {...}}
        name, _, spec = arm.partition("=")
        spec = json.loads(spec or "{}")
        arms[name] = (PreprocessConfig.model_validate(spec.get("preprocess", {})),
                      AugmentConfig.model_validate(spec.get("augmentation", {})))
    print("| pipeline | " + " | ".join(changes) + " |")
    print("|---|" + "---:|" * len(changes))
    for name, (preprocess, augmentation) in arms.items():
        began = time.perf_counter()
        scores = {c: [] for c in changes}
        for seed in args.seeds:
            config = TrainConfig(encoder="tiny-cnn", image_size=64, epochs=args.epochs, batch_size=32, lr=3e-3,
                                 seed=seed, num_workers=0, preprocess=preprocess, augmentation=augmentation)
            fitted = fit_classifier(images[train], y[train], len(regions), config,
                                    out=Path(args.work) / f"{re.sub('[^a-z0-9]+', '-', name.lower())}-seed-{seed}")
            for c, x in tests.items():
                scores[c].append(float((predict_logits(fitted.model, x).argmax(1) == y[test]).mean()))
        print(f"| {name} | " + " | ".join(f"{np.mean(v):.3f}" for v in scores.values())
              + f" |  <!-- {time.perf_counter() - began:.0f} s -->", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    h = sub.add_parser("histograms", help="source information left in the intensity histograms")
    h.add_argument("real", help="ingest output of real-xr/images")
    h.add_argument("--synth", help="ingest output of a synthetic export")
    r = sub.add_parser("robustness", help="small sorters per input pipeline under source-like changes")
    r.add_argument("real", help="ingest output of real-xr/images")
    r.add_argument("--labels", default=str(LABELS), help="real-xr/labels.csv")
    r.add_argument("--work", default="/tmp/bench-preprocess", help="run folders")
    r.add_argument("--epochs", type=int, default=8)
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--arm", action="append", default=[],
                   help='another pipeline: NAME=JSON with "preprocess" and "augmentation" keys')
    r.add_argument("--only-extra", action="store_true", help="run only the --arm pipelines")
    args = parser.parse_args()
    histograms(args) if args.what == "histograms" else robustness(args)


if __name__ == "__main__":
    main()
