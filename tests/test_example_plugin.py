"""The contributor's template (examples/msk-chondromyxoid) works end to end, msk unchanged.

The package is pip-installed into a temporary folder (never into the environment) that the
subprocesses find through PYTHONPATH, as a user's ``pip install`` would make it importable.
With it, a tumour entity msk does not know -- chondromyxoid fibroma -- is listed, drawn by
``msk synth``, learnt by a classifier and served under the names of the plugin's entity set.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "msk-chondromyxoid"
ENTITY = "chondromyxoid fibroma"
SET = "cmf-differential"

pytestmark = pytest.mark.slow

TRAIN_AND_SERVE = textwrap.dedent('''
    """Crop the lesions of the synthetic export, train a classifier one epoch, serve it."""
    import csv, json, sys
    from pathlib import Path

    import numpy as np
    import pydicom
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    from msk.core.registry import entity_set
    from msk.core.models.train import TrainConfig, fit_classifier
    from msk.serve.classifier import load_classifier_model
    from msk.core.data.squaring import SquaringConfig
    from msk.serve.config import ClassifyConfig

    export, out = Path(sys.argv[1]), Path(sys.argv[2])
    names = entity_set("cmf-differential").names
    crops, labels = [], []
    with (export / "ground_truth.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["expected_status"] != "ok" or not row["entity"] or not row["x0"]:
                continue
            pixels = pydicom.dcmread(export / row["path"]).pixel_array.astype(np.float32)
            x0, y0, x1, y1 = (int(float(row[k])) for k in ("x0", "y0", "x1", "y1"))
            crop = pixels[y0:y1 + 1, x0:x1 + 1]
            crop = (crop - crop.min()) / max(float(np.ptp(crop)), 1.0) * 255
            crops.append(np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((32, 32))))
            labels.append(names.index(row["entity"]))
    images, labels = np.stack(crops), np.asarray(labels)
    config = TrainConfig(encoder="tiny-cnn", image_size=32, epochs=1, batch_size=8, num_workers=0, augment=False)
    fit = fit_classifier(images, labels, len(names), config, out=out)  # no class names in the checkpoint

    served = load_classifier_model(ClassifyConfig(checkpoint=fit.best, entity_set="cmf-differential"),
                                   SquaringConfig(image_size=32))
    probs = served.probabilities(images[:4], None)
    print(json.dumps({"counts": np.bincount(labels, minlength=len(names)).tolist(), "classes": served.classes,
                      "probs_shape": list(probs.shape), "row_sums": probs.sum(1).round(4).tolist()}))
''')


def _run(args, env, **kw):
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, **kw)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """The environment of a process that sees the installed example package."""
    import shutil

    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / EXAMPLE.name  # pip's build leaves files next to the source
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "--target", str(target), str(source)], dict(os.environ))
    return {**os.environ, "PYTHONPATH": str(target), "COLUMNS": "200", "OMP_NUM_THREADS": "1",
            "MSK_LESION_OUTLINES": "drawn"}


def test_the_example_entity_is_registered_with_its_commands(plugin_env):
    listing = _run([sys.executable, "-m", "msk", "plugins", "lesion_drawer"], plugin_env)
    assert ENTITY in listing and "msk-chondromyxoid 0.1.0" in listing
    priors = _run([sys.executable, "-m", "msk", "cmf-priors"], plugin_env)  # hook msk_commands
    assert f"{ENTITY}: age 10-30, female 40%" in priors
    # the plugin contract test checks the plugin's entity set and drawer like the built-ins
    contract = Path(__file__).with_name("test_plugin_contract.py")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(contract),
                          "-k", f"{SET} or chondromyxoid"], capture_output=True, text=True, env=plugin_env)
    assert run.returncode == 0 and "2 passed" in run.stdout, run.stdout + run.stderr


def test_the_example_entity_is_drawn_trained_on_and_served(plugin_env, tmp_path):
    config = tmp_path / "cmf.yaml"
    config.write_text(f"entity_set: {SET}\nlesion_fraction: 1.0\ncorrupt_fraction: 0.0\nmonochrome1_fraction: 0.0\n"
                      "images_per_patient: [1, 1]\npriors: defaults\ntransfer_syntaxes: [explicit-le]\n")
    _run([sys.executable, "-m", "msk", "synth", str(tmp_path / "synth"), "--n", "36", "--image-size", "128",
          "--config", str(config)], plugin_env)
    with (tmp_path / "synth" / "ground_truth.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    cmf = [r for r in rows if r["entity"] == ENTITY]
    assert len(cmf) >= 5 and {r["malignancy"] for r in cmf} == {"benign"}
    assert {r["site"] for r in cmf} <= {"lower leg", "femur", "foot", "pelvis"}  # the plugin's priors
    assert all(10 <= int(r["age"]) <= 30 for r in cmf)
    assert any(r["x0"] for r in cmf)  # drawn: the lesion has a box

    out = _run([sys.executable, "-c", TRAIN_AND_SERVE, str(tmp_path / "synth"), str(tmp_path / "train")],
               plugin_env)
    import json

    result = json.loads(out.strip().splitlines()[-1])
    assert result["classes"] == [ENTITY, "non-ossifying fibroma", "aneurysmal bone cyst"]  # from the entity set
    assert result["counts"][0] >= 5 and min(result["counts"]) >= 1
    assert result["probs_shape"] == [4, 3] and all(abs(s - 1) < 1e-3 for s in result["row_sums"])
