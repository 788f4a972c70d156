"""The Qwen3-VL side of the processor: 16-px patches, side multiple 32, the official preprocessor config, video
timestamps in the text, the Qwen3-VL chat template, relative grounding.

Oracles: qwen-vl-utils 0.0.14 with `image_patch_size=16` (sizes, sampling, frame indices) followed by transformers'
PIL image processor with `do_resize=False` (pixels), as the Qwen3-VL README pairs them; transformers' own
`Qwen3VLProcessor` (the Qwen team's code on 4.57, the 5.x rewrite on 5.x) for the video timestamps and token layout,
with its torchvision-only video processor replaced by a stub that hands back our video features and the frames'
metadata; hand-written strings for the chat template.
"""

import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, BatchFeature
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

import image_processing_qwenvl as media
import oracles
from grounding_qwenvl import ground
from image_processing_qwenvl import QwenVLImageProcessor, load_video, smart_resize, video_pixel_bounds
from processing_qwenvl import QwenVLProcessor, temporal_patch_timestamps

ROOT = Path(__file__).resolve().parent.parent
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5

# Qwen3-VL's official preprocessor_config.json (the same in every checkpoint of the family).
OFFICIAL_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
SMALL_MAX = 256 * 32 * 32  # keeps the comparisons fast
ROW = 3 * 2 * 16 * 16
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "camera.png"]

qwen = oracles.import_qwen_vl_utils()


clip = oracles.clip_or_skip


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT, trust_remote_code=True)


@pytest.fixture(scope="module")
def processor(tokenizer):
    """A Qwen3-VL processor as a converted checkpoint has it: the official settings, with small images."""
    image_processor = QwenVLImageProcessor(**OFFICIAL_PREPROCESSOR, max_pixels=SMALL_MAX)
    template = (ROOT / "chat_template_qwen3_vl.jinja").read_text(encoding="utf-8")
    return QwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def builtin_pixels(image: Image.Image):
    """transformers' PIL image processor with Qwen3-VL's settings, keeping the size it is given."""
    reference = oracles.builtin_pil_image_processor()(
        patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_resize=False
    )
    return reference(image, return_tensors="np")


# ---- images: the official config, factor 32, qwen-vl-utils' pixels ------------------------------------------------


def test_official_config_gives_the_qwen3_settings(processor, tokenizer):
    image_processor = QwenVLImageProcessor(**OFFICIAL_PREPROCESSOR)
    assert (image_processor.min_pixels, image_processor.max_pixels) == (65536, 16777216)
    assert image_processor.image_mean == image_processor.image_std == [0.5, 0.5, 0.5]
    assert image_processor.to_dict()["size"] == OFFICIAL_PREPROCESSOR["size"]
    # unset bounds follow the side multiple: qwen-vl-utils' 4 and 16384 tokens of 32 x 32 (of 28 x 28 for patch 14)
    assert (QwenVLImageProcessor(patch_size=16).min_pixels, QwenVLImageProcessor(patch_size=16).max_pixels) == (
        4096,
        16777216,
    )
    assert (QwenVLImageProcessor().min_pixels, QwenVLImageProcessor().max_pixels) == (3136, 12845056)
    assert processor.text_timestamps
    assert not QwenVLProcessor(image_processor=QwenVLImageProcessor(), tokenizer=tokenizer).text_timestamps


@pytest.mark.parametrize("name", PHOTOS)
def test_image_pixels_match_qwen_vl_utils_with_patch_16(processor, name):
    """The official pipeline: qwen-vl-utils resizes (factor 32), transformers normalizes at that size; bit-exact."""
    path = oracles.skimage_photo(name)
    resized = qwen.fetch_image({"image": path, "max_pixels": SMALL_MAX}, image_patch_size=16)
    expected = builtin_pixels(resized)
    ours = processor.image_processor(path, max_pixels=SMALL_MAX)
    assert ours["pixel_values"].shape[1] == ROW
    np.testing.assert_array_equal(ours["image_grid_thw"], expected["image_grid_thw"])
    assert np.abs(ours["pixel_values"] - expected["pixel_values"]).max() == 0
    assert ours["image_grid_thw"][0, 1] * 16 == resized.height and ours["image_grid_thw"][0, 2] * 16 == resized.width


def test_small_images_follow_the_config_or_qwen_vl_utils(processor):
    """The spec's example: 100x100 is 256x256 (64 tokens) under the official config's minimum, 96x96 (9 tokens) under
    qwen-vl-utils' (4096 pixels), which a call or a chat item can ask for."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8))
    assert processor.image_processor(image)["image_grid_thw"].tolist() == [[1, 16, 16]]
    resized = qwen.fetch_image({"image": image}, image_patch_size=16)
    ours = processor.image_processor(image, min_pixels=4096)
    expected = builtin_pixels(resized)
    assert ours["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert np.abs(ours["pixel_values"] - expected["pixel_values"]).max() == 0


def test_smart_resize_with_factor_32_matches_qwen_vl_utils():
    rng = np.random.default_rng(1)
    for _ in range(300):
        height, width = (int(v) for v in np.exp(rng.uniform(np.log(4), np.log(5000), 2)))
        if max(height, width) / min(height, width) > 200:
            continue
        low = int(rng.integers(1, 500)) * 32 * 32
        high = low + int(rng.integers(0, 5000)) * 32 * 32
        bounds = {} if rng.random() < 0.3 else {"min_pixels": low, "max_pixels": high}
        expected = qwen.smart_resize(height, width, 32, **bounds)
        if 0 not in expected:  # qwen-vl-utils shrinks very thin images to nothing; ours keeps 32
            assert smart_resize(height, width, 32, **bounds) == expected, (height, width, bounds)


# ---- videos: bounds, sampling, frame times -------------------------------------------------------------------------


def test_video_bounds_scale_with_the_side_multiple():
    assert video_pixel_bounds(28) == (media.VIDEO_MIN_PIXELS, media.VIDEO_MAX_PIXELS, media.VIDEO_TOTAL_PIXELS)
    # qwen-vl-utils' own expressions for image_patch_size=16
    assert video_pixel_bounds(32) == (128 * 32 * 32, 768 * 32 * 32, qwen.MODEL_SEQ_LEN * 32 * 32 * 0.9)


def qwen_fetch_video_16(ele: dict):
    """qwen-vl-utils' fetch_video with image_patch_size=16 (Qwen3-VL), through the PyAV stand-in for decord."""
    original = qwen.fetch_video
    qwen.fetch_video = functools.partial(original, image_patch_size=16)
    try:
        return oracles.qwen_fetch_video(ele)
    finally:
        qwen.fetch_video = original


@pytest.mark.parametrize("options", [{"nframes": 6}, {"fps": 1.0, "video_start": 2.0, "video_end": 8.0}])
def test_video_file_matches_qwen_vl_utils_with_patch_16(options):
    path = clip("bikes.mp4")
    video, metadata, sample_fps = qwen_fetch_video_16({"video": path, **options})
    frames, fps, times = load_video(path, **options, factor=32, return_frame_times=True)
    assert frames.shape[:3] == (video.shape[0], video.shape[2], video.shape[3])
    assert frames.shape[1] % 32 == 0 and frames.shape[2] % 32 == 0
    assert fps == pytest.approx(sample_fps)
    # a frame's time is its index over the clip's own rate, not over the sampled one
    assert times == [index / metadata["fps"] for index in metadata["frames_indices"]]
    if "video_start" in options:
        assert times[0] >= 2.0


def test_frame_list_matches_qwen_vl_utils_with_patch_16():
    """A frame list: qwen-vl-utils 0.0.14 first rounds each frame to multiples of 2 * 32 (its factor passed as the
    patch size), then the stack to 32 under the video bounds of 32."""
    rng = np.random.default_rng(2)
    frames = [Image.fromarray(rng.integers(0, 256, (300, 517, 3), dtype=np.uint8)) for _ in range(5)]
    video, _, _ = qwen_fetch_video_16({"video": frames})
    ours, fps, times = load_video(frames, factor=32, return_frame_times=True)
    assert ours.shape[:3] == (video.shape[0], video.shape[2], video.shape[3]) == (6, 320, 512)
    assert fps == 2.0 and times == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]  # the padding frame repeats the last one's time


def test_temporal_patch_timestamps():
    # the spec's 10 s clip at 30 fps, sampled at 2 fps: 20 frames, 10 temporal patches
    indices = [round(float(v)) for v in torch.linspace(0, 299, 20)]
    stamps = temporal_patch_timestamps([index / 30 for index in indices], 2)
    assert [f"<{t:.1f} seconds>" for t in stamps[:3]] + [f"<{stamps[-1]:.1f} seconds>"] == [
        "<0.3 seconds>", "<1.3 seconds>", "<2.4 seconds>", "<9.7 seconds>",
    ]
    assert temporal_patch_timestamps([0.0, 0.5, 1.0], 2) == [0.25, 1.0]  # padded by repeating the last time
    assert f"{temporal_patch_timestamps([0.0, 0.5], 2)[0]:.1f}" == "0.2"  # Python's rounding, as the Qwen code


# ---- video text layout: the Qwen code's, per temporal patch ------------------------------------------------------


class BuiltinProcessor(Qwen3VLProcessor):
    """transformers' Qwen3-VL processor, allowed a stand-in video processor (its real one needs torchvision)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name != "video_processor":
            return super().check_argument_for_proper_class(argument_name, argument)


class VideoFeaturesStub:
    """Stands in for the built-in video processor: our video features, with each video's frame indices and fps."""

    merge_size = 2
    temporal_patch_size = 2

    def __init__(self, features: dict, metadata: list):
        self.features, self.metadata = features, metadata

    def __call__(self, videos, **kwargs):
        return BatchFeature({**self.features, "video_metadata": self.metadata})


def builtin_text_layout(tokenizer, features: dict, metadata: list, text: list) -> list:
    """The input ids transformers' Qwen3VLProcessor writes for `text` with these video features and metadata."""
    image_processor = oracles.builtin_pil_image_processor()(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    stub = VideoFeaturesStub({key: features[key] for key in ("pixel_values_videos", "video_grid_thw")}, metadata)
    builtin = BuiltinProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=stub)
    videos = [np.zeros((2, 32, 32, 3), np.uint8)] * len(metadata)  # unread: the stub answers
    return builtin(text=text, videos=videos, return_tensors="pt", padding=True)["input_ids"].tolist()


def placeholder_for_builtin(text: str) -> str:
    """The template's video triple as each reference line needs it for the Qwen code's layout: 4.57 (the Qwen team's
    code) replaces the triple itself; 5.x replaces only <|video_pad|> and so keeps an outer
    <|vision_start|>...<|vision_end|>, which the bare placeholder avoids. Ours treats both spellings alike."""
    return text if TRANSFORMERS_4 else text.replace(VIDEO, "<|video_pad|>")


def test_decoded_video_layout_matches_the_qwen_code(processor, tokenizer):
    """A decoded clip: timestamps from qwen-vl-utils' frame indices and the clip's own fps, as the built-in computes
    them, and the same token ids."""
    path = clip("bikes.mp4")
    options = {"fps": 1.0, "video_start": 1.3, "min_pixels": 16 * 32 * 32, "max_pixels": 32 * 32 * 32}
    _, metadata, _ = qwen_fetch_video_16({"video": path, **options})
    messages = [user({"type": "video", "video": path, **options}, text("?"))]
    ours = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert "second_per_grid_ts" not in ours  # the time is in the text
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    meta = SimpleNamespace(fps=metadata["fps"], frames_indices=list(metadata["frames_indices"]))
    expected = builtin_text_layout(tokenizer, ours, [meta], [placeholder_for_builtin(prompt)])
    assert ours["input_ids"][0].tolist() == expected[0]
    decoded = processor.decode(ours["input_ids"][0])
    grid_t = int(ours["video_grid_thw"][0, 0])
    assert decoded.count("seconds><|vision_start|>") == decoded.count("<|vision_start|>") == grid_t
    assert decoded.split("<|im_start|>user\n")[1].startswith("<1.")  # the clip from 1.3 s on: not from 0


def test_frames_and_batch_layout_match_the_qwen_code(processor, tokenizer):
    """Frames given as such are `fps` apart from 0 s (the built-in: metadata range(n) at that fps); an odd count pads
    with its last frame; a left-padded batch of an image and two videos, one of them as a bare <|video_pad|>."""
    rng = np.random.default_rng(3)
    first, second = rng.integers(0, 256, (5, 64, 96, 3), np.uint8), rng.integers(0, 256, (4, 96, 64, 3), np.uint8)
    image = Image.fromarray(rng.integers(0, 256, (70, 90, 3), np.uint8))
    text = [f"{IMAGE}a{VIDEO}b", "<|video_pad|>c"]
    ours = processor(
        text=text, images=[image], videos=[first, second], fps=[2.0, 0.5], padding=True, return_tensors="pt"
    )
    expected_text = [f"{IMAGE}a{placeholder_for_builtin(VIDEO)}b", "<|video_pad|>c"]
    metadata = [
        SimpleNamespace(fps=2.0, frames_indices=[0, 1, 2, 3, 4]), SimpleNamespace(fps=0.5, frames_indices=[0, 1, 2, 3])
    ]
    video_only = processor(videos=[first, second], return_tensors="pt")
    image_processor = oracles.builtin_pil_image_processor()(
        patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=65536, max_pixels=SMALL_MAX
    )
    stub = VideoFeaturesStub(dict(video_only), metadata)
    builtin = BuiltinProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=stub)
    theirs = builtin(text=expected_text, images=[image], videos=[first, second], return_tensors="pt", padding=True)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    torch.testing.assert_close(torch.as_tensor(ours["pixel_values"]), theirs["pixel_values"], rtol=0, atol=0)
    assert processor.decode(ours["input_ids"][1]).count("<0.0 seconds>") == 0  # 0.5 fps: first patch at 1.0 s
    assert "<1.0 seconds><|vision_start|>" in processor.decode(ours["input_ids"][1])


def test_decoded_frames_keep_their_times_with_frame_times(processor, tokenizer):
    """Frames decoded beforehand carry their times in the clip through `frame_times`, as a path does itself."""
    path = clip("bikes.mp4")
    options = {"nframes": 4, "video_start": 3.0, "min_pixels": 16 * 32 * 32, "max_pixels": 16 * 32 * 32}
    frames, fps, times = load_video(path, **options, factor=32, return_frame_times=True)
    messages = [user({"type": "video", "video": path, **options})]
    from_path = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    prompt = processor.apply_chat_template(messages)
    given = processor(text=prompt, videos=[frames], fps=fps, frame_times=[times], return_tensors="pt")
    assert given["input_ids"].tolist() == from_path["input_ids"].tolist()
    from_zero = processor(text=prompt, videos=[frames], fps=fps)  # without: the same frames fps apart from 0 s
    assert from_zero["input_ids"][0] != given["input_ids"][0].tolist()
    assert processor.decode(from_zero["input_ids"][0]).startswith("<|im_start|>user\n<0.")
    with pytest.raises(ValueError, match="one finite number of seconds per frame"):
        processor(text=VIDEO, videos=[frames], frame_times=[times[:-1]])
    with pytest.raises(ValueError, match="is a file"):
        processor(text=VIDEO, videos=[path], frame_times=[times])
    qwen25 = QwenVLProcessor(image_processor=QwenVLImageProcessor(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="frame_times is for Qwen3-VL processors"):
        qwen25(text=VIDEO, videos=[frames], frame_times=[times])


@pytest.mark.skipif(TRANSFORMERS_4, reason="4.57 is the Qwen code, whose layout ours follows")
def test_transformers_5_keeps_an_outer_vision_pair(processor, tokenizer):
    """The documented difference: 5.x writes the template's <|vision_start|> and <|vision_end|> around the timed
    spans (two tokens more per video, a timestamp inside a vision span); ours follows the Qwen code."""
    frames = np.random.default_rng(4).integers(0, 256, (4, 64, 64, 3), np.uint8)
    ours = processor(text=VIDEO, videos=[frames], return_tensors="pt")
    metadata = [SimpleNamespace(fps=2.0, frames_indices=[0, 1, 2, 3])]
    theirs = builtin_text_layout(tokenizer, ours, metadata, [VIDEO])[0]
    start, end = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    assert theirs == [start] + ours["input_ids"][0].tolist() + [end]


# ---- the chat template ---------------------------------------------------------------------------------------------


def user(*items):
    return {"role": "user", "content": list(items)}


def text(value):
    return {"type": "text", "text": value}


TOOLS = [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}]
TOOLS_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
CALLS = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {"type": "function", "function": {"name": "zoom", "arguments": {"x": 1}}},
        {"name": "crop", "arguments": '{"a": 2}'},
    ],
}
CHATS = {
    "no default system prompt": (
        [user(text("Hi"))],
        {},
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ),
    "system as a list": (
        [{"role": "system", "content": [text("Be brief.")]}, user({"image": "x"}, text("?"))],
        {},
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{IMAGE}?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "tools and tool calls": (
        [{"role": "system", "content": "Be brief."}, user(text("Zoom.")), CALLS,
         {"role": "tool", "content": [{"type": "image", "image": "y"}]}, {"role": "tool", "content": "done"}],
        {"tools": TOOLS, "add_vision_id": True},
        "<|im_start|>system\nBe brief.\n\n" + TOOLS_SYSTEM
        + "<|im_start|>user\nZoom.<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "zoom", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "crop", "arguments": {"a": 2}}\n</tool_call><|im_end|>\n'
        f"<|im_start|>user\n<tool_response>\nPicture 1: {IMAGE}\n</tool_response>\n<tool_response>\ndone\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n",
    ),
    "tools without a system message": (
        [user(text("Hi"))],
        {"tools": TOOLS},
        "<|im_start|>system\n" + TOOLS_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ),
    "vision ids": (
        [user({"type": "image", "image": "a"}, {"type": "video", "video": "v"}),
         {"role": "assistant", "content": "Ok."},
         user({"type": "image_url", "image_url": {"url": "b"}})],
        {"add_vision_id": True},
        f"<|im_start|>user\nPicture 1: {IMAGE}Video 1: {VIDEO}<|im_end|>\n<|im_start|>assistant\nOk.<|im_end|>\n"
        f"<|im_start|>user\nPicture 2: {IMAGE}<|im_end|>\n<|im_start|>assistant\n",
    ),
    "thinking": (
        [user(text("Hi")), {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello."}, user(text("Why?"))],
        {"enable_thinking": True},
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n",
    ),
    "thinking after the last query": (
        [user(text("Zoom.")), {"role": "assistant", "content": "", "reasoning_content": "Use the tool.",
                               "tool_calls": [{"name": "zoom", "arguments": {}}]}, {"role": "tool", "content": "ok"}],
        {"enable_thinking": True},
        "<|im_start|>user\nZoom.<|im_end|>\n<|im_start|>assistant\n<think>\nUse the tool.\n</think>\n\n"
        '<tool_call>\n{"name": "zoom", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n",
    ),
}


@pytest.mark.parametrize("name", CHATS)
def test_chat_template_renders_the_qwen3_format(processor, name):
    messages, template_kwargs, expected = CHATS[name]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs) == expected


def test_chat_template_refuses_what_it_cannot_render(processor):
    with pytest.raises(ValueError, match='role "narrator"'):
        processor.apply_chat_template([{"role": "narrator", "content": "Once"}])
    with pytest.raises(ValueError, match="only the first message"):
        processor.apply_chat_template([user(text("Hi")), {"role": "system", "content": "Late."}])


# ---- a Qwen3-VL folder --------------------------------------------------------------------------------------------


def qwen3_folder(path: Path) -> Path:
    """A folder as a converted Qwen3-VL checkpoint has it: the code, the root's tokenizer, the official preprocessor
    settings with our auto_map, and the Qwen3-VL chat template as chat_template.jinja."""
    for name in ("processing_qwenvl.py", "image_processing_qwenvl.py", "tokenizer.json", "tokenizer_config.json",
                 "vocab.json", "merges.txt"):
        shutil.copy(ROOT / name, path / name)
    shutil.copy(ROOT / "chat_template_qwen3_vl.jinja", path / "chat_template.jinja")
    auto_map = {
        "AutoImageProcessor": "image_processing_qwenvl.QwenVLImageProcessor",
        "AutoProcessor": "processing_qwenvl.QwenVLProcessor",
    }
    config = {**OFFICIAL_PREPROCESSOR, "auto_map": auto_map, "image_processor_type": "QwenVLImageProcessor",
              "processor_class": "QwenVLProcessor"}
    (path / "preprocessor_config.json").write_text(json.dumps(config))
    return path


def test_auto_processor_loads_a_qwen3_folder(tmp_path):
    loaded = AutoProcessor.from_pretrained(qwen3_folder(tmp_path), trust_remote_code=True)
    assert type(loaded).__name__ == "QwenVLProcessor" and loaded.text_timestamps
    assert loaded.image_processor.patch_size == 16 and loaded.image_processor.min_pixels == 65536
    assert loaded.chat_template == (ROOT / "chat_template_qwen3_vl.jinja").read_text(encoding="utf-8")
    frames = np.random.default_rng(5).integers(0, 256, (4, 64, 64, 3), np.uint8)
    messages = [user({"type": "video", "video": list(frames)}, text("?"))]
    inputs = loaded.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    assert loaded.decode(inputs["input_ids"][0]).startswith("<|im_start|>user\n<0.2 seconds><|vision_start|>")

    saved = tmp_path / "saved"
    loaded.save_pretrained(saved)
    again = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    assert again.text_timestamps and again.image_processor.image_mean == [0.5, 0.5, 0.5]
    assert again.chat_template == loaded.chat_template


# ---- grounding -----------------------------------------------------------------------------------------------------


def test_qwen3_grounding_is_relative_to_the_image():
    """Qwen3-VL's JSON boxes are 0..1000 of the original image, whatever size the processor resized it to."""
    boxes = '[{"bbox_2d": [100, 250, 500, 1000], "label": "cat"}, {"point_2d": [500, 500], "label": "eye"}]'
    answer = f"```json\n{boxes}\n```"
    cat, eye = ground(answer, "qwen3_vl", (640, 480), image_grid_thw=[1, 30, 40])
    assert cat.label == "cat" and cat.box == pytest.approx((64.0, 120.0, 320.0, 480.0))
    assert eye.point == pytest.approx((320.0, 240.0))
