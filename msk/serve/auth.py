"""Bearer-token authentication, on unless switched off explicitly.

The token comes from the environment variable ``MSK_SERVE_TOKEN`` or, failing that, from the
file ``token_file`` of the config (first line, surrounding blanks stripped). It is resolved once,
where the application is built, and only its SHA-256 digest travels to the HTTP replicas (and
into Serve's stored application state): the secret itself is never stored by Ray. Requests to
``/v1/...`` must send ``Authorization: Bearer <token>``; the comparison is constant-time.

Without a token msk refuses to start, unless ``insecure`` is set, which logs (and warns) loudly
that anyone who can reach the port can use the models.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import warnings
from pathlib import Path

from fastapi import Request

from msk.core.errors import ConfigError
from msk.serve.errors import ApiError

__all__ = ["MIN_TOKEN_CHARS", "TOKEN_ENV", "BearerAuth", "token_digest", "resolve_token_digest"]

TOKEN_ENV = "MSK_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16

logger = logging.getLogger("ray.serve.msk")

INSECURE_BANNER = (
    "msk serve: AUTHENTICATION IS DISABLED (insecure). Anyone who can reach this port can "
    "send images to the models. Use it only on a single-user machine bound to 127.0.0.1."
)


class InsecureServingWarning(UserWarning):
    """Serving without authentication."""


def token_digest(token: str) -> str:
    """SHA-256 hex digest of a token (what the replicas compare against)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _read_token_file(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"token_file {path}: cannot read ({exc.strerror or exc})") from None
    lines = text.strip().splitlines()
    if not lines:
        raise ConfigError(f"token_file {path} is empty")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("token_file %s is readable by other users; chmod 600 it", path)
    return lines[0].strip()


def resolve_token_digest(token_file: Path | None, *, insecure: bool) -> str | None:
    """The digest of the configured token, or ``None`` with ``insecure`` (after a loud warning).

    Raises :class:`ConfigError` when neither ``MSK_SERVE_TOKEN`` nor ``token_file`` gives a
    token of at least :data:`MIN_TOKEN_CHARS` characters.
    """
    if insecure:
        logger.warning(INSECURE_BANNER)
        warnings.warn(INSECURE_BANNER, InsecureServingWarning, stacklevel=2)
        return None
    token, where = os.environ.get(TOKEN_ENV, "").strip(), f"${TOKEN_ENV}"
    if not token and token_file is not None:
        token, where = _read_token_file(Path(token_file)), f"token_file {token_file}"
    if not token:
        raise ConfigError(
            f"no API token: set {TOKEN_ENV} or token_file (e.g. `python -c \"import secrets; "
            f"print(secrets.token_urlsafe(32))\" > token && chmod 600 token`), or start with "
            "--insecure to serve without authentication (never on a network)")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the token from {where} has {len(token)} characters; use at least "
                          f"{MIN_TOKEN_CHARS} (e.g. secrets.token_urlsafe(32))")
    return token_digest(token)


class BearerAuth:
    """FastAPI dependency: accept the request only with the right Bearer token.

    :param digest: :func:`token_digest` of the token; ``None`` accepts every request (insecure).
    """

    def __init__(self, digest: str | None):
        self.digest = digest

    async def __call__(self, request: Request) -> None:
        if self.digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing Bearer token (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token_digest(token.strip()), self.digest):
            raise ApiError(401, "unauthorized", "invalid token",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
