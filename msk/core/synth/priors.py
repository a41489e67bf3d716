"""Patient priors: age, sex and lesion site per tumour entity.

Two sources:

* :class:`DefaultPriors` — the priors each :class:`~msk.core.specs.Entity` carries (uniform age
  in its ``age_range``, female with probability ``female_fraction``, site uniform over its
  typical ``sites``);
* :class:`BtxrdPriors` — the real joint distribution of (age, sex, site) of the public BTXRD
  data set (Yao et al., Sci Data 2025) for the entities whose lesion drawer names a BTXRD class
  column (``btxrd_column``; built-in: osteochondroma, giant cell tumour, osteosarcoma): a case
  is drawn by picking one BTXRD row of that class, so age, sex and site keep their
  correlations. Sites come from the row's site flags through
  :data:`~msk.core.io.btxrd.BTXRD_SITE_TO_REGION`. The other entities, and rows without a mappable
  site, fall back to the entity's own priors.

Patients without a lesion are aged uniformly 2-90 with sex 50/50 under both.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from msk.core.errors import ConfigError
from msk.core.io.btxrd import BTXRD_SITE_TO_REGION
from msk.core.specs import Entity

#: where ``priors: auto`` looks for the BTXRD metadata, relative to the repository root.
BTXRD_RELATIVE = Path("..") / "shared" / "data" / "btxrd-meta" / "dataset.csv"


@dataclass(frozen=True)
class Demographics:
    age: int
    sex: str  # "F" | "M"
    site: str | None = None  # samx-regions name of the lesion site


class DefaultPriors:
    """The priors each entity carries."""

    source = "defaults"

    def normal(self, rng: np.random.Generator) -> Demographics:
        return Demographics(int(rng.integers(2, 91)), "F" if rng.random() < 0.5 else "M")

    def lesion(self, entity: Entity, rng: np.random.Generator) -> Demographics:
        low, high = entity.age_range or (5, 80)
        site = str(rng.choice(entity.sites)) if entity.sites else None
        female = rng.random() < entity.female_fraction
        return Demographics(int(rng.integers(low, high + 1)), "F" if female else "M", site)


@dataclass(frozen=True)
class _Case:
    age: int
    sex: str
    sites: tuple[str, ...]
    flags: frozenset[str]  # the columns flagged 1 (its class among them)


@dataclass
class BtxrdPriors(DefaultPriors):
    """Age, sex and site drawn jointly from BTXRD rows of the entity's class (the
    ``btxrd_column`` of its lesion drawer)."""

    path: Path
    rows: tuple[_Case, ...] = ()
    columns: frozenset[str] = frozenset()
    cases: dict[str, tuple[_Case, ...]] = field(default_factory=dict)  # entity -> its rows

    @property
    def source(self) -> str:  # type: ignore[override]
        return f"btxrd:{self.path}"

    @classmethod
    def load(cls, path: Path) -> BtxrdPriors:
        columns, rows = _read_btxrd(str(Path(path).resolve()))
        return cls(path, rows, columns)

    def cases_of(self, entity: str) -> tuple[_Case, ...]:
        """The BTXRD rows of ``entity``'s class; none for an entity whose drawer names no class."""
        if entity not in self.cases:
            from msk.core.synth.lesions import drawer_for

            column = drawer_for(entity).btxrd_column
            if column is not None and column not in self.columns:
                raise ConfigError(f"{self.path}: no class column {column!r}, which the lesion drawer of "
                                  f"{entity!r} names as its btxrd_column")
            self.cases[entity] = tuple(c for c in self.rows if column in c.flags) if column else ()
        return self.cases[entity]

    def lesion(self, entity: Entity, rng: np.random.Generator) -> Demographics:
        cases = self.cases_of(entity.name)
        if not cases:
            return super().lesion(entity, rng)
        case = cases[int(rng.integers(len(cases)))]
        sites = case.sites or entity.sites
        site = str(sites[int(rng.integers(len(sites)))]) if sites else None
        return Demographics(case.age, case.sex, site)

    def ages(self, entity: str) -> list[int]:
        """All BTXRD ages of ``entity`` (for checks and reports)."""
        return [c.age for c in self.cases_of(entity)]


@lru_cache(maxsize=4)
def _read_btxrd(path: str) -> tuple[frozenset[str], tuple[_Case, ...]]:
    """The columns of a BTXRD ``dataset.csv`` and its rows with a valid age and sex."""
    p = Path(path)
    try:
        with p.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read BTXRD metadata: {exc}") from None
    needed = {"age", "gender", *BTXRD_SITE_TO_REGION}
    missing = needed - set(rows[0] if rows else ())
    if missing:
        raise ConfigError(f"{p}: not a BTXRD dataset.csv: missing columns {', '.join(sorted(missing))}")
    out: list[_Case] = []
    for row in rows:
        try:
            age = int(float(row["age"]))
        except ValueError:
            continue
        sex = row["gender"].strip().upper()[:1]
        if sex not in ("F", "M"):
            continue
        sites = tuple(BTXRD_SITE_TO_REGION[s] for s in BTXRD_SITE_TO_REGION if row[s].strip() == "1")
        flags = frozenset(k for k, v in row.items() if isinstance(v, str) and v.strip() == "1")
        out.append(_Case(age, sex, sites, flags))
    return frozenset(rows[0]), tuple(out)


def default_btxrd_csv() -> Path | None:
    """The BTXRD metadata next to the repository (``../shared/data/btxrd-meta/dataset.csv``
    from the repository root or from the working directory), if present."""
    repo = Path(__file__).resolve().parents[3]
    for base in (repo, Path.cwd()):
        candidate = (base / BTXRD_RELATIVE).resolve()
        if candidate.is_file():
            return candidate
    return None


def resolve_priors(mode: str, btxrd_csv: Path | None) -> DefaultPriors:
    """Priors for a config's ``priors`` and ``btxrd_csv`` (``auto``: BTXRD when found)."""
    if mode == "defaults":
        return DefaultPriors()
    path = Path(btxrd_csv) if btxrd_csv is not None else default_btxrd_csv()
    if path is None or not path.is_file():
        if mode == "btxrd" or btxrd_csv is not None:
            where = str(btxrd_csv) if btxrd_csv is not None else str(BTXRD_RELATIVE)
            raise ConfigError(f"priors: BTXRD metadata not found at {where}")
        return DefaultPriors()
    return BtxrdPriors.load(path)
