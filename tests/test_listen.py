"""``msk listen``: the DICOM receiver on loopback. A pynetdicom SCU sends real and synthetic instances;
every acknowledged one is in the spool, complete, and ingest accounts for each; unknown callers are
rejected; a failed write is never acknowledged; an aborted association keeps what was acknowledged."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification  # type: ignore[attr-defined]

from msk.core.errors import ConfigError
from msk.core.stages.listen.receiver import OUT_OF_RESOURCES, ListenConfig, Receiver, spool_name

SCU_AE = "MODALITY1"
KEY = "ab" * 32


def config(**kw) -> ListenConfig:
    return ListenConfig(**{"port": 0, "allowed_callers": [SCU_AE], **kw})


@pytest.fixture
def receiver(tmp_path):
    with Receiver(tmp_path / "spool", config()) as rec:
        yield rec


def address(rec: Receiver) -> tuple[str, int]:
    assert rec._server is not None
    host, port = rec._server.server_address[:2]
    return str(host), int(port)


def radiograph(rows: int = 64, cols: int = 64, seed: int = 0) -> Dataset:
    """A small synthetic CR instance (explicit VR little endian, 16-bit MONOCHROME2)."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "CR", "DOE^JANE", "12345"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (rows, cols), dtype=np.uint16).tobytes()
    return ds


def associate(host: str, port: int, datasets, *, ae_title: str = SCU_AE, max_pdu: int = 0,
              handlers=None):
    scu = AE(ae_title=ae_title)
    for sop, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        scu.add_requested_context(sop, syntax)
    scu.add_requested_context(Verification)
    return scu.associate(host, port, ae_title="MSK", max_pdu=max_pdu, evt_handlers=handlers or [])


def spooled(rec: Receiver) -> dict[str, Path]:
    """SOP Instance UID -> spool file, for every complete file in the spool; no temporary file is left."""
    files = [p for p in rec.spool.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".")], "temporary files left in the spool"
    return {str(pydicom.dcmread(p).SOPInstanceUID): p for p in files}


def ingest_spool(rec: Receiver, out: Path, monkeypatch):
    from msk.core.io.manifest import read_manifest
    from msk.core.stages.ingest.pipeline import IngestConfig, ingest

    monkeypatch.setenv("MSK_PSEUDONYM_KEY", KEY)
    ingest(rec.spool, out, IngestConfig(image_size=32, min_side=8, small_side=8), progress=False)
    return read_manifest(out).to_pylist()


# -- config and names (no network) -------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    ({"allowed_callers": []}, "allowed_callers"),
    ({"allowed_callers": ["A" * 17]}, "not an AE title"),
    ({"ae_title": "MSK\\X"}, "not an AE title"),
    ({"port": 70000}, "port"),
])
def test_invalid_config_is_refused(bad, match):
    from msk.core.config import load_config

    with pytest.raises(ConfigError, match=match):
        load_config(ListenConfig, **{"allowed_callers": [SCU_AE], **bad})


def test_spool_names_carry_the_uid_and_the_content_hash():
    name = spool_name(SCU_AE, "1.2.840.99", b"abc")
    assert name.startswith(f"{SCU_AE}/1.2.840.99-") and name.endswith(".dcm")
    assert spool_name(SCU_AE, "1.2.840.99", b"abc") == name != spool_name(SCU_AE, "1.2.840.99", b"abd")
    assert spool_name("A/../B", "../../etc/passwd", b"x").startswith("A_.._B/instance-")  # no path escapes


# -- loopback ----------------------------------------------------------------------------------


def test_echo_is_answered_and_an_unknown_caller_is_rejected(receiver):
    host, port = address(receiver)
    assoc = associate(host, port, [])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    stranger = associate(host, port, [radiograph()], ae_title="INTRUDER")
    assert stranger.is_rejected and not stranger.is_established
    assert receiver.counts["echo"] == 1 and not list(receiver.spool.rglob("*.dcm"))


def test_instances_are_stored_complete_and_a_resend_writes_nothing(receiver):
    sent = [radiograph(seed=i) for i in range(3)]
    assoc = associate(*address(receiver), sent)
    assert [assoc.send_c_store(ds).Status for ds in sent] == [0, 0, 0]
    assert assoc.send_c_store(sent[0]).Status == 0  # resent: acknowledged, not stored twice
    assoc.release()
    files = spooled(receiver)
    assert set(files) == {ds.SOPInstanceUID for ds in sent}
    for ds in sent:
        back = pydicom.dcmread(files[ds.SOPInstanceUID])
        assert back.PixelData == ds.PixelData and back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert files[ds.SOPInstanceUID].parent.name == SCU_AE
    assert (receiver.counts["stored"], receiver.counts["resent"]) == (3, 1)


def test_an_instance_that_cannot_be_made_durable_is_not_acknowledged(receiver, monkeypatch):
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    assoc = associate(*address(receiver), [radiograph()])
    assert assoc.send_c_store(radiograph()).Status == OUT_OF_RESOURCES
    assoc.release()
    assert spooled(receiver) == {} and receiver.counts["failed"] == 1


def test_a_stranded_temporary_file_is_removed_at_start(tmp_path):
    left = tmp_path / "spool" / SCU_AE / ".1.2.3-0000.dcm.abc.tmp"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half an instance")
    with Receiver(tmp_path / "spool", config()):
        assert not left.exists()


@pytest.mark.slow
def test_an_aborted_association_keeps_every_acknowledged_instance(receiver, tmp_path, ray_session, monkeypatch):
    """Four small instances are acknowledged, then the connection drops while a 32 MB one is on the
    wire (the sender's socket is shut down after 20 of its PDUs): the four are in the spool, the
    fifth is not there, not even half, and ingest takes in the four."""
    small = [radiograph(seed=i) for i in range(4)]
    big = radiograph(4096, 4096, seed=9)
    started, sent_pdus = threading.Event(), [0]

    def count(event):  # SCU side: P-DATA PDUs of the big instance
        if started.is_set():
            sent_pdus[0] += 1
            if sent_pdus[0] == 20:  # the network drops: no A-ABORT, no more bytes
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    assoc = associate(*address(receiver), [*small, big], max_pdu=16384,
                      handlers=[(evt.EVT_PDU_SENT, count)])
    acked = [ds.SOPInstanceUID for ds in small if assoc.send_c_store(ds).Status == 0x0000]
    started.set()
    status = assoc.send_c_store(big)
    deadline = time.monotonic() + 10  # the requestor thread notices the dead socket a moment later
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established and 20 <= sent_pdus[0] < 100  # of ~2,000 PDUs of the big one
    assert not status, "the big instance must not have been acknowledged"
    assert len(acked) == 4
    files = spooled(receiver)
    assert set(files) == set(acked)  # every acknowledged one, and nothing half-written
    rows = ingest_spool(receiver, tmp_path / "out", monkeypatch)
    assert sorted(r["path"] for r in rows) == sorted(p.relative_to(receiver.spool).as_posix() for p in files.values())
    assert {r["status"] for r in rows} == {"ok"}


def shared_instances(root: Path) -> tuple[list[Dataset], list[str]]:
    """Every DICOM instance under ``root`` (files pydicom reads with a SOP Class and Instance UID);
    the others (READMEs, JSON labels, licences) by name."""
    found, other = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, force=True)
            ds.SOPClassUID, ds.SOPInstanceUID  # noqa: B018 - both must be present
        except Exception:
            other.append(path.name)
            continue
        if "TransferSyntaxUID" not in ds.file_meta:  # no file meta (fo-dicom's CR-MONO1-10-chest)
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        found.append(ds)
    return found, other


@pytest.mark.slow
@pytest.mark.shared_data
def test_every_shared_dicom_is_received_and_accounted_for_by_ingest(shared_data, receiver, tmp_path, monkeypatch):
    sent: list[Dataset] = []
    for folder in ("dicom", "dicom-hip-dx"):
        if not (shared_data / folder).is_dir():
            pytest.skip(f"{shared_data / folder} is absent")
        found, other = shared_instances(shared_data / folder)
        assert not [n for n in other if n.endswith(".dcm")], other  # every .dcm there is an instance
        sent += found
    assert len(sent) >= 20
    assoc = associate(*address(receiver), sent)
    statuses = [assoc.send_c_store(ds).Status for ds in sent]
    assoc.release()
    assert statuses == [0] * len(sent)
    files = spooled(receiver)
    assert len(list(receiver.spool.rglob("*.dcm"))) == len(sent)  # one file per instance, even where UIDs repeat
    assert set(files) == {str(ds.SOPInstanceUID) for ds in sent}
    rows = ingest_spool(receiver, tmp_path / "out", monkeypatch)
    assert len(rows) == len(sent) and len({r["path"] for r in rows}) == len(sent)
    assert all(r["status"] == "ok" or r["reason"] for r in rows)
    print(f"\n{len(sent)} shared instances received; ingest: "
          f"{sum(r['status'] == 'ok' for r in rows)} ok, {sum(r['status'] != 'ok' for r in rows)} quarantined")


def test_a_port_in_use_is_a_clear_error(receiver, tmp_path):
    from msk.core.errors import MskError

    port = address(receiver)[1]
    with pytest.raises(MskError, match=f"cannot listen on 127.0.0.1:{port}: .*choose another port"):
        Receiver(tmp_path / "other", config(port=port)).start()


@pytest.mark.slow
def test_the_command_listens_answers_and_stops_with_exit_0_on_sigterm(tmp_path):
    import re
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "msk.core.cli", "listen", str(tmp_path / "spool"),
                             "--allow", f"{SCU_AE},PACS", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until it listens (or exits)
        found = re.search(r"listening on (127\.0\.0\.1):(\d+) as MSK for MODALITY1, PACS; spool ", line)
        assert found, line
        assoc = associate(found[1], int(found[2]), [radiograph()])
        assert assoc.send_c_echo().Status == 0 and assoc.send_c_store(radiograph()).Status == 0
        assoc.release()
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "stopped: 1 stored, 0 already in the spool, 0 refused (not written), 1 C-ECHO" in rest
    assert len(list((tmp_path / "spool" / SCU_AE).glob("*.dcm"))) == 1
