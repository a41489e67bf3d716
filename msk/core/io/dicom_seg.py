"""A predicted lesion mask as a DICOM Segmentation object (SEG) that references its radiograph,
so that a PACS viewer shows the mask over the image (:func:`write_dicom_seg`, built with
`highdicom <https://highdicom.readthedocs.io>`_).

The SEG is a ``BINARY`` segmentation with one segment: label ``lesion`` (by default), segmented
property category *Morphologically abnormal structure* and type *Neoplasm* (SNOMED CT, from
DICOM CID 7150/7151), algorithm type ``AUTOMATIC`` with an Algorithm Identification naming msk
and the segmenter. It gets new Series and SOP Instance UIDs, Content Qualification ``RESEARCH``,
and references the source image (Referenced Series Sequence and each frame's Source Image
Sequence: study, series and SOP Instance UID of the source).

**PHI.** A SEG must belong to its source's patient and study to be shown with it, so highdicom
copies the source's Patient and General Study modules (patient name, ID, birth date, sex, study
UID, date, accession number, ...) into it: a SEG is as identifying as its source and is handled
like it (it goes back to the PACS the image came from). Nothing of msk's pseudonymised ingest
(pseudonyms, image ids) is written into it: the source is the original DICOM file.

Refused, each with a one-line :class:`DicomSegError` naming the file and the fix:

* a source that is **not DICOM** (PNG, JPEG, ...): there is no study to attach a SEG to; write
  the PNG mask (:func:`msk.core.io.masks.write_mask_png`) instead;
* a DICOM object without the UIDs and size of an image (SOP Instance, Series and Study
  Instance UID, Rows, Columns), or a SEG itself;
* a **multi-frame** source (Number of Frames > 1): msk reads the first frame only, and a mask
  of one frame attached to a cine or tomosynthesis series would mislead;
* a mask that is not 2-D, not boolean/integer, or of **another size** than the source's
  Rows x Columns (masks are never rescaled silently);
* an **empty mask**: highdicom would write a SEG with one empty frame, which a PACS shows as
  nothing at all and a reader could take for a negative finding; an image without a lesion
  gets no SEG (``msk segment`` reports it as ``no_lesion``, with the threshold).

highdicom's warnings are silenced while the SEG is made: some quote header values (a
patient name it finds oddly formatted), which must not reach a log.

Type 2 attributes of the Patient and Study modules that the source lacks (some archives drop
Patient's Birth Date, Study ID, ...) are added empty, as the standard allows, to a copy of the
source header: the caller's data set is never changed. A projection radiograph without a patient
position and slice thickness (CR, DX) gets no Pixel Measures in its SEG: the SEG lies on the
source's pixel matrix (Spatial Locations Preserved), and highdicom's reader refuses the Pixel
Spacing-only Pixel Measures that highdicom would otherwise write.
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from msk.core.errors import MskError

__all__ = ["DicomSegError", "read_source_header", "write_dicom_seg"]

#: SOP classes of segmentations (a SEG of a SEG is refused).
SEG_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
#: Type 1 attributes the SEG needs from its source: the reference and the pixel matrix.
REQUIRED = ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID", "Rows", "Columns")
#: Type 2 attributes highdicom copies from the source (added empty when absent).
TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
         "StudyDate", "StudyTime", "ReferringPhysicianName")
MANUFACTURER = "msk"


class DicomSegError(MskError, ValueError):
    """A DICOM Segmentation that cannot be written; the message names the file and the fix."""


def read_source_header(path: str | os.PathLike):
    """The header (no pixel data) of the DICOM file ``path`` as a pydicom ``Dataset``.

    A PNG/JPEG/BMP/TIFF file, an unreadable file or one that is no DICOM raises
    :class:`DicomSegError` naming the file.
    """
    from msk.core.errors import QuarantineError
    from msk.core.io.dicom import _parse_dicom, _quiet_pydicom, _with_preamble, sniff_format

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DicomSegError(f"{path}: cannot read the source image ({exc.strerror or exc})") from None
    fmt = sniff_format(raw[:132])
    if fmt != "dicom":
        what = f"a {fmt.upper()} image" if fmt else "not an image msk reads"
        raise DicomSegError(f"{path}: {what}, not DICOM: a DICOM Segmentation needs a DICOM source (its study "
                            "and UIDs); write the PNG mask instead (msk segment writes <name>.mask.png)")
    try:
        with _quiet_pydicom():  # the ingest's parser: preamble-less files, truncation checks
            return _parse_dicom(io.BytesIO(_with_preamble(raw)), str(path))
    except QuarantineError as exc:
        raise DicomSegError(f"{path}: unreadable DICOM source ({exc.detail}); check the file") from None


def _source(source, where: str | None):
    """``(header copy, where)`` for a path or a pydicom Dataset."""
    from pydicom.dataset import Dataset

    if isinstance(source, Dataset):
        name = where or str(getattr(source, "filename", "") or "") or "the source data set"
        return copy.deepcopy(source), name
    if isinstance(source, (str, os.PathLike)):
        return read_source_header(source), where or str(source)
    raise TypeError(f"source must be a path or a pydicom Dataset, not {type(source).__name__}")


def _check_source(ds, where: str) -> None:
    missing = [k for k in REQUIRED if not ds.get(k)]
    if missing:
        raise DicomSegError(f"{where}: DICOM object without {', '.join(missing)}: not an image a SEG can "
                            "reference; give the radiograph's DICOM file")
    if str(ds.SOPClassUID) in SEG_SOP_CLASSES:
        raise DicomSegError(f"{where}: is a DICOM Segmentation itself; give the radiograph it segments")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DicomSegError(f"{where}: multi-frame image ({frames} frames); msk segments the first frame only "
                            "and writes no SEG for multi-frame sources: use the PNG mask")


def _check_mask(mask: np.ndarray, ds, where: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise DicomSegError(f"{where}: the mask is {mask.dtype}, not a binary mask; threshold the lesion "
                            "probabilities first (bool, or integers where non-zero is lesion)")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if mask.ndim != 2 or mask.shape != (rows, cols):
        got = f"{mask.shape[1]}x{mask.shape[0]}" if mask.ndim == 2 else f"of shape {mask.shape}"
        raise DicomSegError(f"{where}: the mask is {got} (width x height) but the image is {cols}x{rows} "
                            "(Columns x Rows); give the mask in the source image's pixels "
                            "(msk.core.io.masks.mask_from_square maps a model's mask back)")
    mask = mask != 0
    if not mask.any():
        raise DicomSegError(f"{where}: the mask is empty (no lesion pixel); an empty SEG shows nothing and "
                            "reads like a negative finding, so none is written for an image without a lesion")
    return mask


def write_dicom_seg(source, mask: np.ndarray, out: str | os.PathLike, *, label: str = "lesion",
                    algorithm: str = "msk lesion segmenter", version: str | None = None,
                    parameters: dict[str, Any] | None = None, series_number: int = 900,
                    series_description: str = "msk lesion segmentation (research)",
                    where: str | None = None) -> Path:
    """Write ``mask`` (``bool [Rows, Columns]``, the source's pixels) as a DICOM Segmentation of
    ``source`` (a DICOM file path or a pydicom ``Dataset``) to ``out``; returns ``out``.

    :param label: the segment's label (Segment Label, at most 64 characters).
    :param algorithm: the Algorithm Name, e.g. ``msk unet:resnet34``; also the SEG's
        Manufacturer's Model Name. ``version`` defaults to msk's version.
    :param parameters: Algorithm Parameters (e.g. the threshold), written as text.
    :param where: how messages name the source (default: its path).
    Raises :class:`DicomSegError` for the inputs the module docstring lists.
    """
    import highdicom as hd
    from highdicom.spatial import get_image_coordinate_system
    from pydicom.sr.codedict import codes

    from msk import __version__

    ds, where = _source(source, where)
    _check_source(ds, where)
    mask = _check_mask(mask, ds, where)
    label = str(label).strip()
    if not label or len(label) > 64:
        raise DicomSegError(f"label {label!r}: a segment label has 1 to 64 characters")
    for keyword in TYPE2:  # type 2: present, possibly empty
        if keyword not in ds:
            setattr(ds, keyword, "")
    if get_image_coordinate_system(ds) is None and "SliceThickness" not in ds and "PixelSpacing" in ds:
        # A projection radiograph (no patient position): highdicom would copy Pixel Spacing into
        # a Pixel Measures Sequence without Slice Thickness, which its own reader (segread)
        # rejects; without a frame of reference the standard requires neither, so leave both out.
        del ds.PixelSpacing
    version = version or __version__
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm[:64], family=codes.cid7162.ArtificialIntelligence, version=version[:64],
        source=MANUFACTURER, parameters={str(k): str(v) for k, v in (parameters or {}).items()} or None)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.cid7151.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm_id)
    out = Path(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom's warnings can quote header values (PHI)
        try:
            seg = hd.seg.Segmentation(
                source_images=[ds], pixel_array=mask.astype(np.uint8),
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
                series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(),
                instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=algorithm[:64],
                software_versions=f"msk {__version__}"[:64], device_serial_number="none",
                content_label="LESION", content_description=f"{label} mask by {algorithm}"[:64],
                content_qualification="RESEARCH", series_description=series_description[:64])
        except (ValueError, TypeError, AttributeError, KeyError) as exc:  # highdicom's checks of the source
            raise DicomSegError(f"{where}: highdicom cannot derive a SEG from this image ({exc}); check that it "
                                "is a single-frame image with a complete header") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        seg.save_as(out, enforce_file_format=True)
    return out
