"""Typed configs load from YAML, take overrides and fail with the file and field named."""

from __future__ import annotations

import pytest

from msk.core.config import MskConfig, load_config
from msk.core.errors import ConfigError


class Demo(MskConfig):
    image_size: int = 256
    name: str = "x"


def test_defaults_yaml_and_overrides(tmp_path):
    assert load_config(Demo).image_size == 256
    f = tmp_path / "c.yaml"
    f.write_text("image_size: 128\nname: y\n")
    cfg = load_config(Demo, f, image_size=64, name=None)
    assert (cfg.image_size, cfg.name) == (64, "y")
    assert load_config(Demo, f) == Demo(image_size=128, name="y")
    (tmp_path / "rt.yaml").write_text(cfg.to_yaml())
    assert load_config(Demo, tmp_path / "rt.yaml") == cfg


@pytest.mark.parametrize("text, match", [
    ("image_size: big\n", r"c.yaml: invalid Demo: image_size: Input should be a valid integer"),
    ("imagesize: 3\n", r"imagesize: Extra inputs are not permitted"),
    ("- 1\n- 2\n", r"expected a mapping of option: value, got list"),
    ("a: [1,\n", r"not valid YAML"),
])
def test_bad_files_name_file_and_field(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(Demo, f)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Demo, tmp_path / "nope.yaml")


# -- machine profiles (msk.core.profiles) -----------------------------------------------------


def test_profile_fills_only_the_options_left_unset(tmp_path):
    from msk.core.profiles import PROFILES, apply_profile
    from msk.core.stages.sorter.training import SorterConfig

    f = tmp_path / "sorter.yaml"
    f.write_text("epochs: 7\n")
    cfg, done = apply_profile(load_config(SorterConfig, f, folds=4), "sorter", "cpu")
    assert (cfg.epochs, cfg.folds) == (7, 4)  # the file's and the command line's win
    cpu = PROFILES["sorter"]["cpu"]
    assert (cfg.image_size, cfg.batch_size, cfg.num_workers) == (cpu["image_size"], cpu["batch_size"],
                                                                 cpu["num_workers"])
    assert set(done.applied) == set(cpu) - {"epochs", "folds"} and done.name == "cpu"
    assert done.line().startswith("profile cpu (chosen): image_size 64")
    gpu, _ = apply_profile(load_config(SorterConfig), "sorter", "gpu")
    assert gpu.use_gpu is True and gpu.image_size == PROFILES["sorter"]["gpu"]["image_size"]
    with pytest.raises(ConfigError, match="--profile 'tpu': expected one of auto, cpu, gpu"):
        apply_profile(load_config(SorterConfig), "sorter", "tpu")


def test_auto_profile_follows_the_machine(monkeypatch):
    import torch

    from msk.core.profiles import apply_profile
    from msk.core.stages.sorter.transfer import TransferConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg, done = apply_profile(load_config(TransferConfig), "transfer", "auto")
    assert (done.name, done.why, cfg.use_gpu) == ("cpu", "torch sees no CUDA device", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg, done = apply_profile(load_config(TransferConfig), "transfer", None)
    assert done.name == "gpu" and cfg.use_gpu is True
    _, done = apply_profile(load_config(TransferConfig, None, use_gpu=False), "transfer")
    assert (done.name, done.why) == ("cpu", "--no-gpu")  # --no-gpu on a GPU machine


def test_profile_sets_nested_options_and_keeps_a_resumed_runs_values(tmp_path):
    from msk.core.models.deepcluster import DeepClusterConfig
    from msk.core.profiles import apply_profile
    from msk.core.stages.fusion.config import FusionConfig

    cfg, done = apply_profile(load_config(FusionConfig), "fusion", "cpu")
    assert cfg.train.epochs == 10 and cfg.train.encoder == "tiny-cnn"  # the rest of the block as it was
    f = tmp_path / "fusion.yaml"
    f.write_text("train:\n  epochs: 3\n")
    assert apply_profile(load_config(FusionConfig, f), "fusion", "cpu")[0].train.epochs == 3

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(DeepClusterConfig(k=12, image_size=128, epochs=10).to_yaml())
    cfg, done = apply_profile(load_config(DeepClusterConfig), "cluster", "cpu", run_dir=run)
    assert (cfg.image_size, cfg.epochs) == (128, 10) and done.kept["image_size"] == 128
    assert "as the run folder records: image_size 128" in done.line()


@pytest.mark.parametrize(("command", "options"), [
    ("synth", ["--image-size"]), ("cluster", ["--image-size", "--profile"]),
    ("train sorter", ["--image-size", "--profile"]), ("train segmenter", ["--image-size", "--profile"]),
    ("train transfer", ["--image-size", "--profile"]), ("embed", ["--image-size"]),
    ("eval recommender", ["--image-size", "--profile"]), ("eval fusion", ["--image-size", "--profile"]),
    ("build recommender", ["--image-size"]),
])
def test_image_size_and_profile_options(command, options):
    from typer.testing import CliRunner

    from msk.core.cli import app

    result = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.output, f"msk {command} has no {option}"


def test_eval_recommender_image_size_carries_the_default_vit(tmp_path, monkeypatch):
    """--image-size 96 reaches the config, and the default ViT's img_size follows it."""
    from typer.testing import CliRunner

    import msk.core.stages.recommender.evaluation as recommender_eval
    from msk.core.cli import app

    seen = {}

    def fake(ingest, labels, out, config):
        seen["config"] = config
        raise ConfigError("stop here")

    monkeypatch.setattr(recommender_eval, "evaluate_recommender", fake)
    result = CliRunner().invoke(app, ["eval", "recommender", str(tmp_path), str(tmp_path / "l.csv"),
                                      str(tmp_path / "out"), "--image-size", "96", "--profile", "cpu"])
    assert isinstance(result.exception, ConfigError), result.output
    config = seen["config"]
    assert config.image_size == 96 and config.training.epochs == 5
    assert [c.encoder_options.get("img_size") for c in config.classifiers] == [None, 96]
