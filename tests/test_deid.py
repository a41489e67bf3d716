"""De-identification against DICOM PS3.15 Annex E (Basic Application Level Confidentiality Profile).

The attribute list is the standard's Table E.1-1 as ``dicom-anonymizer`` ships it
(:mod:`msk.core.io.deid_profile`). A synthetic CR image carries a unique marker in every profile
attribute pydicom can write, in a private tag and inside sequences; the real DICOMs of
../shared carry whatever their makers left. None of it may reach what msk keeps (a shard row,
a manifest row, a scrubbed data set) unless a PS3.15 option allows it, and those are listed in
``RETAINED_BY_OPTION``: the patient's sex and age, and dates as a year or shifted per patient.
"""

from __future__ import annotations

import io
import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from msk.core.io.deid_profile import basic_profile, fill_profile, profile_action
from msk.core.io.pseudonym import DATE_SHIFT_DAYS, RETAINED_BY_OPTION, Pseudonymiser
from msk.core.stages.ingest.pipeline import IngestConfig, process_file

from test_dicom import _to_bytes

KEY, OTHER_KEY = b"deid-test-key-0123456789", b"another-deid-key-987654321"
UID_ROOT = "1.2.826.0.1.3680043.10.999."  # every marker UID starts with it
#: Values the options keep: sex and age (Retain Patient Characteristics), the year of the dates.
SEX, AGE = "F", "042Y"
FIRST_DAY = date(1950, 3, 2)  # marker dates are FIRST_DAY + i days: never a 1 January
#: Row fields that are not derived from the header: the pixels and the file's hash.
NOT_HEADER = ("image", "content_sha256")


def marker_dataset(study_uid: str = UID_ROOT + "1", patient: str = "zq99999x") -> tuple[Dataset, list[str]]:
    """A decodable CR image with a marker in every writable Table E.1-1 attribute; the markers."""
    ds = Dataset()
    markers = fill_profile(ds, UID_ROOT, FIRST_DAY)
    ds.PatientID, ds.StudyInstanceUID = patient, study_uid
    ds.StudyDate = (FIRST_DAY + timedelta(days=1)).strftime("%Y%m%d")
    ds.PatientSex, ds.PatientAge = SEX, AGE
    block = ds.private_block(0x0009, "ZQ PRIVATE", create=True)
    block.add_new(0x01, "LO", "zq77777x private")
    markers += ["zq77777x", patient]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "CR", "HIP"
    pixels = (np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * 7) % 4096
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds, markers


def config(**options) -> IngestConfig:
    """An ingest config for header checks: pixel text scrubbing (seconds per image, pixels only)
    is off where the option exists."""
    if "pixel_scrub" in IngestConfig.model_fields:
        options.setdefault("pixel_scrub", "off")
    return IngestConfig(**options)


def _leaks(row: dict, markers: list[str]) -> list[str]:
    kept = " | ".join(f"{k}={v}" for k, v in row.items() if k not in NOT_HEADER and v is not None)
    return [m for m in markers if m in kept]


@pytest.fixture
def pseudonymiser() -> Pseudonymiser:
    return Pseudonymiser(KEY)


# --------------------------------------------------------------------------------------------
# The table


def test_the_profile_is_the_standards_table():
    table = basic_profile()
    assert len(table) > 600
    tag = {kw: int(Tag(kw)) for kw in ("PatientName", "PatientAge", "StudyInstanceUID", "AccessionNumber",
                                       "InstitutionName", "Modality", "PixelData")}
    assert table[tag["PatientName"]] == "Z" and table[tag["AccessionNumber"]] == "Z"
    assert table[tag["PatientAge"]] == "X" and table[tag["StudyInstanceUID"]] == "U"
    assert table[tag["InstitutionName"]] == "X/Z/D"
    assert profile_action(tag["Modality"]) is None and profile_action(tag["PixelData"]) is None
    assert profile_action(0x50100000) == "X" and profile_action(0x60023000) == "X"  # curves, overlay data
    assert profile_action(0x60020010) is None  # overlay rows: not in the table (msk drops them anyway)


# --------------------------------------------------------------------------------------------
# What msk keeps: shard and manifest rows


def test_no_profile_attribute_reaches_a_shard_or_manifest_row(pseudonymiser, tmp_path):
    ds, markers = marker_dataset()
    assert len(markers) > 500
    (tmp_path / "in").mkdir()
    data = _to_bytes(ds)
    (tmp_path / "in" / "ok.dcm").write_bytes(data)
    (tmp_path / "in" / "cut.dcm").write_bytes(data[: len(data) - 500])  # truncated pixel data
    ds.PhotometricInterpretation = "PALETTE COLOR"
    (tmp_path / "in" / "palette.dcm").write_bytes(_to_bytes(ds))
    src = tmp_path / "in"
    ok = process_file(src, "ok.dcm", config(image_size=32), pseudonymiser)
    assert ok["status"] == "ok", ok["detail"]
    assert _leaks(ok, markers) == []
    # what the options keep: sex, age (Retain Patient Characteristics), the year (Modified Dates)
    assert (ok["patient_sex"], ok["age_years"], ok["study_year"], ok["study_date"]) == ("F", 42, 1950, None)
    shifted = process_file(src, "ok.dcm", config(image_size=32, dates="shift"), pseudonymiser)
    assert _leaks(shifted, markers) == [] and shifted["study_year"] is None
    assert shifted["study_date"] < FIRST_DAY + timedelta(days=1)
    for rel, options, reason in (("ok.dcm", config(modalities=["DX"]), "excluded_modality"),
                                 ("cut.dcm", config(), "corrupt"),
                                 ("palette.dcm", config(), "unsupported_image")):
        row = process_file(src, rel, options, pseudonymiser)
        assert row["reason"] == reason, row
        assert _leaks(row, markers) == [], row["detail"]
    for option in ("PatientSex", "PatientAge", "dates (DA, DT)"):
        assert "Option (E.3." in RETAINED_BY_OPTION[option]


def _profile_values(ds: Dataset) -> set[str]:
    """The texts of a file's profile attributes that identify something: at least 4 characters,
    no well-known DICOM UID, found in no attribute outside the profile, and not sex or age."""
    inside, outside = set(), set()
    file_meta = list(ds.file_meta) if getattr(ds, "file_meta", None) is not None else []
    for elem in [*ds.iterall(), *file_meta]:
        if elem.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or elem.value in (None, ""):
            continue
        values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
        texts = {str(v).strip() for v in values}
        if elem.keyword in ("PatientSex", "PatientAge"):  # kept by the Retain Patient Characteristics Option
            continue
        if elem.tag.is_private or profile_action(elem.tag) is not None:
            inside |= {t for t in texts if len(t) >= 4 and not (elem.VR == "UI" and UID(t).type)}
        else:
            outside |= texts
    return {t for t in inside if not any(t in o for o in outside)}


def _real_dicoms(shared_data: Path) -> list[Path]:
    """The 24 real DICOMs of ../shared: NEMA/pylibjpeg and fo-dicom test files, DX hip radiographs."""
    return [p for folder in ("dicom", "dicom-hip-dx") for p in sorted((shared_data / folder).rglob("*"))
            if p.suffix == ".dcm" or p.name == "CR-MONO1-10-chest"]


#: Real files up to this size run in the default test run (13 of 24, ~3 s); all of them under ``slow``.
SMALL_FILE = 400_000


@pytest.mark.shared_data
@pytest.mark.parametrize("which", ["small", pytest.param("all", marks=pytest.mark.slow)])
def test_real_dicoms_keep_no_profile_attribute(pseudonymiser, shared_data, which):
    paths = _real_dicoms(shared_data)
    assert len(paths) >= 24
    if which == "small":
        paths = [p for p in paths if p.stat().st_size <= SMALL_FILE]
        assert len(paths) >= 12
    assert _check_files(shared_data, paths, pseudonymiser) >= len(paths) - 4  # most carry profile attributes


def _check_files(root: Path, paths: list[Path], pseudonymiser: Pseudonymiser) -> int:
    """No profile value of a file in its shard/manifest row (but the path) or its scrubbed copy;
    how many files had profile values."""
    checked = 0
    for path in paths:
        ds = pydicom.dcmread(path, force=True)
        values = sorted(_profile_values(ds))
        rel = path.relative_to(root).as_posix()
        row = process_file(root, rel, config(image_size=32, dates="shift"), pseudonymiser)
        leaked = [v for v in values if any(v in str(row[k]) for k in row if k not in (*NOT_HEADER, "path"))]
        assert leaked == [], (rel, leaked)
        saved = _to_bytes(pseudonymiser.scrub_dataset(ds))
        assert [v for v in values if v.encode() in saved] == [], rel
        assert not any(e.tag.is_private for e in pydicom.dcmread(io.BytesIO(saved)).iterall()), rel
        checked += bool(values)
    return checked


def test_synthetic_exports_keep_no_profile_attribute(pseudonymiser, tmp_path):
    """msk synth's PACS-like export: names, ids, accession numbers, institutions, dates in the
    headers (and in the folder names), six transfer syntaxes, deflated ones among them."""
    from msk.core.synth.config import SynthConfig
    from msk.core.synth.export import synthesize

    synthesize(tmp_path, SynthConfig(n_images=12, seed=0, image_size=64, priors="defaults"), progress=False)
    paths = sorted((tmp_path / "export").rglob("*.dcm"))
    assert len(paths) >= 10
    assert _check_files(tmp_path, paths, pseudonymiser) == len(paths)


# --------------------------------------------------------------------------------------------
# The scrubbed data set


def test_scrubbed_dataset_follows_the_profile(pseudonymiser):
    ds, markers = marker_dataset()
    original = {elem.tag: elem.value for elem in ds}
    saved = _to_bytes(pseudonymiser.scrub_dataset(ds))
    left = [m for m in markers if m.encode() in saved]
    assert left == [], left[:10]
    scrubbed = pydicom.dcmread(io.BytesIO(saved))
    assert not any(e.tag.is_private for e in scrubbed.iterall())
    for elem in scrubbed:
        action = profile_action(elem.tag)
        if action is None or elem.VR == "SQ" or elem.tag in (Tag("PatientSex"), Tag("PatientAge")):
            continue
        assert not action.startswith("X") or elem.VR in ("DA", "DT", "TM"), f"{elem.keyword} ({action}) kept"
        if action == "U":
            assert elem.value == pseudonymiser.uid(original[elem.tag]), elem.keyword
        if elem.VR == "DA" and elem.value:
            assert elem.value.endswith("0101"), elem  # year only
    assert (scrubbed.PatientSex, scrubbed.PatientAge) == (SEX, AGE)
    assert scrubbed.PatientIdentityRemoved == "YES" and scrubbed.LongitudinalTemporalInformationModified == "MODIFIED"
    assert scrubbed.StudyDate == "19500101"


def test_uids_are_remapped_consistently_within_a_key(pseudonymiser):
    first, _ = marker_dataset()
    second, _ = marker_dataset()
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = UID_ROOT + "2"
    second.SeriesInstanceUID = UID_ROOT + "3"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = first.SOPClassUID, first.SOPInstanceUID
    second.ReferencedImageSequence = Sequence([ref])  # X/Z/U*: kept, its UIDs replaced
    other = Pseudonymiser(OTHER_KEY).scrub_dataset(marker_dataset()[0])
    a, b = pseudonymiser.scrub_dataset(first), pseudonymiser.scrub_dataset(second)
    assert a.StudyInstanceUID == b.StudyInstanceUID != other.StudyInstanceUID
    assert a.StudyInstanceUID.startswith("2.25.") and UID(a.StudyInstanceUID).is_valid
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert b.ReferencedImageSequence[0].ReferencedSOPClassUID == pydicom.uid.ComputedRadiographyImageStorage
    assert a.SOPInstanceUID == a.file_meta.MediaStorageSOPInstanceUID != b.SOPInstanceUID
    assert a.SeriesInstanceUID != b.SeriesInstanceUID


# --------------------------------------------------------------------------------------------
# Longitudinal intervals: dates shifted per patient


def _study(patient: str, day: str, study: str) -> Dataset:
    ds, _ = marker_dataset(study_uid=study, patient=patient)
    ds.StudyDate = ds.ContentDate = day
    ds.AcquisitionDateTime = day + "101530"
    return ds


def test_date_shift_keeps_a_patients_intervals(pseudonymiser, tmp_path):
    low, high = DATE_SHIFT_DAYS
    visits = {"zq11111x": ("20190301", "20190609", "20211231"), "zq22222x": ("20190301", "20200101")}
    for patient, days in visits.items():
        shifted = []
        for n, day in enumerate(days):
            ds = _study(patient, day, f"{UID_ROOT}{patient[2:7]}.{n}")
            path = tmp_path / f"{patient}-{n}.dcm"
            path.write_bytes(_to_bytes(ds))
            row = process_file(tmp_path, path.name, config(image_size=32, dates="shift"), pseudonymiser)
            scrubbed = pseudonymiser.scrub_dataset(ds, dates="shift")
            assert scrubbed.StudyDate == scrubbed.ContentDate == row["study_date"].strftime("%Y%m%d")
            assert scrubbed.AcquisitionDateTime == scrubbed.StudyDate and scrubbed.StudyTime == ""
            assert "shifted dates" in scrubbed.DeidentificationMethod
            shifted.append(row["study_date"])
        real = [date.fromisoformat(f"{d[:4]}-{d[4:6]}-{d[6:]}") for d in days]
        assert [s - shifted[0] for s in shifted] == [r - real[0] for r in real]  # the intervals
        assert low <= (real[0] - shifted[0]).days <= high
        assert shifted[0] not in real
    shifts = {pseudonymiser.date_shift_days(f"MRN-{i}") for i in range(40)}
    assert len(shifts) > 30 and all(-high <= s <= -low for s in shifts)
    assert Pseudonymiser(KEY).date_shift_days("MRN-1") == pseudonymiser.date_shift_days("MRN-1")
    assert sum(Pseudonymiser(OTHER_KEY).date_shift_days(f"MRN-{i}") != pseudonymiser.date_shift_days(f"MRN-{i}")
               for i in range(40)) > 35


def test_dates_option_is_a_typed_config_field():
    assert IngestConfig().dates == "year" and IngestConfig(dates="shift").dates == "shift"
    with pytest.raises(Exception, match="dates"):
        IngestConfig(dates="full")
    schema = IngestConfig.model_json_schema()["properties"]["dates"]
    assert schema["enum"] == ["year", "shift"] and "per-patient" in schema["description"]
    assert json.loads(IngestConfig(dates="shift").model_dump_json())["dates"] == "shift"
