"""docs/config.md documents every config key of every command, and is current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from msk.core import config_docs
from msk.core.config_docs import command_configs, config_rows, render

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "config.md"
CLI = REPO / "msk" / "core" / "cli.py"


@pytest.fixture(scope="module")
def commands():
    return command_configs()


@pytest.fixture(scope="module")
def rendered():
    return render()


def test_the_committed_docs_are_what_the_models_generate(rendered):
    assert DOCS.is_file(), "docs/config.md is missing: python -m msk.core.config_docs > docs/config.md"
    assert DOCS.read_text() == rendered, (
        "docs/config.md is stale: regenerate it with python -m msk.core.config_docs > docs/config.md")


def test_every_key_of_every_command_config_has_a_description(commands):
    missing = [f"{entry.command}: {cls.__name__}.{row.key}"
               for entry in commands for cls in entry.configs for row in config_rows(cls) if not row.description]
    assert not missing, "config keys without a description (Field(description=...)): " + ", ".join(missing)


def test_every_config_a_command_loads_is_documented(rendered):
    """Read cli.py independently of the generator: each ``load_config(SomeClass`` has a table."""
    loaded = set(re.findall(r"load_config\(\s*([A-Z]\w*)\s*,", CLI.read_text()))
    assert {"SynthConfig", "IngestConfig", "DeepClusterConfig", "SorterConfig"} <= loaded  # the scan works
    undocumented = sorted(name for name in loaded if f"\n### {name}\n" not in rendered)
    assert not undocumented, f"configs loaded in cli.py but missing from docs/config.md: {undocumented}"


def test_every_command_that_takes_a_config_file_has_a_section(rendered):
    import typer.main

    from msk.core.cli import app

    def leaves(group, prefix=("msk",)):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from leaves(cmd, (*prefix, name))
            else:
                yield " ".join((*prefix, name)), cmd

    taking = [name for name, cmd in leaves(typer.main.get_command(app))
              if any(p.name == "config" for p in cmd.params)]
    assert "msk serve" in taking and "msk train sorter" in taking
    missing = [name for name in taking if f"\n## {name}\n" not in rendered]
    assert not missing, f"commands with a config file but no section in docs/config.md: {missing}"
    assert "`port`" in rendered.split("\n## msk serve\n")[1]  # msk serve's keys come from msk.serve.config


def test_a_new_command_is_documented_without_a_hand_list(tmp_path, monkeypatch):
    source = CLI.read_text() + '''

@train_app.command("widget")
def train_widget(config=None):
    """A command added after the generator was written."""
    from msk.core.models.embed import EmbedConfig

    load_config(EmbedConfig, config)
'''
    fake = tmp_path / "cli.py"
    fake.write_text(source)
    found = {entry.command: entry for entry in command_configs(fake)}
    assert "msk train widget" in found and found["msk train widget"].has_config_file
    assert [c.__name__ for c in found["msk train widget"].configs] == ["EmbedConfig"]
    monkeypatch.setattr(config_docs, "CLI", fake)
    assert "\n## msk train widget\n" in render()


def test_nested_keys_are_dotted_with_the_defaults_the_command_uses(commands):
    from msk.core.stages.fusion.config import FusionConfig

    rows = {row.key: row for row in config_rows(FusionConfig)}
    assert rows["train.augmentation.rotation.p"].default == "1.0"
    assert rows["train.epochs"].default == str(FusionConfig().train.epochs)  # the fusion default, not TrainConfig's
    assert rows["train"].default == "see below"
    from msk.core.stages.recommender.config import RecommenderEvalConfig

    keys = {row.key for row in config_rows(RecommenderEvalConfig)}
    assert {"classifiers[].name", "deepcluster.augmentation.crop.scale"} <= keys
