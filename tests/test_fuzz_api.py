"""Fuzzing the HTTP API with schemathesis (bounded, loopback only) and the de-identification of responses.

Every operation of the gateway's own OpenAPI schema gets a fixed number of generated requests
(valid and invalid parameters, bodies of random bytes for the image and metadata fields) with a
valid Bearer token; every response must have a documented status and content type, match its
documented schema, and, from 400 up, be the documented ``{"error": {"code", "message"}}`` JSON;
no 500. Two targets:

* the gateway's FastAPI app alone (model replicas replaced by fakes), in-process: fast, in the
  default run;
* ``msk serve`` on 127.0.0.1 with the small models of ``tests/test_serve.py`` (its fixtures),
  through Serve's HTTP proxy: ``slow``. The same server then answers a DICOM carrying a marker in
  every attribute of the PS3.15 Basic Profile: no marker may appear in any response.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from test_deid import marker_dataset
from test_dicom import _to_bytes
from test_serve import META, TOKEN, FakeHandle, model_files, server  # noqa: F401 - fixtures used by name

#: Generated requests per operation (7 operations: about 200 requests in all, < 1 min on 2 cores);
#: MSK_FUZZ_CASES=500 runs a deeper search by hand.
CASES_PER_ROUTE = int(os.environ.get("MSK_FUZZ_CASES", "30"))
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@schemathesis.check
def error_is_documented_json(ctx, response, case) -> bool | None:
    """From 400 up, the body is ``{"error": {"code": str, "message": str, ...}}`` JSON."""
    if response.status_code < 400:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), (
        f"{response.status_code} is not JSON: {response.headers.get('content-type')}")
    error = json.loads(response.text)["error"]
    assert isinstance(error["code"], str) and error["code"] and isinstance(error["message"], str), error
    return True


def fuzz(schema, **call) -> list[str]:
    """Run :data:`CASES_PER_ROUTE` generated requests against every operation of ``schema``; the
    operations fuzzed. (schemathesis' pytest plugin, ``from_fixture``/``parametrize``, does not
    run under pytest 9: it sets ``Function._nodeid``; hypothesis' ``@given`` runs the same cases.)"""
    done = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @FUZZ_SETTINGS
        @given(case=operation.as_strategy())
        def run(case):
            case.call_and_validate(headers=AUTH, checks=CHECKS, **call)

        run()
        done.append(f"{operation.method.upper()} {operation.path}")
    return done


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          error_is_documented_json]
FUZZ_SETTINGS = settings(max_examples=CASES_PER_ROUTE, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))


# -- the gateway app alone --------------------------------------------------------------------------


def _fake_handles() -> dict[str, Any]:
    async def sort(pixels, k, gradcam):
        return {"regions": [{"name": "femur", "probability": 1.0}], "unknown": False, "score": 0.9,
                "score_name": "msp"}

    async def recommend(pixels, k, box):
        return {"entity": "femur", "confidence": 1.0, "shares": {"femur": 1.0}, "neighbours": []}

    async def classify(pixels, box, metadata, gradcam):
        return {"entities": [{"name": "a", "probability": 1.0}], "metadata_used": True}

    async def segment(pixels):
        import numpy as np

        mask = np.zeros(pixels.shape, bool)
        mask[2:6, 2:6] = True
        return {"mask": mask, "box": [2.0, 2.0, 6.0, 6.0], "threshold": 0.5}

    async def describe():
        return {"classes": ["femur"]}

    return {"sort": FakeHandle(sort=sort, describe=describe), "recommend": FakeHandle(recommend=recommend,
                                                                                      describe=describe),
            "classify": FakeHandle(classify=classify, describe=describe),
            "segment": FakeHandle(segment=segment, describe=describe)}


@pytest.fixture(scope="module")
def gateway_schema():
    from msk.serve.app import ModelClients, create_api
    from msk.serve.auth import token_digest

    settings_ = {"call_timeout_s": 5, "max_upload_bytes": 1 << 20, "preprocess": {"image_size": 32},
                 "debug_routes": False, "token_digest": token_digest(TOKEN), "lesion_input": {},
                 "clients_file": None}
    app = create_api(settings_, ModelClients(_fake_handles(), 5))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_fuzz_the_gateway_app(gateway_schema):
    assert len(fuzz(gateway_schema)) == 7


# -- msk serve on 127.0.0.1 -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_schema(server):  # noqa: F811 - the fixture imported from test_serve
    return schemathesis.openapi.from_url(f"{server}/openapi.json")


@pytest.mark.slow
def test_fuzz_msk_serve(served_schema):
    assert len(fuzz(served_schema, timeout=60)) == 7


@pytest.mark.slow
def test_responses_carry_no_profile_attribute(server):  # noqa: F811
    """A DICOM with a marker in every writable PS3.15 Table E.1-1 attribute, to every route, whole
    and truncated: no marker in any response."""
    import httpx

    ds, markers = marker_dataset()
    data = _to_bytes(ds)
    seen = []
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as client:
        for route, form in (("/v1/sort", None), ("/v1/recommend", None), ("/v1/classify", json.dumps(META)),
                            ("/v1/segment", None)):
            for body in (data, data[: len(data) // 2]):
                response = client.post(route, files={"image": ("x.dcm", body)},
                                       data=None if form is None else {"metadata": form},
                                       params={"gradcam": "true"} if route in ("/v1/sort", "/v1/classify") else None)
                seen.append(response.status_code)
                leaked = [m for m in markers if m in response.text]
                assert leaked == [], (route, response.status_code, leaked[:5])
    assert seen.count(200) >= 3 and 422 in seen  # the marker image is served; its truncated copy refused


# -- regressions of what the fuzzing found --------------------------------------------------------


def test_found_by_fuzzing_box_values_that_are_not_numbers_are_422(gateway_schema):
    """schemathesis found ``?box=`` values that pass the schema's pattern but are no numbers
    ("67.69.16": float() raised, a 500) and infinite ones ("1e999")."""
    from starlette.testclient import TestClient

    from test_serve import HORIZONTAL, assert_error, png

    image = {"content": png(HORIZONTAL), "headers": {"Content-Type": "image/png", **AUTH}}
    with TestClient(gateway_schema.app, raise_server_exceptions=False) as client:
        for box in ("1,2,3,67.69.16", "0,0,1e999,5", "e4,e2001,0,1", "-0,0,nan,4"):
            error = assert_error(client.post("/v1/recommend", params={"box": box}, **image), 422, "invalid_request")
            assert "box" in error["message"]
        metadata = json.dumps({**META, "box": [0, 0, 10, 10]}).replace("10]", "Infinity]")
        classify = client.post("/v1/classify", files={"image": ("x", png(HORIZONTAL))}, data={"metadata": metadata},
                               headers=AUTH)
        assert_error(classify, 422, "invalid_metadata")
        assert client.post("/v1/recommend", params={"box": "1,2,30,40"}, **image).status_code == 200


def test_found_by_fuzzing_the_box_schema_is_plain_json_schema(gateway_schema):
    """The responses' box was a tuple, i.e. ``prefixItems``, which schemathesis 4.32 rejects as an
    invalid schema (and many client generators mishandle): now an array of exactly 4 numbers."""
    from msk.serve.schemas import RecommendResponse

    box = RecommendResponse.model_json_schema()["properties"]["box"]["anyOf"][0]
    assert box == {"items": {"type": "number"}, "maxItems": 4, "minItems": 4, "type": "array"}
    assert "prefixItems" not in json.dumps(gateway_schema.raw_schema["components"])


def test_a_deflate_bomb_upload_is_refused_quickly(gateway_schema):
    """The reader's deflate-bomb fix holds for uploads: 512 KB that inflate to 512 MiB (past the 8 bytes per
    max_pixels a gateway may spend: 416 MB at the default 50 Mpx) are 422 too_large."""
    import time

    from starlette.testclient import TestClient

    from test_fuzz_reader import deflated
    from test_serve import assert_error

    bomb = deflated(512 << 20)
    assert len(bomb) < 1 << 20  # under max_upload_bytes
    with TestClient(gateway_schema.app, raise_server_exceptions=False) as client:
        began = time.perf_counter()
        answer = client.post("/v1/sort", content=bomb, headers={"Content-Type": "application/dicom", **AUTH})
        assert_error(answer, 422, "unreadable_image", reason="too_large")
        assert time.perf_counter() - began < 5
