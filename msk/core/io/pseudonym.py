"""Keyed pseudonyms for identifiers and the only path from a header to anything written out.

A :class:`Pseudonymiser` holds a secret key and derives, with HMAC-SHA256, stable pseudonyms
(``PAT-``/``STU-``/``SER-``/``INS-``/``SRC-`` + 20 base32 characters, 100 bits) and stable
DICOM UIDs (``2.25.<decimal UUID>``). The same value and key give the same pseudonym in every
process and on every machine, so a patient's images stay linked across ingests; without the
key a pseudonym cannot be reversed or recomputed from a guessed MRN.

Two outputs leave this module:

* :meth:`Pseudonymiser.record` turns an :class:`~msk.core.io.dicom.ImageMeta` into the metadata
  msk writes: pseudonymous ids, coded facts (modality, body part, view, laterality, sex), age
  in whole years (90 for anyone older than 89) and the study year, or with ``dates="shift"``
  the study date shifted by a keyed per-patient number of days. Names, birth dates, true full
  dates, institutions and raw UIDs never appear.
* :meth:`Pseudonymiser.scrub_dataset` de-identifies a pydicom data set in place by the DICOM
  PS3.15 Basic Application Level Confidentiality Profile (Table E.1-1, from
  :mod:`msk.core.io.deid_profile`), with the options docs/privacy.md lists.

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
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from msk.core.errors import ConfigError
from msk.core.io.deid_profile import profile_action

if TYPE_CHECKING:
    from msk.core.io.dicom import ImageMeta

__all__ = ["DATE_MODES", "DATE_SHIFT_DAYS", "ENV_VAR", "KINDS", "MIN_KEY_BYTES", "RETAINED_BY_OPTION",
           "DateMode", "PseudonymKeyError", "Pseudonymiser", "age_in_years", "parse_key"]

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


#: How dates are kept (``IngestConfig.dates``): ``year``: the year only; ``shift``: the full date moved
#: back by a per-patient number of days (:meth:`Pseudonymiser.date_shift_days`), so intervals survive.
DateMode = Literal["year", "shift"]
DATE_MODES: tuple[str, ...] = ("year", "shift")
#: Range of the per-patient date shift, in days back in time (inclusive).
DATE_SHIFT_DAYS = (30, 1825)

#: De-identification Method (LO: at most 64 characters) per date mode; docs/privacy.md has the details.
DEIDENTIFICATION_METHOD = {
    "year": "msk: PS3.15 basic profile; keyed UIDs; sex, age; year-only dates",
    "shift": "msk: PS3.15 basic profile; keyed UIDs; sex, age; shifted dates",
}

#: Profile attributes whose information msk keeps, and the PS3.15 E.3 option that allows it.
#: Every other attribute of Table E.1-1 is handled as the Basic Profile says (the strictest of its
#: actions: X where X is allowed), see :meth:`Pseudonymiser.scrub_dataset`.
RETAINED_BY_OPTION = {
    "PatientSex": "Retain Patient Characteristics Option (E.3.4): kept as M, F or O",
    "PatientAge": "Retain Patient Characteristics Option (E.3.4): whole years, 90 for anyone older than 89",
    "dates (DA, DT)": "Retain Longitudinal Temporal Information with Modified Dates Option (E.3.6): "
                      "the year only, or shifted by a per-patient number of days (dates: shift)",
}

#: Removed from the file meta information (group 0002), which Table E.1-1 does not cover.
_FILE_META_REMOVE = (
    "SourceApplicationEntityTitle", "SendingApplicationEntityTitle", "ReceivingApplicationEntityTitle",
    "PrivateInformationCreatorUID", "PrivateInformation",
)
#: A dummy value (action D) for string VRs; numbers become 0, binary values and sequences empty.
_DUMMY = "ANONYMIZED"
_DUMMY_MAX = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "AS": 4}
_TEXT_VRS = frozenset({"AE", "CS", "SH", "LO", "ST", "LT", "UT", "UC", "UR", "PN", "AS"})
_NUMBER_VRS = frozenset({"DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
_PATIENT_ID = tag_for_keyword("PatientID")
_PATIENT_AGE = tag_for_keyword("PatientAge")
_PATIENT_SEX = tag_for_keyword("PatientSex")
#: Emptied (Z) although it is a date: the age is kept instead, a birth date would add nothing.
_PATIENT_BIRTH_DATE = tag_for_keyword("PatientBirthDate")


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

    def date_shift_days(self, value: str | None, kind: str = "patient") -> int:
        """Days (negative: back in time) by which ``dates: shift`` moves every date of a patient.

        Keyed like the pseudonyms (HMAC-SHA256 of the key, ``kind`` and the stripped Patient ID
        ``value``), so every study of a patient moves by the same amount in every run and on every
        machine, and the intervals between them are kept; without the key the shift cannot be
        recomputed. Uniform over :data:`DATE_SHIFT_DAYS`. An image without a Patient ID is
        shifted by its study's shift (``kind="study"``, the Study Instance UID), else its file's.
        """
        low, high = DATE_SHIFT_DAYS
        text = f"{kind}\0{(value or '').strip()}"
        number = int.from_bytes(self._digest("date-shift", text)[:8], "big")
        return -(low + number % (high - low + 1))

    def _shift_for(self, patient: str | None, study: str | None, source: str | None) -> int:
        """The shift of an image: its patient's; without a Patient ID, its study's, else its file's."""
        for kind, value in (("patient", patient), ("study", study), ("source", source)):
            if value and value.strip():
                return self.date_shift_days(value, kind)
        return self.date_shift_days("", "source")

    def record(self, meta: ImageMeta, dates: DateMode = "year") -> dict[str, Any]:
        """The only metadata msk writes for an image: no names, full dates, institutions or raw UIDs.

        ``dates="year"``: ``study_year`` is the study's year, ``study_date`` is None. ``"shift"``:
        ``study_date`` is the study date moved by :meth:`date_shift_days` of the patient (a
        :class:`datetime.date`) and ``study_year`` is None (the true year next to a shifted date
        would narrow the shift down).
        """
        if dates not in DATE_MODES:
            raise ValueError(f"dates must be one of {DATE_MODES}, not {dates!r}")
        shifted = None
        if dates == "shift":
            day = _parse_date(meta.study_date)
            shift = self._shift_for(meta.patient_id, meta.study_uid, meta.source)
            shifted = day + timedelta(days=shift) if day else None
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
            "study_year": _year(meta.study_date) if dates == "year" else None,
            "study_date": shifted,
            "source_hash": self.record_id(meta.source),
        }

    def scrub_dataset(self, ds: Dataset, dates: DateMode = "year") -> Dataset:
        """De-identify ``ds`` in place by the PS3.15 Basic Profile (Table E.1-1) and return it.

        The attribute list and actions come from :mod:`msk.core.io.deid_profile` (a maintained
        copy of the standard's table). For each element, anywhere (sequences included):

        * Private tags, curves (50xx), overlays (60xx, all of the group: overlay bitmaps can hold
          burned-in text) and elements of unknown VR (UN) are removed.
        * Patient ID and Patient's Name become the patient pseudonym (Z/D and Z allow a dummy).
        * Patient's Sex and Age are kept, ages over 89 as ``090Y`` (Retain Patient
          Characteristics Option).
        * A profile attribute whose actions include X is removed (the strictest choice), except
          that sequences marked ``X/Z/U*`` (Referenced/Source Image) are kept with their UIDs
          replaced, and dates are kept modified (below).
        * Dates (DA) and date-times (DT) are kept modified (Retain Longitudinal Temporal
          Information with Modified Dates Option): ``dates="year"``: ``YYYY0101`` and ``YYYY``;
          ``"shift"``: moved back by the patient's :meth:`date_shift_days` (DT: the shifted date
          only). Times (TM) are emptied. A date the profile only removes (X) is removed; the
          birth date is emptied (the age is kept instead).
        * Every UID that is not a well-known DICOM UID (SOP classes, transfer syntaxes, ...)
          becomes :meth:`uid` of it (action U, and any other instance UID), so references
          between objects stay consistent and the same UID maps to the same UID under one key.
        * Other Z attributes are emptied, D attributes get a dummy value (``ANONYMIZED``, 0, or
          empty for binary values and sequences); every other person name (PN) is emptied.
        * Patient Identity Removed = YES, De-identification Method and Longitudinal Temporal
          Information Modified = MODIFIED are set.

        Pixel data is not touched here: text burned into the pixels is another step.
        """
        if dates not in DATE_MODES:
            raise ValueError(f"dates must be one of {DATE_MODES}, not {dates!r}")
        shift = None
        if dates == "shift":
            shift = self._shift_for(_text(ds.get("PatientID")), _text(ds.get("StudyInstanceUID")), None)
        ds.remove_private_tags()
        ds.walk(lambda parent, elem: self._scrub_element(parent, elem, shift))
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
        ds.DeidentificationMethod = DEIDENTIFICATION_METHOD[dates]
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        return ds

    def _scrub_element(self, ds: Dataset, elem: DataElement, shift: int | None) -> None:
        tag, vr = elem.tag, elem.VR
        action = profile_action(tag) or ""
        if tag.is_private or (tag.group & 0xFF00) in (0x5000, 0x6000) or vr == "UN":
            del ds[tag]
        elif tag == _PATIENT_ID:
            elem.value = self.pseudonym(_text(elem.value), "patient") or ""
        elif tag == _PATIENT_AGE:
            age = age_in_years(_text(elem.value))
            elem.value = f"{age:03d}Y" if age is not None and age >= MAX_AGE else elem.value
        elif tag == _PATIENT_SEX:
            elem.value = _sex(_text(elem.value)) or ""
        elif tag == _PATIENT_BIRTH_DATE:
            elem.value = ""
        elif action == "X" or (action.startswith("X") and action != "X/Z/U*" and vr not in ("DA", "DT", "TM")):
            del ds[tag]
        elif vr == "SQ":
            if action and action != "X/Z/U*":  # Z or D of a sequence: emptied (its items may hold anything)
                elem.value = []
        elif vr == "UI" and elem.value:
            elem.value = _map_values(elem.value, lambda v: v if UID(v).type else self.uid(v))
        elif vr == "DA" and elem.value:
            elem.value = _map_values(elem.value, lambda v: _modified_date(v, shift))
        elif vr == "DT" and elem.value:
            elem.value = _map_values(elem.value, lambda v: _modified_datetime(v, shift))
        elif vr == "TM":
            elem.value = ""
        elif vr == "PN" or "Z" in action:
            elem.value = ""
        elif action == "D":
            elem.value = _dummy(vr)


def _dummy(vr: str) -> Any:
    """A non-empty dummy value of ``vr`` (action D); binary values become empty."""
    if vr in _TEXT_VRS:
        return _DUMMY[: _DUMMY_MAX.get(vr, len(_DUMMY))] if vr != "AS" else "000Y"
    if vr in _NUMBER_VRS:
        return 0
    return b"" if vr.startswith("O") else ""


def _modified_date(value: str, shift: int | None) -> str:
    if shift is None:
        return _year_only_date(value)
    day = _parse_date(value)
    return (day + timedelta(days=shift)).strftime("%Y%m%d") if day else ""


def _modified_datetime(value: str, shift: int | None) -> str:
    if shift is None:
        return _year_only_datetime(value)
    return _modified_date(value, shift)


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
