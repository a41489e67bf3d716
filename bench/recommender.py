"""Evidence for the recommender: vote accuracy against a CNN and a vision transformer.

Runs the evaluation protocol of :mod:`msk.core.stages.recommender.evaluation` (patient-level 80/20 splits,
3 seeds, mean ± sd, ANOVA + Tukey HSD) on the lesion images of a synthetic export (10 bone
tumour entities at several anatomical sites), each model seeing the lesion's region of
interest (box + 15 %) cropped from the 128-px ingest and resized to 32 px.

Models, all trained on the training patients only, with the same budget (epochs, lr, batch):

* ``cnn``: tiny-cnn + linear head (``msk.core.models.train.fit_classifier``);
* ``vit``: a vision transformer (timm ``vit_tiny_patch16_224`` at 32 px: 8-px patches, depth 6);
* ``recommender[cnn]``: majority vote of the k nearest training images in the feature space of
  the fine-tuned ``cnn`` encoder (the recommender's encoder never saw a test patient);
* ``recommender[deepcluster]``: the same with a DeepCluster encoder trained, without labels,
  on the training images.

From scratch (writes a synthetic export and its ingest into --work first)::

    python bench/recommender.py --synth 5000 --work /tmp/msk-bench-recommender

On existing data (the numbers in docs/recommender.md)::

    python bench/recommender.py --synth-dir /work/evidence/synth5k \\
        --ingest /work/evidence/ingest5k --work /work/evidence/recommender

Never run by pytest.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def prepare(args) -> tuple[Path, Path]:
    """``(synth_dir, ingest_dir)``: existing ones, or a new export of ``--synth`` files."""
    if args.synth_dir and args.ingest:
        return args.synth_dir, args.ingest
    from msk.core.stages.ingest.pipeline import IngestConfig, ingest
    from msk.core.synth import SynthConfig, synthesize

    synth_dir, ingest_dir = args.work / "synth", args.work / "ingest"
    os.environ.setdefault("MSK_PSEUDONYM_KEY", "bench-recommender-key-0123456789")
    if not (synth_dir / "ground_truth.csv").is_file():
        began = time.perf_counter()
        synthesize(synth_dir, SynthConfig(n_images=args.synth, seed=7, workers=2))
        console.print(f"synth: {args.synth} files in {time.perf_counter() - began:.0f} s")
    began = time.perf_counter()
    ingest(synth_dir / "export", ingest_dir, IngestConfig(image_size=128))  # resumes if done
    console.print(f"ingest: {time.perf_counter() - began:.0f} s")
    return synth_dir, ingest_dir


def config(args):
    from msk.core.stages.recommender.config import ClassifierSpec, RecommenderEvalConfig

    size = args.image_size
    return RecommenderEvalConfig(
        seeds=[int(s) for s in args.seeds.split(",")],
        image_size=size, roi=not args.whole_image,
        classifiers=[
            ClassifierSpec(name="cnn", encoder="tiny-cnn"),
            ClassifierSpec(name="vit", encoder="timm/vit_tiny_patch16_224",
                           encoder_options={"img_size": size, "patch_size": 8, "depth": 6}),
        ],
        training={"epochs": args.epochs, "lr": args.lr, "batch_size": 32, "augment": True},
        embeddings=["cnn", "deepcluster"],
        deepcluster={"encoder": "tiny-cnn", "k": 50, "epochs": args.dc_epochs, "batch_size": 32,
                     "sobel": True},
        retriever=args.retriever, ks=[1, 3, 5, 7], k=args.k, gallery_queries=20,
    )


def deploy(args, ingest_dir: Path, labels, result) -> None:
    """The deployable artefact: ``embed`` (Ray Data) every lesion ROI with seed 0's CNN encoder,
    build and save an LSH recommender of all of them, load it and time queries."""
    from msk.core.models.embed import EmbedConfig, embed, embedding_matrix, read_embeddings, read_rois
    from msk.core.models.recommender import Recommender

    checkpoint = result.out / f"seed-{args.seeds.split(',')[0]}" / "cnn" / "best.pt"
    report = embed(ingest_dir, checkpoint, args.work / "embed", EmbedConfig(batch_size=128),
                   rois=read_rois(labels))
    print(f"\nembed (Ray Data, 1 actor): {report.n_images} lesion ROIs, {report.dim}-d, "
          f"{report.seconds:.1f} s ({report.n_images / report.seconds:.0f} images/s, Ray start-up included)")
    table = read_embeddings(args.work / "embed")
    entity = dict(zip(labels["image_id"], labels["entity"]))
    began = time.perf_counter()
    Recommender.build(table, entity, retriever=args.retriever, k=args.k).save(args.work / "recommender")
    built = time.perf_counter() - began
    began = time.perf_counter()
    recommender = Recommender.load(args.work / "recommender", expect_dim=report.dim)
    loaded = time.perf_counter() - began
    queries = embedding_matrix(table)[:200]
    began = time.perf_counter()
    for q in queries:
        recommender.recommend(q)
    per_query = (time.perf_counter() - began) / len(queries) * 1000
    size = sum(f.stat().st_size for f in (args.work / "recommender").iterdir()) / 2**20
    print(f"recommender ({recommender!r}): build + save {built:.2f} s, load {loaded * 1000:.0f} ms, "
          f"{size:.2f} MiB on disk, {per_query:.2f} ms per single-image recommendation "
          f"(vote + linkage, {len(queries)} queries)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="output folder (and data, with --synth)")
    ap.add_argument("--synth", type=int, default=5000, help="files of a new synthetic export")
    ap.add_argument("--synth-dir", type=Path, help="an existing synthetic export (with --ingest)")
    ap.add_argument("--ingest", type=Path, help="its ingest output")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--image-size", type=int, default=32, help="side of the ROI crop fed to every model")
    ap.add_argument("--epochs", type=int, default=15, help="training epochs of every classifier")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of every classifier")
    ap.add_argument("--dc-epochs", type=int, default=10, help="DeepCluster epochs")
    ap.add_argument("--retriever", default="lsh")
    ap.add_argument("--k", type=int, default=3, help="the recommender's k in the comparison")
    ap.add_argument("--whole-image", action="store_true", help="whole 128-px images instead of ROI crops")
    ap.add_argument("--no-deploy", action="store_true", help="skip the embed + save/load timing step")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a busy 2-core machine, 2 threads were 25x slower)")
    args = ap.parse_args()
    if bool(args.synth_dir) != bool(args.ingest):
        ap.error("--synth-dir and --ingest go together")

    import torch

    from msk.core.stages.recommender.data import synth_labels
    from msk.core.stages.recommender.evaluation import evaluate_recommender

    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    synth_dir, ingest_dir = prepare(args)
    labels = synth_labels(synth_dir, ingest_dir)
    labels.to_csv(args.work / "labels.csv", index=False)
    cfg = config(args)
    result = evaluate_recommender(ingest_dir, labels, args.work / "eval", cfg)
    print(f"\n{result.n_images} lesion images of {result.n_patients} patients, "
          f"{len(result.classes)} entities; {'ROI crops' if cfg.roi else 'whole images'} at "
          f"{cfg.image_size} px; retriever {cfg.retriever}; seeds {cfg.seeds}; "
          f"{cfg.training.epochs} epochs, lr {cfg.training.lr:g} for every classifier\n")
    print(result.markdown())
    seconds = result.results.groupby("model", sort=False)["seconds"].mean()
    print("\nmean seconds per seed (training + prediction; recommenders: encoder + embedding + "
          "index + vote):")
    print(", ".join(f"{m} {s:.0f}" for m, s in seconds.items() if not m.endswith(("k=1", "k=5", "k=7"))))
    if not args.no_deploy:
        deploy(args, ingest_dir, labels, result)
    total = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ntotal {total / 60:.1f} min, peak RSS {peak:.0f} MiB; outputs in {args.work}")


if __name__ == "__main__":
    main()
