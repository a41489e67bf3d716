"""Transfer learning: arms side by side on the same folds, flat tasks and the two-phase cascade."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from msk.core.config import load_config
from msk.core.data.labelled import LabelledImages
from msk.core.errors import ConfigError
from msk.core.models.train import TrainConfig, fit_classifier
from msk.core.stages.sorter.transfer import (
    TransferConfig,
    TransferError,
    binary_rates,
    run_transfer,
    task_metrics,
    transfer_from_ingest,
)

from test_sorter import drawings, fake_ingest  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENTITIES = ("normal", "ewing sarcoma", "osteosarcoma")


def task(n: int = 48, seed: int = 0, classes=ENTITIES) -> LabelledImages:
    """Drawings of three kinds as normal / Ewing sarcoma / osteosarcoma; two images a patient."""
    images, kinds = drawings(n, seed)
    order = np.argsort(kinds, kind="stable")
    images, kinds = images[order], kinds[order]
    return LabelledImages(images, [classes[k] for k in kinds], [f"p{i // 2}" for i in range(n)],
                          [f"img{i}" for i in range(n)], source="memory")


def fast(**kw) -> TransferConfig:
    return TransferConfig(**{"encoder": "tiny-cnn", "image_size": 32, "epochs": 2, "batch_size": 8,
                             "lr": 5e-3, "augment": False, "folds": 2, **kw})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A checkpoint trained on other drawings (the 'DeepCluster' arm of these tests)."""
    out = tmp_path_factory.mktemp("pretrained")
    images, kinds = drawings(48, seed=9)
    return fit_classifier(images, kinds, 3, TrainConfig(encoder="tiny-cnn", image_size=32, epochs=1,
                                                        batch_size=8, augment=False), out=out).best


def test_binary_rates_and_metrics():
    truth = ["a", "a", "a", "b", "b"]
    pred = ["a", "a", "b", "b", "a"]
    assert binary_rates(truth, pred, "a") == (2 / 3, 1 / 2)
    m = task_metrics(truth, pred, ["a", "b"], positive="a", scores=np.array([.9, .8, .4, .2, .6]))
    assert m["accuracy"] == 0.6 and m["sensitivity"] == 0.6667 and m["specificity"] == 0.5
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-4)
    assert m["auc"] == pytest.approx(5 / 6, abs=1e-4)
    three = task_metrics(["a", "b", "c"], ["a", "b", "b"], ["a", "b", "c"])
    assert three["sensitivity"] == pytest.approx(2 / 3, abs=1e-4)  # mean recall over classes
    assert three["specificity"] == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-4)
    assert "auc" not in three


def test_arms_share_folds_and_budget(tmp_path, pretrained):
    data = task(classes=("ewing sarcoma", "osteosarcoma", "osteosarcoma"))
    config = fast(arms={"random": "random", "pretrained": str(pretrained)})
    result = run_transfer(data, config, out=tmp_path, progress=False)
    assert [a.name for a in result.arms] == ["random", "pretrained"]
    assert result.classes == ["ewing sarcoma", "osteosarcoma"]
    for arm in result.arms:
        m = arm.metrics["task"]
        assert m["n"] == 48 and {"sensitivity", "specificity", "auc", "balanced_accuracy"} <= set(m)
        assert len(arm.fold_accuracy["task"]) == 2
        for k in (1, 2):
            history = list(csv.DictReader((tmp_path / arm.name / f"fold-{k}" / "history.csv").open()))
            assert [r["epoch"] for r in history] == ["1", "2"]  # same budget, no early stop
    tests = [json.loads((tmp_path / a.name / "fold-1" / "result.json").read_text())["test"]
             for a in result.arms]
    assert tests[0] == tests[1]  # the same test patients in every arm
    rows = list(csv.DictReader((tmp_path / "comparison.csv").open()))
    assert [(r["arm"], r["part"]) for r in rows] == [("random", "task"), ("pretrained", "task")]
    random_arm, pre = result.arms
    gap = result.rows()[1]
    assert result.reference is random_arm and result.rows()[0]["accuracy_gap"] is None
    assert gap["accuracy_gap"] == round(pre.metrics["task"]["accuracy"] - random_arm.metrics["task"]["accuracy"], 4)
    better = sum(a > b for a, b in zip(pre.fold_accuracy["task"], random_arm.fold_accuracy["task"]))
    assert gap["folds_better"] == f"{better}/2"
    again = run_transfer(data, config, out=tmp_path, progress=False)  # finished folds are kept
    assert [a.metrics for a in again.arms] == [a.metrics for a in result.arms]
    moved = fast(arms={"random": "random", "pretrained": "random"})
    with pytest.raises(TransferError, match=r"pretrained was trained from .*best.pt, the config now "
                                            r"says random; give this start another arm name"):
        run_transfer(data, moved, out=tmp_path, progress=False)


def test_cascade_normal_then_entity(tmp_path, pretrained):
    result = run_transfer(task(), fast(cascade=True, positive="osteosarcoma",
                                       arms={"pretrained": str(pretrained)}), out=tmp_path,
                          progress=False)
    (arm,) = result.arms
    assert set(arm.metrics) == {"phase1", "phase2", "cascade"}
    assert arm.metrics["phase1"]["n"] == 48 and arm.metrics["phase2"]["n"] == 32
    assert arm.metrics["cascade"]["n"] == 48
    for part in arm.metrics.values():
        assert 0 <= part["sensitivity"] <= 1 and 0 <= part["specificity"] <= 1
    assert (tmp_path / "pretrained" / "fold-1" / "phase-1" / "best.pt").is_file()
    assert (tmp_path / "pretrained" / "fold-1" / "phase-2" / "best.pt").is_file()
    assert set(arm.predictions) <= set(ENTITIES)


def test_from_ingest_with_free_labels(tmp_path):
    data = task(24)
    ingest = fake_ingest(tmp_path / "ingest", data)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([["image_id", "label"], *(
            [i, "fracture" if lab == "normal" else "intact"] for i, lab in zip(data.image_ids, data.labels))])
    result = transfer_from_ingest(ingest, labels, fast(entity_set=None, epochs=1), out=tmp_path / "run",
                                  progress=False)
    assert result.classes == ["fracture", "intact"]
    assert result.arms[0].metrics["task"]["n"] == 24


@pytest.mark.parametrize(("overrides", "labels", "message"), [
    ({"cascade": True}, ("ewing sarcoma", "osteosarcoma", "osteosarcoma"),
     "a cascade needs 'normal' images and two or more entities"),
    ({"positive": "chondrosarcoma"}, ENTITIES, "positive class 'chondrosarcoma' is not among the labels"),
    ({"folds": 9}, ENTITIES, r"9 folds need every class in at least 9 patients; too few: "),
    ({}, ("normal", "spaghetti", "osteosarcoma"),
     r"labels \['spaghetti'\] are neither 'normal' nor entities of bone-tumours"),
])
def test_bad_tasks(tmp_path, overrides, labels, message):
    with pytest.raises(TransferError, match=message):
        run_transfer(task(classes=labels), fast(**overrides), out=tmp_path, progress=False)


def test_an_arm_of_another_architecture_is_named(tmp_path, pretrained):
    with pytest.raises(TransferError, match=r"arm 'dc' cannot start from .*: .* holds a 'tiny-cnn' "
                                            r"encoder; it cannot be loaded into 'resnet18'"):
        run_transfer(task(), fast(encoder="resnet18", arms={"random": "random", "dc": str(pretrained)}),
                     out=tmp_path, progress=False)


def test_config_keeps_the_budget_equal():
    with pytest.raises(ConfigError, match="leave patience unset"):
        load_config(TransferConfig, None, patience=3)
    with pytest.raises(ConfigError, match="init: Input should be 'random'"):
        load_config(TransferConfig, None, init="some.pt")
    with pytest.raises(ConfigError, match="arm names become folder names"):
        load_config(TransferConfig, None, arms={"a/b": "random"})
    assert fast().arm_config("x.pt").init == "x.pt"


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """A timm resnet10t state dict (random init) as ImageNet weights are saved: 3 RGB channels."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("imagenet") / "resnet10t.safetensors"
    save_file(timm.create_model("resnet10t").state_dict(), path)
    return path


def test_a_pretrained_weights_arm_runs_beside_random(tmp_path, imagenet_file):
    from msk.core.io.checkpoint import load_checkpoint

    config = fast(encoder="timm/resnet10t", epochs=1,
                  arms={"random": "random", "imagenet": f"pretrained:{imagenet_file}"})
    result = run_transfer(task(), config, out=tmp_path, progress=False)
    assert [(a.name, a.init) for a in result.arms] == [("random", "random"),
                                                       ("imagenet", f"pretrained:{imagenet_file}")]
    assert result.reference is result.arms[0] and result.rows()[1]["accuracy_gap"] is not None
    for arm, options in (("random", {}), ("imagenet", {"pretrained": str(imagenet_file)})):
        ckpt = load_checkpoint(tmp_path / arm / "fold-1" / "best.pt")
        assert (ckpt.config["init"], ckpt.config["encoder_options"]) == ("random", options)
    assert json.loads((tmp_path / "imagenet" / "fold-2" / "result.json").read_text())["init"] == \
        f"pretrained:{imagenet_file}"
    moved = fast(encoder="timm/resnet10t", epochs=1,
                 arms={"random": "random", "imagenet": f"pretrained:{tmp_path / 'other.safetensors'}"})
    with pytest.raises(TransferError, match=r"arm 'imagenet' cannot start from pretrained:.*other.safetensors: "
                                            r"encoder option pretrained=.*: no such file"):
        run_transfer(task(), moved, out=tmp_path, progress=False)  # before any training
    (tmp_path / "other.safetensors").write_bytes(imagenet_file.read_bytes())
    with pytest.raises(TransferError, match=r"imagenet was trained from pretrained:.*resnet10t.safetensors, "
                                            r"the config now says pretrained:.*other.safetensors"):
        run_transfer(task(), moved, out=tmp_path, progress=False)


def test_pretrained_weights_are_an_arm_not_a_shared_option(imagenet_file):
    with pytest.raises(ConfigError, match=r"drop encoder_options.pretrained and add an arm NAME: pretrained:"):
        load_config(TransferConfig, None, encoder_options={"pretrained": str(imagenet_file)})
    arm = fast(encoder_options={"img_size": 32}).arm_config(f"pretrained:{imagenet_file}")
    assert (arm.init, arm.encoder_options) == ("random", {"img_size": 32, "pretrained": str(imagenet_file)})


def test_cli_arm_with_pretrained_weights(tmp_path):
    from typer.testing import CliRunner

    from msk.core.cli import app

    data = task()
    ingest = fake_ingest(tmp_path / "ingest", data)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([["image_id", "label"], *zip(data.image_ids, data.labels)])
    result = CliRunner().invoke(app, ["train", "transfer", str(ingest), str(labels), str(tmp_path / "run"),
                                      "--arm", f"imagenet=pretrained:{tmp_path / 'w.safetensors'}"])
    assert isinstance(result.exception, TransferError)  # `msk` prints it as one line, before any training
    assert re.match(r"arm 'imagenet' cannot start from pretrained:.*w.safetensors: encoder option "
                    r"pretrained=.*: no such file", str(result.exception))
