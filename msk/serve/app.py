"""The msk HTTP API on Ray Serve: one FastAPI ingress in front of four model deployments.

::

    HTTP proxy (Serve) -> Gateway (FastAPI: auth, limits, upload decoding, errors)
                           |-> SorterDeployment      /v1/sort       (@serve.batch)
                           |-> RecommenderDeployment /v1/recommend  (@serve.batch)
                           |-> ClassifierDeployment  /v1/classify   (@serve.batch)
                           '-> SegmenterDeployment   /v1/segment    (@serve.batch)

**The chain.** A classifier or recommender trained on lesion crops needs the lesion: the
request's box (``metadata.box`` / ``?box=``, pixels of the uploaded image), else the
segmenter's (when one is configured), else the request is refused (422 ``box_required``).
Every answer says which it used (``input``: ``box``, ``segmented`` or ``whole_image``) and the
box, in the uploaded image's pixels.

The gateway decodes every upload with the ingest's reader and squares it as the ingest did
(:mod:`msk.serve.inputs`); only the pixels travel on to a model replica. Model calls have a
timeout (``call_timeout_s``, 504) and a replica that died answers 503 ``model_unavailable``
until Serve has replaced it. Routes:

=========================  ====  =========================================================
``GET /healthz``           open  the gateway is up
``GET /readyz``            open  every configured model answers (503 ``not_ready`` if not)
``GET /v1/models``         auth  what each model is (classes, input size, k, ...)
``POST /v1/sort``          auth  image -> top-k regions (``?k=``, ``?gradcam=true``)
``POST /v1/recommend``     auth  image -> k similar previous patients + entity vote (``?k=``)
``POST /v1/classify``      auth  image + metadata JSON -> entity probabilities (``?gradcam=true``)
``POST /v1/segment``       auth  image -> lesion mask (PNG, base64) and box
``/docs``, ``/openapi.json`` open  the OpenAPI schema
=========================  ====  =========================================================

Entry points: :func:`serve_main` (``msk serve CONFIG``), :func:`build_app` (the ``import_path``
of a Ray Serve config file, ``serve run msk/serve/serve.example.yaml``) and
:func:`application` (a bound application for ``serve.run``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator, Mapping
from os import PathLike
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.security import HTTPBearer
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from msk.core.config import load_config
from msk.core.data.squaring import SquaringConfig, map_box_from_square, map_box_to_square
from msk.core.errors import ConfigError, MskError
from msk.core.runtime import shutdown
from msk.core.runtime.ray_start import start_ray
from msk.serve.auth import BearerAuth, read_clients, resolve_token_digest
from msk.serve.config import ReplicaConfig, ServeConfig, check_paths
from msk.serve.errors import ApiError, install_error_handlers
from msk.serve.inputs import (
    BOX_RULE,
    RAW_TYPES,
    ClinicalMetadata,
    Radiograph,
    box_is_ordered,
    decode_radiograph,
    parse_metadata,
    read_upload,
)
from msk.serve.replica import Rejection
from msk.serve.schemas import (
    ClassifyResponse,
    ErrorResponse,
    Health,
    Ready,
    RecommendResponse,
    SegmentResponse,
    SortResponse,
)

__all__ = ["API_VERSION", "PROXY_ENV", "REPLICA_ENV", "AccessLog", "Gateway", "ModelClients", "ServeError",
           "application", "build_app", "create_api", "direct_ingress_environment", "serve_environment", "serve_main"]

API_VERSION = "v1"
#: Endpoint name (route and deployment method) -> the model's name (its config section).
ENDPOINTS = {"sort": "sorter", "recommend": "recommender", "classify": "classifier", "segment": "segmenter"}
READY_TIMEOUT_S = 5.0
#: Ray Serve settings of every msk replica (its ``runtime_env``): user code and the handles' router
#: run on the replica's own event loop instead of two extra threads, which saves a thread hop per
#: request and per handle call (blocking work already runs in ``asyncio.to_thread``: decoding,
#: forward passes, Grad-CAM); log lines go to the replica's log file under the session's
#: ``logs/serve/`` only, not to its stderr too (see docs/performance.md#serving).
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
               "RAY_SERVE_LOG_TO_STDERR": "0"}
#: What Ray needs in its environment when ``msk serve`` starts it (:func:`serve_environment`):
#: the same for Serve's HTTP proxy, gRPC from the proxy to the gateway instead of Ray actor
#: calls, and worker processes at the server's own priority. Ray runs its workers at ``nice 15``
#: by default; on a busy machine every replica and the proxy then lose the CPU to any other
#: process (the sorter's forward pass took 26 ms instead of 21 ms at load 15).
PROXY_ENV = {**REPLICA_ENV, "RAY_SERVE_PROXY_USE_GRPC": "1", "RAY_worker_niceness": "0"}

logger = logging.getLogger("ray.serve.msk")
access_logger = logging.getLogger("ray.serve.msk.access")


class ServeError(MskError):
    """The application could not be started."""


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    return RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError


# -- the ingress --------------------------------------------------------------------------------


class ModelClients:
    """The model deployments behind the gateway: calls with a timeout, failures as :class:`ApiError`.

    :param handles: endpoint name (``sort``, ``recommend``, ``classify``, ``segment``) -> deployment handle
        (anything whose ``handle.method.remote(*args)`` is awaitable) of the configured models.
    """

    def __init__(self, handles: Mapping[str, Any], call_timeout_s: float):
        self.handles = {name: _direct(handle) for name, handle in handles.items()}
        self.call_timeout_s = float(call_timeout_s)

    def __iter__(self) -> Iterator[str]:
        return iter(self.handles)

    async def call(self, model: str, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """``method(*args)`` of the ``model`` deployment; a :class:`Rejection` is raised as its error."""
        handle = self.handles.get(model)
        if handle is None:
            raise ApiError(503, "not_configured", f"this server has no {ENDPOINTS.get(model, model)} "
                           f"(/{API_VERSION}/{model})")
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        try:
            result = await asyncio.wait_for(getattr(handle, method).remote(*args), timeout_s)
        except TimeoutError:
            raise ApiError(504, "timeout", f"the {ENDPOINTS[model]} did not answer within {timeout_s:g} s") from None
        except _unavailable_errors() as exc:
            logger.warning("%s unavailable (%s)", ENDPOINTS[model], type(exc).__name__)
            raise ApiError(503, "model_unavailable", f"the {ENDPOINTS[model]} is restarting or overloaded; retry "
                           "shortly", headers={"Retry-After": "2"}) from None
        if isinstance(result, Rejection):
            raise ApiError(result.status, result.code, result.message)
        return result


def _direct(handle: Any) -> Any:
    """A deployment handle that calls its replica over gRPC with plain pickle (no object store,
    no cloudpickle: the arguments are a small square image and plain values); other objects
    (test doubles) unchanged."""
    if not isinstance(handle, DeploymentHandle):
        return handle
    return handle.options(_by_reference=False, request_serialization="pickle", response_serialization="pickle")


def serve_environment(config: ServeConfig | None = None) -> None:
    """Put :data:`PROXY_ENV` into this process's environment (unless set) before Ray starts here,
    so that the Serve proxy Ray starts inherits it; with ``ingress: direct``, also Serve's direct
    ingress on ``config.host:config.port`` (the gateway replica's own HTTP server)."""
    for key, value in PROXY_ENV.items():
        os.environ.setdefault(key, value)
    if config is not None and config.ingress == "direct":
        os.environ.update(direct_ingress_environment(config))


def direct_ingress_environment(config: ServeConfig) -> dict[str, str]:
    """Ray Serve's direct ingress with its port range narrowed to ``config.port`` (the range's
    upper end is exclusive), so the one gateway replica listens where the config says. Serve holds
    a stopping direct-ingress replica open for 30 s so that a load balancer in front can
    deregister it; with none in front (``msk serve`` on one node) that only delays the shutdown,
    so the hold is 0: the replica still finishes its requests in flight
    (``gateway.graceful_shutdown_timeout_s``). For the same reason a released port is not
    quarantined (Serve's default keeps it from the next replica for 30 s or more), so a
    restarted or redeployed gateway replica takes the port back at once."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DEFAULT_HTTP_HOST": config.host,
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(config.port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(config.port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0", "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def _listening(host: str, port: int, timeout_s: float = 10.0) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds within ``timeout_s``."""
    import socket

    address = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((address, port), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


@serve.deployment(name="gateway")
@serve.ingress()
class Gateway:
    """The FastAPI ingress deployment; each replica builds its app in :meth:`__serve_build_asgi_app__`.

    :param settings: ``call_timeout_s``, ``max_upload_bytes``, ``preprocess`` (a
        :class:`SquaringConfig` dump), ``token_digest`` (``None``: no authentication),
        ``debug_routes`` and ``lesion_input`` (endpoint -> true when its model was trained on
        lesion crops).
    :param sorter, recommender, classifier, segmenter: handles of the configured model deployments.
    """

    def __init__(self, settings: dict[str, Any], sorter: DeploymentHandle | None = None,
                 recommender: DeploymentHandle | None = None, classifier: DeploymentHandle | None = None,
                 segmenter: DeploymentHandle | None = None):
        self.settings = settings
        handles = {"sort": sorter, "recommend": recommender, "classify": classifier, "segment": segmenter}
        self.models = ModelClients({n: h for n, h in handles.items() if h is not None}, settings["call_timeout_s"])

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.settings, self.models)


def _upload_body(with_metadata: bool) -> dict[str, Any]:
    """OpenAPI request body of an image endpoint (the route reads the body itself)."""
    properties: dict[str, Any] = {"image": {"type": "string", "format": "binary",
                                            "description": "DICOM, PNG or JPEG file (the content decides)"}}
    if with_metadata:
        properties["metadata"] = {"type": "string", "contentMediaType": "application/json",
                                  "contentSchema": ClinicalMetadata.model_json_schema(),
                                  "example": '{"sex": "F", "age": 15, "site": "femur", "view": "frontal"}'}
    content: dict[str, Any] = {"multipart/form-data": {"schema": {
        "type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}}}
    if not with_metadata:
        content.update({t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(RAW_TYPES)})
    return {"requestBody": {"required": True, "content": content}}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in {
        400: "malformed request", 401: "missing or invalid Bearer token", 413: "body above max_upload_bytes",
        415: "not an accepted content type, or not DICOM/PNG/JPEG",
        422: "unreadable image (with its quarantine reason), invalid metadata or parameters",
        500: "internal error", 503: "model not configured or unavailable", 504: "model timeout"}.items()}


def create_api(settings: Mapping[str, Any], models: ModelClients) -> FastAPI:
    """The FastAPI app of one gateway replica (see :class:`Gateway` for ``settings``)."""
    import msk

    preprocess = SquaringConfig.model_validate(settings["preprocess"])

    decoding = asyncio.Semaphore(int(settings.get("max_concurrent_decodes") or 2))

    async def radiograph(data: bytes) -> Radiograph:
        """Decode an upload as the ingest would (in a thread: DICOM decoding is CPU work), at most
        ``max_concurrent_decodes`` at once per gateway replica, so that a burst of uploads that
        each decode to ``max_pixels`` cannot exhaust its memory."""
        async with decoding:
            return await asyncio.to_thread(decode_radiograph, data, preprocess)

    lesion_input = dict(settings.get("lesion_input") or {})

    async def lesion(image: Radiograph, box: tuple[float, float, float, float] | None,
                     endpoint: str) -> tuple[tuple[float, ...] | None, str, tuple[float, ...] | None]:
        """``(box in the square image, input kind, box in the upload's pixels)`` for ``endpoint``'s model."""
        if not lesion_input.get(endpoint):
            return None, "whole_image", None
        if box is not None:
            return map_box_to_square(box, image.source_shape, preprocess.image_size, preprocess.resize), "box", box
        if "segment" not in models:
            raise ApiError(422, "box_required", f"the {ENDPOINTS[endpoint]} was trained on lesion crops: send the "
                           "lesion box, or serve a segmenter with it")
        found = await models.call("segment", "segment", image.pixels)
        source = map_box_from_square(found["box"], image.source_shape, preprocess.image_size, preprocess.resize)
        return tuple(found["box"]), "segmented", tuple(round(v, 1) for v in source)

    api = FastAPI(title="msk", version=msk.__version__,
                  summary="Musculoskeletal radiograph models: anatomical sorter, similar-patient "
                          "recommender, image + metadata classifier, lesion segmenter.")
    install_error_handlers(api, max_body_bytes=int(settings["max_upload_bytes"]))
    auth = BearerAuth(settings.get("token_digest"), settings.get("clients_file"))
    dependencies = [Depends(auth)]
    if auth.enabled:
        dependencies.insert(0, Depends(HTTPBearer(auto_error=False, description="the MSK_SERVE_TOKEN or a "
                                                                                "named client's token")))
    api.add_middleware(AccessLog, count=_request_counter())
    v1 = APIRouter(prefix=f"/{API_VERSION}", dependencies=[*dependencies, Depends(single_parameters)],
                   responses=ERROR_RESPONSES)

    @api.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> dict[str, str]:
        """The gateway is up (says nothing about the models: see /readyz)."""
        return {"status": "ok"}

    @api.get("/readyz", response_model=Ready, tags=["health"], responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict[str, Any]:
        """Every configured model answers within a few seconds."""
        names = list(models)
        results = await asyncio.gather(*(models.call(n, "describe", timeout_s=READY_TIMEOUT_S) for n in names),
                                       return_exceptions=True)
        failed = [f"{n} ({r.code})" for n, r in zip(names, results) if isinstance(r, ApiError)]
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, ApiError):
                raise r
        if failed:
            raise ApiError(503, "not_ready", f"not ready: {', '.join(failed)}")
        return {"status": "ready", "models": {n: "ready" for n in names}}

    @v1.get("/models", tags=["models"])
    async def list_models() -> dict[str, Any]:
        """What each configured model is: classes, input size, k, vocabulary."""
        names = list(models)
        described = await asyncio.gather(*(models.call(n, "describe") for n in names))
        return {"preprocess": preprocess.model_dump(mode="json", exclude={"ingest"}),
                "models": dict(zip(names, described))}

    @v1.post("/sort", response_model=SortResponse, response_model_exclude_none=True, tags=["models"],
             openapi_extra=_upload_body(False))
    async def sort(request: Request, k: int | None = Query(None, ge=1, le=100, description="regions to return"),
                   gradcam: bool = Query(False, description="add a Grad-CAM PNG of the top region")) -> Any:
        """Anatomical region of a radiograph: the top-k regions with probabilities."""
        image = await radiograph((await read_upload(request)).data)
        return await models.call("sort", "sort", image.pixels, k, gradcam)

    @v1.post("/recommend", response_model=RecommendResponse, response_model_exclude_none=True, tags=["models"],
             openapi_extra=_upload_body(False))
    async def recommend(request: Request, k: int | None = Query(None, ge=1, le=100, description="neighbours"),
                        box: str | None = Query(None, description="lesion box x0,y0,x1,y1 in pixels of the "
                                                                  "uploaded image (for lesion-crop recommenders)",
                                                pattern=r"^\s*[0-9.eE+-]+(\s*,\s*[0-9.eE+-]+){3}\s*$")) -> Any:
        """The k most similar previous patients' images (pseudonymised ids) and their entity vote."""
        lesion_box = parse_box(box)
        image = await radiograph((await read_upload(request)).data)
        square, used, source = await lesion(image, lesion_box, "recommend")
        answer = await models.call("recommend", "recommend", image.pixels, k, square)
        return {**answer, "input": used, "box": source}

    @v1.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True, tags=["models"],
             openapi_extra=_upload_body(True))
    async def classify(request: Request, gradcam: bool = Query(False, description="add a Grad-CAM PNG")) -> Any:
        """Entity probabilities of a lesion from the radiograph and the patient's clinical metadata."""
        upload = await read_upload(request)
        metadata = parse_metadata(upload.metadata)
        image = await radiograph(upload.data)
        square, used, source = await lesion(image, metadata.box, "classify")
        answer = await models.call("classify", "classify", image.pixels, square, metadata.model_dump(), gradcam)
        return {**answer, "input": used, "box": source}

    @v1.post("/segment", response_model=SegmentResponse, tags=["models"], openapi_extra=_upload_body(False))
    async def segment(request: Request) -> Any:
        """The lesion: its mask (PNG, the uploaded image's size) and bounding box; 422 no_lesion_found
        when no pixel reaches the segmenter's threshold."""
        image = await radiograph((await read_upload(request)).data)
        found = await models.call("segment", "segment", image.pixels)
        return await asyncio.to_thread(segment_answer, found, image, preprocess)

    if settings.get("debug_routes"):
        @v1.post("/debug/crash/{model}", tags=["debug"], include_in_schema=False)
        async def crash(model: str) -> dict[str, str]:
            """Kill the model's replica process (tests of recovery)."""
            try:
                await models.call(model, "crash")
            except ApiError as exc:
                if exc.code != "model_unavailable":  # the expected outcome: the replica died
                    raise
            return {"status": "crashed", "model": model}

        @v1.post("/debug/stall/{model}", tags=["debug"], include_in_schema=False)
        async def stall(model: str, seconds: float = Query(..., gt=0, le=600)) -> dict[str, str]:
            """A model call that takes ``seconds`` (tests of the timeout)."""
            return {"status": await models.call(model, "stall", seconds)}

    api.include_router(v1)
    return api


class AccessLog:
    """Pure ASGI middleware: one line per /v1 request with the client name, route template,
    status and latency (no PHI: never the path's values, headers, file names or bodies), and the
    ``msk_requests`` metric. (Starlette's ``@app.middleware("http")`` would run every request
    through an extra task and memory streams.)"""

    def __init__(self, app: Any, count: Any):
        self.app, self.count = app, count

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(f"/{API_VERSION}/"):
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def tracking_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            client = (scope.get("state") or {}).get("client", "unauthenticated")
            access_logger.info("client=%s route=%s %s status=%d ms=%.1f", client, scope.get("method"), route,
                               status, (time.perf_counter() - began) * 1000)
            self.count(client, route, status)


def _request_counter():
    """``count(client, route, status)``: Ray Serve's ``msk_requests`` counter (per client, route and
    status, exported with Serve's metrics), or a no-op outside a Ray worker."""
    try:
        from ray.serve.metrics import Counter

        counter = Counter("msk_requests", description="msk API requests by client, route and status",
                          tag_keys=("client", "route", "status"))
    except Exception:  # noqa: BLE001 - no Ray here (tests of the app alone): count nothing
        return lambda *_: None

    def count(client: str, route: str, status: int) -> None:
        try:
            counter.inc(tags={"client": client, "route": route, "status": str(status)})
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            pass

    return count


async def single_parameters(request: Request) -> None:  # async: FastAPI would run a def in a thread
    """Refuse a query parameter given twice (``?k=1&k=100``: which one would the caller mean?)."""
    names = [name for name, _ in request.query_params.multi_items()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ApiError(422, "invalid_request", f"query parameter(s) {', '.join(repeated)} given more than once; "
                       "give each once")


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """The ``?box=x0,y0,x1,y1`` query value (pixels of the uploaded image), checked like ``metadata.box``."""
    if text is None:
        return None
    try:  # the pattern lets "1.2.3" and "1e999" through
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise ApiError(422, "invalid_request", f"box must be four numbers x0,y0,x1,y1; {BOX_RULE}") from None
    if not box_is_ordered((x0, y0, x1, y1)):
        raise ApiError(422, "invalid_request", BOX_RULE)
    return x0, y0, x1, y1


def segment_answer(found: dict[str, Any], image: Radiograph, preprocess: SquaringConfig) -> dict[str, Any]:
    """The segmenter's mask and box (square-image pixels) on the uploaded image: box, PNG, area."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from msk.core.io.masks import mask_from_square

    mask = mask_from_square(found["mask"], image.source_shape, preprocess.resize)
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG", optimize=True)
    box = map_box_from_square(found["box"], image.source_shape, preprocess.image_size, preprocess.resize)
    return {"box": tuple(round(v, 1) for v in box), "mask_png": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "height": int(mask.shape[0]), "width": int(mask.shape[1]),
            "lesion_fraction": float(mask.mean()), "threshold": float(found["threshold"])}


# -- building and starting ------------------------------------------------------------------------


def _options(config: ReplicaConfig) -> dict[str, Any]:
    """``Deployment.options`` of a gateway or model config. Serve's own per-call access log is off:
    the proxy logs every HTTP request and the gateway writes msk's access line for each /v1
    request (:class:`AccessLog`); a second and third line per request in the replicas cost
    about 0.5 ms of CPU each."""
    gpus = 1 if getattr(config, "use_gpu", False) else 0
    return {"num_replicas": config.replicas, "max_ongoing_requests": config.max_ongoing_requests,
            "health_check_period_s": config.health_check_period_s,
            "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": min(0.5, config.graceful_shutdown_timeout_s or 0.5),
            "logging_config": {"enable_access_log": False},
            "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": gpus,
                                  "runtime_env": {"env_vars": dict(REPLICA_ENV)}}}


def application(config: ServeConfig):
    """The bound Serve application of ``config``, after checking every path and model.

    Raises :class:`ConfigError` (missing checkpoint, index or segmenter run, classes that do not
    fit, no token) before anything is deployed.
    """
    from msk.serve.classifier import ClassifierDeployment, load_classifier_model
    from msk.serve.recommender import RecommenderDeployment, inspect_recommender
    from msk.serve.segmenter import SegmenterDeployment, inspect_segmenter
    from msk.serve.sorter import SorterDeployment, inspect_sorter

    config = check_paths(config)
    digest = resolve_token_digest(config.token_file, insecure=config.insecure,
                                  named_clients=config.clients_file is not None)
    clients = None if config.insecure or config.clients_file is None else str(config.clients_file)
    if clients is not None:
        read_clients(clients)  # a malformed file fails here, naming its line
    preprocess = config.preprocess.model_dump(mode="json")
    bound: dict[str, Any] = {}
    lesion_input = {"recommend": False, "classify": False}
    if config.sorter is not None:
        inspect_sorter(config.sorter)
        bound["sorter"] = SorterDeployment.options(**_options(config.sorter)).bind(
            config.sorter.model_dump(mode="json"), config.debug_routes)
    if config.recommender is not None:
        lesion_input["recommend"] = inspect_recommender(config.recommender)["roi_margin"] is not None
        bound["recommender"] = RecommenderDeployment.options(**_options(config.recommender)).bind(
            config.recommender.model_dump(mode="json"), config.debug_routes)
    if config.classifier is not None:
        load_classifier_model(config.classifier, config.preprocess)  # fails here, not in a replica
        lesion_input["classify"] = config.classifier.roi is not None
        bound["classifier"] = ClassifierDeployment.options(**_options(config.classifier)).bind(
            config.classifier.model_dump(mode="json"), preprocess, config.debug_routes)
    if config.segmenter is not None:
        inspect_segmenter(config.segmenter)
        bound["segmenter"] = SegmenterDeployment.options(**_options(config.segmenter)).bind(
            config.segmenter.model_dump(mode="json"), config.debug_routes)
    settings = {"call_timeout_s": config.call_timeout_s, "max_upload_bytes": config.max_upload_bytes,
                "preprocess": preprocess, "token_digest": digest, "clients_file": clients,
                "debug_routes": config.debug_routes,
                "lesion_input": lesion_input, "max_concurrent_decodes": config.gateway.max_concurrent_decodes}
    return Gateway.options(**_options(config.gateway)).bind(settings, **bound)


def build_app(args: dict[str, Any]):
    """Application builder for Ray Serve config files (``import_path: msk.serve.app:build_app``);
    ``args`` are the keys of :class:`ServeConfig`."""
    try:
        config = ServeConfig.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid msk serve args: {problems}") from None
    return application(config)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def serve_main(config_path: str | PathLike | None, *, insecure: bool = False, host: str | None = None,
               port: int | None = None, blocking: bool = True) -> str:
    """``msk serve CONFIG``: check the config, start Ray and Serve locally, deploy, and wait.

    :param insecure: serve without authentication (a loud warning says so).
    :param host, port: override the config's ``host``/``port``.
    :param blocking: wait until Ctrl-C or SIGTERM, then shut Serve down (the CLI then shuts
        Ray down, see :mod:`msk.core.runtime.shutdown`); ``False`` returns at once
        (Serve keeps running in this Ray session: ``ray.serve.shutdown()`` stops it).
    :return: the base URL, e.g. ``http://127.0.0.1:8000``.
    """
    config = load_config(ServeConfig, config_path, host=host, port=port, insecure=True if insecure else None)
    app = application(config)
    serve_environment(config)  # before Ray starts: the proxy and replicas inherit it
    start_ray(include_dashboard=False, configure_logging=False)  # quiet unless msk -v; keeps the SIGTERM handler
    url = f"http://{config.host}:{config.port}"
    try:  # a signal during start-up stops the server like one while it serves
        serve.start(proxy_location="HeadOnly", http_options={
            "host": config.host, "port": config.serve_proxy_port, "request_timeout_s": config.request_timeout_s})
        started = time.perf_counter()
        try:
            serve.run(app, name=config.app_name, route_prefix="/", blocking=False)
        except Exception as exc:  # noqa: BLE001 - Serve raises RuntimeError and others; say where to look
            raise ServeError(f"the {config.app_name!r} application did not start: {str(exc).splitlines()[0]} "
                             "(the replica logs under the Ray session's logs/serve/ say why)") from exc
        if config.ingress == "direct" and not _listening(config.host, config.port):
            raise ServeError(f"ingress: direct: nothing listens on {config.host}:{config.port} after the start; "
                             "with a Ray cluster started elsewhere, export "
                             f"{' '.join(f'{k}={v}' for k, v in direct_ingress_environment(config).items())} "
                             "before `ray start`, or use ingress: proxy")
        logger.info("msk serve: %s ready in %.1f s", url, time.perf_counter() - started)
        if blocking:
            _console().print(f"[bold green]msk serve[/] on {url} ({', '.join(config.models)}); "
                             f"API docs: {url}/docs. Ctrl-C or SIGTERM stops.")
            while True:
                time.sleep(3600)
    except (KeyboardInterrupt, shutdown.Interrupted) as exc:
        if not blocking:
            raise
        shutdown.begin_shutdown()  # bounded: everything is gone within 10 s
        _console().print(f"msk serve: {shutdown.Interrupted(shutdown.signal_of(exc))}; shutting down")
    finally:
        if blocking:
            serve.shutdown()
    return url

