"""Image embeddings: L2-normalised encoder features of an ingest's images, stored as Parquet.

``msk embed INGEST CHECKPOINT OUT`` runs an encoder over every committed shard image (or, with
lesion boxes, over the lesion's region of interest), streamed shard batch by shard batch, and
writes::

    OUT/
      embeddings.parquet   image_id, patient_id, study_id (the pseudonymised ids of the shards)
                           and embedding: fixed_size_list<float32>[D], unit length
      embed.json           encoder, input size, ROI settings, row count, msk version

The encoder comes from any msk checkpoint (:mod:`msk.core.io.checkpoint`): a DeepCluster encoder
or the encoder of a trained classifier (:mod:`msk.core.models.train`); the fixed input layer (Sobel or
identity), the input size and the preprocessing it was trained with are read from the
checkpoint (:class:`msk.core.data.preprocess.InputConfig`; none for checkpoints written before
preprocessing existed). Images are fed as in training and evaluation
(:func:`msk.core.data.augment.eval_transform`: preprocess, resize, centre crop, normalise).

The work is done by :class:`Embedder`, a callable class that holds the model. With one model
replica on the CPU (``concurrency: 1``, the default, no ``use_gpu``, no ``RAY_ADDRESS``)
:func:`embed` runs it in this process over the shards read batch by batch (``engine: auto``
picks ``local``): a Ray Data actor would add a worker process's start-up (importing torch and
building the model again, 10-13 s on a loaded 2-core machine) and nothing else. Otherwise
(``engine: ray``) Ray Data's ``map_batches`` keeps ``concurrency`` of them alive as actors (one
GPU each with ``use_gpu``), across the cluster. The same class embeds query images in-process (a
Ray Serve replica, the recommender's evaluation).

**Regions of interest.** Lesion boxes are given in pixels of the *source* image (the decoded
DICOM, e.g. ``x0, y0, x1, y1`` of a synthetic export's ground truth). Ingest resized the source
to a square (letterbox ``pad`` or ``stretch``, see :func:`msk.core.data.squaring.square_image`) and
kept its size in ``source_height`` / ``source_width``; :func:`map_source_box` maps the box into
the shard image, :func:`msk.core.data.roi.roi_box` adds the margin and
:func:`msk.core.data.roi.crop_roi` crops it to the network's input size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from msk.core.config import MskConfig
from msk.core.data.squaring import map_box_to_square
from msk.core.errors import MskError
from msk.core.io.manifest import ingest_resize
from msk.core.io.paths import resolve_stored, store_path

__all__ = [
    "EMBEDDINGS_FILE", "EmbedConfig", "EmbedError", "EmbedReport", "Embedder", "EncoderInfo",
    "embed", "embedding_matrix", "embeddings_schema", "embeddings_table", "encoder_info",
    "map_source_box", "read_embeddings", "read_rois", "roi_crops",
]

EMBEDDINGS_FILE = "embeddings.parquet"
SUMMARY_FILE = "embed.json"
ID_COLUMNS = ("image_id", "patient_id", "study_id")
_SHARD_COLUMNS = ["image_id", "image", "height", "width", "source_height", "source_width",
                  "patient_id", "study_id"]
_MIN_SIDE = 8
#: Arrow schema metadata key holding the JSON description of the encoder.
META_KEY = b"msk.embed"


class EmbedError(MskError, ValueError):
    """Input an embedding cannot be computed from, or an embeddings file that is not one."""


class EmbedConfig(MskConfig):
    """Options of ``msk embed`` (YAML keys of ``--config``)."""

    image_size: int | None = Field(
        None, ge=_MIN_SIDE, description="network input side; default: the checkpoint's training image_size")
    batch_size: int = Field(64, ge=1, description="images per map_batches call and forward pass")
    concurrency: int = Field(1, ge=1, description="model replicas (Ray Data actors)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per actor")
    use_gpu: bool = Field(False, description="one GPU per actor")
    roi_margin: float = Field(
        0.15, ge=0, description="with lesion boxes: margin on each side, a fraction of the lesion's longer side")
    encoder_options: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments the encoder was built with (timm: img_size, patch_size, depth)")
    engine: Literal["auto", "local", "ray"] = Field(
        "auto", description="local: this process, shards streamed batch by batch; ray: Ray Data actors; "
                            "auto: local for concurrency 1 on the CPU without RAY_ADDRESS, else ray")

    def resolved_engine(self) -> Literal["local", "ray"]:
        """The engine ``auto`` stands for here (see :func:`embed`)."""
        if self.engine != "auto":
            return self.engine
        one_cpu_replica = self.concurrency == 1 and not self.use_gpu
        return "local" if one_cpu_replica and not os.environ.get("RAY_ADDRESS") else "ray"


# -- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderInfo:
    """What produced an embedding: stored with it, checked by the recommender."""

    arch: str
    dim: int
    image_size: int
    sobel: bool
    checkpoint: str | None = None
    roi_margin: float | None = None  # None: whole images

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, "dim": self.dim, "image_size": self.image_size,
                "sobel": self.sobel, "checkpoint": self.checkpoint, "roi_margin": self.roi_margin}


def _feature_model(source: Any, image_size: int | None, encoder_options: Mapping[str, Any]):
    """``(module mapping normalised [B, 1, S, S] to [B, D], arch, sobel, image_size, path,
    preprocess)``."""
    from torch import nn

    from msk.core.data.augment import input_layer
    from msk.core.data.preprocess import InputConfig, input_config_of

    if isinstance(source, nn.Module):
        known = input_config_of(source)
        image_size = image_size or (known.image_size if known is not None else None)
        if image_size is None:
            raise EmbedError("an encoder passed as a module needs EmbedConfig.image_size")
        features = getattr(source, "features", None)
        module = _features_module(source) if callable(features) else source
        arch = getattr(source, "encoder_name", None) or type(source).__name__
        return (module.eval(), arch, bool(getattr(source, "sobel", False)), image_size, None,
                None if known is None else known.preprocess)

    from msk.core.io.checkpoint import load_checkpoint, load_state
    from msk.core.models.pretrained import weights_from_checkpoint
    from msk.core.registry import build_encoder

    path = Path(source)
    ckpt = load_checkpoint(path)
    encoder_options = encoder_options or ckpt.extra.get("encoder_options") or {}
    try:
        with weights_from_checkpoint():  # the checkpoint's weights, not `pretrained` (need not exist here)
            encoder = build_encoder(ckpt.arch, in_chans=ckpt.in_chans, **encoder_options)
    except TypeError as exc:
        raise EmbedError(f"{path}: encoder {ckpt.arch!r} does not take the options "
                         f"{dict(encoder_options)}: {exc}") from None
    load_state(encoder, ckpt, arch=ckpt.arch)
    sobel = bool(ckpt.config.get("sobel", ckpt.in_chans == 2))
    size = image_size or ckpt.config.get("image_size")
    if not size:
        raise EmbedError(f"{path} does not record its training image_size; set EmbedConfig.image_size")
    module = nn.Sequential(input_layer(sobel), encoder).eval()
    saved = InputConfig.from_config({**ckpt.config, "image_size": size})
    if saved is None:  # not reached: size is set
        raise EmbedError(f"{path}: no input config for image_size {size}")
    return module, ckpt.arch, sobel, int(size), str(path), saved.preprocess


def _features_module(model):
    """``model.features`` as a module (ImageClassifier and DeepClusterNet have one)."""
    from torch import nn

    class Features(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.features(x)

    return Features(model)


class Embedder:
    """An encoder ready to turn grey images into unit-length feature vectors.

    Ray Data's ``map_batches`` instantiates it once per actor and calls it with Arrow batches
    of shard rows (:meth:`__call__`); called directly, :meth:`embed_images` embeds a stack of
    images (query images of the recommender).

    :param source: an msk checkpoint path (DeepCluster or classifier) or an ``nn.Module``
        (an encoder taking normalised ``[B, 1, S, S]``, or a model with ``features(x)``).
    :param image_size: network input side; default the checkpoint's ``image_size``.
    :param rois: ``image_id -> (x0, y0, x1, y1)`` lesion boxes in source-image pixels; when
        given, only these images are embedded, each from its lesion's region of interest.
    :param resize: how the ingest made shard images square (``pad`` or ``stretch``).
    """

    def __init__(self, source: str | os.PathLike | Any, *, image_size: int | None = None,
                 batch_size: int = 64, use_gpu: bool = False,
                 encoder_options: Mapping[str, Any] | None = None,
                 rois: Mapping[str, Sequence[float]] | None = None, roi_margin: float = 0.15,
                 resize: Literal["pad", "stretch"] = "pad"):
        import torch

        from msk.core.data.augment import eval_transform
        from msk.core.data.preprocess import Preprocess

        model, arch, sobel, size, path, preprocess = _feature_model(source, image_size, encoder_options or {})
        if use_gpu and not torch.cuda.is_available():
            raise EmbedError("use_gpu=True but torch sees no CUDA device")
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = model.to(self.device)
        self.transform = eval_transform(size, preprocess)  # as the encoder was trained
        # the same view, applied to a whole batch at once: per-image preprocessing (it depends on
        # each image's own statistics) then one resize + crop + normalise of the batch
        self._preprocess = None if preprocess is None or preprocess.is_identity else Preprocess(preprocess)
        self._view = eval_transform(size)
        self.batch_size = batch_size
        self.rois = None if rois is None else {str(k): tuple(map(float, v)) for k, v in rois.items()}
        self.roi_margin = roi_margin
        self.resize = resize
        try:
            with torch.no_grad():
                dim = int(self.model(torch.zeros(1, 1, size, size, device=self.device)).shape[1])
        except Exception as exc:  # noqa: BLE001 - timm asserts, shape errors: all mean "wrong size"
            raise EmbedError(f"encoder {arch!r} cannot take {size}x{size} px inputs: {exc}") from None
        self.info = EncoderInfo(arch, dim, size, sobel, path,
                                roi_margin if self.rois is not None else None)

    @property
    def dim(self) -> int:
        return self.info.dim

    def embed_images(self, images: np.ndarray, *, ids: Sequence[str] | None = None) -> np.ndarray:
        """``float32 [N, D]`` unit-length features of grey images ``[N, H, W]`` (or one ``[H, W]``).

        Images are ``uint8`` or floats in ``[0, 1]``; a trailing channel axis of size 1 is
        dropped. Colour images, images smaller than 8 px, and features that come out NaN or
        zero are refused with an :class:`EmbedError` (naming the image by ``ids`` if given).
        """
        import torch

        x = _grey_stack(images)
        out = np.zeros((len(x), self.dim), np.float32)
        with torch.no_grad():
            for start in range(0, len(x), self.batch_size):
                chunk = torch.tensor(x[start:start + self.batch_size])  # a copy: x may be read-only
                batch = chunk.unsqueeze(1).to(torch.float32).div_(255.0)  # [B, 1, H, W] in [0, 1]
                if self._preprocess is not None:
                    batch = torch.stack([self._preprocess(image) for image in batch])
                batch = self._view(batch)
                out[start:start + len(chunk)] = self.model(batch.to(self.device)).float().cpu().numpy()
        return _unit_rows(out, ids)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray Data ``map_batches``: shard rows in, ``image_id, patient_id, study_id, embedding`` out."""
        from msk.core.io.dataset import images_from_table

        if self.rois is not None:
            keep = [i for i, image_id in enumerate(batch.column("image_id").to_pylist())
                    if image_id in self.rois]
            batch = batch.take(pa.array(keep, pa.int64()))
        if batch.num_rows == 0:
            return embeddings_schema(self.dim).empty_table()
        images = images_from_table(batch)
        ids = batch.column("image_id").to_pylist()
        if self.rois is not None:
            boxes = [map_source_box(self.rois[i], (sh, sw), images.shape[1], self.resize)
                     for i, sh, sw in zip(ids, batch.column("source_height").to_pylist(),
                                          batch.column("source_width").to_pylist())]
            images = roi_crops(images, boxes, self.info.image_size, margin=self.roi_margin, ids=ids)
        features = self.embed_images(images, ids=ids)
        return embeddings_table(batch.select(list(ID_COLUMNS)), features)


def _grey_stack(images: Any) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3 and x.shape[-1] in (3, 4) and min(x.shape[:2]) >= _MIN_SIDE:
        raise EmbedError(f"got an array of shape {x.shape}: one colour image [H, W, C]? The "
                         f"encoders take grey images [N, H, W]; convert to grey first")
    if x.ndim == 4:
        raise EmbedError(f"images have {x.shape[-1]} channels (shape {x.shape}); the encoders "
                         f"take grey images [N, H, W]")
    if x.ndim != 3:
        raise EmbedError(f"images must be grey [N, H, W] or one [H, W]; got shape {x.shape}")
    if min(x.shape[1:]) < _MIN_SIDE:
        raise EmbedError(f"images of {x.shape[1]}x{x.shape[2]} px are too small to embed "
                         f"(at least {_MIN_SIDE} px per side); is the channel axis last?")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all() or x.min(initial=0) < 0 or x.max(initial=0) > 1:
            raise EmbedError("float images must be finite and in [0, 1]")
        return np.rint(x * 255).astype(np.uint8)
    raise EmbedError(f"images must be uint8 or floats in [0, 1]; got dtype {x.dtype}")


def _unit_rows(x: np.ndarray, ids: Sequence[str] | None) -> np.ndarray:
    def name(i: int) -> str:
        return f"image {ids[i]!r}" if ids is not None else f"image {i}"

    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise EmbedError(f"the encoder gave NaN or infinite features for {len(bad)} image(s), "
                         f"first {name(int(bad[0]))}: is the checkpoint corrupt or diverged?")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if len(zero):
        raise EmbedError(f"the encoder gave an all-zero feature vector for {len(zero)} image(s), "
                         f"first {name(int(zero[0]))}; it has no direction to compare")
    return (x / norms).astype(np.float32)


# -- regions of interest -----------------------------------------------------------------------


#: Lesion boxes in source pixels -> shard pixels (one implementation, next to the resize).
map_source_box = map_box_to_square


def roi_crops(images: np.ndarray, boxes: Sequence[Sequence[float]], size: int, *,
              margin: float = 0.15, ids: Sequence[str] | None = None) -> np.ndarray:
    """``uint8 [N, size, size]``: each image's square lesion region (box + ``margin``) resized.

    ``boxes`` are in the images' own pixel coordinates (see :func:`map_source_box`).
    """
    from msk.core.data.roi import RoiError, lesion_crop

    if len(boxes) != len(images):
        raise EmbedError(f"{len(boxes)} lesion boxes for {len(images)} images")
    out = np.zeros((len(images), size, size), np.uint8)
    for i, (image, box) in enumerate(zip(images, boxes)):
        try:
            out[i] = lesion_crop(image, box, size, margin=margin)
        except RoiError as exc:
            who = f"image {ids[i]!r}" if ids is not None else f"image {i}"
            raise EmbedError(f"{who}: {exc}") from None
    return out


def read_rois(source: str | os.PathLike | Any) -> dict[str, tuple[float, float, float, float]]:
    """Lesion boxes ``image_id -> (x0, y0, x1, y1)`` (source-image pixels) from a CSV or Parquet
    file, or a DataFrame, with columns ``image_id, x0, y0, x1, y1`` (other columns are ignored;
    rows without a box are skipped)."""
    import pandas as pd

    if isinstance(source, pd.DataFrame):
        df, where = source, "lesion boxes"
    else:
        path = Path(source)
        if not path.is_file():
            raise EmbedError(f"lesion box file {path} does not exist")
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        where = str(path)
    missing = [c for c in ("image_id", "x0", "y0", "x1", "y1") if c not in df.columns]
    if missing:
        raise EmbedError(f"{where}: missing column(s) {', '.join(missing)}")
    df = df.dropna(subset=["x0", "y0", "x1", "y1"])
    if df["image_id"].duplicated().any():
        raise EmbedError(f"{where}: image {df['image_id'][df['image_id'].duplicated()].iloc[0]!r} "
                         f"has two boxes; give one box per image")
    return {str(r.image_id): (float(r.x0), float(r.y0), float(r.x1), float(r.y1))
            for r in df.itertuples(index=False)}


# -- the embeddings file -----------------------------------------------------------------------


def embeddings_schema(dim: int, info: EncoderInfo | None = None) -> pa.Schema:
    """Schema of ``embeddings.parquet`` for ``dim``-d vectors (``info`` as schema metadata)."""
    schema = pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string()),
        pa.field("study_id", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
    ])
    if info is not None:
        schema = schema.with_metadata({META_KEY: json.dumps(info.to_json()).encode()})
    return schema


def embeddings_table(ids: pa.Table | Mapping[str, Sequence[Any]], features: np.ndarray,
                     info: EncoderInfo | None = None) -> pa.Table:
    """An embeddings table from id columns (``image_id``, ``patient_id``, ``study_id``) and vectors."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    n, dim = features.shape
    column = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), pa.float32()), dim)
    if isinstance(ids, pa.Table):
        ids = {name: ids.column(name).to_pylist() for name in ID_COLUMNS}
    arrays = [pa.array(list(ids[name]), pa.string()) for name in ID_COLUMNS]
    if any(len(a) != n for a in arrays):
        raise EmbedError(f"{n} vectors but {[len(a) for a in arrays]} ids")
    return pa.Table.from_arrays([*arrays, column], schema=embeddings_schema(dim, info))


def read_embeddings(path: str | os.PathLike) -> pa.Table:
    """An embeddings table written by :func:`embed` (``OUT`` or ``OUT/embeddings.parquet``).

    Checks the schema: the id columns and a ``fixed_size_list<float32>`` embedding column.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    file = path / EMBEDDINGS_FILE if path.is_dir() else path
    if not file.is_file():
        raise EmbedError(f"{file}: no embeddings file; run `msk embed` first")
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowException) as exc:
        raise EmbedError(f"{file}: not a readable Parquet file ({exc})") from None
    check_embeddings(table, str(file))
    info = encoder_info(table)
    if info and info.get("checkpoint"):  # stored relative to the file's folder: make it absolute
        info["checkpoint"] = str(resolve_stored(info["checkpoint"], file.parent))
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               META_KEY: json.dumps(info).encode()})
    return table


def _stored(info: EncoderInfo, folder: Path) -> EncoderInfo:
    """``info`` with its checkpoint relative to ``folder``, as written into an artefact there."""
    return dataclasses.replace(info, checkpoint=store_path(info.checkpoint, folder))


def check_embeddings(table: pa.Table, where: str = "embeddings") -> int:
    """Raise :class:`EmbedError` unless ``table`` has the embeddings columns; returns the dim."""
    missing = [c for c in (*ID_COLUMNS, "embedding") if c not in table.column_names]
    if missing:
        raise EmbedError(f"{where}: missing column(s) {', '.join(missing)}; columns are "
                         f"{table.column_names}")
    kind = table.schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type)):
        raise EmbedError(f"{where}: column 'embedding' must be fixed_size_list<float32>, got {kind}")
    return kind.list_size


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as ``float32 [N, D]``."""
    dim = check_embeddings(table)
    column = table.column("embedding").combine_chunks()
    if column.null_count:
        raise EmbedError(f"{column.null_count} rows have no embedding")
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(column), dim)


def encoder_info(table: pa.Table) -> dict[str, Any] | None:
    """The encoder description stored in an embeddings table's schema metadata, if any."""
    raw = (table.schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else None


# -- the Ray Data job --------------------------------------------------------------------------


@dataclass
class EmbedReport:
    """Outcome of :func:`embed`."""

    out: Path
    n_images: int
    dim: int
    seconds: float
    info: EncoderInfo

    @property
    def file(self) -> Path:
        return self.out / EMBEDDINGS_FILE


@contextlib.contextmanager
def _ray_data_settings() -> Iterator[None]:
    """Ordered output (rows in shard order: reproducible files), no Ray progress bars."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start
    level = logging.getLogger("ray.data").level
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        logging.getLogger("ray.data").setLevel(level)


def embed(ingest_dir: str | os.PathLike, checkpoint_or_encoder: str | os.PathLike | Any,
          out: str | os.PathLike, config: EmbedConfig | None = None, *,
          rois: Mapping[str, Sequence[float]] | None = None, progress: bool = True) -> EmbedReport:
    """Embed the committed images of the ingest output ``ingest_dir`` into ``out``.

    :param checkpoint_or_encoder: an msk checkpoint (DeepCluster or trained classifier) or an
        ``nn.Module`` (then ``config.image_size`` is required).
    :param rois: ``image_id -> (x0, y0, x1, y1)`` lesion boxes in source-image pixels: embed
        only these images, each from its lesion region (see the module docstring).
    :return: an :class:`EmbedReport`; the table is ``read_embeddings(out)``.

    ``config.engine`` says where the encoder runs (the module docstring says why): ``local``
    (this process; the shards are read ``batch_size`` rows at a time, so memory stays flat at
    any size) or ``ray`` (Ray Data actors).
    """
    import pyarrow.parquet as pq

    from msk.core.io.dataset import read_shards

    started = time.perf_counter()
    config = config or EmbedConfig()
    engine = config.resolved_engine()
    ingest_dir, out = Path(ingest_dir), Path(out)
    resize = ingest_resize(ingest_dir)
    kwargs: dict[str, Any] = dict(image_size=config.image_size, batch_size=config.batch_size,
                                  use_gpu=config.use_gpu, encoder_options=config.encoder_options, rois=rois,
                                  roi_margin=config.roi_margin, resize=resize)
    # Load once here: a bad checkpoint fails before any worker starts, and gives the dim; the
    # local engine embeds with it.
    embedder = Embedder(checkpoint_or_encoder, **{**kwargs, "use_gpu": config.use_gpu and engine == "local"})
    info = embedder.info
    total = read_shards(ingest_dir, columns=["image_id"]).num_rows
    if rois is not None:
        total = min(total, len(rois))
    settings = contextlib.nullcontext() if engine == "local" else _ray_data_settings()
    out.mkdir(parents=True, exist_ok=True)
    schema = embeddings_schema(info.dim, _stored(info, out))  # checkpoint relative to OUT (msk.core.io.paths)
    tmp = out / f".{EMBEDDINGS_FILE}.tmp"
    n = 0
    with settings, _progress(progress) as bar:
        task = bar.add_task("embed", total=total)
        if engine == "local":
            batches = _local_batches(ingest_dir, embedder, config.batch_size)
        else:
            batches = _ray_batches(ingest_dir, checkpoint_or_encoder, kwargs, config)
        try:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                for batch in batches:
                    if batch.num_rows:
                        writer.write_table(batch.cast(schema))
                        n += batch.num_rows
                        bar.update(task, completed=n)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    os.replace(tmp, out / EMBEDDINGS_FILE)
    report = EmbedReport(out, n, info.dim, time.perf_counter() - started, info)
    if rois is not None and n < len(rois):
        logging.getLogger(__name__).warning(
            "%d of %d lesion boxes name images that are not in %s", len(rois) - n, len(rois), ingest_dir)
    summary = {"msk_version": _version(), "ingest": store_path(ingest_dir, out), "n_images": n,
               "seconds": round(report.seconds, 3), "encoder": _stored(info, out).to_json(),
               "config": config.model_dump(mode="json")}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return report


def _local_batches(ingest_dir: Path, embedder: Embedder, batch_size: int) -> Iterator[pa.Table]:
    """Embeddings tables of the committed shards, ``batch_size`` shard rows at a time, in shard order."""
    import pyarrow.parquet as pq

    from msk.core.io.manifest import committed_shards

    for shard in committed_shards(ingest_dir):
        for rows in pq.ParquetFile(shard).iter_batches(batch_size=batch_size, columns=_SHARD_COLUMNS):
            yield embedder(pa.Table.from_batches([rows]))


def _ray_batches(ingest_dir: Path, source: Any, kwargs: dict[str, Any], config: EmbedConfig) -> Iterator[pa.Table]:
    """Embeddings tables from ``config.concurrency`` :class:`Embedder` actors on Ray Data, in shard
    order (Ray is started and its resources checked now, before anything is written)."""
    import ray
    from ray.data import ActorPoolStrategy

    from msk.core.io.dataset import ray_dataset
    from msk.core.runtime.ray_start import start_ray

    start_ray(include_dashboard=False, log_to_driver=False)
    _check_resources(config, ray.cluster_resources())
    dataset = ray_dataset(ingest_dir, columns=_SHARD_COLUMNS).map_batches(
        Embedder, fn_constructor_args=(source,), fn_constructor_kwargs=kwargs,
        batch_size=config.batch_size, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=config.concurrency), num_cpus=config.num_cpus,
        num_gpus=1 if config.use_gpu else 0)
    return iter(dataset.iter_batches(batch_format="pyarrow", batch_size=None))


def _check_resources(config: EmbedConfig, resources: Mapping[str, float]) -> None:
    """Refuse an actor pool that would leave the cluster no whole CPU to read shards (it would hang).
    Each node needs one too: docs/scale.md, "Checked against a 2-node run"."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if config.use_gpu and gpus < config.concurrency:
        raise EmbedError(f"use_gpu with concurrency={config.concurrency} needs "
                         f"{config.concurrency} GPUs; the Ray cluster has {gpus:g}")
    reserved = config.concurrency * config.num_cpus
    if reserved > cpus - 1:  # a Ray Data read task takes a whole CPU (bench/embed.py --cluster hung without one)
        raise EmbedError(
            f"concurrency={config.concurrency} actors x num_cpus={config.num_cpus:g} reserve "
            f"{reserved:g} of the cluster's {cpus:g} CPUs and leave less than the whole CPU a read "
            f"task needs; lower concurrency or num_cpus (e.g. num_cpus=0.5)")


def _progress(enabled: bool):
    from msk.core.runtime.progress import progress_bar

    return progress_bar(enabled, "images")


def _version() -> str:
    from msk import __version__

    return __version__
