"""``SynthConfig``: the options of ``msk synth``, and the transfer syntaxes it can write."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from msk.core.config import MskConfig

#: short key -> transfer syntax; keys are what configs and the ground truth's summary use.
TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit-le": ExplicitVRLittleEndian,
    "implicit-le": ImplicitVRLittleEndian,
    "deflated-le": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000-lossless": JPEG2000Lossless,
    "jpegls-lossless": JPEGLSLossless,
}
_ALIASES = {
    "explicit": "explicit-le", "implicit": "implicit-le", "deflated": "deflated-le",
    "rle-lossless": "rle", "j2k": "jpeg2000-lossless", "jpeg2000": "jpeg2000-lossless",
    "jpeg-2000-lossless": "jpeg2000-lossless", "jpegls": "jpegls-lossless",
    "jpeg-ls": "jpegls-lossless", "jpeg-ls-lossless": "jpegls-lossless",
}


def syntax_key(name: str) -> str:
    """The key of a transfer syntax given by key, alias, UID or UID name (case-insensitive)."""
    k = name.strip().lower()
    if k in TRANSFER_SYNTAXES:
        return k
    if k in _ALIASES:
        return _ALIASES[k]
    for key, uid in TRANSFER_SYNTAXES.items():
        if k in (str(uid), uid.name.lower()):
            return key
    known = ", ".join(f"{key} ({uid.name})" for key, uid in TRANSFER_SYNTAXES.items())
    raise ValueError(f"unknown transfer syntax {name!r}; known: {known}")


@cache
def syntax_problem(key: str) -> str | None:
    """Why ``key`` cannot be written here (missing or broken encoder), or ``None`` if it works.

    Compressed syntaxes are checked by a round trip of a small 12-bit image, not just by asking
    pydicom whether a plugin is installed.
    """
    uid = TRANSFER_SYNTAXES[key]
    if not uid.is_compressed:
        return None
    from pydicom.dataset import Dataset
    from pydicom.pixels import get_encoder

    encoder = get_encoder(uid)
    if not encoder.is_available:
        missing = "; ".join(f"{p}: {', '.join(d)}" for p, d in encoder.missing_dependencies)
        return f"no {uid.name} encoder is installed ({missing})"
    ds = Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 64, 64, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    arr = (np.arange(64 * 64, dtype=np.uint16) * 61 % 4096).reshape(64, 64)
    try:
        ds.compress(uid, arr, generate_instance_uid=False)
        if not np.array_equal(ds.pixel_array, arr):
            return f"{uid.name} round trip changed the pixels"
    except Exception as exc:  # any encoder failure means: do not offer this syntax
        return f"{uid.name} encoder failed: {exc}"
    return None


def working_syntaxes() -> list[str]:
    """Keys of the transfer syntaxes that can be written in this environment."""
    return [k for k in TRANSFER_SYNTAXES if syntax_problem(k) is None]


class SynthConfig(MskConfig):
    """Options of ``msk synth`` (a deterministic synthetic PACS export)."""

    n_images: int = Field(2000, ge=1, description="total files written, corrupt ones included")
    seed: int = Field(0, ge=0, description="random seed: the same config writes the same files")
    image_size: int = Field(320, ge=32, le=4096, description="long side of the images in pixels")
    images_per_patient: tuple[int, int] = Field((1, 4), description="(min, max) images of one patient")
    lesion_fraction: float = Field(0.35, ge=0.0, le=1.0, description="share of patients with a lesion")
    entity_set: str = Field("bone-tumours", description="tumour entity set of the lesions (`msk plugins entity_set`)")
    region_set: str = Field("samx-regions",
                            description="anatomical region set of the images (`msk plugins entity_set`)")
    corrupt_fraction: float = Field(0.01, ge=0.0, le=1.0, description="share of deliberately corrupt files "
                                    "(the ingest must quarantine them)")
    monochrome1_fraction: float = Field(0.2, ge=0.0, le=1.0, description="share of DICOMs stored MONOCHROME1 "
                                        "(inverted grey levels)")
    transfer_syntaxes: list[str] = Field(default_factory=working_syntaxes, description="DICOM transfer syntaxes "
                                         "drawn from; default: every one this environment can write")
    priors: Literal["auto", "btxrd", "defaults"] = Field(
        "auto", description="age, sex and site per entity: 'btxrd' from the BTXRD metadata (btxrd_csv), "
        "'defaults' the shipped ones, 'auto' BTXRD when found")
    btxrd_csv: Path | None = Field(None,
                                   description="BTXRD dataset.csv; default: ../shared/data/btxrd-meta/dataset.csv")
    workers: int = Field(1, ge=1, le=256, description="processes writing files (same files for any number)")
    style: Literal["basic", "radiograph"] = Field(
        "radiograph", description="'radiograph': realistic anatomy variation, framing (joint crops, "
        "rotation, black padding, markers) and detector physics; 'basic': the original cartoon phantoms")

    @field_validator("images_per_patient")
    @classmethod
    def _patients(cls, v: tuple[int, int]) -> tuple[int, int]:
        low, high = v
        if not 1 <= low <= high <= 64:
            raise ValueError(f"need 1 <= min <= max <= 64 images per patient, got {v}")
        return v

    @field_validator("transfer_syntaxes")
    @classmethod
    def _syntaxes(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one transfer syntax is needed")
        keys = []
        for name in v:
            key = syntax_key(name)
            problem = syntax_problem(key)
            if problem:
                raise ValueError(f"transfer syntax {name!r} cannot be written here: {problem}")
            if key not in keys:
                keys.append(key)
        return keys

    @field_validator("entity_set")
    @classmethod
    def _entity_set(cls, v: str) -> str:
        from msk.core.synth.lesions import drawable

        es = _lookup_set(v)
        if es.kind != "tumour":
            raise ValueError(f"entity set {v!r} is a {es.kind} set, not a tumour set")
        known = drawable()
        unknown = [e.name for e in es.entities if e.name not in known]
        if unknown:
            raise ValueError(f"entity set {v!r}: no lesion drawing for {', '.join(unknown)} (a plugin adds one "
                             f"with the msk_lesion_drawers hook, docs/plugins.md); drawable: {', '.join(known)}")
        return v

    @field_validator("region_set")
    @classmethod
    def _region_set(cls, v: str) -> str:
        from msk.core.synth.phantoms import REGIONS

        es = _lookup_set(v)
        if es.kind != "region":
            raise ValueError(f"entity set {v!r} is a {es.kind} set, not a region set")
        unknown = [e.name for e in es.entities if e.name not in REGIONS]
        if unknown:
            raise ValueError(f"region set {v!r}: no phantom for {', '.join(unknown)}")
        return v

    @model_validator(mode="after")
    def _priors_file(self) -> SynthConfig:
        if self.btxrd_csv is not None and not Path(self.btxrd_csv).is_file():
            raise ValueError(f"btxrd_csv: {self.btxrd_csv} is not a file")
        return self


def _lookup_set(name: str):
    from msk.core.registry import entity_set

    try:
        return entity_set(name)
    except LookupError as exc:
        raise ValueError(str(exc).split(" Run `msk plugins`")[0]) from None
