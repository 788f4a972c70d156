"""Image and video preprocessing for Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

Data flow, in the order of this file:

1. ``smart_resize`` picks the size an image is resized to: both sides multiples of ``patch_size * merge_size`` (28
   for Qwen2/2.5: patch 14 x merge 2; 32 for Qwen3-VL: patch 16 x merge 2), the pixel count inside
   ``[min_pixels, max_pixels]``, the aspect ratio kept as well as possible.
2. ``load_image`` turns anything that names or holds a picture into an RGB ``PIL.Image``; http(s) URLs are fetched
   under a ``FetchPolicy``.
3. ``smart_nframes``, ``sample_frame_indices`` and ``load_video`` pick, decode and resize video frames the way
   qwen-vl-utils does (same frame indices, same sampled fps, same sizes).
4. ``QwenVLImageProcessor`` resizes, rescales, normalizes and cuts images and videos into patch rows:
   ``pixel_values`` [sum(t*h*w), 3*2*p*p] (p = 14, or 16 for Qwen3-VL) with ``image_grid_thw`` [n, 3], and the
   same for videos.

The pixel values are bit-identical to transformers' ``Qwen2VLImageProcessorPil`` (PIL bicubic resize, float64
rescale rounded to float32, float32 normalize). The work is ordered for speed: the patch layout is built on the
uint8 pixels, and rescale + normalize become one lookup in a 256-entry table per channel.

Resource limits (a request names its media, so it must not be able to ask for unbounded work):

- Remote fetching: ``FetchPolicy`` (module default ``FETCH_POLICY``): a total deadline, a byte cap, same-host
  redirects only. The environment variable ``QWENVL_REMOTE_MEDIA=0`` turns fetching off for servers.
- Per-item options (``min_pixels``, ``max_pixels``, ``resized_height`` / ``resized_width``, ``total_pixels``) are
  clamped to the processor's ``max_pixels`` for images and to the video bounds (``VIDEO_MAX_PIXELS`` per frame,
  ``VIDEO_TOTAL_PIXELS`` for a whole video) unless ``allow_larger_items`` is set.
- Decoding holds at most one picture or video frame at full size: pictures are decoded or reduced straight to
  little more than their target size, video frames are resized as they are decoded. Frames larger than PIL lets
  a picture be (``PIL.Image.MAX_IMAGE_PIXELS``), more than ``MAX_FRAMES`` frames, and frame rates under
  ``MIN_FPS`` are refused.
"""

import base64
import binascii
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import math
import numbers
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Optional, Union

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
# the MODEL_SEQ_LEN environment variable; here it is a constant, pass total_pixels to change it). The budget counts
# pixels of frame pairs (one temporal patch): the frames themselves may hold FRAME_FACTOR times as many.
VIDEO_TOTAL_PIXELS = 128000 * IMAGE_FACTOR * IMAGE_FACTOR * 0.9
# The constants above are for the side multiple 28; `video_pixel_bounds` scales them to another one.
FRAME_FACTOR = 2  # sampled frame counts are even, so frames pair up into temporal patches
DEFAULT_FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 768

# The slowest frame rate accepted: one frame per hour. The rate sets each temporal patch's duration
# (temporal_patch_size / fps seconds), which the model turns into time positions. At this rate MAX_FRAMES frames
# span 384 patches of 2 hours, i.e. time positions up to 383 * 7200 s * 2 (Qwen2.5-VL's tokens_per_second) = 5.5
# million: still exact in float32 (below 2**24 = 16.8 million), where fps=1e-30 would give 1e33. And a clip sampled
# more sparsely than once an hour is no longer a video in the sense the model was trained on (2 fps).
MIN_FPS = 1 / 3600

# Error messages show at most about this many characters of an input (a data URI or a path can be megabytes).
ECHO_CHARS = 100


# ---------------------------------------------------------------------------------------------------------------
# 1. Target size
# ---------------------------------------------------------------------------------------------------------------


def _clip_text(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` cut to about ``limit`` characters, keeping its start and end (where a URL or path says the most)."""
    if len(text) <= limit:
        return text
    return f"{text[: limit * 2 // 3]}...{text[-(limit // 4):]} ({len(text)} characters)"


def _short(value) -> str:
    """``repr(value)`` cut to about ``ECHO_CHARS`` characters: how every error message echoes an input."""
    return _clip_text(repr(value))


def _cause(error: BaseException) -> str:
    """The text of an underlying error, cut like an echoed input but longer: it says what went wrong, and may quote
    the input (FFmpeg repeats the path) or a server's words."""
    return _clip_text(str(error), 3 * ECHO_CHARS)


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_short(value)} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def _check_positive_number(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_short(value)} ({type(value).__name__})")
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
    """Frames per second as a float: ``DEFAULT_FPS`` for None, else a finite number of at least ``MIN_FPS`` (one
    frame per hour; see there why), else ValueError.

    The one check of ``fps``, for ``smart_nframes``, ``load_video`` and the processor alike.
    """
    if fps is None:
        return DEFAULT_FPS
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not MIN_FPS <= fps < math.inf:
        raise ValueError(
            f"fps must be a positive number of at least MIN_FPS = 1/3600 (one frame per hour), got {_short(fps)}"
        )
    return float(fps)


def _check_frame_rate(fps, nframes) -> tuple[Optional[float], Optional[int]]:
    """``(fps, nframes)`` of a request for frames: ``nframes`` alone, or ``fps`` (default ``DEFAULT_FPS``)."""
    if fps is not None and nframes is not None:
        raise ValueError(f"give either fps ({_short(fps)}) or nframes ({_short(nframes)}), not both")
    if nframes is not None:
        return None, _check_positive_int(nframes, "nframes")
    return check_fps(fps), None


def _check_seconds(value, name) -> Optional[float]:
    """A time in the clip (video_start, video_end): None or a number that is not NaN (out-of-range times are
    clamped to the clip, as in qwen-vl-utils)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise TypeError(f"{name} must be a number of seconds, got {_short(value)} ({type(value).__name__})")
    return float(value)


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

# Setting this environment variable to 0 / off / false / no refuses every http(s) URL, whatever the policy says:
# the switch for a server, where a request must not make it fetch what the request names.
REMOTE_MEDIA_ENV = "QWENVL_REMOTE_MEDIA"
_REDIRECT_RULES = ("same-host", "any", "none")


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """How http(s) URLs of pictures and videos are fetched.

    enabled: False refuses every http(s) URL without connecting. The environment variable ``QWENVL_REMOTE_MEDIA=0``
        (or off / false / no) does the same whatever the policy says: the switch for servers.
    deadline_s: the whole fetch (name lookup, connection, redirects, body) must finish within this many seconds.
        A per-read socket timeout cannot bound it: a server that sends one byte every few seconds never trips it.
    max_bytes: the largest body accepted; a longer one is refused as soon as it passes the cap (or at once when its
        Content-Length says so), so a server that never stops sending cannot fill the memory.
    redirects: "same-host" (default: only to the same host name, over http(s), never from https down to http),
        "any" (any http(s) URL) or "none".
    max_redirects: how many redirects one fetch may follow.

    The module default is ``FETCH_POLICY``; replace it (``image_processing_qwenvl.FETCH_POLICY = FetchPolicy(...)``)
    or pass ``fetch_policy=`` to ``load_image`` / ``load_video``. A refused or failed fetch is a ValueError that
    names the URL (shortened).
    """

    enabled: bool = True
    deadline_s: float = 20.0
    max_bytes: int = 64 * 2**20
    redirects: str = "same-host"
    max_redirects: int = 5

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise TypeError(f"FetchPolicy.enabled must be True or False, got {_short(self.enabled)}")
        _check_positive_number(self.deadline_s, "FetchPolicy.deadline_s")
        _check_positive_int(self.max_bytes, "FetchPolicy.max_bytes")
        if self.redirects not in _REDIRECT_RULES:
            raise ValueError(f"FetchPolicy.redirects must be one of {_REDIRECT_RULES}, got {_short(self.redirects)}")
        if isinstance(self.max_redirects, bool) or not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise ValueError(
                f"FetchPolicy.max_redirects must be a non-negative integer, got {_short(self.max_redirects)}"
            )


FETCH_POLICY = FetchPolicy()


def _remote_fetching_allowed(policy: FetchPolicy) -> bool:
    switch = os.environ.get(REMOTE_MEDIA_ENV, "").strip().lower()
    return policy.enabled and switch not in ("0", "off", "false", "no")


def _redirect_refusal(origin: urllib.parse.SplitResult, target: str, policy: FetchPolicy, count: int):
    """Why ``policy`` refuses the ``count``-th redirect of a fetch of ``origin`` to ``target``; None if it allows it."""
    if policy.redirects == "none":
        return "FetchPolicy.redirects is 'none'"
    if count > policy.max_redirects:
        return f"more than FetchPolicy.max_redirects ({policy.max_redirects}) redirects"
    parts = urllib.parse.urlsplit(target)
    if parts.scheme not in ("http", "https"):
        return "only http(s) URLs are fetched"
    if policy.redirects == "same-host":
        if (parts.hostname or "").lower() != (origin.hostname or "").lower():
            return "it leads to another host (FetchPolicy.redirects is 'same-host')"
        if origin.scheme == "https" and parts.scheme == "http":
            return "it leads from https down to http"
    return None


class _RedirectGuard(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, with each redirect checked against a FetchPolicy first."""

    def __init__(self, url: str, policy: FetchPolicy):
        self.origin = urllib.parse.urlsplit(url)
        self.policy = policy
        self.count = 0

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.count += 1
        refusal = _redirect_refusal(self.origin, newurl, self.policy, self.count)
        if refusal is not None:
            fp.close()
            raise ValueError(f"the redirect to {_short(newurl)} was refused: {refusal}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, policy: FetchPolicy, cancelled: threading.Event) -> bytes:
    """The body of ``url``, read chunk by chunk up to ``policy.max_bytes``; stops early once ``cancelled`` is set."""
    opener = urllib.request.build_opener(_RedirectGuard(url, policy))
    # The socket timeout bounds each wait of this worker, so that it ends soon after the caller gave up on it.
    with opener.open(url, timeout=policy.deadline_s) as response:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > policy.max_bytes:
            raise ValueError(f"its Content-Length {declared} is over FetchPolicy.max_bytes ({policy.max_bytes})")
        body = bytearray()
        while not cancelled.is_set():
            chunk = response.read1(1 << 16)  # at most one socket read, so the cancel flag is seen between reads
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > policy.max_bytes:
                raise ValueError(f"the body passed FetchPolicy.max_bytes ({policy.max_bytes} bytes)")
    return b""  # cancelled: nobody reads this


def _fetch_url(url: str, policy: Optional[FetchPolicy] = None) -> bytes:
    """The body of an http(s) URL under ``policy`` (default ``FETCH_POLICY``); ValueError naming the URL if not.

    The download runs in a worker thread and the caller waits at most ``deadline_s`` for it: only a thread can
    bound the whole fetch, name lookup included, which no socket timeout covers. A worker left behind stops at its
    next read (or its socket timeout) and holds at most ``max_bytes``.
    """
    policy = FETCH_POLICY if policy is None else policy
    if not _remote_fetching_allowed(policy):
        raise ValueError(
            f"remote fetching is turned off (FetchPolicy.enabled / {REMOTE_MEDIA_ENV}), so {_short(url)} was not "
            "fetched; pass the picture or video itself"
        )
    outcome, cancelled = {}, threading.Event()

    def work():
        try:
            outcome["body"] = _download(url, policy, cancelled)
        except Exception as err:  # handed to the caller, which raises it as a ValueError
            outcome["error"] = err

    worker = threading.Thread(target=work, name="qwenvl-fetch", daemon=True)
    worker.start()
    worker.join(policy.deadline_s)
    if worker.is_alive():
        cancelled.set()
        raise ValueError(
            f"could not fetch {_short(url)}: not done within FetchPolicy.deadline_s ({policy.deadline_s} s)"
        )
    error = outcome.get("error")
    if error is not None:
        # urllib reports unreachable hosts, refused connections and HTTP errors as URLError / OSError
        hint = " (is the network reachable?)" if isinstance(error, (urllib.error.URLError, OSError)) else ""
        raise ValueError(f"could not fetch {_short(url)}{hint}: {_cause(error)}") from error
    return outcome["body"]


def _decode_data_uri(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError(f"only base64 data URIs are supported ('data:image/...;base64,...'), got {_short(uri)}")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise ValueError(f"data URI {_short(uri)} holds invalid base64: {err}") from err


def _encoded_source(image, fetch_policy) -> tuple[Union[str, bytes], str]:
    """``(path or encoded bytes, name for messages)`` of a picture given as a path, URL, data URI or bytes."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), "from bytes"
    text = os.fspath(image)
    if text.startswith(("http://", "https://")):
        return _fetch_url(text, fetch_policy), _short(text)
    if text.startswith("data:"):
        if not text.startswith("data:image/"):
            raise ValueError(f"data URI does not hold an image: {_short(text)}")
        return _decode_data_uri(text), "from data URI"
    path = text[len("file://") :] if text.startswith("file://") else text
    if not os.path.isfile(path):
        raise ValueError(f"image file not found: {_short(path)}")
    return path, _short(path)


_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """``image`` turned as its EXIF orientation tag says it is displayed (the tag is then cleared, so that loading
    the result again does not turn it twice)."""
    if image.getexif().get(0x0112, 1) != 1:  # 0x0112 is the EXIF orientation tag; 1 means upright
        return PIL.ImageOps.exif_transpose(image)
    return image


# Pictures are reduced before the resize only while both sides stay at least this many times the target's longer
# side, so that the final bicubic resize still does nearly all of the filtering. 2 is PIL's own choice for
# thumbnails (its reducing_gap). Against a resize of the full picture, a 4000x3000 one brought to 504x364 differs by
# 0.03 levels on average when smooth, 0.3 when noisy, at most 2 levels (4 where JPEG's DCT scaling decodes it);
# pictures less than twice their target's size are not touched, so results within the bounds stay identical.
SHRINK_MARGIN = 2
# Modes Image.reduce averages correctly (a palette image's indices cannot be averaged)
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA")


def _shrink_factor(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The integer factor a picture of ``size`` may be shrunk by before its resize to ``target``.

    Sides are compared shortest to longest, so the factor holds whichever way the EXIF tag turns the picture.
    """
    return max(1, min(size) // (SHRINK_MARGIN * max(target)))


@contextlib.contextmanager
def _decoding(name: str, size: Optional[tuple[int, int]] = None):
    """Turn what can go wrong while decoding a picture into the ValueError the contract promises, naming it."""
    try:
        yield
    except PIL.Image.DecompressionBombError as err:  # not an OSError: PIL's limit for pictures (MAX_IMAGE_PIXELS)
        raise ValueError(f"image {name} is too large to decode: {err}") from err
    except MemoryError as err:
        pixels = "" if size is None else f" ({size[1]}x{size[0]} pixels)"
        raise ValueError(f"not enough memory to decode image {name}{pixels}") from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports corrupt and truncated files with these
        raise ValueError(f"cannot read image {name}: {err}") from err


def _decode_picture(source: Union[str, bytes], name: str, size_for=None) -> tuple[PIL.Image.Image, tuple[int, int]]:
    """Decode a path or encoded bytes now, so a broken file fails here under its own name: ``(image turned upright
    by its EXIF tag, (height, width) of the full picture as displayed)``. The picture's mode is kept.

    With ``size_for`` (displayed height, width -> target height, width), a picture far larger than its target is
    decoded smaller (JPEG: DCT scaling by ``draft``) or reduced right after decoding, before the rotation and the
    RGB conversion would copy it at full size.
    """
    with _decoding(name):
        image = PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    with _decoding(name, image.size[::-1]):
        # PIL reads the tag with the header (a PNG whose EXIF follows its pixels is decoded for it)
        orientation = image.getexif().get(0x0112, 1)
    turned = orientation in _TRANSPOSING_ORIENTATIONS
    displayed = (image.width, image.height) if turned else (image.height, image.width)
    target = None if size_for is None else size_for(*displayed)  # outside _decoding: its errors name their cause
    with _decoding(name, displayed):
        if target is not None and _shrink_factor(image.size, target) > 1:
            factor = _shrink_factor(image.size, target)
            image.draft(image.mode, (image.width // factor, image.height // factor))  # a no-op except for JPEG
        image.load()
        if target is not None and _shrink_factor(image.size, target) > 1 and image.mode in _REDUCIBLE_MODES:
            image = image.reduce(_shrink_factor(image.size, target))  # the copy keeps the EXIF tag
        image = _upright(image)
    return image, displayed


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


def _to_rgb(image: PIL.Image.Image, drop_alpha: bool = False) -> PIL.Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited on white (as transformers does), or with
    ``drop_alpha`` keep their colour (PIL's own conversion, as the original Qwen-VL does)."""
    try:
        if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
            # PIL's own conversion clips these to 0-255 instead of scaling them
            values = np.asarray(image)
            if image.mode == "I":
                if values.min() < 0 or values.max() > 65535:
                    raise ValueError("mode 'I' images are taken as 16-bit, got values outside [0, 65535]")
                values = values.astype(np.uint16)
            return PIL.Image.fromarray(_to_uint8(values), mode="L").convert("RGB")
        if not drop_alpha and ("A" in image.getbands() or "transparency" in image.info):
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot convert a mode {image.mode!r} image to RGB: {err}") from err


def _load_picture(
    image, size_for=None, resample=PIL.Image.Resampling.BICUBIC, fetch_policy=None, drop_alpha=False
) -> PIL.Image.Image:
    """``load_image``; with ``size_for`` (displayed height, width -> target height, width) the picture is also
    resized to its target, and an encoded picture far larger than that is decoded smaller (see ``_decode_picture``)
    so that it is never copied at full size."""
    if isinstance(image, PIL.Image.Image):
        rgb = _to_rgb(_upright(image), drop_alpha)
        size = (rgb.height, rgb.width)
    elif isinstance(image, (str, os.PathLike, bytes, bytearray)):
        source, name = _encoded_source(image, fetch_policy)
        # The target comes from the full size, so a picture gets the same size whether or not it was reduced.
        decoded, size = _decode_picture(source, name, size_for)
        try:
            rgb = _to_rgb(decoded, drop_alpha)
        except MemoryError as err:
            raise ValueError(f"not enough memory to convert image {name} ({size[1]}x{size[0]} pixels)") from err
    elif _is_array(image):
        rgb = _to_rgb(_image_from_array(image, channels_first=isinstance(image, torch.Tensor)), drop_alpha)
        size = (rgb.height, rgb.width)
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}: pass a PIL image, numpy array, torch tensor, path, "
            "URL, data URI or bytes"
        )
    if size_for is None:
        return rgb
    height, width = size_for(*size)
    return rgb if rgb.size == (width, height) else rgb.resize((width, height), resample)


def load_image(image, *, fetch_policy: Optional[FetchPolicy] = None) -> PIL.Image.Image:
    """Return ``image`` as an RGB ``PIL.Image``.

    Accepts:
    - a ``PIL.Image`` of any mode: transparent modes (RGBA, LA, P or L with a transparency key, ...) are composited
      on white; 16-bit modes (I;16, I) are scaled to 8 bits; F (float) must hold values in [0, 1];
    - a numpy array or torch tensor, (H, W), (H, W, C) or (C, H, W) with C in 1-4, uint8 / uint16 (16-bit) /
      float in [0, 1] / bool / other integers holding 0-255. When both layouts fit, numpy arrays are read as
      (H, W, C) and tensors as (C, H, W);
    - a file path (``str`` or ``os.PathLike``), a ``file://`` path, a ``data:image/...;base64,...`` URI, an
      ``http(s)://`` URL, or the encoded bytes of a file. URLs are fetched under ``fetch_policy`` (default the
      module's ``FETCH_POLICY``: 20 s in all, 64 MiB, same-host redirects; ``QWENVL_REMOTE_MEDIA=0`` in the
      environment turns fetching off).

    The EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``), so a phone photo comes out the way it
    is displayed. The transformers and qwen-vl-utils preprocessors ignore the tag and see such photos sideways.

    Raises ValueError for missing, corrupt, truncated or too large files (over PIL's ``MAX_IMAGE_PIXELS`` limit or
    the memory), refused or failed fetches, NaN pixels and out-of-range values, TypeError for inputs of any other
    type. Messages show at most about 100 characters of an input.
    """
    return _load_picture(image, fetch_policy=fetch_policy)


# ---------------------------------------------------------------------------------------------------------------
# 3. Videos
# ---------------------------------------------------------------------------------------------------------------


def _check_frame_count_limits(min_frames, max_frames) -> tuple[int, int]:
    return _check_positive_int(min_frames, "min_frames"), _check_positive_int(max_frames, "max_frames")


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
    total_frames = _check_positive_int(total_frames, "total_frames")
    video_fps = _check_positive_number(video_fps, "video_fps")
    min_frames, max_frames = _check_frame_count_limits(min_frames, max_frames)
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
    if isinstance(total_frames, bool) or not isinstance(total_frames, numbers.Integral):
        raise TypeError(f"total_frames must be an integer, got {_short(total_frames)}")
    if total_frames <= 0:
        raise ValueError("the video is empty: it has no frames")
    if isinstance(video_fps, bool) or not isinstance(video_fps, numbers.Real):
        raise TypeError(f"the video frame rate must be a number, got {_short(video_fps)}")
    if not video_fps > 0:
        raise ValueError(f"the video frame rate must be positive, got {video_fps}")
    video_start, video_end = _check_seconds(video_start, "video_start"), _check_seconds(video_end, "video_end")
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


def video_pixel_bounds(factor: int = IMAGE_FACTOR) -> tuple[int, int, float]:
    """qwen-vl-utils' video bounds for frames whose sides are multiples of ``factor`` (its ``image_patch_size * 2``):
    ``(min pixels of a frame, max pixels of a frame, pixels of a whole video counted per frame pair)``.

    They are token counts (128 and 768 merged tokens per frame, 90% of a 128k-token sequence per video), so they
    scale with ``factor**2``: 28 gives ``VIDEO_MIN_PIXELS``, ``VIDEO_MAX_PIXELS`` and ``VIDEO_TOTAL_PIXELS`` (read at
    each call, so that changing them applies), 32 (Qwen3-VL) 131072, 786432 and 117964800.0, the same numbers as
    qwen-vl-utils computes for ``image_patch_size=16`` (the scaling is exact: multiply first, then divide).
    """
    area, base = factor * factor, IMAGE_FACTOR * IMAGE_FACTOR
    return VIDEO_MIN_PIXELS * area // base, VIDEO_MAX_PIXELS * area // base, VIDEO_TOTAL_PIXELS * area / base


def _video_max_pixels(frame_count: int, min_pixels, max_pixels, total_pixels, factor: int = IMAGE_FACTOR) -> float:
    """Per-frame pixel cap: the total budget shared by frame pairs, within [1.05 * min_pixels, the frame maximum]
    (``video_pixel_bounds(factor)``).

    Kept a float, as in qwen-vl-utils: smart_resize's scale factor depends on its fractional part.
    """
    _, frame_max, video_total = video_pixel_bounds(factor)
    total_pixels = video_total if total_pixels is None else total_pixels
    cap = max(min(frame_max, total_pixels / frame_count * FRAME_FACTOR), int(min_pixels * 1.05))
    return cap if max_pixels is None else min(max_pixels, cap)


def video_frame_budget(frame_count: int, frames_per_patch: int = FRAME_FACTOR, factor: int = IMAGE_FACTOR) -> float:
    """The most pixels a frame may have when ``frame_count`` frames share the video budget: the video total of
    ``video_pixel_bounds(factor)`` (``VIDEO_TOTAL_PIXELS`` for 28) per temporal patch of ``frames_per_patch`` frames
    (the frames of a patch are one token's worth of pixels)."""
    return video_pixel_bounds(factor)[2] * frames_per_patch / frame_count


def _clamped_video_options(options: dict, factor: int = IMAGE_FACTOR) -> dict:
    """An item's pixel options held to the video bounds of ``video_pixel_bounds(factor)``: min_pixels and
    max_pixels at most the frame maximum (``VIDEO_MAX_PIXELS`` for 28), total_pixels at most the video total
    (``VIDEO_TOTAL_PIXELS``)."""
    clamped = dict(options)
    _, frame_max, video_total = video_pixel_bounds(factor)
    bounds = {"min_pixels": frame_max, "max_pixels": frame_max, "total_pixels": video_total}
    for name, bound in bounds.items():
        if clamped[name] is not None:
            clamped[name] = min(clamped[name], bound)
    return clamped


def _video_frame_size(
    height, width, frame_count, options: dict, allow_larger_items: bool, factor: int = IMAGE_FACTOR
) -> tuple[int, int]:
    """Size of the frames of a decoded video (``load_video``'s options), as qwen-vl-utils computes it, within the
    video bounds of ``video_pixel_bounds(factor)``.

    qwen-vl-utils gives each frame ``_video_max_pixels``; a request could lift that over the bounds through a large
    min_pixels (its 1.05 * min_pixels floor wins) or total_pixels, and resized_height / resized_width skip it
    altogether. Unless ``allow_larger_items``, a frame here holds at most the frame maximum (``VIDEO_MAX_PIXELS``
    for 28) and ``video_frame_budget(frame_count)``, and a resized size also keeps within the item's own
    total_pixels.
    """
    frame_min, frame_max, video_total = video_pixel_bounds(factor)
    bound = math.inf if allow_larger_items else min(frame_max, video_frame_budget(frame_count, factor=factor))
    if options["resized_height"] is not None:
        total = video_total if options["total_pixels"] is None else options["total_pixels"]
        cap = min(IMAGE_MAX_TOKENS * factor**2, total * FRAME_FACTOR / frame_count, bound)
        low = min(IMAGE_MIN_TOKENS * factor**2, cap)
        return smart_resize(options["resized_height"], options["resized_width"], factor, low, cap)
    low = frame_min if options["min_pixels"] is None else options["min_pixels"]
    cap = min(_video_max_pixels(frame_count, low, options["max_pixels"], options["total_pixels"], factor), bound)
    return smart_resize(height, width, factor, min(low, cap), cap)


def _check_frame_pixels(height: int, width: int, name: str) -> None:
    """Refuse a video frame larger than PIL lets a picture be (2 * ``PIL.Image.MAX_IMAGE_PIXELS``, read at each call
    so that raising or clearing it applies to both): one such frame alone holds over half a gigabyte."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > 2 * limit:
        raise ValueError(
            f"video {name} has frames of {width}x{height} = {width * height} pixels, more than the "
            f"{2 * limit} that PIL allows a picture (2 * PIL.Image.MAX_IMAGE_PIXELS)"
        )


def _check_sampled_frames(count: int, name: str, allow_larger_items: bool) -> None:
    if count > MAX_FRAMES and not allow_larger_items:
        raise ValueError(
            f"{count} frames of video {name} were asked for, more than MAX_FRAMES ({MAX_FRAMES}), the most the "
            "official models take (pass allow_larger_items=True to load_video to lift the limit)"
        )


def _import_av():
    try:
        import av
    except ImportError as err:
        raise ImportError("reading video files needs PyAV: pip install av") from err
    return av


def _video_source(video: str, fetch_policy) -> tuple[Union[str, io.BytesIO], str]:
    """``(what PyAV opens, name for messages)`` of a video file path, ``file://`` path or http(s) URL.

    A URL is fetched whole under the FetchPolicy (deadline, byte cap, redirects) and decoded from memory. Other URL
    schemes are refused: FFmpeg would open them (rtsp, udp, ftp, ...) with no deadline and no size cap.
    """
    if video.startswith(("http://", "https://")):
        return io.BytesIO(_fetch_url(video, fetch_policy)), _short(video)
    path = video[len("file://") :] if video.startswith("file://") else video
    if os.path.isfile(path):
        return path, _short(path)
    if "://" in path:
        raise ValueError(f"cannot read video {_short(video)}: only files and http(s) URLs are read")
    raise ValueError(f"video file not found: {_short(path)}")


# Kept frames are converted and resized by a few worker threads while the main thread decodes: PyAV's colour
# conversion and PIL's resize release the GIL, and on two cores this cuts a 768-frame load by about a third. At
# most two frames per worker wait for one, which bounds the full-size frames held at once.
_FRAME_WORKERS = max(1, min(4, os.cpu_count() or 1))


def _frame_pixels(frame, height: int, width: int) -> np.ndarray:
    """One decoded frame as uint8 [height, width, 3]: converted to RGB, then PIL bicubic as for pictures."""
    full = PIL.Image.fromarray(frame.to_ndarray(format="rgb24"))
    return np.asarray(full.resize((width, height), PIL.Image.Resampling.BICUBIC))


def _sampled_indices(container, stream, name: str, sampling: dict, allow_larger_items: bool):
    """``(indices, sampled fps, frame count of the header, frame rate of the header)`` of the frames to keep, from
    the header alone, with the frame count and the header's frame size checked before anything is decoded."""
    rate = stream.average_rate or stream.guessed_rate
    total = stream.frames  # the container's frame count, as decord and torchcodec read it
    if not total:  # some containers (Matroska) do not store it: count the packets, then rewind
        total = sum(1 for packet in container.demux(stream) if packet.size)
        container.seek(0)
    indices, sampled_fps = sample_frame_indices(total, float(rate or 0), **sampling)
    _check_sampled_frames(len(indices), name, allow_larger_items)
    if sampled_fps < MIN_FPS:
        raise ValueError(
            f"video {name} would be sampled at {sampled_fps:.3g} fps (its header gives {float(rate or 0):.3g}), "
            "under MIN_FPS = 1/3600 (one frame per hour)"
        )
    _check_frame_pixels(stream.codec_context.height, stream.codec_context.width, name)
    return indices, sampled_fps, total, float(rate)


def _decode_frames(source, name: str, sampling: dict, size_for, allow_larger_items: bool):
    """Decode the sampled frames of a video with PyAV: (uint8 [T, H, W, 3], sampled fps, time of each frame in
    seconds). A frame's time is its index over the clip's own frame rate (not the sampled one), as qwen-vl-utils'
    metadata and transformers' Qwen3-VL processor reckon it.

    Every kept frame is resized as soon as it is decoded, straight into the output, so memory holds the output and
    a few full-size frames. ``size_for(frame_count, height, width)`` gives the output size from the first kept
    frame.
    """
    av = _import_av()
    try:
        container = av.open(source)
    except (OSError, av.FFmpegError) as err:
        raise ValueError(f"cannot open video {name}: {_cause(err)}") from err
    with container, concurrent.futures.ThreadPoolExecutor(_FRAME_WORKERS) as pool:
        if not container.streams.video:
            raise ValueError(f"video {name} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        indices, sampled_fps, total, video_fps = _sampled_indices(container, stream, name, sampling, allow_larger_items)
        rows = {}  # frame position -> the output rows that show it
        for row, index in enumerate(indices):
            rows.setdefault(index, []).append(row)
        frames, pending, kept = None, collections.deque(), 0

        def store(position, frame):
            frames[rows[position]] = _frame_pixels(frame, *frames.shape[1:3])

        try:
            for position, frame in enumerate(container.decode(stream)):
                if position in rows:
                    if frames is None:
                        _check_frame_pixels(frame.height, frame.width, name)
                        height, width = size_for(len(indices), frame.height, frame.width)
                        frames = np.empty((len(indices), height, width, 3), np.uint8)
                    pending.append(pool.submit(store, position, frame))
                    kept += 1
                    if len(pending) > 2 * _FRAME_WORKERS:
                        pending.popleft().result()
                if position >= indices[-1]:
                    break
            for job in pending:
                job.result()  # raises what a worker raised
        except av.FFmpegError as err:
            raise ValueError(f"cannot decode video {name}: {_cause(err)}") from err
        except MemoryError as err:
            raise ValueError(f"not enough memory to decode {len(indices)} frames of video {name}") from err
    if kept < len(rows):
        raise ValueError(f"video {name} ended before frame {indices[-1]} although its header lists {total} frames")
    return frames, sampled_fps, [index / video_fps for index in indices]


def _load_clip(frames: list, size_for, length: int, resample=PIL.Image.Resampling.BICUBIC) -> np.ndarray:
    """The frames of a video given as pictures, loaded one at a time and each resized at once: uint8 [length, H, W,
    3], the last frame repeated up to ``length``.

    ``size_for(height, width)`` of the first frame gives the size; every frame must have the first one's size. Only
    one frame is held at full size at a time.
    """
    first = load_image(frames[0])
    size = (first.height, first.width)
    height, width = size_for(*size)

    def same_size(frame_height, frame_width):
        if (frame_height, frame_width) != size:
            raise ValueError(
                f"all frames of a video must have the same size, got {sorted({size, (frame_height, frame_width)})}"
            )
        return height, width

    out = np.empty((length, height, width, 3), np.uint8)
    for row, frame in enumerate(frames):
        out[row] = np.asarray(_load_picture(first if row == 0 else frame, same_size, resample))
    out[len(frames) :] = out[len(frames) - 1]
    return out


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
    *,
    allow_larger_items: bool = False,
    fetch_policy: Optional[FetchPolicy] = None,
    factor: int = IMAGE_FACTOR,
    return_frame_times: bool = False,
) -> tuple:
    """Read, sample and resize a video as qwen-vl-utils' ``fetch_video`` does: ``(frames uint8 [T, H, W, 3], fps)``,
    and with ``return_frame_times`` also the time of each frame in seconds (a list of T floats).

    ``video`` is a file path (or ``file://`` path) or an http(s) URL (fetched under ``fetch_policy``, see
    ``FetchPolicy``), decoded with PyAV, or a list of frames (anything ``load_image`` takes) / a 4-D array or
    tensor, taken as already sampled at ``fps`` (default 2.0). As in qwen-vl-utils 0.0.14, a frame list's size
    passes through a first rounding to multiples of 2 * factor (56; see below).

    For a file, ``smart_nframes`` frames (``fps`` default 2.0, or ``nframes``; not both) are taken between
    ``video_start`` and ``video_end`` seconds at the same indices as qwen-vl-utils, and the returned fps is the
    rate they sample the clip at; ``temporal_patch_size / fps`` is then each temporal patch's duration. A frame
    list is padded to an even length by repeating its last frame.

    Frames are resized to ``smart_resize`` of their size with per-frame bounds ``min_pixels`` (default
    128*28*28) and ``max_pixels`` (default 768*28*28, lowered so all frames fit ``total_pixels``), or to
    ``resized_height`` x ``resized_width`` rounded by ``smart_resize`` (and lowered, too, to fit ``total_pixels``);
    the sizes equal qwen-vl-utils'. The resize is PIL bicubic; qwen-vl-utils uses torchvision's antialiased bicubic
    on tensors, whose pixel values can differ by a few levels.

    ``factor`` is the side multiple, ``patch_size * merge_size`` of the model's processor: 28 (the default) for
    Qwen2-VL / Qwen2.5-VL, 32 for Qwen3-VL. The default bounds above are for 28; ``video_pixel_bounds(factor)``
    gives those of another factor (qwen-vl-utils' ``image_patch_size=16`` for 32).

    Frame times (Qwen3-VL writes them into the prompt): a frame of a file is at its index over the clip's own frame
    rate (the source fps, not the sampled one), so ``video_start`` shifts them; a frame of a list is at its position
    over ``fps``; a padding frame repeats the time of the frame it repeats.

    Limits: each frame is resized as it is decoded, so memory holds little more than the output. Unless
    ``allow_larger_items``, the options cannot take a frame over ``VIDEO_MAX_PIXELS`` or all frames over
    ``VIDEO_TOTAL_PIXELS`` (per frame pair), and a file gives at most ``MAX_FRAMES`` frames (``max_frames`` is
    clamped to it, an ``nframes`` above it is a ValueError).
    Always: frames over PIL's picture limit (2 * ``PIL.Image.MAX_IMAGE_PIXELS``) and an fps under ``MIN_FPS`` are
    refused with a ValueError.
    """
    _check_resized_size(resized_height, resized_width)
    fps, nframes = _check_frame_rate(fps, nframes)  # checked here too so that it fails before any decoding
    _check_pixel_bounds(min_pixels, max_pixels)
    if total_pixels is not None:
        _check_positive_number(total_pixels, "total_pixels")
    factor = _check_positive_int(factor, "factor")
    if resized_height is not None:
        smart_resize(resized_height, resized_width, factor)  # fails early on a bad size
    min_frames, max_frames = _check_frame_count_limits(min_frames, max_frames)
    for name, flag in (("allow_larger_items", allow_larger_items), ("return_frame_times", return_frame_times)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {_short(flag)}")
    if not allow_larger_items:
        max_frames = min(max_frames, MAX_FRAMES)
    options = dict(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        total_pixels=total_pixels,
        resized_height=resized_height,
        resized_width=resized_width,
    )
    if not allow_larger_items:
        options = _clamped_video_options(options, factor)
    min_pixels, max_pixels = options["min_pixels"], options["max_pixels"]

    if isinstance(video, (str, os.PathLike)):
        source, name = _video_source(os.fspath(video), fetch_policy)
        sampling = dict(
            fps=fps, nframes=nframes, video_start=video_start, video_end=video_end, min_frames=min_frames,
            max_frames=max_frames,
        )

        def size_for(frame_count, height, width):
            return _video_frame_size(height, width, frame_count, options, allow_larger_items, factor)

        frames, sampled_fps, frame_times = _decode_frames(source, name, sampling, size_for, allow_larger_items)
        return (frames, sampled_fps, frame_times) if return_frame_times else (frames, sampled_fps)

    if nframes is not None or video_start is not None or video_end is not None:
        raise ValueError("nframes, video_start and video_end apply to video files; a frame list is used whole")
    frame_list = _frames_of(video)
    length = len(frame_list) + (-len(frame_list) % FRAME_FACTOR)

    def size_for_list(height, width):
        # qwen-vl-utils (0.0.14) first resizes each frame as an image, then the stack as a video. Its first pass
        # rounds to multiples of 2 * factor (56 for 28), not factor (it hands the factor to fetch_image as the patch
        # size, which fetch_image doubles), with image pixel bounds. The size is computed the same way here, to
        # match it; the pixels are resized once, from the original frames.
        if resized_height is None:
            height, width = smart_resize(height, width, 2 * factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return _video_frame_size(height, width, length, options, allow_larger_items, factor)

    frames = _load_clip(frame_list, size_for_list, length)
    if not return_frame_times:
        return frames, fps
    return frames, fps, [min(row, len(frame_list) - 1) / fps for row in range(length)]


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
    in_token_limit: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    allow_larger_items: bool
    image_size: int
    drop_alpha: bool


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
    r"""Turns images and videos into the patch rows that the Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower reads.

    The family is in the settings: Qwen3-VL's official ``preprocessor_config.json`` gives ``patch_size`` 16 (side
    multiple 32, rows of 3*2*16*16 = 1536), ``size`` {"shortest_edge": 65536, "longest_edge": 16777216} and
    ``image_mean`` = ``image_std`` = 0.5; the video bounds follow the side multiple (``video_pixel_bounds``).

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

    Bounds: the processor's ``max_pixels`` is also the most a call (a chat item's options) can ask for: per-call
    ``min_pixels`` / ``max_pixels`` and ``resized_height`` x ``resized_width`` are clamped to it, and the frames of a
    video to ``video_frame_budget`` (``VIDEO_TOTAL_PIXELS`` per temporal patch, shared by all frames).
    ``allow_larger_items=True`` lifts these clamps (for trusted callers only). Pictures are loaded one at a time
    and resized at once; one far larger than its target is decoded smaller (see ``_decode_picture``), so a request
    never holds more than one picture at full size.
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
        allow_larger_items: bool = False,
        image_size: Optional[int] = None,
        drop_alpha: bool = False,
        in_token_limit: Optional[int] = None,
        **kwargs,
    ):
        unknown = set(kwargs) - _IGNORED_CONFIG_KEYS
        if unknown:
            raise TypeError(f"QwenVLImageProcessor got unexpected arguments {sorted(unknown)}")
        if not isinstance(allow_larger_items, bool):
            raise TypeError(f"allow_larger_items must be True or False, got {_short(allow_larger_items)}")
        super().__init__()
        min_pixels, max_pixels = _pixels_from_size(size, min_pixels, max_pixels)
        # Unset bounds are qwen-vl-utils' image defaults, 4 and 16384 merged tokens of the side multiple: 3136 and
        # 12845056 (the official Qwen2/2.5 values) for 28, 4096 and 16777216 for Qwen3-VL's 32.
        factor = _check_positive_int(patch_size, "patch_size") * _check_positive_int(merge_size, "merge_size")
        min_pixels = IMAGE_MIN_TOKENS * factor**2 if min_pixels is None else min_pixels
        max_pixels = IMAGE_MAX_TOKENS * factor**2 if max_pixels is None else max_pixels
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
                min_pixels=min_pixels,
                max_pixels=max_pixels,
                patch_size=patch_size,
                temporal_patch_size=temporal_patch_size,
                merge_size=merge_size,
            )
        )
        for name, value in options.items():
            setattr(self, name, value)
        self.allow_larger_items = allow_larger_items
        # Qwen-VL (2023): every picture resized to image_size x image_size (the aspect ratio is not kept), and
        # transparency dropped instead of composited, as the original preprocessing does.
        if image_size is not None and (_check_positive_int(image_size, "image_size") % self.patch_size):
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({self.patch_size})")
        if not isinstance(drop_alpha, bool):
            raise TypeError(f"drop_alpha must be True or False, got {_short(drop_alpha)}")
        self.image_size = image_size
        self.drop_alpha = drop_alpha
        # Kimi-VL (MoonViT): images only, sized by its own rule (`moonvit_size`), rows in raster order.
        self.in_token_limit = None if in_token_limit is None else _check_positive_int(in_token_limit, "in_token_limit")

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
            items differ); clamped to the processor's ``max_pixels`` unless ``allow_larger_items``.
        resized_height, resized_width: resize every item to ``smart_resize(resized_height, resized_width)`` (as
            qwen-vl-utils does, with its default bounds; min/max pixels are then not used), at most the
            processor's ``max_pixels`` for an image and ``video_frame_budget`` for a video frame unless
            ``allow_larger_items``.
        return_tensors: None (numpy), "np" or "pt".
        kwargs: overrides of the other constructor options (do_resize, resample, do_rescale, rescale_factor,
            do_normalize, image_mean, image_std, do_convert_rgb, size, patch_size, temporal_patch_size,
            merge_size).
        """
        if images is None and videos is None:
            raise ValueError("pass images, videos or both")
        options = self._call_options(min_pixels, max_pixels, kwargs)
        _check_resized_size(resized_height, resized_width)
        resized = None
        if resized_height is not None:
            resized = (resized_height, resized_width)
            smart_resize(resized_height, resized_width, options["patch_size"] * options["merge_size"])  # fails early
        table = _value_table(
            options["do_rescale"],
            options["rescale_factor"],
            options["do_normalize"],
            options["image_mean"],
            options["image_std"],
        )
        data = {}
        if self.in_token_limit is not None:
            return BatchFeature(data=self._moonvit_encode(images, videos, options, table), tensor_type=return_tensors)
        if images is not None:
            images = image_list(images)
            if not images:
                raise ValueError("images is an empty list")
            # one picture at a time, each resized as it is loaded: only one is ever held at full size
            pixels = [self._image_pixels(image, options, resized) for image in images]
            data["pixel_values"], data["image_grid_thw"] = self._encode(pixels, options, table)
        if videos is not None:
            videos = video_list(videos)
            if not videos:
                raise ValueError("the video is empty: no frames or videos were given")
            pixels = [self._video_pixels(frames, options, resized) for frames in videos]
            data["pixel_values_videos"], data["video_grid_thw"] = self._encode(pixels, options, table)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: Optional[dict] = None) -> int:
        """Patch rows (before merging) of a ``height`` x ``width`` image; vLLM asks this without an image.

        ``images_kwargs`` may hold min_pixels, max_pixels, patch_size and merge_size, clamped as in a call.
        """
        images_kwargs = images_kwargs or {}
        overrides = {name: images_kwargs[name] for name in ("patch_size", "merge_size") if name in images_kwargs}
        options = self._call_options(images_kwargs.get("min_pixels"), images_kwargs.get("max_pixels"), overrides)
        if self.in_token_limit is not None:  # Kimi-VL: its own sizing, then padding to whole merge blocks
            factor = options["patch_size"] * options["merge_size"]
            new_height, new_width = moonvit_size(height, width, options["patch_size"], factor, self.in_token_limit)
            return (-(-new_height // factor) * factor // options["patch_size"]) * (
                -(-new_width // factor) * factor // options["patch_size"]
            )
        new_height, new_width = self._image_size_for(options, None)(height, width)
        return (new_height // options["patch_size"]) * (new_width // options["patch_size"])

    def get_number_of_video_patches(self, num_frames: int, height: int, width: int) -> int:
        """Patch rows (before merging) of a video of ``num_frames`` frames of ``height`` x ``width``, handed to a
        call with ``resized_height=height, resized_width=width`` (as the processor hands sampled frames over: their
        sides rounded to multiples of patch_size * merge_size, within ``video_frame_budget``)."""
        options = self._call_options(None, None, {})
        num_frames = _check_positive_int(num_frames, "num_frames")
        length = num_frames + (-num_frames % options["temporal_patch_size"])
        new_height, new_width = self._video_frame_size(length, height, width, options, (height, width))
        patch = options["patch_size"]
        return length // options["temporal_patch_size"] * (new_height // patch) * (new_width // patch)

    # -- steps --------------------------------------------------------------------------------------------------

    def _call_options(self, min_pixels, max_pixels, overrides: dict) -> dict:
        """The options of one call: the processor's, with the call's overrides; pixel bounds clamped to the
        processor's max_pixels unless allow_larger_items (a chat item must not ask for more than the processor
        was set up to give)."""
        unknown = set(overrides) - set(_CALL_OPTIONS) - {"size"}
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        min_pixels, max_pixels = _pixels_from_size(overrides.pop("size", None), min_pixels, max_pixels)
        options = {
            name: getattr(self, name) if overrides.get(name) is None else overrides[name] for name in _CALL_OPTIONS
        }
        options["min_pixels"] = self.min_pixels if min_pixels is None else min_pixels
        options["max_pixels"] = self.max_pixels if max_pixels is None else max_pixels
        if not self.allow_larger_items:
            for name in ("min_pixels", "max_pixels"):
                if isinstance(options[name], numbers.Integral) and not isinstance(options[name], bool):
                    options[name] = min(options[name], self.max_pixels)  # other types are refused just below
        return _checked_options(options)

    def _image_size_for(self, options: dict, resized) -> Callable[[int, int], tuple[int, int]]:
        """(height, width) of a picture -> the size it is resized to, under this call's options."""
        factor = options["patch_size"] * options["merge_size"]
        if self.image_size is not None and options["do_resize"]:
            return lambda height, width: (self.image_size, self.image_size)
        if not options["do_resize"]:
            return _whole_grid_size(factor)
        if resized is None:
            return lambda height, width: smart_resize(
                height, width, factor, options["min_pixels"], options["max_pixels"]
            )
        cap = IMAGE_MAX_TOKENS * factor**2
        if not self.allow_larger_items:
            cap = min(cap, self.max_pixels)
        size = smart_resize(*resized, factor, min(IMAGE_MIN_TOKENS * factor**2, cap), cap)
        return lambda height, width: size

    def _video_frame_size(self, length: int, height: int, width: int, options: dict, resized) -> tuple[int, int]:
        """Size of the frames of a video of ``length`` frames (after padding), ``height`` x ``width`` each.

        As for images, with the frames' share of the video budget as a further cap (``video_frame_budget``, unless
        allow_larger_items): a long video of large frames stays within VIDEO_TOTAL_PIXELS per temporal patch.
        """
        factor = options["patch_size"] * options["merge_size"]
        if resized is None:
            low, high = options["min_pixels"], options["max_pixels"]
        else:
            (height, width), low, high = resized, IMAGE_MIN_TOKENS * factor**2, IMAGE_MAX_TOKENS * factor**2
        if not self.allow_larger_items:
            high = min(high, video_frame_budget(length, options["temporal_patch_size"], factor))
        return smart_resize(height, width, factor, min(low, high), high)

    def _image_pixels(self, image, options: dict, resized) -> np.ndarray:
        """One picture -> uint8 [1, H, W, 3] at its target size."""
        picture = _load_picture(
            image, self._image_size_for(options, resized), options["resample"], drop_alpha=self.drop_alpha
        )
        return np.asarray(picture)[None]  # a still image: no padding, and no copy by np.stack

    def _video_pixels(self, frames: list, options: dict, resized) -> np.ndarray:
        """The frames of one video -> uint8 [T, H, W, 3], resized, T padded to whole temporal patches."""
        length = len(frames) + (-len(frames) % options["temporal_patch_size"])
        if options["do_resize"]:
            def size_for(height, width):
                return self._video_frame_size(length, height, width, options, resized)
        else:
            size_for = _whole_grid_size(options["patch_size"] * options["merge_size"])
        return _load_clip(frames, size_for, length, options["resample"])

    def _moonvit_encode(self, images, videos, options: dict, table: np.ndarray) -> dict:
        """Kimi-VL's outputs: `pixel_values` float32 [N, 3, p, p] in raster order and `image_grid_hws` [n, 2]."""
        if videos is not None:
            raise ValueError("Kimi-VL's processor takes images only (in_token_limit is set), no videos")
        images = image_list(images) if images is not None else []
        if not images:
            raise ValueError("pass at least one image")
        p, factor = options["patch_size"], options["patch_size"] * options["merge_size"]
        size_for = functools.partial(moonvit_size, patch_size=p, factor=factor, in_token_limit=self.in_token_limit)
        pictures = (np.asarray(_load_picture(image, size_for, options["resample"])) for image in images)
        padded = [_pad_to_multiple(picture, factor) for picture in pictures]
        grids = np.array([(image.shape[0] // p, image.shape[1] // p) for image in padded], dtype=np.int64)
        out = np.empty((int(grids.prod(axis=1).sum()), 3, p, p), dtype=np.float32)
        start = 0
        for image, (grid_h, grid_w) in zip(padded, grids):
            _patchify_raster(image, table, p, out[start : start + grid_h * grid_w])
            start += grid_h * grid_w
        return {"pixel_values": out, "image_grid_hws": grids}

    def _encode(self, pixels: list, options: dict, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [T, H, W, 3] per image or video -> (rows [N, D], grids [n, 3] int64)."""
        p, tp = options["patch_size"], options["temporal_patch_size"]
        grids = np.array([_grid_thw(clip, p, tp) for clip in pixels], dtype=np.int64)
        # one output array, filled in place: no concatenation copy
        out = np.empty((int(grids.prod(axis=1).sum()), 3 * tp * p * p), dtype=np.float32)
        start = 0
        for clip, (grid_t, grid_h, grid_w) in zip(pixels, grids):
            stop = start + grid_t * grid_h * grid_w
            _patchify(clip, table, p, options["merge_size"], tp, out[start:stop])
            start = stop
        return out, grids


# ---------------------------------------------------------------------------------------------------------------
# 6. Kimi-VL (MoonViT) sizing and raster patches
# ---------------------------------------------------------------------------------------------------------------

# MoonViT's 2-D rotary covers at most 512 patches a side in the original, which raises "Exceed pos emb" beyond; the
# largest even count below that.
MOONVIT_MAX_SIDE_PATCHES = 510


def moonvit_size(height: int, width: int, patch_size: int, factor: int, in_token_limit: int) -> tuple[int, int]:
    """Kimi-VL's size of a picture before padding: above `in_token_limit` patches (counted on the unpadded picture,
    as the original does) both sides are scaled by sqrt(limit / patches) and truncated. Where the original would
    then fail with "Exceed pos emb" (a thin picture whose long side, padded, reaches 512 patches), the picture is
    scaled down further, so its padded long side is MOONVIT_MAX_SIDE_PATCHES patches at most."""
    patches = (width // patch_size) * (height // patch_size)
    if patches > in_token_limit:
        scale = math.sqrt(in_token_limit / patches)
        width, height = int(width * scale), int(height * scale)
    longest = MOONVIT_MAX_SIDE_PATCHES * patch_size
    if -(-max(height, width) // factor) * factor > longest:
        scale = longest / max(height, width)
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
    return height, width


def _pad_to_multiple(image: np.ndarray, factor: int) -> np.ndarray:
    """uint8 [H, W, 3] padded with black on the right and at the bottom to multiples of `factor`."""
    height, width = image.shape[:2]
    return np.pad(image, ((0, -height % factor), (0, -width % factor), (0, 0)))


def _patchify_raster(image: np.ndarray, table: np.ndarray, patch_size: int, out: np.ndarray) -> None:
    """Write the patches of uint8 [H, W, 3] into float32 `out` [h*w, 3, p, p], in raster order (h, w)."""
    p = patch_size
    grid_h, grid_w = image.shape[0] // p, image.shape[1] // p
    blocks = image.reshape(grid_h, p, grid_w, p, 3).transpose(4, 0, 2, 1, 3)  # (C, h, w, py, px)
    blocks = np.ascontiguousarray(blocks).reshape(3, grid_h * grid_w, p, p)
    for channel in range(3):
        np.take(table[channel], blocks[channel], out=out[:, channel], mode="clip")


def _whole_grid_size(factor: int) -> Callable[[int, int], tuple[int, int]]:
    """The size function of ``do_resize=False``: a picture keeps its size, which must fill whole patch blocks."""

    def size_for(height, width):
        if height % factor or width % factor:
            raise ValueError(
                f"with do_resize=False every image must have sides divisible by {factor} "
                f"(patch_size * merge_size) to fill a whole patch grid, got {height}x{width}"
            )
        return height, width

    return size_for


# save_pretrained then names this class under AutoImageProcessor in `auto_map` and copies this file, so a saved folder
# loads anywhere with AutoImageProcessor.from_pretrained(folder, trust_remote_code=True).
QwenVLImageProcessor.register_for_auto_class()
