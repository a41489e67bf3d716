"""Read radiographs (DICOM, PNG, JPEG, BMP, TIFF) into display-ready ``float32`` images in ``[0, 1]``.

:func:`read_image` is the one entry point of the ingest: it takes bytes or a path, decides the
format from the content (never from the file name) and returns a :class:`DecodedImage`, or
raises :class:`~msk.core.errors.QuarantineError` with the machine-readable reason. It never
raises anything else, so a caller can quarantine every failure without guessing. Its ``check``
callback sees the header facts (:class:`ImageMeta`) before any pixel is decoded, so a caller
can quarantine on modality or size cheaply.

DICOM pixel pipeline, in this order (each step is a public function, see docs/reader.md):

1. **Decode** the stored values with pydicom 3's pixel API (:func:`decode_pixels`); JPEG
   baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K and RLE come from the pylibjpeg and
   Pillow plugins. ``frames="first"`` decodes only frame 0 of a multi-frame object.
2. **Clip to Bits Stored** (:func:`clip_to_bits_stored`), the "16-bit overflow" rule: unsigned
   values above ``2**BitsStored - 1`` are *clipped* to it (not masked: masking would wrap a
   too-bright pixel to a dark one); signed values whose sign bit was not extended into the
   unused high bits (every value in ``[0, 2**BitsStored)``) are sign-extended, any other
   out-of-range signed value is clipped.
3. **Modality LUT** (:func:`apply_modality`): the Modality LUT Sequence if present, else
   Rescale Slope/Intercept (``pydicom.pixels.apply_modality_lut``).
4. **VOI** to ``[0, 1]`` (:func:`apply_voi`): the first VOI LUT Sequence item if present, else
   the first Window Center/Width (with its VOI LUT Function), else a robust min-max between the
   0.5th and 99.5th percentiles. A header VOI that leaves fewer than 1 % of the pixels
   unsaturated contradicts the data (e.g. a window for signed values on offset data) and is
   replaced by the percentile rule.
5. **Polarity**: MONOCHROME1 (and MONOCHROME2 with Presentation LUT Shape INVERSE) is inverted,
   so bone is always bright.

Colour DICOM (RGB, YBR_* converted to RGB by pydicom) is turned into luminance (ITU-R BT.601
weights) and scaled by its full range; Modality LUT and VOI do not apply to colour. PNG, JPEG,
BMP and TIFF go through Pillow, with the EXIF/TIFF orientation applied: 8-bit grey or colour is
scaled by 255, 16/32-bit grey by the percentile rule (a 16/32-bit TIFF stored MinIsWhite is
inverted; Pillow already inverts 1-8 bit ones). A multi-page TIFF gives its first page, or every
page with ``frames="all"``.

Warnings (``ImageMeta.warnings``): an image that is usable but suspicious is decoded and flagged,
not quarantined. The reader sets ``colour_image`` when the source holds real colour: a chroma
(max - min of R, G, B) above :data:`COLOUR_CHROMA` of the full range in more than
:data:`COLOUR_MIN_FRACTION` of the pixels (JPEG chroma noise of a grey radiograph stays far below
it; a tinted scan, a photo of a film with a colour cast, a screenshot or a colour photo do not).
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import pydicom
import pydicom.encaps
import pydicom.filereader
import pydicom.pixels
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from msk.core.errors import QuarantineError, QuarantineReason

__all__ = [
    "DecodedImage",
    "ImageMeta",
    "apply_modality",
    "apply_voi",
    "clip_to_bits_stored",
    "decode_dicom",
    "decode_pixels",
    "has_colour",
    "read_dicom_header",
    "read_image",
    "sniff_format",
]

Format = Literal["dicom", "png", "jpeg", "bmp", "tiff"]
Frames = Literal["first", "all"]

#: Photometric interpretations msk renders; pydicom turns YBR_FULL(_422) into RGB when
#: decoding and the JPEG 2000 decoders already return YBR_ICT/RCT as RGB.
MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})

#: Fraction of pixels a header VOI must leave strictly inside (0, 1) to be trusted.
MIN_UNSATURATED = 0.01
#: Percentiles of the robust min-max used when the header has no usable VOI.
PERCENTILES = (0.5, 99.5)
#: At most this many values are sampled (evenly strided) to compute the percentiles.
PERCENTILE_SAMPLES = 1_000_000
#: ITU-R BT.601 luma weights (what Pillow's ``convert("L")`` uses).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: A pixel is coloured when max - min of its R, G, B exceeds this fraction of the full range
#: (16 of 255); measured on real-xr, the grey RGB JPEGs of roboflow-fracture have none above it.
COLOUR_CHROMA = 16 / 255
#: ... and the image is ``colour_image`` when more than this fraction of its pixels are.
COLOUR_MIN_FRACTION = 0.01
#: Warning: the source had real colour (it was converted to luminance).
WARN_COLOUR = "colour_image"
#: Warning: the EXIF/TIFF orientation could not be read; the image is used as stored.
WARN_ORIENTATION = "orientation_unknown"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
#: Classic TIFF and BigTIFF, little and big endian.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Sizes of the BMP info headers (BITMAPCOREHEADER ... BITMAPV5HEADER, OS/2 2.x) at offset 14.
_BMP_INFO_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
#: Pillow's format names of the formats it decodes for msk (never any other plugin).
_PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Values above this size are not loaded when only the header is read.
_HEADER_DEFER_BYTES = 4096


@dataclass(frozen=True)
class ImageMeta:
    """Raw header facts of one input.

    Identifying fields (patient, UIDs, dates, institution) are present here because the
    pseudonymiser needs them; only :mod:`msk.core.io.pseudonym` may turn them into anything that
    is written out. They are left out of ``repr()`` so that logging a meta leaks nothing.
    """

    source: str = field(repr=False)  # a path can hold a name
    format: Format
    modality: str | None
    sop_class_uid: str | None
    transfer_syntax_uid: str | None
    photometric: str | None
    bits_stored: int | None
    rows: int
    cols: int
    n_frames: int
    body_part: str | None
    view_position: str | None
    laterality: str | None
    patient_id: str | None = field(repr=False)
    patient_name: str | None = field(repr=False)
    patient_birth_date: str | None = field(repr=False)
    patient_sex: str | None
    patient_age: str | None
    study_uid: str | None = field(repr=False)
    series_uid: str | None = field(repr=False)
    sop_uid: str | None = field(repr=False)
    study_date: str | None = field(repr=False)
    institution: str | None = field(repr=False)
    #: How intensities were mapped to [0, 1]: "voi_lut", "window:<center>/<width>",
    #: "percentile", "percentile:header_voi_rejected", "full_range"; "none" for a header.
    window: str = "none"
    #: Why the image is usable but suspicious, e.g. ("colour_image",); callers may add their own
    #: (ingest adds "small_image", "upscaled"). Written to the manifest's ``warning`` column.
    warnings: tuple[str, ...] = ()
    #: DICOM BurnedInAnnotation is YES: the pixels carry text (pixel scrubbing, msk.core.data.scrub).
    burned_in: bool = False


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: ``pixels`` is float32 in [0, 1], bone bright, grey.

    Shape ``[H, W]``, or ``[F, H, W]`` when read with ``frames="all"``.
    """

    pixels: np.ndarray = field(repr=False)
    meta: ImageMeta

    def __repr__(self) -> str:
        return f"DecodedImage(shape={tuple(self.pixels.shape)}, dtype={self.pixels.dtype}, meta={self.meta!r})"


# --------------------------------------------------------------------------------------------
# Entry points


def read_image(
    data: bytes | str | os.PathLike,
    *,
    source: str | None = None,
    max_pixels: int = 50_000_000,
    frames: Frames = "first",
    check: Callable[[ImageMeta], None] | None = None,
) -> DecodedImage:
    """Decode a DICOM, PNG, JPEG, BMP or TIFF file (bytes or path) into a :class:`DecodedImage`.

    ``max_pixels`` caps ``rows * cols * decoded frames``; it is checked from the header before
    any pixel is decoded. ``frames="all"`` returns every frame (TIFF: page) as ``[F, H, W]``.
    ``check``, if given, is called with the header facts (``window == "none"``; ``rows``/``cols``
    as stored, before any orientation) before the size cap and before any pixel is decoded; it
    may raise :class:`QuarantineError` to stop there (ingest's modality filter and size limits).
    Raises :class:`QuarantineError` (and nothing else) for any input that cannot be used.
    """
    if frames not in ("first", "all"):
        raise ValueError(f"frames must be 'first' or 'all', not {frames!r}")
    raw, source = _load(data, source)
    try:
        with _quiet_pydicom():
            return _decode_bytes(raw, source, max_pixels, frames, check)
    except QuarantineError:
        raise
    except MemoryError as exc:
        raise QuarantineError(QuarantineReason.TOO_LARGE, f"out of memory while decoding: {exc}", source) from exc
    except Exception as exc:  # noqa: BLE001 - the contract: every failure is a quarantine reason
        raise QuarantineError(QuarantineReason.CORRUPT, f"{type(exc).__name__}: {exc}", source) from exc


def _decode_bytes(raw: bytes, source: str, max_pixels: int, frames: Frames,
                  check: Callable[[ImageMeta], None] | None) -> DecodedImage:
    fmt = sniff_format(raw)
    if fmt == "dicom":
        ds = _parse_dicom(io.BytesIO(_with_preamble(raw)), source, max_pixels=max_pixels)
        return decode_dicom(ds, source=source, max_pixels=max_pixels, frames=frames, check=check)
    if fmt in _PILLOW_FORMATS:
        return _decode_pillow(raw, fmt, source, max_pixels, frames, check)
    raise QuarantineError(
        QuarantineReason.NOT_AN_IMAGE, f"neither DICOM nor PNG/JPEG/BMP/TIFF (starts with {raw[:8]!r})", source
    )


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings about non-conformant header values (every archive has them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
        yield


def read_dicom_header(data: bytes | str | os.PathLike, *, source: str | None = None) -> ImageMeta:
    """Read the header facts of a DICOM image without decoding (or even loading) its pixels.

    Raises :class:`QuarantineError`: EMPTY, READ_ERROR, NOT_AN_IMAGE for non-DICOM input,
    NO_PIXEL_DATA for a DICOM object without an image, CORRUPT for an unreadable header.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw, source = _load(data, source)
        return _header_from_fileobj(io.BytesIO(_with_preamble(raw)), raw[:132], source)
    path = Path(data)
    source = source if source is not None else str(path)
    try:
        with path.open("rb") as f:
            head = f.read(132)
            if head[:4] == b"DICM":  # no preamble: give it one in memory
                return _header_from_fileobj(io.BytesIO(_with_preamble(head + f.read())), head, source)
            f.seek(0)
            return _header_from_fileobj(f, head, source)
    except OSError as exc:
        raise QuarantineError(QuarantineReason.READ_ERROR, f"cannot read: {exc}", source) from exc


def _header_from_fileobj(fileobj: BinaryIO, head: bytes, source: str) -> ImageMeta:
    if not head:
        raise QuarantineError(QuarantineReason.EMPTY, "file is empty (0 bytes)", source)
    if sniff_format(head) != "dicom":
        raise QuarantineError(QuarantineReason.NOT_AN_IMAGE, "not a DICOM file", source)
    try:
        with _quiet_pydicom():
            ds = _parse_dicom(fileobj, source, defer_size=_HEADER_DEFER_BYTES)
            _require_pixel_data(ds, source)
            return _dicom_meta(ds, source)
    except QuarantineError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise QuarantineError(QuarantineReason.CORRUPT, f"{type(exc).__name__}: {exc}", source) from exc


def sniff_format(head: bytes) -> Format | None:
    """The format of a file from its first bytes (at least 132 for a DICOM preamble), or None.

    DICOM is recognised with the 128-byte preamble + ``DICM``, with ``DICM`` but no preamble,
    and as a bare data set (no preamble, no file meta: old ACR-NEMA style exports) whose first
    element is a plausible group 0002-0030 tag in explicit or implicit VR little endian.
    TIFF by ``II*\\0`` / ``MM\\0*`` (BigTIFF: ``II+\\0`` / ``MM\\0+``); BMP by ``BM`` followed, at
    byte 14, by the size of one of the known BMP info headers (so a text starting "BM" is not one).
    """
    if head[128:132] == b"DICM" or head[:4] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head[:2] == b"BM" and len(head) >= 18 and struct.unpack("<I", head[14:18])[0] in _BMP_INFO_SIZES:
        return "bmp"
    if _looks_like_bare_dataset(head):
        return "dicom"
    return None


def _looks_like_bare_dataset(head: bytes) -> bool:
    if len(head) < 8:
        return False
    group, _element = struct.unpack("<HH", head[:4])
    # Printable text starts with a "group" >= 0x2020, so this rules out text named .dcm.
    if group % 2 or not 0x0002 <= group <= 0x0030:
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():  # explicit VR
        return True
    (length,) = struct.unpack("<I", head[4:8])  # implicit VR: a sane value length
    return length < (1 << 24) or length == 0xFFFFFFFF


def _with_preamble(raw: bytes) -> bytes:
    """pydicom expects ``DICM`` at offset 128; give a preamble to files that start with it."""
    return bytes(128) + raw if raw[:4] == b"DICM" else raw


def _load(data: bytes | str | os.PathLike, source: str | None) -> tuple[bytes, str]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        source = source if source is not None else "<bytes>"
    else:
        source = source if source is not None else str(data)
        try:
            raw = Path(data).read_bytes()
        except OSError as exc:
            raise QuarantineError(QuarantineReason.READ_ERROR, f"cannot read: {exc}", source) from exc
    if not raw:
        raise QuarantineError(QuarantineReason.EMPTY, "file is empty (0 bytes)", source)
    return raw, source


# --------------------------------------------------------------------------------------------
# DICOM


#: A Deflated Explicit VR data set may inflate to at most this many bytes per ``max_pixels``
#: (3 samples of 16 bits are 6), plus :data:`INFLATE_SLACK` for the header.
INFLATE_BYTES_PER_PIXEL = 8
INFLATE_SLACK = 16 << 20


def _check_inflated_size(fileobj: BinaryIO, source: str, limit: int) -> None:
    """Refuse a Deflated Explicit VR Little Endian data set that inflates to more than ``limit``
    bytes, measured by inflating it in bounded chunks (nothing kept) before pydicom inflates it
    whole: 1 MB of deflated zeros is a 1 GiB data set (a decompression bomb no header shows)."""
    start = fileobj.tell()
    try:
        pydicom.filereader.read_preamble(fileobj, True)
        syntax = pydicom.filereader._read_file_meta_info(fileobj).get("TransferSyntaxUID")
        if syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
            return
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while chunk := fileobj.read(1 << 16):
            while chunk and not inflater.eof:
                total += len(inflater.decompress(chunk, 1 << 20))
                if total > limit:
                    raise QuarantineError(QuarantineReason.TOO_LARGE, f"the deflated data set inflates to more "
                                          f"than {limit} bytes (a decompression bomb?)", source)
                chunk = inflater.unconsumed_tail
    except (zlib.error, ValueError, EOFError, struct.error, OSError):
        return  # not readable as such: pydicom decides
    finally:
        fileobj.seek(start)


def _parse_dicom(fileobj: BinaryIO, source: str, defer_size: int | None = None,
                 max_pixels: int = 50_000_000) -> Dataset:
    """Parse a DICOM stream (forcefully: no preamble/file meta allowed), detecting truncation.

    pydicom turns an end of file inside an undefined-length element (encapsulated pixel
    data, sequences) into a warning and silently drops the element; that is a CORRUPT file
    here, not one without pixel data. A missing Transfer Syntax UID is set from the encoding
    pydicom detected (implicit or explicit VR, little or big endian). A deflated data set larger
    than ``max_pixels`` allows is TOO_LARGE before it is inflated (:func:`_check_inflated_size`).
    """
    _check_inflated_size(fileobj, source, max_pixels * INFLATE_BYTES_PER_PIXEL + INFLATE_SLACK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(fileobj, force=True, defer_size=defer_size)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad files
            raise QuarantineError(QuarantineReason.CORRUPT, f"unreadable DICOM: {exc}", source) from exc
    truncated = [str(w.message) for w in caught if "End of file reached" in str(w.message)]
    if truncated:
        raise QuarantineError(QuarantineReason.CORRUPT, f"truncated file: {truncated[0]}", source)
    if len(ds) == 0:
        raise QuarantineError(QuarantineReason.CORRUPT, "no DICOM data elements could be read", source)
    _ensure_transfer_syntax(ds)
    return ds


def _ensure_transfer_syntax(ds: Dataset) -> None:
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is None:
        ds.file_meta = file_meta = FileMetaDataset()
    if file_meta.get("TransferSyntaxUID"):
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:  # pydicom could not tell; implicit VR LE is the DICOM default
        implicit, little = True, True
    if implicit:
        file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    elif little:
        file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    else:
        file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian


def _require_pixel_data(ds: Dataset, source: str) -> None:
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        what = _text(ds, "SOPClassUID")
        what = UID(what).name if what else "object"
        raise QuarantineError(QuarantineReason.NO_PIXEL_DATA, f"DICOM {what} has no Pixel Data", source)


def decode_dicom(
    ds: Dataset, *, source: str = "", max_pixels: int = 50_000_000, frames: Frames = "first",
    check: Callable[[ImageMeta], None] | None = None,
) -> DecodedImage:
    """Run the whole pixel pipeline (module docstring) on a parsed data set.

    ``check`` is called with the header facts before anything else is checked or decoded.
    """
    _require_pixel_data(ds, source)
    _ensure_transfer_syntax(ds)
    meta = _dicom_meta(ds, source)
    if check is not None:
        check(meta)
    photometric = meta.photometric or ""
    if "PixelData" not in ds:
        raise QuarantineError(QuarantineReason.UNSUPPORTED_IMAGE, "float pixel data is not a radiograph", source)
    if meta.rows <= 0 or meta.cols <= 0:
        raise QuarantineError(QuarantineReason.CORRUPT, f"invalid size {meta.rows}x{meta.cols}", source)
    if photometric not in MONOCHROME | COLOUR:
        raise QuarantineError(
            QuarantineReason.UNSUPPORTED_IMAGE, f"photometric interpretation {photometric or '(missing)'!r}", source
        )
    n_pixels = meta.rows * meta.cols * (meta.n_frames if frames == "all" else 1)
    if n_pixels > max_pixels:
        raise QuarantineError(
            QuarantineReason.TOO_LARGE,
            f"{meta.rows}x{meta.cols}" + (f"x{meta.n_frames} frames" if frames == "all" else "")
            + f" = {n_pixels} pixels > max_pixels {max_pixels}",
            source,
        )
    _require_decoder(ds, source)
    _check_codestream(ds, meta, max_pixels, source)

    stored = decode_pixels(ds, frames=frames, source=source)
    found: tuple[str, ...] = ()
    if photometric in COLOUR:
        scale = float((1 << int(ds.get("BitsStored") or 8)) - 1)
        pixels, window = np.clip(_luminance(stored) / scale, 0.0, 1.0), "full_range"
        found = (WARN_COLOUR,) if has_colour(stored, scale) else ()
    else:
        pixels, window = apply_voi(apply_modality(stored, ds), ds)
        if _inverted(ds):
            np.subtract(1.0, pixels, out=pixels)
    return DecodedImage(np.ascontiguousarray(pixels, dtype=np.float32),
                        replace(meta, window=window, warnings=found))


#: JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic) and JPEG-LS SOF55.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def codestream_size(data: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` a compressed frame declares in its own header, read without decoding:
    the SOF segment of JPEG / JPEG-LS, the SIZ marker of JPEG 2000 (raw codestream or JP2);
    ``None`` for anything else or an unreadable header (the decoder then decides)."""
    try:
        if data[:2] == b"\xff\x4f" or data[4:8] == b"jP  ":  # J2K codestream, or a JP2 file around one
            at = data.find(b"\xff\x4f\xff\x51", 0, 4096)
            if at < 0:
                return None
            xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", data[at + 8:at + 24])
            return ysiz - yosiz, xsiz - xosiz
        if data[:2] == b"\xff\xd8":  # JPEG SOI: walk the marker segments to the frame header
            at = 2
            while at + 9 <= len(data) and data[at] == 0xFF:
                marker = data[at + 1]
                if marker == 0xFF:  # fill byte
                    at += 1
                    continue
                if marker in _SOF_MARKERS:
                    rows, cols = struct.unpack(">HH", data[at + 5:at + 9])
                    return (rows, cols) if rows and cols else None  # rows 0: set later by a DNL segment
                at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    except struct.error:
        return None
    return None


def _check_codestream(ds: Dataset, meta: ImageMeta, max_pixels: int, source: str) -> None:
    """Refuse a compressed frame larger than its header says before it is decoded: a few KB of
    JPEG 2000 can declare 20000 x 20000 pixels (a decompression bomb that ``max_pixels``, read
    from the header, would not see)."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if not syntax.is_encapsulated or syntax == pydicom.uid.RLELossless:
        return
    try:
        first = next(pydicom.encaps.generate_fragmented_frames(ds.PixelData, number_of_frames=meta.n_frames))[0]
    except Exception:  # noqa: BLE001 - broken encapsulation: the decoder says corrupt
        return
    size = codestream_size(bytes(first[:65536]))
    if size is None:
        return
    rows, cols = size
    if rows * cols > max_pixels:
        raise QuarantineError(QuarantineReason.TOO_LARGE, f"the compressed frame is {rows}x{cols} = "
                              f"{rows * cols} pixels > max_pixels {max_pixels} (the header says "
                              f"{meta.rows}x{meta.cols})", source)
    if rows * cols > meta.rows * meta.cols:
        raise QuarantineError(QuarantineReason.CORRUPT, f"the compressed frame is {rows}x{cols}, larger than the "
                              f"{meta.rows}x{meta.cols} its header says", source)


def _require_decoder(ds: Dataset, source: str) -> None:
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if not syntax.is_transfer_syntax:
        raise QuarantineError(QuarantineReason.UNSUPPORTED_SYNTAX, f"unknown transfer syntax {syntax}", source)
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError as exc:
        raise QuarantineError(QuarantineReason.UNSUPPORTED_SYNTAX, f"no decoder for {syntax.name}", source) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise QuarantineError(
            QuarantineReason.UNSUPPORTED_SYNTAX, f"no installed decoder for {syntax.name} ({missing})", source
        )


def decode_pixels(ds: Dataset, *, frames: Frames = "first", source: str = "") -> np.ndarray:
    """Pipeline steps 1-2: the stored values, clipped to Bits Stored (integers, before any LUT).

    Shape ``[H, W]`` (``frames="first"``) or ``[F, H, W]`` (``"all"``, ``F`` may be 1), with a
    trailing axis of 3 for colour. Decoder errors (truncated or inconsistent pixel data)
    become CORRUPT.
    """
    _ensure_transfer_syntax(ds)
    index = 0 if frames == "first" else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on excess padding bytes and the like
            arr = pydicom.pixels.pixel_array(ds, index=index, correct_unused_bits=False)
    except Exception as exc:  # noqa: BLE001 - decoders raise ValueError, RuntimeError, ...
        raise QuarantineError(QuarantineReason.CORRUPT, f"pixel data does not decode: {exc}", source) from exc
    colour = int(ds.get("SamplesPerPixel") or 1) > 1
    if frames == "all" and arr.ndim == (3 if colour else 2):
        arr = arr[np.newaxis]
    bits_stored = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    return clip_to_bits_stored(arr, bits_stored, signed=signed)


def clip_to_bits_stored(arr: np.ndarray, bits_stored: int, *, signed: bool) -> np.ndarray:
    """Bring integer stored values into the range Bits Stored allows ("16-bit overflow" rule).

    Unsigned: values above ``2**bits_stored - 1`` are clipped to it. Signed: when every value
    lies in ``[0, 2**bits_stored)`` but some exceed the signed maximum, the writer did not
    extend the sign bit and the values are sign-extended (two's complement); otherwise values
    outside ``[-2**(bits_stored-1), 2**(bits_stored-1) - 1]`` are clipped.
    """
    if not np.issubdtype(arr.dtype, np.integer):
        return arr
    container = arr.dtype.itemsize * 8
    bits_stored = max(1, min(int(bits_stored), container))
    if arr.size == 0 or bits_stored == container:
        return arr
    lo, hi = int(arr.min()), int(arr.max())
    if not signed:
        top = (1 << bits_stored) - 1
        return np.minimum(arr, arr.dtype.type(top)) if hi > top else arr
    smin, smax = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    if smin <= lo and hi <= smax:
        return arr
    if lo >= 0 and hi < (1 << bits_stored):
        wide = arr.astype(np.int64)
        return np.where(wide > smax, wide - (1 << bits_stored), wide).astype(np.int64)
    return np.clip(arr.astype(np.int64), smin, smax)


def apply_modality(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Pipeline step 3: the Modality LUT Sequence if present, else Rescale Slope/Intercept.

    The LUT goes through ``pydicom.pixels.apply_modality_lut``; a rescale with only one of
    slope (default 1) and intercept (default 0) present is applied too. An identity rescale
    returns the stored integers unchanged.
    """
    if ds.get("ModalityLUTSequence"):
        return pydicom.pixels.apply_modality_lut(stored, ds)
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    if slope == 1.0 and intercept == 0.0:
        return stored
    return stored.astype(np.float64) * slope + intercept


def apply_voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    """Pipeline step 4: map modality values to ``[0, 1]``; returns (float32 array, how).

    VOI LUT Sequence (first item, scaled by the LUT's own min..max) if present, else the first
    Window Center/Width (LINEAR, LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2), else the 0.5/99.5
    percentiles. A header VOI leaving < 1 % of pixels unsaturated falls back to percentiles.
    """
    mapped: np.ndarray | None = None
    how = ""
    if ds.get("VOILUTSequence"):
        mapped, how = _voi_lut(values, ds), "voi_lut"
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        if width > 0:
            mapped, how = _window(values, center, width, function), f"window:{center:g}/{width:g}"
    if mapped is not None:
        unsaturated = np.count_nonzero((mapped > 0.0) & (mapped < 1.0)) / max(mapped.size, 1)
        if unsaturated >= MIN_UNSATURATED:
            return mapped, how
        return _percentile_window(values), "percentile:header_voi_rejected"
    return _percentile_window(values), "percentile"


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the first VOI LUT Sequence item, scaled to [0, 1] by the table's own min..max.

    (Some writers declare 16-bit LUT entries but only fill 12 bits; the nominal depth would
    then render a dark image.)
    """
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    n_entries, first_mapped = int(descriptor[0]) or 65536, int(descriptor[1])
    table = pydicom.pixels.apply_voi(np.arange(first_mapped, first_mapped + n_entries), ds)
    ints = values if np.issubdtype(values.dtype, np.integer) else np.rint(values).astype(np.int64)
    return _rescale(pydicom.pixels.apply_voi(ints, ds), float(table.min()), float(table.max()))


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The DICOM window functions (PS3.3 C.11.2.1.2-3), with output range [0, 1]."""
    if function == "SIGMOID":
        x = values.astype(np.float32)
        return (1.0 / (1.0 + np.exp(-4.0 * (x - np.float32(center)) / np.float32(width)))).astype(np.float32)
    if function == "LINEAR_EXACT":
        return _rescale(values, center - width / 2, center + width / 2)
    if width <= 1:  # LINEAR with width 1 is a threshold at center - 0.5
        return (values > center - 0.5).astype(np.float32)
    # LINEAR: y = ((x - (c - 0.5)) / (w - 1) + 0.5), i.e. 0 at c - 0.5 - (w-1)/2, 1 at c - 0.5 + (w-1)/2
    return _rescale(values, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)


def _percentile_window(values: np.ndarray) -> np.ndarray:
    flat = values.reshape(-1)
    sample = flat[:: max(1, flat.size // PERCENTILE_SAMPLES)]
    lo, hi = (float(v) for v in np.percentile(sample, PERCENTILES))
    if hi <= lo:  # (nearly) constant image: fall back to the full min..max
        lo, hi = float(flat.min()), float(flat.max())
    return _rescale(values, lo, hi)


def _rescale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(values - lo) / (hi - lo)`` clipped to [0, 1] as float32, in place on one copy."""
    out = values.astype(np.float32)
    if hi <= lo:
        out.fill(0.0)
        return out
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def _inverted(ds: Dataset) -> bool:
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
    return photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE")


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float32) @ LUMA


def has_colour(rgb: np.ndarray, full_scale: float = 255.0) -> bool:
    """Whether an RGB(A) array ``[..., 3+]`` holds real colour (the ``colour_image`` rule).

    True when the chroma ``max(R, G, B) - min(R, G, B)`` exceeds :data:`COLOUR_CHROMA` times
    ``full_scale`` in more than :data:`COLOUR_MIN_FRACTION` of the pixels (at most
    :data:`PERCENTILE_SAMPLES` evenly strided pixels are looked at).
    """
    flat = rgb.reshape(-1, rgb.shape[-1])
    flat = flat[:: max(1, flat.shape[0] // PERCENTILE_SAMPLES)]
    if flat.shape[0] == 0:
        return False
    r, g, b = flat[:, 0], flat[:, 1], flat[:, 2]
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # >= 0: no wrap
    coloured = np.count_nonzero(chroma > COLOUR_CHROMA * full_scale)
    return bool(coloured > COLOUR_MIN_FRACTION * flat.shape[0])


def _first(value: Any) -> float:
    return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)


def _text(ds: Dataset, keyword: str) -> str | None:
    """A header value as stripped text (multi-values joined by backslash), None if empty."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed value is as good as a missing one here
        return None
    if value is None:
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _dicom_meta(ds: Dataset, source: str) -> ImageMeta:
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    sop_class = _text(ds, "SOPClassUID") or (_text(file_meta, "MediaStorageSOPClassUID") if file_meta else None)
    photometric = _text(ds, "PhotometricInterpretation")
    return ImageMeta(
        source=source,
        format="dicom",
        modality=_text(ds, "Modality"),
        sop_class_uid=sop_class,
        transfer_syntax_uid=str(syntax) if syntax else None,
        photometric=photometric.upper() if photometric else None,
        bits_stored=_int(ds, "BitsStored"),
        rows=_int(ds, "Rows") or 0,
        cols=_int(ds, "Columns") or 0,
        n_frames=max(1, _int(ds, "NumberOfFrames") or 1),
        body_part=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        laterality=_text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        patient_age=_text(ds, "PatientAge"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        study_date=_text(ds, "StudyDate"),
        institution=_text(ds, "InstitutionName"),
        burned_in=(_text(ds, "BurnedInAnnotation") or "").upper() == "YES",
    )


# --------------------------------------------------------------------------------------------
# PNG / JPEG / BMP / TIFF (Pillow)


def _decode_pillow(raw: bytes, fmt: Format, source: str, max_pixels: int, frames: Frames,
                   check: Callable[[ImageMeta], None] | None = None) -> DecodedImage:
    """Decode a raster file with Pillow: header checks first, then the page(s), oriented."""
    try:
        with Image.open(io.BytesIO(raw), formats=[_PILLOW_FORMATS[fmt]]) as im:
            width, height = im.size
            n_pages = int(getattr(im, "n_frames", 1) or 1) if fmt == "tiff" else 1
            if check is not None:
                check(_pillow_meta(source, fmt, im.mode, height, width, n_pages))
            n_decoded = n_pages if frames == "all" else 1
            sizes = [_page_size(im, i) for i in range(n_decoded)]
            total = sum(w * h for w, h in sizes)
            if total > max_pixels:
                what = f"{height}x{width}" + (f", {n_decoded} pages" if n_decoded > 1 else "")
                raise QuarantineError(
                    QuarantineReason.TOO_LARGE, f"{what} = {total} pixels > max_pixels {max_pixels}", source
                )
            if len(set(sizes)) > 1:
                raise QuarantineError(
                    QuarantineReason.UNSUPPORTED_IMAGE,
                    f"TIFF pages differ in size ({sorted(set(sizes))}); read it with frames='first'", source,
                )
            pages = [_pillow_page(im, i) for i in range(n_decoded)]
    except QuarantineError:
        raise
    except Image.DecompressionBombError as exc:
        raise QuarantineError(QuarantineReason.TOO_LARGE, str(exc), source) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise QuarantineError(QuarantineReason.CORRUPT, f"{fmt.upper()} does not decode: {exc}", source) from exc

    found: list[str] = []
    arrays = []
    first = None
    for image, min_is_white, oriented in pages:
        pixels, window, bits, photometric, coloured = _pillow_pixels(image, min_is_white)
        arrays.append(pixels)
        first = first or (window, bits, photometric, image.height, image.width)
        found += [w for w in ((WARN_COLOUR,) if coloured else ()) + (() if oriented else (WARN_ORIENTATION,))
                  if w not in found]
    window, bits, photometric, rows, cols = first
    stack = np.stack(arrays) if frames == "all" else arrays[0]
    meta = replace(_pillow_meta(source, fmt, "", rows, cols, n_pages), photometric=photometric,
                   bits_stored=bits, window=window, warnings=tuple(found))
    return DecodedImage(np.ascontiguousarray(np.clip(stack, 0.0, 1.0), dtype=np.float32), meta)


def _page_size(im: Image.Image, index: int) -> tuple[int, int]:
    """(width, height) of page ``index`` from its header (nothing decoded)."""
    if index:
        im.seek(index)
    return im.size


def _pillow_page(im: Image.Image, index: int) -> tuple[Image.Image, bool, bool]:
    """Page ``index`` decoded and oriented (EXIF/TIFF Orientation applied), whether it was
    stored MinIsWhite (TIFF Photometric 0), and whether the orientation could be read."""
    im.seek(index)
    im.load()
    min_is_white = im.format == "TIFF" and getattr(im, "tag_v2", {}).get(262) == 0
    try:
        return ImageOps.exif_transpose(im), min_is_white, True
    except (SyntaxError, ValueError, TypeError, KeyError, OSError, struct.error):
        return im.copy(), min_is_white, False  # a malformed EXIF block: use the image as stored


def _pillow_pixels(image: Image.Image, min_is_white: bool) -> tuple[np.ndarray, str, int, str, bool]:
    """(pixels in [0, 1], window, bits, photometric, has real colour) of one decoded page."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":  # 16-bit (I;16*) or 32-bit grey
        bits = 16 if mode.startswith("I;16") else 32
        pixels = _percentile_window(np.asarray(image))
        if min_is_white:  # Pillow inverts MinIsWhite only up to 8 bits
            np.subtract(1.0, pixels, out=pixels)
        return pixels, "percentile", bits, "MONOCHROME2", False
    if mode in ("L", "LA", "1"):
        grey = np.asarray(image.convert("L"), dtype=np.float32)
        return grey / np.float32(255), "full_range", 1 if mode == "1" else 8, "MONOCHROME2", False
    rgb = np.asarray(image.convert("RGB"))  # RGB, RGBA, P, CMYK, YCbCr, ...
    return _luminance(rgb) / np.float32(255), "full_range", 8, "RGB", has_colour(rgb)


def _pillow_meta(source: str, fmt: Format, mode: str, rows: int, cols: int, n_frames: int) -> ImageMeta:
    """The header facts of a raster file: its size and mode, no DICOM fields."""
    return ImageMeta(
        source=source, format=fmt, modality=None, sop_class_uid=None, transfer_syntax_uid=None,
        photometric=mode or None, bits_stored=None, rows=rows, cols=cols, n_frames=n_frames,
        body_part=None, view_position=None, laterality=None, patient_id=None, patient_name=None,
        patient_birth_date=None, patient_sex=None, patient_age=None, study_uid=None, series_uid=None,
        sop_uid=None, study_date=None, institution=None,
    )
