"""`msk demo`: the whole chain on a small synthetic export through the CLI, every file accounted
for, served over HTTP and checked against the same models in process (slow: 1-3 min)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from msk.core.cli import app
from msk.core.demo import DemoConfig, DemoError, default_k, run_demo
from msk.core.io.dataset import read_shards
from msk.core.synth import ground_truth_for_ingest

SMALL = DemoConfig(n_images=200, synth_size=128, image_size=32, cluster_epochs=1, sorter_epochs=1, folds=2,
                   classifier_epochs=1, roi_size=32, requests=3)


def test_default_k_follows_the_data_size():
    assert default_k(100) == 10 and default_k(800) == 40 and default_k(10**6) == 1000


@pytest.mark.slow
def test_the_demo_runs_the_whole_chain_and_serves_what_it_trained(tmp_path, ray_session, one_torch_thread,
                                                                  monkeypatch):
    monkeypatch.delenv("MSK_PSEUDONYM_KEY", raising=False)
    out = tmp_path / "demo"
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(SMALL.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["demo", str(out), "--config", str(config)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "SIMULATED EXPERT" in result.output and "report:" in result.output

    saved = json.loads((out / "demo.json").read_text())
    numbers = saved["numbers"]
    assert list(saved["seconds"]) == ["synth", "ingest", "cluster", "name clusters", "sorter",
                                      "lesion classifier", "fusion classifier", "recommender", "serve"]
    assert numbers["labels"]["named_by"].startswith("automatic:")
    assert 0 <= numbers["sorter"]["top1_truth"] <= numbers["sorter"]["top2_truth"] <= 1
    served = numbers["serve"]
    assert served["requests"] == 3 and served["whole_image_without_box"] == "422 box_required"
    # over HTTP, from the DICOM files, the served models answer exactly as in this process
    assert served["same_as_in_process"] == 3
    report = (out / "report.html").read_text()
    assert "Synthetic data." in report and "simulated expert" in report and "box_required" in report
    for rel in ("sorter/confusion_test.png", "cluster/review/index.html"):
        assert (out / rel).is_file() and rel.split("/")[0] in report

    # every synthetic file is accounted for, with the reason the export planned for it
    rows = ground_truth_for_ingest(out / "synth", out / "ingest", status=None)
    assert len(rows) == 200 == numbers["ingest"]["ok"] + numbers["ingest"]["quarantined"]
    got = rows["status"].where(rows["status"] == "ok", rows["reason"])
    assert (got == rows["expected_status"]).all(), \
        rows.loc[got != rows["expected_status"], ["path", "reason", "expected_status"]]
    shards = read_shards(out / "ingest", columns=["image_id", "height", "patient_id"])
    assert shards.num_rows == (rows["status"] == "ok").sum()
    assert set(shards.column("height").to_pylist()) == {32}
    # pseudonyms, not the fake PatientIDs written into the headers; the demo key beside the output
    assert not set(shards.column("patient_id").to_pylist()) & set(rows["patient_id"].astype(str))
    assert (tmp_path / ".demo.pseudonym.key").is_file() and not list(out.rglob("*.key"))

    with pytest.raises(DemoError, match="is not empty"):
        run_demo(out, SMALL)
