"""Synthetic lesions inside real tumour outlines (BTXRD polygons): the polygon shape, the clipped
canvas, the outline library and its effect on the rendered lesion masks."""

from __future__ import annotations

import numpy as np
import pytest

from msk.core.errors import ConfigError
from msk.core.synth import SynthConfig, lesions, render_case
from msk.core.synth.canvas import Box, Canvas, Ellipse, Polygon, Transform


def lesion_config(**kw) -> SynthConfig:
    return SynthConfig(**{**dict(n_images=64, seed=1, image_size=192, priors="defaults", lesion_fraction=1.0,
                                 corrupt_fraction=0.0), **kw})


def first_masks(n: int = 24) -> list[np.ndarray]:
    config = lesion_config()
    masks = [render_case(i, config).mask for i in range(n)]
    return [m for m in masks if m is not None and m.sum() >= 150]


def test_polygon_signed_distance():
    square = Polygon(((0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0)))
    x, y = np.array([[5.0, 12.0, 5.0, -3.0]]), np.array([[5.0], [1.0]])
    d = square.sdf(x, y)
    assert d[0, 0] == pytest.approx(-5) and d[0, 1] == pytest.approx(2) and d[1, 0] == pytest.approx(-1)
    assert d[1, 3] == pytest.approx(3) and square.bbox() == (0, 0, 10, 10)


def test_clipped_canvas_draws_only_inside_the_clip():
    cv = Canvas(40, 40, Transform(40.0, centre=(20.0, 20.0)), np.ones((40, 40), np.float32))
    cv.clipped_to(Box((0.25, 0.5), 0.25, 0.5))  # the left half of the field
    cv.dense(Ellipse((0.5, 0.5), 0.3, 0.3), 0.5, lesion=True)
    assert cv.mask[:, :19].any() and not cv.mask[:, 21:].any() and cv.bone[:, 21:].max() == 0
    cv.clipped_to(None).dense(Ellipse((0.5, 0.5), 0.3, 0.3), 0.5, lesion=True)
    assert cv.mask[:, 21:].any()


def test_the_setting_picks_the_outline_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(lesions.OUTLINES_ENV, "drawn")
    assert lesions.outline_folder() is None
    monkeypatch.setenv(lesions.OUTLINES_ENV, str(tmp_path))
    assert lesions.outline_folder() == tmp_path.resolve()
    monkeypatch.setenv(lesions.OUTLINES_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="MSK_LESION_OUTLINES=.*missing: not a folder"):
        lesions.outline_folder()


def test_lesion_masks_take_the_outline(monkeypatch, tmp_path):
    """With a triangle as the only outline, every lesion mask is a triangle (half its box)."""
    monkeypatch.setenv(lesions.OUTLINES_ENV, str(tmp_path))
    triangle = lesions.normalise_outline(np.array([[0, 0], [10, 0], [5, 8]]))
    monkeypatch.setattr(lesions, "outlines_for", lambda entity, folder: (triangle,))
    fills = []
    for mask in first_masks():
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        fills.append(mask.sum() / box)
    assert len(fills) >= 3
    # a triangle fills half of its box (less when rotated); the drawn lesions fill ~0.65
    assert np.median(fills) < 0.56, fills
    monkeypatch.setenv(lesions.OUTLINES_ENV, "drawn")
    drawn = [m.sum() / ((np.ptp(np.flatnonzero(m.any(1))) + 1) * (np.ptp(np.flatnonzero(m.any(0))) + 1))
             for m in first_masks()]
    assert np.median(drawn) > np.median(fills) + 0.05, (drawn, fills)


@pytest.mark.shared_data
def test_real_outlines_are_loaded_and_rendering_stays_deterministic(shared_data, monkeypatch):
    folder = shared_data / "btxrd-meta" / "annotations"
    monkeypatch.setenv(lesions.OUTLINES_ENV, str(folder))
    library = lesions.outline_library(str(folder.resolve()))
    for labels in (*lesions.BTXRD_OUTLINES.values(), lesions.BTXRD_BENIGN):
        assert sum(len(library.get(label, ())) for label in labels) >= 20, labels
    for outline in library["osteosarcoma"][:20]:
        assert np.allclose(outline.min(0), -1) and np.allclose(outline.max(0), 1)
    real = first_masks()
    assert real and all(np.array_equal(a, b) for a, b in zip(real, first_masks()))  # same seed, same masks
    monkeypatch.setenv(lesions.OUTLINES_ENV, "drawn")
    drawn = first_masks()
    assert any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(real, drawn))
