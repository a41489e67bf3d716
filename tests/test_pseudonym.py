"""Pseudonyms are stable and keyed; records and scrubbed headers carry no PHI and no key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from msk.core.io.dicom import read_dicom_header, read_image
from msk.core.io.pseudonym import ENV_VAR, Pseudonymiser, PseudonymKeyError, age_in_years, parse_key

from test_dicom import _to_bytes  # one DICOM serialiser for the reader and pseudonym tests

REPO = Path(__file__).resolve().parents[1]
OTHER_KEY = b"another-key-with-enough-bytes!!"

#: Fake PHI of the synthetic patient; none of it may survive pseudonymisation.
PHI = {
    "PatientName": "Doe^Jane^Q",
    "PatientID": "MRN-4711-XY",
    "PatientBirthDate": "19710203",
    "PatientAddress": "12 Elm Street, Springfield",
    "PatientTelephoneNumbers": "+44 20 7946 0958",
    "OtherPatientIDs": "NHS-943-476-5919",
    "InstitutionName": "St Example Hospital",
    "InstitutionAddress": "1 Hospital Road, Springfield",
    "ReferringPhysicianName": "Who^Gregory",
    "PerformingPhysicianName": "House^Greg",
    "OperatorsName": "Tech^Terry",
    "NamesOfIntendedRecipientsOfResults": "Cuddy^Lisa",
    "AccessionNumber": "ACC-20230415-77",
    "StudyInstanceUID": "1.2.840.99999.4711.101",
    "SeriesInstanceUID": "1.2.840.99999.4711.102",
    "SOPInstanceUID": "1.2.840.99999.4711.103",
    "StudyDate": "20230415",
    "StudyTime": "101530",
    "StudyDescription": "XR HIP LEFT Jane follow-up",
    "StationName": "SPRINGFLD-CR-02",
    "DeviceSerialNumber": "SN-99817",
    "ImageComments": "pt Jane Doe, fell at home",
}
SOURCE = "/archive/Doe_Jane/MRN-4711-XY/hip.dcm"
CORE_PHI = ["Doe", "Jane", "Wilson^James", "MRN-4711-XY", "19710203", "20230415", "St Example Hospital",
            "1.2.840.99999.4711", "Springfield", SOURCE]


def _phi_dataset() -> Dataset:
    """A small CR image whose header is full of fake PHI, private tags, overlays and curves."""
    pixels = (np.arange(32 * 24, dtype=np.uint16).reshape(32, 24) * 5) % 4096
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = PHI["SOPInstanceUID"]
    ds.file_meta.SourceApplicationEntityTitle = "SPRINGFIELD_PACS"
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.ImageLaterality = "CR", "HIP", "AP", "L"
    ds.PatientSex, ds.PatientAge = "F", "052Y"
    ds.ContentDate, ds.AcquisitionDateTime = "20230415", "20230415101530.000000"
    ref = Dataset()
    ref.ReferencedSOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
    ref.ReferencedSOPInstanceUID = "1.2.840.99999.4711.104"
    ds.ReferencedImageSequence = Sequence([ref])
    observer = Dataset()
    observer.VerifyingObserverName = "Wilson^James"  # a person name inside a sequence
    ds.VerifyingObserverSequence = Sequence([observer])
    request = Dataset()
    request.RequestedProcedureID = "RP-Jane-1"
    request.ScheduledProcedureStepID = "SPS-MRN-4711-XY"
    ds.RequestAttributesSequence = Sequence([request])
    block = ds.private_block(0x0009, "SPRINGFIELD PRIVATE", create=True)
    block.add_new(0x01, "LO", "Jane Doe MRN-4711-XY")
    ds.add_new(0x60000022, "LO", "overlay: Jane Doe")  # Overlay Description
    ds.add_new(0x60004000, "LT", "Overlay Comments: Jane Doe")
    ds.add_new(0x50000022, "LO", "curve: Doe")  # Curve Description (retired)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


def _all_elements(ds: Dataset):
    yield from ds.iterall()
    if getattr(ds, "file_meta", None) is not None:
        yield from ds.file_meta.iterall()


@pytest.fixture
def pseudonymiser(pseudonym_key) -> Pseudonymiser:
    return Pseudonymiser.from_env_or_file()


# --------------------------------------------------------------------------------------------
# Pseudonyms


def test_same_value_and_key_give_the_same_pseudonym(pseudonymiser, pseudonym_key):
    again = Pseudonymiser(pseudonym_key)
    value = pseudonymiser.pseudonym("MRN-4711-XY", "patient")
    assert re.fullmatch(r"PAT-[A-Z2-7]{20}", value)
    assert again.pseudonym("MRN-4711-XY", "patient") == value
    assert again.pseudonym("  MRN-4711-XY ", "patient") == value  # DICOM padding is ignored


def test_pseudonym_is_hmac_sha256_of_kind_and_value(pseudonym_key):
    # The construction is part of the data contract: pseudonyms must link across ingests.
    digest = hmac.new(pseudonym_key, b"study\x001.2.3.4", hashlib.sha256).digest()
    expected = "STU-" + base64.b32encode(digest).decode()[:20]
    assert Pseudonymiser(pseudonym_key).pseudonym("1.2.3.4", "study") == expected


def test_pseudonyms_are_stable_across_processes(pseudonymiser):
    code = ("from msk.core.io.pseudonym import Pseudonymiser;"
            "p = Pseudonymiser.from_env_or_file();"
            "print(p.pseudonym('MRN-4711-XY', 'patient'), p.uid('1.2.3'))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [pseudonymiser.pseudonym("MRN-4711-XY", "patient"), pseudonymiser.uid("1.2.3")]


def test_different_key_or_kind_gives_a_different_pseudonym(pseudonymiser):
    other = Pseudonymiser(OTHER_KEY)
    assert other.pseudonym("MRN-4711-XY", "patient") != pseudonymiser.pseudonym("MRN-4711-XY", "patient")
    as_patient = pseudonymiser.pseudonym("1.2.3.4", "patient")
    as_study = pseudonymiser.pseudonym("1.2.3.4", "study")
    assert as_patient[4:] != as_study[4:]
    assert pseudonymiser.pseudonym("MRN-4711-XZ", "patient") != pseudonymiser.pseudonym("MRN-4711-XY", "patient")


def test_missing_values_have_no_pseudonym_and_kinds_are_checked(pseudonymiser):
    assert pseudonymiser.pseudonym(None, "patient") is None
    assert pseudonymiser.pseudonym("   ", "series") is None
    with pytest.raises(ValueError, match="unknown pseudonym kind"):
        pseudonymiser.pseudonym("x", "doctor")


def test_pseudonymous_uids_are_valid_and_consistent(pseudonymiser):
    uid = pseudonymiser.uid("1.2.840.99999.4711.103")
    assert uid.startswith("2.25.") and UID(uid).is_valid and len(uid) <= 64
    assert pseudonymiser.uid("1.2.840.99999.4711.103") == uid
    assert Pseudonymiser(OTHER_KEY).uid("1.2.840.99999.4711.103") != uid


def test_pseudonymiser_survives_pickling_for_workers(pseudonymiser):
    clone = pickle.loads(pickle.dumps(pseudonymiser))
    assert clone.pseudonym("a", "instance") == pseudonymiser.pseudonym("a", "instance")


# --------------------------------------------------------------------------------------------
# Keys


def test_short_keys_are_refused():
    with pytest.raises(PseudonymKeyError, match="at least 16"):
        Pseudonymiser(b"too-short")
    with pytest.raises(PseudonymKeyError, match="at least 16"):
        parse_key("hex:00ff00ff")


def test_key_syntaxes():
    key = bytes(range(32))
    assert parse_key(key.hex()) == key
    assert parse_key("hex:" + key.hex()) == key
    assert parse_key("base64:" + base64.b64encode(key).decode()) == key
    assert parse_key("raw:" + "x" * 20) == b"x" * 20
    assert parse_key("correct horse battery staple") == b"correct horse battery staple"
    assert parse_key(b"\xff" * 16) == b"\xff" * 16  # a binary key file
    with pytest.raises(PseudonymKeyError, match="not valid hex"):
        parse_key("hex:not-hex-at-all-not-hex-at-all")


def test_missing_key_names_the_variable_and_the_file(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = tmp_path / "pseudonym.key"
    with pytest.raises(PseudonymKeyError) as info:
        Pseudonymiser.from_env_or_file(path)
    assert ENV_VAR in str(info.value) and str(path) in str(info.value)
    assert not path.exists()


def test_create_writes_a_private_key_file_and_reuses_it(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = tmp_path / "keys" / "pseudonym.key"
    created = Pseudonymiser.from_env_or_file(path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(parse_key(path.read_text())) == 32
    reread = Pseudonymiser.from_env_or_file(path, create=True)
    assert reread.pseudonym("p1", "patient") == created.pseudonym("p1", "patient")
    monkeypatch.setenv(ENV_VAR, OTHER_KEY.decode())  # the environment wins over the file
    assert Pseudonymiser.from_env_or_file(path).pseudonym("p1", "patient") != created.pseudonym("p1", "patient")


def test_the_key_never_appears_in_outputs(pseudonymiser, pseudonym_key):
    ds = _phi_dataset()
    meta = read_dicom_header(_to_bytes(ds), source=SOURCE)
    texts = [repr(pseudonymiser), str(pseudonymiser), json.dumps(pseudonymiser.record(meta))]
    scrubbed = _to_bytes(pseudonymiser.scrub_dataset(ds))
    for form in (pseudonym_key, pseudonym_key.hex().encode(), base64.b64encode(pseudonym_key)):
        assert all(form.decode() not in text for text in texts)
        assert form not in scrubbed
    assert pseudonymiser.key_id in repr(pseudonymiser)


# --------------------------------------------------------------------------------------------
# Records


def test_record_contains_no_phi(pseudonymiser):
    meta = read_dicom_header(_to_bytes(_phi_dataset()), source=SOURCE)
    assert meta.patient_name == PHI["PatientName"]  # the header really had it
    record = pseudonymiser.record(meta)
    serialised = json.dumps(record)
    for value in [*PHI.values(), *CORE_PHI]:
        assert value not in serialised, f"{value!r} leaked into the record"
    assert set(record) == {"patient_id", "study_id", "series_id", "instance_id", "modality", "body_part",
                           "view_position", "laterality", "patient_sex", "age_years", "study_year",
                           "study_date", "source_hash"}
    assert record["patient_id"] == pseudonymiser.pseudonym(PHI["PatientID"], "patient")
    assert record["source_hash"] == pseudonymiser.record_id(SOURCE)
    assert (record["modality"], record["body_part"], record["view_position"], record["laterality"]) == (
        "CR", "HIP", "AP", "L")
    assert (record["patient_sex"], record["age_years"], record["study_year"]) == ("F", 52, 2023)
    assert record["study_date"] is None  # dates: year (the default) keeps the year only


@pytest.mark.shared_data
def test_record_of_a_real_header_has_coarse_facts_only(pseudonymiser, shared_data):
    path = shared_data / "dicom/pylibjpeg-data/JPEG2000Lossless__JPEG2KLossless_1s_1f_u_16_16.dcm"
    meta = read_dicom_header(path)
    serialised = json.dumps(pseudonymiser.record(meta), ensure_ascii=False)
    for value in (meta.patient_name, meta.patient_birth_date, meta.institution, meta.study_uid, meta.sop_uid,
                  meta.study_date, str(path)):
        assert value and value not in serialised


@pytest.mark.parametrize(
    ("age", "birth", "study", "years"),
    [
        ("034Y", None, None, 34),
        ("006M", None, None, 0),
        ("018M", None, None, 1),
        ("010W", None, None, 0),
        ("400D", None, None, 1),
        ("095Y", None, None, 90),  # ages over 89 are one category
        (None, "19710203", "20230202", 51),
        (None, "19710203", "20230203", 52),
        ("", "1971", "2023", None),
        ("abc", None, None, None),
        (None, None, None, None),
    ],
)
def test_age_in_years(age, birth, study, years):
    assert age_in_years(age, birth, study) == years


# --------------------------------------------------------------------------------------------
# Scrubbing


def test_scrub_dataset_removes_phi_private_tags_and_overlays(pseudonymiser):
    ds = _phi_dataset()
    original_pixels = ds.pixel_array.copy()
    assert pseudonymiser.scrub_dataset(ds) is ds
    for elem in _all_elements(ds):
        assert not elem.tag.is_private, elem
        assert elem.tag.group & 0xFF00 not in (0x5000, 0x6000), elem
    for keyword in ("PatientAddress", "InstitutionName", "OtherPatientIDs", "StationName", "ImageComments",
                    "StudyDescription", "RequestAttributesSequence", "DeviceSerialNumber"):
        assert keyword not in ds
    assert "SourceApplicationEntityTitle" not in ds.file_meta
    assert ds.PatientID == ds.PatientName == pseudonymiser.pseudonym(PHI["PatientID"], "patient")
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == "" and ds.ReferringPhysicianName == ""
    assert (ds.StudyDate, ds.ContentDate, ds.AcquisitionDateTime, ds.StudyTime) == ("20230101", "20230101", "2023", "")
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
    assert (ds.PatientSex, ds.PatientAge, ds.BodyPartExamined) == ("F", "052Y", "HIP")

    assert ds.SOPClassUID == pydicom.uid.ComputedRadiographyImageStorage  # well-known UIDs stay
    assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == pydicom.uid.ComputedRadiographyImageStorage
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == pseudonymiser.uid(PHI["SOPInstanceUID"])
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == pseudonymiser.uid("1.2.840.99999.4711.104")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert UID(ds[keyword].value).is_valid and ds[keyword].value.startswith("2.25.")

    saved = _to_bytes(ds)
    for value in [*PHI.values(), *CORE_PHI]:
        assert value.encode() not in saved, f"{value!r} survived in the saved file"
    reread = pydicom.dcmread(io.BytesIO(saved))
    np.testing.assert_array_equal(reread.pixel_array, original_pixels)
    assert reread.PatientID == ds.PatientID


def test_scrub_caps_ages_over_89(pseudonymiser):
    ds = _phi_dataset()
    ds.PatientAge = "094Y"
    assert pseudonymiser.scrub_dataset(ds).PatientAge == "090Y"


@pytest.mark.shared_data
def test_scrub_real_file_keeps_its_pixels(pseudonymiser, shared_data):
    path = shared_data / "dicom/pylibjpeg-data/JPEG2000Lossless__JPEG2KLossless_1s_1f_u_16_16.dcm"
    ds = pydicom.dcmread(path)
    phi = [str(ds.PatientName), str(ds.PatientAddress), str(ds.ReferringPhysicianName), str(ds.InstitutionName),
           ds.StudyInstanceUID, ds.PatientBirthDate]
    pixel_bytes = ds.PixelData
    saved = _to_bytes(pseudonymiser.scrub_dataset(ds))
    reread = pydicom.dcmread(io.BytesIO(saved))
    assert reread.PixelData == pixel_bytes
    for elem in _all_elements(reread):
        assert all(value not in str(elem.value) for value in phi if value), elem
    np.testing.assert_array_equal(read_image(saved).pixels, read_image(path).pixels)
