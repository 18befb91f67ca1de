"""Annotation formats: CSV, Pascal VOC, COCO, mask folders; clear errors naming file and row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camlens import ConfigError
from camlens.io.annotations import Annotation, decode_coco_rle, load_annotations


def image(path: Path, size=(40, 30), colour=(0, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- CSV -----------------------------------------------------------------------------------


def test_csv_groups_rows_per_image_and_resolves_paths(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "sub" / "b.jpg", size=(20, 10))
    absolute = image(tmp_path / "elsewhere" / "c.png")
    csv = write(
        tmp_path / "boxes.csv",
        "\ufefflabel,image,x1,y1,x0,y0,note\n"  # BOM, any column order, extra column
        "cat,a.png,20,10,0,0,first\n"
        f"dog,{absolute},40,30,5,5,\n"
        "dog,a.png,40,30,30.5,20,\n"
        "cup,sub/b.jpg,20,10,0,0,\n",
    )
    items = load_annotations(csv)
    assert [item.image for item in items] == [tmp_path / "a.png", absolute, tmp_path / "sub/b.jpg"]
    first = items[0]
    assert first.boxes == [(0, 0, 20, 10), (30.5, 20, 40, 30)]
    assert first.labels == ["cat", "dog"] and first.size == (40, 30)
    assert first.sources == [f"'{csv}' row 2", f"'{csv}' row 4"]
    assert first.classes() == ["cat", "dog"] and first.boxes_for("dog") == [(30.5, 20, 40, 30)]
    assert first.mask is None and not first.has_masks


def test_csv_image_root_and_edge_tolerance(tmp_path):
    image(tmp_path / "images" / "a.png")
    csv = write(
        tmp_path / "ann" / "boxes.csv", "image,x0,y0,x1,y1,label\na.png,-0.5,0,40.8,30,cat\n"
    )
    (item,) = load_annotations(csv, image_root=tmp_path / "images")
    assert item.boxes == [(0.0, 0.0, 40.0, 30.0)]  # clipped to the image


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("image,x0,y0,x1,label\n", "missing column(s) y1"),
        ("image,x0,y0,x1,y1,label\na.png,0,0,abc,5,cat\n", "row 2: column x1 must be a number"),
        ("image,x0,y0,x1,y1,label\na.png,0,0,5,5,cat\na.png,6,0,5,5,cat\n", "row 3: empty box"),
        ("image,x0,y0,x1,y1,label\na.png,0,0,5,5,\n", "row 2: the label column is empty"),
        ("image,x0,y0,x1,y1,label\n,0,0,5,5,cat\n", "row 2: the image column is empty"),
        (
            "image,x0,y0,x1,y1,label\nmissing.png,0,0,5,5,cat\n",
            "row 2: image 'missing.png' not found",
        ),
        (
            "image,x0,y0,x1,y1,label\na.png,0,0,45,30,cat\n",
            "row 2: box (0, 0, 45, 30) extends beyond the image (40x30)",
        ),
        ("image,x0,y0,x1,y1,label\na.png,0,0,5,5,cat,extra\n", "row 2: more fields"),
        ("image,x0,y0,x1,y1,label\n", "no annotation rows"),
        ("image,x0,y0,x1,y1,label\na.png,0,0,nan,5,cat\n", "must be finite"),
    ],
)
def test_csv_errors_name_the_file_and_row(tmp_path, rows, message):
    image(tmp_path / "a.png")
    csv = write(tmp_path / "boxes.csv", rows)
    with pytest.raises(ConfigError) as error:
        load_annotations(csv)
    assert message in str(error.value) and "boxes.csv" in str(error.value)


def test_the_shipped_sample_boxes_fit_the_sample_photos(tmp_path):
    from camlens.io.samples import write_samples

    write_samples(tmp_path)
    csv = Path(__file__).resolve().parents[1] / "data" / "sample_boxes.csv"
    items = load_annotations(csv, image_root=tmp_path)
    assert [item.image.name for item in items] == [
        "chelsea.png",
        "coffee.png",
        "astronaut.png",
        "rocket.png",
        "motorcycle.png",
    ]
    assert items[2].labels == ["space shuttle", "crash helmet"]
    for item in items:
        width, height = item.size
        for x0, y0, x1, y1 in item.boxes:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


# --- Pascal VOC --------------------------------------------------------------------------------

VOC = """<annotation>
  <filename>{filename}</filename>
  <size><width>{width}</width><height>30</height><depth>3</depth></size>
  <object><name>cat</name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>10</ymax></bndbox></object>
  <object><name>dog</name>
    <bndbox><xmin>21</xmin><ymin>11</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>
</annotation>
"""


def test_voc_root_converts_one_based_inclusive_boxes(tmp_path):
    image(tmp_path / "VOC" / "JPEGImages" / "x.png")
    write(tmp_path / "VOC" / "Annotations" / "x.xml", VOC.format(filename="x.png", width=40))
    (item,) = load_annotations(tmp_path / "VOC")
    assert item.image == tmp_path / "VOC" / "JPEGImages" / "x.png"
    # VOC pixel 1 is camlens' column 0; xmax 20 is the last column -> edge 20.
    assert item.boxes == [(0, 0, 20, 10), (20, 10, 40, 30)]
    assert item.labels == ["cat", "dog"]
    single = load_annotations(tmp_path / "VOC" / "Annotations" / "x.xml")
    assert single[0].boxes == item.boxes


def test_voc_errors(tmp_path):
    image(tmp_path / "x.png")
    bad_size = write(tmp_path / "a.xml", VOC.format(filename="x.png", width=64))
    with pytest.raises(
        ConfigError, match=r"a\.xml'.*<size> says 64x30 but the image file is 40x30"
    ):
        load_annotations(bad_size)
    no_box = write(
        tmp_path / "b.xml",
        "<annotation><filename>x.png</filename><object><name>cat</name></object></annotation>",
    )
    with pytest.raises(ConfigError, match=r"b\.xml' object 1: no <bndbox>"):
        load_annotations(no_box)
    broken = write(tmp_path / "c.xml", "<annotation><filename>")
    with pytest.raises(ConfigError, match="not valid XML"):
        load_annotations(broken)


# --- COCO ----------------------------------------------------------------------------------


def coco(tmp_path, annotations, images=None):
    image(tmp_path / "images" / "a.png")
    image(tmp_path / "images" / "unused.png")
    data = {
        "images": images
        or [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "unused.png", "width": 40, "height": 30},
        ],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
    }
    return write(tmp_path / "instances.json", json.dumps(data))


def test_coco_boxes_polygons_and_rle(tmp_path):
    rle = np.zeros((30, 40), dtype=bool)
    rle[0:2, 0:3] = True  # column-major runs: per column 2 on, 28 off, for 3 columns
    counts = [0, 2, 28, 2, 28, 2, 28 + 37 * 30]
    path = coco(
        tmp_path,
        [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 7,
                "bbox": [2, 3, 4, 5],
                "segmentation": [[2, 3, 6, 3, 6, 8, 2, 8]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 9,
                "bbox": [0, 0, 3, 2],
                "segmentation": {"counts": counts, "size": [30, 40]},
            },
        ],
    )
    (item,) = load_annotations(path)  # "unused.png" has no annotation: skipped
    assert item.image == tmp_path / "images" / "a.png"
    assert item.boxes == [(2, 3, 6, 8), (0, 0, 3, 2)] and item.labels == ["cat", "dog"]
    masks = item.class_masks()
    # ImageDraw fills the polygon's outline and inside: columns 2..6 and rows 3..8.
    expected = np.zeros((30, 40), dtype=bool)
    expected[3:9, 2:7] = True
    np.testing.assert_array_equal(masks["cat"], expected)
    np.testing.assert_array_equal(masks["dog"], rle)
    np.testing.assert_array_equal(item.mask, expected | rle)
    np.testing.assert_array_equal(item.mask_for("dog"), rle)


def test_coco_box_from_segmentation_and_classes_without_complete_outlines(tmp_path):
    path = coco(
        tmp_path,
        [
            {"id": 1, "image_id": 1, "category_id": 7, "segmentation": [[10, 10, 19, 10, 19, 14]]},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [0, 0, 5, 5]},
            {
                "id": 3,
                "image_id": 1,
                "category_id": 9,
                "bbox": [5, 5, 5, 5],
                "segmentation": [[5, 5, 9, 5, 9, 9]],
            },
        ],
    )
    (item,) = load_annotations(path)
    assert item.boxes[0] == (10, 10, 20, 15)  # from the rasterised triangle
    # One "dog" has no outline, so "dog" gets no (incomplete) mask; "cat" keeps its own.
    assert set(item.class_masks()) == {"cat"}


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (
            {"id": 5, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]},
            "annotations[0]: category_id 3 is not a category",
        ),
        (
            {"id": 5, "image_id": 4, "category_id": 7, "bbox": [0, 0, 1, 1]},
            "annotations[0]: image_id 4 is not in 'images'",
        ),
        (
            {"id": 5, "image_id": 1, "category_id": 7, "bbox": [0, 0, 1]},
            "annotations[0] (id 5): 'bbox' must be [x, y, width, height]",
        ),
        (
            {"id": 5, "image_id": 1, "category_id": 7, "bbox": [0, 0, 0, 4]},
            "annotations[0] (id 5): empty box",
        ),
        (
            {"id": 5, "image_id": 1, "category_id": 7, "bbox": [30, 0, 20, 4]},
            "extends beyond the image",
        ),
        ({"id": 5, "image_id": 1, "category_id": 7}, "neither 'bbox' nor 'segmentation'"),
        (
            {"id": 5, "image_id": 1, "category_id": 7, "segmentation": [[1, 2, 3]]},
            "at least 3 points",
        ),
        (
            {
                "id": 5,
                "image_id": 1,
                "category_id": 7,
                "segmentation": {"counts": [5], "size": [30, 40]},
            },
            "RLE counts cover 5 pixels, but the image has 1200",
        ),
        (
            {
                "id": 5,
                "image_id": 1,
                "category_id": 7,
                "segmentation": {"counts": [5], "size": [3, 4]},
            },
            "RLE size [3, 4]",
        ),
        ({"image_id": 1}, "annotations[0]: missing 'category_id'"),
    ],
)
def test_coco_errors_name_the_entry(tmp_path, annotation, message):
    path = coco(tmp_path, [annotation])
    with pytest.raises(ConfigError) as error:
        load_annotations(path)
    assert message in str(error.value) and "instances.json" in str(error.value)


def test_coco_declared_size_must_match_the_file(tmp_path):
    path = coco(
        tmp_path,
        [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 4, 4]}],
        images=[{"id": 1, "file_name": "a.png", "width": 80, "height": 30}],
    )
    with pytest.raises(ConfigError, match="width/height 80x30 differ from the image file"):
        load_annotations(path)


def rle_string(counts):
    """pycocotools' rleToString, for the round-trip test."""
    chars = []
    for i, value in enumerate(counts):
        x = value - counts[i - 2] if i > 2 else value
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr(c + 48 + (0x20 if more else 0)))
    return "".join(chars)


def test_compressed_rle_by_hand_and_round_trip():
    # "35" = runs 3, 5. From the fourth run on, the string stores the difference to the run
    # two before: "5122" = 5, 1, 2, 1 + 2 = 3; in "152M", 'M' = 77 - 48 = 29 = 0b11101 has
    # the sign bit (0x10) set: -32 + 29 = -3, plus the run two before (5) = 2.
    np.testing.assert_array_equal(decode_coco_rle("35", (2, 4)), decode_coco_rle([3, 5], (2, 4)))
    np.testing.assert_array_equal(
        decode_coco_rle("5122", (1, 11)), decode_coco_rle([5, 1, 2, 3], (1, 11))
    )
    # Column-major over 2 x 5: 1 off, 5 on, 2 off, 2 on.
    np.testing.assert_array_equal(
        decode_coco_rle("152M", (2, 5)), [[0, 1, 1, 0, 1], [1, 1, 1, 0, 1]]
    )
    mask = np.random.default_rng(0).random((13, 17)) < 0.3
    runs, current, length = [], False, 0
    for value in mask.T.ravel():  # column-major, starting with a background run
        if value == current:
            length += 1
        else:
            runs, current, length = [*runs, length], value, 1
    runs.append(length)
    np.testing.assert_array_equal(decode_coco_rle(rle_string(runs), mask.shape), mask)
    np.testing.assert_array_equal(
        decode_coco_rle([1, 2, 1], (2, 2)), [[False, True], [True, False]]
    )


# --- mask folders ---------------------------------------------------------------------------


def mask_png(path: Path, box, size=(40, 30), value=255):
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_mask_folder_with_class_subfolders(tmp_path):
    image(tmp_path / "images" / "circle" / "a.png")
    image(tmp_path / "images" / "square" / "b.jpg")
    image(tmp_path / "images" / "square" / "not_annotated.png")
    mask_png(tmp_path / "masks" / "circle" / "a.png", (3, 4, 10, 12), value=1)
    mask_png(tmp_path / "masks" / "square" / "b.png", (20, 5, 40, 30))
    items = load_annotations(tmp_path)
    assert [(i.image.name, i.labels, i.boxes) for i in items] == [
        ("a.png", ["circle"], [(3, 4, 10, 12)]),
        ("b.jpg", ["square"], [(20, 5, 40, 30)]),
    ]
    expected = np.zeros((30, 40), dtype=bool)
    expected[4:12, 3:10] = True
    np.testing.assert_array_equal(items[0].mask_for("circle"), expected)


def test_flat_mask_folder_has_no_labels(tmp_path):
    image(tmp_path / "images" / "a.png")
    mask_png(tmp_path / "masks" / "a.png", (0, 0, 5, 5))
    (item,) = load_annotations(tmp_path)
    assert item.labels == [None] and item.mask_for(None).sum() == 25


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            lambda p: mask_png(p / "masks" / "a.png", (0, 0, 5, 5), size=(20, 20)),
            "is 20x20 but its image",
        ),
        (lambda p: mask_png(p / "masks" / "a.png", (0, 0, 0, 0)), "the mask is empty"),
        (lambda p: mask_png(p / "masks" / "zzz.png", (0, 0, 5, 5)), "no image"),
    ],
)
def test_mask_folder_errors(tmp_path, setup, message):
    image(tmp_path / "images" / "a.png")
    setup(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_annotations(tmp_path)


# --- detection and the Annotation type -------------------------------------------------------


def test_unknown_formats_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_annotations(tmp_path / "nothing.csv")
    with pytest.raises(ConfigError, match="cannot tell the annotation format"):
        load_annotations(write(tmp_path / "notes.txt", "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot tell the annotation format of folder"):
        load_annotations(tmp_path / "empty")


def test_annotation_in_memory():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 1] = True
    item = Annotation("x.png", [(0, 0, 2, 2)], ["cat"], masks={"cat": mask})
    assert item.image == Path("x.png") and item.sources == ["x.png object 1"]
    assert item.mask_for("cat") is mask and item.mask_for("dog") is None
    np.testing.assert_array_equal(item.mask, mask)
    with pytest.raises(ConfigError, match="1 boxes but 2 labels"):
        Annotation("x.png", [(0, 0, 2, 2)], ["cat", "dog"])
