"""Typed configuration of ``msk serve``: which models answer which endpoint, and how.

One YAML file (or the ``args`` of the application in a Ray Serve config file, see
``msk/serve/serve.example.yaml``) holds a :class:`ServeConfig`::

    preprocess: {ingest: out/ingest}          # decode + square exactly as this ingest did
    sorter: {checkpoint: out/sorter}          # /v1/sort
    recommender: {path: out/recommender}      # /v1/recommend
    classifier:                               # /v1/classify
      checkpoint: out/fusion/best.pt
      metadata_encoder: out/fusion/metadata_encoder.json
    segmenter: {run: out/segmenter}           # /v1/segment, and the lesion box of box-less requests

A model left out has no replica; its endpoint answers 503 ``not_configured``. Relative paths
are read from the config file's folder (:func:`msk.core.config.load_config`). Every path is
checked by :func:`check_paths` before anything starts, so a typo fails at start-up with the
field and the path, not in a replica log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from msk.core.config import MskConfig
from msk.core.data.squaring import SquaringConfig
from msk.core.errors import ConfigError

__all__ = [
    "ClassifyConfig", "GatewayConfig", "ModelConfig", "RecommendConfig",
    "ReplicaConfig", "RoiConfig", "SegmentConfig", "ServeConfig", "SortConfig", "check_paths",
]

MiB = 1 << 20


class ReplicaConfig(MskConfig):
    """Ray Serve options of one deployment."""

    replicas: int = Field(1, ge=1, description="number of replicas")
    num_cpus: float = Field(0.5, ge=0, description="logical CPUs Ray reserves per replica")
    max_ongoing_requests: int = Field(32, ge=1, description="requests a replica works on at once")
    health_check_period_s: float = Field(10.0, gt=0, description="how often Serve checks a replica is alive")
    graceful_shutdown_timeout_s: float = Field(
        2.0, ge=0, description="on shutdown (Ctrl-C, SIGTERM), longest wait for a replica's requests in flight; "
                               "the whole server stops within 10 s with the defaults")


class ModelConfig(ReplicaConfig):
    """Options shared by the three model deployments."""

    max_batch_size: int = Field(8, ge=1, description="@serve.batch: requests per forward pass (1: no batching)")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="@serve.batch: longest wait to fill a batch")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per replica")
    use_gpu: bool = Field(False, description="one GPU per replica")


class SortConfig(ModelConfig):
    """``/v1/sort``: the anatomical sorter."""

    checkpoint: Path = Field(description="a sorter run folder (sorter.json, fold-k/best.pt: the fold "
                                         "ensemble) or one classifier checkpoint (.pt)")
    classes: list[str] | None = Field(None, description="class names of a single checkpoint, in output "
                                                        "order; default: the checkpoint's, else samx-regions")
    top_k: int = Field(3, ge=1, description="regions returned when the request does not say")


class RecommendConfig(ModelConfig):
    """``/v1/recommend``: similar previous patients and a vote on their entity."""

    path: Path = Field(description="a saved recommender folder (msk.core.models.recommender)")
    encoder: Path | None = Field(None, description="encoder checkpoint; default: the one the index was built with")
    k: int | None = Field(None, ge=1,
                          description="neighbours when the request does not say; default: the recommender's")


class RoiConfig(MskConfig):
    """Lesion crops: the request's metadata gives the lesion ``box`` (uploaded-image pixels)."""

    margin: float = Field(0.15, ge=0, description="margin on each side, a fraction of the lesion's longer side")
    size: int = Field(64, ge=8, description="side of the crop (the fusion run's roi_size)")


class ClassifyConfig(ModelConfig):
    """``/v1/classify``: radiograph + clinical metadata -> entity probabilities."""

    checkpoint: Path = Field(description="a trained classifier checkpoint "
                                         "(msk.core.models.train / msk.core.stages.fusion.training)")
    metadata_encoder: Path | None = Field(None, description="the fitted MetadataEncoder (JSON) of a fusion model")
    head: str | None = Field(None, description="fusion head the model was trained with (`msk plugins fusion_head`); "
                                               "None: as the checkpoint records (a linear head if none)")
    hidden: list[int] | None = Field(None, min_length=1, description="metadata MLP widths of the fusion "
                                     "head; None: as the checkpoint records, else [64, 32]")
    dropout: float | None = Field(None, ge=0, lt=1, description="None: as the checkpoint records, else 0.2")
    classes: list[str] | None = Field(None, description="entity names in output order; default: the "
                                                        "checkpoint's, else entity_set's")
    entity_set: str | None = Field(None, description="registry entity set naming the classes")
    roi: RoiConfig | None = Field(None, description="classify the lesion crop around metadata.box")


class SegmentConfig(ModelConfig):
    """``/v1/segment``: the lesion segmenter. When it is configured, ``/v1/classify`` and
    ``/v1/recommend`` requests without a lesion box use its box for models trained on lesion crops."""

    run: Path = Field(description="a `msk train segmenter` run folder (segmenter.json, fold-k/best.pt: the "
                                  "fold ensemble)")
    threshold: float | None = Field(None, gt=0, lt=1, description="lesion probability threshold; default: "
                                                                  "the run's")


class GatewayConfig(ReplicaConfig):
    """The HTTP ingress (FastAPI) deployment; it decodes uploads, so give it CPU too."""

    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per gateway replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests one gateway replica handles at once")
    max_concurrent_decodes: int = Field(2, ge=1, description="uploads decoded at once per gateway replica; each "
                                        "can take up to ~8 bytes x preprocess.max_pixels of memory")


class ServeConfig(MskConfig):
    """Options of ``msk serve`` (YAML keys of its config file)."""

    host: str = Field("127.0.0.1", description="address the HTTP server listens on")
    port: int = Field(8000, ge=1, le=65535, description="port the HTTP server listens on")
    ingress: Literal["proxy", "direct"] = Field(
        "proxy", description="who answers host:port. proxy: Serve's HTTP proxy, which forwards each request to a "
        "gateway replica (any number of them). direct: the gateway replica itself (Serve's direct ingress, "
        "experimental in Ray), one process hop and one body round trip fewer per request; needs "
        "gateway.replicas: 1 (docs/serve.md, 'Direct ingress')")
    proxy_port: int | None = Field(None, ge=1, le=65535, description="ingress: direct only: the port of Serve's "
                                   "own proxy, which Serve still starts on host (default: port + 1)")
    request_timeout_s: float = Field(60.0, gt=0, description="Serve's end-to-end HTTP timeout (a backstop)")
    call_timeout_s: float = Field(30.0, gt=0, description="longest wait for a model's answer (504 after)")
    max_upload_bytes: int = Field(64 * MiB, ge=1024, description="larger request bodies are refused (413)")
    token_file: Path | None = Field(None, description="file holding the Bearer token (env MSK_SERVE_TOKEN wins)")
    clients_file: Path | None = Field(None, description="named clients, one 'NAME SHA256' line each (python -m "
                                      "msk.serve.auth add NAME FILE); re-read when it changes")
    insecure: bool = Field(False, description="no authentication at all (never on a network)")
    debug_routes: bool = Field(False, description="/v1/debug/{crash,stall}/{model}: for tests only")
    app_name: str = Field("msk", description="Ray Serve application name")
    preprocess: SquaringConfig = Field(default_factory=SquaringConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    sorter: SortConfig | None = None
    recommender: RecommendConfig | None = None
    classifier: ClassifyConfig | None = None
    segmenter: SegmentConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if not self.models:
            raise ValueError("no model to serve: configure at least one of sorter, recommender, classifier, "
                             "segmenter")
        if self.ingress == "direct" and self.gateway.replicas != 1:
            raise ValueError(f"ingress: direct serves host:port from one gateway replica; gateway.replicas is "
                             f"{self.gateway.replicas} (use ingress: proxy to run several)")
        if self.ingress == "direct" and self.serve_proxy_port == self.port:
            raise ValueError(f"proxy_port ({self.proxy_port}) must differ from port ({self.port})")
        if self.call_timeout_s >= self.request_timeout_s:
            raise ValueError(f"call_timeout_s ({self.call_timeout_s:g}) must be below request_timeout_s "
                             f"({self.request_timeout_s:g}), or Serve's timeout fires first")
        return self

    @property
    def serve_proxy_port(self) -> int:
        """The port of Serve's HTTP proxy: ``port``, or with ``ingress: direct`` ``proxy_port``
        (default ``port + 1``), the gateway replica holding ``port`` itself."""
        if self.ingress == "proxy":
            return self.port
        return self.proxy_port or (self.port + 1 if self.port < 65535 else self.port - 1)

    @property
    def models(self) -> dict[str, ModelConfig]:
        """The configured models by endpoint name (``sort``, ``recommend``, ``classify``, ``segment``)."""
        named = {"sort": self.sorter, "recommend": self.recommender, "classify": self.classifier,
                 "segment": self.segmenter}
        return {name: cfg for name, cfg in named.items() if cfg is not None}


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(path).expanduser().absolute()


def check_paths(config: ServeConfig) -> ServeConfig:
    """A copy of ``config`` with absolute paths, every one checked to exist.

    Raises :class:`~msk.core.errors.ConfigError` naming the field and the path; replicas run in
    other processes (and other working directories), so relative paths are resolved here.
    """
    def need(field: str, path: Path | None, kind: Literal["file", "dir", "any"]) -> Path | None:
        path = _absolute(path)
        if path is None:
            return None
        if not path.exists():
            fix = {"token_file": "; write the bearer token into it (chmod 600), or set MSK_SERVE_TOKEN and "
                                 "drop token_file"}.get(field, "; relative paths in a serve config are read "
                                                               "from the config file's folder")
            raise ConfigError(f"{field}: {path} does not exist{fix}")
        if kind == "file" and not path.is_file():
            raise ConfigError(f"{field}: {path} is not a file")
        if kind == "dir" and not path.is_dir():
            raise ConfigError(f"{field}: {path} is not a folder")
        return path

    update: dict = {"token_file": need("token_file", config.token_file, "file"),
                    "clients_file": need("clients_file", config.clients_file, "file")}
    pre = config.preprocess.model_copy(update={"ingest": need("preprocess.ingest", config.preprocess.ingest, "dir")})
    update["preprocess"] = pre.resolved()
    if config.sorter is not None:
        update["sorter"] = config.sorter.model_copy(
            update={"checkpoint": need("sorter.checkpoint", config.sorter.checkpoint, "any")})
    if config.recommender is not None:
        update["recommender"] = config.recommender.model_copy(update={
            "path": need("recommender.path", config.recommender.path, "dir"),
            "encoder": need("recommender.encoder", config.recommender.encoder, "file")})
    if config.classifier is not None:
        update["classifier"] = config.classifier.model_copy(update={
            "checkpoint": need("classifier.checkpoint", config.classifier.checkpoint, "file"),
            "metadata_encoder": need("classifier.metadata_encoder", config.classifier.metadata_encoder, "file")})
    if config.segmenter is not None:
        update["segmenter"] = config.segmenter.model_copy(
            update={"run": need("segmenter.run", config.segmenter.run, "dir")})
    return config.model_copy(update=update)
