"""``msk build recommender``: labels (a labels CSV or a synthetic ground truth) and lesion boxes or
masks -> a saved recommender that compares what it was built on; bad input is one line, exit 2."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from msk.core.io.checkpoint import save_checkpoint
from msk.core.io.dataset import read_shards
from msk.core.io.masks import write_mask_png
from msk.core.io.truth import TruthError
from msk.core.models.embed import Embedder
from msk.core.models.recommender import Recommender
from msk.core.registry import build_encoder
from msk.core.stages.recommender.build import RecommenderBuildConfig, RecommenderBuildError, build_recommender

from test_recommender import write_ingest  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLAT = RecommenderBuildConfig(retriever="flat")


def run_msk(monkeypatch, *args) -> tuple[int, str, str]:
    """``msk ARGS`` in this process through the CLI's entry point (an MskError is one line on
    stderr and exit code 2); returns ``(exit code, stdout, stderr)``."""
    from click.testing import CliRunner

    from msk.core import cli
    from msk.core.runtime import shutdown

    monkeypatch.setattr(shutdown, "install", lambda: None)  # no signal handlers in pytest
    monkeypatch.setattr(shutdown, "stop_ray", lambda **kw: None)  # the session's Ray stays up
    monkeypatch.setattr(sys, "argv", ["msk", *map(str, args)])
    with CliRunner().isolation(env={"COLUMNS": "200"}) as (stdout, stderr, _):
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        return code, stdout.getvalue().decode(), stderr.getvalue().decode()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """``(ingest folder, labels DataFrame with boxes, encoder checkpoint)``: 24 images of 12
    patients, 3 entities, a lesion box each (source = shard pixels, 48 px)."""
    root = tmp_path_factory.mktemp("archive")
    labels = write_ingest(root / "ingest", n_patients=4, per_patient=2)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root / "encoder.pt", build_encoder("tiny-cnn", in_chans=2),
                                 arch="tiny-cnn", in_chans=2, config={"image_size": 16, "sobel": True}, epoch=1)
    return root / "ingest", labels, checkpoint


def shard_rows(ingest, ids):
    import pyarrow.compute as pc

    return read_shards(ingest, filter=pc.field("image_id").isin(pa.array(list(ids), pa.string())))


def test_lesion_boxes_give_a_recommender_of_lesion_crops(archive, tmp_path):
    ingest, labels, checkpoint = archive
    labels = labels.rename(columns={"entity": "label"})  # the `msk import` column name
    labels.iloc[:20].to_csv(tmp_path / "labels.csv", index=False)
    report = build_recommender(ingest, tmp_path / "labels.csv", tmp_path / "rec", checkpoint, FLAT)
    assert report.input == "lesion_crop" and report.n_images == 20 and report.n_patients == 10
    rec = Recommender.load(tmp_path / "rec")
    assert rec.encoder["roi_margin"] == 0.15 and rec.encoder["checkpoint"] == str(checkpoint)
    assert rec.entities == labels.iloc[:20]["label"].value_counts().to_dict() == report.by_entity
    # an indexed image's own crop, embedded independently, finds itself first
    embedder = Embedder(checkpoint, rois={r.image_id: (r.x0, r.y0, r.x1, r.y1) for r in labels.itertuples()})
    rows = shard_rows(ingest, labels["image_id"].iloc[[0, 7]])
    queries = embedder(rows)
    for image_id, proposal in zip(queries.column("image_id").to_pylist(),
                                  rec.recommend(np.stack(queries.column("embedding").to_pylist()))):
        assert proposal.neighbours[0].image_id == image_id and proposal.neighbours[0].distance < 1e-4
    # whole images of the same files are other vectors: the index holds crops
    whole = Embedder(checkpoint).embed_images(np.stack([np.frombuffer(b, np.uint8).reshape(48, 48)
                                                        for b in rows.column("image").to_pylist()]))
    assert rec.recommend(whole)[0].neighbours[0].distance > 1e-3
    saved = json.loads((tmp_path / "rec" / "build.json").read_text())
    assert saved["input"] == "lesion_crop" and saved["n_images"] == 20 and saved["labels"] == "../labels.csv"


def test_without_boxes_whole_images_are_indexed(archive, tmp_path):
    ingest, labels, checkpoint = archive
    labels[["image_id", "entity"]].to_csv(tmp_path / "labels.csv", index=False)
    report = build_recommender(ingest, tmp_path / "labels.csv", tmp_path / "rec", checkpoint)
    rec = Recommender.load(tmp_path / "rec")
    assert report.input == "whole_image" and rec.encoder["roi_margin"] is None and len(rec) == 24
    labels.to_csv(tmp_path / "boxed.csv", index=False)  # whole_images ignores the boxes
    whole = build_recommender(ingest, tmp_path / "boxed.csv", tmp_path / "rec2", checkpoint,
                              RecommenderBuildConfig(whole_images=True))
    assert whole.input == "whole_image"


def test_masks_give_the_boxes_of_their_extent(archive, tmp_path):
    ingest, labels, checkpoint = archive
    labels[["image_id", "entity"]].to_csv(tmp_path / "labels.csv", index=False)
    boxed = labels.iloc[:12]
    with (tmp_path / "masks.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "mask_path"])
        for r in boxed.itertuples():
            mask = np.zeros((48, 48), bool)
            mask[r.y0 + 2:r.y1 - 3, r.x0 + 1:r.x1] = True  # the mask's extent, not the drawn box
            write_mask_png(tmp_path / "masks" / f"{r.image_id}.png", mask)
            writer.writerow([r.image_id, f"masks/{r.image_id}.png"])
    extent = boxed.assign(y0=boxed.y0 + 2, y1=boxed.y1 - 3, x0=boxed.x0 + 1)
    extent[["image_id", "x0", "y0", "x1", "y1"]].to_csv(tmp_path / "boxes.csv", index=False)
    by_mask = build_recommender(ingest, tmp_path / "labels.csv", tmp_path / "m", checkpoint, FLAT,
                                masks=tmp_path / "masks.csv")
    by_box = build_recommender(ingest, tmp_path / "labels.csv", tmp_path / "b", checkpoint, FLAT,
                               boxes=tmp_path / "boxes.csv")
    assert by_mask.n_images == by_box.n_images == 12 and by_mask.input == "lesion_crop"
    assert by_mask.left_out == {"labelled images without a lesion box": 12}
    queries = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    a = Recommender.load(tmp_path / "m").recommend(queries, k=5)
    b = Recommender.load(tmp_path / "b").recommend(queries, k=5)
    assert [[(n.image_id, round(n.distance, 5)) for n in p.neighbours] for p in a] == \
        [[(n.image_id, round(n.distance, 5)) for n in p.neighbours] for p in b]
    with pytest.raises(RecommenderBuildError, match="not both"):
        build_recommender(ingest, tmp_path / "labels.csv", tmp_path / "x", checkpoint,
                          boxes=tmp_path / "boxes.csv", masks=tmp_path / "masks.csv")


def write_ground_truth(path, labels):
    """A synthetic export's ground_truth.csv for the archive (paths of its manifest under
    export/), lesions on every other patient's images."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "patient_id", "region", "entity", "x0", "y0", "x1", "y1", "mask"])
        for r in labels.itertuples():
            p, j = int(r.image_id[4:7]), int(r.image_id[-1])
            lesion = p % 2 == 0
            writer.writerow([f"export/{p}/{j}.dcm", f"MRN{p}", "knee", r.entity if lesion else "",
                             *((r.x0, r.y0, r.x1, r.y1) if lesion else ("",) * 4), ""])
    return path


def test_a_synthetic_ground_truth_needs_no_join(archive, tmp_path):
    ingest, labels, checkpoint = archive
    truth = write_ground_truth(tmp_path / "ground_truth.csv", labels)
    report = build_recommender(ingest, truth, tmp_path / "rec", checkpoint)
    lesions = labels[[int(i[4:7]) % 2 == 0 for i in labels["image_id"]]]
    assert report.n_images == len(lesions) == 12 and report.input == "lesion_crop"
    assert report.by_entity == lesions["entity"].value_counts().to_dict()
    records = Recommender.load(tmp_path / "rec").records
    assert set(records.column("image_id").to_pylist()) == set(lesions["image_id"])
    # the export's raw patient ids (MRN...) never reach the index: the shards' pseudonyms do
    assert {p[:4] for p in records.column("patient_id").to_pylist()} == {"PAT-"}


def test_entity_names_are_checked_against_a_set(archive, tmp_path):
    ingest, labels, checkpoint = archive
    labels.assign(entity=["osteosarcoma", "Chondrosarcom", "lipoma"] * 8).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(TruthError, match=r"2 name\(s\) are not in bone-tumours: 'Chondrosarcom' \(line 3, "
                                         r"did you mean 'chondrosarcoma'\?\); 'lipoma' \(line 4"):
        build_recommender(ingest, tmp_path / "l.csv", tmp_path / "rec", checkpoint,
                          RecommenderBuildConfig(entity_set="bone-tumours"))


def test_cli_builds_and_says_what_it_indexed(archive, tmp_path, monkeypatch):
    ingest, labels, checkpoint = archive
    labels.to_csv(tmp_path / "labels.csv", index=False)
    code, stdout, stderr = run_msk(monkeypatch, "build", "recommender", ingest, tmp_path / "labels.csv",
                                   tmp_path / "rec", "--encoder", checkpoint, "--k", "5")
    assert code == 0, stderr
    assert "indexed 24 images of 12 patients as lesion crops" in stdout
    counts = labels["entity"].value_counts()
    assert f"per entity: {', '.join(f'{k} {v}' for k, v in counts.items())}" in stdout
    assert f"recommender: {tmp_path / 'rec'}" in stdout and Recommender.load(tmp_path / "rec").k == 5


@pytest.mark.parametrize("case", ["another ingest", "missing encoder", "even k"])
def test_cli_bad_input_is_one_line_and_exit_2(archive, tmp_path, monkeypatch, case):
    ingest, labels, checkpoint = archive
    labels.to_csv(tmp_path / "labels.csv", index=False)
    args = [ingest, tmp_path / "labels.csv", tmp_path / "rec", "--encoder", checkpoint]
    expected = None
    if case == "another ingest":
        labels.assign(image_id=[f"OTHER-{i}" for i in range(len(labels))]).to_csv(tmp_path / "other.csv", index=False)
        args[1] = tmp_path / "other.csv"
        expected = (f"error: {tmp_path / 'other.csv'} labels none of the 24 images of {ingest} (no image_id "
                    "in common): were the labels made for another ingest?")
    elif case == "missing encoder":
        args[4] = tmp_path / "nope.pt"
        expected = f"error: encoder checkpoint {tmp_path / 'nope.pt'} does not exist; pass a DeepCluster checkpoint"
    else:
        args += ["--k", "4"]
        expected = "error: "
    code, stdout, stderr = run_msk(monkeypatch, "build", "recommender", *args)
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), stderr
    assert "Traceback" not in stderr
    if case == "even k":
        assert "odd k" in lines[0]
    assert not (tmp_path / "rec").exists()  # nothing left behind
