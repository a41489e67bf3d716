"""Reading an ingest's shards: as an Arrow table, a NumPy stack, a PyTorch or a Ray dataset.

Only *committed* shards are read (those the manifest references), so the leftovers of an
interrupted ingest are never seen. Images are stored as raw ``uint8`` bytes, row-major,
``height`` x ``width`` (see :data:`msk.core.stages.ingest.pipeline.SHARD_SCHEMA`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from msk.core.errors import MskError
from msk.core.io.manifest import committed_shards

__all__ = ["ShardDataset", "images_from_table", "ray_dataset", "read_shards"]


def _shard_files(out: str | os.PathLike) -> list[str]:
    files = committed_shards(out)
    if not files:
        raise MskError(f"{out} holds no ingested images (no committed shards); run `msk ingest` first")
    return [str(f) for f in files]


def read_shards(out: str | os.PathLike, *, columns: Sequence[str] | None = None,
                filter: pads.Expression | None = None) -> pa.Table:
    """The committed shard rows of the ingest output ``out`` as one Arrow table.

    ``columns`` selects columns; ``filter`` is a :mod:`pyarrow.dataset` expression applied
    while reading, e.g. ``pc.field("body_part") == "HAND"``.
    """
    files = _shard_files(out)
    # Shards written before a column was added (e.g. study_date) lack it: read it as null there.
    schema = pa.unify_schemas([pq.read_schema(f) for f in files]) if len(files) > 1 else None
    dataset = pads.dataset(files, format="parquet", schema=schema)
    return dataset.to_table(columns=list(columns) if columns is not None else None, filter=filter)


def images_from_table(table: pa.Table) -> np.ndarray:
    """The ``image`` column as a ``uint8`` array of shape ``[N, height, width]``."""
    heights, widths = set(table.column("height").to_pylist()), set(table.column("width").to_pylist())
    if len(heights) > 1 or len(widths) > 1:
        raise ValueError(f"images of different sizes in one table: heights {sorted(heights)}, widths {sorted(widths)}")
    if table.num_rows == 0:
        return np.zeros((0, 0, 0), np.uint8)
    h, w = heights.pop(), widths.pop()
    column = table.column("image").combine_chunks().cast(pa.large_binary())
    data = np.frombuffer(column.buffers()[2], np.uint8)
    offsets = np.frombuffer(column.buffers()[1], np.int64)[column.offset : column.offset + len(column) + 1]
    if not np.all(np.diff(offsets) == h * w):
        raise ValueError(f"an image's byte length is not height x width = {h} x {w}")
    return data[offsets[0] : offsets[-1]].reshape(len(column), h, w).copy()


class ShardDataset(Dataset):
    """A map-style PyTorch dataset over an ingest output (or an already read table).

    Each item is ``(image, fields)``: ``image`` is a float tensor ``[1, S, S]`` in [0, 1] (after
    ``transform``, if given) and ``fields`` a dict built from ``fields``, which maps the name
    an item should carry to a table column (a sequence of column names keeps their names), e.g.
    ``ShardDataset(out, fields={"label": "body_part", "id": "image_id"})``.

    The images are held in memory (``N * S * S`` bytes); for archives larger than memory use
    :func:`ray_dataset`.
    """

    def __init__(self, source: str | os.PathLike | pa.Table, *,
                 fields: Mapping[str, str] | Sequence[str] = (),
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        table = source if isinstance(source, pa.Table) else read_shards(source)
        mapping = dict(fields) if isinstance(fields, Mapping) else {c: c for c in fields}
        missing = sorted(set(mapping.values()) - set(table.column_names))
        if missing:
            raise KeyError(f"no column {missing} in the shards; columns are {table.column_names}")
        self.images = images_from_table(table)
        self.fields = {name: table.column(column).to_pylist() for name, column in mapping.items()}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image = torch.from_numpy(self.images[index]).unsqueeze(0).float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, {name: values[index] for name, values in self.fields.items()}


def ray_dataset(out: str | os.PathLike, *, columns: Sequence[str] | None = None):
    """The committed shards of ``out`` as a :class:`ray.data.Dataset` (streamed, not loaded)."""
    import ray.data

    return ray.data.read_parquet(_shard_files(out), columns=list(columns) if columns is not None else None)
