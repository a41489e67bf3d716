"""`msk demo`: the whole chain on a small synthetic export, served over HTTP (slow: ~1 min)."""

from __future__ import annotations

import json

import pytest

from msk.core.demo import DemoConfig, DemoError, default_k, run_demo

SMALL = DemoConfig(n_images=200, synth_size=128, image_size=32, cluster_epochs=1, sorter_epochs=1, folds=2,
                   classifier_epochs=1, roi_size=32, requests=3)


def test_default_k_follows_the_data_size():
    assert default_k(100) == 10 and default_k(800) == 40 and default_k(10**6) == 1000


@pytest.mark.slow
def test_the_demo_runs_the_whole_chain_and_serves_what_it_trained(tmp_path, ray_session, one_torch_thread):
    lines = []
    result = run_demo(tmp_path / "demo", SMALL, say=lines.append)
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    numbers = saved["numbers"]
    assert numbers["ingest"]["ok"] + numbers["ingest"]["quarantined"] == 200
    assert list(saved["seconds"]) == ["synth", "ingest", "cluster", "name clusters", "sorter",
                                      "lesion classifier", "fusion classifier", "recommender", "serve"]
    assert numbers["labels"]["named_by"].startswith("automatic:") and "SIMULATED EXPERT" in "\n".join(lines)
    assert 0 <= numbers["sorter"]["top1_truth"] <= numbers["sorter"]["top2_truth"] <= 1
    served = numbers["serve"]
    assert served["requests"] == 3 and served["whole_image_without_box"] == "422 box_required"
    # over HTTP, from the DICOM files, the served models answer exactly as in this process
    assert served["same_as_in_process"] == 3
    report = result.report.read_text()
    assert "Synthetic data." in report and "simulated expert" in report and "box_required" in report
    for rel in ("sorter/confusion_test.png", "cluster/review/index.html"):
        assert (tmp_path / "demo" / rel).is_file() and rel.split("/")[0] in report
    with pytest.raises(DemoError, match="is not empty"):
        run_demo(tmp_path / "demo", SMALL)
