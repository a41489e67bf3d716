"""The error contract of the HTTP API: every failure is ``{"error": {"code": ..., "message": ...}}``.

=====  ==========================  ===========================================================
HTTP   code                        when
=====  ==========================  ===========================================================
400    malformed_request           a multipart body that does not parse
401    unauthorized                missing or wrong Bearer token
404    not_found                   no such route
405    method_not_allowed          e.g. GET on /v1/sort
413    payload_too_large           body above ``max_upload_bytes``
415    unsupported_media_type      request type other than multipart/form-data or an image
                                   type, or an upload that is neither DICOM nor PNG/JPEG
422    unreadable_image            the upload is an image msk cannot use; ``reason`` is the
                                   ingest's quarantine reason (``corrupt``, ``no_pixel_data``,
                                   ``unsupported_syntax``, ``too_large``, ...)
422    invalid_metadata            /v1/classify metadata: not JSON, or values the model refuses
422    invalid_request             bad query parameters or form fields
422    box_required                a lesion-crop model got no box and no segmenter is configured
422    no_lesion_found             the segmenter marks no pixel at its threshold
500    internal                    anything unexpected (details only in the server log)
503    not_configured              the endpoint's model is not part of this deployment
503    model_unavailable           the model's replica died or is restarting; retry
503    not_ready                   /readyz: a model does not answer yet
504    timeout                     the model did not answer within ``call_timeout_s``
=====  ==========================  ===========================================================

Messages never echo request headers, file names or DICOM header values (PHI); for unreadable
images the message is a fixed sentence per reason, not the decoder's detail.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from msk.core.errors import QuarantineReason, unusable_message

__all__ = ["ApiError", "ContractMiddleware", "error_body", "install_error_handlers", "unreadable_image"]

logger = logging.getLogger("ray.serve.msk")

_STATUS_CODES = {400: "malformed_request", 401: "unauthorized", 404: "not_found",
                 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
                 422: "invalid_request", 500: "internal", 503: "unavailable", 504: "timeout"}



class ApiError(Exception):
    """A failure with its HTTP status, machine-readable code and a PHI-free message."""

    def __init__(self, status: int, code: str, message: str, *, reason: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.reason, self.headers = reason, headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.code, self.message, self.reason), self.status, headers=self.headers)


def error_body(code: str, message: str, reason: str | None = None) -> dict[str, Any]:
    """The JSON body of every error response."""
    error: dict[str, Any] = {"code": code, "message": message}
    if reason is not None:
        error["reason"] = reason
    return {"error": error}


def unreadable_image(reason: QuarantineReason) -> ApiError:
    """The error for an upload the ingest would have quarantined for ``reason``."""
    reason = QuarantineReason(reason)
    if reason is QuarantineReason.NOT_AN_IMAGE:
        return ApiError(415, "unsupported_media_type", unusable_message(reason), reason=reason.value)
    return ApiError(422, "unreadable_image", unusable_message(reason), reason=reason.value)


def install_error_handlers(app: FastAPI, *, max_body_bytes: int) -> None:
    """Make every failure of ``app`` answer in the contract's JSON form."""

    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse(error_body("invalid_request", problems), 422)

    # starlette types a handler as taking any Exception; each of these takes the one it is registered for
    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_middleware(ContractMiddleware, max_body_bytes=max_body_bytes)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body exceeds {limit} bytes")


class ContractMiddleware:
    """Pure ASGI middleware: the body size limit and the last-resort 500, both in JSON.

    A declared ``Content-Length`` above the limit is refused before the app runs; a body that
    grows past it while streaming (chunked uploads) raises :class:`ApiError` from ``receive``,
    which the app's handler, or this middleware, turns into a 413. Any other exception that
    escapes the app becomes a 500 whose log line holds the exception type and the route only
    (an exception's message may quote what was uploaded).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.limit = app, int(max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            error = _too_large(self.limit) if declared.isdigit() else ApiError(
                400, "malformed_request", "Content-Length is not a number")
            await self._send_json(send, error)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _too_large(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except ApiError as exc:
            if started:
                raise
            await self._send_json(send, exc)
        except Exception as exc:  # noqa: BLE001 - the contract: a JSON 500, never a traceback page
            logger.error("internal error %s on %s %s", type(exc).__name__, scope.get("method"), scope.get("path"))
            if started:
                raise
            await self._send_json(send, ApiError(500, "internal", "internal server error"))

    @staticmethod
    async def _send_json(send: Send, error: ApiError) -> None:
        body = json.dumps(error_body(error.code, error.message, error.reason)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
