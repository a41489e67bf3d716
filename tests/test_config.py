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
