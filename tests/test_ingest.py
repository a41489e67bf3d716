"""``msk ingest``: every input accounted for, bad files quarantined, no PHI in shards, resumable."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from msk.core.data.squaring import square_image
from msk.core.errors import MskError
from msk.core.io.dataset import images_from_table, read_shards
from msk.core.io.manifest import read_manifest
from msk.core.io.pseudonym import Pseudonymiser
from msk.core.stages.ingest import pipeline as ingest_module
from msk.core.stages.ingest.pipeline import IngestConfig, ingest, list_inputs

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

# Identifying values written into the test DICOMs (all fake); none may reach a shard.
PHI = ["Doe^Jane", "Roe^Richard", "MRN-4242", "MRN-777-ABC", "19610317", "19700101",
       "St Example Hospital", "ACC-99812", "20190612", "DOE_JANE"]

# What each input of :func:`build_archive` must end up as in the manifest.
EXPECTED = {
    "DOE_JANE_MRN-4242/IM0001": "ok",  # extensionless, as PACS exports often are
    "DOE_JANE_MRN-4242/mono1.dcm": "ok",
    "DOE_JANE_MRN-4242/rle.dcm": "ok",
    "photos/hand.png": "ok",
    "photos/knee.jpg": "ok",
    "bad/overflow.dcm": "ok",  # 12-bit data with values above 4095: clipped, not wrapped
    "bad/empty.dcm": "empty",
    "bad/gone.dcm": "read_error",  # broken symlink (as root, chmod 000 would still be readable)
    "bad/pipe.dcm": "read_error",  # a FIFO is not a regular file: never opened
    "bad/huge.dcm": "too_large",  # header says 65535 x 65535, nothing that big is allocated
    "bad/not_dicom.dcm": "not_an_image",
    "bad/report_sr.dcm": "no_pixel_data",
    "bad/truncated.dcm": "corrupt",
    "z_copy/IM0001_again": "duplicate",
}
N_OK = sum(v == "ok" for v in EXPECTED.values())


def gradient(rows: int = 96, cols: int = 64) -> np.ndarray:
    """A 12-bit image that is dark at the top and bright at the bottom."""
    i, j = np.mgrid[0:rows, 0:cols]
    return (i * 30 + j * 15).astype(np.uint16)


def write_dicom(path: Path, pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2",
                bits_stored: int = 12, compress: bool = False, sop_class: str = CR_STORAGE,
                name: str = "Doe^Jane", patient_id: str = "MRN-4242", birth: str = "19610317",
                rows_cols: tuple[int, int] | None = None) -> Path:
    """A small CR DICOM full of fake PHI; ``pixels=None`` writes no pixel data at all."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR" if sop_class == CR_STORAGE else "SR"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, patient_id, birth
    ds.PatientSex, ds.PatientAge = "F", "058Y"
    ds.InstitutionName, ds.AccessionNumber = "St Example Hospital", "ACC-99812"
    ds.StudyDate, ds.BodyPartExamined, ds.ViewPosition = "20190612", "HAND", "PA"
    if pixels is not None:
        ds.Rows, ds.Columns = rows_cols or pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.astype("<u2").tobytes()
        if compress:
            ds.compress(RLELossless)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def build_archive(root: Path) -> Path:
    """A tiny export with one of each kind of input in :data:`EXPECTED` (+ a hidden file)."""
    patient = root / "DOE_JANE_MRN-4242"
    good = write_dicom(patient / "IM0001", gradient())
    write_dicom(patient / "mono1.dcm", 4095 - gradient(), photometric="MONOCHROME1",
                name="Roe^Richard", patient_id="MRN-777-ABC", birth="19700101")
    write_dicom(patient / "rle.dcm", gradient(80, 80), compress=True)
    (root / "photos").mkdir()
    Image.fromarray((np.arange(48 * 40).reshape(48, 40) % 256).astype(np.uint8)).save(root / "photos/hand.png")
    Image.fromarray(np.full((40, 56, 3), (200, 120, 40), np.uint8)).save(root / "photos/knee.jpg")

    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.dcm").write_bytes(b"")
    (bad / "gone.dcm").symlink_to(bad / "does-not-exist.dcm")
    os.mkfifo(bad / "pipe.dcm")
    overflow = gradient()
    overflow[:10] = 4096 + 100  # masking to 12 bits would make this band dark (100)
    write_dicom(bad / "overflow.dcm", overflow)
    write_dicom(bad / "huge.dcm", np.zeros((4, 4), np.uint16), rows_cols=(65535, 65535))
    (bad / "not_dicom.dcm").write_text("Patient: Doe^Jane, MRN-4242 -- not an image\n")
    write_dicom(bad / "report_sr.dcm", None, sop_class=BASIC_TEXT_SR)
    data = good.read_bytes()
    (bad / "truncated.dcm").write_bytes(data[: len(data) - 3 * 96 * 64 // 2])  # cut inside the pixels
    (root / "z_copy").mkdir()
    shutil.copyfile(good, root / "z_copy/IM0001_again")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: not an input at all
    return root


def config(tmp: Path, **kw) -> IngestConfig:
    defaults = dict(image_size=64, chunk_files=4, batch_size=2, key_file=tmp / "pseudonym.key", create_key=True)
    return IngestConfig(**(defaults | kw))


def manifest_status(out: Path) -> dict[str, str]:
    rows = read_manifest(out).to_pylist()
    return {r["path"]: r["reason"] or r["status"] for r in rows}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, ray_session):
    """One ingest of :func:`build_archive`, shared by the read-only tests below."""
    tmp = tmp_path_factory.mktemp("ingest")
    src = build_archive(tmp / "export")
    cfg = config(tmp)
    report = ingest(src, tmp / "out", cfg, progress=False)
    return src, tmp / "out", cfg, report


@pytest.mark.slow
def test_every_input_is_in_the_manifest_with_its_reason(ingested):
    src, out, _, report = ingested
    assert manifest_status(out) == EXPECTED
    assert report.n_inputs == len(EXPECTED) == read_manifest(out).num_rows
    assert report.n_ok == N_OK and report.n_quarantined == len(EXPECTED) - N_OK
    assert report.by_reason["duplicate"] == 1 and report.by_reason["read_error"] == 2
    assert (out / "ingest.json").is_file()


@pytest.mark.slow
def test_manifest_names_the_node_that_decoded_each_file(ingested, ray_session):
    _, out, _, _ = ingested
    nodes = set(read_manifest(out, columns=["node"]).column("node").to_pylist())
    assert nodes == {ray_session.get_runtime_context().get_node_id()}  # one local node


@pytest.mark.slow
def test_quarantine_details_name_the_cause(ingested):
    _, out, _, _ = ingested
    rows = {r["path"]: r for r in read_manifest(out).to_pylist()}
    assert rows["z_copy/IM0001_again"]["detail"] == "same content (SHA-256) as DOE_JANE_MRN-4242/IM0001"
    assert rows["bad/pipe.dcm"]["detail"] == "not a regular file"
    assert rows["bad/gone.dcm"]["content_sha256"] is None
    assert rows["bad/empty.dcm"]["bytes"] == 0
    for r in rows.values():
        assert (r["shard"] is None) == (r["status"] != "ok")
        assert (r["detail"] is None) == (r["status"] == "ok")


@pytest.mark.slow
def test_image_ids_are_keyed_hashes_of_the_source_path(ingested):
    _, out, cfg, _ = ingested
    pseudonymiser = Pseudonymiser.from_env_or_file(cfg.key_file)
    for row in read_manifest(out).to_pylist():
        assert row["image_id"] == pseudonymiser.record_id(row["path"])
    ids = set(read_manifest(out).column("image_id").to_pylist())
    assert set(read_shards(out).column("image_id").to_pylist()) <= ids


@pytest.mark.slow
def test_shards_hold_square_bone_bright_images(ingested):
    _, out, cfg, _ = ingested
    table = read_shards(out)
    assert table.num_rows == N_OK
    assert set(table.column("height").to_pylist()) == {cfg.image_size}
    images = images_from_table(table)
    assert images.shape == (N_OK, 64, 64) and images.dtype == np.uint8
    by_id = dict(zip(table.column("image_id").to_pylist(), images))
    ids = {r["path"]: r["image_id"] for r in read_manifest(out).to_pylist()}
    mono2, mono1 = by_id[ids["DOE_JANE_MRN-4242/IM0001"]], by_id[ids["DOE_JANE_MRN-4242/mono1.dcm"]]
    # MONOCHROME1 stores inverted values; displayed, both files are the same picture.
    assert np.abs(mono2.astype(int) - mono1.astype(int)).max() <= 1
    # 96 x 64 padded to 64 x 64: black bars left and right, image dark at top, bright at bottom.
    assert mono2[:, :5].max() == 0 and mono2[:, -5:].max() == 0
    assert mono2[-2, 32] > 200 > 50 > mono2[1, 32]
    overflow = by_id[ids["bad/overflow.dcm"]]
    assert overflow[1, 32] > 200  # the over-range band is the brightest, not wrapped to dark


@pytest.mark.slow
def test_no_phi_anywhere_in_the_shards(ingested):
    _, out, _, _ = ingested
    for shard in sorted((out / "shards").glob("*.parquet")):
        table = pq.read_table(shard)
        text = [str(pq.read_metadata(shard).metadata)]
        for name in table.column_names:
            if name != "image":
                text += [str(v) for v in table.column(name).to_pylist()]
        blob = "\n".join(text) + shard.read_bytes().decode("latin-1")
        for needle in PHI:
            assert needle not in blob, f"{needle!r} leaked into {shard.name}"
    # the manifest is the in-zone audit log: it does keep the source paths
    assert "DOE_JANE_MRN-4242/IM0001" in read_manifest(out).column("path").to_pylist()


@pytest.mark.slow
def test_rerun_is_idempotent(ingested):
    src, out, cfg, _ = ingested
    before = {p: p.stat().st_mtime_ns for p in sorted(out.rglob("*.parquet"))}
    report = ingest(src, out, cfg, progress=False)
    assert report.n_skipped_existing == report.n_inputs and report.n_processed == 0
    assert {p: p.stat().st_mtime_ns for p in sorted(out.rglob("*.parquet"))} == before
    assert read_manifest(out).num_rows == len(EXPECTED)


@pytest.mark.slow
def test_new_files_are_added_and_deduplicated_against_earlier_runs(tmp_path, ray_session):
    src = build_archive(tmp_path / "export")
    out, cfg = tmp_path / "out", config(tmp_path)
    ingest(src, out, cfg, progress=False)
    (src / "later").mkdir()
    shutil.copyfile(src / "DOE_JANE_MRN-4242/rle.dcm", src / "later/rle_copy.dcm")
    write_dicom(src / "later/new.dcm", gradient(70, 90))
    report = ingest(src, out, cfg, progress=False)
    assert report.n_processed == 2 and report.n_skipped_existing == len(EXPECTED)
    status = manifest_status(out)
    assert status["later/new.dcm"] == "ok" and status["later/rle_copy.dcm"] == "duplicate"
    assert read_manifest(out).num_rows == len(EXPECTED) + 2


def _assert_complete(out: Path) -> None:
    """Each input exactly once, every referenced shard present, no file outside a commit."""
    manifest = read_manifest(out)
    paths = manifest.column("path").to_pylist()
    assert sorted(paths) == sorted(EXPECTED) and len(set(paths)) == len(paths)
    referenced = {s for s in manifest.column("shard").to_pylist() if s}
    on_disk = {p.relative_to(out).as_posix() for p in (out / "shards").iterdir()}
    assert on_disk == referenced
    ids = read_shards(out).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == N_OK


@pytest.mark.slow
def test_resume_after_a_crash_between_shards_and_manifest(tmp_path, ray_session, monkeypatch):
    src = build_archive(tmp_path / "export")
    out, cfg = tmp_path / "out", config(tmp_path)
    real_write, calls = ingest_module.write_manifest_part, []

    def crash_on_second_commit(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "write_manifest_part", crash_on_second_commit)
    with pytest.raises(KeyboardInterrupt):
        ingest(src, out, cfg, progress=False)
    monkeypatch.undo()
    assert read_manifest(out).num_rows == cfg.chunk_files  # only chunk 0 committed
    assert list((out / "shards").glob("part-000001-*.parquet")), "chunk 1's shard should be left over"

    report = ingest(src, out, cfg, progress=False)
    assert report.n_skipped_existing == cfg.chunk_files
    assert manifest_status(out) == EXPECTED
    _assert_complete(out)


@pytest.mark.slow
def test_resume_after_losing_the_last_manifest_part(tmp_path, ray_session):
    src = build_archive(tmp_path / "export")
    out, cfg = tmp_path / "out", config(tmp_path)
    ingest(src, out, cfg, progress=False)
    parts = sorted((out / "manifest").glob("part-*.parquet"))
    assert len(parts) == -(-len(EXPECTED) // cfg.chunk_files)
    parts[-1].unlink()
    report = ingest(src, out, cfg, progress=False)
    assert report.n_processed == len(EXPECTED) - cfg.chunk_files * (len(parts) - 1)
    assert manifest_status(out) == EXPECTED
    _assert_complete(out)


@pytest.mark.slow
def test_an_ingest_written_before_the_node_column_still_resumes(tmp_path, ray_session):
    src = build_archive(tmp_path / "export")
    out, cfg = tmp_path / "out", config(tmp_path)
    ingest(src, out, cfg, progress=False)
    parts = sorted((out / "manifest").glob("part-*.parquet"))
    for part in parts:  # as msk wrote them before the manifest had a `node` column
        pq.write_table(pq.read_table(part).drop_columns(["node"]), part)
    parts[-1].unlink()  # and interrupted before its last commit

    report = ingest(src, out, cfg, progress=False)
    assert report.n_skipped_existing == cfg.chunk_files * (len(parts) - 1)
    assert manifest_status(out) == EXPECTED
    _assert_complete(out)
    nodes = read_manifest(out, columns=["node"]).column("node").to_pylist()
    assert nodes[:report.n_skipped_existing] == [None] * report.n_skipped_existing
    assert None not in nodes[report.n_skipped_existing:]  # the redone chunk records its node


def _decode_or_die(batch, *, _real=ingest_module._decode_batch, **kwargs):
    """A decode that kills its worker process (like a decoder segfault) on files named CRASH*."""
    if any(Path(p).name.startswith("CRASH") for p in batch.column("path").to_pylist()):
        os._exit(11)
    return _real(batch, **kwargs)


@pytest.mark.slow
def test_a_file_that_kills_its_worker_is_quarantined_alone(tmp_path, ray_session, monkeypatch):
    src = tmp_path / "export"
    src.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 30), 40 * i, np.uint8)).save(src / f"img{i}.png")
    shutil.copyfile(src / "img1.png", src / "CRASH.png")  # sorted: CRASH.png first, with img0, img1
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests
    monkeypatch.setattr(ingest_module, "_decode_batch", _decode_or_die)
    report = ingest(src, tmp_path / "out", config(tmp_path, batch_size=3), progress=False)
    rows = {r["path"]: r for r in read_manifest(tmp_path / "out").to_pylist()}
    assert {p: r["reason"] or r["status"] for p, r in rows.items()} == {
        "CRASH.png": "corrupt", **{f"img{i}.png": "ok" for i in range(5)}}
    assert "failed in its batch and again alone" in rows["CRASH.png"]["detail"]
    assert rows["CRASH.png"]["content_sha256"] == rows["img1.png"]["content_sha256"]
    assert rows["CRASH.png"]["node"] is None and rows["img1.png"]["node"] is not None
    assert report.n_ok == 5


def test_a_second_ingest_into_the_same_folder_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(MskError, match="being written by another msk ingest"):
            ingest(tmp_path / "src", out, config(tmp_path), progress=False)


def test_missing_source_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MskError, match="does not exist"):
        ingest(tmp_path / "nope", tmp_path / "out", config(tmp_path), progress=False)


def test_list_inputs_is_sorted_skips_hidden_and_the_output(tmp_path):
    for rel in ["b/2.dcm", "a/1", ".hidden/x.dcm", "a/.DS_Store", "out/shards/part.parquet", "c.PNG"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert list_inputs(tmp_path, ["*"], [".*"], skip=tmp_path / "out") == ["a/1", "b/2.dcm", "c.PNG"]
    assert list_inputs(tmp_path, ["*.dcm"], [".*"], skip=tmp_path / "out") == ["b/2.dcm"]


def test_square_image_pads_keeping_the_aspect_ratio():
    wide = np.ones((20, 80), np.float32)
    padded = square_image(wide, 40, "pad")
    assert padded.shape == (40, 40) and padded.dtype == np.uint8
    rows = np.flatnonzero(padded[:, 20])
    assert (rows.min(), rows.max()) == (15, 24)  # 10 rows of image centred in 40
    assert square_image(wide, 40, "stretch").min() == 255


def test_square_image_downscaling_is_anti_aliased():
    stripes = np.zeros((400, 400), np.float32)
    stripes[:, ::2] = 1.0  # one-pixel stripes: aliasing would give a pattern, not grey
    small = square_image(stripes, 40)
    assert abs(int(small.mean()) - 128) <= 2 and small.std() < 3
