"""Exporting clusters for labelling and applying the filled-in labels file."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from msk.core.labelling import LabelFileError, apply_labels, export_clusters, read_label_file

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
    from msk.core.labelling import majority_names, write_cluster_names

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
