"""Real-world inputs: every real-xr file, BMP/TIFF scans, the modality filter and bad inputs
(photos of films, screenshots, colour photos, tiny, enormous and strip images), each either
ingested with a warning or quarantined with a reason, never a crash."""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin
from pydantic import ValidationError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from msk.core.cli import app
from msk.core.errors import QuarantineError, QuarantineReason
from msk.core.io.dataset import images_from_table, read_shards
from msk.core.io.dicom import LUMA, read_image, sniff_format
from msk.core.io.manifest import read_manifest
from msk.core.io.pseudonym import Pseudonymiser
from msk.core.io.screening import normalise_modalities
from msk.core.stages.ingest.pipeline import IngestConfig, ingest, process_file

KEY = b"test-key-0123456789abcdef"
RNG = np.random.default_rng(0)
# An asymmetric, smooth 8-bit test image (rows != cols, no symmetry), to check orientation and pixels.
ASYM = (np.arange(30)[:, None] * 4 + np.arange(44)[None, :] * 2 + 20).astype(np.uint8)


def _bytes(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _reason(data: bytes, **kw) -> QuarantineError:
    with pytest.raises(QuarantineError) as info:
        read_image(data, **kw)
    return info.value


def radiograph(rows: int = 200, cols: int = 160) -> np.ndarray:
    """A grey, radiograph-like 8-bit image: dark background, a bright 'bone' band, soft tissue."""
    i, j = np.mgrid[0:rows, 0:cols]
    soft = 70 * np.exp(-(((j - cols / 2) / (cols / 3)) ** 2))
    bone = 150 * (np.abs(j - cols / 2) < cols / 10)
    return np.clip(15 + soft + bone + 10 * np.sin(i / 7), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# real-xr: every file decodes (no Ray)


def _real_xr_rows(shared_data: Path) -> list[dict[str, str]]:
    with open(shared_data / "real-xr" / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.shared_data
def test_every_real_xr_file_decodes_ok(shared_data):
    rows = _real_xr_rows(shared_data)
    assert len(rows) == 1258
    coloured: dict[str, int] = {}
    for row in rows:
        image = read_image(shared_data / "real-xr" / row["path"])  # raises QuarantineError if not ok
        px = image.pixels
        assert px.dtype == np.float32 and px.shape == (int(row["height"]), int(row["width"])), row["path"]
        assert 0.0 <= px.min() and px.max() <= 1.0 and px.max() - px.min() > 0.1, row["path"]
        assert 0.005 < px.mean() < 0.95 and px.std() > 0.01, (row["path"], px.mean())  # a few are very dark
        assert image.meta.format == row["format"].lower() and image.meta.modality is None
        if image.meta.warnings:
            assert image.meta.warnings == ("colour_image",), row["path"]
            coloured[row["source"]] = coloured.get(row["source"], 0) + 1
    # Only the colour-tinted scoliosis JPEGs carry colour (README: 54 tinted in > 0.1 % of pixels).
    assert set(coloured) == {"scoliosis-spine"} and 20 <= coloured["scoliosis-spine"] <= 54, coloured


@pytest.mark.slow
@pytest.mark.shared_data
def test_a_handful_of_real_xr_files_ingest_ok_on_ray(shared_data, tmp_path, ray_session, pseudonym_key):
    rows = _real_xr_rows(shared_data)
    picked = {}
    for row in rows:  # the first two files of each source, plus the first colour-tinted one
        if sum(r["source"] == row["source"] for r in picked.values()) < 2:
            picked[row["path"]] = row
    tinted = next(r for r in rows if r["source"] == "scoliosis-spine"
                  and read_image(shared_data / "real-xr" / r["path"]).meta.warnings)
    picked[tinted["path"]] = tinted
    src = tmp_path / "src"
    for rel in picked:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).symlink_to(shared_data / "real-xr" / rel)
    report = ingest(src, tmp_path / "out", IngestConfig(image_size=64, batch_size=4), progress=False)
    assert (report.n_ok, report.n_quarantined) == (len(picked), 0)
    assert report.by_modality == {"none": len(picked)} and report.by_warning == {"colour_image": 1}
    manifest = {r["path"]: r for r in read_manifest(tmp_path / "out").to_pylist()}
    assert set(manifest) == set(picked)
    assert manifest[tinted["path"]]["warning"] == "colour_image"
    assert all(r["warning"] is None for p, r in manifest.items() if p != tinted["path"])
    assert all(r["modality"] is None and r["body_part"] is None for r in manifest.values())
    table = read_shards(tmp_path / "out")
    assert images_from_table(table).shape == (len(picked), 64, 64)
    ids = {r["image_id"]: picked[p] for p, r in manifest.items()}
    for image_id, fmt, h, w in zip(*(table.column(c).to_pylist()
                                     for c in ("image_id", "source_format", "source_height", "source_width"))):
        assert (fmt, h, w) == (ids[image_id]["format"].lower(), int(ids[image_id]["height"]),
                               int(ids[image_id]["width"]))
    summary = json.loads((tmp_path / "out" / "ingest.json").read_text())
    assert summary["by_modality"] == {"none": len(picked)} and summary["by_warning"] == {"colour_image": 1}


# --------------------------------------------------------------------------------------------
# BMP and TIFF


@pytest.mark.parametrize("head, fmt", [
    (b"BM" + bytes(12) + struct.pack("<I", 40) + bytes(16), "bmp"),
    (b"BM" + bytes(12) + struct.pack("<I", 124) + bytes(16), "bmp"),
    (b"BMW is a car, not a bitmap" + bytes(8), None),
    (b"II*\0" + bytes(28), "tiff"),
    (b"MM\0*" + bytes(28), "tiff"),
    (b"II+\0" + bytes(28), "tiff"),  # BigTIFF
    (b"MM\0+" + bytes(28), "tiff"),
])
def test_bmp_and_tiff_are_sniffed_by_magic(head, fmt):
    assert sniff_format(head) == fmt


def test_text_starting_with_bm_is_not_an_image():
    assert _reason(b"BMW service report\n" * 4).reason is QuarantineReason.NOT_AN_IMAGE


@pytest.mark.parametrize("fmt, save", [
    ("BMP", {}),
    ("TIFF", {}),
    ("TIFF", {"compression": "tiff_lzw"}),
    ("TIFF", {"big_tiff": True}),
])
def test_8_bit_grey_bmp_and_tiff_are_scaled_by_255(fmt, save):
    image = read_image(_bytes(Image.fromarray(ASYM), fmt, **save))
    assert image.meta.format == fmt.lower() and image.meta.window == "full_range" and image.meta.warnings == ()
    np.testing.assert_allclose(image.pixels, ASYM / 255.0, atol=1e-7)


def test_16_bit_tiff_uses_the_percentile_rule_like_16_bit_png():
    deep = (ASYM.astype(np.uint16) * 16 + 500).astype(np.uint16)  # 12-bit data inside 16 bits
    tiff = read_image(_bytes(Image.fromarray(deep), "TIFF"))
    png = read_image(_bytes(Image.fromarray(deep), "PNG"))
    assert tiff.meta.bits_stored == 16 and tiff.meta.window == "percentile"
    np.testing.assert_array_equal(tiff.pixels, png.pixels)
    assert tiff.pixels.min() == 0.0 and tiff.pixels.max() == 1.0
    assert np.corrcoef(tiff.pixels.ravel(), deep.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_rgb_bmp_and_tiff_become_luminance(fmt):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10], rgb[:, 10:20], rgb[:, 20:] = (200, 40, 10), (10, 200, 40), (40, 10, 200)
    image = read_image(_bytes(Image.fromarray(rgb), fmt))
    assert image.meta.photometric == "RGB" and image.meta.warnings == ("colour_image",)
    np.testing.assert_allclose(image.pixels, rgb.astype(np.float32) @ LUMA / 255, atol=1e-6)


def test_tiff_min_is_white_is_inverted_at_8_and_16_bits(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    deep = (ASYM.astype(np.uint16) * 200).astype(np.uint16)
    for name, data in (("8.tif", ASYM), ("16.tif", deep)):
        tifffile.imwrite(tmp_path / f"white-{name}", data, photometric="miniswhite")
        tifffile.imwrite(tmp_path / f"black-{name}", data, photometric="minisblack")
        white, black = read_image(tmp_path / f"white-{name}"), read_image(tmp_path / f"black-{name}")
        np.testing.assert_allclose(white.pixels, 1.0 - black.pixels, atol=1e-6)
        assert black.pixels[0, 0] < black.pixels[-1, -1]  # the ramp itself, not inverted


def test_multi_page_tiff_gives_the_first_page_or_all_pages():
    pages = [Image.fromarray(ASYM), Image.fromarray(255 - ASYM)]
    data = _bytes(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    first = read_image(data)
    assert first.pixels.shape == ASYM.shape and first.meta.n_frames == 2
    np.testing.assert_allclose(first.pixels, ASYM / 255.0, atol=1e-7)
    both = read_image(data, frames="all")
    assert both.pixels.shape == (2, *ASYM.shape)
    np.testing.assert_allclose(both.pixels[1], (255 - ASYM) / 255.0, atol=1e-7)
    # max_pixels counts the decoded pages, checked before decoding
    assert _reason(data, frames="all", max_pixels=ASYM.size + 1).reason is QuarantineReason.TOO_LARGE
    read_image(data, max_pixels=ASYM.size + 1)


# What each EXIF/TIFF Orientation value means for the stored array (PIL.ImageOps.exif_transpose).
ORIENTED = {1: lambda a: a, 3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1),
            8: lambda a: np.rot90(a, 1), 2: lambda a: a[:, ::-1], 5: lambda a: a.T}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "JPEG"])
def test_exif_and_tiff_orientation_is_applied(fmt, orientation):
    image = Image.fromarray(ASYM)
    if fmt == "TIFF":
        info = TiffImagePlugin.ImageFileDirectory_v2()
        info[274] = orientation
        data = _bytes(image, fmt, tiffinfo=info)
    else:
        exif = Image.Exif()
        exif[274] = orientation
        data = _bytes(image, fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
    decoded = read_image(data)
    expected = ORIENTED[orientation](ASYM) / 255.0
    assert decoded.pixels.shape == expected.shape
    np.testing.assert_allclose(decoded.pixels, expected, atol=4 / 255 if fmt == "JPEG" else 1e-7)
    assert (decoded.meta.rows, decoded.meta.cols) == expected.shape


def _bmp_header_only(width: int, height: int) -> bytes:
    """An 8-bit BMP whose header claims ``width`` x ``height`` but that holds no pixel data."""
    offset = 14 + 40 + 256 * 4
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 2835, 2835, 256, 0)
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    return b"BM" + struct.pack("<IHHI", offset + width * height, 0, 0, offset) + info + palette


def test_bmp_size_is_checked_from_the_header_before_decoding():
    error = _reason(_bmp_header_only(8000, 8000))  # 64 M pixels > 50 M, below Pillow's own bomb limit
    assert error.reason is QuarantineReason.TOO_LARGE and "max_pixels" in error.detail
    assert _reason(_bmp_header_only(100, 100)).reason is QuarantineReason.CORRUPT  # truncated: decoded


# --------------------------------------------------------------------------------------------
# Modality filter (process_file: no Ray)


def write_dicom(path: Path, modality: str | None, *, body_part: str | None = "HAND",
                truncate: bool = False, rows: int = 96, cols: int = 80) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = generate_uid(), generate_uid(), "MRN-1"
    if modality is not None:
        ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = (np.arange(rows * cols).reshape(rows, cols) % 4096).astype("<u2").tobytes()
    ds.PixelData = pixels[: len(pixels) // 3] if truncate else pixels
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def run_one(tmp: Path, rel: str, **config) -> dict:
    return process_file(tmp, rel, IngestConfig(**({"image_size": 64} | config)), Pseudonymiser(KEY))


def test_modality_tokens_are_normalised_and_an_empty_list_is_refused():
    assert normalise_modalities(["cr, dx", "None", "CR"]) == ["CR", "DX", "none"]
    assert IngestConfig(modalities=["dx"]).modalities == ["DX"]
    with pytest.raises(ValidationError, match="no modality listed"):
        IngestConfig(modalities=[" , "])


def test_excluded_modality_is_quarantined_from_the_header_before_decoding(tmp_path):
    write_dicom(tmp_path / "ct.dcm", "CT", body_part="CHEST", truncate=True)  # decoding would fail
    row = run_one(tmp_path, "ct.dcm", modalities=["CR", "DX"])
    assert (row["status"], row["reason"]) == ("quarantined", "excluded_modality")
    assert "CT" in row["detail"] and "--modality CR,DX,CT" in row["detail"]
    assert (row["modality"], row["body_part"]) == ("CT", "CHEST")
    assert run_one(tmp_path, "ct.dcm")["reason"] == "corrupt"  # the default keeps (and decodes) it


def test_listed_modalities_are_kept_and_recorded(tmp_path):
    write_dicom(tmp_path / "cr.dcm", "CR")
    write_dicom(tmp_path / "dx.dcm", "DX", body_part="KNEE")
    for rel, modality, body_part in (("cr.dcm", "CR", "HAND"), ("dx.dcm", "DX", "KNEE")):
        row = run_one(tmp_path, rel, modalities=["CR", "DX"])
        assert (row["status"], row["modality"], row["body_part"]) == ("ok", modality, body_part)


def test_files_without_a_modality_are_kept_only_with_the_none_token(tmp_path):
    Image.fromarray(radiograph()).save(tmp_path / "film.png")
    write_dicom(tmp_path / "untagged.dcm", None)
    for rel in ("film.png", "untagged.dcm"):
        row = run_one(tmp_path, rel, modalities=["CR"])
        assert row["reason"] == "excluded_modality" and "add none" in row["detail"], row
        assert run_one(tmp_path, rel, modalities=["CR", "none"])["status"] == "ok"
        assert run_one(tmp_path, rel)["status"] == "ok"
    assert "PNG file" in run_one(tmp_path, "film.png", modalities=["CR"])["detail"]


# --------------------------------------------------------------------------------------------
# Bad input: each case is ingested with a warning or quarantined with a reason (no Ray)


def test_photo_of_a_film_is_ingested_with_a_colour_warning(tmp_path):
    grey = radiograph(240, 320).astype(np.float32)
    i, j = np.mgrid[0:240, 0:320]
    vignette = 1.0 - 0.35 * (((i - 120) / 120) ** 2 + ((j - 160) / 160) ** 2)
    light = grey * vignette + 40 + RNG.normal(0, 3, grey.shape)  # a lightbox behind the film
    cast = np.stack([light + 14, light + 2, light - 12], axis=-1)  # warm white balance
    Image.fromarray(np.clip(cast, 0, 255).astype(np.uint8)).save(tmp_path / "photo.jpg", quality=85)
    row = run_one(tmp_path, "photo.jpg")
    assert (row["status"], row["warning"]) == ("ok", "colour_image")


def test_screenshot_is_ingested_with_a_colour_warning(tmp_path):
    screen = np.full((300, 480, 4), 255, np.uint8)  # RGBA, as screenshots often are
    screen[:24, :, :3] = (30, 90, 200)  # title bar
    screen[40:290, 100:380, :3] = radiograph(250, 280)[..., None]  # the viewer's image
    screen[260:280, 400:460, :3] = (220, 40, 40)  # a button
    Image.fromarray(screen, mode="RGBA").save(tmp_path / "screenshot.png")
    row = run_one(tmp_path, "screenshot.png")
    assert (row["status"], row["warning"]) == ("ok", "colour_image")


def test_colour_photo_is_ingested_with_a_colour_warning(tmp_path):
    i, j = np.mgrid[0:200, 0:300]
    photo = np.stack([120 + 100 * np.sin(i / 20), 120 + 100 * np.cos(j / 25), 100 + 0 * i], axis=-1)
    Image.fromarray(photo.astype(np.uint8)).save(tmp_path / "holiday.jpg")
    row = run_one(tmp_path, "holiday.jpg")
    assert (row["status"], row["warning"]) == ("ok", "colour_image")


def test_grey_rgb_jpeg_and_a_small_coloured_label_do_not_warn(tmp_path):
    rgb = np.repeat(radiograph()[..., None], 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "grey.jpg", quality=75)  # JPEG chroma noise only
    rgb[5:12, 5:25] = (255, 0, 0)  # a red side marker: 140 of 32,000 pixels (0.4 %)
    Image.fromarray(rgb).save(tmp_path / "marker.png")
    for rel in ("grey.jpg", "marker.png"):
        row = run_one(tmp_path, rel)
        assert (row["status"], row["warning"]) == ("ok", None), rel


def test_tiny_image_is_ingested_as_small_and_upscaled(tmp_path):
    Image.fromarray(radiograph(40, 48)).save(tmp_path / "tiny.png")
    row = run_one(tmp_path, "tiny.png", image_size=256)
    assert (row["status"], row["warning"]) == ("ok", "small_image; upscaled")
    assert (row["source_height"], row["source_width"], row["height"]) == (40, 48, 256)


def test_moderately_small_image_is_only_upscaled(tmp_path):
    Image.fromarray(radiograph(100, 120)).save(tmp_path / "small.png")
    assert run_one(tmp_path, "small.png", image_size=256)["warning"] == "upscaled"  # 2.1 x
    assert run_one(tmp_path, "small.png", image_size=128)["warning"] is None  # 1.07 x


def test_image_below_min_side_is_quarantined_too_small(tmp_path):
    Image.fromarray(radiograph(10, 12)).save(tmp_path / "icon.png")
    row = run_one(tmp_path, "icon.png")
    assert (row["status"], row["reason"]) == ("quarantined", "too_small") and "min_side 16" in row["detail"]
    assert run_one(tmp_path, "icon.png", min_side=8)["warning"] == "small_image; upscaled"


def test_one_pixel_high_strip_is_quarantined_too_small(tmp_path):
    Image.fromarray(radiograph(1, 500)).save(tmp_path / "strip.png")
    row = run_one(tmp_path, "strip.png")
    assert row["reason"] == "too_small" and "1x500" in row["detail"]


def test_extreme_aspect_strip_is_quarantined(tmp_path):
    Image.fromarray(radiograph(30, 600)).save(tmp_path / "ruler.tif")
    row = run_one(tmp_path, "ruler.tif")
    assert row["reason"] == "extreme_aspect" and "aspect ratio 20.0 > max_aspect 10" in row["detail"]
    assert run_one(tmp_path, "ruler.tif", max_aspect=25)["status"] == "ok"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (8-bit grey) followed by a stub IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_enormous_image_is_quarantined_too_large_from_its_header(tmp_path):
    (tmp_path / "pano.png").write_bytes(_png_header_only(9000, 7000))  # 63 M pixels, a few bytes
    (tmp_path / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    row = run_one(tmp_path, "pano.png")
    assert row["reason"] == "too_large" and "max_pixels 50000000" in row["detail"]
    assert run_one(tmp_path, "bomb.png")["reason"] == "too_large"


# --------------------------------------------------------------------------------------------
# All of it in one Ray ingest through the CLI: nothing crashes, the summary says what was kept


@pytest.fixture(scope="module")
def mixed_export(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("mixed") / "src"
    write_dicom(src / "cr.dcm", "CR")
    write_dicom(src / "dx.dcm", "DX", body_part="KNEE")
    write_dicom(src / "ct.dcm", "CT", body_part="CHEST")
    Image.fromarray(radiograph()).save(src / "scan.tif")
    Image.fromarray(np.repeat(radiograph()[..., None], 3, -1)).save(src / "scan.bmp")
    Image.fromarray(radiograph(40, 48)).save(src / "tiny.png")
    Image.fromarray(radiograph(1, 500)).save(src / "strip.png")
    i, j = np.mgrid[0:100, 0:120]
    Image.fromarray(np.stack([i * 2, j * 2, 0 * i + 60], -1).astype(np.uint8)).save(src / "photo.jpg")
    (src / "pano.png").write_bytes(_png_header_only(9000, 7000))
    return src


@pytest.mark.slow
def test_cli_ingest_of_mixed_input_keeps_all_by_default_and_says_what(mixed_export, tmp_path, ray_session,
                                                                     pseudonym_key):
    result = CliRunner().invoke(app, ["ingest", str(mixed_export), str(tmp_path / "out"), "--image-size", "32"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "9 inputs: 7 ok, 2 quarantined (too_large: 1, too_small: 1)" in result.output
    assert "kept by modality: none 4, CR 1, CT 1, DX 1" in result.output
    assert "warnings: colour_image 1, small_image 1" in result.output  # upscaled only above 2x: 32 px here
    summary = json.loads((tmp_path / "out" / "ingest.json").read_text())
    assert summary["by_modality"] == {"none": 4, "CR": 1, "CT": 1, "DX": 1}
    manifest = {r["path"]: r for r in read_manifest(tmp_path / "out").to_pylist()}
    assert (manifest["dx.dcm"]["modality"], manifest["dx.dcm"]["body_part"]) == ("DX", "KNEE")
    assert manifest["photo.jpg"]["warning"] == "colour_image" and manifest["scan.bmp"]["warning"] is None


@pytest.mark.slow
def test_cli_modality_filter_quarantines_the_rest(mixed_export, tmp_path, ray_session, pseudonym_key):
    result = CliRunner().invoke(app, ["ingest", str(mixed_export), str(tmp_path / "out"), "--image-size", "32",
                                      "--modality", "CR,dx"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "9 inputs: 2 ok, 7 quarantined (excluded_modality: 7)" in result.output
    assert "kept by modality: CR 1, DX 1" in result.output
    manifest = {r["path"]: r for r in read_manifest(tmp_path / "out").to_pylist()}
    assert manifest["ct.dcm"]["modality"] == "CT" and manifest["ct.dcm"]["reason"] == "excluded_modality"
    assert json.loads((tmp_path / "out" / "ingest.json").read_text())["config"]["modalities"] == ["CR", "DX"]
