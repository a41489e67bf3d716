"""Fake protected health information: names, identifiers, institutions and export folder names.

Everything here is invented and obviously so (the institutions are fictional); it exists so
that de-identification, patient grouping and messy-archive handling have realistic input.
Identifiers are *bijections* of the generator's indices, so they look random but never collide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAST_NAMES = (
    "Doe", "Roe", "Smith", "Miller", "Muster", "Rossi", "Dupont", "Novak", "Jansen", "Kowalski",
    "Garcia", "Silva", "Nakamura", "Okafor", "Andersen", "Papadopoulos", "O'Neill", "Van der Berg",
    "Schmidt", "Bianchi", "Moreau", "Horvat", "Lindqvist", "Murphy", "Yilmaz", "Costa", "Keller",
    "Fischer", "Meier", "Huber", "Dubois", "Ivanova", "Kim", "Nguyen", "Haddad", "Mensah",
)
FEMALE_NAMES = (
    "Jane", "Anna", "Maria", "Sofia", "Lea", "Emma", "Laura", "Chiara", "Ines", "Mia", "Nora",
    "Elena", "Sara", "Julia", "Hana", "Amara", "Ingrid", "Zoe", "Lucia", "Marta",
)
MALE_NAMES = (
    "John", "Max", "Luca", "Paul", "Jonas", "Marco", "Pierre", "Tomas", "Noah", "Ali", "Kenji",
    "Lars", "David", "Felix", "Mateo", "Omar", "Erik", "Samuel", "Hugo", "Leon",
)
PHYSICIANS = ("House^Gregory", "Quinn^Michaela", "Kildare^James", "Welby^Marcus", "Grey^Meredith",
              "Ross^Doug", "Carter^John", "Lewis^Susan")


@dataclass(frozen=True)
class Institution:
    """A fictional hospital with its own identifier and export-folder conventions."""

    name: str
    code: str
    pid_format: str  # str.format pattern of the PatientID; receives ``n``
    folder_style: int  # how its PACS export names patient folders
    station: str


INSTITUTIONS = (
    Institution("St. Elsewhere General Hospital", "SEG", "{n:08d}", 0, "SEG-CR01"),
    Institution("Mercy West (fictional)", "MWF", "MRN{n:08d}", 1, "MW_DX_2"),
    Institution("Hospital Universitario Ficticio", "HUF", "{n:010d}", 2, "HUF-RX-3"),
    Institution("Klinikum Nirgendwo", "KNW", "P-{n:08d}", 3, "KNW_BUCKY"),
)


def patient_number(first_index: int, seed: int) -> int:
    """A random-looking 8-digit number, unique per patient (bijective in ``first_index``)."""
    return (first_index * 48271 + (seed * 1_000_003) % 100_000_000 + 12_345_678) % 100_000_000


def accession_number(first_index: int, study: int, seed: int) -> str:
    """A unique 10-digit accession number (bijective in ``(first_index, study)``)."""
    n = (first_index * 64 + study) * 2654435761 + seed * 97
    return f"A{n % 10_000_000_000:010d}"


def person_name(rng: np.random.Generator, sex: str) -> tuple[str, str, str]:
    """``(last, first, middle initial or '')``."""
    last = LAST_NAMES[int(rng.integers(len(LAST_NAMES)))]
    firsts = FEMALE_NAMES if sex == "F" else MALE_NAMES
    first = firsts[int(rng.integers(len(firsts)))]
    middle = chr(ord("A") + int(rng.integers(26))) if rng.random() < 0.3 else ""
    return last, first, middle


def dicom_name(last: str, first: str, middle: str) -> str:
    return f"{last}^{first}^{middle}" if middle else f"{last}^{first}"


def patient_folder(style: int, last: str, first: str, patient_id: str) -> str:
    """The patient's folder in a PACS export; several vendors' habits, spaces and commas included."""
    if style == 0:
        return f"{last.upper().replace(' ', '_')}_{first.upper()}_{patient_id}"
    if style == 1:
        return f"{last}, {first} ({patient_id})"
    if style == 2:
        return patient_id
    return f"{last}^{first}_{patient_id}"


def study_folder(style: int, date: str, accession: str, description: str, number: int) -> str:
    if style in (0, 3):
        return f"{date}_{accession}"
    if style == 1:
        return f"{date} {description} [{accession}]"
    return f"Study_{number:03d}_{accession}"


def series_folder(style: int, number: int, view: str, modality: str) -> str:
    if style == 0:
        return f"SE{number:04d}"
    if style == 1:
        return f"{number} - {modality} {view}"
    return f"Series_{number:03d}"


def file_name(style: int, instance: int, sop_uid: str) -> str:
    if style == 2:
        return f"{sop_uid}.dcm"
    return f"IM{instance:06d}.dcm" if style != 3 else f"I{instance:07d}.dcm"
