"""Lesion masks from LabelMe JSON (BTXRD's real files) and mask images, and their bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from msk.core.io.masks import (
    MaskError,
    MaskWarning,
    labelme_mask,
    load_mask,
    mask_to_square,
    read_mask_table,
    write_mask_png,
)


def _labelme(path, shapes, width=40, height=30):
    path.write_text(json.dumps({"version": "5.4.1", "imageWidth": width, "imageHeight": height,
                                "shapes": [{"label": lab, "points": pts, "shape_type": kind}
                                           for lab, kind, pts in shapes]}))
    return path


def _shoelace(points) -> float:
    x, y = np.asarray(points, float).T
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


@pytest.mark.shared_data
def test_real_btxrd_annotations_load_as_masks(shared_data):
    files = sorted((shared_data / "btxrd-meta" / "annotations").glob("*.json"))[::25]
    assert len(files) >= 50
    for path in files:
        data = json.loads(path.read_text())
        mask, _ = labelme_mask(path)
        assert mask.shape == (data["imageHeight"], data["imageWidth"]), path.name
        polygons = [s["points"] for s in data["shapes"] if s["shape_type"] == "polygon"]
        if not polygons:  # box-only files are filled with their rectangles
            continue
        area = sum(_shoelace(p) for p in polygons)
        # the filled pixels match the polygons' area (outline pixels and overlaps aside)
        assert 0.8 * area <= mask.sum() <= 1.2 * area + 4 * sum(len(p) for p in polygons), path.name
        xs = [x for p in polygons for x, _ in p]
        cols = np.flatnonzero(mask.any(axis=0))
        assert cols[0] >= int(min(xs)) - 1 and cols[-1] <= int(max(xs)) + 1, path.name


def test_rectangles_fill_only_without_polygons(tmp_path):
    both = _labelme(tmp_path / "both.json", [("t", "rectangle", [[2, 2], [30, 20]]),
                                             ("t", "polygon", [[10, 5], [20, 5], [15, 15]])])
    assert labelme_mask(both)[0].sum() < labelme_mask(both, boxes="always")[0].sum()
    box = _labelme(tmp_path / "box.json", [("t", "rectangle", [[30, 20], [2, 2]])])
    assert labelme_mask(box)[0][2:21, 2:31].all()


def test_shapes_outside_the_image_are_clipped_with_a_warning(tmp_path):
    path = _labelme(tmp_path / "out.json", [("t", "polygon", [[30, 10], [60, 10], [60, 25], [30, 25]]),
                                            ("u", "polygon", [[100, 100], [120, 100], [110, 120]])])
    with pytest.warns(MaskWarning, match=r"out\.json: polygon 1 \(t\) extends outside the 40x30 image; clipped"):
        mask, notes = labelme_mask(path)
    assert mask.shape == (30, 40) and mask[10:26, 30:].all() and mask.sum() == 16 * 10
    assert any("polygon 2 (u) lies entirely outside" in n for n in notes)


def test_short_polygon_is_skipped_with_a_warning_and_alone_is_an_error(tmp_path):
    path = _labelme(tmp_path / "short.json", [("t", "polygon", [[1, 1], [5, 5]]),
                                              ("t", "polygon", [[10, 5], [20, 5], [15, 15]])])
    with pytest.warns(MaskWarning, match=r"short\.json: shape 0 \(t\): polygon with 2 points"):
        mask, _ = labelme_mask(path)
    assert mask.any()
    only = _labelme(tmp_path / "only.json", [("t", "polygon", [[1, 1], [5, 5]])])
    with pytest.warns(MaskWarning), pytest.raises(MaskError, match=r"only\.json: empty lesion mask"):
        labelme_mask(only)
    with pytest.raises(MaskError, match="no shapes"):
        labelme_mask(_labelme(tmp_path / "none.json", []))


def test_mask_images_are_checked_against_their_image(tmp_path):
    mask = np.zeros((30, 40), bool)
    mask[5:10, 5:20] = True
    png = write_mask_png(tmp_path / "m.png", mask)
    assert np.array_equal(load_mask(png, (30, 40)), mask)
    with pytest.raises(MaskError, match=r"m\.png: mask is 40x30 .* its image is 41x30"):
        load_mask(png, (30, 41))
    empty = write_mask_png(tmp_path / "e.png", np.zeros((30, 40), bool))
    with pytest.raises(MaskError, match=r"e\.png: empty lesion mask"):
        load_mask(empty, (30, 40))
    assert not load_mask(empty, allow_empty=True).any()
    js = _labelme(tmp_path / "a.json", [("t", "polygon", [[10, 5], [20, 5], [15, 15]])])
    with pytest.raises(MaskError, match=r"a\.json: mask is 40x30"):
        load_mask(js, (60, 80))
    with pytest.raises(MaskError, match="no such mask file"):
        load_mask(tmp_path / "missing.png")


@pytest.mark.parametrize("resize", ["pad", "stretch"])
def test_mask_to_square_follows_the_box_mapping(resize):
    from msk.core.data.squaring import map_box_to_square

    mask = np.zeros((90, 160), bool)
    mask[20:50, 40:120] = True
    square = mask_to_square(mask, 64, resize)
    x0, y0, x1, y1 = map_box_to_square((40, 20, 120, 50), (90, 160), 64, resize)
    rows, cols = np.flatnonzero(square.any(1)), np.flatnonzero(square.any(0))
    assert abs(cols[0] - x0) <= 1 and abs(cols[-1] + 1 - x1) <= 1
    assert abs(rows[0] - y0) <= 1 and abs(rows[-1] + 1 - y1) <= 1


def test_mask_table(tmp_path):
    (tmp_path / "t.csv").write_text("image_id,mask_path,label\na,m/a.png,osteosarcoma\nb,/abs/b.json,\n")
    rows = read_mask_table(tmp_path / "t.csv")
    assert rows[0].mask_path == tmp_path / "m" / "a.png" and rows[0].label == "osteosarcoma"
    assert str(rows[1].mask_path) == "/abs/b.json" and rows[1].label is None
    (tmp_path / "dup.csv").write_text("image_id,mask_path\na,x.png\na,y.png\n")
    with pytest.raises(MaskError, match=r"dup\.csv, line 3: image a already has a mask \(line 2\)"):
        read_mask_table(tmp_path / "dup.csv")
    (tmp_path / "bad.csv").write_text("image,mask\n")
    with pytest.raises(MaskError, match=r"bad\.csv, line 1: no column image_id, mask_path"):
        read_mask_table(tmp_path / "bad.csv")
