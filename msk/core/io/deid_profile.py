"""The DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile, as a lookup table.

The attribute list of Table E.1-1 and its Basic Profile actions are taken from a maintained,
machine-generated copy of the standard: ``dicom-anonymizer`` (KitwareMedical) ships the table
scraped from the published PS3.15 (module ``dicomanonymizer.dicom_anonymization_databases``,
edition :data:`PROFILE_EDITION`), never a hand-typed list. pydicom, ``deid`` and ``dicognito``
ship no such table (``deid`` ships recipes, ``dicognito`` its own handlers).

Actions (PS3.15 Table E.1-1 legend):

=========  ===================================================================================
``X``      remove
``Z``      replace with a zero-length value, or a non-zero dummy value consistent with the VR
``D``      replace with a non-zero-length dummy value consistent with the VR
``U``      replace with a non-zero-length UID, internally consistent within a set of instances
``X/Z``,   one of the listed, by the attribute's type in the IOD (``X`` where it may be absent,
``X/D``,   ``Z`` where it must be present, ``D`` where it must have a value); ``U*``: ``X`` unless
``Z/D``,   a replacement of any non-sequence UID value it holds is consistent
``X/Z/D``,
``X/Z/U*``
=========  ===================================================================================

:func:`profile_action` answers for any tag, including the repeating groups of the table
(curves ``50xx,xxxx``, overlay data ``60xx,3000`` and comments ``60xx,4000``).
"""

from __future__ import annotations

import importlib
from datetime import date, timedelta
from functools import lru_cache

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

__all__ = ["ACTIONS", "FILLED_VRS", "PROFILE_EDITION", "ProfileError", "basic_profile", "fill_profile",
           "profile_action", "profile_rows"]

#: The edition of PS3.15 the table comes from (a module of ``dicomanonymizer.dicom_anonymization_databases``).
PROFILE_EDITION = "dicomfields_2026c"

#: ``dicom-anonymizer``'s category name -> the Table E.1-1 action code.
ACTIONS = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
           "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}


class ProfileError(RuntimeError):
    """The profile table could not be loaded (a broken or too old ``dicom-anonymizer``)."""


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[int, str], tuple[tuple[int, int, int, int, str], ...]]:
    """(exact tag -> action, (group, element, group mask, element mask, action) of repeating groups)."""
    try:
        module = importlib.import_module(f"dicomanonymizer.dicom_anonymization_databases.{PROFILE_EDITION}")
    except ImportError as exc:
        raise ProfileError(f"the PS3.15 profile table {PROFILE_EDITION} is missing ({exc}); "
                           "install dicom-anonymizer>=2.1 (pip install -e .)") from None
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in ACTIONS.items():
        for entry in getattr(module, category, ()):
            if len(entry) == 2:
                exact[int(Tag(entry[0], entry[1]))] = action
            else:
                group, element, group_mask, element_mask = entry
                masked.append((group, element, group_mask, element_mask, action))
    if len(exact) < 500:  # the 2023-2026 editions list 600+ attributes
        raise ProfileError(f"the PS3.15 profile table {PROFILE_EDITION} lists only {len(exact)} attributes")
    return exact, tuple(masked)


def basic_profile() -> dict[int, str]:
    """Every attribute of Table E.1-1 with an exact tag -> its Basic Profile action (a copy)."""
    return dict(_tables()[0])


def profile_action(tag: int | BaseTag) -> str | None:
    """The Basic Profile action for ``tag`` (``"X"``, ``"Z"``, ``"D"``, ``"U"``, ``"X/Z"``, ...),
    or None when the profile does not list it. Private tags are not in the table (the profile
    removes them all, PS3.15 E.3.10); callers handle them."""
    exact, masked = _tables()
    value = int(tag)
    action = exact.get(value)
    if action is not None:
        return action
    group, element = value >> 16, value & 0xFFFF
    for g, e, g_mask, e_mask, masked_action in masked:
        if group & g_mask == g and element & e_mask == e:
            return masked_action
    return None


def profile_rows() -> list[tuple[int, str, str, str]]:
    """``(tag, keyword, VR, action)`` of every exact-tag attribute, sorted by tag; keyword and VR
    are empty for attributes newer than the installed pydicom's dictionary."""
    rows = []
    for tag, action in sorted(_tables()[0].items()):
        keyword = keyword_for_tag(tag) or ""
        rows.append((tag, keyword, dictionary_VR(tag) if keyword else "", action))
    return rows


#: VRs :func:`fill_profile` writes (the other attributes of the table are binary or plain numbers).
FILLED_VRS = frozenset({"AE", "CS", "SH", "LO", "ST", "LT", "UT", "UC", "UR", "PN", "DA", "DT", "TM", "UI", "DS",
                        "IS", "SQ"})


def fill_profile(ds: Dataset, uid_root: str = "1.2.826.0.1.3680043.10.999.",
                 first_day: date = date(1950, 3, 2)) -> list[str]:
    """Give every data set attribute of the table with a VR in :data:`FILLED_VRS` a distinct value
    that cannot occur by chance, and return those values (with dates also as ``YYYY-MM-DD``).

    For tests and for comparing de-identifiers (bench/deid.py): text is ``zq<n>x`` (``ZQ0<n>X`` for
    CS, ``Zq<n>^Marker`` for PN; base32 pseudonyms hold no 0, 1, 8, 9 or lower case and hex
    digests no z or q), UIDs ``uid_root<n>``, dates ``first_day + n`` days (never a 1 January when
    ``first_day`` is early in a year), times ``235959.<n>``, numbers ``9130000 + n``; a sequence
    gets one item with a referenced SOP instance UID and a person name. Command (0000) and file
    meta (0002) attributes and those unknown to pydicom's dictionary are left out.
    """
    values: list[str] = []
    for n, (tag, keyword, vr, _action) in enumerate(profile_rows(), start=100):
        if not keyword or tag >> 16 in (0x0000, 0x0002) or vr not in FILLED_VRS:
            continue
        day = first_day + timedelta(days=n)
        value: object
        if vr == "SQ":
            item = Dataset()
            item.ReferencedSOPInstanceUID = f"{uid_root}{n}.1"
            item.PersonName = f"Zq{n:05d}^Item"
            value = Sequence([item])
            values += [item.ReferencedSOPInstanceUID, f"Zq{n:05d}"]
        else:
            value = {"DA": day.strftime("%Y%m%d"), "DT": day.strftime("%Y%m%d") + "101530",
                     "TM": f"235959.{n:06d}", "UI": f"{uid_root}{n}", "DS": str(9_130_000 + n),
                     "IS": str(9_130_000 + n), "CS": f"ZQ0{n:04d}X", "PN": f"Zq{n:05d}^Marker",
                     "UR": f"http://zq{n:05d}x.example"}.get(vr, f"zq{n:05d}x")
            values.append(str(value))
            if vr in ("DA", "DT"):
                values.append(day.isoformat())  # how a date looks in a shard (date32) or JSON
        ds.add_new(tag, vr, value)
    return values
