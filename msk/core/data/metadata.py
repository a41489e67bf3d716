"""Clinical metadata for fusion models: a typed schema and a fitted encoder.

:class:`MetadataEncoder` turns the canonical metadata frame that the readers of
:mod:`msk.core.io.clinical` return into a float32 matrix according to a
:class:`MetadataSchema`; its ``feature_groups`` say which columns make up one clinical feature
(the one-hot site block is one feature), which is what :mod:`msk.core.models.explain` sums over.
:func:`join_images` lines a frame up with an ingest's images.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import field_validator

from msk.core.config import MskConfig
from msk.core.io.btxrd import BTXRD_SITES
from msk.core.io.clinical import VIEWS, MetadataError, is_missing, norm_word, row_list
from msk.core.specs import BonePosition

_SEX_CODES = {"m": "M", "male": "M", "f": "F", "female": "F"}


# -- schema -------------------------------------------------------------------------------------


class MetadataSchema(MskConfig):
    """Which clinical features a fusion model sees, and how each is encoded.

    :param sex: ``"binary"``: one column, 1 for male and 0 for female. Any other code, or a
        missing sex, is an error naming the row (msk never guesses a patient's sex).
    :param age: ``"continuous"`` (standardised with the training mean and SD), ``"bins"``
        (one-hot over ``age_bins``) or ``"both"``. A column ``age_missing`` is always added;
        a missing age is imputed with the training median.
    :param age_bins: bin edges in years; bin ``i`` is ``[edges[i], edges[i+1])``, the last bin
        is closed. Ages must lie in ``[edges[0], edges[-1]]``: an age outside is an error
        naming the row, not a silent imputation (it is a typo or a unit error: months, days).
    :param sites: site vocabulary (multi-hot: an image showing the tibia and the fibula sets
        both columns). Default: the 15 BTXRD site columns; use
        ``entity_set("samx-regions").names`` for the SAM-X archive.
    :param positions: add a one-hot block over :class:`BonePosition` read from a ``position``
        column (missing values give an all-zero row). Off by default because BTXRD has no
        position column; switching it on for a frame without one is an error.
    :param views: view vocabulary (one-hot; a missing view gives an all-zero row).
    :param unknown: what to do with a site or view that is not in the vocabulary or was never
        seen while fitting (its column would carry an untrained weight): ``"error"`` (default)
        or ``"ignore"`` (that value's columns stay zero and a warning counts the rows).
    """

    sex: Literal["binary"] = "binary"
    age: Literal["continuous", "bins", "both"] = "both"
    age_bins: list[float] = [0, 10, 20, 30, 40, 60, 120]
    sites: list[str] = list(BTXRD_SITES)
    positions: bool = False
    views: list[str] = list(VIEWS)
    unknown: Literal["error", "ignore"] = "error"

    @field_validator("age_bins")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if len(v) < 2 or any(b <= a for a, b in zip(v, v[1:])) or v[0] < 0:
            raise ValueError(f"age_bins must be >= 2 increasing, non-negative edges, got {v}")
        return v

    @field_validator("sites", "views")
    @classmethod
    def _vocabulary(cls, v: list[str]) -> list[str]:
        words = [norm_word(w) for w in v]
        if not words or len(set(words)) != len(words):
            raise ValueError(f"vocabulary must be non-empty and without duplicates, got {v}")
        return words


# -- encoder ------------------------------------------------------------------------------------


class MetadataEncoder:
    """Encode canonical metadata frames as float32 matrices.

    >>> enc = MetadataEncoder(MetadataSchema()).fit(train_df)
    >>> x = enc.transform(test_df)            # float32 [N, enc.dim]
    >>> enc.feature_groups["site"]            # the columns of the site block

    ``fit`` learns the age median, mean and SD and which sites and views occur; everything
    else is fixed by the schema, so the column layout depends only on the schema.
    """

    def __init__(self, schema: MetadataSchema | None = None):
        self.schema = schema or MetadataSchema()
        self.age_median: float | None = None
        self.age_mean: float | None = None
        self.age_std: float | None = None
        self.seen_sites: set[str] = set()
        self.seen_views: set[str] = set()
        self.feature_names, self.feature_groups = self._layout()

    # -- layout -------------------------------------------------------------------------------

    def _layout(self) -> tuple[list[str], dict[str, list[int]]]:
        s = self.schema
        names: list[str] = []
        groups: dict[str, list[int]] = {}

        def add(group: str, *cols: str) -> None:
            groups.setdefault(group, []).extend(range(len(names), len(names) + len(cols)))
            names.extend(cols)

        add("sex", "sex_male")
        if s.age in ("continuous", "both"):
            add("age", "age")
        if s.age in ("bins", "both"):
            add("age", *self._age_bin_names())
        add("age", "age_missing")
        add("site", *(f"site_{w}" for w in s.sites))
        if s.positions:
            add("position", *(f"position_{p.value}" for p in BonePosition))
        add("view", *(f"view_{w}" for w in s.views))
        return names, groups

    def _age_bin_names(self) -> list[str]:
        edges = self.schema.age_bins
        return [f"age_{a:g}_{b:g}" for a, b in zip(edges, edges[1:])]

    @property
    def dim(self) -> int:
        return len(self.feature_names)

    @property
    def is_fitted(self) -> bool:
        return self.age_median is not None

    # -- fit / transform ----------------------------------------------------------------------

    def fit(self, df: pd.DataFrame) -> MetadataEncoder:
        """Learn age statistics and the sites and views present in ``df`` (the training rows)."""
        ages = self._ages(df)
        known = ages[~np.isnan(ages)]
        if known.size == 0:
            raise MetadataError("cannot fit the metadata encoder: no row has a known age")
        self.age_median = float(np.median(known))
        self.age_mean = float(known.mean())
        self.age_std = float(max(known.std(), 1e-6))
        vocab_sites, vocab_views = set(self.schema.sites), set(self.schema.views)
        self.seen_sites = {s for row in _site_lists(df) for s in row if s in vocab_sites}
        self.seen_views = {v for v in _views(df) if v in vocab_views}
        return self

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Encode ``df`` as ``float32 [len(df), dim]``; raises :class:`MetadataError` naming
        the rows with an unusable value."""
        if self.age_median is None or self.age_mean is None or self.age_std is None:
            raise MetadataError("the metadata encoder is not fitted: call fit(train_df) first")
        s = self.schema
        out = np.zeros((len(df), self.dim), dtype=np.float32)
        col = {n: i for i, n in enumerate(self.feature_names)}

        out[:, col["sex_male"]] = self._sex(df)

        ages = self._ages(df)
        missing = np.isnan(ages)
        ages = np.where(missing, self.age_median, ages)
        out[:, col["age_missing"]] = missing
        if s.age in ("continuous", "both"):
            out[:, col["age"]] = (ages - self.age_mean) / self.age_std
        if s.age in ("bins", "both"):
            bin_cols = np.array([col[n] for n in self._age_bin_names()])
            bins = np.digitize(ages, s.age_bins[1:-1])  # the top edge is inclusive
            out[np.arange(len(df)), bin_cols[bins]] = 1.0

        site_col = {w: col[f"site_{w}"] for w in s.sites}
        unknown_sites: list[Any] = []
        for r, (label, row) in enumerate(zip(_labels(df), _site_lists(df))):
            for site in row:
                if site in self.seen_sites:
                    out[r, site_col[site]] = 1.0
                else:
                    unknown_sites.append((label, site))
        self._unknown("site", unknown_sites, s.sites)

        if s.positions:
            if "position" not in df.columns:
                raise MetadataError(
                    "schema.positions is on but the frame has no 'position' column "
                    "(BTXRD has none: leave positions off)")
            values = {p.value: col[f"position_{p.value}"] for p in BonePosition}
            bad = []
            for r, (label, v) in enumerate(zip(_labels(df), df["position"])):
                if is_missing(v):
                    continue
                key = norm_word(v).replace(" ", "-")
                if key not in values:
                    bad.append((label, v))
                else:
                    out[r, values[key]] = 1.0
            if bad:
                raise MetadataError(
                    f"position outside {[p.value for p in BonePosition]} in rows "
                    f"{row_list([f'{label}={v!r}' for label, v in bad])}")

        unknown_views: list[Any] = []
        for r, (label, v) in enumerate(zip(_labels(df), _views(df))):
            if v is None:
                continue
            if v in self.seen_views:
                out[r, col[f"view_{v}"]] = 1.0
            else:
                unknown_views.append((label, v))
        self._unknown("view", unknown_views, s.views)
        return out

    def fit_transform(self, df: pd.DataFrame) -> np.ndarray:
        return self.fit(df).transform(df)

    # -- helpers ------------------------------------------------------------------------------

    def _unknown(self, what: str, found: list[Any], vocab: list[str]) -> None:
        if not found:
            return
        detail = row_list([f"{label}={value!r}" for label, value in found])
        values = {v for _, v in found}
        outside, unseen = sorted(values - set(vocab)), sorted(values & set(vocab))
        reason = "; ".join(
            [f"not in the vocabulary: {', '.join(outside)}"] * bool(outside)
            + [f"never seen while fitting: {', '.join(unseen)}"] * bool(unseen))
        why = f"{len(found)} {what} value(s) the encoder does not know ({reason}): {detail}"
        if self.schema.unknown == "error":
            raise MetadataError(f"{why}. Set MetadataSchema(unknown='ignore') to encode them "
                                f"as all-zero {what} columns instead.")
        warnings.warn(f"{why}; encoded as all-zero {what} columns", stacklevel=3)

    def _ages(self, df: pd.DataFrame) -> np.ndarray:
        if "age" not in df.columns:
            raise MetadataError(f"metadata frame has no 'age' column; columns: {list(df.columns)}")
        ages = pd.to_numeric(df["age"], errors="coerce").to_numpy(dtype=np.float64)
        bad_text = [label for label, a, raw in zip(_labels(df), ages, df["age"])
                    if np.isnan(a) and not is_missing(raw)]
        if bad_text:
            raise MetadataError(f"age is not a number in rows {row_list(bad_text)}")
        lo, hi = self.schema.age_bins[0], self.schema.age_bins[-1]
        bad = [f"{label}={a:g}" for label, a in zip(_labels(df), ages) if a < lo or a > hi]
        if bad:
            raise MetadataError(
                f"age outside [{lo:g}, {hi:g}] years in rows {row_list(bad)}; fix or blank it "
                f"(a blank age is imputed and flagged by age_missing)")
        return ages

    def _sex(self, df: pd.DataFrame) -> np.ndarray:
        if "sex" not in df.columns:
            raise MetadataError(f"metadata frame has no 'sex' column; columns: {list(df.columns)}")
        codes = [None if is_missing(v) else _SEX_CODES.get(str(v).strip().lower()) for v in df["sex"]]
        bad = [f"{label}={raw!r}" for label, code, raw in zip(_labels(df), codes, df["sex"])
               if code is None]
        if bad:
            raise MetadataError(
                f"sex must be M or F (schema.sex='binary'); rows {row_list(bad)}")
        return np.array([c == "M" for c in codes], dtype=np.float32)

    # -- persistence --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The schema and fitted state, JSON-serialisable (saved next to a model)."""
        return {
            "schema": self.schema.model_dump(mode="json"),
            "age_median": self.age_median, "age_mean": self.age_mean, "age_std": self.age_std,
            "seen_sites": sorted(self.seen_sites), "seen_views": sorted(self.seen_views),
            "feature_names": self.feature_names,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> MetadataEncoder:
        enc = cls(MetadataSchema.model_validate(state["schema"]))
        if state.get("feature_names", enc.feature_names) != enc.feature_names:
            raise MetadataError("saved encoder's feature names do not match its schema")
        enc.age_median, enc.age_mean, enc.age_std = (
            state["age_median"], state["age_mean"], state["age_std"])
        enc.seen_sites, enc.seen_views = set(state["seen_sites"]), set(state["seen_views"])
        return enc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> MetadataEncoder:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _labels(df: pd.DataFrame) -> list[Any]:
    """How rows are named in error messages: their image id, else their index label."""
    return list(df["image_id"]) if "image_id" in df.columns else list(df.index)


def _site_lists(df: pd.DataFrame) -> list[tuple[str, ...]]:
    if "sites" in df.columns:
        return [_as_sites(v) for v in df["sites"]]
    if "site" in df.columns:
        return [() if is_missing(v) else (norm_word(v),) for v in df["site"]]
    raise MetadataError(
        f"metadata frame has neither 'sites' nor 'site'; columns: {list(df.columns)}")


def _as_sites(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple, set, np.ndarray)):
        return tuple(norm_word(s) for s in value if not is_missing(s))
    return () if is_missing(value) else (norm_word(value),)


def _views(df: pd.DataFrame) -> list[str | None]:
    if "view" not in df.columns:
        raise MetadataError(f"metadata frame has no 'view' column; columns: {list(df.columns)}")
    return [None if is_missing(v) else norm_word(v) for v in df["view"]]




def join_images(
    meta: pd.DataFrame,
    image_ids: Iterable[str],
    *,
    strict: bool = True,
) -> pd.DataFrame:
    """The rows of ``meta`` for ``image_ids``, in the order of ``image_ids``.

    A metadata row whose ``image_id`` matches no image is refused: with ``strict=True`` (the
    default) that is a :class:`MetadataError` listing a few of them, with ``strict=False``
    they are dropped and a warning gives their count. Duplicate ids on either side are errors.
    Images without a metadata row are left out of the result (warning with their count):
    those can only go to an image-only model.
    """
    ids = [str(i) for i in image_ids]
    if len(set(ids)) != len(ids):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].tolist()
        raise MetadataError(f"duplicate image ids: {row_list(dup)}")
    if "image_id" not in meta.columns:
        raise MetadataError(f"metadata has no 'image_id' column; columns: {list(meta.columns)}")
    keys = meta["image_id"].astype(str)
    if keys.duplicated().any():
        dup = keys[keys.duplicated()].tolist()
        raise MetadataError(f"metadata has several rows for image ids {row_list(dup)}")
    known = set(ids)
    orphans = keys[~keys.isin(known)].tolist()
    if orphans and strict:
        raise MetadataError(
            f"{len(orphans)} of {len(meta)} metadata rows match no image: {row_list(orphans)} "
            f"(pass strict=False to drop them)")
    if orphans:
        warnings.warn(f"dropped {len(orphans)} metadata rows that match no image", stacklevel=2)
    by_id = meta.assign(image_id=keys).set_index("image_id", drop=False)
    present = [i for i in ids if i in by_id.index]
    if len(present) < len(ids):
        warnings.warn(f"{len(ids) - len(present)} of {len(ids)} images have no metadata row",
                      stacklevel=2)
    return by_id.loc[present].reset_index(drop=True)
