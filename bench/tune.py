"""ASHA vs FIFO: the same sampled configurations tuned with early stopping and without.

``msk tune`` schedules its trials with ASHA. This runs one search twice on the same data, space
and sampler seed (so the same configurations): once with ASHA, once with Tune's FIFO scheduler
(every trial trains all its epochs, the plain baseline), and prints side by side the wall time,
the epochs trained, the best validation metric and the best configuration.

    python bench/tune.py --synth-dir SYNTH --ingest INGEST --work out/bench-tune  # an existing export
    python bench/tune.py --synth 2000 --work out/bench-tune     # makes its own synthetic data

Task: the recommender (its encoder trained as a classifier on lesion crops, scored every epoch
by the k-NN vote of validation patients); trials train in the trial's process
(``--num-workers 0``) unless told otherwise. Never run by pytest.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from recommender import console, prepare  # bench/recommender.py: the same synthetic lesion data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synth-dir", type=Path, help="an existing synthetic export (with --ingest)")
    parser.add_argument("--ingest", type=Path, help="its ingest output")
    parser.add_argument("--synth", type=int, default=2000, help="files of a new synthetic export")
    parser.add_argument("--work", type=Path, default=Path("out/bench-tune"))
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray

    from msk.core.stages.recommender.config import ClassifierSpec, RecommenderEvalConfig
    from msk.core.stages.recommender.data import synth_labels
    from msk.core.stages.tuning.search import TuneOptions, load_task_data, tune_task

    synth_dir, ingest_dir = prepare(args)
    args.work.mkdir(parents=True, exist_ok=True)
    labels = args.work / "labels.csv"
    synth_labels(synth_dir, ingest_dir).to_csv(labels, index=False)
    base = RecommenderEvalConfig(image_size=args.image_size, seeds=[0], ks=[1, 3, 5, 7], k=3,
                                 classifiers=[ClassifierSpec(name="cnn", encoder="tiny-cnn")],
                                 embeddings=["cnn"], training={"epochs": args.epochs, "batch_size": 32})
    space = {"training.lr": {"loguniform": [1e-4, 1e-2]}, "training.batch_size": {"choice": [16, 32, 64]},
             "training.aug_prob": {"uniform": [0.0, 1.0]}, "k": {"choice": [1, 3, 5, 7]}}
    began = time.perf_counter()
    data = load_task_data("recommender", ingest_dir, labels, base)
    console.print(f"{len(data)} lesion crops of {len(set(data.patient_ids))} patients, "
                  f"{len(data.classes)} entities, loaded in {time.perf_counter() - began:.1f} s")
    if not ray.is_initialized():  # a new export's ingest (prepare) has started it already
        ray.init(include_dashboard=False, log_to_driver=False)

    rows = {}
    for scheduler in ("fifo", "asha"):
        began = time.perf_counter()
        result = tune_task("recommender", data, out=args.work / f"tune-{scheduler}", space=space, base=base,
                           options=TuneOptions(samples=args.samples, num_workers=args.num_workers,
                                               scheduler=scheduler, seed=args.seed))
        rows[scheduler] = (time.perf_counter() - began, int(result.trials["epochs_run"].sum()),
                           result.best_value, result.best_params)

    print(f"\nmsk tune recommender: {args.samples} trials x {args.epochs} epochs, same configurations "
          f"(sampler seed {args.seed}), {len(data)} crops at {args.image_size} px, tiny-cnn")
    print(f"{'scheduler':<10} {'wall s':>8} {'epochs':>7} {'best val_vote_accuracy':>23}  best parameters")
    for name, (wall, epochs, best, params) in rows.items():
        shown = {k: round(v, 5) if isinstance(v, float) else v for k, v in params.items()}
        print(f"{name:<10} {wall:>8.0f} {epochs:>7d} {best:>23.4f}  {shown}")
    fifo, asha = rows["fifo"], rows["asha"]
    print(f"ASHA / FIFO: wall time {asha[0] / fifo[0]:.2f}x, epochs trained {asha[1] / fifo[1]:.2f}x, "
          f"best metric {asha[2] - fifo[2]:+.4f}")


if __name__ == "__main__":
    main()
