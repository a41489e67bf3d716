"""Keyed pseudonyms for identifiers and the only path from a header to anything written out.

A :class:`Pseudonymiser` holds a secret key and derives, with HMAC-SHA256, stable pseudonyms
(``PAT-``/``STU-``/``SER-``/``INS-``/``SRC-`` + 20 base32 characters, 100 bits) and stable
DICOM UIDs (``2.25.<decimal UUID>``). The same value and key give the same pseudonym in every
process and on every machine, so a patient's images stay linked across ingests; without the
key a pseudonym cannot be reversed or recomputed from a guessed MRN.

Two outputs leave this module:

* :meth:`Pseudonymiser.record` turns an :class:`~msk.core.io.dicom.ImageMeta` into the metadata
  msk writes: pseudonymous ids, coded facts (modality, body part, view, laterality, sex), age
  in whole years (90 for anyone older than 89) and the study year. Names, birth dates, full
  dates, institutions and raw UIDs never appear.
* :meth:`Pseudonymiser.scrub_dataset` de-identifies a pydicom data set in place, in the spirit
  of the DICOM PS3.15 Basic Application Level Confidentiality Profile (see docs/reader.md).

Key sources (:meth:`Pseudonymiser.from_env_or_file`), first match wins:

1. the environment variable ``MSK_PSEUDONYM_KEY``;
2. a key file (text, same syntax; ``create=True`` writes a random 32-byte key as hex, mode 0600).

Key syntax: ``hex:<hex>``, ``base64:<base64>`` or ``raw:<text>``; without a prefix, a string of
32 or more hex digits is hex (what ``openssl rand -hex 32`` prints and what msk writes),
anything else is taken as UTF-8 text. Decoded keys shorter than 16 bytes are refused.
The key never appears in ``repr()``, records or scrubbed data sets; :attr:`key_id` is a
non-secret fingerprint for telling keys apart in logs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import uuid
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from msk.core.errors import ConfigError

if TYPE_CHECKING:
    from msk.core.io.dicom import ImageMeta

__all__ = ["ENV_VAR", "KINDS", "MIN_KEY_BYTES", "PseudonymKeyError", "Pseudonymiser", "age_in_years", "parse_key"]

log = logging.getLogger(__name__)

ENV_VAR = "MSK_PSEUDONYM_KEY"
MIN_KEY_BYTES = 16
#: Bytes of a key made by ``create=True``.
NEW_KEY_BYTES = 32
#: Pseudonym kinds and their prefixes; the kind is part of the HMAC input, so the same value
#: gets unrelated pseudonyms as a patient id and as a study UID.
KINDS = {"patient": "PAT", "study": "STU", "series": "SER", "instance": "INS", "source": "SRC"}
PSEUDONYM_CHARS = 20
#: Reported ages are capped here (HIPAA Safe Harbor: ages over 89 are one category).
MAX_AGE = 90

_HEX = re.compile(r"[0-9a-fA-F]+")
_CODE = re.compile(r"[A-Z0-9 _]{1,16}")  # DICOM CS: what a coded field may hold, nothing freer
_AGE = re.compile(r"(\d{1,3})\s*([DWMY])")
_AGE_UNIT_DAYS = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")


#: De-identification Method (LO: at most 64 characters); docs/reader.md has the details.
DEIDENTIFICATION_METHOD = "msk: PS3.15 basic profile; HMAC pseudonyms; year-only dates"

#: Removed wherever they occur (PS3.15 Table E.1-1 action X, and D/Z ones of type 3).
_REMOVE_KEYWORDS = (
    "AcquisitionComments", "AdditionalPatientHistory", "AdmissionID", "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription", "Allergies", "BranchOfService", "ClinicalTrialSponsorName",
    "ConsultingPhysicianName", "CountryOfResidence", "CurrentPatientLocation", "DerivationDescription",
    "DetectorID", "DeviceSerialNumber", "DigitalSignaturesSequence", "EthnicGroup",
    "FillerOrderNumberImagingServiceRequest", "GantryID", "ImageComments", "InstitutionAddress",
    "InstitutionCodeSequence", "InstitutionName", "InstitutionalDepartmentName",
    "InsurancePlanIdentification", "IssuerOfPatientID", "MACParametersSequence", "MedicalAlerts",
    "MedicalRecordLocator", "MilitaryRank", "ModifiedAttributesSequence", "Occupation",
    "OrderCallbackPhoneNumber", "OrderEnteredBy", "OrderEntererLocation", "OriginalAttributesSequence",
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress",
    "PatientBirthName", "PatientBirthTime", "PatientComments", "PatientInstitutionResidence",
    "PatientInsurancePlanCodeSequence", "PatientMotherBirthName", "PatientReligiousPreference",
    "PatientSize", "PatientState", "PatientTelephoneNumbers", "PatientTransportArrangements",
    "PatientWeight", "PerformedLocation", "PerformedProcedureStepDescription",
    "PerformedProcedureStepID", "PerformedStationAETitle", "PerformedStationName",
    "PerformingPhysicianName", "PersonAddress", "PersonTelephoneNumbers", "PhysiciansOfRecord",
    "PlacerOrderNumberImagingServiceRequest", "ProtocolName", "ReasonForStudy",
    "ReasonForTheRequestedProcedure", "ReferringPhysicianAddress",
    "ReferringPhysicianIdentificationSequence", "ReferringPhysicianTelephoneNumbers",
    "RegionOfResidence", "RequestAttributesSequence", "RequestedProcedureDescription",
    "RequestedProcedureID", "RequestingPhysician", "RequestingService", "ResponsibleOrganization",
    "ResponsiblePerson", "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID", "SeriesDescription", "ServiceEpisodeID", "SpecialNeeds",
    "StationName", "StudyComments", "StudyDescription", "TextComments", "TextString",
    "NameOfPhysiciansReadingStudy", "OperatorsName",
)
#: Emptied, not removed: type 2 attributes of mandatory modules (must be present).
_EMPTY_KEYWORDS = ("AccessionNumber", "PatientBirthDate", "ReferringPhysicianName", "StudyID")
_FILE_META_REMOVE = (
    "SourceApplicationEntityTitle", "SendingApplicationEntityTitle", "ReceivingApplicationEntityTitle",
    "PrivateInformationCreatorUID", "PrivateInformation",
)


def _tags(keywords: tuple[str, ...]) -> frozenset[int]:
    tags = {keyword: tag_for_keyword(keyword) for keyword in keywords}
    unknown = sorted(k for k, t in tags.items() if t is None)
    if unknown:  # a typo would silently leak the attribute
        raise RuntimeError(f"unknown DICOM keywords in the scrub tables: {unknown}")
    return frozenset(t for t in tags.values() if t is not None)


_REMOVE = _tags(_REMOVE_KEYWORDS)
_EMPTY = _tags(_EMPTY_KEYWORDS)


class PseudonymKeyError(ConfigError):
    """The pseudonymisation key is missing or unusable."""


def parse_key(text: str | bytes, *, where: str = "key") -> bytes:
    """Decode a key given as ``hex:``/``base64:``/``raw:`` text, bare hex or bare text.

    ``where`` names the key's origin in error messages (never the key itself).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:  # a binary key file
            return _checked(text, where)
    text = text.strip()
    prefix, _, rest = text.partition(":")
    try:
        if prefix == "hex":
            key = bytes.fromhex(rest)
        elif prefix == "base64":
            key = base64.b64decode(rest, validate=True)
        elif prefix == "raw":
            key = rest.encode("utf-8")
        elif len(text) >= 2 * MIN_KEY_BYTES and len(text) % 2 == 0 and _HEX.fullmatch(text):
            key = bytes.fromhex(text)
        else:
            key = text.encode("utf-8")
    except (ValueError, binascii.Error) as exc:
        raise PseudonymKeyError(f"{where} is not valid {prefix}: {exc}") from None
    return _checked(key, where)


def _checked(key: bytes, where: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise PseudonymKeyError(
            f"{where} is {len(key)} bytes; a pseudonymisation key needs at least {MIN_KEY_BYTES} "
            f"(make one with: openssl rand -hex {NEW_KEY_BYTES})"
        )
    return key


def age_in_years(age: str | None, birth_date: str | None = None, study_date: str | None = None) -> int | None:
    """Whole years from a DICOM AS value (``"034Y"``, ``"006M"``, ``"010W"``, ``"003D"``).

    Falls back to the difference of birth and study dates (``YYYYMMDD``) when the age is
    missing. Capped at :data:`MAX_AGE`. None when nothing usable is given.
    """
    years: float | None = None
    match = _AGE.fullmatch((age or "").strip().upper())
    if match:
        years = int(match.group(1)) * _AGE_UNIT_DAYS[match.group(2)] / 365.25
    else:
        born, seen = _parse_date(birth_date), _parse_date(study_date)
        if born and seen and seen >= born:
            years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    if years is None:
        return None
    return min(int(years + 1e-9), MAX_AGE)


def _parse_date(value: str | None) -> date | None:
    match = _DATE.match((value or "").strip())
    if not match:
        return None
    try:
        return date(*(int(g) for g in match.groups()))
    except ValueError:
        return None


def _year(value: str | None) -> int | None:
    text = (value or "").strip()
    if len(text) >= 4 and text[:4].isdigit() and 1800 <= int(text[:4]) <= 2200:
        return int(text[:4])
    return None


def _sex(value: str | None) -> str | None:
    code = _code(value)
    return code if code in ("M", "F", "O") else None


def _code(value: str | None) -> str | None:
    """A coded header value (upper-case CS), or None if it looks like anything freer."""
    text = (value or "").strip().upper()
    return text if _CODE.fullmatch(text) else None


class Pseudonymiser:
    """Keyed, deterministic pseudonyms (HMAC-SHA256) and header de-identification."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        if not isinstance(key, (bytes, bytearray)):
            raise TypeError(f"key must be bytes, not {type(key).__name__} (use parse_key for text)")
        self._key = _checked(bytes(key), "pseudonymisation key")

    @classmethod
    def from_env_or_file(
        cls, key_file: Path | None = None, env: str = ENV_VAR, create: bool = False
    ) -> Pseudonymiser:
        """The key from ``$env`` if set, else from ``key_file``; see the module docstring.

        ``create=True`` writes a new random key to ``key_file`` (mode 0600) when it does not
        exist. Raises :class:`PseudonymKeyError` naming the variable and the file otherwise.
        """
        value = os.environ.get(env, "").strip()
        if value:
            return cls(parse_key(value, where=f"${env}"))
        if key_file is not None:
            path = Path(key_file).expanduser()
            if path.is_file():
                return cls(_read_key_file(path))
            if create:
                return cls(_create_key_file(path))
        where = f"key file {key_file} does not exist" if key_file is not None else "no key file given"
        raise PseudonymKeyError(
            f"no pseudonymisation key: set ${env} (e.g. export {env}=$(openssl rand -hex {NEW_KEY_BYTES})) "
            f"or pass a key file ({where})"
        )

    @property
    def key(self) -> bytes:
        """The secret key, for handing this pseudonymiser to worker processes. Never log it."""
        return self._key

    @property
    def key_id(self) -> str:
        """A non-secret fingerprint of the key (8 hex digits), safe to log and store."""
        return hmac.new(self._key, b"msk-key-id", hashlib.sha256).hexdigest()[:8]

    def __repr__(self) -> str:
        return f"Pseudonymiser(key_id={self.key_id!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Pseudonymiser, (self._key,))

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, kind.encode() + b"\0" + value.encode("utf-8"), hashlib.sha256).digest()

    def pseudonym(self, value: str | None, kind: str) -> str | None:
        """``<PREFIX>-<20 base32 chars>`` for ``value`` (stripped); None for None or blank."""
        if kind not in KINDS:
            raise ValueError(f"unknown pseudonym kind {kind!r}; expected one of {sorted(KINDS)}")
        text = "" if value is None else str(value).strip()
        if not text:
            return None
        digest = base64.b32encode(self._digest(kind, text)).decode("ascii")
        return f"{KINDS[kind]}-{digest[:PSEUDONYM_CHARS]}"

    def record_id(self, source: str) -> str:
        """The pseudonymous id of an input path (paths can hold names): ``SRC-...``."""
        return self.pseudonym(source if source.strip() else "<unnamed>", "source")  # type: ignore[return-value]

    def uid(self, value: str) -> str:
        """A pseudonymous DICOM UID for ``value``: ``2.25.`` + the decimal of a keyed UUID."""
        keyed = uuid.UUID(bytes=self._digest("uid", value.strip())[:16], version=4)
        return f"2.25.{keyed.int}"

    def record(self, meta: ImageMeta) -> dict[str, Any]:
        """The only metadata msk writes for an image: no names, dates, institutions or raw UIDs."""
        return {
            "patient_id": self.pseudonym(meta.patient_id, "patient"),
            "study_id": self.pseudonym(meta.study_uid, "study"),
            "series_id": self.pseudonym(meta.series_uid, "series"),
            "instance_id": self.pseudonym(meta.sop_uid, "instance"),
            "modality": _code(meta.modality),
            "body_part": _code(meta.body_part),
            "view_position": _code(meta.view_position),
            "laterality": _code(meta.laterality),
            "patient_sex": _sex(meta.patient_sex),
            "age_years": age_in_years(meta.patient_age, meta.patient_birth_date, meta.study_date),
            "study_year": _year(meta.study_date),
            "source_hash": self.record_id(meta.source),
        }

    def scrub_dataset(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (PS3.15 basic-profile style) and return it.

        * Patient ID and Patient's Name become the patient pseudonym.
        * Identifying attributes (birth date, addresses, phone numbers, other ids, institution,
          physicians, operators, accession number, station, descriptions, comments, ...) are
          removed, or emptied where DICOM requires them to be present; every other person
          name anywhere (sequences included) is emptied.
        * Dates (DA) keep their year (``YYYY0101``), date-times (DT) become ``YYYY``, times
          (TM) are emptied; ages over 89 become ``090Y``.
        * Every UID that is not a well-known DICOM UID (SOP classes, transfer syntaxes, ...)
          becomes :meth:`uid` of it, so references between objects stay consistent.
        * Private tags, curves (50xx) and overlays (60xx, incl. their comments) and elements of
          unknown VR are removed.
        * Patient Identity Removed = YES and De-identification Method are set.

        Pixel data is not touched: text burned into the pixels (Burned In Annotation = YES)
        is not removed.
        """
        ds.remove_private_tags()
        ds.walk(self._scrub_element)
        file_meta = getattr(ds, "file_meta", None)
        if file_meta is not None:
            for keyword in _FILE_META_REMOVE:
                if keyword in file_meta:
                    del file_meta[keyword]
            instance = file_meta.get("MediaStorageSOPInstanceUID")
            if instance and not UID(instance).type:
                file_meta.MediaStorageSOPInstanceUID = self.uid(str(instance))
        ds.PatientID = ds.get("PatientID") or ""  # pseudonymised by the walk
        ds.PatientName = ds.PatientID  # emptied with every other person name by the walk
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        return ds

    def _scrub_element(self, ds: Dataset, elem: DataElement) -> None:
        tag, vr, keyword = elem.tag, elem.VR, elem.keyword
        if tag.is_private or (tag.group & 0xFF00) in (0x5000, 0x6000) or vr == "UN" or tag in _REMOVE:
            del ds[tag]
        elif keyword == "PatientID":
            elem.value = self.pseudonym(_text(elem.value), "patient") or ""
        elif tag in _EMPTY or vr == "PN":
            elem.value = [] if vr == "SQ" else ""
        elif keyword == "PatientAge":
            age = age_in_years(_text(elem.value))
            elem.value = f"{age:03d}Y" if age is not None and age >= MAX_AGE else elem.value
        elif vr == "UI" and elem.value:
            elem.value = _map_values(elem.value, lambda v: v if UID(v).type else self.uid(v))
        elif vr == "DA" and elem.value:
            elem.value = _map_values(elem.value, _year_only_date)
        elif vr == "DT" and elem.value:
            elem.value = _map_values(elem.value, _year_only_datetime)
        elif vr == "TM":
            elem.value = ""


def _year_only_date(value: str) -> str:
    year = _year(value)
    return f"{year}0101" if year else ""


def _year_only_datetime(value: str) -> str:
    year = _year(value)
    return str(year) if year else ""


def _text(value: Any) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def _map_values(value: Any, fn: Any) -> Any:
    if isinstance(value, (MultiValue, list, tuple)):
        return [fn(str(v)) for v in value]
    return fn(str(value))


def _read_key_file(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("pseudonymisation key file %s is accessible to other users (mode %o); chmod 600 it",
                    path, stat.S_IMODE(mode))
    return parse_key(path.read_bytes(), where=f"key file {path}")


def _create_key_file(path: Path) -> bytes:
    """Write a new random key (hex text) with mode 0600; if another process won the race, read its."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(NEW_KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key_file(path)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    log.info("created pseudonymisation key file %s (keep it: the same key gives the same pseudonyms)", path)
    return key
