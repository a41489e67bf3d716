"""Screening of ingest inputs: which to keep (modality, size, shape) and what to flag.

Two steps, both cheap:

* :func:`screen_header` runs on the header facts (:class:`~msk.core.io.dicom.ImageMeta`) through
  :func:`~msk.core.io.dicom.read_image`'s ``check`` hook, i.e. before any pixel is decoded. It
  raises :class:`~msk.core.errors.QuarantineError` for an excluded modality
  (``excluded_modality``), an image whose shorter side is below ``min_side`` (``too_small``:
  a 1-pixel-high strip, an icon) and one whose longer / shorter side exceeds ``max_aspect``
  (``extreme_aspect``: a strip cut from a film, a ruler, a banner).
* :func:`size_warnings` runs after decoding and returns the warnings about a usable but
  suspicious size: ``small_image`` (shorter side below ``small_side``) and ``upscaled`` (the
  image was enlarged by more than ``max_upscale`` to reach the output size).

Both take plain values, not a config object, so that serving can apply the same rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from msk.core.errors import QuarantineError, QuarantineReason
from msk.core.io.dicom import ImageMeta

__all__ = [
    "NO_MODALITY",
    "WARN_SMALL",
    "WARN_UPSCALED",
    "modality_key",
    "normalise_modalities",
    "screen_header",
    "size_warnings",
]

#: The modality token of a file without a DICOM Modality (every PNG/JPEG/BMP/TIFF): list it in
#: ``modalities`` (``--modality CR,DX,none``) to keep such files.
NO_MODALITY = "none"
#: Warning: the shorter side is below ``small_side`` (little detail; probably not a full radiograph).
WARN_SMALL = "small_image"
#: Warning: the image was enlarged by more than ``max_upscale`` to reach the output size.
WARN_UPSCALED = "upscaled"


def modality_key(modality: str | None) -> str:
    """The token a file's modality is filtered and counted by: the DICOM Modality stripped and
    upper-cased (``CR``, ``DX``), or :data:`NO_MODALITY` when there is none."""
    text = (modality or "").strip().upper()
    return text or NO_MODALITY


def normalise_modalities(values: Sequence[str]) -> list[str]:
    """Modality tokens as :func:`modality_key` spells them, in order, without duplicates; a
    comma-separated item is split (``["CR,DX"]`` -> ``["CR", "DX"]``). Raises ValueError when
    nothing is left."""
    out: list[str] = []
    for value in values:
        for part in str(value).split(","):
            if part.strip():
                key = NO_MODALITY if part.strip().lower() == NO_MODALITY else modality_key(part)
                if key not in out:
                    out.append(key)
    if not out:
        raise ValueError("no modality listed: give at least one (e.g. CR,DX,none), or leave it unset to keep all")
    return out


def screen_header(meta: ImageMeta, *, modalities: Sequence[str] | None = None, min_side: int = 1,
                  max_aspect: float | None = None) -> None:
    """Quarantine an input from its header facts alone (see the module docstring).

    ``modalities`` are tokens as :func:`normalise_modalities` returns them (None keeps every
    modality). The modality is checked first, then the size, then the aspect ratio. A header
    without a positive size passes: the reader reports it (``corrupt``).
    """
    if modalities is not None:
        key = modality_key(meta.modality)
        if key not in modalities:
            listed = ",".join(modalities)
            what = (f"DICOM Modality {key}" if key != NO_MODALITY
                    else "no DICOM Modality" + (f" ({meta.format.upper()} file)" if meta.format != "dicom" else ""))
            raise QuarantineError(
                QuarantineReason.EXCLUDED_MODALITY,
                f"{what} is not in modalities [{listed}]; to keep it, add {key} (--modality {listed},{key})",
                meta.source,
            )
    rows, cols = meta.rows, meta.cols
    if rows <= 0 or cols <= 0:
        return
    short, long = min(rows, cols), max(rows, cols)
    if short < min_side:
        raise QuarantineError(
            QuarantineReason.TOO_SMALL,
            f"{rows}x{cols} px: shorter side {short} px < min_side {min_side}", meta.source,
        )
    if max_aspect is not None and long / short > max_aspect:
        raise QuarantineError(
            QuarantineReason.EXTREME_ASPECT,
            f"{rows}x{cols} px: aspect ratio {long / short:.1f} > max_aspect {max_aspect:g}", meta.source,
        )


def size_warnings(rows: int, cols: int, image_size: int, *, small_side: int = 64, max_upscale: float = 2.0,
                  resize: Literal["pad", "stretch"] = "pad") -> tuple[str, ...]:
    """Warnings about a decoded ``rows`` x ``cols`` image resized to ``image_size`` (module docstring).

    The upscale factor is ``image_size / max(rows, cols)`` for ``pad`` (the longer side is fitted)
    and ``image_size / min(rows, cols)`` for ``stretch`` (each side is).
    """
    found: list[str] = []
    if min(rows, cols) < small_side:
        found.append(WARN_SMALL)
    side = max(rows, cols) if resize == "pad" else min(rows, cols)
    if side > 0 and image_size / side > max_upscale:
        found.append(WARN_UPSCALED)
    return tuple(found)
