"""Lesion segmentation on held-out synthetic patients: U-Net against U-Net++ (same encoder, same
patient splits, same schedule), IoU and Dice per entity and overall; then what the region of
interest the segmenter finds is worth to the entity classifier and the recommender.

Steps, all through msk's own pipeline:

1. ``msk synth`` (every patient with a lesion, no corrupt files; lesion outlines are real BTXRD
   polygons where ``../shared/data/btxrd-meta/annotations`` is present) and ``msk ingest`` at
   ``--size`` px, unless ``--synth-dir``/``--ingest-dir`` name an existing pair;
2. ``msk train segmenter`` for each of ``--models``: a fixed patient-level test set (20 %) and
   ``--folds``-fold patient-level cross-validation over the other patients, BCE + Dice, the
   shared training loop (in this process: ``num_workers=0``), ``--epochs`` per fold;
3. ``msk eval segmenter``: the fold ensemble on the test patients (IoU/Dice per image, averaged
   per entity and overall), overlay sheet in ``work/<model>-eval/overlays.html``;
4. the ROI comparison on the same test patients: an image classifier
   (``msk.core.models.train.fit_classifier``, ``--classifier-encoder``) trained on the true-ROI crops
   (``msk.core.data.roi.lesion_crop`` of the true mask: box + 15 %, square, ``--roi-size`` px) of the
   segmenters' training patients, and a recommender (``msk.core.models.recommender.Recommender``, exact
   search, ``--k`` neighbours vote) whose gallery is those crops embedded with that classifier's
   encoder (``msk.core.models.embed.Embedder``); both fed (a) the true ROI, (b) the ROI each segmenter
   ensemble predicts (``msk.core.models.segmenter.predicted_rois``; an image where it finds no
   lesion counts as wrong, and is counted), (c) the whole image. For a fair (c), a second
   classifier and recommender are trained and built on whole images of the same patients.

Prints the tables, the wall time of every phase and the per-image training-step time and
floating-point work from which ``docs/segmentation.md`` estimates the cost of the paper's
settings. Never run by pytest. The numbers in docs/segmentation.md (synthetic data)::

    python bench/segmentation.py --synth 400 --size 64 --encoder tu-resnet10t \\
        --segmenter-options '{"decoder_channels": [128, 64, 32, 16, 8]}' --epochs 16 --batch-size 8 \\
        --lr 1e-3 --folds 2 --classifier-epochs 100 --work /tmp/bench-seg4

A rerun skips finished folds, so the two segmenters can be trained by two processes in parallel
(``--models unet --no-roi`` and ``--models unetplusplus --no-roi``) before the full command.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def make_data(work: Path, n: int, seed: int, size: int, synth_size: int) -> tuple[Path, Path]:
    """``msk synth`` (lesions only) + ``msk ingest`` into ``work/synth`` and ``work/ingest``."""
    from msk.core.stages.ingest.pipeline import IngestConfig, ingest
    from msk.core.synth import SynthConfig, synthesize

    synth, ingested = work / "synth", work / "ingest"
    if not (synth / "ground_truth.csv").is_file():
        synthesize(synth, SynthConfig(n_images=n, seed=seed, image_size=synth_size, lesion_fraction=1.0,
                                      corrupt_fraction=0.0), overwrite=True, progress=False)
    if not (ingested / "ingest.json").is_file():
        ingest(synth / "export", ingested, IngestConfig(image_size=size, key_file=work / "bench.key",
                                                        create_key=True), progress=False)
        import ray

        ray.shutdown()  # free its workers' CPU: everything below runs in this process
    return synth, ingested


def step_time(segmenter: str, encoder: str, size: int, options: dict | None = None, batch: int = 2) -> float:
    """Seconds per image of one training step (forward, backward, AdamW) here."""
    import torch

    from msk.core.models.segmenter import SegmentationModel
    from msk.core.stages.segmentation.training import DiceBCELoss

    model, loss = SegmentationModel(segmenter, encoder, options), DiceBCELoss()
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.rand(batch, 1, size, size), (torch.rand(batch, 1, size, size) > 0.5).float()
    times = []
    for _ in range(4):  # the fastest of 3 after a warm-up: the least disturbed by the machine's other jobs
        began = time.perf_counter()
        value = loss(model(x), y)
        opt.zero_grad()
        value.backward()
        opt.step()
        times.append(time.perf_counter() - began)
    return min(times[1:]) / batch


def step_flops(segmenter: str, encoder: str, size: int, options: dict | None = None) -> float:
    """Floating-point operations of one image's training step (forward + backward), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from msk.core.models.segmenter import SegmentationModel
    from msk.core.stages.segmentation.training import DiceBCELoss

    model = SegmentationModel(segmenter, encoder, options)
    with FlopCounterMode(display=False) as counter:
        DiceBCELoss()(model(torch.rand(1, 1, size, size)), torch.zeros(1, 1, size, size)).backward()
    return float(counter.get_total_flops())


def by_size(evaluation: Path, median: float) -> str:
    """Mean test IoU of the lesions at least ``median`` pixels large and of the smaller ones."""
    import csv

    rows = list(csv.DictReader((evaluation / "scores.csv").open()))
    big = [float(r["iou"]) for r in rows if float(r["truth_pixels"]) >= median]
    small = [float(r["iou"]) for r in rows if float(r["truth_pixels"]) < median]
    return (f"IoU of test lesions >= {median:.0f} px (the median lesion): {np.mean(big) if big else float('nan'):.3f} "
            f"({len(big)} images); smaller: {np.mean(small) if small else float('nan'):.3f} ({len(small)} images)")


def training_seconds(run: Path) -> float:
    """Wall time of a segmenter run's epochs (training + validation, all folds) from its histories,
    so that a rerun that skips the finished folds still reports it."""
    import csv

    return sum(float(row["seconds"] or 0) for history in sorted(run.glob("fold-*/history.csv"))
               for row in csv.DictReader(history.open()))


# -- the ROI comparison ----------------------------------------------------------------------------


def whole(images: np.ndarray, size: int) -> np.ndarray:
    """The whole square images resized to ``size`` (the crop function with the full-image box)."""
    from msk.core.data.roi import crop_roi

    side = images.shape[1]
    return np.stack([np.clip(np.rint(crop_roi(im, (0, 0, side, side), size) * 255), 0, 255).astype(np.uint8)
                     for im in images])


def predicted_crops(run: Path, images: np.ndarray, truth: np.ndarray, ids: list[str],
                    size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted-ROI crops of a segmenter run's fold ensemble, one image at a time so that an image
    without a predicted lesion (``NoLesionFound``) is marked instead of stopping the batch.

    :return: ``(crops, found, holds)``: ``holds`` marks the crops that contain at least half of
        the true lesion's pixels."""
    from msk.core.models.segmenter import NoLesionFound, load_ensemble, predicted_rois

    ensemble = load_ensemble(run)
    crops = np.zeros((len(images), size, size), np.uint8)
    found, holds = np.ones(len(images), bool), np.zeros(len(images), bool)
    for i in range(len(images)):
        try:
            crop, (box,), _ = predicted_rois(ensemble, images[i:i + 1], size=size, ids=ids[i:i + 1])
        except NoLesionFound:
            found[i] = False
            continue
        crops[i] = crop[0]
        x0, y0, x1, y1 = box
        holds[i] = truth[i][y0:y1, x0:x1].sum() >= truth[i].sum() / 2
    return crops, found, holds


def train_entity_models(name: str, crops: np.ndarray, labels: np.ndarray, data, index: np.ndarray,
                        classes: list[str], args, work: Path):
    """Classifier on ``crops`` of the training images ``index``, and a recommender whose gallery is
    those crops embedded by its encoder. Returns ``(classify(crops) -> labels, recommend(crops) -> labels)``."""
    from msk.core.models.embed import Embedder, embeddings_table
    from msk.core.models.recommender import Recommender
    from msk.core.models.train import TrainConfig, fit_classifier, predict_logits

    config = TrainConfig(encoder=args.classifier_encoder, image_size=args.roi_size, epochs=args.classifier_epochs,
                         batch_size=32, lr=args.classifier_lr, num_workers=0, seed=args.seed)
    result = fit_classifier(crops, labels, len(classes), config, out=work / f"classifier-{name}", classes=classes)
    embedder = Embedder(result.best)
    ids = {"image_id": [data.image_ids[i] for i in index], "patient_id": [data.patient_ids[i] for i in index],
           "study_id": [data.image_ids[i] for i in index]}
    gallery = embeddings_table(ids, embedder.embed_images(crops))
    recommender = Recommender.build(gallery, [classes[v] for v in labels], retriever="flat", k=args.k)
    position = {c: k for k, c in enumerate(classes)}

    def classify(x: np.ndarray) -> np.ndarray:
        return predict_logits(result.model, x).argmax(axis=1)

    def recommend(x: np.ndarray) -> np.ndarray:
        return np.array([position[r.entity] for r in recommender.recommend(embedder.embed_images(x))])

    return classify, recommend


def roi_comparison(args, data, runs: dict[str, Path], work: Path, phases: dict[str, float]) -> None:
    from msk.core.data.roi import lesion_crop
    from msk.core.stages.segmentation.training import read_splits

    parts = [read_splits(run) for run in runs.values()]
    part = parts[0]
    if any(p != part for p in parts[1:]):
        raise SystemExit("the segmenter runs have different splits; compare them on the same test patients")
    test = np.array([i for i, image_id in enumerate(data.image_ids) if part.get(image_id) == "test"])
    dev = np.array([i for i, image_id in enumerate(data.image_ids) if part.get(image_id) == "dev"])
    classes = sorted(set(data.labels))
    y = np.array([classes.index(v) for v in data.labels])
    size = args.roi_size
    began = time.perf_counter()
    true_rois = np.stack([lesion_crop(data.images[i], data.masks[i], size) for i in range(len(data))])
    every = np.ones(len(test), bool)
    inputs = {"(a) true ROI": (true_rois[test], every, every)}
    for model, run in runs.items():
        inputs[f"(b) predicted ROI, {model}"] = predicted_crops(run, data.images[test], data.masks[test],
                                                               [data.image_ids[i] for i in test], size)
    whole_images = whole(data.images, size)
    inputs["(c) whole image"] = (whole_images[test], every, every)
    phases["ROI crops + segmenter prediction"] = time.perf_counter() - began

    began = time.perf_counter()
    roi_models = train_entity_models("roi", true_rois[dev], y[dev], data, dev, classes, args, work)
    phases["train ROI classifier + recommender"] = time.perf_counter() - began
    began = time.perf_counter()
    whole_models = train_entity_models("whole", whole_images[dev], y[dev], data, dev, classes, args, work)
    phases["train whole-image classifier + recommender"] = time.perf_counter() - began

    rows = []
    for what, (x, found, holds) in inputs.items():
        for trained, (classify, recommend) in (("true-ROI crops", roi_models), ("whole images", whole_models)):
            if trained == "whole images" and not what.startswith("(c)"):
                continue
            right_c = (classify(x) == y[test]) & found
            right_r = (recommend(x) == y[test]) & found
            rows.append((what, trained, len(test), int((~found).sum()), holds.mean(), right_c.mean(), right_r.mean()))
    chance = np.bincount(y[test]).max() / len(test)
    print(f"\nEntity accuracy on the {len(test)} test images ({len(set(data.patient_ids[i] for i in test))} "
          f"patients, {len(classes)} entities, majority class {chance:.3f}); ROI crops {size} px; classifier "
          f"{args.classifier_encoder}, {args.classifier_epochs} epochs; recommender: {args.k} nearest training "
          f"images (exact search) in the classifier encoder's feature space; {len(dev)} training images")
    print("| input | models trained on | test images | no lesion found (counted wrong) | crop holds the lesion "
          "| classifier | recommender |")
    print("|---|---|---|---|---|---|---|")
    for what, trained, n, missed, held, acc_c, acc_r in rows:
        print(f"| {what} | {trained} | {n} | {missed} | {held:.3f} | {acc_c:.3f} | {acc_r:.3f} |")
    (work / "roi-comparison.json").write_text(json.dumps(
        [dict(zip(["input", "trained_on", "n", "no_lesion_found", "holds_lesion", "classifier", "recommender"],
                  [*r[:4], *(round(float(v), 4) for v in r[4:])])) for r in rows], indent=2))


def paper_cost(args, models: list[str]) -> None:
    """Training step time and work of the paper's encoder at ``--step-sizes``, and what ``--paper-epochs``
    epochs of 5-fold CV on ``--paper-images`` images would take here and on a GPU (an estimate from
    counted operations and an assumed sustained GPU throughput ``--gpu-tflops``, not a measurement)."""
    train_share, val_share, folds = 0.8 * 0.8, 0.8 * 0.2, 5  # 20 % test; 5 folds of the rest
    for name in models:
        for size in [int(v) for v in args.step_sizes.split(",") if v]:
            seconds = step_time(name, args.step_encoder, size)
            flops = step_flops(name, args.step_encoder, size)
            print(f"[step {name} {args.step_encoder} {size} px: {1000 * seconds:.0f} ms per image, "
                  f"{flops / 1e9:.1f} GFLOP per image (forward + backward), {flops / seconds / 1e9:.0f} GFLOP/s, "
                  f"{args.threads} thread(s)]", flush=True)
            # validation is a forward pass: about a third of a training step
            image_steps = folds * args.paper_epochs * args.paper_images * (train_share + val_share / 3)
            print(f"[estimate {name} {args.step_encoder} {size} px, {folds} folds x {args.paper_epochs} epochs on "
                  f"{args.paper_images} images: {image_steps * seconds / 3600:.0f} h here; "
                  f"{image_steps * flops / (args.gpu_tflops * 1e12) / 3600:.2f} h on a GPU sustaining "
                  f"{args.gpu_tflops:g} TFLOP/s (assumed)]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synth-dir", type=Path, help="synthetic export with ground_truth.csv (and masks/)")
    parser.add_argument("--ingest-dir", type=Path, help="its ingest output")
    parser.add_argument("--synth", type=int, default=400, help="make N synthetic lesion images + ingest them")
    parser.add_argument("--synth-size", type=int, default=256, help="long side of the synthetic radiographs")
    parser.add_argument("--work", type=Path, default=Path("out/bench-segmentation"), help="work folder")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--size", type=int, default=64, help="ingest and network image side")
    parser.add_argument("--models", default="unet,unetplusplus")
    parser.add_argument("--encoder", default="tu-resnet10t", help="segmenter encoder (smp name or tu-<timm name>)")
    parser.add_argument("--segmenter-options", type=json.loads, default={},
                        help='JSON of further smp options, e.g. \'{"decoder_channels": [128, 64, 32, 16, 8]}\'')
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--roi-size", type=int, default=64, help="side of the crops the classifier sees")
    parser.add_argument("--classifier-encoder", default="tiny-cnn")
    parser.add_argument("--classifier-epochs", type=int, default=100)
    parser.add_argument("--classifier-lr", type=float, default=2e-3)
    parser.add_argument("--k", type=int, default=3, help="neighbours that vote in the recommender")
    parser.add_argument("--no-roi", action="store_true", help="skip the ROI comparison")
    parser.add_argument("--step-sizes", default="256", help="image sides whose training step is timed and counted")
    parser.add_argument("--step-encoder", default="resnet34", help="encoder of the paper, for the step cost")
    parser.add_argument("--paper-images", type=int, default=1635, help="BTXRD's tumour images, for the cost estimate")
    parser.add_argument("--paper-epochs", type=int, default=100, help="epochs assumed for the paper's schedule")
    parser.add_argument("--gpu-tflops", type=float, default=40.0,
                        help="sustained GPU throughput assumed for the estimate (not measured)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared 2-core machine)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from msk.core.stages.segmentation.evaluation import evaluate_segmenter
    from msk.core.stages.segmentation.training import SegmenterConfig, load_segmentation_data, train_segmenter

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    began = time.perf_counter()
    if args.synth_dir and args.ingest_dir:
        synth, ingested = args.synth_dir, args.ingest_dir
    else:
        synth, ingested = make_data(work, args.synth, args.seed, args.size, args.synth_size)
    phases["synth + ingest"] = time.perf_counter() - began
    began = time.perf_counter()
    data = load_segmentation_data(ingested, synth)
    phases["load masks"] = time.perf_counter() - began
    n_patients = len(set(data.patient_ids))
    area = data.masks.sum(axis=(1, 2))
    print(f"data: {len(data)} masked images of {n_patients} patients at {data.images.shape[1]} px; mean lesion "
          f"share {data.masks.mean():.3f} of the image; lesion pixels: median {np.median(area):.0f}, "
          f"quartiles {np.percentile(area, 25):.0f}-{np.percentile(area, 75):.0f}", flush=True)
    for note in data.notes:
        print(f"note: {note}")
    results, runs = {}, {}
    for name in args.models.split(","):
        config = SegmenterConfig(segmenter=name, encoder=args.encoder, segmenter_options=args.segmenter_options,
                                 image_size=args.size, epochs=args.epochs, folds=args.folds,
                                 batch_size=args.batch_size, lr=args.lr, num_workers=0, seed=args.seed)
        began = time.perf_counter()
        run = train_segmenter(data, config, out=work / name)
        runs[name] = run.out
        phases[f"train {name}"] = time.perf_counter() - began
        print(run.summary(), flush=True)
        began = time.perf_counter()
        results[name] = evaluate_segmenter(work / name, ingested, synth, work / f"{name}-eval")
        phases[f"eval {name}"] = time.perf_counter() - began
        print(f"\n{name} ({args.encoder}), {results[name].n_images} test images:\n{results[name].table()}", flush=True)
        print(by_size(work / f"{name}-eval", float(np.median(area))) + "\n", flush=True)
    print("| model | encoder | size | epochs | folds | test images | IoU | Dice | training (all folds) |")
    trained = {name: training_seconds(run) for name, run in runs.items()}
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {args.encoder} | {args.size} | {args.epochs} | {args.folds} | {r.n_images} | "
              f"{r.iou:.3f} | {r.dice:.3f} | {trained[name]:.0f} s |", flush=True)
    if not args.no_roi:
        roi_comparison(args, data, runs, work, phases)
    print()
    for phase, seconds in phases.items():
        print(f"[{phase}: {seconds:.0f} s]")
    paper_cost(args, list(results))


if __name__ == "__main__":
    main()
