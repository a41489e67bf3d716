"""Lesion segmentation: data from masks tables and synthetic ground truth, training on the shared
loop (CV by patient, resume), evaluation by IoU/Dice with an overlay sheet. Tiny data (32 px)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from msk.core.data.squaring import square_image
from msk.core.io.manifest import write_manifest_part
from msk.core.io.masks import write_mask_png
from msk.core.models.metrics import overlap_scores
from msk.core.models.segmenter import SegmentationError
from msk.core.stages.ingest.pipeline import SHARD_SCHEMA
from msk.core.stages.segmentation.training import SegmenterConfig, load_segmentation_data, train_segmenter

TINY = {"encoder_depth": 3, "decoder_channels": [16, 8, 4]}
SOURCE = (40, 28)  # source images are portrait: the ingest pads them into 32 px squares


def fake_ingest(root, n_patients: int = 8, per_patient: int = 2, seed: int = 0):
    """An ingest output (shards + manifest) of bright elliptic lesions on a dark background, a
    masks table and a synth-style folder (ground_truth.csv with a mask column) for the same images."""
    rng = np.random.default_rng(seed)
    ingest, synth = root / "ingest", root / "synth"
    (ingest / "shards").mkdir(parents=True)
    (synth / "masks").mkdir(parents=True)
    shard, manifest, table, truth = [], [], [], []
    yy, xx = np.mgrid[:SOURCE[0], :SOURCE[1]]
    for i in range(n_patients * per_patient):
        cy, cx = rng.uniform(10, 30), rng.uniform(8, 20)
        ry, rx = rng.uniform(4, 8), rng.uniform(3, 6)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        source = np.where(mask, 0.9, 0.15).astype(np.float32) + rng.normal(0, 0.03, SOURCE).astype(np.float32)
        image_id, rel = f"ID{i:03d}", f"P{i // per_patient}/IM{i:03d}.dcm"
        entity = "osteosarcoma" if (i // per_patient) % 2 else "enchondroma"
        write_mask_png(synth / "masks" / f"{image_id}.png", mask)
        shard.append({"image_id": image_id, "image": square_image(np.clip(source, 0, 1), 32).tobytes(),
                      "height": 32, "width": 32, "source_height": SOURCE[0], "source_width": SOURCE[1],
                      "patient_id": f"pat{i // per_patient}"})
        manifest.append({"path": rel, "image_id": image_id, "status": "ok", "shard": "shards/part-000000-000.parquet"})
        table.append({"image_id": image_id, "mask_path": f"synth/masks/{image_id}.png", "label": entity})
        truth.append({"path": f"export/{rel}", "patient_id": f"{i // per_patient:04d}", "entity": entity,
                      "mask": f"masks/{image_id}.png"})
    truth.append({"path": "export/normal.dcm", "patient_id": "9999", "entity": None, "mask": None})
    manifest.append({"path": "normal.dcm", "image_id": "IDN", "status": "ok",
                     "shard": "shards/part-000000-000.parquet"})
    shard.append({"image_id": "IDN", "image": bytes(32 * 32), "height": 32, "width": 32, "source_height": 32,
                  "source_width": 32, "patient_id": "patN"})
    rows = [{k: r.get(k) for k in SHARD_SCHEMA.names} for r in shard]
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), ingest / "shards" / "part-000000-000.parquet")
    write_manifest_part(ingest, 0, manifest)
    pd.DataFrame(truth).to_csv(synth / "ground_truth.csv", index=False)
    pd.DataFrame(table).to_csv(root / "masks.csv", index=False)
    return ingest, root / "masks.csv", synth


def small(**kw) -> SegmenterConfig:
    base = dict(encoder="tu-resnet10t", segmenter_options=TINY, image_size=32, epochs=2, batch_size=8,
                folds=2, test_size=0.25, num_workers=0, augment=False, lr=3e-3)
    return SegmenterConfig(**{**base, **kw})


def test_overlap_scores():
    a = np.zeros((3, 4, 4), bool)
    b = np.zeros((3, 4, 4), bool)
    a[0, :2], b[0, 1:3] = True, True  # 8 and 8 pixels, 4 shared
    a[1, 0, 0] = True  # prediction without truth
    iou, dice = overlap_scores(a, b)
    assert np.allclose(iou, [4 / 12, 0, 1]) and np.allclose(dice, [0.5, 0, 1])


def test_masks_table_and_synthetic_truth_give_the_same_data(tmp_path):
    ingest, table, synth = fake_ingest(tmp_path)
    a, b = load_segmentation_data(ingest, table), load_segmentation_data(ingest, synth)
    assert a.image_ids == b.image_ids and len(a) == 16 and "IDN" not in a.image_ids  # normals have no mask
    assert np.array_equal(a.masks, b.masks) and a.labels == b.labels
    assert set(a.labels) == {"osteosarcoma", "enchondroma"} and a.patient_ids[0] == "pat0"
    # the mask lands where the ingest put the lesion: bright pixels and mask agree
    bright = a.images > 128
    assert (bright & a.masks).sum() / (bright | a.masks).sum() > 0.8


def test_bad_masks_are_one_line_errors(tmp_path):
    ingest, table, _ = fake_ingest(tmp_path)
    write_mask_png(tmp_path / "synth" / "masks" / "ID003.png", np.zeros((10, 10), bool))
    with pytest.raises(SegmentationError, match=r"ID003\.png: mask is 10x10 .* its image is 28x40.*line 5"):
        load_segmentation_data(ingest, table)
    (tmp_path / "other.csv").write_text("image_id,mask_path\nNOPE,synth/masks/ID000.png\n")
    with pytest.raises(SegmentationError, match=r"other\.csv, line 2: image NOPE is not in the ingest"):
        load_segmentation_data(ingest, tmp_path / "other.csv")


def test_config_is_checked():
    with pytest.raises(ValueError, match="multiple of 32"):
        SegmenterConfig(image_size=48)
    with pytest.raises(ValueError, match="init must be 'random'"):
        SegmenterConfig(init="some.pt")
    assert small().train_config().encoder == "unet:tu-resnet10t"


def test_default_segmenter_is_a_resnet34_unet():
    from msk.core.models.segmenter import SegmentationModel

    model = SegmentationModel("unet", SegmenterConfig().encoder)
    assert model.encoder_name == "unet:resnet34" and type(model.encoder.net).__name__ == "Unet"
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_a_segmenter_learns_the_lesions(tmp_path, one_torch_thread):
    import functools

    from msk.core.models.segmenter import MaskPairs, predict_probabilities, segmentation_model
    from msk.core.models.train import fit
    from msk.core.stages.segmentation.training import DiceBCELoss, dice_hits

    ingest, table, _ = fake_ingest(tmp_path, n_patients=12)
    data = load_segmentation_data(ingest, table)
    train, test = np.arange(0, 20), np.arange(20, 24)
    config = small(epochs=12, augment=True, aug_prob=0.5).train_config()
    result = fit(functools.partial(segmentation_model, "unet", "tu-resnet10t", TINY), data.images[train],
                 data.masks[train].astype(np.uint8), 1, config, out=tmp_path / "run",
                 val=(data.images[test], data.masks[test].astype(np.uint8)), dataset=MaskPairs,
                 loss=DiceBCELoss(), hits=dice_hits)
    history = result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    dice = overlap_scores(predict_probabilities([result.model], data.images[test]) >= 0.5, data.masks[test])[1]
    assert dice.mean() > 0.6, dice  # an untrained network scores ~0.1 on these images
    assert history[result.best_epoch - 1]["val_loss"] == min(h["val_loss"] for h in history)  # best.pt
    assert 0 <= history[-1]["val_accuracy"] <= 1  # the validation Dice


def test_train_resume_and_evaluate(tmp_path, one_torch_thread):
    from msk.core.stages.segmentation.evaluation import evaluate_segmenter

    ingest, table, synth = fake_ingest(tmp_path)
    data = load_segmentation_data(ingest, table)
    out = tmp_path / "run"
    result = train_segmenter(data, small(), out=out)
    assert len(result.folds) == 2 and result.n_test == 4  # 2 of 8 patients, 2 images each
    with (out / "splits.csv").open() as f:
        splits = list(csv.DictReader(f))
    test_patients = {r["patient_id"] for r in splits if r["part"] == "test"}
    assert test_patients and not test_patients & {r["patient_id"] for r in splits if r["part"] == "dev"}
    for k in (1, 2):
        assert (out / f"fold-{k}" / "best.pt").is_file() and (out / f"fold-{k}" / "history.csv").is_file()
    again = train_segmenter(data, small(), out=out)  # finished folds are skipped
    assert all(f.skipped for f in again.folds)
    with pytest.raises(SegmentationError, match="other options .*encoder"):
        train_segmenter(data, small(encoder="tu-resnet14t"), out=out)

    report = evaluate_segmenter(out, ingest, synth, tmp_path / "eval", sheet_images=4)
    assert report.n_images == 4 and report.n_external == 0  # the test set only
    scores = pd.read_csv(tmp_path / "eval" / "scores.csv")
    assert set(scores["part"]) == {"test"} and abs(scores["iou"].mean() - report.iou) < 1e-3
    assert set(report.by_label) <= {"osteosarcoma", "enchondroma"} and 0 <= report.dice <= 1
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["iou"] == report.iou and report.sheet.stat().st_size > 0
    page = report.page.read_text()
    assert "overlays.png" in page and "overall" in page
    from PIL import Image
    with Image.open(report.sheet) as sheet:
        assert sheet.size[1] >= 4 * 160  # a row per shown image


@pytest.mark.slow
def test_fold_training_runs_on_ray_train(tmp_path, ray_session):
    from msk.core.stages.segmentation.training import _train_fold

    ingest, table, _ = fake_ingest(tmp_path)
    data = load_segmentation_data(ingest, table)
    fold = _train_fold(1, data, np.arange(0, 12), np.arange(12, 16), small(epochs=1, num_workers=1),
                       tmp_path / "run")
    assert fold.best_epoch == 1 and 0 <= fold.val_dice <= 1
    assert (tmp_path / "run" / "fold-1" / "best.pt").is_file()
    assert list((tmp_path / "run" / "fold-1" / "workers").glob("rank-0.json"))  # ran on a Ray Train worker


def test_predicted_rois_crop_the_largest_lesion_and_refuse_no_lesion():
    from msk.core.data.roi import roi_box
    from msk.core.models.segmenter import NoLesionFound, SegmenterEnsemble, lesion_mask, predicted_rois

    probs = np.zeros((2, 64, 64), np.float32)
    probs[0, 20:30, 30:44] = 0.9  # the lesion
    probs[0, 2, 2] = 0.8  # a stray speck: not part of the ROI
    probs[1] = 0.3  # nothing reaches 0.5

    class Fixed(SegmenterEnsemble):
        def probabilities(self, images):
            return probs[:len(images)]

    images = np.zeros((2, 64, 64), np.uint8)
    images[0, 20:30, 30:44] = 200
    mask = lesion_mask(probs[0], 0.5)
    assert mask.sum() == 10 * 14 and not mask[2, 2]
    crops, boxes, masks = predicted_rois(Fixed([], 0.5, {}), images[:1], size=32)
    assert boxes[0] == roi_box(mask) and crops.shape == (1, 32, 32)
    x0, y0, x1, y1 = boxes[0]
    assert x1 - x0 == y1 - y0 == 19 and x0 <= 30 and x1 >= 44  # ceil(14 px * (1 + 2 * 0.15)), square
    assert crops.dtype == np.uint8 and crops[0].max() > 180 and masks[0].sum() == 140
    with pytest.raises(NoLesionFound, match=r"scan-2: no lesion found: no pixel reaches the segmenter's "
                                            r"threshold 0\.5 \(highest lesion probability 0\.3\)") as err:
        predicted_rois(Fixed([], 0.5, {}), images, ids=["scan-1", "scan-2"])
    assert err.value.threshold == 0.5


def test_lesions_too_small_for_the_ingest_size_are_left_out_with_a_note(tmp_path):
    ingest, table, synth = fake_ingest(tmp_path)
    speck = np.zeros(SOURCE, bool)
    speck[3, 3] = True  # a quarter of a pixel at 32 px
    write_mask_png(synth / "masks" / "ID005.png", speck)
    data = load_segmentation_data(ingest, table)
    assert len(data) == 15 and "ID005" not in data.image_ids and len(data.labels) == len(data.patient_ids) == 15
    assert "1 masked image(s) whose lesion covers less than half a pixel at 32 px were left out (e.g. ID005)" \
        in data.notes


def test_cli_train_and_eval(tmp_path, one_torch_thread):
    import yaml
    from typer.testing import CliRunner

    from msk.core.cli import app

    ingest, table, _ = fake_ingest(tmp_path)
    config = tmp_path / "seg.yaml"
    config.write_text(yaml.safe_dump({**small(epochs=1).model_dump(mode="json")}))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "segmenter", str(ingest), str(table), str(tmp_path / "run"),
                                 "-c", str(config), "--segmenter", "unetplusplus"])
    assert result.exit_code == 0, result.output
    assert "2 folds trained on 12 images (4 held out as the test set)" in result.output
    assert yaml.safe_load((tmp_path / "run" / "segmenter.yaml").read_text())["segmenter"] == "unetplusplus"
    result = runner.invoke(app, ["eval", "segmenter", str(tmp_path / "run"), str(ingest), str(table),
                                 str(tmp_path / "eval"), "--sheet-images", "2"])
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and (tmp_path / "eval" / "overlays.html").is_file()
