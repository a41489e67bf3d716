"""``msk serve``: the HTTP API on Ray Serve, end to end on 127.0.0.1.

Serve starts once for the module with all three models (trained here in seconds: a tiny CNN
on 32 px bars, a flat-index recommender over its embeddings, a concat fusion model); the tests
then drive it over HTTP with httpx: happy paths (PNG, DICOM, raw body), the error contract,
PHI, a replica crash and a bounded load test. Config and token checks run without Serve.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import statistics
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from msk.core.config import load_config
from msk.core.errors import ConfigError
from msk.serve.auth import TOKEN_ENV, BearerAuth, InsecureServingWarning, resolve_token_digest, token_digest
from msk.serve.config import ServeConfig
from msk.serve.errors import ApiError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-" + "x" * 24
REGIONS = ["femur", "tibia", "humerus"]  # bar classes 0, 1, 2 of bars()
ENTITIES = ["osteochondroma", "osteosarcoma"]
SITES = ["femur", "tibia", "humerus"]
SOURCE, SQUARE = 64, 32  # uploaded image side; the "ingest" square the models were trained on
CALL_TIMEOUT_S = 5.0
SEG_THRESHOLD = 0.4


# -- inputs -------------------------------------------------------------------------------------


def bars(n: int, seed: int = 0, size: int = SOURCE) -> tuple[np.ndarray, np.ndarray]:
    """Three classes: a horizontal bar, a vertical bar, a bright square (on noise)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(n, size, size)).astype(np.uint8)
    labels = np.arange(n) % 3
    for img, y in zip(images, labels):
        o = rng.integers(size // 8, size - size // 3)
        if y == 0:
            img[o:o + size // 8, 4:-4] = 220
        elif y == 1:
            img[4:-4, o:o + size // 8] = 220
        else:
            img[o:o + size // 3, o:o + size // 3] = 220
    return images, labels


def squares(images: np.ndarray) -> np.ndarray:
    """The training images: what the ingest (and so the server) makes of the uploads."""
    from msk.core.data.squaring import square_image

    return np.stack([square_image(im / 255.0, SQUARE) for im in images])


def pillow_file(image: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format)
    return buffer.getvalue()


def png(image: np.ndarray) -> bytes:
    return pillow_file(image, "PNG")


def jpeg(image: np.ndarray) -> bytes:
    return pillow_file(image, "JPEG")


def dicom(image: np.ndarray, phi: str = "Doe^Jane") -> bytes:
    """An 8-bit CR DICOM whose window maps 0..255 to [0, 1] exactly as PNG decoding does."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "CR", phi, f"{phi}-ID"
    ds.InstitutionName, ds.PatientBirthDate = f"{phi} hospital", "19700101"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = image.tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


IMAGES, LABELS = bars(6, seed=99)  # query images, not trained on
HORIZONTAL = IMAGES[0]
#: Query images for the "unknown" answer: the bars and three images unlike them.
PROBES = np.concatenate([IMAGES, np.stack([np.full((SOURCE, SOURCE), 128, np.uint8),
                                           np.indices((SOURCE, SOURCE)).sum(0).astype(np.uint8) % 2 * 255,
                                           np.random.default_rng(5).integers(0, 256, (SOURCE, SOURCE), np.uint8)])])
META = {"sex": "F", "age": 15, "site": "femur", "view": "frontal"}


# -- models and server ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, one_torch_thread) -> dict[str, Path]:
    """Sorter checkpoint and a one-fold run folder of it with an ``unknown`` threshold between
    the scores of :data:`PROBES`, recommender folder, fusion checkpoint + metadata encoder,
    token file."""
    import pandas as pd

    from msk.core.data.metadata import MetadataEncoder, MetadataSchema
    from msk.core.models.embed import Embedder, embeddings_table
    from msk.core.models.recommender import Recommender
    from msk.core.models.train import TrainConfig, fit_classifier
    from msk.core.stages.fusion.training import fit_fusion

    root = tmp_path_factory.mktemp("serve")
    images, labels = bars(60)
    x = squares(images)
    train = TrainConfig(encoder="tiny-cnn", image_size=SQUARE, epochs=3, batch_size=16, lr=5e-3, augment=False)
    sorter = fit_classifier(x, labels, 3, train, out=root / "sorter").best
    sorter_run = sorter_run_folder(root / "sorter-run", sorter)

    embedder = Embedder(sorter)
    ids = {"image_id": [f"img-{i:03d}" for i in range(len(x))],
           "patient_id": [f"pat-{i // 2:03d}" for i in range(len(x))],
           "study_id": [f"std-{i // 2:03d}" for i in range(len(x))]}
    table = embeddings_table(ids, embedder.embed_images(x), embedder.info)
    Recommender.build(table, [REGIONS[y] for y in labels], retriever="flat", k=3).save(root / "recommender")

    frame = pd.DataFrame({"image_id": ids["image_id"], "sex": ["F", "M"] * 30,
                          "age": np.linspace(5, 70, 60), "site": [SITES[y] for y in labels],
                          "view": ["frontal", "lateral"] * 30})
    encoder = MetadataEncoder(MetadataSchema(sites=SITES)).fit(frame)
    encoder.save(root / "metadata_encoder.json")
    fusion = fit_fusion(x, labels % 2, encoder.transform(frame), 2, train, out=root / "fusion",
                        head="concat", hidden=(8,), dropout=0.1).best

    segmenter = bar_segmenter(x, root / "segmenter")

    token = root / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    return {"root": root, "sorter": sorter, "sorter_run": sorter_run, "recommender": root / "recommender",
            "fusion": fusion, "segmenter": segmenter,
            "metadata_encoder": root / "metadata_encoder.json", "token": token}


def bar_segmenter(images: np.ndarray, out: Path) -> Path:
    """A `msk train segmenter` run (2 folds, tiny U-Net) whose lesion is the bright bar or square."""
    from msk.core.stages.segmentation.training import SegmentationData, SegmenterConfig, train_segmenter

    n = len(images)
    data = SegmentationData(images, images >= 128, ["lesion"] * n, [f"pat-{i // 2:03d}" for i in range(n)],
                            [f"img-{i:03d}" for i in range(n)])
    config = SegmenterConfig(encoder="tu-resnet10t", segmenter_options={"encoder_depth": 3,
                             "decoder_channels": [16, 8, 4]}, image_size=SQUARE, epochs=20, batch_size=8, folds=2,
                             test_size=0.2, num_workers=0, augment=False, lr=3e-3)
    train_segmenter(data, config, out=out)
    return out


def probe_scores(checkpoint: Path) -> np.ndarray:
    """The msp score of each of :data:`PROBES` under the sorter ``checkpoint``."""
    from msk.core.models.ood import ood_score
    from msk.core.models.train import load_model, predict_logits

    return ood_score(predict_logits(load_model(checkpoint)[0], squares(PROBES), image_size=SQUARE), "msp")


def sorter_run_folder(run: Path, checkpoint: Path) -> Path:
    """A one-fold sorter run of ``checkpoint`` whose threshold splits the probes' scores at
    their widest gap (some probes known, some unknown)."""
    import shutil

    scores = np.sort(probe_scores(checkpoint))
    gap = int(np.argmax(np.diff(scores)))
    threshold = float(scores[gap:gap + 2].mean())
    (run / "fold-1").mkdir(parents=True)
    shutil.copy(checkpoint, run / "fold-1" / "best.pt")
    (run / "sorter.json").write_text(json.dumps({
        "classes": REGIONS, "folds": 1, "image_size": SQUARE,
        "unknown": {"score": "msp", "threshold": threshold, "keep": 0.95, "n_images": 9, "kept": 0.9}}))
    return run


def serve_config(files: dict[str, Path], port: int) -> dict:
    replica = {"num_cpus": 0.25, "health_check_period_s": 1.0}
    return {
        "port": port, "call_timeout_s": CALL_TIMEOUT_S, "request_timeout_s": 30, "max_upload_bytes": 1 << 20,
        "token_file": str(files["token"]), "debug_routes": True,
        "preprocess": {"image_size": SQUARE, "resize": "pad"},
        "gateway": {"num_cpus": 0.25},
        "sorter": {"checkpoint": str(files["sorter_run"]), "classes": REGIONS, **replica},
        "recommender": {"path": str(files["recommender"]), **replica},
        "classifier": {"checkpoint": str(files["fusion"]), "metadata_encoder": str(files["metadata_encoder"]),
                       "head": "concat", "hidden": [8], "dropout": 0.1, "classes": ENTITIES,
                       "roi": {"size": SQUARE}, **replica},
        "segmenter": {"run": str(files["segmenter"]), "threshold": SEG_THRESHOLD, **replica},
    }


@pytest.fixture(scope="module")
def server(ray_session, model_files) -> str:
    """Serve running the three models on 127.0.0.1 (started once for the module)."""
    from ray import serve

    from msk.serve.app import serve_main

    path = model_files["root"] / "serve.yaml"
    path.write_text(yaml.safe_dump(serve_config(model_files, _free_port())))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(TOKEN_ENV, raising=False)  # the token file's token, not one from the environment
        url = serve_main(path, blocking=False)
    yield url
    serve.shutdown()


@pytest.fixture
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


def post_image(client: httpx.Client, route: str, data: bytes, *, metadata: dict | str | None = None,
               filename: str = "image", **params) -> httpx.Response:
    form = None if metadata is None else {"metadata": metadata if isinstance(metadata, str) else json.dumps(metadata)}
    return client.post(route, files={"image": (filename, data, "application/octet-stream")}, data=form,
                       params=params)


def assert_error(response: httpx.Response, status: int, code: str, reason: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if reason is not None:
        assert error["reason"] == reason
    return error


# -- contract and health --------------------------------------------------------------------------


@pytest.mark.slow
def test_health_readiness_and_openapi(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["models"] == {"sort": "ready", "recommend": "ready",
                                                                    "classify": "ready", "segment": "ready"}
    schema = httpx.get(f"{server}/openapi.json").json()
    assert {"/v1/sort", "/v1/recommend", "/v1/classify", "/v1/segment", "/v1/models"} <= set(schema["paths"])
    assert not any(p.startswith("/v1/debug") for p in schema["paths"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    body = schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["image", "metadata"] and body["additionalProperties"] is False
    assert body["properties"]["metadata"]["contentSchema"]["properties"]["sex"]["enum"] == ["M", "F"]


@pytest.mark.slow
def test_models_describes_what_is_served(client):
    described = client.get("/v1/models").json()
    assert described["preprocess"]["image_size"] == SQUARE
    assert described["models"]["sort"]["classes"] == REGIONS
    assert described["models"]["sort"]["unknown"]["score"] == "msp"
    assert described["models"]["recommend"]["images"] == 60
    assert described["models"]["classify"]["sites"] == SITES
    assert described["models"]["classify"]["input"] == "lesion_crop"
    assert described["models"]["recommend"]["input"] == "whole_image"
    assert described["models"]["segment"]["threshold"] == SEG_THRESHOLD
    assert described["models"]["segment"]["folds"] == 2


# -- happy paths ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sort_png_dicom_and_raw_body_agree(client):
    by_png = post_image(client, "/v1/sort", png(HORIZONTAL), k=2)
    assert by_png.status_code == 200, by_png.text
    regions = by_png.json()["regions"]
    assert [r["name"] for r in regions][0] == "femur" and len(regions) == 2
    assert regions[0]["probability"] >= regions[1]["probability"] > 0
    by_dicom = post_image(client, "/v1/sort", dicom(HORIZONTAL), k=3).json()["regions"]
    raw = client.post("/v1/sort", content=dicom(HORIZONTAL), headers={"Content-Type": "application/dicom"})
    assert raw.json()["regions"] == by_dicom
    assert sum(r["probability"] for r in by_dicom) == pytest.approx(1.0, abs=1e-5)
    # the DICOM path is the ingest's reader + square: the same pixels as the PNG, the same answer
    for a, b in zip(regions, by_dicom):
        assert a["name"] == b["name"] and a["probability"] == pytest.approx(b["probability"], abs=1e-4)
    assert "gradcam_png" not in by_png.json()
    by_jpeg = client.post("/v1/sort", content=jpeg(HORIZONTAL), headers={"Content-Type": "image/jpeg"})
    assert by_jpeg.json()["regions"][0]["name"] == "femur"


@pytest.mark.slow
def test_sort_says_unknown_below_the_calibrated_threshold(client, model_files):
    threshold = json.loads((model_files["sorter_run"] / "sorter.json").read_text())["unknown"]["threshold"]
    expected = probe_scores(model_files["sorter"])
    answers = [post_image(client, "/v1/sort", png(im)).json() for im in PROBES]
    assert all(a["threshold"] == threshold and a["score_name"] == "msp" for a in answers)
    assert [a["score"] for a in answers] == pytest.approx(expected, abs=1e-4)
    assert [a["unknown"] for a in answers] == [bool(s < threshold) for s in expected]
    assert {a["unknown"] for a in answers} == {True, False}  # the threshold splits the probes
    for a in answers:  # unknown or not, the regions are still ranked
        assert a["score"] == pytest.approx(a["regions"][0]["probability"], abs=1e-4)


@pytest.mark.slow
def test_sort_predicts_every_bar_class(client):
    predicted = [post_image(client, "/v1/sort", png(im), k=1).json()["regions"][0]["name"] for im in IMAGES]
    assert sum(p == REGIONS[y] for p, y in zip(predicted, LABELS)) >= 5


@pytest.mark.slow
def test_gradcam_png_and_no_phi_in_responses_or_logs(client, ray_session):
    marker = f"Phi{uuid.uuid4().hex[:12]}"
    data = dicom(HORIZONTAL, phi=f"{marker}^Jane")
    responses = [post_image(client, "/v1/sort", data, filename=f"{marker}.dcm", gradcam="true"),
                 post_image(client, "/v1/recommend", data, filename=f"{marker}.dcm"),
                 post_image(client, "/v1/classify", data, metadata=META, filename=f"{marker}.dcm", gradcam="true"),
                 post_image(client, "/v1/sort", data[: len(data) // 2], filename=f"{marker}.dcm")]
    assert [r.status_code for r in responses] == [200, 200, 200, 422]
    for r in responses:
        assert marker not in r.text
    cam = Image.open(io.BytesIO(base64.b64decode(responses[0].json()["gradcam_png"])))
    assert cam.format == "PNG" and cam.size == (SQUARE, SQUARE) and cam.mode == "RGB"
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())
    time.sleep(1.0)  # let the replicas flush their log files
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and marker.encode() in p.read_bytes()]
    assert not leaked, f"PHI marker in Ray logs: {leaked}"


@pytest.mark.slow
def test_recommend_returns_pseudonymised_neighbours_and_a_vote(client):
    answer = post_image(client, "/v1/recommend", png(HORIZONTAL)).json()
    assert len(answer["neighbours"]) == 3  # the recommender's k
    assert answer["entity"] == "femur" and answer["confidence"] == answer["shares"]["femur"]
    assert sum(answer["shares"].values()) == pytest.approx(1.0)
    distances = [n["distance"] for n in answer["neighbours"]]
    assert distances == sorted(distances)
    for n in answer["neighbours"]:
        assert n["patient_id"].startswith("pat-") and n["study_id"].startswith("std-")
        assert n["image_id"].startswith("img-") and n["entity"] in REGIONS
    five = post_image(client, "/v1/recommend", dicom(HORIZONTAL), k=5).json()
    assert len(five["neighbours"]) == 5
    assert_error(post_image(client, "/v1/recommend", png(HORIZONTAL), k=4), 422, "invalid_request")


@pytest.mark.slow
def test_classify_image_and_metadata(client):
    answer = post_image(client, "/v1/classify", png(HORIZONTAL), metadata=META, gradcam="true").json()
    assert [e["name"] for e in answer["entities"]] in (ENTITIES, ENTITIES[::-1])
    assert sum(e["probability"] for e in answer["entities"]) == pytest.approx(1.0, abs=1e-5)
    assert answer["metadata_used"] is True and answer["gradcam_png"]
    other = post_image(client, "/v1/classify", dicom(HORIZONTAL), metadata={**META, "sex": "M", "age": None}).json()
    assert other["entities"] != answer["entities"]  # the metadata reaches the model
    # a lesion-crop classifier without a box asks the segmenter, and says so with the box it used
    assert answer["input"] == other["input"] == "segmented"
    x0, y0, x1, y1 = answer["box"]
    assert 0 <= x0 < x1 <= SOURCE and 0 <= y0 < y1 <= SOURCE
    boxed = post_image(client, "/v1/classify", png(HORIZONTAL), metadata={**META, "box": [4, 10, 40, 30]}).json()
    assert boxed["input"] == "box" and boxed["box"] == [4, 10, 40, 30]


@pytest.mark.slow
def test_segment_returns_the_lesion_in_the_uploaded_images_pixels(client):
    """The bar of a 64 px upload, segmented in the 32 px square: the mask comes back at 64 px and
    covers the bar; a blank image has no lesion (422 with the threshold)."""
    image = np.full((SOURCE, SOURCE), 20, np.uint8)
    image[20:28, 4:60] = 220  # a horizontal bar
    answer = post_image(client, "/v1/segment", png(image)).json()
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask_png"])))) > 0
    assert mask.shape == (answer["height"], answer["width"]) == (SOURCE, SOURCE)
    truth = image > 200
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.5, iou
    x0, y0, x1, y1 = answer["box"]
    assert y0 <= 21 and y1 >= 27 and x0 <= 10 and x1 >= 54
    assert answer["lesion_fraction"] == pytest.approx(mask.mean()) and answer["threshold"] == SEG_THRESHOLD
    blank = post_image(client, "/v1/segment", png(np.full((SOURCE, SOURCE), 20, np.uint8)))
    assert f"threshold {SEG_THRESHOLD:g}" in assert_error(blank, 422, "no_lesion_found")["message"]
    # the chain refuses the same way: never a crop of nothing
    assert_error(post_image(client, "/v1/classify", png(np.full((SOURCE, SOURCE), 20, np.uint8)), metadata=META),
                 422, "no_lesion_found")


# -- the error contract -----------------------------------------------------------------------------


@pytest.mark.slow
def test_unsupported_types_and_unreadable_images(client):
    assert_error(client.post("/v1/sort", content=b"hello", headers={"Content-Type": "text/plain"}),
                 415, "unsupported_media_type")
    assert_error(post_image(client, "/v1/sort", b"just some text, not an image"), 415,
                 "unsupported_media_type", reason="not_an_image")
    data = dicom(HORIZONTAL)
    assert_error(post_image(client, "/v1/sort", data[: len(data) - 1000]), 422, "unreadable_image", reason="corrupt")
    assert_error(post_image(client, "/v1/sort", b""), 422, "unreadable_image", reason="empty")
    assert_error(client.post("/v1/sort", files={"file": ("x", png(HORIZONTAL))}), 422, "invalid_request")
    assert_error(client.post("/v1/sort", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data"}),
                 400, "malformed_request")  # no boundary


@pytest.mark.slow
def test_oversize_uploads_are_refused(client):
    big = b"\0" * ((1 << 20) + 1)
    assert_error(post_image(client, "/v1/sort", big), 413, "payload_too_large")

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(40):
            yield b"\0" * 65536

    assert_error(client.post("/v1/sort", content=chunks(), headers={"Content-Type": "application/dicom"}),
                 413, "payload_too_large")


@pytest.mark.slow
def test_missing_or_invalid_token(server):
    assert_error(httpx.post(f"{server}/v1/sort", content=png(HORIZONTAL), headers={"Content-Type": "image/png"}),
                 401, "unauthorized")
    wrong = httpx.post(f"{server}/v1/sort", content=png(HORIZONTAL),
                       headers={"Content-Type": "image/png", "Authorization": "Bearer " + "y" * 40})
    assert_error(wrong, 401, "unauthorized")
    assert wrong.headers["www-authenticate"].startswith("Bearer")
    assert_error(httpx.get(f"{server}/v1/models", headers={"Authorization": f"Basic {TOKEN}"}), 401, "unauthorized")


@pytest.mark.slow
@pytest.mark.parametrize("metadata, fragment", [
    (None, "is required"),
    ("{sex: F}", "not valid JSON"),
    ({"sex": "X", "age": 15}, "sex"),
    ({"sex": "F", "age": 130}, "age"),
    ({"sex": "F", "site": "femur", "name": "Jane"}, "1 unknown key(s) (position 3)"),
    ({"sex": "F", "site": "skull"}, "vocabulary"),
])
def test_malformed_metadata(client, metadata, fragment):
    response = post_image(client, "/v1/classify", png(HORIZONTAL), metadata=metadata)
    assert fragment in assert_error(response, 422, "invalid_metadata")["message"]


@pytest.mark.slow
def test_bad_parameters_and_routes(client):
    assert_error(post_image(client, "/v1/sort", png(HORIZONTAL), k=0), 422, "invalid_request")
    assert_error(client.get("/v1/sort"), 405, "method_not_allowed")
    assert_error(client.get("/v2/sort"), 404, "not_found")


@pytest.mark.slow
def test_model_timeout_is_a_json_504(client):
    started = time.perf_counter()
    assert_error(client.post("/v1/debug/stall/sort", params={"seconds": CALL_TIMEOUT_S + 2}), 504, "timeout")
    assert time.perf_counter() - started < CALL_TIMEOUT_S + 2


# -- load and recovery ------------------------------------------------------------------------------


async def _load(url: str, n: int, concurrency: int, route: str = "/v1/sort",
                answers: list[dict] | None = None) -> tuple[list[int], list[float]]:
    """``n`` uploads of HORIZONTAL, ``concurrency`` at a time: their statuses and latencies (and,
    into ``answers`` when given, the JSON of each 200)."""
    data = png(HORIZONTAL)
    statuses, latencies = [], []
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        async def one() -> None:
            async with semaphore:
                began = time.perf_counter()
                r = await c.post(route, content=data, headers={"Content-Type": "image/png"})
                latencies.append(time.perf_counter() - began)
                statuses.append(r.status_code)
                if answers is not None and r.status_code == 200:
                    answers.append(r.json())
        await asyncio.gather(*(one() for _ in range(n)))
    return statuses, latencies


@pytest.mark.slow
def test_bounded_load(server):
    began = time.perf_counter()
    statuses, latencies = asyncio.run(_load(server, 500, 8))
    wall = time.perf_counter() - began
    assert statuses == [200] * 500
    p50, p99 = (1000 * float(np.percentile(latencies, q)) for q in (50, 99))
    print(f"\n/v1/sort load: 500 requests, 8 concurrent: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
          f"mean {1000 * statistics.mean(latencies):.1f} ms, {500 / wall:.1f} req/s")
    assert p99 < 1000 * CALL_TIMEOUT_S


@pytest.mark.slow
def test_replica_crash_mid_load_recovers(client, server):
    """The sorter's replica process dies (os._exit) under load: every request is answered, each 200
    with the answer the model gives before the crash, each other with a retryable JSON 503/504
    (none lost, hung or 500), and the replica is back within 60 s (issue 14 item 4)."""
    reference = post_image(client, "/v1/sort", png(HORIZONTAL)).json()
    answers: list[dict] = []

    async def scenario():
        load = asyncio.create_task(_load(server, 60, 4, answers=answers))
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            crashed = await c.post("/v1/debug/crash/sort", timeout=30)
        return crashed, await load

    crashed, (statuses, _) = asyncio.run(scenario())
    assert crashed.json() == {"status": "crashed", "model": "sort"}
    assert len(statuses) == 60 and set(statuses) <= {200, 503, 504}, statuses  # in flight at the crash: 503/504
    assert len(answers) == statuses.count(200) > 0
    for answer in answers:  # answered right, by the old replica or the new one
        assert [r["name"] for r in answer["regions"]] == [r["name"] for r in reference["regions"]]
        assert np.allclose([r["probability"] for r in answer["regions"]],
                           [r["probability"] for r in reference["regions"]], atol=1e-4)
        assert answer["unknown"] == reference["unknown"]
    print(f"\nsorter replica crashed under load: {len(statuses)} requests, "
          + ", ".join(f"{n} x {code}" for code, n in sorted(Counter(statuses).items())) + " (every 200 right)")
    deadline = time.monotonic() + 60
    while post_image(client, "/v1/sort", png(HORIZONTAL)).status_code != 200:
        assert time.monotonic() < deadline, "the sorter replica did not come back within 60 s"
        time.sleep(0.5)
    after = [post_image(client, "/v1/sort", png(HORIZONTAL)).status_code for _ in range(10)]
    assert after == [200] * 10


# -- start-up checks (no Serve) ---------------------------------------------------------------------


def test_missing_checkpoint_or_index_fails_at_startup(model_files, tmp_path, monkeypatch):
    from msk.serve.app import application

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    good = serve_config(model_files, 8000)
    cases = [("sorter", "checkpoint", tmp_path / "nope.pt", "sorter.checkpoint: .*nope.pt does not exist"),
             ("recommender", "path", tmp_path / "no-index", "recommender.path: .*no-index does not exist"),
             ("classifier", "metadata_encoder", tmp_path / "enc.json", "classifier.metadata_encoder: .*does not exist")]
    for section, key, path, match in cases:
        config = ServeConfig.model_validate({**good, section: {**good[section], key: str(path)}})
        with pytest.raises(ConfigError, match=match):
            application(config)
    (tmp_path / "empty").mkdir()
    config = ServeConfig.model_validate(
        {**good, "recommender": {**good["recommender"], "path": str(tmp_path / "empty")}})
    with pytest.raises(ConfigError, match="not a saved recommender"):
        application(config)
    config = ServeConfig.model_validate({**good, "classifier": {**good["classifier"], "hidden": [16]}})
    with pytest.raises(ConfigError, match=r"classifier.hidden=\[16\] but .* was trained with hidden=\[8\]"):
        application(config)
    for run, match in ((tmp_path / "no-run", "segmenter.run: .*no-run does not exist"),
                       (tmp_path / "empty", "empty is not a finished `msk train segmenter` run")):
        config = ServeConfig.model_validate({**good, "segmenter": {**good["segmenter"], "run": str(run)}})
        with pytest.raises(ConfigError, match=match):
            application(config)


def test_fusion_checkpoint_records_its_head_for_serving(model_files):
    """A fusion checkpoint carries head, hidden and dropout: the serve config need not repeat them;
    an older checkpoint without the record still needs them."""
    from msk.core.data.squaring import SquaringConfig
    from msk.core.io.checkpoint import load_checkpoint, save_checkpoint
    from msk.serve.classifier import load_classifier_model
    from msk.serve.config import ClassifyConfig

    preprocess = SquaringConfig(image_size=SQUARE, resize="pad")
    bare = ClassifyConfig(checkpoint=model_files["fusion"], metadata_encoder=model_files["metadata_encoder"],
                          classes=ENTITIES)
    model = load_classifier_model(bare, preprocess)
    ckpt = load_checkpoint(model_files["fusion"])
    assert ckpt.extra["architecture"]["head"] == "concat" and ckpt.extra["architecture"]["hidden"] == [8]
    assert model.model.architecture == ckpt.extra["architecture"]

    old = model_files["root"] / "old-fusion.pt"
    extra = {k: v for k, v in ckpt.extra.items() if k != "architecture"}
    save_checkpoint(old, model.model.encoder, arch=ckpt.arch, in_chans=ckpt.in_chans, config=ckpt.config,
                    epoch=ckpt.epoch, **extra)
    with pytest.raises(ConfigError, match="holds a fusion head; set classifier.head"):
        load_classifier_model(bare.model_copy(update={"checkpoint": old}), preprocess)
    explicit = bare.model_copy(update={"checkpoint": old, "head": "concat", "hidden": [8], "dropout": 0.1})
    assert load_classifier_model(explicit, preprocess).model.architecture["hidden"] == [8]


def test_sorter_run_folder_is_served_as_its_fold_ensemble(model_files, tmp_path):
    import shutil

    from msk.serve.config import SortConfig
    from msk.serve.sorter import load_sorter_model

    run = tmp_path / "sorter-run"
    for k in (1, 2):
        (run / f"fold-{k}").mkdir(parents=True)
        shutil.copy(model_files["sorter"], run / f"fold-{k}" / "best.pt")
    (run / "sorter.json").write_text(json.dumps({"classes": REGIONS, "folds": 2, "image_size": SQUARE}))
    ensemble = load_sorter_model(SortConfig(checkpoint=run))
    assert len(ensemble.models) == 2 and ensemble.classes == REGIONS
    probs = ensemble.predict_proba(squares(IMAGES[:1]))
    assert REGIONS[int(probs.argmax())] == "femur"
    # a run from before calibration has no threshold: never unknown, as before
    assert ensemble.unknown is None and "unknown" not in ensemble.predict(squares(PROBES))
    summary = (run / "sorter.json").read_text()
    (run / "sorter.json").write_text(json.dumps({"classes": REGIONS, "folds": 2, "image_size": SQUARE,
                                                 "unknown": {"score": "softmax", "threshold": 0.5}}))
    with pytest.raises(ConfigError, match=r"sorter.checkpoint: .*sorter.json: the 'unknown' calibration is "
                                          r"unreadable \(KeyError\('keep'\)\); rerun `msk train sorter`"):
        load_sorter_model(SortConfig(checkpoint=run))
    (run / "sorter.json").write_text(summary)
    with pytest.raises(ConfigError, match="sorter.classes contradicts"):
        load_sorter_model(SortConfig(checkpoint=run, classes=REGIONS[::-1]))
    (run / "fold-2" / "best.pt").unlink()
    with pytest.raises(ConfigError, match="lacks .*fold-2/best.pt"):
        load_sorter_model(SortConfig(checkpoint=run))
    with pytest.raises(ConfigError, match="3 outputs and no class names; list them in sorter.classes"):
        load_sorter_model(SortConfig(checkpoint=model_files["sorter"]))


def test_classifier_crops_the_lesion_and_checks_the_vocabulary(model_files):
    from msk.core.data.squaring import SquaringConfig
    from msk.serve.classifier import load_classifier_model
    from msk.serve.config import ClassifyConfig
    from msk.serve.replica import Rejection

    config = ClassifyConfig(checkpoint=model_files["fusion"], metadata_encoder=model_files["metadata_encoder"],
                            head="concat", hidden=[8], dropout=0.1, classes=ENTITIES, roi={"size": 24})
    classifier = load_classifier_model(config, SquaringConfig(image_size=SQUARE))
    image = squares(IMAGES[:1])[0]
    crop, meta = classifier.prepare(image, (2, 5, 20, 15), META)  # the box in the square image's pixels
    assert crop.shape == (24, 24) and crop.dtype == np.uint8 and meta.shape == (classifier.encoder.dim,)
    assert classifier.probabilities(crop[None], meta[None]).sum() == pytest.approx(1.0)
    refusals = [classifier.prepare(image, None, META),  # no box for a ROI model
                classifier.prepare(image, (100, 100, 120, 120), META),
                classifier.prepare(image, (2, 5, 20, 15), {**META, "site": "skull"})]
    assert [r.code for r in refusals] == ["box_required", "invalid_metadata", "invalid_metadata"]
    assert all(isinstance(r, Rejection) for r in refusals)
    assert "lesion crops" in refusals[0].message and "vocabulary" in refusals[2].message


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="no model to serve"):
        load_config(ServeConfig, None)
    with pytest.raises(ConfigError, match="call_timeout_s .* must be below request_timeout_s"):
        load_config(ServeConfig, None, sorter={"checkpoint": "x.pt"}, call_timeout_s=60, request_timeout_s=30)
    with pytest.raises(ConfigError, match=r"ingress: direct serves host:port from one gateway replica; "
                                          r"gateway.replicas is 2"):
        load_config(ServeConfig, None, sorter={"checkpoint": "x.pt"}, ingress="direct", gateway={"replicas": 2})
    with pytest.raises(ConfigError, match=r"proxy_port \(9000\) must differ from port \(9000\)"):
        load_config(ServeConfig, None, sorter={"checkpoint": "x.pt"}, ingress="direct", port=9000, proxy_port=9000)
    direct = load_config(ServeConfig, None, sorter={"checkpoint": "x.pt"}, ingress="direct", port=9000)
    assert (direct.serve_proxy_port, load_config(ServeConfig, None, sorter={"checkpoint": "x.pt"},
                                                 port=9000).serve_proxy_port) == (9001, 9000)
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    (ingest / "ingest.json").write_text(json.dumps({"config": {"image_size": 128, "resize": "stretch",
                                                               "max_pixels": 1000, "pixel_scrub": "off"}}))
    from msk.core.data.squaring import SquaringConfig

    assert SquaringConfig(ingest=ingest).resolved().model_dump(exclude={"ingest"}) == {
        "image_size": 128, "resize": "stretch", "max_pixels": 1000, "pixel_scrub": "off",
        "scrub_detector": "learned"}
    with pytest.raises(ConfigError, match="image_size: 256 here, 128 in"):
        SquaringConfig(ingest=ingest, image_size=256).resolved()


def test_a_served_grad_cam_shows_no_burned_in_name():
    """An upload with a patient's name burned into its pixels: the square image the gateway makes
    (and the Grad-CAM PNG drawn on it) has the name blanked, as the ingest blanks it; with
    ``pixel_scrub: off`` the name shows."""
    from msk.core.data.squaring import SquaringConfig
    from msk.serve.inputs import decode_radiograph
    from msk.serve.replica import gradcam_png

    from test_scrub import burn, marker_name, radiograph

    rng = np.random.default_rng(5)
    img = radiograph(rng, 320, 256)
    ink = burn(img, f"{marker_name(rng)} Anna\nSEG 03.2019", (6, 6), size=14, value=0.95)
    buffer = io.BytesIO()
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(buffer, format="PNG")
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    size, scale = 160, 160 / 320
    left = (size - round(256 * scale)) // 2  # "pad" centres the 256 px wide image
    region = (slice(int(rows[0] * scale), int(rows[-1] * scale) + 2),
              slice(int(cols[0] * scale) + left, int(cols[-1] * scale) + left + 2))
    cam = np.full((8, 8), 0.5, np.float32)
    detail = {}
    for mode in ("auto", "off"):
        square = decode_radiograph(buffer.getvalue(), SquaringConfig(image_size=size, pixel_scrub=mode)).pixels
        png = np.asarray(Image.open(io.BytesIO(base64.b64decode(gradcam_png(square, cam)))).convert("L"))
        x = png[region].astype(np.float32)
        detail[mode] = float(np.abs(4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2]
                                    - x[1:-1, 2:]).mean())
    assert detail["off"] > 5  # the name shows without scrubbing
    assert detail["auto"] < 0.2 * detail["off"]


def test_example_config_is_a_serve_config_file():
    from ray.serve.schema import ServeDeploySchema

    from msk.serve.app import build_app

    raw = yaml.safe_load((REPO / "msk" / "serve" / "serve.example.yaml").read_text())
    deploy = ServeDeploySchema.model_validate(raw)
    [app] = deploy.applications
    assert app.import_path == "msk.serve.app:build_app"
    config = ServeConfig.model_validate(app.args)
    assert set(config.models) == {"sort", "recommend", "classify", "segment"}
    assert config.request_timeout_s == raw["http_options"]["request_timeout_s"]
    assert callable(build_app)
    with pytest.raises(ConfigError, match="invalid msk serve args: sorter.top_k"):
        build_app({**app.args, "sorter": {**app.args["sorter"], "top_k": 0}})


def test_token_from_env_or_file_and_insecure_warns(tmp_path, monkeypatch):
    file = tmp_path / "token"
    file.write_text("file-token-0123456789\n")
    file.chmod(0o600)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert resolve_token_digest(file, insecure=False) == token_digest("file-token-0123456789")
    monkeypatch.setenv(TOKEN_ENV, "env-token-0123456789")
    assert resolve_token_digest(file, insecure=False) == token_digest("env-token-0123456789")
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(ConfigError, match="at least 16"):
        resolve_token_digest(None, insecure=False)
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(ConfigError, match="no API token: set MSK_SERVE_TOKEN or token_file"):
        resolve_token_digest(None, insecure=False)
    with pytest.warns(InsecureServingWarning, match="AUTHENTICATION IS DISABLED"):
        assert resolve_token_digest(None, insecure=True) is None


def test_bearer_auth_checks_the_digest():
    from starlette.requests import Request

    def request(header: str | None) -> Request:
        headers = [] if header is None else [(b"authorization", header.encode())]
        return Request({"type": "http", "headers": headers})

    auth = BearerAuth(token_digest(TOKEN))
    asyncio.run(auth(request(f"Bearer {TOKEN}")))
    for header in (None, "Bearer", f"bearer {TOKEN}x", f"Token {TOKEN}"):
        with pytest.raises(ApiError) as info:
            asyncio.run(auth(request(header)))
        assert info.value.status == 401
    asyncio.run(BearerAuth(None)(request(None)))  # insecure: everything passes


# -- the gateway's app without Serve (fake model handles) ----------------------------------------


class FakeHandle:
    """Stands in for a DeploymentHandle: ``handle.method.remote(*args)`` runs ``methods[method]``."""

    def __init__(self, **methods):
        self.methods = methods

    def __getattr__(self, method: str):
        fn = self.methods[method]
        return type("Method", (), {"remote": staticmethod(lambda *args: fn(*args))})


def gateway_client(handles: dict, *, token: str | None = TOKEN, timeout_s: float = 0.5,
                   lesion_input: dict[str, bool] | None = None, clients_file: Path | None = None):
    from starlette.testclient import TestClient

    from msk.serve.app import ModelClients, create_api

    settings = {"call_timeout_s": timeout_s, "max_upload_bytes": 1 << 20,
                "preprocess": {"image_size": SQUARE}, "debug_routes": False,
                "token_digest": None if token is None else token_digest(token), "lesion_input": lesion_input,
                "clients_file": None if clients_file is None else str(clients_file)}
    return TestClient(create_api(settings, ModelClients(handles, timeout_s)), raise_server_exceptions=False)


def test_gateway_failures_are_json_without_serve():
    from ray.exceptions import ActorDiedError

    async def leaks_phi(*_):
        raise RuntimeError("Doe^Jane's scan broke the model")

    async def died(*_):
        raise ActorDiedError()

    async def never(*_):
        await asyncio.sleep(60)

    body = {"content": png(HORIZONTAL), "headers": {"Content-Type": "image/png"}}
    with gateway_client({"sort": FakeHandle(sort=leaks_phi), "recommend": FakeHandle(recommend=died),
                         "classify": FakeHandle(classify=never)}, token=None) as c:
        internal = c.post("/v1/sort", **body)  # no token needed: insecure
        assert_error(internal, 500, "internal")
        assert "Doe" not in internal.text
        unavailable = c.post("/v1/recommend", **body)
        assert_error(unavailable, 503, "model_unavailable")
        assert unavailable.headers["retry-after"] == "2"
        assert_error(c.post("/v1/classify", files={"image": ("x", png(HORIZONTAL))},
                            data={"metadata": json.dumps(META)}), 504, "timeout")
        assert "securitySchemes" not in c.get("/openapi.json").json().get("components", {})
    authorized = {"content": png(HORIZONTAL), "headers": {"Content-Type": "image/png",
                                                          "Authorization": f"Bearer {TOKEN}"}}
    with gateway_client({}) as c:
        assert_error(c.post("/v1/sort", **body), 401, "unauthorized")
        assert_error(c.post("/v1/sort", **authorized), 503, "not_configured")
        assert c.get("/readyz").json() == {"status": "ready", "models": {}}


def test_the_gateway_gives_lesion_crop_models_a_box_or_refuses():
    """A recommender built from lesion crops gets the caller's box (mapped into the square image),
    else the segmenter's, else 422 box_required; whole-image models get no box. Fake models record
    what they were sent."""
    from msk.core.data.squaring import map_box_to_square
    from msk.serve.replica import Rejection

    sent = []

    async def recommend(pixels, k, box):
        sent.append(box)
        return {"entity": "femur", "confidence": 1.0, "shares": {"femur": 1.0}, "neighbours": []}

    async def segment(pixels):
        mask = np.zeros(pixels.shape, bool)
        mask[8:12, 2:30] = True
        return {"mask": mask, "box": [2.0, 8.0, 30.0, 12.0], "threshold": 0.5}

    async def no_lesion(pixels):
        return Rejection(422, "no_lesion_found", "the image: no lesion found: no pixel reaches the segmenter's "
                                                 "threshold 0.5 (highest lesion probability 0.1)")

    raw = {"content": png(HORIZONTAL), "headers": {"Content-Type": "image/png"}}
    crops = {"lesion_input": {"recommend": True}}
    with gateway_client({"recommend": FakeHandle(recommend=recommend)}, token=None, **crops) as c:
        refused = assert_error(c.post("/v1/recommend", **raw), 422, "box_required")
        assert "lesion crops" in refused["message"] and sent == []
        answer = c.post("/v1/recommend", params={"box": "4,10,40,30"}, **raw).json()
        assert answer["input"] == "box" and answer["box"] == [4, 10, 40, 30]
        assert sent[-1] == pytest.approx(map_box_to_square((4, 10, 40, 30), (SOURCE, SOURCE), SQUARE))
        for bad in ("40,10,4,30", "1,2,3", "a,b,c,d"):
            assert_error(c.post("/v1/recommend", params={"box": bad}, **raw), 422, "invalid_request")
    handles = {"recommend": FakeHandle(recommend=recommend), "segment": FakeHandle(segment=segment)}
    with gateway_client(handles, token=None, **crops) as c:
        answer = c.post("/v1/recommend", **raw).json()
        assert answer["input"] == "segmented" and sent[-1] == (2.0, 8.0, 30.0, 12.0)
        assert answer["box"] == [4.0, 16.0, 60.0, 24.0]  # the 32 px square's box on the 64 px upload
        segmented = c.post("/v1/segment", **raw).json()
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(segmented["mask_png"])))) > 0
        assert mask.shape == (SOURCE, SOURCE) and mask[16:24, 4:60].all() and mask.sum() == 8 * 56
    with gateway_client({"recommend": FakeHandle(recommend=recommend), "segment": FakeHandle(segment=no_lesion)},
                        token=None, **crops) as c:
        assert "threshold 0.5" in assert_error(c.post("/v1/recommend", **raw), 422, "no_lesion_found")["message"]
    with gateway_client({"recommend": FakeHandle(recommend=recommend)}, token=None) as c:  # whole-image index
        answer = c.post("/v1/recommend", params={"box": "4,10,40,30"}, **raw).json()
        assert answer["input"] == "whole_image" and "box" not in answer and sent[-1] is None


def test_hostile_requests_are_422_and_never_echo_client_text():
    """Defects a probe found: deep JSON nesting and 5,000-digit integers in the metadata were 500s,
    repeated fields and parameters were silently resolved (the last won), and unknown metadata keys
    were quoted back (a key can be a patient's name)."""
    calls = []

    async def classify(*args):
        calls.append(args)
        return {"entities": [{"name": "a", "probability": 1.0}], "metadata_used": False}

    image = ("x", png(HORIZONTAL), "image/png")
    with gateway_client({"classify": FakeHandle(classify=classify), "sort": FakeHandle(sort=classify)},
                        token=None) as c:
        def post(metadata: str, files=None, **params):
            return c.post("/v1/classify", files=files or {"image": image}, data={"metadata": metadata}, params=params)

        for text, fragment in (("[" * 1000 + "]" * 1000, "nested too deeply"),
                               ('{"sex": "F", "age": ' + "9" * 5000 + "}", "at most 4096"),
                               ('["F", 15]', "must be a JSON object"),
                               ('{"sex": "F", "Doe^Jane": 1}', "1 unknown key(s) (position 2)"),
                               (json.dumps({"sex": "F", "site": "x" * 5000}), "at most 4096")):
            error = assert_error(post(text), 422, "invalid_metadata")
            assert fragment in error["message"] and "Doe" not in error["message"]
        twice = c.post("/v1/classify", files=[("image", image), ("image", image)], data={"metadata": json.dumps(META)})
        assert "sent 2 times" in assert_error(twice, 422, "invalid_request")["message"]
        extra = c.post("/v1/classify", files={"image": image}, data={"metadata": json.dumps(META), "Doe^Jane": "1"})
        error = assert_error(extra, 422, "invalid_request")
        assert "1 unknown multipart field" in error["message"] and "Doe" not in error["message"]
        repeated = c.post("/v1/sort", params=[("k", "1"), ("k", "100")], content=png(HORIZONTAL),
                          headers={"Content-Type": "image/png"})
        assert "k given more than once" in assert_error(repeated, 422, "invalid_request")["message"]
        assert calls == []  # nothing reached a model
        assert post(json.dumps(META)).status_code == 200 and len(calls) == 1


def test_the_gateway_bounds_concurrent_decodes(monkeypatch):
    """Uploads are decoded at most max_concurrent_decodes at a time per gateway replica (a burst of
    small files that each decode to max_pixels exhausted the gateway's memory)."""
    import threading

    from msk.serve import app as app_module
    from msk.serve.app import ModelClients, create_api

    real, lock, active, peak = app_module.decode_radiograph, threading.Lock(), [0], [0]

    def slow_decode(data, preprocess):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.1)
        with lock:
            active[0] -= 1
        return real(data, preprocess)

    async def sort(*args):
        return {"regions": [], "unknown": False, "score": 0.0, "score_name": "msp"}

    monkeypatch.setattr(app_module, "decode_radiograph", slow_decode)
    settings = {"call_timeout_s": 5, "max_upload_bytes": 1 << 20, "preprocess": {"image_size": SQUARE},
                "debug_routes": False, "token_digest": None, "max_concurrent_decodes": 2}
    api = create_api(settings, ModelClients({"sort": FakeHandle(sort=sort)}, 5))

    async def burst() -> list[int]:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            answers = await asyncio.gather(*(c.post("/v1/sort", content=png(HORIZONTAL),
                                                    headers={"Content-Type": "image/png"}) for _ in range(8)))
        return [a.status_code for a in answers]

    assert asyncio.run(burst()) == [200] * 8
    assert peak[0] == 2


def test_named_clients_are_logged_and_rotate_without_a_restart(tmp_path, caplog):
    """Several tokens, each with a client name, from a file of digests: the access log names the
    client (never the token), and editing the file adds or revokes a client while serving."""
    import logging

    from msk.serve.auth import _main, add_client, read_clients

    clients = tmp_path / "clients"
    alice, bob = add_client("alice", clients), add_client("bob", clients)
    assert clients.stat().st_mode & 0o077 == 0 and alice not in clients.read_text()
    assert set(read_clients(clients).values()) == {"alice", "bob"}

    async def sort(*_):
        return {"regions": [], "unknown": False, "score": 0.0, "score_name": "msp"}

    def post(c, token):
        return c.post("/v1/sort", content=png(HORIZONTAL), headers={"Content-Type": "image/png",
                                                                   "Authorization": f"Bearer {token}"})

    access = logging.getLogger("ray.serve.msk.access")
    access.addHandler(caplog.handler)  # Ray's "ray.serve" logger does not propagate to the root, where caplog listens
    with caplog.at_level(logging.INFO, logger="ray.serve.msk.access"), \
            gateway_client({"sort": FakeHandle(sort=sort)}, clients_file=clients) as c:
        assert post(c, alice).status_code == 200 and post(c, bob).status_code == 200
        assert post(c, TOKEN).status_code == 200  # the default token still works: client "default"
        assert_error(post(c, "x" * 40), 401, "unauthorized")
        lines = [r.getMessage() for r in caplog.records if r.name == "ray.serve.msk.access"]
        assert any("client=alice route=POST /v1/sort status=200" in line for line in lines), lines
        assert any("client=default" in line for line in lines)
        assert any("client=unauthenticated" in line and "status=401" in line for line in lines)
        assert not any(alice in line or bob in line for line in lines)
        # revoke bob and add carol: no restart
        kept = [line for line in clients.read_text().splitlines() if line.startswith("alice")]
        clients.write_text("".join(line + "\n" for line in kept))
        carol = add_client("carol", clients)
        assert_error(post(c, bob), 401, "unauthorized")
        assert post(c, carol).status_code == 200 and post(c, alice).status_code == 200
    access.removeHandler(caplog.handler)
    bad = tmp_path / "bad"
    bad.write_text("# clients\nalice 1234\n")
    with pytest.raises(ConfigError, match="bad, line 2: expected 'NAME SHA256'"):
        read_clients(bad)
    with pytest.raises(ConfigError, match="already has a client 'alice'"):
        add_client("alice", clients)
    assert _main(["add", "dave", str(clients)]) == 0 and "dave" in read_clients(clients).values()


def test_direct_ingress_start_check_sees_whether_the_port_listens():
    """``msk serve`` with ``ingress: direct`` stops with a one-line error when nothing listens on
    its port after the start (a Ray cluster started without the direct-ingress variables)."""
    import socket

    from msk.serve.app import _listening

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert _listening("127.0.0.1", port, timeout_s=1) and _listening("0.0.0.0", port, timeout_s=1)
    assert not _listening("127.0.0.1", port, timeout_s=0.5)
