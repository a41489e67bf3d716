"""Exporting clusters for labelling and applying the filled-in labels file."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from msk.core.io.labels import LabelFileError, apply_labels, read_label_file
from msk.core.stages.cluster.labelling import export_clusters

# 10 images: cluster 0 has 5, cluster 1 has 3, cluster 2 has 1, cluster 3 is empty, cluster 4 has 1
ASSIGNMENTS = np.array([0, 0, 1, 0, 1, 2, 0, 1, 0, 4])


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (len(ASSIGNMENTS), 40, 40), dtype=np.uint8)


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cluster", "size", "label"])
        writer.writerows(rows)
    return path


def test_export_writes_sheets_index_and_template(tmp_path, images):
    truth = ["hand"] * 9 + ["knee"]
    index = export_clusters(images, ASSIGNMENTS, tmp_path, per_sheet=4, thumb=16, k=5,
                            ground_truth=truth)
    assert index == tmp_path / "index.html"
    sheets = sorted(p.name for p in (tmp_path / "sheets").iterdir())
    assert sheets == ["cluster-0000.png", "cluster-0001.png", "cluster-0002.png", "cluster-0004.png"]
    with Image.open(tmp_path / "sheets" / "cluster-0000.png") as sheet:
        assert sheet.size == (2 * 18 + 2, 2 * 18 + 2)  # 4 of 5 thumbnails, 2 x 2 grid
    rows = list(csv.DictReader((tmp_path / "labels.csv").open()))
    assert [(r["cluster"], r["size"], r["label"]) for r in rows] == [
        ("0", "5", ""), ("1", "3", ""), ("2", "1", ""), ("4", "1", ""), ("3", "0", "")]
    page = index.read_text()
    assert page.index('id="cluster-0"') < page.index('id="cluster-1"') < page.index('id="cluster-3"')
    assert "5 images (50.0%), 4 shown" in page
    assert "a single image" in page and "empty: k-means left no image here" in page
    assert "ground truth: hand 100%" in page


def test_export_is_deterministic(tmp_path, images):
    a = export_clusters(images, ASSIGNMENTS, tmp_path / "a", per_sheet=2, thumb=16).parent
    b = export_clusters(images, ASSIGNMENTS, tmp_path / "b", per_sheet=2, thumb=16).parent
    for name in ("cluster-0000.png", "cluster-0001.png"):
        assert (a / "sheets" / name).read_bytes() == (b / "sheets" / name).read_bytes()


def test_apply_merges_aliases_and_discards(tmp_path):
    labels = write_csv(tmp_path / "labels.csv", [
        (0, 5, "Thorax"), (1, 3, "chest"), (2, 1, "discard"), (3, 0, ""), (4, 1, "KNEE")])
    weak = apply_labels(labels, ASSIGNMENTS, k=5)
    assert weak.class_counts == {"thorax": 8, "knee": 1}
    assert weak.labels[:3] == ["thorax", "thorax", "thorax"]
    assert weak.labels[5] is None and weak.labels[9] == "knee"
    assert (weak.discarded, weak.unlabelled) == (1, 0)
    assert weak.cluster_labels == {0: "thorax", 1: "thorax", 2: "discard", 4: "knee"}
    assert list(weak.indices()[[0, 5, 9]]) == [25, -1, 13]  # thorax, None, knee
    console = Console(record=True, width=100)
    console.print(weak.table())
    text = console.export_text()
    assert "thorax" in text and "(discard)" in text and "80.0%" in text


def test_weak_labels_are_saved_per_image(tmp_path):
    labels = write_csv(tmp_path / "labels.csv", [(0, 5, "hand"), (1, 3, "discard")])
    weak = apply_labels(labels, ASSIGNMENTS)
    path = weak.save(tmp_path / "weak.csv", image_ids=[f"id{i}" for i in range(10)])
    rows = list(csv.DictReader(path.open()))
    assert [(r["image_id"], r["label"]) for r in rows[:3]] == [("id0", "hand"), ("id1", "hand"), ("id2", "")]
    assert len(rows) == 10


def test_unlabelled_clusters_give_none(tmp_path):
    labels = write_csv(tmp_path / "labels.csv", [(0, 5, "hand"), (1, 3, "")])
    weak = apply_labels(labels, ASSIGNMENTS)
    assert weak.class_counts == {"hand": 5}
    assert weak.unlabelled == 5 and weak.labels.count(None) == 5


def test_yaml_labels(tmp_path):
    path = tmp_path / "labels.yaml"
    path.write_text("0: hand\n1: wrist\n2: discard\n4:\n")
    assert [(e.cluster, e.label, e.line) for e in read_label_file(path)] == [
        (0, "hand", 1), (1, "wrist", 2), (2, "discard", 3), (4, "", 4)]
    weak = apply_labels(path, ASSIGNMENTS)
    assert weak.class_counts == {"hand": 5, "wrist": 3}


def test_small_clusters_may_be_labelled(tmp_path):
    labels = write_csv(tmp_path / "labels.csv", [(2, 1, "skull"), (3, 0, "hand")])
    weak = apply_labels(labels, ASSIGNMENTS, k=5)
    assert weak.class_counts == {"skull": 1}  # the empty cluster 3 contributes nothing
    assert weak.cluster_labels == {2: "skull", 3: "hand"}


@pytest.mark.parametrize(("rows", "message"), [
    ([(0, 5, "hand"), (7, 0, "knee")], r"labels.csv, line 3: cluster 7 does not exist \(the clusters are 0..4\)"),
    ([(0, 5, "hand"), ("two", 3, "knee")], r"line 3: cluster 'two' is not a cluster number"),
    ([(0, 5, "hand"), (0, 5, "knee")], r"line 3: cluster 0 is labelled again \(first on line 2\)"),
    ([(0, 5, "lowr leg")], r"line 2: 'lowr leg' is not a region of samx-regions; did you mean 'lower leg'\?"),
    ([(0, 5, "spaghetti")], r"line 2: 'spaghetti' is not a region of samx-regions \(or write 'discard'"),
    ([(0, 5, "lower leg"), (1, 3, "lowerleg")],
     r"line 3: 'lowerleg' looks like 'lower leg' but is not one of its spellings in samx-regions; "
     r"line 2 writes it 'lower leg'; write 'lower leg'"),
    ([(0, 5, "discard"), (1, 3, "DISCARD"), (2, 1, "")],
     r"labels.csv: no image has a label \(8 discarded, 2 unlabelled\)"),
])
def test_bad_label_files(tmp_path, rows, message):
    path = write_csv(tmp_path / "labels.csv", rows)
    with pytest.raises(LabelFileError, match=message):
        apply_labels(path, ASSIGNMENTS, k=5)


def test_bad_file_layouts(tmp_path):
    with pytest.raises(LabelFileError, match="does not exist"):
        apply_labels(tmp_path / "nope.csv", ASSIGNMENTS)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,name\n0,hand\n")
    with pytest.raises(LabelFileError, match="wrong.csv, line 1: expected the columns cluster and label"):
        apply_labels(wrong, ASSIGNMENTS)
    nested = tmp_path / "nested.yaml"
    nested.write_text("0: hand\n1: [knee, hip]\n")
    with pytest.raises(LabelFileError, match="nested.yaml, line 2: the label of cluster 1 must be a single name"):
        apply_labels(nested, ASSIGNMENTS)
    listing = tmp_path / "list.yaml"
    listing.write_text("- hand\n- knee\n")
    with pytest.raises(LabelFileError, match="list.yaml, line 1: expected a mapping"):
        apply_labels(listing, ASSIGNMENTS)


def test_majority_names_pick_the_most_frequent_label_and_report_purity(tmp_path):
    from msk.core.stages.cluster.labelling import majority_names, write_cluster_names

    assignments = [0, 0, 0, 1, 1, 1, 1, 0]
    truth = ["knee", "knee", "hand", "hip", "hip", "hip", "knee", "knee"]
    names = majority_names(assignments, truth, k=3)
    assert [(n.cluster, n.size, n.label) for n in names] == [(0, 4, "knee"), (1, 4, "hip"), (2, 0, "")]
    assert names[0].purity == pytest.approx(0.75) and names[1].purity == pytest.approx(0.75)
    assert names[2].purity == 0.0
    # a tie goes to the label first in sorted order, whatever the order of the images
    assert majority_names([0, 0], ["knee", "hand"])[0].label == "hand"
    assert majority_names([0, 0], ["hand", "knee"])[0].label == "hand"
    # the written file is what `msk clusters apply` reads: the weak labels follow the names
    path = write_cluster_names(names, tmp_path / "labels.csv")
    weak = apply_labels(path, np.array(assignments), region_set="samx-regions", k=3)
    assert weak.labels == ["knee"] * 3 + ["hip"] * 4 + ["knee"]
    with pytest.raises(ValueError, match="known labels"):
        majority_names([0, 1], ["knee"])


# -- naming clusters from a truth file (`msk clusters label`), scoring against it ----------------


def write_run(run, assignments, k):
    """A finished DeepCluster run folder as `msk cluster` leaves it (without checkpoints)."""
    from msk.core.models.deepcluster import DeepClusterConfig

    run.mkdir(parents=True, exist_ok=True)
    np.save(run / "assignments.npy", np.asarray(assignments))
    ids = [f"IMG-{i:02d}" for i in range(len(assignments))]
    with (run / "assignments.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "image_id", "cluster"])
        writer.writerows([i, image_id, c] for i, (image_id, c) in enumerate(zip(ids, assignments)))
    (run / "config.yaml").write_text(DeepClusterConfig(k=k).to_yaml())
    return ids


def write_truth(path, rows, header=("image_id", "label")):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# 12 images in 4 clusters (cluster 3 empty); images 10 and 11 have no known region
RUN_ASSIGNMENTS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 0, 2, 1]
RUN_TRUTH = ["knee", "Knee", "KNEE", "hand", "hip", "hip", "hand", "wrist", "wrist", "hand", None, None]


def test_clusters_are_named_by_the_majority_of_a_partial_truth(tmp_path):
    from sklearn.metrics import normalized_mutual_info_score

    from msk.core.stages.cluster.labelling import name_clusters_from_truth

    ids = write_run(tmp_path / "run", RUN_ASSIGNMENTS, k=4)
    truth = write_truth(tmp_path / "labels.csv", [(i, t) for i, t in zip(ids, RUN_TRUTH) if t])
    named = name_clusters_from_truth(tmp_path / "run", truth)
    assert [(n.cluster, n.label, n.size) for n in named.names] == [
        (0, "knee", 5), (1, "hip", 3), (2, "wrist", 2), (3, "", 0)]
    assert named.names[0].purity == pytest.approx(3 / 5) and named.names[1].purity == pytest.approx(2 / 3)
    # every image of a named cluster gets its name, known or not (images 10, 11)
    assert named.weak.labels == ["knee"] * 4 + ["hip"] * 3 + ["wrist"] * 2 + ["knee", "wrist", "hip"]
    with named.weak_file.open() as f:
        assert [(r["image_id"], r["label"]) for r in csv.DictReader(f)] == list(zip(ids, named.weak.labels))
    with named.names_file.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["named_by"] for r in rows} == {f"automatic:{truth}"} and rows[0]["purity"] == "0.6000"
    known = [t.lower() for t in RUN_TRUTH[:10]]
    assert named.n_known == 10 and named.purity == pytest.approx(7 / 10)
    assert named.nmi == pytest.approx(normalized_mutual_info_score(known, RUN_ASSIGNMENTS[:10]))
    # the names file is a labels file `msk clusters apply` takes as it is
    again = apply_labels(named.names_file, np.array(RUN_ASSIGNMENTS), k=4)
    assert again.labels == named.weak.labels


def test_a_synthetic_ground_truth_is_joined_through_the_ingest_manifest(tmp_path):
    from msk.core.io.manifest import write_manifest_part
    from msk.core.stages.cluster.labelling import name_clusters_from_truth

    ids = write_run(tmp_path / "run", RUN_ASSIGNMENTS, k=4)
    write_manifest_part(tmp_path / "ingest", 0, [
        {"path": f"p{i}/IM1.dcm", "image_id": image_id, "status": "ok"} for i, image_id in enumerate(ids)])
    rows = [(f"export/p{i}/IM1.dcm", t or "", "") for i, t in enumerate(RUN_TRUTH)]
    truth = write_truth(tmp_path / "ground_truth.csv", rows, header=("path", "region", "entity"))
    named = name_clusters_from_truth(tmp_path / "run", truth, ingest=tmp_path / "ingest",
                                     weak_out=tmp_path / "weak.csv")
    assert [n.label for n in named.names] == ["knee", "hip", "wrist", ""] and named.n_known == 10
    assert named.weak_file == tmp_path / "weak.csv" and named.weak_file.is_file()
    # the weak labels record their run, so that `msk train sorter` starts from its encoder
    from msk.core.io.labels import weak_labels_run

    assert weak_labels_run(named.weak_file) == tmp_path / "run"
    assert (tmp_path / "weak.source.json").is_file()


def test_cli_clusters_label_says_it_is_a_simulated_expert(tmp_path, monkeypatch):
    from test_build_recommender import run_msk

    ids = write_run(tmp_path / "run", RUN_ASSIGNMENTS, k=4)
    truth = write_truth(tmp_path / "labels.csv", [(i, t) for i, t in zip(ids, RUN_TRUTH) if t])
    code, stdout, stderr = run_msk(monkeypatch, "clusters", "label", tmp_path / "run", "--from", truth)
    assert code == 0, stderr
    assert stderr.startswith(f"simulated expert: clusters named automatically by the majority label of {truth}")
    assert "3 of 4 clusters named" in stdout and "NMI" in stdout and "purity 0.700" in stdout
    assert (tmp_path / "run" / "weak_labels.csv").is_file() and (tmp_path / "run" / "cluster_names.csv").is_file()


@pytest.mark.parametrize("case", ["unknown regions", "another ingest", "ground truth without ingest"])
def test_cli_clusters_label_bad_truth_is_one_line_and_exit_2(tmp_path, monkeypatch, case):
    from test_build_recommender import run_msk

    ids = write_run(tmp_path / "run", RUN_ASSIGNMENTS, k=4)
    if case == "unknown regions":
        truth = write_truth(tmp_path / "t.csv", [(i, ["knee", "kneee", "elbow", "sholder"][k % 4])
                                                 for k, i in enumerate(ids)])
        expected = (f"error: {truth}: 2 name(s) are not in samx-regions: 'kneee' (line 3, did you mean "
                    "'knee'?); 'sholder' (line 5, did you mean 'shoulder'?); fix them")
    elif case == "another ingest":
        truth = write_truth(tmp_path / "t.csv", [(f"OTHER-{k}", "knee") for k in range(5)])
        expected = (f"error: {truth} labels none of the 12 images of {tmp_path / 'run'} (no image_id in "
                    "common): were the labels made for another ingest?")
    else:
        truth = write_truth(tmp_path / "ground_truth.csv", [("export/a.dcm", "knee")], header=("path", "region"))
        expected = f"error: {truth} is a synthetic ground truth keyed by file path; give the ingest folder"
    code, stdout, stderr = run_msk(monkeypatch, "clusters", "label", tmp_path / "run", "--from", truth)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(expected), stderr
    assert not (tmp_path / "run" / "weak_labels.csv").exists()


def test_cli_clusters_export_shows_the_truth(tmp_path, monkeypatch):
    from test_build_recommender import run_msk
    from test_recommender import write_ingest

    write_ingest(tmp_path / "ingest", n_patients=2, per_patient=2)  # 12 images
    from msk.core.io.dataset import read_shards

    ids = read_shards(tmp_path / "ingest", columns=["image_id"]).column("image_id").to_pylist()
    write_run(tmp_path / "run", RUN_ASSIGNMENTS, k=4)
    with (tmp_path / "run" / "assignments.csv").open("w", newline="") as f:  # the ingest's ids
        csv.writer(f).writerows([("row", "image_id", "cluster"), *((k, i, c) for k, (i, c) in
                                                                   enumerate(zip(ids, RUN_ASSIGNMENTS)))])
    truth = write_truth(tmp_path / "labels.csv", [(i, t) for i, t in zip(ids, RUN_TRUTH) if t])
    code, stdout, stderr = run_msk(monkeypatch, "clusters", "export", tmp_path / "ingest", tmp_path / "run",
                                   "--to", tmp_path / "sheets", "--truth", truth)
    assert code == 0, stderr
    assert "NMI" in stdout and "purity 0.700 over the 10 of 12 images with a known region (k=4)" in stdout
    page = (tmp_path / "sheets" / "index.html").read_text()
    assert "ground truth: knee 60%, hand 40%" in page  # cluster 0: 3 knee, 2 hand


def write_sorter_run(run, predictions, *, classes, weak=(0.5, 0.75)):
    """The files of a finished sorter run that `msk eval sorter` reads."""
    import json

    run.mkdir(parents=True)
    (run / "sorter.json").write_text(json.dumps({
        "classes": classes, "folds": 2, "image_size": 32, "unknown": None,
        "test": {"n": len(predictions), "top1": weak[0], "top2": weak[1]}}))
    (run / "config.yaml").write_text("region_set: samx-regions\n")
    with (run / "predictions_test.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "patient_id", "label", "predicted", "second", "probability", "score",
                         "unknown"])
        writer.writerows([i, f"P{i}", label, first, second, 0.5, 1.0, 0]
                         for i, label, first, second in predictions)


def test_cli_eval_sorter_scores_against_a_truth_next_to_the_weak_labels(tmp_path, monkeypatch):
    import json

    from test_build_recommender import run_msk

    # (image, weak label, best, second); against the truth below: 1 of 4 right on top-1, 3 of 4 on
    # top-2, 2 of 4 weak labels right; Z is not a test image, E has no truth
    write_sorter_run(tmp_path / "sorter", [("A", "knee", "knee", "hip"), ("B", "hip", "hip", "knee"),
                                           ("C", "hand", "wrist", "hand"), ("D", "knee", "knee", "hand"),
                                           ("E", "hand", "hand", "knee")], classes=["hand", "hip", "knee", "wrist"])
    truth = write_truth(tmp_path / "truth.csv", [("A", "hip"), ("B", "hip"), ("C", "Hand"), ("D", "elbow"),
                                                 ("Z", "knee")])
    code, stdout, stderr = run_msk(monkeypatch, "eval", "sorter", tmp_path / "sorter", "--truth", truth, "--json")
    assert code == 0, stderr
    got = json.loads(stdout)
    assert (got["n_test"], got["weak_top1"], got["weak_top2"]) == (5, 0.5, 0.75)
    assert (got["n_known"], got["truth_top1"], got["truth_top2"]) == (4, 0.25, 0.75)
    assert got["weak_agreement"] == 0.5 and got["outside"] == {"elbow": 1}
    assert json.loads((tmp_path / "sorter" / "truth_eval.json").read_text()) == got
    code, stdout, _ = run_msk(monkeypatch, "eval", "sorter", tmp_path / "sorter", "--truth", truth)
    assert code == 0 and "weak labels (trained on)" in stdout and "0.250" in stdout
    other = write_truth(tmp_path / "other.csv", [("Q", "hip")])
    code, stdout, stderr = run_msk(monkeypatch, "eval", "sorter", tmp_path / "sorter", "--truth", other)
    assert code == 2 and stderr.strip().splitlines() == [
        f"error: {other} labels none of the 5 images of {tmp_path / 'sorter' / 'predictions_test.csv'} (no "
        "image_id in common): were the labels made for another ingest? Use the labels file written for that ingest"]


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_cluster_truth_fills_nmi_truth(tmp_path, monkeypatch):
    from msk.core.io.dataset import read_shards

    from test_build_recommender import run_msk
    from test_recommender import write_ingest

    write_ingest(tmp_path / "ingest", n_patients=2, per_patient=2)  # 12 images
    ids = read_shards(tmp_path / "ingest", columns=["image_id"]).column("image_id").to_pylist()
    truth = write_truth(tmp_path / "labels.csv", [(i, "knee" if k % 3 else "hand") for k, i in enumerate(ids[:9])])
    (tmp_path / "dc.yaml").write_text("encoder: tiny-cnn\nk: 3\nepochs: 1\nimage_size: 16\nnum_workers: 0\n"
                                      "batch_size: 4\npca_dim: 8\n")
    code, stdout, stderr = run_msk(monkeypatch, "cluster", tmp_path / "ingest", tmp_path / "run", "--config",
                                   tmp_path / "dc.yaml", "--truth", truth)
    assert code == 0, stderr
    assert "3 of 12 images have no label" in stderr
    with (tmp_path / "run" / "history.csv").open() as f:
        [row] = list(csv.DictReader(f))
    assert 0 <= float(row["nmi_truth"]) <= 1 and 0 < float(row["purity_truth"]) <= 1
