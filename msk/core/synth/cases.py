"""One synthetic radiograph, fully determined by ``(config, index)``: :func:`render_case`.

Determinism without global state: every random choice comes from a generator seeded with
``(seed, purpose, key)`` where ``key`` is the image index or the index of the patient's first
image. Patients are laid out in blocks of :data:`BLOCK` images, so the patient of any index is
found from its block alone; corrupt files are chosen by a bijection of the indices, so their
number is exact without looking at other images. Any index can therefore be rendered on its
own, in any order and in any process, and always gives the same case.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import generate_uid
from scipy.ndimage import gaussian_filter

from msk.core.errors import QuarantineReason
from msk.core.registry import entity_set
from msk.core.specs import BonePosition, Entity, EntitySet, LesionDrawer
from msk.core.synth import identity
from msk.core.synth.canvas import Canvas, Transform
from msk.core.synth.config import SynthConfig
from msk.core.synth.lesions import draw_lesion, drawer_for, frame_for
from msk.core.synth.phantoms import (
    REGIONS,
    Body,
    can_host,
    find_anchor,
    host_anchor_names,
    region_anchors,
    region_aspect,
)
from msk.core.synth.priors import Demographics, resolve_priors

#: patients never span two blocks of this many consecutive images.
BLOCK = 256

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

#: deliberately broken files and the quarantine reason ingest must give them.
CORRUPTIONS: dict[str, QuarantineReason] = {
    "truncated": QuarantineReason.CORRUPT,  # DICOM cut off inside the pixel data
    "empty": QuarantineReason.EMPTY,  # zero-byte .dcm
    "not_dicom": QuarantineReason.NOT_AN_IMAGE,  # a text file named .dcm
    "no_pixels": QuarantineReason.NO_PIXEL_DATA,  # Basic Text SR, no PixelData
    "short_pixels": QuarantineReason.CORRUPT,  # PixelData shorter than Rows*Columns*2
}
#: relative frequency of each transfer syntax among the configured ones.
SYNTAX_WEIGHTS = {"explicit-le": 3.0, "implicit-le": 1.5, "deflated-le": 1.0, "rle": 1.5,
                  "jpeg2000-lossless": 1.5, "jpegls-lossless": 1.5}
#: Bone density above which a pixel counts as bone in :attr:`SynthCase.bone` (the cortex is 1,
#: the medulla about 0.42 times its texture).
BONE_LEVEL = 0.1
LONG_BONE_REGIONS = ("femur", "lower leg", "humerus", "forearm")
#: regions whose first view is the lateral one in the ``radiograph`` style (cephalograms).
LATERAL_FIRST = frozenset({"skull"})
WRONG_BODY_PARTS = ("EXTREMITY", "OTHER", "LOWER LIMB", "UPPER LIMB", "CHEST", "KNEE", "HAND")

# purposes of the seeded generators
_PATIENTS, _PATIENT, _LESION, _STUDIES, _IMAGE, _ANATOMY, _LESION_SHAPE, _CORRUPT = range(8)


def rng_for(seed: int, purpose: int, key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, purpose, key]))


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    """A fake patient; ``first_index`` (index of their first image) identifies them."""

    first_index: int
    n_images: int
    patient_id: str
    last: str
    first: str
    middle: str
    sex: str
    age: int  # at the first study
    birth_date: dt.date
    institution: identity.Institution

    @property
    def dicom_name(self) -> str:
        return identity.dicom_name(self.last, self.first, self.middle)


@dataclass(frozen=True)
class LesionPlan:
    """The patient's tumour: the same lesion appears in each of their images."""

    entity: Entity
    site: str  # region
    position: BonePosition | None  # None on flat bones
    anchor: str
    side: int
    seed: int


@dataclass(frozen=True)
class Study:
    number: int  # 1-based within the patient
    region: str
    laterality: str  # "L", "R" or "" (midline)
    date: dt.date
    time: str
    modality: str
    accession: str
    uid: str

    @property
    def description(self) -> str:
        side = {"L": " LEFT", "R": " RIGHT"}.get(self.laterality, "")
        return f"XR {REGIONS[self.region].body_part}{side}"


@dataclass
class SynthCase:
    """One generated file: pixels and everything the DICOM writer and the ground truth need.

    ``pixels`` are display intensities (MONOCHROME2: bright = dense) in
    ``[0, 2**bits_stored - 1]``; the writer inverts them for MONOCHROME1. ``None`` for files
    without an image (zero-byte, text, SR).
    """

    index: int
    patient: Patient
    study: Study
    view: str
    age: int
    series_uid: str
    series_number: int
    sop_uid: str
    instance_number: int
    sop_class: str
    transfer_syntax: str  # key of TRANSFER_SYNTAXES
    bits_stored: int
    photometric: str
    body_part: str  # as written (sometimes empty or wrong, like real archives)
    pixel_spacing: float  # mm
    rescale: tuple[float, float] | None
    window: tuple[float, float] | None  # (centre, width) in rescaled stored values
    burned_in: bool
    referring: str
    corruption: str | None = None
    lesion: LesionPlan | None = None
    pixels: np.ndarray | None = None
    mask: np.ndarray | None = None
    box: tuple[int, int, int, int] | None = None
    relpath: str = ""
    #: Every burned-in text box: ``(kind, x0, y0, x1, y1, contrast)`` in pixels (x1, y1 exclusive),
    #: kind ``marker`` (a lead side marker "L"/"R") or ``text`` (institution, date, maybe the name);
    #: contrast is |text value - median of the pixels it was burned on|, in [0, 1] display units.
    text_boxes: list[tuple[str, int, int, int, int, float]] = field(default_factory=list)
    #: Where bone is (bone density layer above a threshold), for scoring what a scrubber blanks;
    #: kept in memory only (never written), dropped with the pixels.
    bone: np.ndarray | None = None
    #: The ink of the burned-in text (its glyph pixels, text_boxes' kind by index + 1; 0: none),
    #: for scoring a scrubber; in memory only, like ``bone``.
    ink: np.ndarray | None = None

    @property
    def region(self) -> str:
        return self.study.region

    @property
    def modality(self) -> str:
        return "SR" if self.corruption == "no_pixels" else self.study.modality

    @property
    def expected_status(self) -> str:
        return "ok" if self.corruption is None else CORRUPTIONS[self.corruption].value

    @property
    def entity(self) -> str | None:
        return self.lesion.entity.name if self.lesion else None


# -- patients and studies -----------------------------------------------------------------------


def patient_slot(index: int, config: SynthConfig) -> tuple[int, int, int]:
    """``(first_index, n_images, k)``: the patient that image ``index`` belongs to, how many
    images they have and which of them ``index`` is."""
    block = index // BLOCK
    start = block * BLOCK
    low, high = config.images_per_patient
    sizes = rng_for(config.seed, _PATIENTS, block).integers(low, high + 1, size=BLOCK)
    ends = np.cumsum(sizes)
    j = int(np.searchsorted(ends, index - start, side="right"))
    first = start + int(ends[j] - sizes[j])
    stop = min(start + int(ends[j]), start + BLOCK, config.n_images)
    return first, stop - first, index - first


_SETS: dict[str, EntitySet] = {}


def known_sets(config: SynthConfig) -> dict[str, EntitySet]:
    """The entity and region sets ``config`` uses (looked up once per process)."""
    for name in (config.entity_set, config.region_set):
        if name not in _SETS:
            _SETS[name] = entity_set(name)
    return {name: _SETS[name] for name in (config.entity_set, config.region_set)}


def known_drawers(config: SynthConfig) -> dict[str, LesionDrawer]:
    """The lesion drawers of the config's tumour entities (to hand to worker processes)."""
    return {e.name: drawer_for(e.name) for e in known_sets(config)[config.entity_set].entities}


def preload_sets(sets: dict[str, EntitySet]) -> None:
    """Hand already resolved sets to this process (worker processes then never load the
    plugin registry)."""
    _SETS.update(sets)


def _entities(name: str) -> tuple[Entity, ...]:
    if name not in _SETS:
        _SETS[name] = entity_set(name)
    return _SETS[name].entities


def _regions(name: str) -> tuple[str, ...]:
    if name not in _SETS:
        _SETS[name] = entity_set(name)
    return tuple(_SETS[name].names)


@lru_cache(maxsize=8)
def _priors(mode: str, path: str | None):
    return resolve_priors(mode, path)


def priors_for(config: SynthConfig):
    return _priors(config.priors, str(config.btxrd_csv) if config.btxrd_csv else None)


def plan_lesion(first_index: int, config: SynthConfig) -> tuple[LesionPlan | None, Demographics]:
    """Whether the patient has a tumour, and their age, sex and lesion site."""
    priors = priors_for(config)
    rng = rng_for(config.seed, _LESION, first_index)
    if rng.random() >= config.lesion_fraction:
        return None, priors.normal(rng)
    entities = _entities(config.entity_set)
    entity = entities[int(rng.integers(len(entities)))]
    demo = priors.lesion(entity, rng)
    positions = entity.positions or tuple(BonePosition)
    position = positions[int(rng.integers(len(positions)))]
    regions = _regions(config.region_set)
    region = demo.site if demo.site in regions else None
    if region is None or not can_host(region, position):
        fits = [s for s in entity.sites if s in regions and can_host(s, position)]
        fits = fits or [s for s in LONG_BONE_REGIONS if s in regions and can_host(s, position)]
        fits = fits or [s for s in regions if can_host(s, position)]
        region = fits[int(rng.integers(len(fits)))]
    names = host_anchor_names(region, position)
    anchors = {a.name: a for a in region_anchors(region)}
    weights = np.array([anchors[n].r for n in names])  # big bones carry most tumours
    anchor = names[int(np.searchsorted(np.cumsum(weights) / weights.sum(), rng.random(), side="right"))]
    flat = anchors[anchor].flat
    side = 1 if rng.random() < 0.5 else -1
    plan = LesionPlan(entity, region, None if flat else position, anchor, side, int(rng.integers(2**31)))
    return plan, Demographics(demo.age, demo.sex, region)


def make_patient(first_index: int, n_images: int, demo: Demographics, first_study: dt.date,
                 config: SynthConfig) -> Patient:
    rng = rng_for(config.seed, _PATIENT, first_index)
    last, first, middle = identity.person_name(rng, demo.sex)
    inst = identity.INSTITUTIONS[int(rng.integers(len(identity.INSTITUTIONS)))]
    pid = inst.pid_format.format(n=identity.patient_number(first_index, config.seed))
    birth = _years_before(first_study, demo.age) - dt.timedelta(days=int(rng.integers(0, 365)))
    return Patient(first_index, n_images, pid, last, first, middle, demo.sex, demo.age, birth, inst)


def _years_before(d: dt.date, years: int) -> dt.date:
    try:
        return d.replace(year=d.year - years)
    except ValueError:  # 29 February
        return d.replace(year=d.year - years, day=28)


def age_at(birth: dt.date, when: dt.date) -> int:
    return when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))


def plan_studies(first_index: int, lesion: LesionPlan | None, config: SynthConfig) -> tuple[list[Study], list[int]]:
    """The patient's studies and, per image (up to the maximum per patient), its study number.

    Draws a fixed amount of randomness per potential image, so a patient cut short at the end
    of a block or of the export keeps the studies of the images it does have.
    """
    rng = rng_for(config.seed, _STUDIES, first_index)
    regions = _regions(config.region_set)
    high = config.images_per_patient[1]
    start = dt.date(2008, 1, 1) + dt.timedelta(days=int(rng.integers(0, 15 * 365)))
    studies: list[Study] = []
    of_image: list[int] = []
    date = start
    for k in range(high):
        new, r_region, r_lat, days, hour, minute, sec, r_mod = (
            rng.random(), rng.integers(len(regions)), rng.random(), int(rng.integers(7, 400)),
            int(rng.integers(7, 19)), int(rng.integers(60)), int(rng.integers(60)), rng.random())
        views_left = bool(studies) and of_image.count(len(studies)) < len(REGIONS[studies[-1].region].views)
        if k == 0 or new < 0.4 or not views_left:
            if k:
                date = date + dt.timedelta(days=days)
            region = lesion.site if lesion else regions[int(r_region)]
            lat = "" if not REGIONS[region].paired else ("L" if r_lat < 0.5 else "R")
            if lesion and studies:
                lat = studies[0].laterality
            number = len(studies) + 1
            studies.append(Study(
                number, region, lat, date, f"{hour:02d}{minute:02d}{sec:02d}",
                "CR" if r_mod < 0.5 else "DX", identity.accession_number(first_index, number, config.seed),
                generate_uid(entropy_srcs=["msk-synth", str(config.seed), "study", str(first_index), str(number)]),
            ))
        of_image.append(len(studies))
    return studies, of_image


def corruption_of(index: int, config: SynthConfig) -> str | None:
    """Which deliberate corruption (if any) file ``index`` gets.

    ``round(corrupt_fraction * n)`` files are corrupt (at least one of each kind when
    ``n >= 200`` and the fraction is positive), picked by the permutation ``(a*i + b) mod n``.
    """
    n = config.n_images
    if config.corrupt_fraction <= 0:
        return None
    count = round(config.corrupt_fraction * n)
    if n >= 200:
        count = max(count, len(CORRUPTIONS))
    rng = rng_for(config.seed, _CORRUPT, n)
    a = int(rng.integers(1, max(n, 2)))
    while math.gcd(a, n) != 1:
        a += 1
    b = int(rng.integers(0, n))
    p = (a * index + b) % n
    return list(CORRUPTIONS)[p % len(CORRUPTIONS)] if p < count else None


# -- rendering ----------------------------------------------------------------------------------


def render_case(index: int, config: SynthConfig) -> SynthCase:
    """Generate image ``index`` of the export described by ``config`` (pure; no I/O).

    The same ``(config, index)`` always gives the same case, pixels included.
    """
    case, rng, r_window = _plan(index, config)
    if case.corruption not in ("empty", "not_dicom", "no_pixels"):
        _render_pixels(case, config, rng, r_window)
        if case.transfer_syntax == "jpeg2000-lossless" and min(case.pixels.shape) < 32:
            case.transfer_syntax = "explicit-le"  # OpenJPEG needs 32 px per side
    return case


def plan_case(index: int, config: SynthConfig) -> SynthCase:
    """Everything about case ``index`` except its pixels (cheap: no drawing)."""
    return _plan(index, config)[0]


def _plan(index: int, config: SynthConfig) -> tuple[SynthCase, np.random.Generator, float]:
    if not 0 <= index < config.n_images:
        raise IndexError(f"index {index} outside 0..{config.n_images - 1}")
    first, n_images, k = patient_slot(index, config)
    lesion, demo = plan_lesion(first, config)
    studies, of_image = plan_studies(first, lesion, config)
    patient = make_patient(first, n_images, demo, studies[0].date, config)
    study = studies[of_image[k] - 1]
    in_study = [j for j in range(k + 1) if of_image[j] == study.number]
    views = REGIONS[study.region].views
    if config.style == "radiograph" and study.region in LATERAL_FIRST:
        views = tuple(reversed(views))
    view = views[(len(in_study) - 1) % len(views)]
    rng = rng_for(config.seed, _IMAGE, index)

    corruption = corruption_of(index, config)
    syntax = _pick_syntax(config.transfer_syntaxes, rng.random())
    bits = int(rng.choice((12, 14, 16), p=(0.45, 0.1, 0.45)))
    photometric = "MONOCHROME1" if rng.random() < config.monochrome1_fraction else "MONOCHROME2"
    r_rescale, r_window, r_part, r_part_pick, r_ref = rng.random(5)
    rescale = None
    if r_rescale < 0.5:
        rescale = (1.0, 0.0) if r_rescale < 0.35 else (0.5, 0.0) if r_rescale < 0.43 else (1.0, -1024.0)
    spec = REGIONS[study.region]
    body_part = spec.body_part
    if r_part < 0.05:
        body_part = ""
    elif r_part < 0.1:
        body_part = WRONG_BODY_PARTS[int(r_part_pick * len(WRONG_BODY_PARTS))]
    case = SynthCase(
        index=index, patient=patient, study=study, view=view,
        age=age_at(patient.birth_date, study.date),
        series_uid=generate_uid(entropy_srcs=["msk-synth", str(config.seed), "series", str(index)]),
        series_number=len(in_study), instance_number=1,
        sop_uid=generate_uid(entropy_srcs=["msk-synth", str(config.seed), "sop", str(index)]),
        sop_class=CR_STORAGE if study.modality == "CR" else DX_STORAGE,
        transfer_syntax=syntax, bits_stored=bits, photometric=photometric, body_part=body_part,
        pixel_spacing=0.0, rescale=rescale, window=None, burned_in=False,
        referring=identity.PHYSICIANS[int(r_ref * len(identity.PHYSICIANS))],
        corruption=corruption, lesion=lesion,
    )
    if corruption == "no_pixels":
        case.sop_class = BASIC_TEXT_SR
    if corruption == "short_pixels":
        case.transfer_syntax = "explicit-le"
    case.relpath = _relpath(case)
    return case, rng, float(r_window)


def _pick_syntax(keys: list[str], u: float) -> str:
    """A transfer syntax of ``keys``, uncompressed ones more often, as in real archives."""
    weights = np.array([SYNTAX_WEIGHTS[k] for k in keys])
    return keys[int(np.searchsorted(np.cumsum(weights) / weights.sum(), u, side="right"))]


def _relpath(case: SynthCase) -> str:
    p, s = case.patient, case.study
    style = p.institution.folder_style
    parts = (
        identity.patient_folder(style, p.last, p.first, p.patient_id),
        identity.study_folder(style, s.date.strftime("%Y%m%d"), s.accession, s.description, s.number),
        identity.series_folder(style, case.series_number, case.view, s.modality),
        identity.file_name(style, case.instance_number, case.sop_uid),
    )
    return "/".join(parts)


_BANK_SIDE = 640  # texture bank side; larger images draw their fields directly


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """4 Mi standard normals, shared by all images (each takes a window at a random offset)."""
    return np.random.default_rng(0x5EED).standard_normal(1 << 22, dtype=np.float32)


@lru_cache(maxsize=1)
def _texture_bank() -> tuple[np.ndarray, np.ndarray]:
    """Two smooth random fields (coarse and fine) from which trabecular texture is cropped."""
    rng = np.random.default_rng(0x7E7)
    return tuple(_smooth_field(rng, _BANK_SIDE, _BANK_SIDE, cell) for cell in (10, 3))


def _smooth_field(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    grid = Image.fromarray(rng.standard_normal((max(h // cell, 2), max(w // cell, 2))).astype(np.float32), mode="F")
    return np.asarray(grid.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    bank = _noise_bank()
    if 2 * h * w > bank.size:
        return rng.standard_normal((h, w), dtype=np.float32)
    start = int(rng.integers(0, bank.size - h * w))
    return bank[start:start + h * w].reshape(h, w)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Trabecular texture: smooth multiplicative noise around 1 (coarse plus fine)."""
    if h <= _BANK_SIDE and w <= _BANK_SIDE:
        coarse, fine = _texture_bank()
        y, x = int(rng.integers(0, _BANK_SIDE - h + 1)), int(rng.integers(0, _BANK_SIDE - w + 1))
        out = 1.0 + 0.18 * coarse[y:y + h, x:x + w] + 0.22 * fine[y:y + h, x:x + w]
    else:
        out = 1.0 + 0.18 * _smooth_field(rng, h, w, 10) + 0.22 * _smooth_field(rng, h, w, 3)
    return np.maximum(out, 0.3, out=out)


def _geometry(spec, view: str, size: int, double: bool) -> tuple[int, int, float]:
    aspect = region_aspect(spec, view) * (2.0 if double else 1.0)
    if aspect <= 1.0:
        return size, max(int(round(size * aspect)), 8), aspect
    return max(int(round(size / aspect)), 8), size, aspect


def lesion_in_field(case: SynthCase, config: SynthConfig, tf: Transform, h: int, w: int,
                    anatomy_seed: int, *, realistic: bool = False) -> Transform:
    """``tf`` moved so that the lesion of ``case`` (if any) lies well inside the ``h`` x ``w``
    field: its centre at least 2.5 lesion radii (12-40 % of the field) from every edge."""
    lesion = case.lesion
    if lesion is None:
        return tf
    probe = Body(None, rng_for(config.seed, _ANATOMY, anatomy_seed), case.view, case.age, realistic=realistic)
    REGIONS[case.region].draw(probe)
    frame = frame_for(find_anchor(probe.anchors, lesion.anchor, lesion.position), lesion.position, lesion.side)
    x, y = tf.point(frame.c)
    reach = tf.length(frame.r) * 2.5
    mx, my = min(max(reach, 0.12 * w), 0.4 * w), min(max(reach, 0.12 * h), 0.4 * h)
    dx = min(max(x, mx), w - mx) - x
    dy = min(max(y, my), h - my) - y
    return Transform(tf.scale, tf.angle, tf.pivot, (tf.centre[0] + dx, tf.centre[1] + dy), tf.flip, tf.squeeze)


def _render_pixels(case: SynthCase, config: SynthConfig, rng: np.random.Generator, r_window: float) -> None:
    if config.style == "radiograph":
        from msk.core.synth.radiograph import render_radiograph

        render_radiograph(case, config, rng, r_window)
        return
    spec = REGIONS[case.region]
    size = config.image_size
    double = case.lesion is None and spec.aspect <= 0.8 and rng.random() < 0.06
    h, w, aspect = _geometry(spec, case.view, size, double)
    single = aspect / (2.0 if double else 1.0)
    zoom = rng.uniform(0.88, 1.12) * (0.92 if double else 1.0)
    angle = math.radians(rng.uniform(-15.0, 15.0))
    shift = (rng.uniform(-0.06, 0.06) * w / (2 if double else 1), rng.uniform(-0.06, 0.06) * h)
    flip = case.study.laterality == "L" or (not spec.paired and rng.random() < 0.15)
    squeeze = rng.uniform(0.72, 0.88) if case.view == "OBL" else 1.0
    anatomy_seed = case.patient.first_index * 64 + case.study.number
    if double:
        centres = [(w * 0.25 + shift[0], h / 2 + shift[1]), (w * 0.75 + shift[0], h / 2 + shift[1])]
    else:
        centres = [(w / 2 + shift[0], h / 2 + shift[1])]
    tf = Transform(h * zoom, angle, (single / 2, 0.5), centres[0], flip, squeeze)

    lesion = case.lesion
    tf = lesion_in_field(case, config, tf, h, w, anatomy_seed)

    cv = Canvas(h, w, tf, _texture(rng, h, w))
    body = Body(cv, rng_for(config.seed, _ANATOMY, anatomy_seed), case.view, case.age)
    spec.draw(body)
    if double:
        other = spec.views[1] if len(spec.views) > 1 else case.view
        cv.transform = Transform(h * zoom, -angle * 0.5, (single / 2, 0.5), centres[1], flip, squeeze)
        spec.draw(Body(cv, rng_for(config.seed, _ANATOMY, anatomy_seed), other, case.age))
    if lesion is not None:
        frame = frame_for(find_anchor(body.anchors, lesion.anchor, lesion.position), lesion.position, lesion.side)
        draw_lesion(cv, lesion.entity.name, frame, rng_for(config.seed, _LESION_SHAPE, lesion.seed))

    img = cv.intensity(rng.uniform(1.4, 2.0))
    ramp = np.linspace(-1.0, 1.0, w, dtype=np.float32) * rng.uniform(-0.06, 0.06)  # heel effect
    img *= 1.0 + ramp[None, :]
    img = gaussian_filter(img, rng.uniform(0.35, 1.1) * size / 320.0, truncate=2.5)
    np.power(np.maximum(img, 0.0, out=img), rng.uniform(0.8, 1.25), out=img)
    img += rng.uniform(0.0, 0.05)  # fog
    noise = _noise(rng, h, w)
    img += noise * (rng.uniform(0.004, 0.02) + rng.uniform(0.008, 0.03) * np.sqrt(np.maximum(img, 0.0)))

    box = None
    if lesion is not None and cv.mask.any():
        rows, cols = np.flatnonzero(cv.mask.any(axis=1)), np.flatnonzero(cv.mask.any(axis=0))
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    _collimate(img, rng, box)
    case.burned_in = _annotate(img, rng, case, box)
    case.bone = cv.bone > BONE_LEVEL
    _store(case, img, cv.mask if lesion is not None else None, box, rng, r_window,
           round(spec.field_mm / (h * zoom), 4))


def _store(case: SynthCase, img: np.ndarray, mask: np.ndarray | None, box, rng: np.random.Generator,
           r_window: float, pixel_spacing: float) -> None:
    """Quantise the display image ``img`` (values in [0, 1]) into ``case.pixels`` with a random
    offset and span of the stored range, and set the window, mask, box and spacing."""
    np.clip(img, 0.0, 1.0, out=img)
    maxv = (1 << case.bits_stored) - 1
    offset, span = rng.uniform(0.0, 0.06), rng.uniform(0.7, 0.94)
    case.pixels = np.rint((offset + img * span) * maxv).astype(np.uint16)
    case.mask = mask
    case.box = box
    case.pixel_spacing = pixel_spacing
    if r_window < 0.6:
        centre, width = (offset + 0.5 * span) * maxv, 0.95 * span * maxv
        if case.photometric == "MONOCHROME1":
            centre = maxv - centre
        slope, intercept = case.rescale or (1.0, 0.0)
        case.window = (round(centre * slope + intercept, 1), round(width * slope, 1))


def _collimate(img: np.ndarray, rng: np.random.Generator, box: tuple[int, int, int, int] | None) -> None:
    """Collimator shutters: the unexposed border is uniformly bright (film) or dark (processed)."""
    if rng.random() >= 0.6:
        return
    h, w = img.shape
    x0, y0 = int(rng.uniform(0, 0.12) * w), int(rng.uniform(0, 0.12) * h)
    x1, y1 = w - int(rng.uniform(0, 0.12) * w), h - int(rng.uniform(0, 0.12) * h)
    if box is not None:  # never cover the lesion
        x0, y0 = min(x0, max(box[0] - 2, 0)), min(y0, max(box[1] - 2, 0))
        x1, y1 = max(x1, min(box[2] + 2, w)), max(y1, min(box[3] + 2, h))
    value = rng.uniform(0.82, 0.95) if rng.random() < 0.5 else rng.uniform(0.0, 0.04)
    inside = img[y0:y1, x0:x1].copy()
    img[:] = value
    img[y0:y1, x0:x1] = inside


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _annotate(img: np.ndarray, rng: np.random.Generator, case: SynthCase,
              box: tuple[int, int, int, int] | None) -> bool:
    """Burn in a lead side marker ("L"/"R") and sometimes a block of text; returns whether
    text with patient data was burned in."""
    h, w = img.shape
    corners = [(0, 0), (1, 0), (0, 1), (1, 1)]
    order = rng.permutation(4)
    lat = case.study.laterality or ("R" if rng.random() < 0.5 else "L")
    items = []
    if rng.random() < 0.85:
        items.append((lat, max(int(0.07 * h), 8), rng.uniform(0.85, 1.0)))
    phi = False
    if rng.random() < 0.5:
        lines = [case.patient.institution.code, case.study.date.strftime("%d.%m.%Y")]
        if rng.random() < 0.4:
            lines.insert(0, f"{case.patient.last.upper()} {case.patient.first}")
            phi = True
        items.append(("\n".join(lines), max(int(0.035 * h), 7), rng.uniform(0.7, 1.0) if rng.random() < 0.7 else 0.0))
    for (text, px, value), ci in zip(items, order[:len(items)], strict=True):
        kind = "text" if "\n" in text else "marker"
        font = _font(px)
        probe = ImageDraw.Draw(Image.new("L", (1, 1)))
        left, top, right, bottom = probe.multiline_textbbox((0, 0), text, font=font)
        tw, th = right - left + 2, bottom - top + 2
        if tw >= w - 4 or th >= h - 4:
            continue
        cx, cy = corners[ci]
        x = 3 + int(cx * (w - tw - 6))
        y = 3 + int(cy * (h - th - 6))
        if box is not None and x < box[2] and box[0] < x + tw and y < box[3] and box[1] < y + th:
            continue  # never over the lesion
        patch = Image.new("L", (tw, th))
        ImageDraw.Draw(patch).multiline_text((1 - left, 1 - top), text, font=font, fill=255)
        alpha = np.asarray(patch, dtype=np.float32) * (1.0 / 255.0)
        region = img[y:y + th, x:x + tw]
        contrast = abs(value - float(np.median(region)))
        region += alpha * (value - region)
        case.text_boxes.append((kind, x, y, x + tw, y + th, round(contrast, 3)))
        if case.ink is None:
            case.ink = np.zeros((h, w), np.uint8)
        case.ink[y:y + th, x:x + tw][alpha > 0.25] = len(case.text_boxes)
    return phi
