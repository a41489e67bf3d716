"""``msk listen SPOOL``: a DICOM receiver (C-STORE SCP) that writes what it is sent to a spool folder.

A modality or a PACS sends images with C-STORE to msk's AE title; msk answers C-ECHO (the
"DICOM ping") too. The receiver (pynetdicom) decodes nothing: each instance is written as it
arrived (the peer's encoding, with DICOM file meta) to::

    SPOOL/<calling AE title>/<SOP Instance UID>-<sha256 of the file, 16 hex>.dcm

**Durable before acknowledged.** The bytes go to a hidden temporary file next to the final name
(``.<name>.<random>.tmp``), which is fsync'ed and renamed, then the folder is fsync'ed; only
then does the receiver answer success (``0x0000``). Anything the sender saw acknowledged
survives a dropped association, a crash of the receiver or a power cut; an instance that
could not be written is answered ``0xA700`` (out of resources) so the sender keeps it and
retries. A temporary file left by a crash is hidden (ingest's default ``exclude: [".*"]``
never lists it) and is removed when the receiver next starts.

**Who may send.** Associations are accepted only from the calling AE titles of
``allowed_callers``; any other is rejected at association time (A-ASSOCIATE-RJ, "calling AE
title not recognised"), before any data is sent. The server binds ``127.0.0.1`` unless told
otherwise. DICOM has no authentication beyond AE titles: on a network, bind the hospital-zone
interface and let the firewall admit only the modalities' addresses.

**Ingest.** The spool is an ordinary ``msk ingest`` source: ``msk ingest SPOOL OUT`` takes in
every file, each ending in the manifest ``ok`` or quarantined with its reason, and a re-run
takes in only what arrived since (resume keys on the path, and a name never changes content:
it carries the content's hash). Files appear in the spool only complete (renamed into place),
so an ingest running while instances arrive never reads half a file. Resending an instance
(same bytes) writes nothing new; a changed instance with the same UID gets a new name.

This stage imports no other stage: the receiver writes the spool, ingest reads it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from msk.core.config import MskConfig
from msk.core.errors import MskError
from msk.core.models.retrieval import atomic_write

if TYPE_CHECKING:
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["ListenConfig", "Receiver", "spool_name", "store_instance"]

logger = logging.getLogger(__name__)

#: C-STORE statuses (PS3.4 Annex B.2.3): success, and out of resources (the sender retries later).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700

_AE_TITLE = re.compile(r"^[A-Za-z0-9_.\- ]{1,16}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.fullmatch(value) or not value:
        raise ValueError(f"{value!r} is not an AE title msk accepts: 1-16 characters of A-Z, a-z, 0-9, "
                         "space, '_', '-', '.'")
    return value


class ListenConfig(MskConfig):
    """Options of ``msk listen`` (YAML keys of ``--config``)."""

    ae_title: str = Field("MSK", description="msk's own AE title: the one the senders call")
    host: str = Field("127.0.0.1", description="address to listen on; 127.0.0.1 (this machine only) "
                      "unless the modalities must reach it over the network")
    port: int = Field(11112, ge=0, le=65535, description="TCP port (11112 is DICOM's registered port; "
                      "0 takes a free one, printed at start)")
    allowed_callers: list[str] = Field(
        ..., min_length=1, description="calling AE titles allowed to associate (the modalities', PACS'); "
        "any other is rejected before it can send")
    max_associations: int = Field(10, ge=1, description="associations served at the same time")
    timeout_s: float = Field(30.0, gt=0, description="seconds of silence after which an association is dropped "
                             "(ACSE, DIMSE and network timeouts)")

    @field_validator("ae_title")
    @classmethod
    def _own_title(cls, value: str) -> str:
        return _ae_title(value)

    @field_validator("allowed_callers")
    @classmethod
    def _callers(cls, value: list[str]) -> list[str]:
        return sorted({_ae_title(v) for v in value})


def spool_name(calling_ae: str, sop_instance_uid: str | None, data: bytes) -> str:
    """The spool path, relative to SPOOL, of an instance (see the module docstring). A UID that is
    not a valid DICOM UID (digits and dots, at most 64 characters) is not put into the name."""
    uid = (sop_instance_uid or "").strip().rstrip("\0")
    stem = uid if _UID.fullmatch(uid) and len(uid) <= 64 else "instance"
    folder = re.sub(r"[^A-Za-z0-9_.\-]", "_", calling_ae.strip()) or "_"
    return f"{folder}/{stem}-{hashlib.sha256(data).hexdigest()[:16]}.dcm"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store_instance(spool: Path, relative: str, data: bytes) -> bool:
    """Write ``data`` to ``spool / relative`` durably (temp file, fsync, rename, fsync of the folder).

    Returns ``False`` when the file was already there (a resent instance: same name, same bytes)
    and ``True`` when it was written. Raises ``OSError`` when it could not be made durable; the
    final name then does not exist.
    """
    target = spool / relative
    if target.is_file():
        return False
    if not target.parent.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        _fsync_dir(spool)
    with atomic_write(target) as fh:
        fh.write(data)
    _fsync_dir(target.parent)
    return True


def remove_temporary(spool: Path) -> list[Path]:
    """Delete the receiver's temporary files (``.*.tmp``) a crash left in ``spool``; return them."""
    removed = []
    for tmp in sorted(spool.glob("*/.*.tmp")):
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
    return removed


@dataclass
class Receiver:
    """A running C-STORE SCP writing to ``spool``: :meth:`start`, then :meth:`stop`.

    ``counts`` says what happened so far: ``stored`` (written), ``resent`` (already in the
    spool), ``failed`` (answered out of resources), ``echo`` (C-ECHO answered).
    """

    spool: Path
    config: ListenConfig
    counts: Counter[str] = field(default_factory=Counter, init=False)
    _server: ThreadedAssociationServer | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def start(self) -> tuple[str, int]:
        """Start listening (in background threads); returns the bound ``(host, port)``."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        self.spool = Path(self.spool).resolve()
        self.spool.mkdir(parents=True, exist_ok=True)
        for tmp in remove_temporary(self.spool):
            logger.warning("removed %s, left by a receiver that stopped mid-write", tmp)
        ae = AE(ae_title=self.config.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.config.allowed_callers)
        ae.maximum_associations = self.config.max_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.config.timeout_s
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        try:
            server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise MskError(f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}; "
                           "choose another port (--port) or stop what holds it") from None
        assert server is not None  # block=False returns the server
        self._server = server
        host, port = server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        """Stop accepting, end the open associations and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> Receiver:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _on_echo(self, event: Event) -> int:
        self._count("echo")
        return SUCCESS

    def _on_store(self, event: Event) -> int:
        """Write the instance durably, then acknowledge; never raise (pynetdicom would answer a
        generic failure), answer out of resources instead."""
        try:
            data = event.encoded_dataset(include_meta=True)
            uid = getattr(event.request, "AffectedSOPInstanceUID", None)
            relative = spool_name(event.assoc.requestor.ae_title, uid, data)
            written = store_instance(self.spool, relative, data)
        except Exception as exc:  # disk full, permissions, ...: the sender keeps the instance
            logger.error("could not store an instance from %s: %s: %s",
                         event.assoc.requestor.ae_title, type(exc).__name__, exc)
            self._count("failed")
            return OUT_OF_RESOURCES
        self._count("stored" if written else "resent")
        return SUCCESS
