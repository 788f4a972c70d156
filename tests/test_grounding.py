"""grounding_qwenvl on hand-written model answers of both families, for images of odd sizes resized by our own
image processor. Policy under test: no grounding in the text -> []; grounding that cannot be read -> ValueError."""

import json

import pytest
import torch
from PIL import Image

from grounding_qwenvl import (
    GroundedObject, draw_boxes, ground, parse_grounding, parse_qwen2, parse_qwen25, resized_size_from_grid,
    to_original_pixels,
)
from image_processing_qwenvl import QwenVLImageProcessor

SIZES = [(451, 300), (1000, 872), (37, 1201)]  # (width, height)
MAX_PIXELS = 256 * 28 * 28  # so that the large image really is scaled down


def true_objects(width, height):
    """A box and a point at fixed fractions of the original image, in its pixels."""
    return [
        GroundedObject("cat", box=(0.1 * width, 0.2 * height, 0.6 * width, 0.9 * height)),
        GroundedObject("eye", point=(0.3 * width, 0.4 * height)),
    ]


def grid_of(width, height):
    processor = QwenVLImageProcessor(max_pixels=MAX_PIXELS)
    return processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"]


def qwen25_answer(objects, original, resized):
    """What Qwen2.5-VL writes: integer pixels of the resized image, in a ```json fence, with prose around."""
    sx, sy = resized[0] / original[0], resized[1] / original[1]
    entries = []
    for item in objects:
        if item.box:
            x1, y1, x2, y2 = item.box
            entries.append({"bbox_2d": [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)], "label": item.label})
        else:
            entries.append({"point_2d": [round(item.point[0] * sx), round(item.point[1] * sy)], "label": item.label})
    return "Here they are:\n```json\n" + json.dumps(entries, indent=2) + "\n```\nAnything else?"


def qwen2_answer(objects, width, height):
    """What Qwen2-VL writes: [0, 1000) coordinates between special tokens."""
    def corner(x, y):
        return f"({round(x * 1000 / width)},{round(y * 1000 / height)})"

    x1, y1, x2, y2 = objects[0].box
    return (
        f"The <|object_ref_start|>{objects[0].label}<|object_ref_end|><|box_start|>{corner(x1, y1)},{corner(x2, y2)}"
        "<|box_end|> is on the sofa."
    )


def assert_close(got, expected, tolerance):
    assert got.label == expected.label
    for field in ("box", "point"):
        a, b = getattr(got, field), getattr(expected, field)
        assert (a is None) == (b is None)
        if a is not None:
            assert max(abs(u - v) for u, v in zip(a, b)) <= tolerance, (field, a, b)


@pytest.mark.parametrize("width,height", SIZES)
def test_qwen25_answer_maps_back_to_the_original_pixels(width, height):
    grid = grid_of(width, height)
    resized = resized_size_from_grid(grid)
    assert resized != (width, height)  # the processor did resize: the mapping is not the identity
    answer = qwen25_answer(true_objects(width, height), (width, height), resized)
    found = ground(answer, "qwen2_5_vl", (width, height), image_grid_thw=grid)
    tolerance = 0.5 * max(width / resized[0], height / resized[1]) + 1e-6  # the model's integer rounding
    assert len(found) == 2
    for got, expected in zip(found, true_objects(width, height)):
        assert_close(got, expected, tolerance)


@pytest.mark.parametrize("width,height", SIZES)
def test_qwen2_answer_maps_back_to_the_original_pixels(width, height):
    answer = qwen2_answer(true_objects(width, height), width, height)
    found = ground(answer, "qwen2_vl", (width, height), image_grid_thw=grid_of(width, height))  # the grid is not needed
    tolerance = 0.5 * max(width, height) / 1000 + 1e-6
    assert len(found) == 1
    assert_close(found[0], true_objects(width, height)[0], tolerance)


def test_resized_size_comes_from_the_grid_in_any_form():
    assert resized_size_from_grid(torch.tensor([[1, 22, 32]])) == (448, 308)
    assert resized_size_from_grid([1, 22, 32]) == (448, 308)
    assert resized_size_from_grid(torch.tensor([1, 22, 32])) == (448, 308)
    assert resized_size_from_grid([1, 22, 32], patch_size=16) == (512, 352)  # the processor's own patch size


def test_family_is_the_configs():
    """ground() takes `model.config.family`: Qwen2.5-VL's JSON in resized pixels, Qwen2-VL's tokens in [0, 1000)."""
    from configuration_qwenvl import QwenVLConfig

    qwen25 = QwenVLConfig()
    qwen2 = QwenVLConfig(vision_config=dict(embed_dim=64, hidden_size=128, depth=2, num_heads=4))
    found = ground('{"bbox_2d": [7, 14, 14, 28]}', qwen25.family, (100, 100), resized_size=(14, 28))
    assert found[0].box == (50.0, 50.0, 100.0, 100.0)
    found = ground("<|box_start|>(100,200),(300,400)<|box_end|>", qwen2.family, (100, 100))
    assert found[0].box == pytest.approx((10.0, 20.0, 30.0, 40.0))


# ---- the forms answers come in -----------------------------------------------------------------------------------


def test_qwen25_forms():
    one = '{"bbox_2d": [10, 20, 30, 40], "label": "cup"}'
    assert parse_qwen25(one) == [GroundedObject("cup", box=(10.0, 20.0, 30.0, 40.0))]
    unfenced_list = 'Found: [{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"point_2d": [5.5, 6], "label": "b"}] done.'
    assert parse_qwen25(unfenced_list) == [GroundedObject("a", box=(1.0, 2.0, 3.0, 4.0)), GroundedObject("b", point=(5.5, 6.0))]
    one_per_line = '```json\n{"bbox_2d": [1, 2, 3, 4], "label": "a"}\n{"bbox_2d": [5, 6, 7, 8]}\n```'
    assert parse_qwen25(one_per_line) == [GroundedObject("a", box=(1.0, 2.0, 3.0, 4.0)), GroundedObject("", box=(5.0, 6.0, 7.0, 8.0))]
    swapped_corners = '{"bbox_2d": [30, 40, 10, 20], "label": "cup"}'
    assert parse_qwen25(swapped_corners)[0].box == (10.0, 20.0, 30.0, 40.0)
    unclosed_fence = '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]'
    assert len(parse_qwen25(unclosed_fence)) == 1


def test_qwen2_forms():
    consecutive = (
        "<|object_ref_start|>cats<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>, <|box_start|>(5,6),(7,8)<|box_end|>"
        " and also <|box_start|>(9, 10), (11, 12)<|box_end|>"
    )
    assert parse_qwen2(consecutive) == [
        GroundedObject("cats", box=(1.0, 2.0, 3.0, 4.0)),
        GroundedObject("cats", box=(5.0, 6.0, 7.0, 8.0)),
        GroundedObject("", box=(9.0, 10.0, 11.0, 12.0)),  # words between: no label is guessed
    ]


def test_mapping_clamps_to_the_image():
    found = to_original_pixels([GroundedObject("x", box=(-5.0, 0.0, 1100.0, 999.0))], "qwen2_vl", (200, 100))
    assert found[0].box == (0.0, 0.0, 200.0, 99.9)


# ---- no grounding, and grounding that cannot be read -------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("text", ["There is a cat on the sofa.", "", 'The set {1, 2} and ```json\n{"answer": 3}\n```'])
def test_answers_without_grounding_give_an_empty_list(family, text):
    assert parse_grounding(text, family) == []


@pytest.mark.parametrize(
    "text,message",
    [
        ('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "a"}, {"bbox_2d": [5, 6', "2 bbox_2d/point_2d entries but only 1"),
        ("{'bbox_2d': [1, 2, 3, 4], 'label': 'a'}", "1 bbox_2d/point_2d entries but only 0 are in valid JSON"),
        ('{"bbox_2d": [1, 2, 3], "label": "a"}', "entry 0: bbox_2d must be a list of 4 numbers"),
        ('{"point_2d": ["x", 2], "label": "a"}', "entry 0: point_2d must be a list of 2 numbers"),
        ('{"bbox_2d": [1, 2, 3, true]}', "bbox_2d must be a list of 4 numbers"),
    ],
)
def test_unreadable_qwen25_grounding_is_an_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_qwen25(text)


@pytest.mark.parametrize(
    "text,message",
    [
        ("<|object_ref_start|>a<|object_ref_end|><|box_start|>(1,2),(3,4)", "unclosed <|box_start|>"),
        ("<|box_start|>(1,2),(3)<|box_end|>", r"must read \(x1,y1\),\(x2,y2\), got '\(1,2\),\(3\)'"),
        ("<|box_start|><|box_start|>(1,2),(3,4)<|box_end|><|box_end|>", "must read"),
    ],
)
def test_unreadable_qwen2_grounding_is_an_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_qwen2(text)


def test_bad_arguments_are_refused():
    for family in ("3", "2.5"):  # "2.5" / "2" were the names before QwenVLConfig.family
        with pytest.raises(ValueError, match="family must be 'qwen2_5_vl' .* 'qwen2_vl'"):
            parse_grounding("", family)
    with pytest.raises(TypeError, match="must be a string"):
        parse_qwen25(None)
    with pytest.raises(ValueError, match="pass resized_size or image_grid_thw"):
        ground('{"bbox_2d": [1, 2, 3, 4]}', "qwen2_5_vl", (100, 100))
    with pytest.raises(ValueError, match="not both"):
        ground("", "qwen2_5_vl", (100, 100), image_grid_thw=[1, 2, 2], resized_size=(28, 28))
    with pytest.raises(ValueError, match="original_size must be"):
        ground("", "qwen2_vl", (100, 0))
    with pytest.raises(ValueError, match="one image's"):
        resized_size_from_grid(torch.tensor([[1, 2, 2], [1, 4, 4]]))
    with pytest.raises(TypeError, match="GroundedObject"):
        draw_boxes(Image.new("RGB", (10, 10)), [(1, 2, 3, 4)])
    with pytest.raises(TypeError, match="PIL image or a path"):
        draw_boxes(b"png", [])


# ---- drawing -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height", SIZES)
def test_draw_boxes_marks_boxes_and_points(width, height):
    image = Image.new("L", (width, height), 255)  # any mode: the drawing is an RGB copy
    objects = [GroundedObject("", box=(0.1 * width, 0.2 * height, 0.6 * width, 0.9 * height)), GroundedObject("", point=(width / 2, height / 2))]
    drawn = draw_boxes(image, objects)
    assert drawn.size == (width, height) and drawn.mode == "RGB"
    assert image.getextrema() == (255, 255)  # the input is left as it was
    left_edge = (round(0.1 * width), round(0.55 * height))
    assert drawn.getpixel(left_edge) != (255, 255, 255)
    assert drawn.getpixel((width // 2, height // 2)) != (255, 255, 255)
    assert drawn.getpixel((round(0.35 * width), round(0.55 * height))) == (255, 255, 255)  # inside: not filled


def test_draw_boxes_writes_labels():
    image = Image.new("RGB", (451, 300), "white")
    plain = draw_boxes(image, [GroundedObject("", box=(50.0, 80.0, 200.0, 250.0))])
    labelled = draw_boxes(image, [GroundedObject("cat", box=(50.0, 80.0, 200.0, 250.0))])
    above_box = (50, 60, 120, 80)
    assert plain.crop(above_box).getextrema() == ((255, 255),) * 3
    assert labelled.crop(above_box).getextrema() != ((255, 255),) * 3
