"""Metadata-only baselines on the real BTXRD metadata: what age, sex, site and view say about
the tumour entity, before any image is seen.

Protocol (all splits patient-level, see ``msk.core.io.clinical.read_btxrd`` for the pseudo-patient
groups BTXRD needs because it publishes no patient id):

1. hold out a test set: a stratified 20 % of the pseudo-patients (``--holdout random``) or
   every image of centre 2 (``--holdout center``: an external test set);
2. 5-fold stratified group cross-validation on the rest for XGBoost, the metadata-only MLP
   (the ``concat`` fusion head with ``image_dim=0``) and the majority class: mean +- SD over
   folds of accuracy and macro precision, recall and F1;
3. on the held-out set: the 5 fold models one by one (mean +- SD) and as an ensemble
   (summed logits; XGBoost: summed margins);
4. with ``--explain DIR``: GradientShap of the first fold's MLP on the held-out set, per
   entity, as CSV and PNG.

Never run by pytest. Example (the tables in docs/fusion.md)::

    python bench/metadata_baseline.py
    python bench/metadata_baseline.py --holdout center
    python bench/metadata_baseline.py --grouping image
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from msk.core.data.metadata import MetadataSchema
from msk.core.data.splits import patient_split
from msk.core.io.clinical import read_btxrd
from msk.core.models.baselines import (
    METRICS,
    MlpConfig,
    XgbConfig,
    cross_validate,
    fit_majority,
    fit_mlp,
    fit_xgboost,
)
from msk.plugins.entity_sets import btxrd

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "btxrd-meta"
console = Console()


def _ms(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with dataset.csv")
    ap.add_argument("--holdout", choices=["random", "center"], default="random")
    ap.add_argument("--grouping", choices=["run", "image"], default="run")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--explain", type=Path, default=None, help="write GradientShap CSV + PNG here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny MLPs: threads only add overhead

    df = read_btxrd(args.data / "dataset.csv", grouping=args.grouping)
    df = df[df["entity"].notna()].reset_index(drop=True)
    y = df["entity"].map(btxrd.index).to_numpy()
    groups = df["patient_group"].to_numpy()
    if args.holdout == "center":
        test = np.flatnonzero(df["center"] == "2")
        dev = np.flatnonzero(df["center"] != "2")
    else:
        dev, test = patient_split(groups, y, test_size=0.2, seed=args.seed)

    centres = {c: int(n) for c, n in df["center"].value_counts().sort_index().items()}
    console.print(f"BTXRD metadata: {len(df)} images, centres {centres}, "
                  f"{df['patient_group'].nunique()} patient groups (grouping={args.grouping})")
    console.print(f"development {len(dev)} images / held-out {len(test)} images "
                  f"(holdout={args.holdout}); {args.folds}-fold stratified group CV, "
                  f"seed {args.seed}")

    schema = MetadataSchema(unknown="ignore")  # rare joints may be absent from a training fold
    models = [("majority class", fit_majority, None), ("xgboost", fit_xgboost, XgbConfig()),
              ("mlp (concat head, image_dim=0)", fit_mlp, MlpConfig())]
    results, held, seconds = {}, {}, {}
    with warnings.catch_warnings(record=True) as caught, Progress(console=console) as progress:
        warnings.simplefilter("always")
        task = progress.add_task("cross-validating", total=len(models) * args.folds)
        for name, fit, config in models:
            start = time.perf_counter()
            res = cross_validate(name, fit, df.iloc[dev], y[dev], groups[dev], len(btxrd),
                                 schema, config, n_splits=args.folds, seed=args.seed,
                                 progress=lambda _: progress.advance(task))
            results[name] = res
            held[name] = res.evaluate(df.iloc[test], y[test])
            seconds[name] = time.perf_counter() - start
    unknown = sum("site value" in str(w.message) for w in caught)

    table = Table(title=f"Metadata-only entity classification, BTXRD, 9 classes "
                        f"(holdout={args.holdout}, grouping={args.grouping})")
    table.add_column("model")
    table.add_column("set")
    for m in METRICS:
        table.add_column(m if m == "accuracy" else f"macro {m}", justify="right")
    table.add_column("s", justify="right")
    for name, res in results.items():
        s = res.summary()
        table.add_row(name, f"CV {args.folds}-fold", *(_ms(s[m]) for m in METRICS),
                      f"{seconds[name]:.1f}")
        single, ensemble = held[name]["single"], held[name]["ensemble"]
        table.add_row("", "held-out, fold models", *(_ms(single[m]) for m in METRICS), "")
        table.add_row("", "held-out, ensemble", *(f"{ensemble[m]:.3f}" for m in METRICS), "")
    console.print(table)
    mlp = results["mlp (concat head, image_dim=0)"]
    console.print(f"MLP epochs run per fold: {[m.epochs for m in mlp.models]}; "
                  f"XGBoost trees per fold: "
                  f"{[m.best_iteration + 1 for m in results['xgboost'].models]}")
    counts = df["entity"].iloc[test].value_counts()
    console.print("held-out images per entity: "
                  + ", ".join(f"{e} {int(counts.get(e, 0))}" for e in btxrd.names))
    console.print(f"transform calls that met a site unseen in their training fold: {unknown}")

    if args.explain:
        from msk.core.models.explain import explain_metadata

        model = mlp.models[0]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*site value")
            expl = explain_metadata(model.module, model.encoder, df.iloc[test], y[test],
                                    btxrd.names, background=df.iloc[dev], n_samples=50,
                                    seed=args.seed)
        args.explain.mkdir(parents=True, exist_ok=True)
        expl.table.to_csv(args.explain / "metadata_importance.csv", float_format="%.4f")
        png = expl.plot(args.explain / "metadata_importance.png")
        console.print(expl.table.round(3).to_string())
        console.print(f"wrote {args.explain / 'metadata_importance.csv'} and {png}")


if __name__ == "__main__":
    main()
