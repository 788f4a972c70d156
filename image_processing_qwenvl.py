"""Image and video preprocessing for Qwen2-VL and Qwen2.5-VL.

Data flow, in the order of this file:

1. ``smart_resize`` picks the size an image is resized to: both sides multiples of 28 (patch 14 x merge 2),
   the pixel count inside ``[min_pixels, max_pixels]``, the aspect ratio kept as well as possible.
2. ``load_image`` turns anything that names or holds a picture into an RGB ``PIL.Image``.
3. ``smart_nframes``, ``sample_frame_indices`` and ``load_video`` pick, decode and resize video frames the way
   qwen-vl-utils does (same frame indices, same sampled fps, same sizes).
4. ``QwenVLImageProcessor`` resizes, rescales, normalizes and cuts images and videos into patch rows:
   ``pixel_values`` [sum(t*h*w), 3*2*14*14] with ``image_grid_thw`` [n, 3], and the same for videos.

The pixel values are bit-identical to transformers' ``Qwen2VLImageProcessorPil`` (PIL bicubic resize, float64
rescale rounded to float32, float32 normalize). The work is ordered for speed: the patch layout is built on the
uint8 pixels, and rescale + normalize become one lookup in a 256-entry table per channel.
"""

import base64
import binascii
import io
import math
import numbers
import os
import urllib.error
import urllib.request
from typing import Optional, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs


# Official preprocessor_config.json values of the Qwen2-VL and Qwen2.5-VL checkpoints.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MIN_PIXELS = 3136  # 4 merged tokens of 28 x 28
DEFAULT_MAX_PIXELS = 12845056  # 16384 merged tokens of 28 x 28
DEFAULT_PATCH_SIZE = 14
DEFAULT_MERGE_SIZE = 2

# Limits that qwen-vl-utils applies; the names follow its constants.
MAX_ASPECT_RATIO = 200
# The side multiple of qwen-vl-utils' helpers, which have no processor; a processor uses its own
# patch_size * merge_size.
IMAGE_FACTOR = DEFAULT_PATCH_SIZE * DEFAULT_MERGE_SIZE
IMAGE_MIN_TOKENS = 4
IMAGE_MAX_TOKENS = 16384
VIDEO_MIN_PIXELS = 128 * IMAGE_FACTOR * IMAGE_FACTOR
VIDEO_MAX_PIXELS = 768 * IMAGE_FACTOR * IMAGE_FACTOR
# qwen-vl-utils budgets all frames of a video together to 90% of a 128k-token sequence (it reads the length from
# the MODEL_SEQ_LEN environment variable; here it is a constant, pass total_pixels to change it).
VIDEO_TOTAL_PIXELS = 128000 * IMAGE_FACTOR * IMAGE_FACTOR * 0.9
FRAME_FACTOR = 2  # sampled frame counts are even, so frames pair up into temporal patches
DEFAULT_FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 768

URL_TIMEOUT_S = 10


# ---------------------------------------------------------------------------------------------------------------
# 1. Target size
# ---------------------------------------------------------------------------------------------------------------


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def _check_positive_number(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


def _check_pixel_bounds(min_pixels, max_pixels, check=_check_positive_number) -> tuple:
    """``(min_pixels, max_pixels)``: each None or positive (``check`` says: a number, or an integer where a processor
    stores it), and min not above max."""
    min_pixels = None if min_pixels is None else check(min_pixels, "min_pixels")
    max_pixels = None if max_pixels is None else check(max_pixels, "max_pixels")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not be larger than max_pixels ({max_pixels})")
    return min_pixels, max_pixels


def check_fps(fps=None) -> float:
    """Frames per second as a float: ``DEFAULT_FPS`` for None, else a positive finite number (ValueError if not).

    The one check of ``fps``, for ``smart_nframes``, ``load_video`` and the processor alike.
    """
    if fps is None:
        return DEFAULT_FPS
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not 0 < fps < math.inf:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return float(fps)


def _check_frame_rate(fps, nframes) -> tuple[Optional[float], Optional[int]]:
    """``(fps, nframes)`` of a request for frames: ``nframes`` alone, or ``fps`` (default ``DEFAULT_FPS``)."""
    if fps is not None and nframes is not None:
        raise ValueError(f"give either fps ({fps}) or nframes ({nframes}), not both")
    if nframes is not None:
        return None, _check_positive_int(nframes, "nframes")
    return check_fps(fps), None


def _check_resized_size(resized_height, resized_width) -> None:
    if (resized_height is None) != (resized_width is None):
        raise ValueError("give both resized_height and resized_width, or neither")


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: Optional[float] = None,
    max_pixels: Optional[float] = None,
) -> tuple[int, int]:
    """Return ``(new_height, new_width)``: multiples of ``factor``, ``min_pixels <= h*w <= max_pixels``.

    Follows qwen-vl-utils exactly: each side is rounded to the nearest multiple of ``factor`` but at least
    ``factor`` (so a side under 14 px becomes 28 instead of vanishing), and the whole image is then scaled down
    (sides floored) or up (sides ceiled) when its area falls outside the bounds. The bounds default to
    qwen-vl-utils' 4 and 16384 tokens of ``factor`` x ``factor`` (3136 and 12845056 for 28). They may be
    floats, as the per-frame budget of a video is.

    One deliberate difference: where qwen-vl-utils would shrink a very thin image to a side of 0 (only possible
    when ``max_pixels`` is below ``200 * factor**2``), the side stays at ``factor``, as transformers does.

    Raises ValueError for non-positive sizes, ``min_pixels > max_pixels`` and aspect ratios above 200.
    """
    height = _check_positive_int(height, "height")
    width = _check_positive_int(width, "width")
    factor = _check_positive_int(factor, "factor")
    if min_pixels is None:
        min_pixels = IMAGE_MIN_TOKENS * factor**2
    if max_pixels is None:
        max_pixels = IMAGE_MAX_TOKENS * factor**2
    _check_pixel_bounds(min_pixels, max_pixels)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio of a {height}x{width} image is {ratio:.1f}, more than the {MAX_ASPECT_RATIO} allowed"
        )

    new_height = max(factor, round(height / factor) * factor)
    new_width = max(factor, round(width / factor) * factor)
    if new_height * new_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_height = max(factor, math.floor(height / beta / factor) * factor)
        new_width = max(factor, math.floor(width / beta / factor) * factor)
    elif new_height * new_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * beta / factor) * factor
        new_width = math.ceil(width * beta / factor) * factor
    return new_height, new_width


# ---------------------------------------------------------------------------------------------------------------
# 2. Loading images
# ---------------------------------------------------------------------------------------------------------------


def _fetch_url(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ValueError(f"could not fetch {url!r} (is the network reachable?): {err}") from err


def _decode_data_uri(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError(f"only base64 data URIs are supported ('data:image/...;base64,...'), got {uri[:40]!r}...")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise ValueError(f"data URI {uri[:40]!r}... holds invalid base64: {err}") from err


def _open_image(source: Union[str, bytes], name: str) -> PIL.Image.Image:
    """Open a path or encoded bytes and decode them now, so a broken file fails here, under its own name."""
    try:
        image = PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports corrupt and truncated files with these
        raise ValueError(f"cannot read image {name}: {err}") from err
    return image


def _image_from_string(text: str) -> PIL.Image.Image:
    if text.startswith(("http://", "https://")):
        return _open_image(_fetch_url(text), repr(text))
    if text.startswith("data:"):
        if not text.startswith("data:image/"):
            raise ValueError(f"data URI does not hold an image: {text[:40]!r}...")
        return _open_image(_decode_data_uri(text), "from data URI")
    path = text[len("file://") :] if text.startswith("file://") else text
    if not os.path.isfile(path):
        raise ValueError(f"image file not found: {path!r}")
    return _open_image(path, repr(path))


def _is_array(value) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor))


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        # numpy has no bfloat16; float32 holds every bfloat16 value exactly
        return (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    return array


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    if np.isnan(values).any():
        raise ValueError("image contains NaN pixel values")
    low, high = values.min(), values.max()
    if low < 0 or high > 1:
        raise ValueError(
            f"float images must hold values in [0, 1], got [{low}, {high}]; pass 0-255 data as uint8 instead"
        )
    return np.rint(values.astype(np.float64) * 255).astype(np.uint8)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Bring pixel values of any numeric dtype to 0-255 bytes.

    uint8 is kept; uint16 (and PIL's 16-bit modes) is 16-bit data, scaled by 255/65535 and rounded; floats must be
    in [0, 1]; bool is black/white; other integer types must already hold 0-255.
    """
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if values.dtype == np.uint16:
        return np.rint(values / 257.0).astype(np.uint8)
    if np.issubdtype(values.dtype, np.floating):
        return _float_to_uint8(values)
    if np.issubdtype(values.dtype, np.integer):
        low, high = values.min(), values.max()
        if low < 0 or high > 255:
            raise ValueError(
                f"{values.dtype} image values must lie in [0, 255], got [{low}, {high}]; pass 16-bit data as uint16"
            )
        return values.astype(np.uint8)
    raise TypeError(f"unsupported image array dtype {values.dtype}")


_MODE_BY_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _image_from_array(array, channels_first: bool) -> PIL.Image.Image:
    """A 2-D (H, W) or 3-D array becomes a PIL image; 3-D arrays are (H, W, C) or (C, H, W) with C in 1-4.

    ``channels_first`` says which layout wins when both fit: torch tensors are (C, H, W) by convention, numpy
    arrays (H, W, C).
    """
    values = _to_numpy(array)
    if values.ndim not in (2, 3):
        raise ValueError(f"an image array must be 2-D (H, W) or 3-D (H, W, C) / (C, H, W), got shape {values.shape}")
    if values.size == 0:
        raise ValueError(f"image array has zero size: shape {values.shape}")
    if values.ndim == 3:
        first_fits, last_fits = values.shape[0] in _MODE_BY_CHANNELS, values.shape[-1] in _MODE_BY_CHANNELS
        if not (first_fits or last_fits):
            raise ValueError(f"cannot find a channel axis of size 1-4 in image array of shape {values.shape}")
        if first_fits and (channels_first or not last_fits):
            values = np.moveaxis(values, 0, -1)
        if values.shape[-1] == 1:
            values = values[..., 0]
    values = np.ascontiguousarray(_to_uint8(values))
    mode = "L" if values.ndim == 2 else _MODE_BY_CHANNELS[values.shape[-1]]
    return PIL.Image.fromarray(values, mode=mode)


_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited on white (as transformers does)."""
    try:
        if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
            # PIL's own conversion clips these to 0-255 instead of scaling them
            values = np.asarray(image)
            if image.mode == "I":
                if values.min() < 0 or values.max() > 65535:
                    raise ValueError("mode 'I' images are taken as 16-bit, got values outside [0, 65535]")
                values = values.astype(np.uint16)
            return PIL.Image.fromarray(_to_uint8(values), mode="L").convert("RGB")
        if "A" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot convert a mode {image.mode!r} image to RGB: {err}") from err


def load_image(image) -> PIL.Image.Image:
    """Return ``image`` as an RGB ``PIL.Image``.

    Accepts:
    - a ``PIL.Image`` of any mode: transparent modes (RGBA, LA, P or L with a transparency key, ...) are composited
      on white; 16-bit modes (I;16, I) are scaled to 8 bits; F (float) must hold values in [0, 1];
    - a numpy array or torch tensor, (H, W), (H, W, C) or (C, H, W) with C in 1-4, uint8 / uint16 (16-bit) /
      float in [0, 1] / bool / other integers holding 0-255. When both layouts fit, numpy arrays are read as
      (H, W, C) and tensors as (C, H, W);
    - a file path (``str`` or ``os.PathLike``), a ``file://`` path, a ``data:image/...;base64,...`` URI, an
      ``http(s)://`` URL (fetched with urllib; offline this is a clear error), or the encoded bytes of a file.

    The EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``), so a phone photo comes out the way it
    is displayed. The transformers and qwen-vl-utils preprocessors ignore the tag and see such photos sideways.

    Raises ValueError for missing, corrupt or truncated files, NaN pixels and out-of-range values, TypeError for
    inputs of any other type.
    """
    if isinstance(image, PIL.Image.Image):
        pil = image
    elif isinstance(image, (str, os.PathLike)):
        pil = _image_from_string(os.fspath(image))
    elif isinstance(image, (bytes, bytearray)):
        pil = _open_image(bytes(image), "from bytes")
    elif _is_array(image):
        return _to_rgb(_image_from_array(image, channels_first=isinstance(image, torch.Tensor)))
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}: pass a PIL image, numpy array, torch tensor, path, "
            "URL, data URI or bytes"
        )
    if pil.getexif().get(0x0112, 1) != 1:  # 0x0112 is the EXIF orientation tag; 1 means upright
        pil = PIL.ImageOps.exif_transpose(pil)
    return _to_rgb(pil)


# ---------------------------------------------------------------------------------------------------------------
# 3. Videos
# ---------------------------------------------------------------------------------------------------------------


def smart_nframes(
    total_frames: int,
    video_fps: float,
    fps: Optional[float] = None,
    nframes: Optional[int] = None,
    min_frames: int = MIN_FRAMES,
    max_frames: int = MAX_FRAMES,
) -> int:
    """Number of frames to sample from a clip of ``total_frames`` frames at ``video_fps``, as qwen-vl-utils does.

    Give ``fps`` (default 2.0) or ``nframes``, not both. ``nframes`` is rounded to an even number; with ``fps``
    the count is ``duration * fps`` clamped to [min_frames, max_frames] (themselves made even) and to the clip,
    then floored to an even number. The result must lie in [2, total_frames].
    """
    fps, nframes = _check_frame_rate(fps, nframes)
    if nframes is not None:
        count = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        low = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
        count = min(max(total_frames / video_fps * fps, low), high, total_frames)
        count = math.floor(count / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= count <= total_frames:
        raise ValueError(
            f"cannot sample {count} frames from a clip of {total_frames} frames: the count must lie in "
            f"[{FRAME_FACTOR}, {total_frames}]"
        )
    return count


def _frame_range(total_frames: int, video_fps: float, video_start, video_end) -> tuple[int, int]:
    """First and last frame index inside [video_start, video_end] seconds, as qwen-vl-utils computes them."""
    if total_frames <= 0:
        raise ValueError("the video is empty: it has no frames")
    if not video_fps > 0:
        raise ValueError(f"the video frame rate must be positive, got {video_fps}")
    if video_start is not None and video_end is not None and video_start >= video_end:
        raise ValueError(f"video_start ({video_start}) must be before video_end ({video_end})")
    duration = total_frames / video_fps
    first = 0 if video_start is None else math.ceil(max(0.0, min(video_start, duration)) * video_fps)
    last = total_frames - 1
    if video_end is not None:
        last = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), last)
    if (video_start is not None or video_end is not None) and first >= last:
        raise ValueError(
            f"the range video_start={video_start}, video_end={video_end} holds no frames of a {duration:.2f} s clip "
            f"({total_frames} frames at {video_fps} fps)"
        )
    return first, last


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    fps: Optional[float] = None,
    nframes: Optional[int] = None,
    video_start: Optional[float] = None,
    video_end: Optional[float] = None,
    min_frames: int = MIN_FRAMES,
    max_frames: int = MAX_FRAMES,
) -> tuple[list[int], float]:
    """Indices of the frames to decode and the rate they sample the clip at (frames per second).

    Same as qwen-vl-utils' decord / torchcodec readers: ``smart_nframes`` frames spread evenly (float32 linspace,
    rounded) over the frames between ``video_start`` and ``video_end`` seconds.
    """
    first, last = _frame_range(total_frames, video_fps, video_start, video_end)
    in_range = last - first + 1
    count = smart_nframes(in_range, video_fps, fps=fps, nframes=nframes, min_frames=min_frames, max_frames=max_frames)
    # torch.linspace (float32) as in qwen-vl-utils: a float64 linspace rounds some .5 cases differently
    indices = torch.linspace(first, last, count).round().long().tolist()
    return indices, count / in_range * video_fps


def _video_max_pixels(frame_count: int, min_pixels, max_pixels, total_pixels) -> float:
    """Per-frame pixel cap: the total budget shared by frame pairs, within [1.05 * min_pixels, VIDEO_MAX_PIXELS].

    Kept a float, as in qwen-vl-utils: smart_resize's scale factor depends on its fractional part.
    """
    total_pixels = VIDEO_TOTAL_PIXELS if total_pixels is None else _check_positive_number(total_pixels, "total_pixels")
    cap = max(min(VIDEO_MAX_PIXELS, total_pixels / frame_count * FRAME_FACTOR), int(min_pixels * 1.05))
    return cap if max_pixels is None else min(max_pixels, cap)


def _decode_frames(path: str, fps, nframes, video_start, video_end, min_frames, max_frames):
    """Decode the sampled frames of a video file with PyAV: (list of uint8 [H, W, 3], sampled fps)."""
    try:
        import av
    except ImportError as err:
        raise ImportError("reading video files needs PyAV: pip install av") from err
    try:
        container = av.open(path, timeout=URL_TIMEOUT_S)
    except (OSError, av.FFmpegError) as err:
        raise ValueError(f"cannot open video {path!r}: {err}") from err
    with container:
        if not container.streams.video:
            raise ValueError(f"{path!r} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        total = stream.frames  # the container's frame count, as decord and torchcodec read it
        if not total:  # some containers (Matroska) do not store it: count the packets, then rewind
            total = sum(1 for packet in container.demux(stream) if packet.size)
            container.seek(0)
        indices, sampled_fps = sample_frame_indices(
            total, float(rate or 0), fps, nframes, video_start, video_end, min_frames, max_frames
        )
        wanted, picked = set(indices), {}
        try:
            for position, frame in enumerate(container.decode(stream)):
                if position in wanted:
                    picked[position] = frame.to_ndarray(format="rgb24")
                if position >= indices[-1]:
                    break
        except av.FFmpegError as err:
            raise ValueError(f"cannot decode video {path!r}: {err}") from err
    if len(picked) < len(wanted):
        raise ValueError(f"video {path!r} ended before frame {indices[-1]} although its header lists {total} frames")
    return [picked[index] for index in indices], sampled_fps


def _video_source_path(video: str) -> str:
    path = video[len("file://") :] if video.startswith("file://") else video
    if "://" not in path and not os.path.isfile(path):
        raise ValueError(f"video file not found: {path!r}")
    return path


def _frame_size(frames: list[PIL.Image.Image]) -> tuple[int, int]:
    """(height, width) of a video's frames, which must all have the same size."""
    sizes = {(frame.height, frame.width) for frame in frames}
    if len(sizes) > 1:
        raise ValueError(f"all frames of a video must have the same size, got {sorted(sizes)}")
    return sizes.pop()


def _resize_frames(frames: list[PIL.Image.Image], height: int, width: int) -> np.ndarray:
    resized = [frame.resize((width, height), PIL.Image.Resampling.BICUBIC) for frame in frames]
    return np.stack([np.asarray(frame) for frame in resized])


def load_video(
    video,
    fps: Optional[float] = None,
    nframes: Optional[int] = None,
    video_start: Optional[float] = None,
    video_end: Optional[float] = None,
    min_pixels: Optional[int] = None,
    max_pixels: Optional[int] = None,
    total_pixels: Optional[float] = None,
    min_frames: int = MIN_FRAMES,
    max_frames: int = MAX_FRAMES,
    resized_height: Optional[int] = None,
    resized_width: Optional[int] = None,
) -> tuple[np.ndarray, float]:
    """Read, sample and resize a video as qwen-vl-utils' ``fetch_video`` does: ``(frames uint8 [T, H, W, 3], fps)``.

    ``video`` is a file path (or ``file://`` path), decoded with PyAV, or a list of frames (anything
    ``load_image`` takes) / a 4-D array or tensor, taken as already sampled at ``fps`` (default 2.0). As in
    qwen-vl-utils 0.0.14, a frame list's size passes through a first rounding to multiples of 56 (see below).

    For a file, ``smart_nframes`` frames (``fps`` default 2.0, or ``nframes``; not both) are taken between
    ``video_start`` and ``video_end`` seconds at the same indices as qwen-vl-utils, and the returned fps is the
    rate they sample the clip at; ``temporal_patch_size / fps`` is then each temporal patch's duration. A frame
    list is padded to an even length by repeating its last frame.

    Frames are resized to ``smart_resize`` of their size with per-frame bounds ``min_pixels`` (default
    128*28*28) and ``max_pixels`` (default 768*28*28, lowered so all frames fit ``total_pixels``), or to
    ``resized_height`` x ``resized_width`` rounded by ``smart_resize``; the sizes equal qwen-vl-utils'. The
    resize is PIL bicubic; qwen-vl-utils uses torchvision's antialiased bicubic on tensors, whose pixel values can
    differ by a few levels.
    """
    _check_resized_size(resized_height, resized_width)
    fps, nframes = _check_frame_rate(fps, nframes)  # checked here too so that it fails before any decoding
    _check_pixel_bounds(min_pixels, max_pixels)

    if isinstance(video, (str, os.PathLike)):
        arrays, sampled_fps = _decode_frames(
            _video_source_path(os.fspath(video)), fps, nframes, video_start, video_end, min_frames, max_frames
        )
        frames = [PIL.Image.fromarray(array) for array in arrays]
        height, width = frames[0].height, frames[0].width
    else:
        if nframes is not None or video_start is not None or video_end is not None:
            raise ValueError("nframes, video_start and video_end apply to video files; a frame list is used whole")
        frames = [load_image(frame) for frame in _frames_of(video)]
        sampled_fps = fps
        frames += frames[-1:] * (-len(frames) % FRAME_FACTOR)
        # qwen-vl-utils (0.0.14) first resizes each frame as an image, then the stack as a video. Its first pass
        # rounds to multiples of 56, not 28 (it hands the factor 28 to fetch_image as the patch size, which
        # fetch_image doubles), with image pixel bounds. The size is computed the same way here, to match it;
        # the pixels are resized once, from the original frames.
        height, width = _frame_size(frames)
        if resized_height is None:
            height, width = smart_resize(height, width, 2 * IMAGE_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)

    if resized_height is not None:
        height, width = smart_resize(resized_height, resized_width)
    else:
        min_pixels = VIDEO_MIN_PIXELS if min_pixels is None else min_pixels
        cap = _video_max_pixels(len(frames), min_pixels, max_pixels, total_pixels)
        height, width = smart_resize(height, width, min_pixels=min_pixels, max_pixels=cap)
    return _resize_frames(frames, height, width), sampled_fps


# ---------------------------------------------------------------------------------------------------------------
# 4. Patches
# ---------------------------------------------------------------------------------------------------------------


def _value_table(do_rescale, rescale_factor, do_normalize, image_mean, image_std) -> np.ndarray:
    """float32 [3, 256]: the model input value of each byte value of each channel.

    transformers rescales in float64, rounds to float32, then normalizes in float32. Doing exactly that for the
    256 possible bytes gives lookups bit-identical to it, at a fraction of the cost of doing it per pixel.
    """
    values = np.arange(256, dtype=np.float64)
    if do_rescale:
        values = values * rescale_factor
    values = np.broadcast_to(values.astype(np.float32), (3, 256))
    if do_normalize:
        mean = np.asarray(image_mean, dtype=np.float32).reshape(3, 1)
        std = np.asarray(image_std, dtype=np.float32).reshape(3, 1)
        values = (values - mean) / std
    return np.ascontiguousarray(values)


def _grid_thw(frames: np.ndarray, patch_size: int, temporal_patch_size: int) -> tuple[int, int, int]:
    """Patch grid (t, h, w) of uint8 frames [T, H, W, 3]; a still image (T = 1) is one temporal patch."""
    count, height, width = frames.shape[:3]
    return max(count // temporal_patch_size, 1), height // patch_size, width // patch_size


def _patchify(frames: np.ndarray, table: np.ndarray, patch_size, merge_size, temporal_patch_size, out: np.ndarray):
    """Write the patch rows of uint8 frames [T, H, W, 3] into float32 ``out`` [t*h*w, 3*tp*p*p].

    T is a multiple of ``temporal_patch_size`` (tp), or 1 for a still image, which stands for tp copies of itself.
    Rows come in merge order (t, h/m, w/m, m, m) and each row is (channel, frame, py, px).
    """
    p, m, tp = patch_size, merge_size, temporal_patch_size
    channels = frames.shape[-1]
    grid_t, grid_h, grid_w = _grid_thw(frames, p, tp)
    per_patch = 1 if frames.shape[0] == 1 else tp
    rows = grid_t * grid_h * grid_w
    # Rearrange bytes, not floats; channel goes first so that each channel is one contiguous block for its lookup.
    blocks = frames.reshape(grid_t, per_patch, grid_h // m, m, p, grid_w // m, m, p, channels)
    blocks = blocks.transpose(8, 0, 2, 5, 3, 6, 1, 4, 7)  # (C, t, h/m, w/m, m, m, frame, py, px)
    blocks = np.ascontiguousarray(blocks).reshape(channels, rows, per_patch, p * p)
    out = out.reshape(rows, channels, tp, p * p)
    values = np.empty((rows, per_patch, p * p), dtype=np.float32)
    for channel in range(channels):
        # bytes index a 256-entry table, so they are always in range and mode="clip" never clips (but is faster)
        np.take(table[channel], blocks[channel], out=values, mode="clip")
        out[:, channel] = values  # a still image's single frame broadcasts over the temporal patch


# ---------------------------------------------------------------------------------------------------------------
# 5. Input structure
# ---------------------------------------------------------------------------------------------------------------


def image_list(images) -> list:
    """One image, a 4-D batch array / tensor [N, ...] or a (nested) list of them -> flat list of images, in order.

    The one reading of an ``images`` argument, for the image processor and the processor alike (which gives a list
    per sample). An empty list gives []; each image is checked when ``load_image`` reads it.
    """
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in image_list(item)]
    if _is_array(images) and images.ndim == 4:
        return list(images)
    return [images]


def _frames_of(video) -> list:
    """The frames of one video given as frames (a list of images or a 4-D array / tensor), as a non-empty list."""
    if _is_array(video) and video.ndim != 4:
        raise ValueError(f"a video array must be 4-D (T, H, W, C) or (T, C, H, W), got shape {tuple(video.shape)}")
    if not (_is_array(video) or isinstance(video, (list, tuple))):
        raise TypeError(
            f"unsupported video type {type(video).__name__}: pass a path, a list of frames or a 4-D array / tensor"
        )
    if len(video) == 0:
        raise ValueError("the video is empty: it has no frames")
    return list(video)


def video_list(videos, paths: bool = False) -> list:
    """One video or several (a list, or a 5-D batch array / tensor) -> list of videos, each a non-empty list of frames.

    A video is a list of frames (anything ``load_image`` takes) or a 4-D array / tensor (T, H, W, C) or
    (T, C, H, W). With ``paths``, a path or URL is a video too, and stays a path (``load_video`` reads it);
    without, a path is refused, and a list of paths is one video of picture files. An empty list gives [].
    The one reading of a ``videos`` argument, for the image processor and the processor alike.
    """
    if isinstance(videos, (str, os.PathLike)):
        if paths:
            return [videos]
        raise TypeError("videos takes decoded frames; read a video file with load_video() first")
    if _is_array(videos):
        if videos.ndim == 5:
            return [_frames_of(video) for video in videos]
        if videos.ndim != 4:
            raise ValueError(f"a video array must be 4-D (one video) or 5-D (a batch), got shape {tuple(videos.shape)}")
        return [_frames_of(videos)]
    if not isinstance(videos, (list, tuple)):
        raise TypeError(
            f"videos must be a video or a list of videos, where a video is {'a path or URL, ' if paths else ''}"
            f"a list of frames or a 4-D array / tensor of frames; got {type(videos).__name__}"
        )

    def is_video(item):  # else a frame
        return (
            isinstance(item, (list, tuple))
            or (_is_array(item) and item.ndim == 4)
            or (paths and isinstance(item, (str, os.PathLike)))
        )

    kinds = {is_video(item) for item in videos}
    if kinds == {False}:
        return [_frames_of(videos)]  # a list of frames is one video
    if len(kinds) > 1:
        raise TypeError("videos must be a list of frames (one video) or a list of videos, not a mix of both")
    return [video if isinstance(video, (str, os.PathLike)) else _frames_of(video) for video in videos]


# ---------------------------------------------------------------------------------------------------------------
# 6. The image processor
# ---------------------------------------------------------------------------------------------------------------


class QwenVLImageProcessorKwargs(ImagesKwargs, total=False):
    """Options beyond transformers' standard image options (lets ``from_pretrained(..., min_pixels=...)`` work)."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int


# Keys that configs saved by transformers (any version) may hold but that do not affect this processor. Listed
# beside ImagesKwargs because the installed version's ImagesKwargs lacks the keys other versions write (4.57 has
# no default_to_square or return_tensors, which 5.x saves; 4.57 saves _processor_class).
_IGNORED_CONFIG_KEYS = frozenset(ImagesKwargs.__annotations__) | {
    "image_processor_type",
    "processor_class",
    "_processor_class",
    "auto_map",
    "feature_extractor_type",
    "default_to_square",
    "disable_grouping",
    "image_seq_length",
    "return_tensors",
}

# Options that a call may override (besides min_pixels, max_pixels, resized_height, resized_width).
_CALL_OPTIONS = (
    "do_resize",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
    "patch_size",
    "temporal_patch_size",
    "merge_size",
)


def _pixels_from_size(size, min_pixels, max_pixels) -> tuple:
    """Read min/max pixels from a ``size`` dict (transformers 5: shortest/longest_edge; 4.x: min/max_pixels)."""
    if size is None:
        return min_pixels, max_pixels
    if not isinstance(size, dict):
        raise TypeError(f"size must be a dict with 'shortest_edge' and 'longest_edge', got {size!r}")
    unknown = set(size) - {"shortest_edge", "longest_edge", "min_pixels", "max_pixels"}
    if unknown:
        raise ValueError(f"size holds unsupported keys {sorted(unknown)}; use 'shortest_edge' and 'longest_edge'")
    low = size.get("shortest_edge", size.get("min_pixels"))
    high = size.get("longest_edge", size.get("max_pixels"))
    return (low if min_pixels is None else min_pixels), (high if max_pixels is None else max_pixels)


def _check_channel_values(values, name) -> list:
    values = [values] * 3 if isinstance(values, numbers.Real) else list(values)
    if len(values) != 3 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel), got {values!r}")
    return [float(v) for v in values]


def _checked_options(options: dict) -> dict:
    """Validate a full set of processing options; returns them normalized."""
    for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if not isinstance(options[name], (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {options[name]!r}")
    if not options["do_convert_rgb"]:
        raise ValueError("do_convert_rgb=False is not supported: the model needs RGB input, so images are converted")
    try:
        options["resample"] = int(PIL.Image.Resampling(options["resample"]))
    except (ValueError, TypeError) as err:
        raise ValueError(f"resample must be a PIL resampling filter, got {options['resample']!r}") from err
    factor = options["rescale_factor"]
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor):
        raise TypeError(f"rescale_factor must be a finite number, got {factor!r}")
    options["image_mean"] = _check_channel_values(options["image_mean"], "image_mean")
    options["image_std"] = _check_channel_values(options["image_std"], "image_std")
    if 0.0 in options["image_std"]:
        raise ValueError(f"image_std must not contain 0, got {options['image_std']}")
    options["min_pixels"], options["max_pixels"] = _check_pixel_bounds(
        options["min_pixels"], options["max_pixels"], _check_positive_int
    )
    for name in ("patch_size", "temporal_patch_size", "merge_size"):
        options[name] = _check_positive_int(options[name], name)
    return options


class QwenVLImageProcessor(BaseImageProcessor):
    r"""Turns images and videos into the patch rows that the Qwen2-VL / Qwen2.5-VL vision tower reads.

    Each image is loaded with ``load_image`` (any PIL mode, arrays, tensors, paths, URIs), resized with PIL
    bicubic to ``smart_resize(h, w, patch_size * merge_size, min_pixels, max_pixels)``, scaled to [0, 1],
    normalized with ``image_mean`` / ``image_std`` and cut into ``patch_size`` patches. An image is its own frame
    repeated ``temporal_patch_size`` times; a video with a frame count that is not a multiple of it repeats its
    last frame.

    Outputs (``BatchFeature``): ``pixel_values`` float32 [sum(t*h*w), 3*temporal_patch_size*patch_size**2] and
    ``image_grid_thw`` int64 [n_images, 3]; ``pixel_values_videos`` and ``video_grid_thw`` likewise. Rows are in
    merge order: within each (t, h/merge, w/merge) block, the merge x merge neighbouring patches are contiguous.

    Values are bit-identical to transformers' ``Qwen2VLImageProcessorPil`` for the same min/max pixels. The
    defaults follow the official ``preprocessor_config.json`` (max_pixels 12845056; transformers' own default is
    1003520). ``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}`` is accepted as an alias; where
    both are given, min_pixels / max_pixels win, as in transformers (hub configs often have an edited max_pixels
    beside a stale size).
    """

    # Image outputs only: the video outputs are named by `QwenVLVideoView` (processing_qwenvl.py), so that an engine
    # can tell which outputs belong to images and which to videos (as transformers' separate video processors do).
    model_input_names = ["pixel_values", "image_grid_thw"]
    valid_kwargs = QwenVLImageProcessorKwargs

    def __init__(
        self,
        do_resize: bool = True,
        resample: int = PIL.Image.Resampling.BICUBIC,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb: bool = True,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        size: Optional[dict] = None,
        patch_size: int = DEFAULT_PATCH_SIZE,
        temporal_patch_size: int = 2,
        merge_size: int = DEFAULT_MERGE_SIZE,
        **kwargs,
    ):
        unknown = set(kwargs) - _IGNORED_CONFIG_KEYS
        if unknown:
            raise TypeError(f"QwenVLImageProcessor got unexpected arguments {sorted(unknown)}")
        super().__init__()
        min_pixels, max_pixels = _pixels_from_size(size, min_pixels, max_pixels)
        options = _checked_options(
            dict(
                do_resize=do_resize,
                resample=resample,
                do_rescale=do_rescale,
                rescale_factor=rescale_factor,
                do_normalize=do_normalize,
                image_mean=image_mean,
                image_std=image_std,
                do_convert_rgb=do_convert_rgb,
                min_pixels=DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels,
                max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
                patch_size=patch_size,
                temporal_patch_size=temporal_patch_size,
                merge_size=merge_size,
            )
        )
        for name, value in options.items():
            setattr(self, name, value)

    @property
    def size(self) -> dict:
        """transformers-5 spelling of the pixel bounds; min_pixels and max_pixels are the stored values."""
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    @size.setter
    def size(self, value: dict):
        low, high = _pixels_from_size(value, None, None)
        self.min_pixels = self.min_pixels if low is None else low
        self.max_pixels = self.max_pixels if high is None else high

    def to_dict(self) -> dict:
        config = super().to_dict()
        config["size"] = self.size
        return config

    # -- calls --------------------------------------------------------------------------------------------------

    def __call__(self, images=None, videos=None, **kwargs) -> BatchFeature:
        """Same as ``preprocess``."""
        return self.preprocess(images, videos, **kwargs)

    def preprocess(
        self,
        images=None,
        videos=None,
        *,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        resized_height: Optional[int] = None,
        resized_width: Optional[int] = None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        """Patch rows and grids for ``images`` and/or ``videos``.

        images: one image (anything ``load_image`` takes) or a list of them (nested lists are flattened; a 4-D
            array or tensor is a batch).
        videos: one video or a list of them; a video is a list of frames or a 4-D array / tensor (T, H, W, C) or
            (T, C, H, W) of frames already sampled (see ``load_video``).
        min_pixels, max_pixels: override the pixel bounds for this call (a processor calls once per item when
            items differ).
        resized_height, resized_width: resize every item to ``smart_resize(resized_height, resized_width)`` (as
            qwen-vl-utils does, with its default bounds; min/max pixels are then not used).
        return_tensors: None (numpy), "np" or "pt".
        kwargs: overrides of the other constructor options (do_resize, resample, do_rescale, rescale_factor,
            do_normalize, image_mean, image_std, do_convert_rgb, size, patch_size, temporal_patch_size,
            merge_size).
        """
        if images is None and videos is None:
            raise ValueError("pass images, videos or both")
        options = self._call_options(min_pixels, max_pixels, kwargs)
        target = self._target_size(options, resized_height, resized_width)
        table = _value_table(
            options["do_rescale"],
            options["rescale_factor"],
            options["do_normalize"],
            options["image_mean"],
            options["image_std"],
        )
        data = {}
        if images is not None:
            images = image_list(images)
            if not images:
                raise ValueError("images is an empty list")
            clips = [[load_image(image)] for image in images]
            data["pixel_values"], data["image_grid_thw"] = self._encode(clips, options, target, table)
        if videos is not None:
            videos = video_list(videos)
            if not videos:
                raise ValueError("the video is empty: no frames or videos were given")
            clips = [[load_image(frame) for frame in frames] for frames in videos]
            data["pixel_values_videos"], data["video_grid_thw"] = self._encode(clips, options, target, table)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: Optional[dict] = None) -> int:
        """Patch rows (before merging) of a ``height`` x ``width`` image; vLLM asks this without an image."""
        images_kwargs = images_kwargs or {}
        patch_size = images_kwargs.get("patch_size", self.patch_size)
        new_height, new_width = smart_resize(
            height,
            width,
            patch_size * images_kwargs.get("merge_size", self.merge_size),
            images_kwargs.get("min_pixels", self.min_pixels),
            images_kwargs.get("max_pixels", self.max_pixels),
        )
        return (new_height // patch_size) * (new_width // patch_size)

    # -- steps --------------------------------------------------------------------------------------------------

    def _call_options(self, min_pixels, max_pixels, overrides: dict) -> dict:
        unknown = set(overrides) - set(_CALL_OPTIONS) - {"size"}
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        min_pixels, max_pixels = _pixels_from_size(overrides.pop("size", None), min_pixels, max_pixels)
        options = {
            name: getattr(self, name) if overrides.get(name) is None else overrides[name] for name in _CALL_OPTIONS
        }
        options["min_pixels"] = self.min_pixels if min_pixels is None else min_pixels
        options["max_pixels"] = self.max_pixels if max_pixels is None else max_pixels
        return _checked_options(options)

    @staticmethod
    def _target_size(options: dict, resized_height, resized_width):
        """Fixed (height, width) for every item when resized_* are given, else None (each item's smart_resize)."""
        _check_resized_size(resized_height, resized_width)
        if resized_height is None:
            return None
        return smart_resize(resized_height, resized_width, options["patch_size"] * options["merge_size"])

    @staticmethod
    def _resized_pixels(frames: list, options: dict, target) -> np.ndarray:
        """RGB frames of one image or video -> uint8 [T, H, W, 3], resized, T padded to whole temporal patches."""
        factor = options["patch_size"] * options["merge_size"]
        tp = options["temporal_patch_size"]
        height, width = _frame_size(frames)
        if options["do_resize"]:
            height, width = target or smart_resize(height, width, factor, options["min_pixels"], options["max_pixels"])
            frames = [frame.resize((width, height), options["resample"]) for frame in frames]
        elif height % factor or width % factor:
            raise ValueError(
                f"with do_resize=False every image must have sides divisible by {factor} "
                f"(patch_size * merge_size) to fill a whole patch grid, got {height}x{width}"
            )
        if len(frames) == 1:
            return np.asarray(frames[0])[None]  # a still image: no padding, and no copy by np.stack
        frames = frames + frames[-1:] * (-len(frames) % tp)
        return np.stack([np.asarray(frame) for frame in frames])

    def _encode(self, clips: list, options: dict, target, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lists of RGB frames (one per image, several per video) -> (rows [N, D], grids [n, 3] int64)."""
        p, tp = options["patch_size"], options["temporal_patch_size"]
        pixels = [self._resized_pixels(frames, options, target) for frames in clips]
        grids = np.array([_grid_thw(clip, p, tp) for clip in pixels], dtype=np.int64)
        # one output array, filled in place: no concatenation copy
        out = np.empty((int(grids.prod(axis=1).sum()), 3 * tp * p * p), dtype=np.float32)
        start = 0
        for clip, (grid_t, grid_h, grid_w) in zip(pixels, grids):
            stop = start + grid_t * grid_h * grid_w
            _patchify(clip, table, p, options["merge_size"], tp, out[start:stop])
            start = stop
        return out, grids


# save_pretrained then names this class under AutoImageProcessor in `auto_map` and copies this file, so a saved folder
# loads anywhere with AutoImageProcessor.from_pretrained(folder, trust_remote_code=True).
QwenVLImageProcessor.register_for_auto_class()
