"""The main job end to end: `msk demo` (synth -> ingest) accounts for every synthetic file."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from msk.core.cli import app
from msk.core.dataset import read_shards
from msk.core.synth import ground_truth_for_ingest


@pytest.mark.slow
def test_demo_accounts_for_every_file(ray_session, tmp_path, monkeypatch):
    monkeypatch.delenv("MSK_PSEUDONYM_KEY", raising=False)
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", str(out), "--n", "200", "--image-size", "64"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for where in ("synthetic export:", "shards:", "manifest:", "ground truth:"):
        assert where in result.output

    rows = ground_truth_for_ingest(out / "synth", out / "ingest", status=None)
    assert len(rows) == 200  # nothing lost: one manifest row per written file
    got = rows["status"].where(rows["status"] == "ok", rows["reason"])
    assert (got == rows["expected_status"]).all(), \
        rows.loc[got != rows["expected_status"], ["path", "reason", "expected_status"]]
    assert set(rows["expected_status"]) >= {"ok", "empty", "corrupt", "not_an_image", "no_pixel_data"}

    shards = read_shards(out / "ingest", columns=["image_id", "height", "width", "patient_id"])
    assert shards.num_rows == (rows["status"] == "ok").sum()
    assert set(shards.column("height").to_pylist()) == {64}
    # pseudonyms, not the fake PatientIDs written into the headers
    assert not set(shards.column("patient_id").to_pylist()) & set(rows["patient_id"].astype(str))
    # the demo key lives beside the output, never inside it
    assert (tmp_path / ".demo.pseudonym.key").is_file()
    assert not list(out.rglob("*.key"))
