"""Property tests (hypothesis) of the image processor and the processor on random inputs.

Sizes run from 1 px to 8000 px a side (the area is bounded so that no example allocates much), over PIL modes
RGB, RGBA, L, P, 1, I;16 and CMYK, uint8 and float32 numpy arrays and uint8 torch tensors, with random pixel
bounds, numbers of images and videos, and frame counts. Each example either raises the catalogued error (an
aspect ratio above 200 is the only way these inputs can be wrong) or gives outputs that agree with each other:
pixel rows = sum of grid products, each grid = smart_resize of the input size / 14, placeholders = grid product / 4
per item, in order, and `second_per_grid_ts` one per video.

Runs are derandomized (the same examples every time, no example database) so that CI is stable.
"""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from image_processing_qwenvl import QwenVLImageProcessor, smart_resize
from processing_qwenvl import QwenVLProcessor
from test_processor import ROOT

FUZZ = settings(
    max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
MODES = ["RGB", "RGBA", "L", "P", "1", "I;16", "CMYK"]
KINDS = MODES + ["uint8 array", "float32 array", "gray array", "uint8 tensor"]
MAX_AREA = 400_000  # 8000 x 50 at most: cheap to build and to resize
FACTOR, PATCH, ROW = 28, 14, 3 * 2 * 14 * 14
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"


def side(max_side):
    """A side length in [1, max_side], log-uniform: tiny, medium and huge sides are all common."""
    return st.integers(0, 1000).map(lambda k: max(1, round(max_side ** (k / 1000))))


@st.composite
def sizes(draw, max_side=8000, max_area=MAX_AREA):
    """(height, width) from 1 px up, long thin strips included."""
    height = draw(side(max_side))
    width = draw(side(max(1, min(max_side, max_area // height))))
    return (height, width) if draw(st.booleans()) else (width, height)


def picture(kind, height, width, seed):
    """An image of `kind` (a PIL mode, or an array / tensor layout), filled with a few random blocks.

    The random pixels are drawn at most 8 x 8 and scaled up with nearest neighbour, so a large image costs one
    resize, not a large random draw."""
    rng = np.random.default_rng(seed)
    small = PIL.Image.fromarray(rng.integers(0, 256, (min(height, 8), min(width, 8), 3), dtype=np.uint8))
    rgb = small.resize((width, height), PIL.Image.Resampling.NEAREST)
    if kind == "uint8 array":
        return np.asarray(rgb)
    if kind == "float32 array":
        return np.asarray(rgb).astype(np.float32) / 255
    if kind == "gray array":
        return np.asarray(rgb.convert("L"))
    if kind == "uint8 tensor":
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # (C, H, W), as torch images are
    if kind == "I;16":
        return PIL.Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)  # mode I;16
    if kind == "P":
        return rgb.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    return rgb.convert(kind)


@st.composite
def images(draw, max_side=8000, max_area=MAX_AREA):
    """(image, (height, width))."""
    height, width = draw(sizes(max_side, max_area))
    kind = draw(st.sampled_from(KINDS))
    return picture(kind, height, width, draw(st.integers(0, 2**16))), (height, width)


def too_elongated(size):
    return max(size) / min(size) > 200


def expected_grid(size, min_pixels, max_pixels, frames=1):
    height, width = smart_resize(*size, FACTOR, min_pixels, max_pixels)
    return [math.ceil(frames / 2), height // PATCH, width // PATCH]


def assert_rows_match_grids(pixel_values, grids):
    pixel_values, grids = np.asarray(pixel_values), np.asarray(grids)
    assert pixel_values.shape == (int(grids.prod(axis=1).sum()), ROW)
    assert (grids[:, 1:] % 2 == 0).all()
    assert np.isfinite(pixel_values).all()


# --- image processor ------------------------------------------------------------------------------


@FUZZ
@given(
    items=st.lists(images(), min_size=1, max_size=3),
    bounds=st.tuples(st.integers(4, 64), st.integers(4, 512)).map(sorted),
)
def test_image_processor_on_random_images(items, bounds):
    min_pixels, max_pixels = (tokens * FACTOR * FACTOR for tokens in bounds)
    processor = QwenVLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    pictures = [image for image, _ in items]
    if any(too_elongated(size) for _, size in items):
        with pytest.raises(ValueError, match="aspect ratio"):
            processor(pictures)
        return
    out = processor(pictures)
    assert_rows_match_grids(out["pixel_values"], out["image_grid_thw"])
    assert out["image_grid_thw"].tolist() == [expected_grid(size, min_pixels, max_pixels) for _, size in items]


# --- processor ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    return QwenVLProcessor.from_pretrained(ROOT, max_pixels=64 * FACTOR * FACTOR)


@st.composite
def videos(draw):
    """(video, (height, width), frame count): a list of frames of one mode, or a uint8 [T, H, W, 3] array."""
    height, width = draw(sizes(max_side=400, max_area=20_000))
    count = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    if draw(st.booleans()):
        frames = np.stack([np.asarray(picture("RGB", height, width, seed + i)) for i in range(count)])
        return frames, (height, width), count
    mode = draw(st.sampled_from(MODES))
    return [picture(mode, height, width, seed + i) for i in range(count)], (height, width), count


@st.composite
def batches(draw):
    """Samples of text with image and video placeholders in random order, and the media in that order."""
    samples, media = [], []
    for _ in range(draw(st.integers(1, 3))):
        kinds = draw(st.lists(st.sampled_from(["image", "video", "text"]), max_size=4))
        text = "Q:"
        for kind in kinds:
            if kind == "image":
                media.append(("image", *draw(images(max_area=50_000))))
            elif kind == "video":
                media.append(("video", *draw(videos())))
            text += {"image": f"<|vision_start|>{IMAGE_PAD}<|vision_end|>",
                     "video": f"<|vision_start|>{VIDEO_PAD}<|vision_end|>", "text": " some words"}[kind]
        samples.append(text + " A:")
    return samples, media


def placeholder_runs(ids, token_id):
    """Lengths of the runs of `token_id` in one sample's ids, in order."""
    runs, length = [], 0
    for token in ids + [None]:
        if token == token_id:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


@FUZZ
@given(batch=batches(), fps=st.floats(0.1, 30.0))
def test_processor_on_random_batches(processor, batch, fps):
    texts, media = batch
    images_in = [(item[1], item[2]) for item in media if item[0] == "image"]
    videos_in = [(item[1], item[2], item[3]) for item in media if item[0] == "video"]
    call = dict(text=texts, padding=True, fps=fps,
                images=[image for image, _ in images_in] or None, videos=[video for video, _, _ in videos_in] or None)
    if any(too_elongated(size) for _, size in images_in) or any(too_elongated(size) for _, size, _ in videos_in):
        with pytest.raises(ValueError, match="aspect ratio"):
            processor(**call)
        return
    out = processor(**call, return_tensors="pt")

    image_processor = processor.image_processor
    image_tokens, video_tokens = [], []
    if images_in:
        assert_rows_match_grids(out["pixel_values"], out["image_grid_thw"])
        bounds = image_processor.min_pixels, image_processor.max_pixels
        expected = [expected_grid(size, *bounds) for _, size in images_in]
        assert out["image_grid_thw"].tolist() == expected
        image_tokens = [int(grid.prod()) // 4 for grid in out["image_grid_thw"]]
    if videos_in:
        assert_rows_match_grids(out["pixel_values_videos"], out["video_grid_thw"])
        # frames are taken as already sized: their sides are only rounded to multiples of 28
        expected = [expected_grid(size, 4 * FACTOR**2, 16384 * FACTOR**2, count) for _, size, count in videos_in]
        assert out["video_grid_thw"].tolist() == expected
        assert out["second_per_grid_ts"].tolist() == pytest.approx([2 / fps] * len(videos_in))
        video_tokens = [int(grid.prod()) // 4 for grid in out["video_grid_thw"]]

    ids = out["input_ids"]
    assert out["attention_mask"].shape == ids.shape == out["mm_token_type_ids"].shape
    runs = {IMAGE_PAD: [], VIDEO_PAD: []}
    for row in ids.tolist():
        for token in runs:
            runs[token] += placeholder_runs(row, processor.tokenizer.convert_tokens_to_ids(token))
    assert runs[IMAGE_PAD] == image_tokens and runs[VIDEO_PAD] == video_tokens
    assert int((out["mm_token_type_ids"] == 1).sum()) == sum(image_tokens)
    assert int((out["mm_token_type_ids"] == 2).sum()) == sum(video_tokens)
