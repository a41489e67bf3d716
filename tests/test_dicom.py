"""The reader: every real shared DICOM decodes correctly; every bad input gets its reason."""

from __future__ import annotations

import io
import os
import re
import tracemalloc
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from msk.core.errors import QuarantineError, QuarantineReason
from msk.core.io.dicom import (
    DecodedImage,
    apply_modality,
    apply_voi,
    clip_to_bits_stored,
    decode_pixels,
    read_dicom_header,
    read_image,
    sniff_format,
)

# The shared files are listed at collection time to parametrize over them (the `shared_data`
# fixture, which skips where the data is absent, supplies the path inside each test).
_SHARED = Path(os.environ.get("MSK_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
_NOT_DICOM = re.compile(r"^(LICENSE|SOURCE|README|NOTES)|\.(json|md|rst|txt)$")


def _shared_dicom_files() -> list[str]:
    if not _SHARED.is_dir():
        return []
    return sorted(
        p.relative_to(_SHARED).as_posix()
        for p in _SHARED.glob("dicom*/**/*")
        if p.is_file() and not _NOT_DICOM.search(p.name)
    )


SHARED_FILES = _shared_dicom_files()
_ABSENT = [pytest.param(None, marks=pytest.mark.skip(reason=f"no shared DICOMs under {_SHARED}"))]
PYLIBJPEG = "dicom/pylibjpeg-data"
FO_DICOM = "dicom/fo-dicom"


@lru_cache(maxsize=8)  # shared images are re-read by several tests; a few MB each
def _read(path: str) -> DecodedImage:
    return read_image(path)


@pytest.fixture(scope="module", autouse=True)
def _forget_decoded_images():
    yield
    _read.cache_clear()


def _dataset(path: Path) -> Dataset:
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


# --------------------------------------------------------------------------------------------
# Real data


@pytest.mark.shared_data
@pytest.mark.parametrize("rel", SHARED_FILES or _ABSENT)
def test_every_shared_file_decodes(shared_data, rel):
    image = _read(str(shared_data / rel))
    header = read_dicom_header(shared_data / rel)
    pixels = image.pixels
    assert pixels.dtype == np.float32
    assert pixels.shape == (header.rows, header.cols)
    assert min(pixels.shape) >= 64
    assert np.isfinite(pixels).all()
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    assert pixels.std() > 0.02, "a (nearly) constant image means a wrong window or a failed decode"
    assert image.meta.format == "dicom" and image.meta.window != "none"
    assert header.window == "none"


@pytest.mark.shared_data
def test_shared_files_were_found(shared_data):
    assert len(SHARED_FILES) >= 20, f"expected the shared DICOMs under {shared_data}, found {SHARED_FILES}"


def _lossless_groups() -> dict[str, list[str]]:
    """pylibjpeg-data files by NEMA image code (RG1, RG2, ...), lossless encodings only."""
    groups: dict[str, list[str]] = defaultdict(list)
    for rel in SHARED_FILES:
        match = re.search(r"/(\w*Lossless\w*)__(RG\d)_", rel)
        if match:
            groups[match.group(2)].append(rel)
    return {code: files for code, files in groups.items() if len(files) > 1}


@pytest.mark.shared_data
@pytest.mark.parametrize("code", sorted(_lossless_groups()) or _ABSENT)
def test_lossless_encodings_decode_to_identical_pixels(shared_data, code):
    files = _lossless_groups()[code]
    raws = [decode_pixels(_dataset(shared_data / rel)) for rel in files]
    outputs = [_read(str(shared_data / rel)).pixels for rel in files]
    syntaxes = {_read(str(shared_data / rel)).meta.transfer_syntax_uid for rel in files}
    assert len(syntaxes) == len(files), "the group must hold different encodings"
    for rel, raw, out in zip(files[1:], raws[1:], outputs[1:]):
        np.testing.assert_array_equal(raw, raws[0], err_msg=f"{rel} vs {files[0]} (stored values)")
        np.testing.assert_array_equal(out, outputs[0], err_msg=f"{rel} vs {files[0]} (output)")


@pytest.mark.shared_data
def test_a_lossless_group_exists(shared_data):
    assert _lossless_groups(), "the shared data promises several lossless encodings of one image"


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("lossy", "lossless"),
    [
        ("JPEGLS__RG2_JLSN.dcm", "JPEGLSLossless__RG2_JLSL.dcm"),
        ("JPEGExtended__RG2_JPLY_fixed.dcm", "JPEGLSLossless__RG2_JLSL.dcm"),
        ("JPEG2000__RG3_J2KI.dcm", "JPEG2000Lossless__RG3_J2KR.dcm"),
    ],
)
def test_lossy_encodings_stay_close_to_lossless(shared_data, lossy, lossless):
    a = _read(str(shared_data / PYLIBJPEG / lossy)).pixels
    b = _read(str(shared_data / PYLIBJPEG / lossless)).pixels
    psnr = 10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2))
    assert psnr > 40, f"{lossy}: PSNR {psnr:.1f} dB against {lossless}"


def _spine_minus_lungs(pixels: np.ndarray) -> float:
    """Chest PA: mean of the central (spine/mediastinum) strip minus the lateral lung fields."""
    h, w = pixels.shape
    rows = slice(int(0.3 * h), int(0.6 * h))
    spine = pixels[rows, int(0.46 * w):int(0.54 * w)].mean()
    lungs = np.concatenate([pixels[rows, int(0.2 * w):int(0.3 * w)], pixels[rows, int(0.7 * w):int(0.8 * w)]])
    return float(spine - lungs.mean())


@pytest.mark.shared_data
@pytest.mark.parametrize("rel", [f"{FO_DICOM}/CR-MONO1-10-chest", f"{PYLIBJPEG}/JPEG2000__RG1_J2KI.dcm"])
def test_monochrome1_chest_shows_bone_bright(shared_data, rel):
    image = _read(str(shared_data / rel))
    assert image.meta.photometric == "MONOCHROME1"
    assert _spine_minus_lungs(image.pixels) > 0.1, "spine must be brighter than the lungs"


@pytest.mark.shared_data
def test_monochrome1_is_the_inverse_of_the_same_data_read_as_monochrome2(shared_data):
    raw = (shared_data / FO_DICOM / "CR-MONO1-10-chest").read_bytes()
    as_mono1 = read_image(raw).pixels
    ds = _dataset(shared_data / FO_DICOM / "CR-MONO1-10-chest")
    ds.PhotometricInterpretation = "MONOCHROME2"
    as_mono2 = read_image(_to_bytes(ds)).pixels
    np.testing.assert_allclose(as_mono1, 1.0 - as_mono2, atol=1e-6)


@pytest.mark.shared_data
def test_dicom_without_file_meta_uses_the_implicit_vr_fallback(shared_data):
    path = shared_data / FO_DICOM / "CR-MONO1-10-chest"
    assert path.read_bytes()[128:132] != b"DICM"
    image = read_image(path)
    assert image.pixels.shape == (440, 440)
    assert image.meta.transfer_syntax_uid == ImplicitVRLittleEndian
    assert image.meta.window == "window:550/1024"


@pytest.mark.shared_data
def test_modality_lut_sequence_is_applied(shared_data):
    path = shared_data / FO_DICOM / "CR-ModalitySequenceLUT.dcm"
    ds = _dataset(path)
    item = ds.ModalityLUTSequence[0]
    lut = np.frombuffer(item.LUTData, "<u2") if isinstance(item.LUTData, bytes) else np.asarray(item.LUTData)
    assert not np.array_equal(lut, np.arange(lut.size)), "the test needs a non-identity LUT"
    stored = decode_pixels(ds)
    np.testing.assert_array_equal(apply_modality(stored, ds), lut[stored])

    image = read_image(path)
    with_lut, _ = apply_voi(lut[stored], ds)
    without_lut, _ = apply_voi(stored, ds)
    np.testing.assert_allclose(image.pixels, 1.0 - with_lut, atol=1e-6)  # MONOCHROME1
    assert np.abs(image.pixels - (1.0 - without_lut)).max() > 0.01


@pytest.mark.shared_data
def test_multiframe_first_frame_by_default_and_all_on_request(shared_data):
    path = shared_data / FO_DICOM / "HasFragmentSequence.dcm"
    first = read_image(path)
    every = read_image(path, frames="all")
    assert first.meta.n_frames == 96
    assert first.pixels.shape == (512, 512)
    assert every.pixels.shape == (96, 512, 512)
    assert not np.array_equal(every.pixels[0], every.pixels[-1])
    stored_first = decode_pixels(_dataset(path))
    stored_all = decode_pixels(_dataset(path), frames="all")
    np.testing.assert_array_equal(stored_all[0], stored_first)


@pytest.mark.shared_data
def test_rgb_dx_decodes_to_grey_luminance(shared_data):
    files = sorted((shared_data / "dicom-hip-dx").glob("dicoms/**/*.dcm"))
    assert files
    for path in files[:3]:
        image = read_image(path)
        rgb = pydicom.dcmread(path).pixel_array.astype(np.float64)
        assert image.meta.photometric == "RGB" and image.meta.window == "full_range"
        assert image.pixels.shape == rgb.shape[:2] == (331, 331)
        expected = (rgb @ [0.299, 0.587, 0.114]) / 255.0
        np.testing.assert_allclose(image.pixels, expected, atol=1e-5)


@pytest.mark.shared_data
def test_header_has_the_facts_and_hides_phi_from_repr(shared_data):
    meta = read_dicom_header(shared_data / PYLIBJPEG / "JPEG2000Lossless__JPEG2KLossless_1s_1f_u_16_16.dcm")
    assert (meta.modality, meta.rows, meta.cols, meta.bits_stored) == ("DX", 1416, 1420, 16)
    assert meta.patient_birth_date == "19570101" and meta.institution
    assert "19570101" not in repr(meta) and meta.institution not in repr(meta)


@pytest.mark.shared_data
def test_a_window_that_saturates_everything_is_replaced(shared_data):
    # Window 2725/5310 on values 32744..65535: the header window would render all white.
    image = _read(str(shared_data / PYLIBJPEG / "JPEG2000Lossless__JPEG2KLossless_1s_1f_u_16_16.dcm"))
    assert image.meta.window == "percentile:header_voi_rejected"
    assert image.pixels.std() > 0.1


@pytest.mark.shared_data
def test_truncated_real_file_is_corrupt(shared_data, tmp_path):
    data = (shared_data / PYLIBJPEG / "JPEGLosslessSV1__RG2_JPLL.dcm").read_bytes()
    cut = tmp_path / "half.dcm"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(QuarantineError) as info:
        read_image(cut)
    assert info.value.reason is QuarantineReason.CORRUPT
    assert info.value.source == str(cut) and "truncated" in info.value.detail


# --------------------------------------------------------------------------------------------
# Generated inputs


def _image_dataset(
    pixels: np.ndarray, *, bits_stored: int | None = None, photometric: str = "MONOCHROME2", **attrs
) -> Dataset:
    """A minimal CR image data set holding ``pixels`` natively (explicit VR little endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    return ds


def _to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _reason(data, **kwargs) -> QuarantineReason:
    with pytest.raises(QuarantineError) as info:
        read_image(data, **kwargs)
    return info.value.reason


RAMP = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 1024)


def test_synthetic_native_dicom_with_window():
    data = _to_bytes(_image_dataset(RAMP, bits_stored=10, WindowCenter=512, WindowWidth=1024))
    image = read_image(data, source="ramp.dcm")
    assert image.meta.window == "window:512/1024" and image.meta.source == "ramp.dcm"
    expected = np.clip((RAMP - 511.5) / 1023 + 0.5, 0, 1)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)


def test_no_voi_in_header_uses_robust_min_max():
    image = read_image(_to_bytes(_image_dataset(RAMP, bits_stored=10)))
    assert image.meta.window == "percentile"
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0
    assert np.mean(image.pixels == 1.0) < 0.02  # only the top 0.5 % saturate


def test_voi_lut_sequence_wins_over_the_window():
    item = Dataset()
    item.LUTDescriptor = [1024, 0, 16]
    item.add_new("LUTData", "US", [min(4095, 4 * v) for v in range(1024)])  # 12 of the 16 bits used
    ds = _image_dataset(RAMP, bits_stored=10, WindowCenter=100, WindowWidth=10, VOILUTSequence=Sequence([item]))
    image = read_image(_to_bytes(ds))
    assert image.meta.window == "voi_lut"
    np.testing.assert_allclose(image.pixels, RAMP * 4 / 4092, atol=1e-6)


def test_rescale_is_applied_before_the_window():
    ds = _image_dataset(RAMP, bits_stored=10, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=2048)
    image = read_image(_to_bytes(ds))
    expected = np.clip((RAMP * 2.0 - 1000 + 0.5) / 2047 + 0.5, 0, 1)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)


def test_values_above_bits_stored_are_clipped_not_wrapped():
    pixels = RAMP.copy()
    pixels[:8] = 0x1010  # 4112 > 4095: masking to 12 bits would give 16 (dark)
    ds = _image_dataset(pixels, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    stored = decode_pixels(pydicom.dcmread(io.BytesIO(_to_bytes(ds))))
    assert (stored[:8] == 4095).all()
    image = read_image(_to_bytes(ds))
    assert (image.pixels[:8] == 1.0).all()
    assert np.isfinite(image.pixels).all()


def test_signed_values_without_sign_extension_are_sign_extended():
    values = np.array([[-100, 5], [-2048, 2047]], dtype=np.int16)
    unextended = (values.astype(np.int32) & 0x0FFF).astype(np.int16)  # sign bit 11 not extended
    ds = _image_dataset(np.tile(unextended, (8, 8)), bits_stored=12)
    stored = decode_pixels(pydicom.dcmread(io.BytesIO(_to_bytes(ds))))
    np.testing.assert_array_equal(stored[:2, :2], values)


def test_clip_to_bits_stored_rules():
    assert clip_to_bits_stored(np.array([4096, 1], np.uint16), 12, signed=False).tolist() == [4095, 1]
    assert clip_to_bits_stored(np.array([3000, -3000], np.int16), 12, signed=True).tolist() == [2047, -2048]
    assert clip_to_bits_stored(np.array([4095, 1], np.int16), 12, signed=True).tolist() == [-1, 1]
    full = np.array([65535], np.uint16)
    assert clip_to_bits_stored(full, 16, signed=False) is full


def test_dicom_without_preamble_or_file_meta():
    data = _to_bytes(_image_dataset(RAMP, bits_stored=10))
    reference = read_image(data).pixels
    np.testing.assert_array_equal(read_image(data[128:]).pixels, reference)  # starts with DICM
    assert read_dicom_header(data[128:]).rows == RAMP.shape[0]
    bare = io.BytesIO()
    ds = _image_dataset(RAMP, bits_stored=10)
    del ds.file_meta
    pydicom.dcmwrite(bare, ds, implicit_vr=True, little_endian=True)
    assert sniff_format(bare.getvalue()) == "dicom"
    np.testing.assert_array_equal(read_image(bare.getvalue()).pixels, reference)


def test_multiframe_native_all_frames():
    frames = np.stack([RAMP, RAMP[::-1], 1023 - RAMP])
    ds = _image_dataset(frames.reshape(-1, RAMP.shape[1]), bits_stored=10, WindowCenter=512, WindowWidth=1024)
    ds.Rows, ds.NumberOfFrames = RAMP.shape[0], 3
    every = read_image(_to_bytes(ds), frames="all").pixels
    assert every.shape == (3, *RAMP.shape)
    np.testing.assert_array_equal(every[0], read_image(_to_bytes(ds)).pixels)
    np.testing.assert_allclose(every[2], 1.0 - every[0], atol=2e-3)


def test_empty_input(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert _reason(tmp_path / "empty.dcm") is QuarantineReason.EMPTY
    assert _reason(b"") is QuarantineReason.EMPTY


def test_text_named_dcm_is_not_an_image(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("Patient called, will reschedule the hip X-ray.\n")
    assert _reason(path) is QuarantineReason.NOT_AN_IMAGE
    with pytest.raises(QuarantineError) as info:
        read_dicom_header(path)
    assert info.value.reason is QuarantineReason.NOT_AN_IMAGE


def test_missing_file_is_a_read_error(tmp_path):
    with pytest.raises(QuarantineError) as info:
        read_image(tmp_path / "nope.dcm")
    assert info.value.reason is QuarantineReason.READ_ERROR and "nope.dcm" in str(info.value)


def test_truncated_native_dicom_is_corrupt():
    data = _to_bytes(_image_dataset(RAMP, bits_stored=10))
    assert _reason(data[: len(data) // 2]) is QuarantineReason.CORRUPT


def test_structured_report_has_no_pixel_data():
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = pydicom.uid.BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.ValueType, ds.PatientName = "SR", "CONTAINER", "Doe^Jane"
    data = _to_bytes(ds)
    assert _reason(data) is QuarantineReason.NO_PIXEL_DATA
    with pytest.raises(QuarantineError) as info:
        read_dicom_header(data)
    assert info.value.reason is QuarantineReason.NO_PIXEL_DATA and "SR" in info.value.detail


def test_pixel_data_shorter_than_the_header_says_is_corrupt():
    ds = _image_dataset(RAMP, bits_stored=10)
    ds.PixelData = RAMP.tobytes()[:1000]
    assert _reason(_to_bytes(ds)) is QuarantineReason.CORRUPT


def test_huge_dimensions_are_too_large_without_allocating():
    ds = _image_dataset(RAMP, bits_stored=10)
    ds.Rows = ds.Columns = 65535  # 4.3 G pixels, 8.6 GB if decoded
    data = _to_bytes(ds)
    tracemalloc.start()
    try:
        assert _reason(data) is QuarantineReason.TOO_LARGE
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"peak {peak} bytes: the size check must come before decoding"


def test_max_pixels_counts_decoded_frames():
    ds = _image_dataset(np.concatenate([RAMP, RAMP]), bits_stored=10)
    ds.Rows, ds.NumberOfFrames = RAMP.shape[0], 2
    data = _to_bytes(ds)
    assert read_image(data, max_pixels=RAMP.size).pixels.shape == RAMP.shape
    assert _reason(data, max_pixels=RAMP.size, frames="all") is QuarantineReason.TOO_LARGE


def test_transfer_syntax_without_decoder_is_unsupported():
    ds = _image_dataset(RAMP, bits_stored=10)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])  # an MPEG-2 sequence header start
    ds["PixelData"].is_undefined_length = True
    assert _reason(_to_bytes(ds)) is QuarantineReason.UNSUPPORTED_SYNTAX


def test_unrenderable_photometric_is_unsupported():
    ds = _image_dataset(RAMP.astype(np.uint8), photometric="PALETTE COLOR")
    assert _reason(_to_bytes(ds)) is QuarantineReason.UNSUPPORTED_IMAGE


def _pillow_bytes(array: np.ndarray, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_png_8_bit_grey_is_scaled_by_255():
    grey = (RAMP % 256).astype(np.uint8)
    image = read_image(_pillow_bytes(grey, "PNG"), source="x.png")
    assert image.meta.format == "png" and image.meta.bits_stored == 8 and image.meta.window == "full_range"
    np.testing.assert_allclose(image.pixels, grey / 255.0, atol=1e-7)
    assert image.meta.patient_id is None and image.meta.rows == 64


def test_png_16_bit_grey_uses_robust_min_max():
    deep = (RAMP.astype(np.uint16) * 4 + 1000).astype(np.uint16)  # a 12-bit range inside 16 bits
    image = read_image(_pillow_bytes(deep, "PNG"))
    assert image.meta.bits_stored == 16 and image.meta.window == "percentile"
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0


def test_rgb_jpeg_becomes_grey():
    rgb = np.stack([RAMP % 256, (RAMP // 4) % 256, np.full_like(RAMP, 128)], axis=-1).astype(np.uint8)
    data = _pillow_bytes(rgb, "JPEG", quality=95)
    image = read_image(data, frames="all")
    assert image.meta.format == "jpeg" and image.meta.photometric == "RGB"
    assert image.pixels.shape == (1, *RAMP.shape)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32) / 255.0
    np.testing.assert_allclose(image.pixels[0], expected, atol=1.5 / 255)


def test_png_over_the_pixel_cap_is_too_large():
    assert _reason(_pillow_bytes(RAMP.astype(np.uint8), "PNG"), max_pixels=100) is QuarantineReason.TOO_LARGE


def test_broken_png_is_corrupt():
    data = _pillow_bytes(RAMP.astype(np.uint8), "PNG")
    assert _reason(data[:60]) is QuarantineReason.CORRUPT


def _j2k_header(rows: int, cols: int) -> bytes:
    """The start of a JPEG 2000 codestream: SOC, then a SIZ segment declaring ``rows`` x ``cols``."""
    import struct

    siz = struct.pack(">HHIIIIIIIIH", 41, 0, cols, rows, 0, 0, cols, rows, 0, 0, 1) + bytes([15, 1, 1])
    return b"\xff\x4f\xff\x51" + siz + bytes(200)


def _jpeg_header(rows: int, cols: int) -> bytes:
    """SOI, an APP0 segment, then a baseline SOF0 declaring ``rows`` x ``cols``."""
    import struct

    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + bytes(9)
    return b"\xff\xd8" + app0 + b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, rows, cols, 1) + bytes(3) + bytes(100)


def test_codestream_size_reads_jpeg_and_jpeg2000_headers():
    from msk.core.io.dicom import codestream_size

    assert codestream_size(_j2k_header(20000, 300)) == (20000, 300)
    assert codestream_size(_jpeg_header(64, 48)) == (64, 48)
    assert codestream_size(b"\x00\x00\x01\xb3" + bytes(60)) is None and codestream_size(b"\xff\xd8") is None


@pytest.mark.parametrize("syntax, header, reason, fragment", [
    (pydicom.uid.JPEG2000Lossless, _j2k_header(20000, 20000), QuarantineReason.TOO_LARGE, "20000x20000"),
    (pydicom.uid.JPEG2000, _j2k_header(128, 128), QuarantineReason.CORRUPT, "larger than the 64x48"),
    (pydicom.uid.JPEGBaseline8Bit, _jpeg_header(8000, 8000), QuarantineReason.TOO_LARGE, "8000x8000"),
])
def test_a_compressed_frame_larger_than_its_header_is_refused_before_decoding(syntax, header, reason, fragment):
    """A 2 KB DICOM whose header says 64x48 but whose codestream declares 20000x20000 was decoded in
    full (seconds, gigabytes) before failing; it is now refused from the codestream's own header."""
    import time

    ds = _image_dataset(RAMP.astype(np.uint8))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([header])
    ds["PixelData"].is_undefined_length = True
    began = time.perf_counter()
    with pytest.raises(QuarantineError) as info:
        read_image(_to_bytes(ds), max_pixels=50_000_000 if reason is QuarantineReason.CORRUPT else 10_000_000)
    assert info.value.reason is reason and fragment in str(info.value)
    assert time.perf_counter() - began < 1.0
