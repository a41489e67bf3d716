"""Ingest and a short training on a two-node Ray cluster started on this machine.

Run by ``tests/test_cluster.py`` in a subprocess, because it starts a Ray cluster of its own
(``ray.cluster_utils.Cluster``: a head node and one worker node, one CPU each) and must not meet
the test session's Ray instance. It writes a small synthetic export, ingests it with Ray Data,
trains a tiny classifier for one epoch on two Ray Train workers, runs a four-trial ``msk tune``
search whose trials train in their own Tune actors (two at a time, one per node) and a two-trial
search whose trials are one-worker Ray Train runs (a trial's driver takes one node's CPU, so its
worker runs on the other node), and prints, as its last line, a JSON summary of which node did
what::

    python tests/cluster_scenario.py WORKDIR

Both nodes run on one machine, so the work folder plays the part of the cluster's shared storage.
The head runs Ray's dashboard, as ``ray start --head`` does: Ray Train frees the placement group
of a run whose controller dies with its Tune trial through the dashboard's State API (without it
the second Ray-Train search hangs; see ``msk.core.stages.tuning.search.StateApiWarning``).
Ray's files go to a private temporary folder (``RAY_TMPDIR``): ``Cluster`` records its address
in ``<ray tmp>/ray/ray_current_cluster``, where a plain ``ray.init()`` of any other process on
the machine would otherwise find and join it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

N_FILES = 64  # with batch_size 2: 32 decode tasks for the two one-CPU nodes
IMAGE_SIZE = 32


def main(work: Path) -> dict:
    """Run the scenario in ``work`` and return its summary (see the module docstring)."""
    os.environ["MSK_PSEUDONYM_KEY"] = "cluster-test-key-0123456789"  # a test key, never a real one
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    from msk.core.io.dataset import images_from_table, read_shards
    from msk.core.io.manifest import read_manifest
    from msk.core.models.train import TrainConfig, fit_classifier
    from msk.core.stages.ingest.pipeline import IngestConfig, ingest
    from msk.core.synth import SynthConfig, ground_truth_for_ingest, synthesize

    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 2)

    synthesize(work / "synth", SynthConfig(n_images=N_FILES, seed=3, image_size=64, priors="defaults",
                                           corrupt_fraction=0.0), progress=False)
    lap("synth")

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": True})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        lap("cluster")

        report = ingest(work / "synth" / "export", work / "ingest",
                        IngestConfig(image_size=IMAGE_SIZE, batch_size=2), progress=False)
        manifest = read_manifest(work / "ingest", columns=["node"])
        files_per_node = Counter(manifest.column("node").to_pylist())
        lap("ingest")

        truth = ground_truth_for_ingest(work / "synth", work / "ingest")
        table = read_shards(work / "ingest", columns=["image_id", "image", "height", "width"])
        region = dict(zip(truth["image_id"], truth["region"]))
        names = sorted(set(region.values()))
        labels = np.array([names.index(region[i]) for i in table.column("image_id").to_pylist()])
        config = TrainConfig(encoder="tiny-cnn", image_size=IMAGE_SIZE, epochs=1, batch_size=8,
                             augment=False, num_workers=2)
        result = fit_classifier(images_from_table(table), labels, len(names), config, out=work / "run")
        placements = [json.loads(p.read_text()) for p in sorted((result.out / "workers").glob("rank-*.json"))]
        lap("train")

        from msk.core.stages.tuning.search import TuneOptions, tune_task

        from test_sorter import fast, labelled  # tests/ is this script's folder

        tuned = tune_task("sorter", labelled(), out=work / "tune", base=fast(epochs=2),
                          space={"lr": {"loguniform": [1e-3, 1e-2]}},
                          options=TuneOptions(samples=4, num_workers=0))
        trial_nodes = [json.loads((work / "tune" / "trials" / t / "trial.json").read_text())["node_id"]
                       for t in tuned.trials["trial_id"]]
        lap("tune")

        with_train = tune_task("sorter", labelled(), out=work / "tune-train", base=fast(epochs=1),
                               space={"lr": {"choice": [1e-3, 1e-2]}},
                               options=TuneOptions(samples=2, num_workers=1))
        train_trials = []
        for t in with_train.trials["trial_id"]:
            folder = work / "tune-train" / "trials" / t
            train_trials.append({"driver": json.loads((folder / "trial.json").read_text())["node_id"],
                                 "worker": json.loads((folder / "workers" / "rank-0.json").read_text())["node_id"]})
        lap("tune_train")
    finally:
        ray.shutdown()
        cluster.shutdown()

    return {
        "nodes": nodes,
        "ingest": {"n_inputs": report.n_inputs, "n_ok": report.n_ok, "files_per_node": files_per_node},
        "train": {"epochs": len(result.history), "best": str(result.best),
                  "ranks": [{k: p[k] for k in ("rank", "world_size", "node_id", "device")} for p in placements]},
        "tune": {"status": tuned.trials["status"].tolist(), "trial_nodes": trial_nodes,
                 "best": str(tuned.best_yaml)},
        "tune_train": {"status": with_train.trials["status"].tolist(), "trials": train_trials},
        "seconds": timings,
    }


if __name__ == "__main__":
    ray_tmp = tempfile.mkdtemp(prefix="msk-ray-", dir="/tmp")  # short: Ray's socket paths live here
    os.environ["RAY_TMPDIR"] = ray_tmp
    try:
        summary = main(Path(sys.argv[1]))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(json.dumps(summary))
