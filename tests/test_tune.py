"""Ray Tune search (``msk tune``): search spaces, trials driving Ray Train, ASHA, best config."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from msk.core.cli import app
from msk.core.config import load_config
from msk.core.errors import ConfigError
from msk.core.stages.fusion.config import FusionConfig
from msk.core.stages.fusion.data import load_fusion_data
from msk.core.stages.recommender.config import ClassifierSpec, RecommenderEvalConfig
from msk.core.stages.sorter.training import SorterConfig
from msk.core.stages.tuning.search import (
    TASKS,
    StateApiWarning,
    TuneError,
    TuneOptions,
    default_space_path,
    get_task,
    load_space,
    trial_resources,
    tune_task,
)

from test_fusion import lesions, quick_config
from test_recommender import write_ingest
from test_sorter import fast, labelled

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- search spaces (no Ray) --------------------------------------------------------------------


def test_default_spaces_tune_what_each_task_needs():
    wanted = {
        "sorter": {"lr", "batch_size", "epochs", "aug_prob", "encoder"},
        "fusion": {"train.lr", "train.batch_size", "train.epochs", "train.aug_prob", "train.encoder", "heads"},
        "recommender": {"training.lr", "training.batch_size", "training.epochs", "training.aug_prob",
                        "encoder", "k"},
    }
    assert set(TASKS) == set(wanted)
    for task, keys in wanted.items():
        space = load_space(task, default_space_path(task))
        assert keys <= set(space.keys()), task
        assert space.source.endswith(f"tune/{task}.yaml")
        assert set(space.to_tune()) == set(space.keys())


@pytest.mark.parametrize("space, message", [
    ({"lrr": {"loguniform": [1e-4, 1e-2]}}, "lrr: no such option"),
    ({"batch_size": {"uniform": [8, 64]}}, "float range on an integer option"),
    ({"encoder": {"choice": ["resnet18", "resnet19"]}}, "no encoder named 'resnet19'"),
    ({"lr": {"normal": [0, 1]}}, "expected a constant or one of"),
    ({"lr": {"loguniform": [0, 1e-2]}}, "0 < low < high"),
    ({"epochs": {"randint": [2, 8.5]}}, "randint takes integers"),
    ({"epochs": {"choice": [4, 0]}}, "epochs=0 is not a valid SorterConfig option"),
    ({"aug_prob": {"choice": []}}, "non-empty list"),
    ({}, "the search space is empty"),
])
def test_bad_spaces_are_refused_naming_the_file_and_key(tmp_path, space, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(ConfigError, match=message) as info:
        load_space("sorter", path)
    assert str(path) in str(info.value)


def test_nested_keys_and_task_options():
    space = load_space("fusion", {"heads": {"choice": [["concat"], ["film"]]}, "train.lr": 1e-3})
    config = get_task("fusion").configure(FusionConfig(), {"heads": ["film"], "train.lr": 1e-3})
    assert config.heads == ["film"] and config.train.lr == 1e-3 and space.keys() == ["heads", "train.lr"]
    with pytest.raises(ConfigError, match="no fusion head named 'gatd'"):
        load_space("fusion", {"heads": {"choice": [["gatd"]]}})
    with pytest.raises(ConfigError, match="'lr' is not a section"):
        load_space("fusion", {"lr.value": 1})

    task = get_task("recommender")
    config = task.configure(RecommenderEvalConfig(), {"encoder": "resnet34", "k": 5, "training.lr": 2e-3})
    assert config.classifiers[0].encoder == "resnet34" and config.k == 5 and 5 in config.ks
    with pytest.raises(ConfigError, match="unweighted vote needs odd k"):
        load_space("recommender", {"k": {"choice": [3, 4]}})
    with pytest.raises(ConfigError, match="unknown tuning task 'sortr'; tasks: fusion, recommender, sorter"):
        get_task("sortr")


def test_a_trial_that_trains_itself_on_a_gpu_asks_tune_for_one():
    assert trial_resources(TuneOptions(num_workers=0, use_gpu=True)) == {"cpu": 1, "gpu": 1}
    assert trial_resources(TuneOptions(num_workers=0)) is None  # Tune's default: one CPU
    assert trial_resources(TuneOptions(num_workers=2, use_gpu=True)) is None  # its Train workers ask


# -- searches ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sorter_trials_drive_ray_train_and_the_best_config_trains(tmp_path, ray_session):
    """Each trial is a Ray Train run (TorchTrainer, one worker) reporting every epoch to Tune;
    best.yaml is a SorterConfig that `msk train sorter --config` loads."""
    space = {"lr": {"loguniform": [1e-3, 1e-2]}, "batch_size": {"choice": [8, 16]}, "epochs": {"choice": [1, 2]}}
    with pytest.warns(StateApiWarning, match="State API does not answer"):  # the session's Ray: no dashboard
        result = tune_task("sorter", labelled(), out=tmp_path, space=space, base=fast(),
                           options=TuneOptions(samples=2, num_workers=1))
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "ok").all()
    assert result.best_value == pytest.approx(trials["val_accuracy"].max())
    for row in trials.to_dict("records"):
        run = tmp_path / "trials" / row["trial_id"]
        placement = json.loads((run / "workers" / "rank-0.json").read_text())  # a Ray Train worker ran it
        assert placement["world_size"] == 1
        trial = json.loads((run / "trial.json").read_text())  # and the trial's driver
        assert trial["params"]["lr"] == pytest.approx(row["param.lr"]) and trial["node_id"]
        history = pd.read_csv(run / "history.csv")
        assert len(history) == row["epochs_run"] <= row["param.epochs"]
    best = load_config(SorterConfig, result.best_yaml)
    assert best == result.best_config
    assert best.lr == pytest.approx(result.best_params["lr"]) and best.encoder == "tiny-cnn"
    assert best.num_workers == fast().num_workers  # tuning options do not leak into the config
    assert result.best_yaml.read_text().startswith("# best of 2 trials of `msk tune sorter`")


@pytest.mark.slow
def test_asha_stops_trials_that_fall_behind(tmp_path, ray_session):
    """Sequential trials: a learning rate too small to learn is stopped at the first rung."""
    space = {"lr": {"choice": [1e-2, 1e-9]}, "epochs": 4}
    result = tune_task("sorter", labelled(90), out=tmp_path, space=space, base=fast(batch_size=8),
                       options=TuneOptions(samples=3, num_workers=0, max_concurrent=1, grace_period=1,
                                           reduction_factor=2, seed=1))  # lr: 1e-2, 1e-9, 1e-9
    trials = result.trials
    stalled = trials[trials["param.lr"] < 1e-6]
    learned = trials[trials["param.lr"] > 1e-6]
    assert len(stalled) and len(learned), trials
    assert (stalled["epochs_run"] < 4).all() and (learned["epochs_run"] == 4).all(), trials
    assert result.best_params["lr"] == 1e-2


@pytest.mark.slow
def test_fusion_trials_train_one_head_in_the_trial_process(tmp_path, ray_session):
    images, meta = lesions(48)
    base = quick_config(folds=2)
    data = load_fusion_data(images, meta, base)
    space = {"heads": {"choice": [["concat"], ["film"]]}, "dropout": {"uniform": [0.0, 0.3]},
             "train.epochs": 2}
    result = tune_task("fusion", data, out=tmp_path, space=space, base=base,
                       options=TuneOptions(samples=2, num_workers=0))
    assert result.metric == "val_accuracy" and 0 <= result.best_value <= 1
    best = load_config(FusionConfig, result.best_yaml)
    assert len(best.heads) == 1 and best.heads == result.best_params["heads"] and best.train.epochs == 2
    assert (result.trials["epochs_run"] >= 1).all()


@pytest.mark.slow
def test_msk_tune_recommender_scores_the_vote_and_writes_its_config(tmp_path, ray_session):
    labels = write_ingest(tmp_path / "ingest", n_patients=6)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    base = RecommenderEvalConfig(image_size=16, seeds=[0], ks=[1, 3], k=3, embeddings=["cnn"],
                                 classifiers=[ClassifierSpec(name="cnn", encoder="tiny-cnn")],
                                 training={"epochs": 2, "batch_size": 8, "augment": False})
    (tmp_path / "base.yaml").write_text(base.to_yaml())
    (tmp_path / "space.yaml").write_text("k: {choice: [1, 3]}\ntraining.lr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    res = CliRunner().invoke(app, ["tune", "recommender", str(tmp_path / "ingest"), str(tmp_path / "labels.csv"),
                                   str(tmp_path / "out"), "--samples", "2", "--num-workers", "0",
                                   "--space", str(tmp_path / "space.yaml"), "-c", str(tmp_path / "base.yaml")])
    assert res.exit_code == 0, res.output
    assert "msk eval recommender INGEST LABELS OUT --config" in res.output
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert trials["val_vote_accuracy"].between(0, 1).all() and len(trials) == 2
    best = load_config(RecommenderEvalConfig, tmp_path / "out" / "best.yaml")
    assert best.k in (1, 3) and best.k in best.ks and best.classifiers[0].encoder == "tiny-cnn"


@pytest.mark.slow
def test_unusable_data_fails_before_ray_and_failed_trials_are_reported(tmp_path, ray_session):
    with pytest.raises(Exception, match="patients"):
        tune_task("sorter", labelled(12), out=tmp_path / "few", space={"lr": 1e-3}, base=fast(folds=5))
    assert not (tmp_path / "few" / "ray").exists()

    with pytest.raises(TuneError, match="no trial of sorter reported val_accuracy") as info:
        tune_task("sorter", labelled(), out=tmp_path / "bad", space={"init": str(tmp_path / "missing.pt")},
                  base=fast(), options=TuneOptions(samples=1, num_workers=0))
    assert "missing.pt" in str(info.value)
    assert pd.read_csv(tmp_path / "bad" / "trials.csv")["status"].tolist() == ["error"]
