"""DICOM Part 10 encoding of synthetic cases (pydicom 3), including the deliberately broken ones."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, RLELossless

from msk.core.synth.cases import BASIC_TEXT_SR, DX_STORAGE, SynthCase
from msk.core.synth.config import TRANSFER_SYNTAXES

IMPLEMENTATION_VERSION = "MSK_SYNTH_1"


def encode(case: SynthCase) -> bytes:
    """The bytes of the file for ``case``: a valid DICOM file, or the corruption it asks for."""
    kind = case.corruption
    if kind == "empty":
        return b""
    if kind == "not_dicom":
        return _not_dicom(case)
    if kind == "no_pixels":
        return _save(_text_report(case), ExplicitVRLittleEndian)
    ds = image_dataset(case)
    if kind == "short_pixels":
        ds.PixelData = stored_pixels(case).tobytes()[: case.pixels.size]  # half of Rows*Columns*2
        return _save(ds, ExplicitVRLittleEndian)
    data = _with_pixels(ds, case)
    if kind == "truncated":  # cut inside the pixel data, like an interrupted transfer
        if case.transfer_syntax == "deflated-le":  # the whole dataset is one deflate stream
            return data[: int(len(data) * 0.75)]
        pixels = len(ds.PixelData)
        return data[: len(data) - pixels + int(pixels * 0.3) + 1]
    return data


def stored_pixels(case: SynthCase) -> np.ndarray:
    """Pixel values as stored: MONOCHROME1 stores the inverted display intensities."""
    if case.photometric == "MONOCHROME1":
        return ((1 << case.bits_stored) - 1 - case.pixels).astype(np.uint16)
    return case.pixels


def _with_pixels(ds: Dataset, case: SynthCase) -> bytes:
    uid = TRANSFER_SYNTAXES[case.transfer_syntax]
    arr = stored_pixels(case)
    if uid.is_compressed:
        ds.compress(uid, arr, encoding_plugin=_fastest_plugin(uid), generate_instance_uid=False)
    else:
        ds.PixelData = arr.tobytes()
    return _save(ds, uid)


@cache
def _fastest_plugin(uid) -> str:
    """pylibjpeg-rle encodes RLE about 10x faster than pydicom's own encoder; else pydicom picks."""
    if uid == RLELossless and "pylibjpeg" in get_encoder(uid).available_plugins:
        return "pylibjpeg"
    return ""


def _save(ds: Dataset, uid) -> bytes:
    ds.file_meta.TransferSyntaxUID = uid
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _base(case: SynthCase, sop_class: str, modality: str) -> Dataset:
    p, s = case.patient, case.study
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = case.sop_uid
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = case.sop_uid
    date = s.date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = s.time
    ds.AccessionNumber = s.accession
    ds.Modality = modality
    ds.Manufacturer = "MSK Synthetic Imaging"
    ds.InstitutionName = p.institution.name
    ds.StationName = p.institution.station
    ds.ReferringPhysicianName = case.referring
    ds.StudyDescription = s.description
    ds.PatientName = p.dicom_name
    ds.PatientID = p.patient_id
    ds.PatientBirthDate = p.birth_date.strftime("%Y%m%d")
    ds.PatientSex = p.sex
    ds.PatientAge = f"{case.age:03d}Y"
    ds.StudyInstanceUID = s.uid
    ds.SeriesInstanceUID = case.series_uid
    ds.StudyID = str(s.number)
    ds.SeriesNumber = case.series_number
    ds.InstanceNumber = case.instance_number
    return ds


def image_dataset(case: SynthCase) -> Dataset:
    """The dataset of an image case, without PixelData."""
    ds = _base(case, case.sop_class, case.study.modality)
    dx = case.sop_class == DX_STORAGE
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""] if dx else ["ORIGINAL", "PRIMARY"]
    ds.SeriesDescription = f"{case.body_part or 'XR'} {case.view}".strip()
    ds.BodyPartExamined = case.body_part
    ds.ViewPosition = case.view
    ds.Laterality = case.study.laterality
    if dx:
        ds.ImageLaterality = case.study.laterality or "U"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "YES" if case.burned_in else "NO"
    rows, cols = case.pixels.shape
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = case.photometric
    ds.BitsAllocated = 16
    ds.BitsStored = case.bits_stored
    ds.HighBit = case.bits_stored - 1
    ds.PixelRepresentation = 0
    spacing = [f"{case.pixel_spacing:.4f}", f"{case.pixel_spacing:.4f}"]
    ds.ImagerPixelSpacing = spacing
    if dx:
        ds.PixelSpacing = spacing
    if case.rescale is not None:
        ds.RescaleIntercept = f"{case.rescale[1]:g}"
        ds.RescaleSlope = f"{case.rescale[0]:g}"
        ds.RescaleType = "US"
    if case.window is not None:
        ds.WindowCenter = f"{case.window[0]:g}"
        ds.WindowWidth = f"{case.window[1]:g}"
    ds.LossyImageCompression = "00"
    return ds


def _text_report(case: SynthCase) -> Dataset:
    """A Basic Text SR document (no pixels) filed in the same study, as archives contain."""
    ds = _base(case, BASIC_TEXT_SR, "SR")
    ds.SeriesDescription = "Report"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = Sequence([title])
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = Sequence([name])
    item.TextValue = f"{case.study.description}: synthetic report, no image."
    ds.ContentSequence = Sequence([item])
    return ds


def _not_dicom(case: SynthCase) -> bytes:
    return (f"PACS export log\nstudy {case.study.accession} exported {case.study.date.isoformat()}\n"
            "status: OK\n").encode()
