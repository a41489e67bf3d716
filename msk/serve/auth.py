"""Bearer-token authentication, on unless switched off explicitly.

The token comes from the environment variable ``MSK_SERVE_TOKEN`` or, failing that, from the
file ``token_file`` of the config (first line, surrounding blanks stripped). It is resolved once,
where the application is built, and only its SHA-256 digest travels to the HTTP replicas (and
into Serve's stored application state): the secret itself is never stored by Ray. Requests to
``/v1/...`` must send ``Authorization: Bearer <token>``; the comparison is constant-time.

Without a token msk refuses to start, unless ``insecure`` is set, which logs (and warns) loudly
that anyone who can reach the port can use the models.

**Named clients** (``clients_file``): one line per client, ``NAME SHA256`` (the hex digest of its
token; ``#`` starts a comment), written by ``python -m msk.serve.auth add NAME FILE``, which
prints the new token once. The gateway re-reads the file when it changes, so a client is added,
rotated or revoked without a restart. A request's client name (``default`` for the
``MSK_SERVE_TOKEN``/``token_file`` token) goes to the access log line and to the
``msk_requests`` metric; never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import sys
import warnings
from pathlib import Path

from fastapi import Request

from msk.core.errors import ConfigError
from msk.serve.errors import ApiError

__all__ = ["DEFAULT_CLIENT", "MIN_TOKEN_CHARS", "TOKEN_ENV", "BearerAuth", "ClientTokens", "add_client",
           "read_clients", "resolve_token_digest", "token_digest"]

TOKEN_ENV = "MSK_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16
DEFAULT_CLIENT = "default"
_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")

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


def resolve_token_digest(token_file: Path | None, *, insecure: bool, named_clients: bool = False) -> str | None:
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
    if not token and named_clients:
        return None  # only the named clients of clients_file
    if not token:
        raise ConfigError(
            f"no API token: set {TOKEN_ENV} or token_file (e.g. `python -c \"import secrets; "
            f"print(secrets.token_urlsafe(32))\" > token && chmod 600 token`), or start with "
            "--insecure to serve without authentication (never on a network)")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the token from {where} has {len(token)} characters; use at least "
                          f"{MIN_TOKEN_CHARS} (e.g. secrets.token_urlsafe(32))")
    return token_digest(token)


def read_clients(path: str | os.PathLike) -> dict[str, str]:
    """``digest -> client name`` of a clients file (see the module docstring); :class:`ConfigError`
    names the line of anything else."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"clients_file {path}: cannot read ({exc.strerror or exc})") from None
    clients: dict[str, str] = {}
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not _CLIENT_NAME.match(parts[0]) or not _DIGEST.match(parts[1].lower()):
            raise ConfigError(f"clients_file {path}, line {number}: expected 'NAME SHA256' (a name of letters, "
                              "digits, _ . -, and the 64-hex-digit digest of the token); write lines with "
                              "`python -m msk.serve.auth add NAME FILE`")
        if parts[0] in names:
            raise ConfigError(f"clients_file {path}, line {number}: client {parts[0]!r} is listed twice")
        names.add(parts[0])
        clients[parts[1].lower()] = parts[0]
    return clients


def add_client(name: str, path: str | os.PathLike) -> str:
    """Append a client with a new random token to the clients file (created 0600) and return the
    token: the only time it is shown. Its digest is all the file keeps."""
    if not _CLIENT_NAME.match(name):
        raise ConfigError(f"client name {name!r}: use letters, digits, _ . - (at most 64)")
    path = Path(path)
    if path.exists() and name in read_clients(path).values():
        raise ConfigError(f"clients_file {path} already has a client {name!r}; remove its line to rotate it")
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(f"{name} {token_digest(token)}\n")
    return token


class ClientTokens:
    """Who a token belongs to: the single configured token (client ``default``) and the clients
    file, re-read when its modification time or size changes."""

    def __init__(self, default_digest: str | None, clients_file: str | os.PathLike | None = None):
        self.default = {default_digest: DEFAULT_CLIENT} if default_digest else {}
        self.path = Path(clients_file) if clients_file is not None else None
        self._stamp: tuple[int, int] | None = None
        self._clients: dict[str, str] = {}
        self._refresh()

    @property
    def enabled(self) -> bool:
        return bool(self.default) or self.path is not None

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except OSError:
            self._clients, self._stamp = {}, None  # a deleted file revokes every named client
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._clients = read_clients(self.path)
            except ConfigError as exc:  # keep serving the last good list; say why once per change
                logger.warning("%s; keeping the previous client list", exc)
            self._stamp = stamp

    def client(self, token: str) -> str | None:
        """The client name of ``token``, or ``None``; every entry is compared (constant time)."""
        self._refresh()
        digest, found = token_digest(token), None
        for known, name in (*self.default.items(), *self._clients.items()):
            if hmac.compare_digest(digest, known) and found is None:
                found = name
        return found


class BearerAuth:
    """FastAPI dependency: accept the request only with a known Bearer token, and record the
    client's name in ``request.state.client``.

    :param digest: :func:`token_digest` of the single token; ``None`` and no ``clients_file``
        accepts every request (insecure).
    :param clients_file: the named clients (see the module docstring).
    """

    def __init__(self, digest: str | None, clients_file: str | os.PathLike | None = None):
        self.digest = digest
        self.tokens = ClientTokens(digest, clients_file)

    @property
    def enabled(self) -> bool:
        return self.tokens.enabled

    async def __call__(self, request: Request) -> None:
        if not self.tokens.enabled:
            request.state.client = "insecure"
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing Bearer token (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": "Bearer"})
        client = self.tokens.client(token.strip())
        if client is None:
            raise ApiError(401, "unauthorized", "invalid token",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        request.state.client = client


def _main(argv: list[str]) -> int:
    """``python -m msk.serve.auth add NAME FILE``: add a named client, print its token once."""
    if len(argv) != 3 or argv[0] != "add":
        print("usage: python -m msk.serve.auth add NAME CLIENTS_FILE", file=sys.stderr)
        return 2
    try:
        token = add_client(argv[1], argv[2])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(token)
    print(f"client {argv[1]!r} added to {argv[2]} (only the token's SHA-256 is stored; this is the only time "
          "the token is shown)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
