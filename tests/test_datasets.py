"""Labelled datasets through plugins (``msk_datasets``) and ``msk import``, on layouts built from
the shared real data: real-xr (csv, folders, MURA) and BTXRD's metadata and annotations."""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from msk.core.errors import ConfigError, DatasetError, MskError
from msk.core.registry import UnknownComponentError
from msk.core.stages.ingest.importing import ImportConfig, import_dataset, read_records
from msk.plugins.datasets import MURA_REGIONS

UPPER_LIMB = ("elbow", "finger", "forearm", "humerus", "shoulder", "wrist")


def _real_xr_rows(shared_data: Path, n: int | None = None, regions=None, per_region: int | None = None):
    with (shared_data / "real-xr" / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    if regions is not None:
        rows = [r for r in rows if r["region"] in regions]
    if per_region is not None:
        taken: dict[str, list] = defaultdict(list)
        for r in rows:
            if len(taken[r["region"]]) < per_region:
                taken[r["region"]].append(r)
        rows = [r for group in taken.values() for r in group]
    if n is not None:  # every n-th row: all sources and regions, few images
        rows = rows[:: max(1, len(rows) // n)][:n]
    return rows


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _csv_layout(tmp_path: Path, shared_data: Path, rows: list[dict]) -> Path:
    """``tmp/labels.csv`` (a subset of real-xr's) with ``tmp/images`` linked to real-xr's images."""
    src = tmp_path / "real-xr-subset"
    src.mkdir()
    (src / "images").symlink_to(shared_data / "real-xr" / "images")
    _write_csv(src / "labels.csv", rows, list(rows[0]))
    return src


# -- the four layouts, read (no ingest) ---------------------------------------------------------


@pytest.mark.shared_data
def test_csv_reads_real_xr_labels(tmp_path, shared_data):
    rows = _real_xr_rows(shared_data, n=30)
    src = _csv_layout(tmp_path, shared_data, rows)
    records = read_records("csv", src)
    assert [r.path for r in records] == [r["path"] for r in rows]
    assert [r.label for r in records] == [r["region"] for r in rows]
    assert [r.patient for r in records] == [r["group"] for r in rows]
    assert [r.extra for r in records] == [{"finding": r["finding"], "source": r["source"]} for r in rows]
    assert len({r.label for r in records}) >= 5
    assert all((src / r.path).is_file() for r in records)
    assert records[3].where == f"{src / 'labels.csv'}, line 5"


@pytest.mark.shared_data
def test_folders_layout_from_real_xr(tmp_path, shared_data):
    rows = _real_xr_rows(shared_data, regions=UPPER_LIMB, per_region=3)
    truth = {}
    for i, r in enumerate(rows):
        link = tmp_path / r["region"].upper() / f"case{i}_{Path(r['path']).name}"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(shared_data / "real-xr" / r["path"])
        truth[link.relative_to(tmp_path).as_posix()] = r["region"]
    (tmp_path / "README.txt").write_text("top-level files belong to no class\n")
    records = read_records("folders", tmp_path, {"patient_pattern": r"/case(\d+)_"})
    assert {r.path: r.label for r in records} == truth  # ELBOW -> elbow (the entity set's code)
    assert sorted(int(r.patient) for r in records) == list(range(len(rows)))
    mapped = read_records("folders", tmp_path, {"label_map": {"FINGER": "hand"}})
    assert sum(r.label == "hand" for r in mapped) == 3 and all(r.patient is None for r in mapped)


@pytest.mark.shared_data
def test_mura_layout_from_real_xr(tmp_path, shared_data):
    rows = _real_xr_rows(shared_data, regions=UPPER_LIMB, per_region=2)
    folder_of = {region: folder for folder, region in MURA_REGIONS.items()}
    truth = {}
    for i, r in enumerate(rows):
        finding = "positive" if r["finding"] == "fracture" else "negative"
        rel = f"train/{folder_of[r['region']]}/patient{i // 2:05d}/study1_{finding}/image{i % 2 + 1}.png"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).symlink_to(shared_data / "real-xr" / r["path"])
        truth[rel] = (r["region"], f"patient{i // 2:05d}", finding)
    (tmp_path / "train_image_paths.csv").write_text("\n".join(truth) + "\n")
    records = read_records("mura", tmp_path)
    assert {r.path: (r.label, r.patient, r.extra["finding"]) for r in records} == truth
    assert {r.label for r in records} == set(UPPER_LIMB)

    bad = tmp_path / "train" / "XR_ELBOW" / "patient00000" / "image9.png"  # no study folder
    bad.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"image9.png: not in the MURA layout XR_<REGION>"):
        read_records("mura", tmp_path)


def _btxrd_layout(tmp_path: Path, shared_data: Path, n: int = 12) -> tuple[Path, list[dict]]:
    """BTXRD's dataset.csv rows of the ``n`` smallest annotated images, their LabelMe JSONs, and
    placeholder JPEGs of the annotated size (BTXRD's pixels are not available here)."""
    meta = shared_data / "btxrd-meta"
    with (meta / "dataset.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    sizes = {}
    for r in rows:
        ann = json.loads((meta / "annotations" / f"{Path(r['image_id']).stem}.json").read_text())
        sizes[r["image_id"]] = (ann["imageWidth"], ann["imageHeight"])
    rows = sorted(rows, key=lambda r: sizes[r["image_id"]][0] * sizes[r["image_id"]][1])[:n]
    src = tmp_path / "btxrd"
    (src / "images").mkdir(parents=True)
    (src / "annotations").symlink_to(meta / "annotations")
    _write_csv(src / "dataset.csv", rows, columns)
    rng = np.random.default_rng(0)
    for r in rows:
        w, h = sizes[r["image_id"]]
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(src / "images" / r["image_id"])
    return src, rows


@pytest.mark.shared_data
def test_btxrd_layout_from_btxrd_meta(tmp_path, shared_data):
    from msk.core.data.roi import lesion_box, read_labelme
    from msk.plugins.entity_sets import btxrd

    src, rows = _btxrd_layout(tmp_path, shared_data)
    records = read_records("btxrd", src)
    assert [r.path for r in records] == [f"images/{r['image_id']}" for r in rows]
    assert [r.label for r in records] == [next(e for e in btxrd.names if r[e] == "1") for r in rows]
    assert [r.patient for r in records] == [r["image_id"] for r in rows]  # no patient ids in BTXRD
    for record, row in zip(records, rows):
        box = lesion_box(read_labelme(src / "annotations" / f"{Path(row['image_id']).stem}.json"))
        assert tuple(record.extra[c] for c in ("x0", "y0", "x1", "y1")) == box
        assert record.extra["age"] == float(row["age"]) and record.extra["sex"] == row["gender"]
    assert len({r.label for r in records}) >= 3
    grouped = read_records("btxrd", src, {"grouping": "run", "annotations": None})
    assert "x0" not in grouped[0].extra
    assert len({r.patient for r in grouped}) <= len(rows)


# -- errors ------------------------------------------------------------------------------------


def _tiny_csv(tmp_path: Path, body: str) -> Path:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "labels.csv").write_text(body)
    return tmp_path


def test_unknown_label_names_file_and_line(tmp_path):
    src = _tiny_csv(tmp_path, "path,region,group\na.png,elbow,g1\nb.png,elbw,g2\n")
    with pytest.raises(DatasetError) as exc:
        read_records("csv", src)
    assert str(exc.value).startswith(f"{src / 'labels.csv'}, line 3: label 'elbw' is not in entity "
                                     "set 'samx-regions'; did you mean 'elbow'?")
    assert len(read_records("csv", src, {"entity_set": None})) == 2  # any label
    assert [r.label for r in read_records("csv", src, {"extra_labels": ["elbw"]})] == ["elbow", "elbw"]


def test_missing_column_names_the_option(tmp_path):
    src = _tiny_csv(tmp_path, "path,region,group\na.png,elbow,g1\n")
    with pytest.raises(DatasetError, match=r"labels.csv, line 1: no column 'diagnosis' \(option "
                                           r"label_column\); columns: path, region, group"):
        read_records("csv", src, {"label_column": "diagnosis"})
    with pytest.raises(DatasetError, match=r"no column 'finding' \(option extra_columns\)"):
        read_records("csv", src, {"extra_columns": ["finding"]})
    with pytest.raises(DatasetError, match=r"nothere.csv: no such file \(option file\)"):
        read_records("csv", src, {"file": "nothere.csv"})


def test_bad_paths_options_and_names(tmp_path):
    src = _tiny_csv(tmp_path, "path,region,group\n../a.png,elbow,g1\n")
    with pytest.raises(DatasetError, match=r"line 2: path '../a.png' must be a file path relative to SRC"):
        read_records("csv", src)
    (src / "labels.csv").write_text("path,region,group\na.png,elbow,g1\n./a.png,knee,g1\n")
    with pytest.raises(DatasetError, match=r"line 3: a.png is labelled twice \(first at .*line 2\)"):
        read_records("csv", src)
    with pytest.raises(ConfigError, match=r"invalid options of dataset 'csv': label_colum: Extra inputs"):
        read_records("csv", src, {"label_colum": "region"})
    with pytest.raises(ConfigError, match=r"patient_pattern: Value error, not a regular expression"):
        read_records("folders", src, {"patient_pattern": "("})
    with pytest.raises(UnknownComponentError, match="no dataset named 'kaggle'"):
        read_records("kaggle", src)


def test_ingest_paths_must_stay_inside_src(tmp_path, pseudonym_key):
    from msk.core.stages.ingest.pipeline import ingest

    (tmp_path / "src").mkdir()
    with pytest.raises(MskError, match="relative POSIX paths inside the source folder; got '../x.png'"):
        ingest(tmp_path / "src", tmp_path / "out", paths=["a.png", "../x.png"], progress=False)


# -- msk import, end to end --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.shared_data
def test_import_csv_real_xr_then_sorter_gets_group_aware_patients(tmp_path, shared_data, ray_session,
                                                                  pseudonym_key):
    from msk.core.cli import app
    from msk.core.data.labelled import load_labelled
    from msk.core.io.pseudonym import Pseudonymiser

    rows = _real_xr_rows(shared_data, n=40)
    for i, r in enumerate(rows):  # pairs of images share a group, as a patient's views would
        r["group"] = f"patient-{i // 2}"
    rows.append({**rows[0], "path": "images/roboflow-fracture/not-there.png", "group": "patient-x"})
    src = _csv_layout(tmp_path, shared_data, rows)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["import", "csv", str(src), str(out), "--image-size", "64",
                                 "-o", "extra_columns=[finding]"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "41 labelled files: 40 in the labels file, 1 quarantined by the ingest and left out " \
           "(read_error: 1 (e.g. images/roboflow-fracture/not-there.png))" in result.output

    with (out / "labels.csv").open(newline="") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == ["image_id", "label", "patient_id", "finding"]
    pseudonymiser = Pseudonymiser(pseudonym_key)
    assert [w["label"] for w in written] == [r["region"] for r in rows[:40]]
    assert [w["patient_id"] for w in written] == [pseudonymiser.pseudonym(r["group"], "patient")
                                                  for r in rows[:40]]
    assert not any(r["group"] in (out / "labels.csv").read_text() for r in rows)  # never raw

    first = (out / "labels.csv").read_bytes()
    again = runner.invoke(app, ["import", "csv", str(src), str(out), "--image-size", "64",
                                "-o", "extra_columns=[finding]"], env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    assert "41 already done" in again.output and (out / "labels.csv").read_bytes() == first

    data = load_labelled(out, out / "labels.csv")  # PNG/JPEG shards have no patient id
    by_image = {w["image_id"]: w["patient_id"] for w in written}
    assert data.patient_ids == [by_image[i] for i in data.image_ids]
    assert len(set(data.patient_ids)) == 20 and data.notes == []


@pytest.mark.slow
@pytest.mark.shared_data
def test_import_btxrd_feeds_recommender_and_fusion_readers(tmp_path, shared_data, ray_session,
                                                           pseudonym_key):
    from msk.core.stages.fusion.config import FusionConfig
    from msk.core.stages.fusion.data import load_fusion_data
    from msk.core.stages.recommender.data import load_eval_data, read_labels

    src, rows = _btxrd_layout(tmp_path, shared_data)
    report = import_dataset("btxrd", src, tmp_path / "out",
                            ImportConfig(ingest={"image_size": 64}), progress=False)
    assert report.n_labelled == len(rows) == report.ingest.n_ok and report.quarantined == {}
    labels = read_labels(report.labels)
    assert {"entity", "x0", "y0", "x1", "y1", "age", "sex", "sites", "view"} <= set(labels.columns)
    data = load_eval_data(tmp_path / "out", labels, image_size=32, roi=True, entity_set="btxrd")
    assert data.images.shape == (len(rows), 32, 32) and all(p.startswith("PAT-") for p in data.patient_ids)
    fusion = load_fusion_data(tmp_path / "out", report.labels, FusionConfig(entity_set="btxrd", roi_size=32))
    assert len(fusion.meta) == len(rows) and fusion.meta["patient_group"].str.startswith("PAT-").all()
    assert sorted(fusion.meta["entity"]) == sorted(labels["entity"])
    summary = json.loads((tmp_path / "out" / "import.json").read_text())
    assert summary["dataset"] == "btxrd" and summary["n_labelled"] == len(rows)
    assert os.environ["MSK_PSEUDONYM_KEY"] not in (tmp_path / "out" / "labels.csv").read_text()

    os.environ["MSK_PSEUDONYM_KEY"] = "another-key-0123456789abcdef"  # pseudonym_key restores it
    with pytest.raises(DatasetError, match="was ingested with another pseudonymisation key"):
        import_dataset("btxrd", src, tmp_path / "out", progress=False)


def test_the_documented_dataset_plugin_works(tmp_path):
    """The ~20-line plugin of docs/plugins.md registers, lists and reads its layout."""
    import re
    import types

    from msk.core.cli import app
    from msk.core.registry import get_registry

    docs = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    section = docs.split("### msk_datasets\n", 1)[1].split("\n### ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 35
    plugin = types.ModuleType("sidecar_plugin")
    exec(compile(code, "docs/plugins.md", "exec"), plugin.__dict__)
    registry = get_registry()
    registry.register(plugin, name="sidecar-plugin")
    try:
        options = registry.get("dataset", "sidecar").example_layout(tmp_path)
        records = read_records("sidecar", tmp_path, options)
        assert [(r.path, r.label, r.patient) for r in records] == [("p1/a.png", "knee", "p1"),
                                                                   ("p2/a.png", "hip", "p2")]
        (tmp_path / "p2" / "a.txt").write_text("hips")
        with pytest.raises(DatasetError, match=r"p2/a.txt: label 'hips' is not in entity set"):
            read_records("sidecar", tmp_path, options)
        listing = CliRunner().invoke(app, ["plugins", "dataset"], env={"COLUMNS": "200"}).output
        assert "sidecar" in listing and "suffix" in listing
    finally:
        registry.unregister("sidecar-plugin")


def test_cli_options_come_from_yaml_and_the_command_line_wins(tmp_path, pseudonym_key):
    from msk.core.cli import app

    src = _tiny_csv(tmp_path, "path,region,group\na.png,elbow,g1\n")
    config = tmp_path / "import.yaml"
    config.write_text("options:\n  label_column: diagnosis\ningest:\n  image_size: 64\n")
    runner = CliRunner()
    result = runner.invoke(app, ["import", "csv", str(src), str(tmp_path / "out"), "--config", str(config)])
    assert isinstance(result.exception, DatasetError) and "no column 'diagnosis'" in str(result.exception)
    config.write_text("options:\n  label_column: region\n")
    result = runner.invoke(app, ["import", "csv", str(src), str(tmp_path / "out"), "--config", str(config),
                                 "--option", "label_column=finding"])
    assert isinstance(result.exception, DatasetError) and "no column 'finding'" in str(result.exception)
    result = runner.invoke(app, ["import", "csv", str(src), str(tmp_path / "out"), "--option", "label_column"])
    assert isinstance(result.exception, ConfigError) and "expected KEY=VALUE" in str(result.exception)
    assert not (tmp_path / "out").exists()  # nothing is ingested before the layout reads cleanly
