"""Clinical metadata files: BTXRD's ``dataset.csv`` and msk's own metadata, read into one canonical frame.

Every loader returns the same *canonical* frame, one row per image:

Missing values are NA (pandas' missing marker: ``None``, ``NaN`` or ``pd.NA``).

=============== ==============================================================================
column          meaning
=============== ==============================================================================
image_id        image identifier (BTXRD: the file name, ``IMG000001.jpeg``)
patient_group   grouping key for patient-level splits (see :func:`read_btxrd`)
age             age in years, float, ``NaN`` when unknown
sex             ``"M"``, ``"F"`` or missing; other codes are kept (the encoder rejects them)
site            primary anatomical site (one vocabulary word) or missing
sites           all sites of the image, a tuple (BTXRD images may show several bones)
entity          tumour entity (a ``btxrd`` entity name) or missing
view            ``"frontal"``, ``"lateral"``, ``"oblique"`` or missing
center          acquiring centre as a string, or missing
=============== ==============================================================================

:mod:`msk.core.data.metadata` encodes the frame for the fusion models.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from msk.core.errors import MskError
from msk.core.io.btxrd import BTXRD_SITES

__all__ = ["CANONICAL_COLUMNS", "DICOM_VIEWS", "VIEWS", "MetadataError", "is_missing", "norm_word", "read_btxrd",
           "read_msk_metadata", "row_list"]


#: BTXRD's view flag columns, which are also msk's view vocabulary.
VIEWS: tuple[str, ...] = ("frontal", "lateral", "oblique")


#: Columns of the canonical metadata frame, in order.
CANONICAL_COLUMNS: tuple[str, ...] = (
    "image_id", "patient_group", "age", "sex", "site", "sites", "entity", "view", "center",
)


#: DICOM ViewPosition (0018,5101) codes -> msk view. Unlisted codes become a missing view.
DICOM_VIEWS: dict[str, str] = {
    "AP": "frontal", "PA": "frontal",
    "LAT": "lateral", "LL": "lateral", "RL": "lateral", "LLD": "lateral", "RLD": "lateral",
    "ML": "lateral", "LM": "lateral",
    "OBL": "oblique", "OB": "oblique", "LAO": "oblique", "RAO": "oblique", "LPO": "oblique",
    "RPO": "oblique",
}


class MetadataError(MskError, ValueError):
    """Metadata that cannot be used as it is; the message names the file or rows at fault."""


def row_list(labels: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(str(x) for x in labels[:limit])
    more = f" and {len(labels) - limit} more" if len(labels) > limit else ""
    return f"{shown}{more}"


def norm_word(word: Any) -> str:
    return str(word).strip().lower().replace("_", " ")


def is_missing(value: Any) -> bool:
    """None, NaN, ``pd.NA`` or a blank string."""
    if isinstance(value, str):
        return not value.strip()
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a sequence: not a missing scalar
        return False


# -- loaders ------------------------------------------------------------------------------------


def read_btxrd(
    csv: str | Path,
    *,
    grouping: Literal["run", "image"] = "run",
    annotations: str | Path | None = None,
) -> pd.DataFrame:
    """Read BTXRD's ``dataset.csv`` into the canonical frame.

    * ``sites``: every flagged site column; ``site``: the first flagged one in the file's
      column order, which lists bones before joints, so the primary site is a bone whenever
      one is flagged (``tibia, fibula, femur`` -> ``tibia``; ``humerus, shoulder-joint`` ->
      ``humerus``).
    * ``entity``: the one flagged entity column. Rows with ``tumor == 0`` (BTXRD's normal
      images) have no entity (NA). A tumour row with no entity flag is an error. A row with several
      flags is resolved by its LabelMe annotation (``annotations``, default
      ``<csv dir>/annotations``): the flagged entity that labels its shapes wins; a row that
      cannot be resolved that way is an error naming it. (In the public release one row,
      ``IMG001276``, flags osteochondroma and synovial osteochondroma; its shapes say
      synovial osteochondroma.)
    * ``view``: the flagged one of frontal/lateral/oblique; several flags are an error.
    * ``patient_group``: BTXRD publishes **no patient identifier**. With ``grouping="image"``
      every image is its own group. The default ``"run"`` groups *consecutive image numbers
      of one centre with identical age, sex, site flags and entity* into one pseudo-patient:
      in the public release 660 of 1,634 neighbouring pairs are identical in all of these
      (typically a frontal and a lateral view of one lesion) against about 2 expected by
      chance (shuffled order), so these are almost surely the same patient: 975 groups of 1 to
      7 images. This is a heuristic: it cannot
      join images of one patient that are not numbered consecutively, and it may join two
      patients with identical metadata (which only makes splits stricter).
    """
    csv = Path(csv)
    if not csv.is_file():
        raise MetadataError(f"{csv}: no such file")
    raw = pd.read_csv(csv)
    entities = _btxrd_names()
    required = ["image_id", "center", "age", "gender", *BTXRD_SITES, "tumor", *entities, *VIEWS]
    absent = [c for c in required if c not in raw.columns]
    if absent:
        raise MetadataError(f"{csv}: not a BTXRD dataset.csv, missing columns {absent}")
    if raw["image_id"].duplicated().any():
        raise MetadataError(f"{csv}: duplicate image_id "
                            f"{row_list(list(raw.loc[raw['image_id'].duplicated(), 'image_id']))}")

    site_flags = raw[list(BTXRD_SITES)].to_numpy(dtype=bool)
    sites = [tuple(s for s, f in zip(BTXRD_SITES, row) if f) for row in site_flags]

    view_flags = raw[list(VIEWS)].to_numpy(dtype=bool)
    several = raw.loc[view_flags.sum(axis=1) > 1, "image_id"].tolist()
    if several:
        raise MetadataError(f"{csv}: several view flags set in rows {row_list(several)}")
    views = [VIEWS[int(r.argmax())] if r.any() else None for r in view_flags]

    entity_col = _btxrd_entities(raw, csv, Path(annotations) if annotations else
                                 csv.parent / "annotations")

    df = pd.DataFrame({
        "image_id": raw["image_id"].astype(str),
        "patient_group": "",
        "age": pd.to_numeric(raw["age"], errors="coerce").astype(float),
        "sex": [None if is_missing(g) else str(g).strip().upper() for g in raw["gender"]],
        "site": [s[0] if s else None for s in sites],
        "sites": sites,
        "entity": entity_col,
        "view": views,
        "center": raw["center"].astype(str),
    })
    df["patient_group"] = _btxrd_groups(raw, df, grouping)
    return df


def _btxrd_names() -> list[str]:
    """The classes of the ``btxrd`` entity set (the entity columns of ``dataset.csv``)."""
    from msk.core.registry import entity_set

    return entity_set("btxrd").names


def _btxrd_entities(raw: pd.DataFrame, csv: Path, annotations: Path) -> list[str | None]:
    names = _btxrd_names()
    flags = raw[names].to_numpy(dtype=bool)
    tumour = raw["tumor"].to_numpy(dtype=bool)
    result: list[str | None] = [None] * len(raw)
    unflagged, unresolved = [], []
    for i, (image_id, row) in enumerate(zip(raw["image_id"], flags)):
        flagged = [n for n, f in zip(names, row) if f]
        if len(flagged) == 1:
            result[i] = flagged[0]
        elif not flagged:
            if tumour[i]:
                unflagged.append(image_id)
        else:
            label = _annotation_entity(annotations / f"{Path(str(image_id)).stem}.json", flagged)
            if label is None:
                unresolved.append(f"{image_id} ({' + '.join(flagged)})")
            result[i] = label
    if unflagged:
        raise MetadataError(f"{csv}: tumour rows without an entity flag: {row_list(unflagged)}")
    if unresolved:
        raise MetadataError(
            f"{csv}: rows with several entity flags that their annotation in {annotations} "
            f"does not resolve: {row_list(unresolved)}")
    return result


def _annotation_entity(path: Path, flagged: list[str]) -> str | None:
    if not path.is_file():
        return None
    try:
        shapes = json.loads(path.read_text()).get("shapes", [])
    except (OSError, json.JSONDecodeError):
        return None
    labels = {norm_word(s.get("label", "")) for s in shapes}
    hits = [f for f in flagged if f in labels]
    return hits[0] if len(hits) == 1 else None


def _btxrd_groups(raw: pd.DataFrame, df: pd.DataFrame, grouping: str) -> list[str]:
    if grouping == "image":
        return list(df["image_id"])
    if grouping != "run":
        raise MetadataError(f"grouping must be 'run' or 'image', not {grouping!r}")
    number = pd.to_numeric(raw["image_id"].astype(str).str.extract(r"(\d+)")[0], errors="coerce")
    if number.isna().any():
        raise MetadataError("grouping='run' needs numbered image ids (IMG000123.jpeg); "
                            f"rows {row_list(list(raw.loc[number.isna(), 'image_id']))} have none")
    key = (df["center"] + "|" + df["age"].astype(str) + "|" + df["sex"].astype(str) + "|"
           + df["sites"].map("+".join) + "|" + df["entity"].astype(str))
    order = np.argsort(number.to_numpy(), kind="stable")
    groups = [""] * len(df)
    previous_key, previous_number, current = None, None, ""
    for i in order:
        n, k = int(number.iloc[i]), key.iloc[i]
        if not (k == previous_key and previous_number is not None and n == previous_number + 1):
            current = str(df["image_id"].iloc[i])
        groups[i] = current
        previous_key, previous_number = k, n
    return groups


def read_msk_metadata(
    shards_dir: str | Path,
    *,
    patient_column: str = "patient_id",
) -> pd.DataFrame:
    """Read the clinical fields of msk's ingest shards (Parquet) into the canonical frame.

    Reads ``image_id``, ``age_years``, ``patient_sex``, ``body_part``, ``view_position`` and
    ``patient_column`` (the image bytes are not loaded). ``body_part`` (DICOM
    BodyPartExamined) is mapped to a SAM-X region through the ``samx-regions`` entity set's
    names and aliases (``CHEST`` -> ``thorax``, ``L_SPINE`` -> ``lumbar spine``); a value it
    does not know is kept lower-cased, for the encoder's ``unknown`` policy to handle.
    ``view_position`` maps through :data:`DICOM_VIEWS` (``AP``/``PA`` -> frontal, ...), other
    codes to a missing view. ``patient_group`` is the (pseudonymised) patient id; an image
    without one, or every image when the column is absent, is its own group. ``entity`` and
    ``center`` are missing: labels come from the labelling step.
    """
    import pyarrow.dataset as ds

    from msk.core.registry import entity_set

    shards_dir = Path(shards_dir)
    files = sorted(shards_dir.rglob("*.parquet")) if shards_dir.is_dir() else []
    if not files:
        raise MetadataError(f"{shards_dir}: no Parquet shards found")
    dataset = ds.dataset([str(f) for f in files], format="parquet")
    available = set(dataset.schema.names)
    wanted = ["image_id", "age_years", "patient_sex", "body_part", "view_position"]
    absent = [c for c in wanted if c not in available]
    if absent:
        raise MetadataError(f"{shards_dir}: shards lack columns {absent}; they have "
                            f"{sorted(available)}")
    has_patient = patient_column in available
    table = dataset.to_table(columns=wanted + ([patient_column] if has_patient else [])).to_pandas()
    image_id = table["image_id"].astype(str)
    regions = entity_set("samx-regions")

    def region(v: Any) -> str | None:
        if is_missing(v):
            return None
        word = norm_word(v)
        for key in (word, word.replace(" ", "-"), word.replace(" ", "")):
            try:
                return regions.names[regions.index(key)]
            except KeyError:
                continue
        return word

    site = [region(v) for v in table["body_part"]]
    patients = table[patient_column] if has_patient else pd.Series([None] * len(table))
    return pd.DataFrame({
        "image_id": image_id,
        "patient_group": [i if is_missing(p) else str(p) for i, p in zip(image_id, patients)],
        "age": pd.to_numeric(table["age_years"], errors="coerce").astype(float),
        "sex": [None if is_missing(v) else str(v).strip().upper() for v in table["patient_sex"]],
        "site": site,
        "sites": [(s,) if s else () for s in site],
        "entity": None,
        "view": [None if is_missing(v) else DICOM_VIEWS.get(str(v).strip().upper())
                 for v in table["view_position"]],
        "center": None,
    })
