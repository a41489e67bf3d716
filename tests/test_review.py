"""``msk clusters review``: the session's files (fast, no server), the app's pages (TestClient),
and the whole loop in Debian's Chromium through Playwright (slow)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from msk.core.stages.cluster.review import (
    AUDIT_FIELDS,
    ReviewConfig,
    ReviewError,
    ReviewRun,
    ReviewSession,
    create_app,
)

CHROMIUM = Path("/usr/bin/chromium")


def fake_run(tmp_path: Path, sizes=(5, 4, 3, 0, 2)) -> ReviewRun:
    """A run folder of clusters of the given sizes (no images: the session needs none)."""
    assignments = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)]).astype(np.int64)
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    np.save(run_dir / "assignments.npy", assignments)
    (run_dir / "config.yaml").write_text(f"k: {len(sizes)}\n")
    centroids = np.eye(len(sizes), 3, dtype=np.float32) + 0.1
    return ReviewRun(run_dir, len(sizes), assignments, [f"IMG-{i}" for i in range(len(assignments))],
                     centroids=centroids, centroids_from="test centres")


def read_labels(path: Path) -> dict[int, dict[str, str]]:
    with path.open(newline="") as f:
        return {int(row["cluster"]): row for row in csv.DictReader(f)}


def test_decisions_are_written_at_once_and_apply_reads_them(tmp_path):
    from msk.core.io.labels import apply_labels

    run = fake_run(tmp_path)
    session = ReviewSession(run, reviewer="alice")
    assert run.order == [0, 1, 2, 4] and session.next_open() == 0  # by size, the empty cluster left out
    assert session.name(0, "Knee") == "knee"  # any spelling, stored canonical
    session.merge(1, 0)
    session.discard(2)
    labels = read_labels(session.labels_path)
    assert [labels[c]["label"] for c in range(5)] == ["knee", "knee", "discard", "", ""]
    assert labels[1]["merged_into"] == "0" and labels[0]["named_by"] == "alice"
    session.name(0, "hand")  # a merged cluster follows its target
    assert read_labels(session.labels_path)[1]["label"] == "hand"
    weak = apply_labels(session.labels_path, run.assignments, k=run.k)
    assert weak.class_counts == {"hand": 9} and weak.discarded == 3 and weak.unlabelled == 2
    assert session.progress() == {"clusters": 4, "decided": 3, "named": 2, "discarded": 1, "merged": 1,
                                  "images": 14, "images_named": 9, "images_covered": 12}
    audit = session.audit()
    assert [(r["action"], r["cluster"], r["old_label"], r["new_label"]) for r in audit] == [
        ("name", "0", "", "knee"), ("merge", "1", "", ""), ("discard", "2", "", "discard"),
        ("name", "0", "knee", "hand")]
    assert audit[1]["new_merged_into"] == "0" and {r["reviewer"] for r in audit} == {"alice"}
    assert list(audit[0]) == AUDIT_FIELDS


def test_undo_and_restart_resume_from_the_files(tmp_path):
    run = fake_run(tmp_path)
    session = ReviewSession(run, reviewer="alice")
    session.name(0, "knee")
    session.name(1, "hand")
    session.name(1, "foot")
    assert session.undo() == 1 and session.effective(1) == "hand"
    again = ReviewSession(run, reviewer="bob")  # a restart: state from labels.csv, undo history from audit.csv
    assert again.effective(0) == "knee" and again.effective(1) == "hand" and again.next_open() == 2
    assert again.undo() == 1 and again.effective(1) == ""
    assert again.undo() == 0 and again.undo() is None
    assert [r["action"] for r in again.audit()][-3:] == ["undo", "undo", "undo"]


def test_a_name_outside_the_set_is_refused_with_suggestions(tmp_path):
    session = ReviewSession(fake_run(tmp_path), reviewer="alice")
    with pytest.raises(ReviewError, match="'kne' is not a region of samx-regions; did you mean 'knee'"):
        session.name(0, "kne")
    assert session.suggestions("kne")[0] == "knee"
    assert session.suggestions("lowerleg")[0] == "lower leg"
    with pytest.raises(ReviewError, match="already merged into cluster 0"):
        session.merge(1, 0) or session.merge(0, 1)
    assert session.audit()[-1]["action"] == "merge"  # the refused ones left no trace


def test_a_labels_file_edited_on_disk_is_detected_and_asked_about(tmp_path):
    session = ReviewSession(fake_run(tmp_path), reviewer="alice")
    session.name(0, "knee")
    text = session.labels_path.read_text().replace("\n2,3,,,", "\n2,3,Chest,,")
    session.labels_path.write_text(text)
    assert session.check_file()
    with pytest.raises(ReviewError, match="was changed on disk"):
        session.name(1, "hand")
    session.resolve("file")
    assert session.effective(2) == "thorax" and not session.conflict  # chest: an alias of thorax
    assert [(r["action"], r["cluster"], r["new_label"]) for r in session.audit()][-2:] == [
        ("load-file", "*", ""), ("file-edit", "2", "thorax")]
    session.labels_path.write_text(text.replace("Chest", "thorx"))
    assert session.check_file()
    with pytest.raises(ReviewError, match="line 4: 'thorx' is not a region"):
        session.resolve("file")
    session.resolve("app")  # overwrite the bad edit
    assert read_labels(session.labels_path)[2]["label"] == "thorax" and not session.check_file()


def test_app_pages_404_empty_run_and_token(tmp_path):
    from fastapi.testclient import TestClient

    run = fake_run(tmp_path)
    client = TestClient(create_app(ReviewSession(run, reviewer="alice"), ReviewConfig()))
    assert client.get("/", follow_redirects=False).headers["location"] == "/cluster/0"
    page = client.get("/cluster/7")
    assert page.status_code == 404 and "cluster 7 does not exist in this run (the clusters are 0..4)" in page.text
    assert client.get("/cluster/<script>").status_code == 404
    assert "&lt;script&gt;" in client.get("/cluster/<script>").text
    assert client.get("/api/clusters/7").status_code == 404
    refused = client.post("/api/clusters/0", json={"action": "name", "name": "elbw"})
    assert refused.status_code == 422 and refused.json()["suggestions"][0] == "elbow"
    done = client.post("/api/clusters/0", json={"action": "name", "name": "elbow"}).json()
    assert done["effective"] == "elbow" and done["next"] == 1

    empty = ReviewRun(tmp_path / "nothing", 0, np.zeros(0, np.int64), [],
                      empty_reason="nothing has no clusters yet (no assignments.npy)")
    client = TestClient(create_app(ReviewSession(empty, reviewer="alice"), ReviewConfig()))
    assert 'data-empty="nothing has no clusters yet (no assignments.npy)"' in client.get("/").text
    assert client.get("/api/run").json()["empty"].startswith("nothing has no clusters")

    client = TestClient(create_app(ReviewSession(run, reviewer="alice"), ReviewConfig(), token="s3cret"))
    assert client.get("/api/run").status_code == 401
    assert client.get("/api/run?token=s3cret").status_code == 200
    assert client.get("/api/run").status_code == 200  # the cookie set by the first visit


# -- in a real browser -------------------------------------------------------------------------


def build_run(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A 24-image ingest (shard schema) and a real 1-epoch DeepCluster run of it (`msk cluster`, k=6)."""
    from test_build_recommender import run_msk
    from test_recommender import write_ingest

    write_ingest(tmp_path / "ingest", n_patients=4, per_patient=2, size=48)
    (tmp_path / "dc.yaml").write_text("encoder: tiny-cnn\nk: 6\nepochs: 1\nimage_size: 16\nnum_workers: 0\n"
                                      "batch_size: 8\npca_dim: 8\n")
    code, _, stderr = run_msk(monkeypatch, "cluster", tmp_path / "ingest", tmp_path / "run", "--config",
                              tmp_path / "dc.yaml")
    assert code == 0, stderr
    assert np.load(tmp_path / "run" / "centroids.npy").shape == (6, 8)
    return tmp_path / "ingest", tmp_path / "run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ingest: Path, run: Path, port: int, reviewer: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "msk.core.cli", "clusters", "review", str(ingest), str(run),
                             "--port", str(port), "--reviewer", reviewer],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def wait_up(server: subprocess.Popen, port: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.poll() is not None:
            raise AssertionError(f"the server ended: {server.communicate()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the server did not answer")


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's Chromium at /usr/bin/chromium "
                    "(apt-get install chromium chromium-driver; .ci/run installs it)")
def test_review_loop_in_chromium(tmp_path, monkeypatch):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[test]')")

    from test_build_recommender import run_msk

    ingest, run = build_run(tmp_path, monkeypatch)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(ingest, run, port, "alice")
    (tmp_path / "no-run").mkdir()
    empty_port = free_port()
    empty_server = start_server(ingest, tmp_path / "no-run", empty_port, "alice")  # a run without clusters
    try:
        wait_up(server, port)
        second = start_server(ingest, run, free_port(), "bob")  # a second reviewer is refused
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2 and "being written by another msk clusters review (reviewer alice" in err

        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page()
            wait_up(empty_server, empty_port)
            page.goto(f"http://127.0.0.1:{empty_port}/")
            page.wait_for_selector('body[data-ready="empty"]')
            assert "has no clusters yet (no assignments.npy)" in page.inner_text("#empty")
            assert not page.is_visible("#main") and not page.is_visible(".progress")
            empty_server.terminate()

            def at(cluster: int) -> None:
                page.wait_for_selector(f'body[data-ready="{cluster}"]', timeout=10_000)

            def decided(n: int) -> None:
                page.wait_for_selector(f'#progress-text[data-decided="{n}"]', timeout=10_000)

            page.goto(url + "/")
            order = page.evaluate("fetch('/api/run').then(r => r.json()).then(d => d.order)")
            assert len(order) == 6
            assert page.inner_text("#neighbours-from") == "(by the run's k-means centres)"
            at(order[0])
            # a name outside the set is refused inline, with suggestions; Tab takes the completion
            page.keyboard.press("n")
            page.keyboard.type("kne")
            page.keyboard.press("Enter")
            page.wait_for_selector("#error:not([hidden])")
            assert "'kne' is not a region of samx-regions" in page.inner_text("#error")
            assert page.inner_text("#error .suggestion") == "knee"
            page.fill("#name", "")
            page.keyboard.type("kne")
            assert page.inner_text("#completions li") .startswith("knee")
            page.keyboard.press("Tab")
            page.keyboard.press("Enter")
            at(order[1])
            page.keyboard.press("n")
            page.keyboard.type("hand")
            page.keyboard.press("Enter")
            at(order[2])
            # merge with the nearest cluster, then discard one
            target = int(page.get_attribute("#neighbours li:first-child", "data-cluster"))
            page.keyboard.press("m")
            page.wait_for_selector("#merge-prompt:not([hidden])")
            page.keyboard.press("1")
            decided(3)
            nxt = page.evaluate("document.body.dataset.ready")
            page.keyboard.press("d")
            decided(4)
            page.keyboard.press("u")  # undo the discard: back on that cluster, open again
            at(int(nxt))
            decided(3)
            assert page.get_attribute("#current", "data-label") == ""
            page.keyboard.press("d")
            decided(4)
            discarded = int(nxt)

            page.reload()  # the browser reloads: the state comes from the server
            decided(4)
            page.goto(f"{url}/cluster/{order[0]}")
            at(order[0])
            assert page.get_attribute("#current", "data-label") == "knee"
            response = page.goto(f"{url}/cluster/999")
            assert response.status == 404 and "cluster 999 does not exist" in page.inner_text("#not-found")

            page.goto(f"{url}/cluster/{order[0]}")
            at(order[0])
            server.send_signal(signal.SIGKILL)  # killed: nothing to flush, every decision is on disk
            server.wait(timeout=30)
            page.wait_for_selector("#offline:not([hidden])", timeout=10_000)  # the page's poll notices
            server = start_server(ingest, run, port, "alice")
            wait_up(server, port)
            page.goto(url + "/")  # resumes at the next open cluster
            open_ = [c for c in order if c not in (order[0], order[1], order[2], discarded)]
            at(open_[0])
            decided(4)
            page.keyboard.press("s")  # skip, then back
            at(open_[1])
            page.keyboard.press("p")
            at(open_[0])
            page.keyboard.press("Enter")
            page.keyboard.type("chest")
            page.keyboard.press("Enter")
            decided(5)

            # an edit on disk while the app runs: the page asks, the file is loaded
            labels = run / "expert" / "labels.csv"
            rows = list(csv.DictReader(labels.open(newline="")))
            for row in rows:
                if row["cluster"] == str(open_[1]):
                    row["label"] = "foot"
            with labels.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            page.wait_for_selector("#conflict[open]", timeout=10_000)
            page.keyboard.press("f")
            page.wait_for_selector("#conflict:not([open])", state="attached")
            decided(6)
            browser.close()
    finally:
        for process in (server, empty_server):
            process.terminate()
            process.wait(timeout=30)

    code, stdout, stderr = run_msk(monkeypatch, "clusters", "apply", run / "expert" / "labels.csv", run)
    assert code == 0, stderr
    final = read_labels(run / "expert" / "labels.csv")
    assert final[order[2]]["merged_into"] == str(target)
    assert final[order[2]]["label"] == final[target]["label"]
    assert (final[order[0]]["label"], final[order[1]]["label"], final[discarded]["label"]) == ("knee", "hand",
                                                                                               "discard")
    audit = list(csv.DictReader((run / "expert" / "audit.csv").open(newline="")))
    steps = [(r["action"], r["cluster"], r["old_label"], r["new_label"]) for r in audit]
    assert steps == [
        ("name", str(order[0]), "", "knee"), ("name", str(order[1]), "", "hand"),
        ("merge", str(order[2]), "", ""), ("discard", str(discarded), "", "discard"),
        ("undo", str(discarded), "discard", ""), ("discard", str(discarded), "", "discard"),
        ("skip", str(open_[0]), "", ""), ("name", str(open_[0]), "", "thorax"),
        ("load-file", "*", "", ""), ("file-edit", str(open_[1]), "", "foot")]
    assert audit[2]["new_merged_into"] == str(target) and {r["reviewer"] for r in audit} == {"alice"}


def test_hints_are_majorities_over_known_images(tmp_path):
    from msk.core.stages.cluster.review import _image_labels, cluster_hints

    run = fake_run(tmp_path)
    truth = tmp_path / "truth.csv"
    truth.write_text("image_id,region\nIMG-0,knee\nIMG-1,Knee\nIMG-2,hand\nIMG-5,chest\nOTHER,foot\n")
    labels = _image_labels(truth, run.image_ids, "samx-regions")
    assert labels[:3] == ["knee", "knee", "hand"] and labels[5] == "thorax" and labels.count(None) == 10
    hints = cluster_hints(run, labels, "hint, truth")
    assert hints == {0: "hint, truth: knee (2 of 3 known images, purity 67%)",
                     1: "hint, truth: thorax (1 of 1 known image, purity 100%)"}
    unrelated = tmp_path / "unrelated.csv"
    unrelated.write_text("image_id,label\nX,knee\n")
    with pytest.raises(ReviewError, match="labels none of the 14 images"):
        _image_labels(unrelated, run.image_ids, "samx-regions")


def write_sorter_files(run_dir: Path) -> None:
    """The files of a sorter run that its report reads (numbers made up, pictures tiny)."""
    from PIL import Image

    run_dir.mkdir(parents=True)
    scores = {"name": "test", "n": 10, "top1": 0.8, "top2": 0.9, "macro_f1": 0.7512, "unknown": 0.1,
              "fold_top1": [0.7, 0.9], "fold_top2": [0.9, 0.9], "left_out": {},
              "confusion_png": "confusion_test.png", "predictions_csv": "predictions_test.csv"}
    (run_dir / "sorter.json").write_text(json.dumps({
        "classes": ["hand", "knee"], "folds": 2, "image_size": 32, "n_images": 40, "n_test": 10,
        "notes": ["a <note>"], "test": scores, "holdout": None}))
    for name in ("confusion_test.png", "gradcam.png"):
        Image.new("L", (8, 8)).save(run_dir / name)


def test_the_sorter_report_has_the_apps_look_and_the_app_links_it(tmp_path):
    from fastapi.testclient import TestClient

    from msk.core.io.report import style
    from msk.core.stages.sorter.report import write_sorter_report

    sorter = tmp_path / "sorter"
    write_sorter_files(sorter)
    page = write_sorter_report(sorter).read_text()
    assert style() in page and '<header class="bar">' in page  # the look of the review app, inlined
    assert "<td>0.751</td>" in page and 'src="confusion_test.png"' in page and 'src="gradcam.png"' in page
    assert "a &lt;note&gt;" in page and "against a truth" not in page
    (sorter / "truth_eval.json").write_text(json.dumps({
        "run": str(sorter), "truth": "truth.csv", "n_test": 10, "weak_top1": 0.8, "weak_top2": 0.9,
        "n_known": 6, "truth_top1": 0.6667, "truth_top2": 0.8333, "weak_agreement": 0.75, "outside": {}}))
    assert "<b>0.667</b>" in write_sorter_report(sorter).read_text()

    run = fake_run(tmp_path)  # tmp_path/run, beside tmp_path/sorter
    (tmp_path / "secret.csv").write_text("image_id,patient\n")
    client = TestClient(create_app(ReviewSession(run, reviewer="alice"), ReviewConfig()))
    assert client.get("/api/run").json()["reports"] == [{"name": "sorter/report.html",
                                                         "url": "/reports/sorter/report.html"}]
    assert "<b>0.667</b>" in client.get("/reports/sorter/report.html").text
    assert client.get("/reports/sorter/gradcam.png").headers["content-type"] == "image/png"
    assert client.get("/reports/sorter/sorter.json").status_code == 404  # pictures and pages only
    assert client.get("/reports/secret.csv").status_code == 404
    assert client.get("/reports/../../etc/passwd").status_code == 404
    assert client.get("/msk.css").text == style()


def test_a_deleted_labels_file_is_a_conflict_the_app_can_rewrite(tmp_path):
    session = ReviewSession(fake_run(tmp_path), reviewer="alice")
    session.name(0, "knee")
    session.labels_path.unlink()
    assert session.check_file()
    with pytest.raises(ReviewError, match="was deleted; keep this app's labels to write it again"):
        session.resolve("file")
    session.resolve("app")
    assert read_labels(session.labels_path)[0]["label"] == "knee"


def test_loading_a_run_without_clusters_or_from_another_ingest(tmp_path):
    from msk.core.stages.cluster.review import load_review_run

    from test_recommender import write_ingest

    write_ingest(tmp_path / "ingest", n_patients=1, per_patient=1, size=24)  # 3 images
    (tmp_path / "run").mkdir()
    empty = load_review_run(tmp_path / "ingest", tmp_path / "run")
    assert empty.k == 0 and "has no clusters yet (no assignments.npy): run `msk cluster" in empty.empty_reason
    np.save(tmp_path / "run" / "assignments.npy", np.array([0, 1, 1]))
    (tmp_path / "run" / "config.yaml").write_text("k: 3\n")
    (tmp_path / "run" / "assignments.csv").write_text("row,image_id,cluster\n0,A,0\n1,B,1\n2,C,1\n")
    with pytest.raises(ReviewError, match="was not clustered from"):
        load_review_run(tmp_path / "ingest", tmp_path / "run")
    from msk.core.io.dataset import read_shards

    ids = read_shards(tmp_path / "ingest", columns=["image_id"]).column("image_id").to_pylist()
    (tmp_path / "run" / "assignments.csv").write_text(
        "row,image_id,cluster\n" + "".join(f"{i},{x},{c}\n" for i, (x, c) in enumerate(zip(ids, [0, 1, 1]))))
    run = load_review_run(tmp_path / "ingest", tmp_path / "run")
    assert run.order == [1, 0] and run.images.shape == (3, 24, 24)  # cluster 2 is empty
    assert run.centroids_from == "pixel similarity (the run saved no centroids.npy)"
    assert [c for c, _ in run.nearest(0, 5)] == [1]


def test_a_loopback_app_answers_its_own_host_names_only(tmp_path):
    from fastapi.testclient import TestClient

    app = create_app(ReviewSession(fake_run(tmp_path), reviewer="alice"), ReviewConfig(),
                     hosts=["127.0.0.1", "localhost"])
    assert TestClient(app, base_url="http://127.0.0.1:8765").get("/api/status").status_code == 200
    assert TestClient(app, base_url="http://evil.example:8765").get("/api/status").status_code == 400


def test_a_review_of_assignments_the_run_no_longer_has_is_refused(tmp_path):
    run = fake_run(tmp_path)
    ReviewSession(run, reviewer="alice").name(0, "knee")
    run.assignments[:2] = 4  # `msk cluster` ran again on the folder
    with pytest.raises(ReviewError, match="was clustered again since this review began .* name other clusters now; "
                       "move .*expert away"):
        ReviewSession(run, reviewer="alice")
