"""Grounding: read the boxes and points that Qwen2.5-VL, Qwen3-VL and Qwen2-VL write, map them to the original
image's pixels, and draw them.

Qwen2.5-VL answers a grounding request ("Locate every cat and output bbox coordinates in JSON format.") with JSON in
absolute pixels of the image it saw, i.e. the resized one (`grid_w * 14` by `grid_h * 14`), often inside a fence:

    ```json
    [{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}, {"point_2d": [x, y], "label": "dog"}]
    ```

Qwen3-VL writes the same JSON, but in relative coordinates, 0..1000 of the image's width and height (`x / 1000 *
width`), whatever size the processor resized the image to.

Qwen2-VL writes special tokens, with coordinates in [0, 1000) of the image's width and height:

    <|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>

Those markers are special tokens: decode the answer with `skip_special_tokens=False`, or they are gone.

Qwen-VL (2023) writes the same coordinates with its own tags, and may give a quadrilateral instead of a box:

    <ref>cat</ref><box>(x1,y1),(x2,y2)</box>    <ref>sign</ref><quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>

What is an error: text without any grounding (no "bbox_2d" / "point_2d", no `<|box_start|>`) gives an empty list,
because a model may rightly answer in words; text that has grounding which cannot be read (invalid or truncated JSON,
a box without four numbers, an unclosed `<|box_start|>`) raises ValueError saying what is wrong, so a bad answer is
never mistaken for "nothing found".

    from grounding_qwenvl import ground, draw_boxes
    objects = ground(answer, model.config.family, image.size, image_grid_thw=inputs["image_grid_thw"])
    draw_boxes(image, objects).save("grounded.png")

`family` is the config's: "qwen2_5_vl" (Qwen2.5-VL), "qwen3_vl" (Qwen3-VL, dense and MoE), "qwen2_vl" (Qwen2-VL) or
"qwen_vl" (Qwen-VL 2023). Sizes are (width, height), as PIL's `Image.size`.
"""

import bisect
import json
import math
import numbers
import re
from array import array
from dataclasses import dataclass
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

try:  # as part of a package, or from a checkout
    from .image_processing_qwenvl import DEFAULT_PATCH_SIZE
except ImportError:
    from image_processing_qwenvl import DEFAULT_PATCH_SIZE

# The values of `QwenVLConfig.family`: Qwen2.5-VL and Qwen3-VL answer in JSON, Qwen2-VL in special tokens.
QWEN25 = "qwen2_5_vl"
QWEN2 = "qwen2_vl"
QWEN3 = "qwen3_vl"
QWEN_VL = "qwen_vl"
FAMILIES = (QWEN25, QWEN2, QWEN3, QWEN_VL)
QWEN2_SCALE = 1000  # Qwen2-VL's, Qwen3-VL's and Qwen-VL's coordinates are 0..1000 of each side
GROUNDING_KEYS = ("bbox_2d", "point_2d")
GROUNDING_KEY = re.compile(r"\b(?:bbox_2d|point_2d)\b")
JSON_START = re.compile(r"[\[{]")
# One JSON token after optional whitespace, exactly as json.JSONDecoder (strict, the default) reads them: ASCII digits
# only, no control characters inside strings, NaN and (-)Infinity allowed. A character-by-character string body, so
# that a string that never closes fails in linear time (no nested quantifier to backtrack through).
JSON_TOKEN = re.compile(
    r'[ \t\n\r]*(?:(?P<punctuation>[\[\]{},:])'
    r'|(?P<string>"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*")'
    r"|(?P<scalar>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null|NaN|-?Infinity))"
)
JSON_DECODER = json.JSONDecoder()
# Qwen2-VL's markup: an object reference or a box, each from its opening to the first closing marker after it.
QWEN2_OPENING = re.compile(r"<\|(?P<kind>object_ref|box)_start\|>")
QWEN2_CLOSING = {"object_ref": "<|object_ref_end|>", "box": "<|box_end|>"}
ADJACENT = re.compile(r"[\s,;]*")
NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
QWEN2_BOX = re.compile(rf"^\s*\({NUMBER},{NUMBER}\)\s*,\s*\({NUMBER},{NUMBER}\)\s*$")
# Qwen-VL (2023)'s tags: a reference, a box (two corners) or a quadrilateral (four corners), in [0, 1000).
QWEN_VL_OPENING = re.compile(r"<(?P<kind>ref|box|quad)>")
QWEN_VL_CLOSING = {"ref": "</ref>", "box": "</box>", "quad": "</quad>"}
QWEN_VL_QUAD = re.compile(rf"^\s*\({NUMBER},{NUMBER}\)\s*,\s*\({NUMBER},{NUMBER}\)\s*,\s*\({NUMBER},{NUMBER}\)\s*,\s*\({NUMBER},{NUMBER}\)\s*$")
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230))


@dataclass(frozen=True)
class GroundedObject:
    """One grounded object: a box (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2, and/or a point (x, y); a
    quadrilateral (Qwen-VL 2023) has its four corners ((x, y), ...) in `quad` and their bounding box in `box`."""

    label: str
    box: Optional[tuple] = None
    point: Optional[tuple] = None
    quad: Optional[tuple] = None


# ---- reading model output ----------------------------------------------------------------------------------------


def parse_qwen25(text):
    """Qwen2.5-VL's (and Qwen3-VL's) JSON grounding, in the model's own coordinates (pixels of the resized image;
    0..1000 for Qwen3-VL).

    Reads dicts and lists of dicts, inside a ```json fence or not, several JSON values in a row, and skips the
    text around them. Every bbox_2d / point_2d in the text must be read, or ValueError (truncated or invalid JSON).
    """
    _check_text(text)
    mentions = len(GROUNDING_KEY.findall(text))
    if mentions == 0:
        return []
    items = list(_grounding_dicts(_json_values(text)))  # fences need no handling: backticks are not JSON
    read = sum(key in item for item in items for key in GROUNDING_KEYS)
    if read != mentions:
        raise ValueError(
            f"the answer has {mentions} bbox_2d/point_2d entries but only {read} are in valid JSON "
            f"(truncated output? raise max_new_tokens): {_excerpt(text)}"
        )
    return [_object_from_json(item, index) for index, item in enumerate(items)]


def parse_qwen2(text):
    """Qwen2-VL's `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>` grounding,
    in its own coordinates ([0, 1000)). A box takes the label of the object reference right before it (only spaces
    or commas between), so one reference followed by several boxes labels them all; a box on its own gets ""."""
    _check_text(text)
    if text.count("<|box_start|>") != text.count("<|box_end|>"):
        raise ValueError(f"the answer has an unclosed <|box_start|> (truncated output?): {_excerpt(text)}")
    objects, label, previous_end = [], "", 0
    for kind, inside, start, end in _qwen2_markup(text):
        if not ADJACENT.fullmatch(text, previous_end, start):
            label = ""  # words between: this box belongs to no reference
        previous_end = end
        if kind == "object_ref":
            label = inside.strip()
            continue
        corners = QWEN2_BOX.match(inside)
        if corners is None:
            raise ValueError(f"a Qwen2-VL box must read (x1,y1),(x2,y2), got {_excerpt(inside)}")
        objects.append(GroundedObject(label, box=_ordered_box([float(v) for v in corners.groups()])))
    if len(objects) != text.count("<|box_start|>"):
        raise ValueError(f"a <|box_start|> is not followed by its <|box_end|>: {_excerpt(text)}")
    return objects


def parse_qwen_vl(text):
    """Qwen-VL (2023)'s `<ref>label</ref><box>(x1,y1),(x2,y2)</box>` and `<quad>` (four corners) grounding, in its
    own coordinates ([0, 1000)); boxes and quads take their labels as parse_qwen2's boxes do. The tags are special
    tokens: decode with `skip_special_tokens=False`."""
    _check_text(text)
    for kind in ("box", "quad"):
        if text.count(f"<{kind}>") != text.count(f"</{kind}>"):
            raise ValueError(f"the answer has an unclosed <{kind}> (truncated output?): {_excerpt(text)}")
    objects, label, previous_end = [], "", 0
    for kind, inside, start, end in _qwen2_markup(text, QWEN_VL_OPENING, QWEN_VL_CLOSING):
        if not ADJACENT.fullmatch(text, previous_end, start):
            label = ""
        previous_end = end
        if kind == "ref":
            label = inside.strip()
        elif kind == "box":
            corners = QWEN2_BOX.match(inside)
            if corners is None:
                raise ValueError(f"a Qwen-VL box must read (x1,y1),(x2,y2), got {_excerpt(inside)}")
            objects.append(GroundedObject(label, box=_ordered_box([float(v) for v in corners.groups()])))
        else:
            corners = QWEN_VL_QUAD.match(inside)
            if corners is None:
                raise ValueError(f"a Qwen-VL quad must read (x1,y1),(x2,y2),(x3,y3),(x4,y4), got {_excerpt(inside)}")
            values = [float(v) for v in corners.groups()]
            quad = tuple(zip(values[0::2], values[1::2]))
            box = (min(values[0::2]), min(values[1::2]), max(values[0::2]), max(values[1::2]))
            objects.append(GroundedObject(label, box=box, quad=quad))
    if len(objects) != text.count("<box>") + text.count("<quad>"):
        raise ValueError(f"a <box> or <quad> is not followed by its closing tag: {_excerpt(text)}")
    return objects


def parse_grounding(text, family):
    """The objects in a model answer, in the model's coordinates; `family` is `model.config.family`."""
    parse = {QWEN25: parse_qwen25, QWEN3: parse_qwen25, QWEN2: parse_qwen2, QWEN_VL: parse_qwen_vl}
    return parse[_check_family(family)](text)


# ---- mapping to the original image -------------------------------------------------------------------------------


def resized_size_from_grid(image_grid_thw, patch_size=DEFAULT_PATCH_SIZE):
    """(width, height) of the image the model saw, from its `image_grid_thw` row (t, h, w) in patches of
    `patch_size` pixels (the processor's `image_processor.patch_size`)."""
    grid = image_grid_thw.tolist() if hasattr(image_grid_thw, "tolist") else image_grid_thw
    if isinstance(grid, (list, tuple)) and len(grid) == 1 and isinstance(grid[0], (list, tuple)):
        grid = grid[0]  # a [1, 3] batch of one image
    if not (isinstance(grid, (list, tuple)) and len(grid) == 3 and all(_is_positive_int(v) for v in grid)):
        raise ValueError(
            f"image_grid_thw must be one image's (t, h, w) in patches, got {image_grid_thw!r}; for several images "
            "pass the row of the image the answer is about"
        )
    return grid[2] * patch_size, grid[1] * patch_size


def to_original_pixels(objects, family, original_size, resized_size=None):
    """Map objects from the model's coordinates to pixels of the original image, clamped to the image.

    Qwen2.5-VL's coordinates are pixels of the resized image, so `resized_size` (width, height) is needed;
    Qwen2-VL's, Qwen3-VL's and Qwen-VL's are 0..1000 of each side, so it is not used there.
    """
    width, height = _check_size(original_size, "original_size")
    if _check_family(family) == QWEN25:
        if resized_size is None:
            raise ValueError("Qwen2.5-VL coordinates are pixels of the resized image: pass resized_size or image_grid_thw")
        from_width, from_height = _check_size(resized_size, "resized_size")
    else:
        from_width = from_height = QWEN2_SCALE
    scale_x, scale_y = width / from_width, height / from_height

    def x(value):
        return min(max(value * scale_x, 0.0), float(width))

    def y(value):
        return min(max(value * scale_y, 0.0), float(height))

    mapped = []
    for item in objects:
        if not isinstance(item, GroundedObject):
            raise TypeError(f"objects must be GroundedObject items, got {type(item).__name__}")
        box = (x(item.box[0]), y(item.box[1]), x(item.box[2]), y(item.box[3])) if item.box else None
        point = (x(item.point[0]), y(item.point[1])) if item.point else None
        quad = tuple((x(cx), y(cy)) for cx, cy in item.quad) if item.quad else None
        mapped.append(GroundedObject(item.label, box=box, point=point, quad=quad))
    return mapped


def ground(text, family, original_size, image_grid_thw=None, resized_size=None, patch_size=DEFAULT_PATCH_SIZE):
    """Parse a model answer and map its objects to the original image's pixels.

    `family` is `model.config.family`. For Qwen2.5-VL give the image's `image_grid_thw` row (from the processor's
    output, with the processor's `image_processor.patch_size`) or `resized_size` (width, height) of the image the
    model saw; not both. Qwen3-VL and Qwen2-VL answer relative to the image, so they need neither.
    """
    if image_grid_thw is not None and resized_size is not None:
        raise ValueError("pass image_grid_thw or resized_size, not both")
    if image_grid_thw is not None:
        resized_size = resized_size_from_grid(image_grid_thw, patch_size)
    return to_original_pixels(parse_grounding(text, family), family, original_size, resized_size)


# ---- drawing -----------------------------------------------------------------------------------------------------


def draw_boxes(image, objects, line_width=None):
    """A copy of `image` (a PIL image or a path) with each object's box and/or point drawn and labelled; one colour
    per label. Coordinates are pixels of this image (see `to_original_pixels`)."""
    if isinstance(image, str):
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a path, got {type(image).__name__}")
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    line_width = line_width or max(2, round(min(canvas.size) / 200))
    font = ImageFont.load_default(size=max(10, min(canvas.size) // 30))
    colours = {}
    for item in objects:
        if not isinstance(item, GroundedObject):
            raise TypeError(f"objects must be GroundedObject items, got {type(item).__name__}")
        colour = colours.setdefault(item.label, PALETTE[len(colours) % len(PALETTE)])
        if item.quad:
            draw.polygon(item.quad, outline=colour, width=line_width)
        elif item.box:
            draw.rectangle(item.box, outline=colour, width=line_width)
        if item.point:
            radius = 2 * line_width + 1
            px, py = item.point
            draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=colour, outline=(255, 255, 255))
    for item in objects:  # labels last, so that no box is drawn over one
        if item.label:
            anchor = item.box[:2] if item.box else item.point
            _draw_label(draw, item.label, anchor, colours[item.label], font)
    return canvas


def _draw_label(draw, label, anchor, colour, font):
    """The label on a filled tag just above the anchor, or just below it at the top edge of the image."""
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    tag_height = bottom - top + 4
    x, y = anchor
    y = y - tag_height if y >= tag_height else y
    draw.rectangle((x, y, x + right - left + 4, y + tag_height), fill=colour)
    draw.text((x + 2 - left, y + 2 - top), label, fill=(255, 255, 255), font=font)


# ---- helpers -----------------------------------------------------------------------------------------------------


def _json_values(text):
    """Every JSON object or array in `text` that mentions bbox_2d or point_2d, left to right, skipping text that is
    not JSON and JSON without grounding (which is never decoded).

    Linear in the length of the text. Trying json's decoder at every bracket is not: each try reads on as far as the
    text looks like JSON, and each failure counts the lines before its position, so a long answer full of brackets
    took minutes. `_JsonExtents` finds where each value ends in one pass; only complete values reach the decoder.
    """
    extents, values, position = _JsonExtents(text), [], 0
    while (bracket := JSON_START.search(text, position)) is not None:
        start = bracket.start()
        end = extents.end(start)
        if end is None:
            position = start + 1  # not JSON from here: look for the next opening bracket
            continue
        if GROUNDING_KEY.search(text, start, end):
            values.append(_decode(text, start))
        position = end
    return values


# What `_JsonExtents` knows of a position: not read yet, or no JSON value starts there (else: where the value ends).
UNREAD, NOT_JSON = -2, -1


class _JsonExtents:
    """Where the JSON array or object that starts at a position of `text` ends, asked for any number of positions.

    Every container met while reading one is remembered (its end, or that it is not JSON: a JSON value reads the same
    whoever contains it), so asking again about a position inside one already read costs nothing, and no stretch of
    text is read more than a few times over all the questions. Open containers are kept on an explicit stack, so any
    depth of nesting is read without recursion. The grammar is that of `JSON_TOKEN` and json.JSONDecoder.
    """

    def __init__(self, text):
        self.text = text
        # One slot per position, in an array: a dict holding the same would take ten times the memory.
        self.ends = array("q", [UNREAD]) * (len(text) + 1)

    def end(self, start):
        """Where the value that starts at `start` (a "[" or "{") ends (exclusive), or None if it is not JSON."""
        if self.ends[start] == UNREAD:
            self._read(start)
        return None if self.ends[start] == NOT_JSON else self.ends[start]

    def _read(self, start):
        """Read the container at `start` token by token, noting in `ends` every container met."""
        text, ends = self.text, self.ends
        open_at = [start]  # positions of the containers being read, innermost last
        expect, position = _after_opening(text[start]), start + 1
        while open_at:
            token = JSON_TOKEN.match(text, position)
            if token is None:
                break
            kind = token.lastgroup
            value, at, position = token.group(kind), token.start(kind), token.end()
            closing = "]" if text[open_at[-1]] == "[" else "}"
            punctuation = value if kind == "punctuation" else None
            if punctuation == closing and expect in ("value or close", "key or close", "comma or close"):
                ends[open_at.pop()] = position
                expect = "comma or close"
            elif punctuation == "," and expect == "comma or close":
                expect = "value" if closing == "]" else "key"
            elif punctuation == ":" and expect == "colon":
                expect = "value"
            elif kind == "string" and expect in ("key", "key or close"):
                expect = "colon"
            elif kind != "punctuation" and expect in ("value", "value or close"):
                expect = "comma or close"
            elif punctuation in ("[", "{") and expect in ("value", "value or close"):
                if ends[at] == NOT_JSON:
                    break
                if ends[at] == UNREAD:
                    open_at.append(at)
                    expect = _after_opening(punctuation)
                else:  # read before, from another start: skip it
                    position, expect = ends[at], "comma or close"
            else:
                break
        for at in open_at:  # the text ended, or a token that JSON does not allow there: none of these is JSON
            ends[at] = NOT_JSON


def _after_opening(bracket):
    return "value or close" if bracket == "[" else "key or close"


def _decode(text, start):
    """The JSON value at `start`, known to be complete. One nested deeper than json's decoder can go (it recurses)
    is refused with a ValueError, as every unreadable answer is, not json's RecursionError."""
    try:
        return JSON_DECODER.raw_decode(text, start)[0]
    except RecursionError:
        raise ValueError(f"the answer holds JSON nested too deeply to read: {_excerpt(text)}") from None


def _grounding_dicts(values):
    """The dicts with a bbox_2d or point_2d among JSON values, lists included, in order. An explicit stack rather
    than recursion: lists nest as deeply as json's decoder reads them, which is deeper than Python recursion allows
    here."""
    pending = list(reversed(values))
    while pending:
        value = pending.pop()
        if isinstance(value, list):
            pending.extend(reversed(value))
        elif isinstance(value, dict) and any(key in value for key in GROUNDING_KEYS):
            yield value


def _qwen2_markup(text, opening_pattern=QWEN2_OPENING, closing_markers=QWEN2_CLOSING):
    """Each object reference and box in `text` (Qwen-VL's tags with its patterns), in order, as (kind, what is inside, start, end): from an opening
    marker to the first closing marker of its kind after it; an opening marker that is never closed is plain text.

    What the regex `<|object_ref_start|>(.*?)<|object_ref_end|>|<|box_start|>(.*?)<|box_end|>` finds, in linear
    time: that regex reads to the end of the text again for every opening marker that is never closed.
    """
    closings = {kind: [m.start() for m in re.finditer(re.escape(marker), text)] for kind, marker in closing_markers.items()}
    position = 0
    for opening in opening_pattern.finditer(text):
        if opening.start() < position:
            continue  # inside the previous reference or box
        kind = opening.group("kind")
        later = bisect.bisect_left(closings[kind], opening.end())
        if later == len(closings[kind]):
            continue  # never closed
        closing = closings[kind][later]
        position = closing + len(closing_markers[kind])
        yield kind, text[opening.end():closing], opening.start(), position


def _object_from_json(item, index):
    box = _numbers(item, "bbox_2d", 4, index)
    point = _numbers(item, "point_2d", 2, index)
    label = item.get("label", "")
    return GroundedObject(str(label) if label is not None else "", box=_ordered_box(box) if box else None, point=point)


def _numbers(item, key, count, index):
    if key not in item:
        return None
    values = item[key]
    if not (
        isinstance(values, list)
        and len(values) == count
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    ):
        raise ValueError(f"entry {index}: {key} must be a list of {count} numbers, got {values!r}")
    return tuple(float(v) for v in values)


def _ordered_box(values):
    """(x1, y1, x2, y2) with the corners in either order, as (left, top, right, bottom)."""
    x1, y1, x2, y2 = values
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def _check_text(text):
    if not isinstance(text, str):
        raise TypeError(f"the model answer must be a string, got {type(text).__name__}")


def _check_family(family):
    if family not in FAMILIES:
        raise ValueError(
            f"family must be '{QWEN25}' (Qwen2.5-VL), '{QWEN3}' (Qwen3-VL), '{QWEN2}' (Qwen2-VL) or '{QWEN_VL}' "
            f"(Qwen-VL 2023), as model.config.family says; got {family!r}"
        )
    return family


def _check_size(size, name):
    if not (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"{name} must be (width, height) in pixels, got {size!r}")
    return float(size[0]), float(size[1])


def _is_positive_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _excerpt(text, limit=120):
    return repr(text if len(text) <= limit else text[:limit] + "...")


__all__ = [
    "GroundedObject",
    "parse_qwen25",
    "parse_qwen2",
    "parse_qwen_vl",
    "parse_grounding",
    "resized_size_from_grid",
    "to_original_pixels",
    "ground",
    "draw_boxes",
]
