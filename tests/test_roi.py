"""ROI cropping: LabelMe reading, mask rasterisation, square boxes with margin, crops; and every
real BTXRD annotation giving a valid box."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from PIL import Image

from msk.core.data.roi import (
    Annotation,
    RoiError,
    crop_roi,
    lesion_box,
    rasterize_mask,
    read_labelme,
    read_mask,
    roi_box,
)


def labelme(path, shapes, width=100, height=80):
    path.write_text(json.dumps({"version": "5.4.1", "shapes": shapes, "imageWidth": width,
                                "imageHeight": height, "imagePath": "x.png", "imageData": None}))
    return path


def rect(label, p, q):
    return {"label": label, "points": [p, q], "shape_type": "rectangle"}


def poly(label, points, kind="polygon"):
    return {"label": label, "points": points, "shape_type": kind}


def contains(outer, inner) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1]
            and outer[2] >= inner[2] and outer[3] >= inner[3])


# -- reading ------------------------------------------------------------------------------------


def test_read_labelme_keeps_rectangles_and_polygons(tmp_path):
    ann = read_labelme(labelme(tmp_path / "a.json", [
        rect("osteosarcoma", [60, 50], [20, 10]),  # drawn from the bottom-right corner
        poly("osteosarcoma", [[25, 15], [55, 15], [55, 45], [25, 45]]),
    ]))
    assert (ann.width, ann.height, ann.shape) == (100, 80, (80, 100))
    assert ann.boxes == [("osteosarcoma", 20, 10, 60, 50)]
    assert ann.polygons[0][0] == "osteosarcoma" and len(ann.polygons[0][1]) == 4
    assert ann.labels == {"osteosarcoma"} and not ann.skipped and not ann.is_empty()


def test_read_labelme_skips_unusable_shapes_and_says_why(tmp_path):
    ann = read_labelme(labelme(tmp_path / "a.json", [
        poly("a", [[1, 1], [5, 5]]),  # a polygon of two points
        poly("b", [[1, 1], [5, 5]], kind="circle"),
        poly("c", [[1, "x"], [5, 5], [3, 3]]),
        poly("d", [[float("nan"), 1], [5, 5], [3, 3]]),
        rect("e", [1, 1], [3, 3]),
    ]))
    assert len(ann.boxes) == 1 and not ann.polygons
    assert len(ann.skipped) == 4
    assert "shape 0 (a): polygon with 2 points" in ann.skipped[0]
    assert "circle" in ann.skipped[1] and "not (x, y) numbers" in ann.skipped[2]
    assert "non-finite" in ann.skipped[3]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable LabelMe JSON"),
    ("[]", "top level is not an object"),
    ('{"shapes": []}', "imageWidth/imageHeight missing"),
    ('{"shapes": [], "imageWidth": 0, "imageHeight": 5}', "image size 0x5 is empty"),
])
def test_read_labelme_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(RoiError, match=message) as info:
        read_labelme(path)
    assert str(path) in str(info.value)


# -- masks --------------------------------------------------------------------------------------


def test_rasterize_fills_polygons_at_any_shape():
    ann = Annotation(100, 80, polygons=[("x", [(10, 10), (49, 10), (49, 29), (10, 29)])],
                     boxes=[("x", 60, 60, 69, 69)])
    mask = rasterize_mask(ann)
    assert mask.shape == (80, 100) and mask.dtype == bool
    assert mask.sum() == 40 * 20 and mask[10:30, 10:50].all()  # vertices' pixels included
    assert not mask[60:70, 60:70].any()  # rectangles only on request
    assert rasterize_mask(ann, include_boxes=True)[60:70, 60:70].all()
    half = rasterize_mask(ann, shape=(40, 50))
    assert half.shape == (40, 50) and 150 <= half.sum() <= 250  # ~ a quarter of the area


def test_rasterize_clips_shapes_outside_and_handles_empty():
    ann = Annotation(20, 20, polygons=[("x", [(-10, -10), (9, -10), (9, 9), (-10, 9)])])
    mask = rasterize_mask(ann)
    assert mask[:10, :10].all() and mask.sum() == 100
    assert lesion_box(ann) == (0, 0, 10, 10)
    assert not rasterize_mask(Annotation(20, 20)).any()


def test_read_mask_png(tmp_path):
    arr = np.zeros((30, 40), dtype=np.uint8)
    arr[5:10, 20:30] = 255
    Image.fromarray(arr).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert mask.dtype == bool and mask.sum() == 50
    assert roi_box(mask, margin=0, min_side=1) == (20, 2, 30, 12)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(RoiError, match="bad.png: not a readable mask image"):
        read_mask(tmp_path / "bad.png")


# -- lesion and crop boxes ----------------------------------------------------------------------


def test_lesion_box_is_the_union_of_shapes():
    ann = Annotation(100, 80, boxes=[("x", 20.4, 10.5, 30.2, 40.0)],
                     polygons=[("x", [(25, 5), (70.9, 20), (40, 30)])])
    assert lesion_box(ann) == (20, 5, 71, 41)  # pixels floor(x0)..floor(x1) inclusive


def test_lesion_box_errors():
    with pytest.raises(RoiError, match="no lesion shapes"):
        lesion_box(Annotation(10, 10, source="a.json"))
    outside = Annotation(10, 10, boxes=[("x", 20, 20, 30, 30)], source="b.json")
    with pytest.raises(RoiError, match=r"b.json: every lesion shape lies outside the 10x10 image"):
        lesion_box(outside)
    with pytest.raises(RoiError, match="b.json"):
        roi_box(outside)


def test_shapes_outside_the_image_are_ignored():
    ann = Annotation(100, 100, boxes=[("x", 10, 10, 19, 19), ("x", 150, 150, 160, 160)],
                     polygons=[("x", [(-30, 5), (-20, 5), (-25, 9)])])
    assert lesion_box(ann) == (10, 10, 20, 20)
    assert roi_box(ann, margin=0, min_side=1) == (10, 10, 20, 20)


def test_roi_box_is_a_centred_square_with_margin():
    box = roi_box((100, 100, 199.5, 199.5), image_shape=(1000, 1000))
    side = math.ceil(100 * 1.3)
    assert box == (85, 85, 85 + side, 85 + side)
    assert contains(box, (100, 100, 200, 200))
    assert roi_box((100, 100, 199.5, 199.5), (1000, 1000), margin=0) == (100, 100, 200, 200)


def test_roi_box_shifts_into_the_image_before_shrinking():
    box = roi_box((0, 970, 49, 999), image_shape=(1000, 800))  # bottom-left corner
    assert box == (0, 1000 - 65, 65, 1000)  # side ceil(50 * 1.3) kept, shifted inside


def test_roi_box_shrinks_to_the_largest_square_that_fits():
    box = roi_box((10, 50, 89, 129), image_shape=(200, 100))  # 80 px lesion, 104 px square
    assert box[2] - box[0] == box[3] - box[1] == 100  # the image's width
    assert contains(box, (10, 50, 90, 130))


def test_roi_box_of_a_lesion_longer_than_the_short_side_is_as_square_as_possible():
    box = roi_box((10, 0, 39, 149), image_shape=(200, 60))
    assert box == (0, 0, 60, 150)  # full width, lesion height: crop_roi pads it
    assert contains(box, (10, 0, 40, 150))


def test_roi_box_of_a_degenerate_box_has_the_minimum_side():
    box = roi_box((50, 50, 50, 50), image_shape=(100, 100))
    assert box == (42, 42, 58, 58)
    assert roi_box((0, 0, 0, 0), image_shape=(10, 8)) == (0, 0, 8, 8)  # min side clipped too


def test_roi_box_from_mask_and_annotation_agree():
    ann = Annotation(64, 48, polygons=[("x", [(10, 10), (29, 10), (29, 19), (10, 19)])])
    mask = rasterize_mask(ann)
    assert roi_box(mask) == roi_box(ann) == roi_box((10, 10, 29, 19), mask.shape)
    scaled = roi_box(ann, image_shape=(96, 128))  # the image is twice the annotated size
    assert contains(scaled, (20, 20, 59, 39))


def test_roi_box_errors():
    with pytest.raises(RoiError, match="mask is empty"):
        roi_box(np.zeros((5, 5), dtype=bool))
    with pytest.raises(RoiError, match="needs image_shape"):
        roi_box((1, 1, 2, 2))
    with pytest.raises(RoiError, match="differs from image shape"):
        roi_box(np.ones((5, 5), dtype=bool), image_shape=(6, 5))
    with pytest.raises(RoiError, match="margin must be >= 0"):
        roi_box((1, 1, 2, 2), (10, 10), margin=-0.1)


# -- crops --------------------------------------------------------------------------------------


def test_crop_roi_takes_the_box_exactly():
    image = np.arange(100, dtype=np.float32).reshape(10, 10)
    crop = crop_roi(image, (2, 3, 6, 7), size=4)
    np.testing.assert_array_equal(crop, image[3:7, 2:6])
    assert crop_roi(image, (0, 0, 10, 10), size=5).shape == (5, 5)


def test_crop_roi_scales_integers_and_converts_colour():
    grey = np.full((20, 30), 65535, dtype=np.uint16)
    assert np.allclose(crop_roi(grey, (0, 0, 20, 20), size=8), 1.0)
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    crop = crop_roi(rgb, (5, 0, 25, 20), size=8)
    assert crop.dtype == np.float32 and crop.shape == (8, 8)
    assert np.allclose(crop, 0.587, atol=1e-3)


def test_crop_roi_pads_a_non_square_box_to_keep_the_aspect_ratio():
    image = np.ones((40, 10), dtype=np.float32)
    crop = crop_roi(image, (0, 0, 10, 40), size=40)  # 10 wide, 40 tall
    assert np.allclose(crop[:, 15:25], 1.0) and np.allclose(crop[:, :14], 0.0)
    assert np.allclose(crop[:, 26:], 0.0)


def test_crop_roi_rejects_boxes_outside_the_image():
    with pytest.raises(RoiError, match="outside the 10x10 image"):
        crop_roi(np.zeros((10, 10)), (5, 5, 11, 9))
    with pytest.raises(RoiError, match="must be"):
        crop_roi(np.zeros((2, 10, 10)), (0, 0, 1, 1))


# -- every real BTXRD annotation ----------------------------------------------------------------


@pytest.fixture(scope="module")
def btxrd_annotations(shared_data):
    files = sorted((shared_data / "btxrd-meta" / "annotations").glob("*.json"))
    if not files:
        pytest.skip("BTXRD annotations not found under shared data")
    return files


def test_every_btxrd_annotation_gives_a_valid_crop_box(btxrd_annotations):
    start = time.perf_counter()
    assert len(btxrd_annotations) == 1635
    non_square = 0
    for path in btxrd_annotations:
        ann = read_labelme(path)
        assert not ann.skipped and ann.boxes and ann.polygons, path.name
        lesion = lesion_box(ann)
        x0, y0, x1, y1 = box = roi_box(ann)
        assert 0 <= x0 < x1 <= ann.width and 0 <= y0 < y1 <= ann.height, path.name
        assert contains(box, lesion), path.name
        for _, bx0, by0, bx1, by1 in ann.boxes:  # every annotated rectangle, to the pixel
            assert contains(box, (math.floor(bx0), math.floor(by0), bx1, by1)), path.name
        if max(lesion[2] - lesion[0], lesion[3] - lesion[1]) <= min(ann.shape):
            assert x1 - x0 == y1 - y0, f"{path.name}: box {box} is not square"
        else:
            non_square += 1
    assert non_square < 0.05 * len(btxrd_annotations)
    assert time.perf_counter() - start < 20


def test_btxrd_masks_lie_inside_their_crop_box(btxrd_annotations):
    for path in btxrd_annotations[::160]:  # 11 real annotations, full resolution
        ann = read_labelme(path)
        mask = rasterize_mask(ann)
        rows, cols = np.nonzero(mask)
        assert rows.size > 0, path.name
        mask_box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert contains(lesion_box(ann), mask_box) and contains(roi_box(ann), mask_box)
        assert contains(roi_box(mask), mask_box)


@pytest.mark.parametrize("resize", ["pad", "stretch"])
@pytest.mark.parametrize("source_shape", [(300, 200), (120, 480), (256, 256)])
def test_square_mapping_round_trips_boxes_and_masks(source_shape, resize):
    """A lesion drawn on the square model input maps back onto the uploaded image (serving answers
    in the caller's pixels): the box and the mask land where they were in the source."""
    from msk.core.data.squaring import map_box_from_square, map_box_to_square
    from msk.core.io.masks import mask_from_square, mask_to_square

    h, w = source_shape
    box = (w * 0.25, h * 0.4, w * 0.6, h * 0.7)
    square = map_box_to_square(box, source_shape, 128, resize)
    back = map_box_from_square(square, source_shape, 128, resize)
    assert back == pytest.approx(box, abs=1e-6)
    mask = np.zeros(source_shape, bool)
    mask[int(box[1]):int(box[3]), int(box[0]):int(box[2])] = True
    restored = mask_from_square(mask_to_square(mask, 128, resize), source_shape, resize)
    assert restored.shape == source_shape
    iou = (restored & mask).sum() / (restored | mask).sum()
    assert iou > 0.9
    # the padding never maps back as lesion, and a box in the padding clips to the border
    assert map_box_from_square((0, 0, 1, 1), source_shape, 128, resize)[0] == 0.0


def test_lesion_crop_is_the_uint8_roi_of_a_box_or_mask():
    from msk.core.data.roi import RoiError, lesion_crop, mask_box

    image = np.zeros((64, 64), np.uint8)
    image[20:30, 30:44] = 200
    mask = image > 0
    assert mask_box(mask) == (30, 20, 44, 30)
    # a plain box covers pixels floor(x0)..floor(x1) (annotation convention): the mask's last pixels
    from_mask, from_box = lesion_crop(image, mask, 32), lesion_crop(image, (30, 20, 43, 29), 32)
    assert from_mask.dtype == np.uint8 and from_mask.shape == (32, 32)
    assert np.array_equal(from_mask, from_box) and from_mask.max() >= 199
    with pytest.raises(RoiError, match="empty"):
        lesion_crop(image, np.zeros((64, 64), bool), 32)
    with pytest.raises(RoiError, match="empty"):
        mask_box(np.zeros((4, 4), bool))
