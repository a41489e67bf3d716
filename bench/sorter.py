"""End to end on the embedded default: DeepCluster -> labelled clusters -> sorter -> transfer.

On a synthetic export (ground truth known) this runs

1. **phase 1, DeepCluster** (:func:`msk.core.models.deepcluster.run_deepcluster`) on every ingested
   image; prints the NMI between the last epoch's clusters and the true regions;
2. **labelling by an oracle**: the human step is *simulated*. Each cluster gets the majority
   ground-truth region of its members, written into the ``labels.csv`` a person would fill in
   and applied with :func:`msk.core.io.labels.apply_labels` exactly as ``msk clusters apply``
   does. An oracle labeller is the best case of labelling by cluster (a person sees only
   a sample of each cluster); the weak labels are still noisy wherever a cluster mixes regions,
   and the bench prints how noisy;
3. **phase 2, the sorter** (:func:`msk.core.stages.sorter.training.sorter_from_ingest`) fine-tuned from the
   DeepCluster checkpoint on those weak labels, a fixed 20 % patient-level test set and 5-fold
   cross-validation; prints top-1/top-2 of the fold ensemble on the held-out test patients,
   against the weak labels *and* against the true regions, and on an optional external
   hold-out (``--holdout N``: a second synthetic export, other seed, labelled with its true
   regions);
4. **transfer** (:func:`msk.core.stages.sorter.transfer.transfer_from_ingest`): a small downstream task on
   at most ``--transfer-n`` whole images, fine-tuned from random init and from the pretrained
   encoders over the same patient folds with the same budget; prints the pretrained-vs-random
   gap. ``--transfer-task entities`` (default): Ewing sarcoma vs osteosarcoma (the synthetic
   lesions), arms random, DeepCluster and the sorter's fold-1 encoder (which never saw an
   entity label); ``--transfer-task regions``: few labelled images of the most frequent
   regions, arms random and DeepCluster (the sorter was trained on these regions).

Data: ``--synth-dir`` (``ground_truth.csv``) + ``--ingest-dir`` of an existing export, or
``--synth N`` to make both from scratch in ``--work`` (synth, then ingest at 128 px).
Never run by pytest. The numbers in docs/sorter.md::

    python bench/sorter.py --synth-dir /work/evidence/synth5k --ingest-dir /work/evidence/ingest5k \\
        --work /tmp/bench-sorter --holdout 400
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


class Clock:
    """Wall time per phase."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str, since: float) -> None:
        self.phases[name] = time.perf_counter() - since
        print(f"[{name}: {self.phases[name]:.0f} s]", flush=True)


def make_data(work: Path, n: int, seed: int, image_size: int, name: str) -> tuple[Path, Path]:
    """``msk synth`` + ``msk ingest`` into ``work/<name>-synth`` and ``work/<name>-ingest``."""
    from msk.core.stages.ingest.pipeline import IngestConfig, ingest
    from msk.core.synth import SynthConfig, synthesize

    synth, ingested = work / f"{name}-synth", work / f"{name}-ingest"
    if not (synth / "ground_truth.csv").is_file():
        synthesize(synth, SynthConfig(n_images=n, seed=seed, workers=2), overwrite=True)
    if not (ingested / "ingest.json").is_file():
        ingest(synth / "export", ingested, IngestConfig(image_size=image_size,
                                                        key_file=work / "bench.key", create_key=True))
    return synth, ingested


def ground_truth(synth: Path, ingest: Path, image_ids: list[str]):
    """The true region and lesion entity of each ingested image (ground_truth.csv ``path`` is
    relative to the synth folder, ``export/...``; the manifest's is relative to ``export/``)."""
    from msk.core.io.manifest import read_manifest

    manifest = read_manifest(ingest, columns=["path", "image_id"])
    id_of = dict(zip(manifest.column("path").to_pylist(), manifest.column("image_id").to_pylist()))
    truth = {}
    with (synth / "ground_truth.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            image_id = id_of.get(row["path"].removeprefix("export/"))
            if image_id is not None:
                truth[image_id] = (row["region"], row["entity"])
    missing = [i for i in image_ids if i not in truth]
    if missing:
        raise SystemExit(f"{len(missing)} ingested images have no ground truth (first {missing[0]})")
    return [truth[i][0] for i in image_ids], [truth[i][1] for i in image_ids]


def oracle_labels(assignments: np.ndarray, regions: list[str], k: int, path: Path) -> Path:
    """The labels.csv an oracle fills in: each cluster's majority true region."""
    from msk.core.stages.cluster.labelling import majority_names, write_cluster_names

    return write_cluster_names(majority_names(assignments, regions, k=k), path)


def write_labels(path: Path, image_ids, labels) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "label"])
        writer.writerows(zip(image_ids, labels))
    return path


def topk_against(probs: np.ndarray, classes: list[str], truth: list[str]) -> tuple[float, float, int]:
    """Top-1/top-2 of ``probs`` against true labels (images of untrained classes count as misses)."""
    order = np.argsort(-probs, axis=1)
    hits1 = [classes[o[0]] == t for o, t in zip(order, truth)]
    hits2 = [t in (classes[o[0]], classes[o[1]]) for o, t in zip(order, truth)]
    return float(np.mean(hits1)), float(np.mean(hits2)), len(truth)


def transfer_subset(image_ids, labels, patients, n: int, classes, seed: int):
    """At most ``n`` images of ``classes``, as many per class, whole patients drawn at random."""
    rng = np.random.default_rng(seed)
    chosen = []
    for name in classes:
        by_patient: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            if label == name:
                by_patient.setdefault(patients[i], []).append(i)
        taken = 0
        for p in rng.permutation(sorted(by_patient)):
            if taken + len(by_patient[p]) > n // len(classes):
                continue
            chosen += by_patient[p]
            taken += len(by_patient[p])
    chosen.sort()
    return [image_ids[i] for i in chosen], [labels[i] for i in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synth-dir", type=Path, help="synthetic export with ground_truth.csv")
    parser.add_argument("--ingest-dir", type=Path, help="its ingest output")
    parser.add_argument("--synth", type=int, help="make N synthetic files + ingest them in --work instead")
    parser.add_argument("--work", type=Path, default=Path("out/bench-sorter"), help="work folder")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--encoder", default="tiny-cnn")
    parser.add_argument("--image-size", type=int, default=64, help="network input side")
    parser.add_argument("--k", type=int, default=200, help="DeepCluster clusters")
    parser.add_argument("--dc-epochs", type=int, default=6)
    parser.add_argument("--sorter-epochs", type=int, default=6)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--num-workers", type=int, default=0,
                        help="Ray Train workers of the sorter's fold runs (0: in this process)")
    parser.add_argument("--holdout", type=int, default=0, help="files of an external hold-out export (0: none)")
    parser.add_argument("--transfer-task", choices=["entities", "regions"], default="entities",
                        help="entities: Ewing sarcoma vs osteosarcoma; regions: few labels of common regions")
    parser.add_argument("--transfer-regions", type=int, default=8, help="classes of --transfer-task regions")
    parser.add_argument("--transfer-n", type=int, default=200, help="downstream images")
    parser.add_argument("--transfer-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads here (1 is fastest on a shared 2-core machine)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from msk.core.io.labels import apply_labels
    from msk.core.models.deepcluster import DeepClusterConfig, from_ingest, run_deepcluster
    from msk.core.models.sorter import load_sorter
    from msk.core.stages.sorter.training import SorterConfig, sorter_from_ingest
    from msk.core.stages.sorter.transfer import TransferConfig, transfer_from_ingest

    clock = Clock()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    if args.synth:
        synth_dir, ingest_dir = make_data(work, args.synth, args.seed, 128, "data")
    elif args.synth_dir and args.ingest_dir:
        synth_dir, ingest_dir = args.synth_dir, args.ingest_dir
    else:
        parser.error("give --synth N, or --synth-dir and --ingest-dir")
    holdout = make_data(work, args.holdout, args.seed + 1000, 128, "holdout") if args.holdout else None
    images, table = from_ingest(ingest_dir, columns=["image_id", "image", "height", "width", "patient_id"])
    image_ids = table.column("image_id").to_pylist()
    patients = table.column("patient_id").to_pylist()
    regions, entities = ground_truth(synth_dir, ingest_dir, image_ids)
    clock.lap("data", began)
    print(f"{len(images)} images of {len(set(patients))} patients, {len(set(regions))} regions, "
          f"{images.shape[1]} px", flush=True)

    # 1. DeepCluster
    began = time.perf_counter()
    dc_config = DeepClusterConfig(encoder=args.encoder, k=args.k, epochs=args.dc_epochs,
                                  image_size=args.image_size, pca_dim=64, num_workers=0,
                                  seed=args.seed)
    dc = run_deepcluster(images, dc_config, out=work / "cluster", ground_truth=regions,
                         image_ids=image_ids, progress=False)
    nmi = dc.history[-1]["nmi_truth"]
    clock.lap("deepcluster", began)

    # 2. the oracle labels the clusters
    began = time.perf_counter()
    labels_csv = oracle_labels(dc.assignments, regions, args.k, work / "labels.csv")
    weak = apply_labels(labels_csv, dc.assignments, k=args.k)
    weak_csv = weak.save(work / "weak_labels.csv", image_ids)
    weak_acc = float(np.mean([w == r for w, r in zip(weak.labels, regions)]))
    clock.lap("labelling", began)

    # 3. the sorter
    began = time.perf_counter()
    sorter_config = SorterConfig(encoder=args.encoder, init=str(dc.checkpoint), image_size=args.image_size,
                                 epochs=args.sorter_epochs, folds=args.folds, num_workers=args.num_workers,
                                 batch_size=64, seed=args.seed, small_classes="drop")
    holdout_args = {}
    if holdout is not None:
        h_images, h_table = from_ingest(holdout[1], columns=["image_id", "image", "height", "width"])
        h_ids = h_table.column("image_id").to_pylist()
        h_regions, _ = ground_truth(holdout[0], holdout[1], h_ids)
        holdout_args = {"holdout_ingest": holdout[1],
                        "holdout_labels": write_labels(work / "holdout_labels.csv", h_ids, h_regions)}
    sorter = sorter_from_ingest(ingest_dir, weak_csv, sorter_config, out=work / "sorter", **holdout_args)
    ensemble = load_sorter(work / "sorter")
    with (work / "sorter" / "predictions_test.csv").open(newline="") as f:
        test_ids = [r["image_id"] for r in csv.DictReader(f)]
    row_of = {i: n for n, i in enumerate(image_ids)}
    test_rows = [row_of[i] for i in test_ids]
    truth_top = topk_against(ensemble.predict_proba(images[test_rows]), ensemble.classes,
                             [regions[i] for i in test_rows])
    clock.lap("sorter", began)

    # 4. transfer on a small downstream task
    began = time.perf_counter()
    arms = {"random": "random", "deepcluster": str(dc.checkpoint)}
    if args.transfer_task == "entities":
        task_name = "ewing sarcoma vs osteosarcoma"
        t_ids, t_labels = transfer_subset(image_ids, entities, patients, args.transfer_n,
                                          ("ewing sarcoma", "osteosarcoma"), args.seed)
        arms["sorter"] = str(work / "sorter" / "fold-1" / "best.pt")  # never saw an entity label
        task_options = {"entity_set": "bone-tumours", "positive": "ewing sarcoma"}
    else:  # few labelled images of the most frequent regions (the sorter arm would have seen them)
        common = [r for r, _ in Counter(regions).most_common(args.transfer_regions)]
        task_name = f"{len(common)} regions, few labels"
        t_ids, t_labels = transfer_subset(image_ids, regions, patients, args.transfer_n, common, args.seed)
        task_options = {"entity_set": "samx-regions"}
    t_csv = write_labels(work / f"transfer_{args.transfer_task}_labels.csv", t_ids, t_labels)
    transfer_config = TransferConfig(encoder=args.encoder, image_size=args.image_size,
                                     epochs=args.transfer_epochs, batch_size=16, folds=args.folds,
                                     arms=arms, seed=args.seed, **task_options)
    transfer = transfer_from_ingest(ingest_dir, t_csv, transfer_config,
                                    out=work / f"transfer-{args.transfer_task}")
    clock.lap("transfer", began)

    from rich.console import Console

    console = Console(width=150)
    console.print(dc.table())
    console.print(sorter.table())
    console.print(transfer.table())
    rows = {r["arm"]: r for r in transfer.rows()}
    total = time.perf_counter() - clock.start
    print("\n=== summary ===")
    print(f"data: {len(images)} images, {len(set(patients))} patients, {len(set(regions))} regions; "
          f"encoder {args.encoder} at {args.image_size} px, torch threads {args.threads}")
    stability = dc.history[-1]["nmi_prev"]
    print(f"DeepCluster: k={args.k}, {args.dc_epochs} epochs: NMI vs true regions {nmi:.3f}"
          + (f" (NMI with the previous epoch's clusters {stability:.3f})" if stability is not None else ""))
    print(f"oracle labelling: {len(weak.class_counts)} weak classes; weak labels agree with the "
          f"true region for {weak_acc:.1%} of the images")
    print(f"sorter ({args.folds}-fold ensemble, {sorter.test.n} held-out test images of unseen patients): "
          f"top-1 {sorter.test.top1:.3f}, top-2 {sorter.test.top2:.3f} vs weak labels; "
          f"top-1 {truth_top[0]:.3f}, top-2 {truth_top[1]:.3f} vs true regions; "
          f"per fold top-1 {np.mean(sorter.test.fold_top1):.3f} ± {np.std(sorter.test.fold_top1):.3f}")
    if sorter.dropped:
        print(f"sorter left out weak classes with too few patients: {sorter.dropped}")
    if sorter.holdout is not None:
        print(f"external hold-out ({sorter.holdout.n} images, true regions): top-1 "
              f"{sorter.holdout.top1:.3f}, top-2 {sorter.holdout.top2:.3f}")
    print(f"transfer ({task_name}, {len(t_ids)} images, {args.folds} patient folds, "
          f"{args.transfer_epochs} epochs each): " + "; ".join(
              f"{name} acc {r['accuracy']:.3f} (folds {r['fold_accuracy_mean']:.3f} ± "
              f"{r['fold_accuracy_std']:.3f}) bal.acc {r['balanced_accuracy']:.3f}"
              + (f" AUC {r['auc']:.3f}" if "auc" in r else "") for name, r in rows.items()))
    for name, r in rows.items():
        if r["accuracy_gap"] is not None:
            print(f"gap {name} - random: accuracy {r['accuracy_gap']:+.3f}, better in "
                  f"{r['folds_better']} folds (same patients per fold)")
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in clock.phases.items()) +
          f"; total {total:.0f} s ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
