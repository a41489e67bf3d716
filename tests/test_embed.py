"""Embeddings: Ray Data job over a tiny ingest, ROI crops, checkpoints of both kinds, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from msk.core.data.squaring import square_image
from msk.core.errors import MskError
from msk.core.io.checkpoint import CheckpointError, save_checkpoint
from msk.core.io.dataset import images_from_table, read_shards
from msk.core.io.manifest import shard_path, write_manifest_part
from msk.core.models.embed import (
    EMBEDDINGS_FILE,
    EmbedConfig,
    Embedder,
    EmbedError,
    embed,
    embedding_matrix,
    encoder_info,
    map_source_box,
    read_embeddings,
    read_rois,
    roi_crops,
)
from msk.core.registry import build_encoder
from msk.core.stages.ingest.pipeline import SHARD_SCHEMA

pytestmark = pytest.mark.usefixtures("one_torch_thread")

def write_archive(out: Path, n: int = 12) -> dict[str, tuple[float, float, float, float]]:
    """A committed ingest output of ``n`` letterboxed 64-px images, written directly with the
    shard schema; each source image (various aspect ratios) has a bright square lesion.

    :return: ``image_id -> (x0, y0, x1, y1)``, the lesion boxes in source pixels.
    """
    rng = np.random.default_rng(0)
    rows, manifest, boxes = [], [], {}
    shard = shard_path(out, 0, 0)
    for i in range(n):
        h, w = [(120, 60), (60, 120), (90, 90)][i % 3]
        source = rng.uniform(0.0, 0.2, (h, w))
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        source[y0:y0 + 20, x0:x0 + 20] = 1.0
        image = square_image(source, 64, "pad")
        image_id = f"SRC-{i:03d}"
        rows.append({"image_id": image_id, "image": image.tobytes(), "height": 64, "width": 64,
                     "source_height": h, "source_width": w, "patient_id": f"PAT-{i // 2:03d}",
                     "study_id": f"STU-{i:03d}"})
        manifest.append({"path": f"{i}.dcm", "image_id": image_id, "status": "ok",
                         "shard": shard.relative_to(out).as_posix()})
        boxes[image_id] = (x0, y0, x0 + 20, y0 + 20)
    shard.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), shard)
    write_manifest_part(out, 0, manifest)
    return boxes


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """``(ingest folder, lesion boxes)`` of :func:`write_archive`."""
    out = tmp_path_factory.mktemp("ingest")
    return out, write_archive(out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A (random) tiny-cnn encoder checkpoint with a Sobel input layer, trained at 32 px."""
    torch.manual_seed(0)
    encoder = build_encoder("tiny-cnn", in_chans=2)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "encoder.pt", encoder,
                           arch="tiny-cnn", in_chans=2, config={"image_size": 32, "sobel": True},
                           epoch=1)


@pytest.mark.slow
def test_embed_runs_on_ray_data_and_matches_the_embedder(archive, checkpoint, tmp_path, ray_session):
    ingest_dir, boxes = archive
    rois = {i: boxes[i] for i in list(boxes)[:9]}  # lesion images only
    report = embed(ingest_dir, checkpoint, tmp_path, EmbedConfig(batch_size=4, num_cpus=0.5, engine="ray"),
                   rois=rois, progress=False)
    table = read_embeddings(tmp_path)
    assert report.n_images == table.num_rows == 9 and report.dim == 64
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    x = embedding_matrix(table)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)

    shards = read_shards(ingest_dir)  # the shards' pseudonymised ids, in shard order
    for column in ("image_id", "patient_id", "study_id"):
        assert table.column(column).to_pylist() == shards.column(column).to_pylist()[:9]
    info = encoder_info(table)
    assert info["arch"] == "tiny-cnn" and info["sobel"] and info["image_size"] == 32
    assert info["roi_margin"] == 0.15
    assert json.loads((tmp_path / "embed.json").read_text())["n_images"] == 9

    # exactly what the in-process Embedder gives for the same crops (a query at serving time)
    images = images_from_table(shards)[:9]
    crops = roi_crops(images, [map_source_box(rois[i], (h, w), 64) for i, h, w in zip(
        rois, shards["source_height"].to_pylist(), shards["source_width"].to_pylist())], 32)
    np.testing.assert_allclose(x, Embedder(checkpoint).embed_images(crops), atol=1e-5)


def test_embed_in_process_reads_the_shards_in_batches(archive, checkpoint, tmp_path, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert EmbedConfig().resolved_engine() == "local"
    assert EmbedConfig(concurrency=2).resolved_engine() == EmbedConfig(use_gpu=True).resolved_engine() == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster: its actors, not this process
    assert EmbedConfig().resolved_engine() == "ray" and EmbedConfig(engine="local").resolved_engine() == "local"
    monkeypatch.delenv("RAY_ADDRESS")

    ingest_dir, boxes = archive
    ray_was_running = ray.is_initialized()
    report = embed(ingest_dir, checkpoint, tmp_path / "all", EmbedConfig(batch_size=5), progress=False)
    assert ray.is_initialized() == ray_was_running  # the local engine starts no Ray
    table, shards = read_embeddings(tmp_path / "all"), read_shards(ingest_dir)
    assert report.n_images == table.num_rows == shards.num_rows == 12
    for column in ("image_id", "patient_id", "study_id"):
        assert table.column(column).to_pylist() == shards.column(column).to_pylist()
    np.testing.assert_allclose(embedding_matrix(table),
                               Embedder(checkpoint).embed_images(images_from_table(shards)), atol=1e-5)

    rois = {i: boxes[i] for i in list(boxes)[3:8]}
    embed(ingest_dir, checkpoint, tmp_path / "rois", EmbedConfig(batch_size=2), rois=rois, progress=False)
    table = read_embeddings(tmp_path / "rois")
    assert table.column("image_id").to_pylist() == list(rois) and encoder_info(table)["roi_margin"] == 0.15


def test_the_batched_view_is_the_per_image_eval_transform(tmp_path):
    """Embedder transforms a whole batch at once; each image must come out as the per-image
    eval_transform (preprocessing with the image's own percentiles, resize, crop, normalise)."""
    from msk.core.data.augment import to_tensor

    torch.manual_seed(0)
    encoder = build_encoder("tiny-cnn", in_chans=1)
    path = save_checkpoint(tmp_path / "encoder.pt", encoder, arch="tiny-cnn", in_chans=1, epoch=1,
                           config={"image_size": 24, "sobel": False, "preprocess": {"window": True, "gamma": 0.8}})
    embedder = Embedder(path, batch_size=4)
    rng = np.random.default_rng(1)
    images = (rng.uniform(0, 1, (6, 40, 40)) ** np.arange(1, 7)[:, None, None] * 255).astype(np.uint8)
    with torch.no_grad():
        one_by_one = embedder.model(torch.stack([embedder.transform(to_tensor(im)) for im in images])).numpy()
    one_by_one /= np.linalg.norm(one_by_one, axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.embed_images(images), one_by_one, atol=1e-5)


def test_embedder_on_a_shard_batch_embeds_whole_images(archive, checkpoint):
    ingest_dir, _ = archive
    shards = read_shards(ingest_dir)
    embedder = Embedder(checkpoint, batch_size=5)
    table = embedder(shards)  # what map_batches calls, without rois
    assert table.column("image_id").to_pylist() == shards.column("image_id").to_pylist()
    np.testing.assert_allclose(embedding_matrix(table),
                               embedder.embed_images(images_from_table(shards)), atol=1e-6)


def test_roi_crops_of_letterboxed_images_show_the_lesion(archive):
    ingest_dir, boxes = archive
    shards = read_shards(ingest_dir)
    images = images_from_table(shards)
    mapped = [map_source_box(boxes[i], (h, w), 64) for i, h, w in zip(
        shards["image_id"].to_pylist(), shards["source_height"].to_pylist(),
        shards["source_width"].to_pylist())]
    crops = roi_crops(images, mapped, 32, margin=0.15)
    centre, border = crops[:, 12:20, 12:20].mean(axis=(1, 2)), crops[:, :2, :].mean(axis=(1, 2))
    assert (centre > 200).all() and (border < 100).all()


def test_classifier_checkpoint_embeds_with_its_features(tmp_path):
    from msk.core.models.train import TrainConfig, fit_classifier

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 24, 24), dtype=np.uint8)
    fitted = fit_classifier(images, np.arange(8) % 2, 2,
                            TrainConfig(encoder="tiny-cnn", image_size=24, epochs=1, batch_size=4),
                            out=tmp_path)
    embedder = Embedder(fitted.best)
    x = embedder.embed_images(images)
    with torch.no_grad():
        from msk.core.data.augment import eval_transform, to_tensor

        preprocess = fitted.model.input_config.preprocess  # as trained (msk.core.data.preprocess)
        batch = torch.stack([eval_transform(24, preprocess)(to_tensor(i)) for i in images])
        ref = fitted.model.features(batch).numpy()
    np.testing.assert_allclose(x, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    assert embedder.info.image_size == 24 and embedder.dim == 64
    # a module works too, given the input size
    np.testing.assert_allclose(Embedder(fitted.model, image_size=24).embed_images(images), x, atol=1e-5)


def test_encoder_options_reach_the_encoder(tmp_path):
    vit = build_encoder("timm/vit_tiny_patch16_224", in_chans=1, img_size=16, patch_size=8, depth=1)
    path = save_checkpoint(tmp_path / "vit.pt", vit, arch="timm/vit_tiny_patch16_224", in_chans=1,
                           config={"image_size": 16}, epoch=1)
    options = {"img_size": 16, "patch_size": 8, "depth": 1}
    x = Embedder(path, encoder_options=options).embed_images(np.zeros((2, 16, 16), np.uint8))
    assert x.shape == (2, 192)
    with pytest.raises(CheckpointError, match="do not fit"):
        Embedder(path)  # built without the options: a 224-px ViT
    with pytest.raises(EmbedError, match="cannot take 32x32 px inputs"):
        Embedder(path, encoder_options=options, image_size=32)


def test_map_source_box_follows_the_letterbox():
    # 320 x 160 source -> 64 x 32 content centred in 64 x 64 (16 px of padding left and right)
    assert map_source_box((0, 0, 160, 320), (320, 160), 64) == (16.0, 0.0, 48.0, 64.0)
    assert map_source_box((80, 160, 80, 160), (320, 160), 64) == (32.0, 32.0, 32.0, 32.0)
    assert map_source_box((0, 0, 160, 320), (320, 160), 64, "stretch") == (0.0, 0.0, 64.0, 64.0)
    with pytest.raises(MskError, match="empty"):  # raised by msk.core.data.squaring.map_box_to_square
        map_source_box((0, 0, 1, 1), (0, 10), 64)


def test_roi_crops_centre_the_lesion():
    image = np.zeros((64, 64), np.uint8)
    image[40:48, 10:18] = 255  # the lesion
    [crop] = roi_crops(image[None], [(10, 40, 18, 48)], 32)
    assert crop.shape == (32, 32)
    assert crop[12:20, 12:20].mean() > 200 and crop[:4].mean() < 20  # centred, dark margin


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 32, 32, 3), np.uint8), "3 channels"),
    (np.zeros((32, 32, 3), np.uint8), "colour image"),
    (np.zeros((2, 4, 4), np.uint8), "too small"),
    (np.full((1, 16, 16), 2.0, np.float32), r"in \[0, 1\]"),
    (np.zeros((1, 16, 16), np.int32), "uint8 or floats"),
    (np.zeros((16,), np.uint8), "grey"),
])
def test_bad_images_are_refused(checkpoint, images, message):
    with pytest.raises(EmbedError, match=message):
        Embedder(checkpoint).embed_images(images)


class _Constant(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full((len(x), 4), self.value)


@pytest.mark.parametrize("value, message", [(float("nan"), "NaN or infinite features for 2 image"),
                                            (0.0, "all-zero feature vector")])
def test_bad_features_are_refused_naming_the_image(value, message):
    embedder = Embedder(_Constant(value), image_size=16)
    with pytest.raises(EmbedError, match=f"{message}.*'a'"):
        embedder.embed_images(np.zeros((2, 16, 16), np.uint8), ids=["a", "b"])


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Embedder(tmp_path / "missing.pt")
    with pytest.raises(EmbedError, match="needs EmbedConfig.image_size"):
        Embedder(_Constant(1.0))
    with pytest.raises(EmbedError, match="no embeddings file"):
        read_embeddings(tmp_path)
    pq.write_table(pa.table({"image_id": ["a"], "patient_id": ["p"], "study_id": ["s"],
                             "embedding": [[1.0, 2.0]]}), tmp_path / "bad.parquet")
    with pytest.raises(EmbedError, match="must be fixed_size_list"):
        read_embeddings(tmp_path / "bad.parquet")


@pytest.mark.slow
def test_an_actor_pool_that_would_starve_the_reads_is_refused(archive, checkpoint, tmp_path,
                                                              ray_session):
    ingest_dir, _ = archive  # the test session's Ray has 2 CPUs
    with pytest.raises(EmbedError, match="reserve 2 of the cluster's 2 CPUs"):
        embed(ingest_dir, checkpoint, tmp_path, EmbedConfig(concurrency=2), progress=False)
    with pytest.raises(EmbedError, match="needs 1 GPUs"):
        embed(ingest_dir, checkpoint, tmp_path, EmbedConfig(use_gpu=True, num_cpus=0.5),
              progress=False)
    assert not (tmp_path / EMBEDDINGS_FILE).exists()


def test_an_actor_pool_must_leave_a_whole_cpu_for_the_reads():
    # a Ray Data read task takes a whole CPU: half a CPU left over hangs the run (found with
    # bench/embed.py --cluster on 1-CPU nodes), so it is refused before anything runs
    from msk.core.models.embed import _check_resources

    with pytest.raises(EmbedError, match="leave less than the whole CPU a read task needs"):
        _check_resources(EmbedConfig(num_cpus=1.5, engine="ray"), {"CPU": 2.0})
    with pytest.raises(EmbedError, match="reserve 0.5 of the cluster's 1 CPUs"):
        _check_resources(EmbedConfig(num_cpus=0.5, engine="ray"), {"CPU": 1.0})
    _check_resources(EmbedConfig(num_cpus=1.0, engine="ray"), {"CPU": 2.0})  # one CPU left: fine


def test_read_rois(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("image_id,entity,x0,y0,x1,y1\nA,osteosarcoma,1,2,3,4\nB,enchondroma,,,,\n")
    assert read_rois(path) == {"A": (1.0, 2.0, 3.0, 4.0)}
    path.write_text("image_id,x0,y0,x1,y1\nA,1,2,3,4\nA,5,6,7,8\n")
    with pytest.raises(EmbedError, match="'A' has two boxes"):
        read_rois(path)
    path.write_text("image_id,x0\nA,1\n")
    with pytest.raises(EmbedError, match="missing column.s. y0, x1, y1"):
        read_rois(path)
