"""Reading ingested shards: Arrow table, NumPy stack, PyTorch and Ray datasets."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from msk.core.errors import MskError
from msk.core.io.dataset import ShardDataset, images_from_table, ray_dataset, read_shards
from msk.core.io.manifest import read_manifest
from msk.core.stages.ingest.pipeline import IngestConfig, ingest

SIZE = 32


@pytest.fixture(scope="module")
def out(tmp_path_factory, ray_session):
    """An ingest of six small PNGs (three 'left', three 'right' by name) and one broken file."""
    tmp = tmp_path_factory.mktemp("dataset")
    src = tmp / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        side = "left" if i < 3 else "right"
        Image.fromarray(rng.integers(0, 256, (40, 40 + 8 * i), dtype=np.uint8)).save(src / f"{side}_{i}.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cfg = IngestConfig(image_size=SIZE, chunk_files=4, batch_size=2,
                       key_file=tmp / "pseudonym.key", create_key=True)
    ingest(src, tmp / "out", cfg, progress=False)
    return tmp / "out"


@pytest.mark.slow
def test_read_shards_returns_the_ok_rows_only(out):
    table = read_shards(out)
    manifest = read_manifest(out)
    ok_ids = pc.filter(manifest.column("image_id"), pc.equal(manifest.column("status"), "ok"))
    assert sorted(table.column("image_id").to_pylist()) == sorted(ok_ids.to_pylist())
    assert table.num_rows == 6


@pytest.mark.slow
def test_read_shards_ignores_uncommitted_shards(out):
    stray = out / "shards" / "part-000099-000.parquet"
    pq.write_table(read_shards(out).slice(0, 1), stray)
    try:
        assert read_shards(out).num_rows == 6
    finally:
        stray.unlink()


@pytest.mark.slow
def test_read_shards_with_columns_and_filter(out):
    table = read_shards(out, columns=["image_id", "width"], filter=pc.field("source_width") > 70)
    assert table.column_names == ["image_id", "width"]
    assert table.num_rows == 2  # widths 40 + 8 i > 70 for i = 4, 5


@pytest.mark.slow
def test_images_from_table_stacks_uint8(out):
    table = read_shards(out)
    images = images_from_table(table)
    assert images.shape == (6, SIZE, SIZE) and images.dtype == np.uint8
    first = np.frombuffer(table.column("image")[0].as_py(), np.uint8).reshape(SIZE, SIZE)
    assert np.array_equal(images[0], first)
    assert np.array_equal(images_from_table(table.slice(2, 3)), images[2:5])  # sliced tables too


def test_images_from_table_refuses_mixed_sizes():
    table = pa.table({"image": [b"\0" * 4, b"\0" * 9], "height": [2, 3], "width": [2, 3]})
    with pytest.raises(ValueError, match="different sizes"):
        images_from_table(table)


@pytest.mark.slow
def test_shard_dataset_items_and_fields(out):
    table = read_shards(out)
    ds = ShardDataset(table, fields={"id": "image_id", "w": "source_width"})
    assert len(ds) == 6
    image, fields = ds[1]
    assert image.shape == (1, SIZE, SIZE) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    expected = torch.from_numpy(images_from_table(table)[1]).float() / 255
    assert torch.equal(image[0], expected)
    assert fields == {"id": table.column("image_id")[1].as_py(), "w": table.column("source_width")[1].as_py()}


@pytest.mark.slow
def test_shard_dataset_in_a_dataloader_with_transform(out):
    ds = ShardDataset(out, fields=["source_width"], transform=lambda x: x * 2 - 1)
    images, fields = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 1, SIZE, SIZE) and images.min() >= -1 and images.min() < 0
    assert fields["source_width"].shape == (4,)


@pytest.mark.slow
def test_shard_dataset_names_a_missing_column(out):
    with pytest.raises(KeyError, match="diagnosis"):
        ShardDataset(out, fields={"label": "diagnosis"})


@pytest.mark.slow
def test_ray_dataset_streams_the_shards(out):
    ds = ray_dataset(out, columns=["image_id", "height"])
    assert ds.count() == 6
    assert set(ds.columns()) == {"image_id", "height"}


def test_reading_an_empty_output_is_a_clear_error(tmp_path):
    with pytest.raises(MskError, match="no committed shards"):
        read_shards(tmp_path)
