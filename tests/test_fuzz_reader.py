"""Property tests of the reader on mutated real DICOMs: only QuarantineError, within a time bound.

Seeds are five small real files of ../shared/data (JPEG 2000 RGB DX, uncompressed implicit-VR CR
without file meta, JPEG baseline multi-frame XA, JPEG extended 12-bit CR, lossy JPEG 2000 CR).
Hypothesis mutates them (bit flips, truncation, 16/32-bit overwrites of tags, VRs and lengths
with extreme values, inserted and deleted bytes), mostly in the header where the parser lives;
:func:`read_image` must return a finite image in [0, 1] or raise
:class:`~msk.core.errors.QuarantineError`, and finish within :data:`SECONDS_PER_FILE`.
Decompression bombs (codestreams larger than the header says, a deflated data set of 256 MiB in
256 KB) must be refused before they are decoded. Examples are bounded and derandomised, so the
run is the same on every machine (about 20 s on 2 cores).
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset

from msk.core.errors import QuarantineError, QuarantineReason
from msk.core.io.dicom import read_image

pytestmark = pytest.mark.shared_data

SEEDS = ("dicom-hip-dx/dicoms/xray/331_DDH_1.dcm", "dicom/fo-dicom/CR-MONO1-10-chest",
         "dicom/fo-dicom/HasFragmentSequence.dcm", "dicom/pylibjpeg-data/JPEGExtended__RG2_JPLY_fixed.dcm",
         "dicom/pylibjpeg-data/JPEG2000__RG3_J2KI.dcm")
#: A mutated file must be decoded or refused within this many seconds (the seeds take < 0.3 s).
SECONDS_PER_FILE = 10.0
MAX_PIXELS = 5_000_000
EXTREMES = (0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF)


@pytest.fixture(scope="module")
def seeds(shared_data) -> list[bytes]:
    return [(shared_data / rel).read_bytes() for rel in SEEDS]


def _read_or_quarantine(data: bytes, **kwargs) -> QuarantineError | None:
    """Read ``data``; the QuarantineError it raised, or None after checking the image."""
    began = time.perf_counter()
    try:
        image = read_image(data, max_pixels=MAX_PIXELS, **kwargs)
    except QuarantineError as exc:  # the only exception allowed
        error: QuarantineError | None = exc
    else:
        pixels = image.pixels
        assert pixels.dtype == np.float32 and pixels.ndim in (2, 3) and pixels.size > 0
        assert np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0
        error = None
    elapsed = time.perf_counter() - began
    assert elapsed < SECONDS_PER_FILE, f"{elapsed:.1f} s for one file"
    return error


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        size = len(data)
        if size < 8:
            break
        at = draw(st.one_of(st.integers(0, min(size, 4096) - 5), st.integers(0, size - 5)))  # mostly the header
        kind = draw(st.sampled_from(["flip", "truncate", "u16", "u32", "insert", "delete"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "u16":
            data[at:at + 2] = struct.pack("<H", draw(st.sampled_from([0, 0xFFFF, 0x7FE0, 0x0028, 0xFFFE])))
        elif kind == "u32":
            value = draw(st.one_of(st.sampled_from(EXTREMES), st.integers(0, 0xFFFFFFFF)))
            data[at:at + 4] = struct.pack("<I", value)
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_real_dicoms_are_read_or_quarantined(seeds, data):
    raw = data.draw(mutated(seeds))
    _read_or_quarantine(raw)
    _read_or_quarantine(raw, frames="all")


def test_the_seeds_decode(seeds):
    for raw in seeds:
        assert _read_or_quarantine(raw) is None


# --------------------------------------------------------------------------------------------
# Decompression bombs


def _refused_quickly(data: bytes, seconds: float = 3.0) -> QuarantineReason:
    began = time.perf_counter()
    with pytest.raises(QuarantineError) as info:
        read_image(data, max_pixels=1_000_000)
    assert time.perf_counter() - began < seconds
    return info.value.reason


def test_codestreams_larger_than_their_header_are_refused_before_decoding(seeds):
    j2k = bytearray(seeds[0])  # 331 x 331 in the header and in the J2K SIZ marker
    at = j2k.find(b"\xff\x4f\xff\x51")
    j2k[at + 8:at + 16] = struct.pack(">II", 20000, 20000)
    assert _refused_quickly(bytes(j2k)) == QuarantineReason.TOO_LARGE
    jpeg = bytearray(seeds[2])  # 512 x 512 JPEG baseline frames
    at = jpeg.find(b"\xff\xc0")
    jpeg[at + 5:at + 9] = struct.pack(">HH", 60000, 60000)
    assert _refused_quickly(bytes(jpeg)) == QuarantineReason.TOO_LARGE
    header = bytearray(seeds[1])  # Rows and Columns (implicit VR): 65535 x 65535
    for tag in (b"\x28\x00\x10\x00", b"\x28\x00\x11\x00"):
        at = header.find(tag + b"\x02\x00\x00\x00")
        header[at + 8:at + 10] = struct.pack("<H", 0xFFFF)
    assert _refused_quickly(bytes(header)) == QuarantineReason.TOO_LARGE


def deflated(pixel_bytes: int) -> bytes:
    """A Deflated Explicit VR Little Endian CR whose header says 64 x 64 x 8 bit and whose Pixel
    Data element holds ``pixel_bytes`` zeros (compressed about 1000:1)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.999.5"
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CR", 64, 64, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        "MONOCHROME2", 8, 8, 7, 0)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    raw = buffer.getvalue()
    meta_end = 144 + struct.unpack("<I", raw[140:144])[0]
    body = zlib.decompress(raw[meta_end:], -zlib.MAX_WBITS)
    # After a full flush the deflater starts afresh, so every 1 MiB of zeros compresses to the same
    # bytes: compress one block and repeat it (seconds saved per GiB).
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = deflater.compress(body + b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", pixel_bytes))
    head += deflater.flush(zlib.Z_FULL_FLUSH)
    blocks, rest = divmod(pixel_bytes, 1 << 20)
    block = deflater.compress(bytes(1 << 20)) + deflater.flush(zlib.Z_FULL_FLUSH) if blocks else b""
    tail = deflater.compress(bytes(rest)) + deflater.flush()
    return raw[:meta_end] + head + block * blocks + tail


def test_a_deflate_bomb_is_refused_before_it_is_inflated():
    """Defect found by this fuzzing: a 1 MB deflated file of 1 GiB was inflated whole by pydicom
    (10 s, 2.1 GB of memory) and then read as a 64 x 64 image."""
    ok = read_image(deflated(64 * 64), max_pixels=1_000_000)
    assert ok.pixels.shape == (64, 64)
    bomb = deflated(256 << 20)
    assert len(bomb) < 400_000
    assert _refused_quickly(bomb) == QuarantineReason.TOO_LARGE


def test_every_seed_truncated_anywhere_is_quarantined(seeds):
    """Cut anywhere before the closing sequence delimiter (whose loss leaves every pixel intact)."""
    for raw in seeds:
        for cut in [*np.linspace(1, len(raw) - 9, 12).astype(int), len(raw) - 9, len(raw) - 200]:
            error = _read_or_quarantine(raw[:cut], frames="all")
            assert error is not None, f"{len(raw)} bytes cut at {cut} read as an image"


def test_an_element_length_past_the_end_of_file_is_never_a_crash(seeds):
    """Pixel Data (implicit VR) declaring 4 GiB: pydicom reads what is there; the image is then
    either the original one (all its pixels were present) or quarantined, never a crash or hang."""
    raw = bytearray(seeds[1])
    at = raw.find(b"\xe0\x7f\x10\x00")
    original = read_image(bytes(raw)).pixels
    for length in (0xFFFFFFF0, len(raw), 0x7FFFFFFF):
        raw[at + 4:at + 8] = struct.pack("<I", length)
        if _read_or_quarantine(bytes(raw)) is None:
            np.testing.assert_array_equal(read_image(bytes(raw)).pixels, original)
    raw[at + 4:at + 8] = struct.pack("<I", 1000)  # shorter than Rows x Columns x 2
    assert _read_or_quarantine(bytes(raw)) is not None
