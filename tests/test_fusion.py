"""Fusion models trained end to end, and the cross-validated comparison of msk.core.stages.fusion.training.

The toy task: the entity is (bar orientation in the image) x (sex in the metadata), so each
branch alone knows half of the label and only a fused model can know all of it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from msk.core.data.metadata import MetadataEncoder, MetadataSchema
from msk.core.data.splits import patient_split
from msk.core.data.squaring import map_box_to_square, square_image
from msk.core.errors import ConfigError
from msk.core.io.checkpoint import CheckpointError, save_checkpoint
from msk.core.io.clinical import MetadataError
from msk.core.io.manifest import write_manifest_part
from msk.core.models.baselines import XgbConfig
from msk.core.models.fusion import FusionClassifier, build_fusion_model
from msk.core.models.train import TrainConfig, load_model, predict_logits
from msk.core.registry import build_encoder
from msk.core.stages.fusion.config import FusionConfig, TransformerConfig
from msk.core.stages.fusion.data import load_fusion_data, read_synth_truth
from msk.core.stages.fusion.training import _plan, evaluate_fusion, fit_fusion
from msk.core.stages.ingest.pipeline import SHARD_SCHEMA

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENTITIES = ["horizontal-F", "horizontal-M", "vertical-F", "vertical-M"]


def lesions(n: int, seed: int = 0, size: int = 32, per_patient: int = 2):
    """``n`` images and their canonical metadata; entity = orientation x sex."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(n, size, size)).astype(np.uint8)
    label = np.arange(n) % 4
    for img, y in zip(images, label):
        o = rng.integers(4, size - 8)
        if y < 2:
            img[o:o + 4, 2:-2] = 220
        else:
            img[2:-2, o:o + 4] = 220
    meta = pd.DataFrame({
        "image_id": [f"IMG{seed}-{i:04d}" for i in range(n)],
        "patient_group": [f"P{seed}-{i // per_patient:04d}" for i in range(n)],
        "age": rng.integers(5, 80, n).astype(float),
        "sex": np.where(label % 2 == 1, "M", "F"),
        "site": rng.choice(["femur", "tibia"], n),
        "view": rng.choice(["frontal", "lateral"], n),
        "entity": [ENTITIES[y] for y in label],
    })
    return images, meta


def small(**kw) -> TrainConfig:
    return TrainConfig(**{"encoder": "tiny-cnn", "image_size": 32, "epochs": 1, "batch_size": 16,
                          "lr": 5e-3, "augment": False, **kw})


def quick_config(**kw) -> FusionConfig:
    return FusionConfig(**{"train": small(), "folds": 3, "heads": ["concat", "film"], "roi": False,
                           "xgboost": XgbConfig(n_estimators=10, early_stopping_rounds=5),
                           "explain_samples": 4, "gradcam_images": 3, **kw})


# -- models -------------------------------------------------------------------------------------


def test_fused_model_learns_what_neither_branch_can_alone(tmp_path):
    x, meta = lesions(160)
    vx, vmeta = lesions(80, seed=1)
    y = meta["entity"].map(ENTITIES.index).to_numpy()
    vy = vmeta["entity"].map(ENTITIES.index).to_numpy()
    encoder = MetadataEncoder().fit(meta)
    m, vm = encoder.transform(meta), encoder.transform(vmeta)
    cfg = small(epochs=8)
    accuracy, fused = {}, None
    for name, meta_in, val_meta, use_image in [("fusion", m, vm, True), ("image", None, None, True),
                                                ("metadata", m, vm, False)]:
        res = fit_fusion(x, y, meta_in, 4, cfg, out=tmp_path / name, use_image=use_image,
                         val=(vx, vy, *([val_meta] if val_meta is not None else [])))
        pred = predict_logits(res.model, vx, image_size=32, meta=val_meta).argmax(1)
        accuracy[name] = float((pred == vy).mean())
        fused = res.model if name == "fusion" else fused
    assert accuracy["fusion"] >= 0.85, accuracy
    assert accuracy["image"] <= 0.65 and accuracy["metadata"] <= 0.65, accuracy
    # the best checkpoint rebuilds the same fused model
    reloaded, _ = load_model(tmp_path / "fusion" / "best.pt",
                             lambda: build_fusion_model(cfg, 4, meta_dim=encoder.dim))
    np.testing.assert_allclose(predict_logits(reloaded, vx[:8], image_size=32, meta=vm[:8]),
                               predict_logits(fused, vx[:8], image_size=32, meta=vm[:8]), atol=1e-5)


def test_image_only_and_metadata_only_variants_of_one_model():
    images = torch.randn(6, 1, 32, 32)
    meta = torch.randn(6, 5)
    image_only = build_fusion_model(small(), 3, head="gated", meta_dim=0)
    assert image_only(images).shape == (6, 3)
    with pytest.raises(ValueError, match="meta_dim=0 but was given meta input"):
        image_only(images, meta)

    meta_only = build_fusion_model(small(), 3, head="film", meta_dim=5, use_image=False).eval()
    assert meta_only.head.image_dim == 0
    assert not any(p.requires_grad for p in meta_only.encoder.parameters())
    torch.testing.assert_close(meta_only(images, meta), meta_only(torch.zeros_like(images), meta))

    fused = build_fusion_model(small(), 3, head="concat", meta_dim=5)
    assert isinstance(fused, FusionClassifier)
    assert fused.head.classifier.in_features == fused.encoder.feature_dim + 32
    with pytest.raises(ValueError, match=r"expects meta input \[B, 5\], got None"):
        fused(images)


def test_encoder_options_and_init_from_an_msk_checkpoint(tmp_path):
    vit = build_fusion_model(small(encoder="timm/vit_tiny_patch16_224", image_size=16), 3,
                             meta_dim=4, encoder_options={"img_size": 16, "patch_size": 8,
                                                          "depth": 1, "embed_dim": 32, "num_heads": 2})
    assert vit(torch.randn(2, 1, 16, 16), torch.randn(2, 4)).shape == (2, 3)

    encoder = build_encoder("tiny-cnn", in_chans=1)
    path = save_checkpoint(tmp_path / "enc.pt", encoder, arch="tiny-cnn", in_chans=1,
                           config={"sobel": False}, epoch=3)
    model = build_fusion_model(small(init=str(path)), 3, meta_dim=4)
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, encoder.state_dict()[k]), k
    with pytest.raises(CheckpointError, match="holds a 'tiny-cnn' encoder"):
        build_fusion_model(small(init=str(path), encoder="resnet18"), 3, meta_dim=4)
    with pytest.raises(CheckpointError, match="trained with sobel=False"):
        build_fusion_model(small(init=str(path), sobel=True), 3, meta_dim=4)


@pytest.mark.slow
def test_fit_fusion_on_ray_train(tmp_path, ray_session):
    x, meta = lesions(48)
    y = meta["entity"].map(ENTITIES.index).to_numpy()
    m = MetadataEncoder().fit_transform(meta)
    res = fit_fusion(x, y, m, 4, small(num_workers=1), out=tmp_path, head="gated")
    assert [r["epoch"] for r in res.history] == [1]
    assert predict_logits(res.model, x[:4], image_size=32, meta=m[:4]).shape == (4, 4)


# -- the protocol -------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_fusion_writes_the_table_plots_and_resumes(tmp_path):
    images, meta = lesions(96)
    transformer = TransformerConfig(image_size=16, options={"patch_size": 8, "depth": 1,
                                                            "embed_dim": 32, "num_heads": 2})
    config = quick_config(transformer=transformer)
    messages: list[str] = []
    result = evaluate_fusion(images, meta, config, out=tmp_path, progress=messages.append)

    models = ["image only (tiny-cnn)", "image only (vit_tiny_patch16_224)",
              "metadata only (MLP, concat head)", "metadata only (XGBoost)",
              "fusion: concat (tiny-cnn)", "fusion: film (tiny-cnn)"]
    assert list(dict.fromkeys(result.table["model"])) == models
    assert list(result.table["set"][:3]) == ["CV 3-fold", "held-out, fold models", "held-out, ensemble"]
    scores = result.table[["accuracy", "precision", "recall", "f1"]].to_numpy()
    assert ((scores >= 0) & (scores <= 1)).all()
    assert len(result.folds) == 6 * 3 and len(messages) == 6 * 3
    assert set(result.predictions.columns) >= {"image_id", "entity", "image", "fusion-concat"}
    assert set(result.explanation.columns) == {"sex", "age", "site", "view"}
    assert "all" in result.explanation.index
    for name in ["results.csv", "results.md", "folds.csv", "predictions.csv",
                 "confusion-fusion-film.png", "confusion-xgboost.png", "metadata_importance.png",
                 "gradcam-image.png", "gradcam-fusion-concat.png", "runs/metadata/fold-2/best.pt",
                 "runs/fusion-concat/fold-0/metadata_encoder.json"]:
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "gradcam-transformer.png").exists()  # no Grad-CAM for a ViT
    assert "± " in (tmp_path / "results.md").read_text()

    best = tmp_path / "runs" / "fusion-film" / "fold-1" / "best.pt"
    stamp = best.stat().st_mtime_ns
    again = evaluate_fusion(images, meta, config, out=tmp_path)  # resumes: nothing retrained
    assert best.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again.folds.drop(columns="seconds"),
                                  result.folds.drop(columns="seconds"))
    with pytest.raises(ConfigError, match="different config"):
        evaluate_fusion(images, meta, quick_config(heads=["gated"]), out=tmp_path)


def test_folds_are_patient_level_and_every_model_sees_the_same_rows():
    images, meta = lesions(120, per_patient=3)
    config = quick_config()
    data = load_fusion_data(images, meta, config)
    dev, test = patient_split(data.groups, data.labels, test_size=0.2, seed=0)
    folds = _plan(data, dev, test, config)
    patients = lambda rows: set(data.groups[rows])  # noqa: E731
    assert not patients(dev) & patients(test)
    assert sorted(np.concatenate([f.test for f in folds])) == list(range(len(dev)))
    for f in folds:
        assert sorted(np.concatenate([f.train, f.val])) == sorted(f.fit)
        parts = [patients(dev[r]) for r in (f.train, f.val, f.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("column, values, message", [
    ("age", {3: -1.0, 7: 200.0}, r"age outside \[0, 120\] years in rows IMG0-0003=-1, IMG0-0007=200"),
    ("sex", {5: "X"}, r"sex must be M or F .*IMG0-0005='X'"),
    ("site", {2: "moon"}, r"site value.*not in the vocabulary: moon"),
    ("entity", {4: None}, r"1 metadata rows have no entity.*IMG0-0004"),
])
def test_bad_metadata_is_refused_before_training(tmp_path, column, values, message):
    images, meta = lesions(40)
    for row, value in values.items():
        meta.loc[row, column] = value
    with pytest.raises(MetadataError, match=message):
        evaluate_fusion(images, meta, quick_config(), out=tmp_path)
    assert not tmp_path.joinpath("runs").exists()


def test_a_site_no_training_fold_has_seen_fails_fast(tmp_path):
    images, meta = lesions(60)
    meta.loc[meta["patient_group"] == "P0-0007", "site"] = "humerus"  # one patient only
    with pytest.raises(MetadataError, match=r"fold \d: 2 site value\(s\) the encoder does not know "
                                            r"\(never seen while fitting: humerus\): IMG0-0014='humerus'"):
        evaluate_fusion(images, meta, quick_config(), out=tmp_path)
    assert not tmp_path.joinpath("runs").exists()
    # the documented alternative: encode it as all-zero site columns, with a warning
    ignore = quick_config(metadata=MetadataSchema(unknown="ignore"), explain=False, heads=["concat"],
                          image_only=False, xgboost=None, folds=2)
    with pytest.warns(UserWarning, match="never seen while fitting: humerus"):
        result = evaluate_fusion(images, meta, ignore, out=tmp_path / "ignore")
    assert len(result.folds) == 2 * 2


def test_other_unusable_inputs_name_the_problem():
    images, meta = lesions(12)
    with pytest.raises(MetadataError, match="12 images but 11 metadata rows"):
        load_fusion_data(images, meta.iloc[:11], quick_config())
    bad = meta.assign(entity=meta["entity"].replace({"vertical-M": "chondroma"}))
    with pytest.raises(MetadataError, match="outside entity set 'bone-tumours'.*IMG0-0000='horizontal-F'"):
        load_fusion_data(images, bad, quick_config(entity_set="bone-tumours"))
    with pytest.raises(ConfigError, match=r"no box columns \['x0', 'y0', 'x1', 'y1'\]"):
        load_fusion_data(images, meta, quick_config(roi=True))
    with pytest.raises(ValueError, match="do not pass metadata too"):
        evaluate_fusion(load_fusion_data(images, meta, quick_config()), meta, out="unused")


# -- ingest input: join, letterbox, ROI ---------------------------------------------------------


@pytest.mark.parametrize("resize", ["pad", "stretch"])
def test_box_mapping_follows_the_ingest_resize(resize):
    source = np.zeros((120, 60), np.float32)
    source[30:50, 10:25] = 1.0  # a lesion, box (10, 30, 25, 50) end-exclusive
    image = square_image(source, 48, resize)
    x0, y0, x1, y1 = map_box_to_square((10, 30, 25, 50), source.shape, 48, resize)
    rows, cols = np.nonzero(image > 128)
    assert x0 - 1 <= cols.min() and cols.max() <= x1 and y0 - 1 <= rows.min() and rows.max() <= y1


def fake_ingest(root, n: int = 16):
    """A synth export's ground truth and a matching ingest output (shards + manifest), with a
    bright lesion at each ground-truth box (255 for osteosarcoma, 179 for enchondroma) on a
    dark background; sources are 80 x 40, images 64 px letterboxed."""
    rng = np.random.default_rng(0)
    truth, shard, manifest = [], [], []
    for i in range(n):
        x0, y0 = int(rng.integers(8, 22)), int(rng.integers(20, 50))  # crops need no shift
        source = np.full((80, 40), 0.1, np.float32)
        entity = "osteosarcoma" if i % 2 else "enchondroma"
        source[y0:y0 + 10, x0:x0 + 10] = 1.0 if entity == "osteosarcoma" else 0.7
        rel = f"P{i // 2}/S1/IM{i:03d}.dcm"
        truth.append({"path": f"export/{rel}", "patient_id": f"{i // 2:04d}", "region": "femur",
                      "entity": entity, "age": 10 + i, "sex": "MF"[i % 2], "site": "femur",
                      "position": "metaphysis", "view": "AP", "x0": x0, "y0": y0, "x1": x0 + 10,
                      "y1": y0 + 10})
        image = square_image(source, 64)
        shard.append({"image_id": f"ID{i:03d}", "image": image.tobytes(), "height": 64, "width": 64,
                      "source_height": 80, "source_width": 40})
        manifest.append({"path": rel, "image_id": f"ID{i:03d}", "status": "ok",
                         "shard": "shards/part-000000-000.parquet"})
    truth.append({"path": "export/broken.dcm", "patient_id": "", "region": "", "entity": None,
                  "age": None, "sex": "", "site": "", "position": "", "view": "", "x0": None,
                  "y0": None, "x1": None, "y1": None})
    manifest.append({"path": "broken.dcm", "image_id": "IDX", "status": "quarantined", "shard": None})
    synth_dir, ingest_dir = root / "synth", root / "ingest"
    synth_dir.mkdir()
    pd.DataFrame(truth).to_csv(synth_dir / "ground_truth.csv", index=False)
    (ingest_dir / "shards").mkdir(parents=True)
    rows = [{k: r.get(k) for k in SHARD_SCHEMA.names} for r in shard]
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA),
                   ingest_dir / "shards" / "part-000000-000.parquet")
    write_manifest_part(ingest_dir, 0, manifest)
    return synth_dir, ingest_dir


def test_ingest_source_joins_the_ground_truth_and_crops_the_lesion(tmp_path):
    synth_dir, ingest_dir = fake_ingest(tmp_path)
    meta = read_synth_truth(synth_dir, ingest_dir)
    assert len(meta) == 16 and meta["image_id"].iloc[0] == "ID000"
    assert set(meta["view"]) == {"frontal"} and set(meta["position"]) == {"metaphysis"}
    schema = MetadataSchema(sites=["femur", "tibia"], positions=True)
    config = quick_config(roi=True, roi_size=24, metadata=schema, entity_set="bone-tumours")
    data = load_fusion_data(ingest_dir, meta.iloc[::-1], config)  # rows come in shard order
    assert data.images.shape == (16, 24, 24)
    assert list(data.meta["image_id"]) == list(meta["image_id"])
    assert [data.classes[y] for y in data.labels] == list(data.meta["entity"])
    # each crop is centred on its own lesion, with a darker margin around it
    centre = data.images[:, 9:15, 9:15].mean(axis=(1, 2))
    expected = np.where(data.meta["entity"] == "osteosarcoma", 255, 179)
    np.testing.assert_allclose(centre, expected, atol=8)
    assert (data.images[:, 0, :].mean(axis=1) < centre - 50).all()

    orphans = pd.concat([meta, meta.iloc[:2].assign(image_id=["GONE1", "GONE2"])])
    with pytest.raises(MetadataError, match="2 of 18 metadata rows match no image: GONE1, GONE2"):
        load_fusion_data(ingest_dir, orphans, config)
