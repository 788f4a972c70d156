"""QwenVLProcessor, the tokenizer files and the chat template.

Oracles: hand-written ChatML strings for the template, and the built-in `transformers.Qwen2_5_VLProcessor` with
`Qwen2VLImageProcessorPil` for tokens and pixels (its torchvision-only video processor is replaced by a stub that
hands back our video features, so videos are compared on token expansion and `second_per_grid_ts`).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, BatchFeature

import oracles
from image_processing_qwenvl import QwenVLImageProcessor, load_image, load_video
from processing_qwenvl import QwenVLProcessor

ROOT = Path(__file__).resolve().parent.parent

MIN_PIXELS, MAX_PIXELS = 3136, 64 * 28 * 28  # small images keep the tests fast
CODE_FILES = ["processing_qwenvl.py", "image_processing_qwenvl.py"]
CONFIG_FILES = [
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]

TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
# 4.x's built-in processor marks video tokens as text (0) in mm_token_type_ids; 5.x, which we follow, marks them 2
OLD_VIDEO_TOKEN_TYPES = pytest.mark.skipif(TRANSFORMERS_4, reason="4.x reference gives video tokens type 0")

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


photo = oracles.skimage_photo


clip = oracles.clip_or_skip


@pytest.fixture(scope="module")
def tokenizer():
    # the root's config.json names remote code, which AutoTokenizer reads (and would otherwise ask about)
    return AutoTokenizer.from_pretrained(ROOT, trust_remote_code=True)


@pytest.fixture(scope="module")
def processor(tokenizer):
    image_processor = QwenVLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return QwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def photos():
    return {name: Image.open(photo(name + ".png")).convert("RGB") for name in ("astronaut", "chelsea", "coffee")}


@pytest.fixture(scope="module")
def bikes():
    """Four frames of bikes.mp4, sampled and resized by load_video, and their frame rate."""
    return load_video(clip("bikes.mp4"), nframes=4, min_pixels=32 * 28 * 28, max_pixels=64 * 28 * 28)


# ---- the built-in reference processor ------------------------------------------------------------------------


class BuiltinProcessor(transformers.Qwen2_5_VLProcessor):
    """The built-in processor, allowed a stand-in video processor (its real one needs torchvision)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name != "video_processor":
            return super().check_argument_for_proper_class(argument_name, argument)


class VideoFeaturesStub:
    """Stands in for the built-in video processor: returns given features and the fps of each video."""

    merge_size = 2
    temporal_patch_size = 2

    def __init__(self, features: dict, fps: list[float]):
        self.features, self.fps = features, fps

    def __call__(self, videos, return_metadata=False, **kwargs):
        # 5.x reads each video's fps from the metadata it asks for; 4.x takes the `fps` call argument instead
        metadata = {"video_metadata": [SimpleNamespace(sampled_fps=fps) for fps in self.fps]} if return_metadata else {}
        return BatchFeature({**self.features, **metadata})


# 4.x returns mm_token_type_ids only on request; 5.x always does
REFERENCE_OPTIONS = {"return_tensors": "pt", "return_mm_token_type_ids": True}


def builtin_processor(tokenizer, video_features=None, fps=None):
    image_processor = oracles.builtin_pil_image_processor()(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return BuiltinProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=VideoFeaturesStub(video_features, fps)
    )


def assert_same_inputs(ours, theirs):
    assert set(ours) == set(theirs) - {"video_metadata"}
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)  # bit-identical


# ---- tokenizer -------------------------------------------------------------------------------------------------


def test_tokenizer_ids(tokenizer):
    assert tokenizer("Hello world").input_ids == [9707, 1879]
    assert tokenizer("你好").input_ids == [108386]
    special = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|vision_pad|>": 151654,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
    }
    for token, token_id in special.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer(f"a{token}b").input_ids == [64, token_id, 65]
    assert len(tokenizer) == 151665  # 151,643 regular tokens + 22 added ones
    assert tokenizer.convert_tokens_to_ids("<think>") is None  # a Qwen3 token, dropped
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"


def test_build_tokenizer_drops_qwen3_tokens_and_checks_the_rest(tmp_path):
    """Rebuilding from a source with the Qwen3 extras gives the committed files; a wrong token is refused."""
    source = json.loads((ROOT / "tokenizer.json").read_text(encoding="utf-8"))
    extras = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
    source["added_tokens"] += [
        {**source["added_tokens"][-1], "id": 151665 + i, "content": text} for i, text in enumerate(extras)
    ]
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text(json.dumps(source, ensure_ascii=False), encoding="utf-8")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ROOT / name, src / name)

    build = [sys.executable, str(ROOT / "tools" / "build_tokenizer.py"), "--src", str(src), "--dst"]
    subprocess.run([*build, str(tmp_path / "out")], check=True, capture_output=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (tmp_path / "out" / name).read_bytes() == (ROOT / name).read_bytes(), name

    source["added_tokens"][12]["content"] = "<|not_image_pad|>"
    (src / "tokenizer.json").write_text(json.dumps(source, ensure_ascii=False), encoding="utf-8")
    failed = subprocess.run([*build, str(tmp_path / "bad")], capture_output=True, text=True)
    assert failed.returncode != 0 and "151655" in failed.stderr


# ---- chat template ---------------------------------------------------------------------------------------------


def user(*items):
    return {"role": "user", "content": list(items)}


def text(value):
    return {"type": "text", "text": value}


def image(source="cat.png"):
    return {"type": "image", "image": source}


def video(source="clip.mp4"):
    return {"type": "video", "video": source}


CHATS = {
    "text only": (
        [{"role": "user", "content": "Hello"}],
        {},
        SYSTEM + "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    ),
    "image": (
        [user(image(), text("Describe."))],
        {},
        SYSTEM + f"<|im_start|>user\n{IMAGE}Describe.<|im_end|>\n<|im_start|>assistant\n",
    ),
    "two images": (
        [user(image(), image(), text("Same?"))],
        {},
        SYSTEM + f"<|im_start|>user\n{IMAGE}{IMAGE}Same?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "video": (
        [user(video(), text("What happens?"))],
        {},
        SYSTEM + f"<|im_start|>user\n{VIDEO}What happens?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "multi-turn": (
        [user(image(), text("What?")), {"role": "assistant", "content": "A cat."}, user(text("Sure?"))],
        {},
        SYSTEM + f"<|im_start|>user\n{IMAGE}What?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "system given": (
        [{"role": "system", "content": "Be brief."}, user(text("Hi"), image())],
        {},
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi{IMAGE}<|im_end|>\n<|im_start|>assistant\n",
    ),
    "add_vision_id": (
        [user(image(), video(), image()), {"role": "assistant", "content": "Ok."}, user(image(), video())],
        {"add_vision_id": True},
        SYSTEM + f"<|im_start|>user\nPicture 1: {IMAGE}Video 1: {VIDEO}Picture 2: {IMAGE}<|im_end|>\n"
        "<|im_start|>assistant\nOk.<|im_end|>\n"
        f"<|im_start|>user\nPicture 3: {IMAGE}Video 2: {VIDEO}<|im_end|>\n<|im_start|>assistant\n",
    ),
}


@pytest.mark.parametrize("name", CHATS)
def test_chat_template_renders_official_chatml(processor, tokenizer, name):
    messages, template_kwargs, expected = CHATS[name]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs) == expected
    # The tokenizer loads the same template, so text-only users of AutoTokenizer get the same format.
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template_kwargs) == (
        expected
    )


def test_chat_template_without_generation_prompt_and_batched(processor):
    single = [{"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(single) == SYSTEM + "<|im_start|>user\nHi<|im_end|>\n"
    assert processor.apply_chat_template([single, single]) == [SYSTEM + "<|im_start|>user\nHi<|im_end|>\n"] * 2


# ---- parity with the built-in processor ------------------------------------------------------------------------


def test_text_only_matches_builtin(processor, tokenizer):
    prompts = ["Hello world", "你好, how are you?"]
    ours = processor(text=prompts, padding=True, return_tensors="pt")
    theirs = builtin_processor(tokenizer)(text=prompts, padding=True, **REFERENCE_OPTIONS)
    assert_same_inputs(ours, theirs)
    assert ours["attention_mask"][0, 0] == 0  # left padding


def test_one_image_matches_builtin(processor, tokenizer, photos):
    prompt = f"<|im_start|>user\n{IMAGE}Describe the photo.<|im_end|>\n"
    ours = processor(images=photos["chelsea"], text=prompt, return_tensors="pt")
    theirs = builtin_processor(tokenizer)(images=photos["chelsea"], text=prompt, **REFERENCE_OPTIONS)
    assert_same_inputs(ours, theirs)
    assert (ours["input_ids"] == processor.image_token_id).sum() == ours["image_grid_thw"].prod() // 4


def test_several_images_match_builtin(processor, tokenizer, photos):
    images = [photos["astronaut"], photos["chelsea"], photos["coffee"]]
    prompt = f"First {IMAGE}, second {IMAGE} and third {IMAGE}."
    ours = processor(images=images, text=prompt, return_tensors="pt")
    theirs = builtin_processor(tokenizer)(images=images, text=prompt, **REFERENCE_OPTIONS)
    assert_same_inputs(ours, theirs)


@OLD_VIDEO_TOKEN_TYPES
def test_image_and_video_match_builtin(processor, tokenizer, photos, bikes):
    frames, fps = bikes
    prompt = f"{IMAGE} is a still and {VIDEO} is a clip."
    ours = processor(images=photos["coffee"], videos=[frames], text=prompt, fps=fps, return_tensors="pt")
    video_features = {key: ours[key] for key in ("pixel_values_videos", "video_grid_thw")}
    oracle = builtin_processor(tokenizer, video_features, [fps])
    theirs = oracle(images=photos["coffee"], videos=[frames], text=prompt, fps=[fps], **REFERENCE_OPTIONS)
    assert_same_inputs(ours, theirs)
    torch.testing.assert_close(ours["second_per_grid_ts"], torch.tensor([2 / fps]))
    assert ours["video_grid_thw"].tolist()[0][0] == 2  # 4 frames in temporal pairs
    assert (ours["mm_token_type_ids"] == 2).sum() == ours["video_grid_thw"].prod() // 4


@OLD_VIDEO_TOKEN_TYPES
def test_mixed_batch_with_padding_matches_builtin(processor, tokenizer, photos, bikes):
    frames, fps = bikes
    prompts = [f"{IMAGE}{IMAGE} compare", "no media at all, just a longer line of text", f"{VIDEO}{IMAGE} what?"]
    images = [[photos["astronaut"], photos["chelsea"]], [], [photos["coffee"]]]
    ours = processor(images=images, videos=frames, text=prompts, fps=[fps], padding=True, return_tensors="pt")
    video_features = {key: ours[key] for key in ("pixel_values_videos", "video_grid_thw")}
    theirs = builtin_processor(tokenizer, video_features, [fps])(
        images=images, videos=[frames], text=prompts, fps=[fps], padding=True, **REFERENCE_OPTIONS
    )
    assert_same_inputs(ours, theirs)
    lengths = ours["attention_mask"].sum(dim=1)
    assert (ours["input_ids"][1, : -lengths[1]] == tokenizer.pad_token_id).all()  # padded on the left


def test_right_padding_on_request(processor):
    ours = processor(text=["a", "a b c"], padding=True, padding_side="right")
    assert ours["attention_mask"][0] == [1, 0, 0]


# ---- chat round trips with real media --------------------------------------------------------------------------


def test_chat_round_trip_with_real_photos(processor):
    messages = [
        user(
            {"type": "image", "image": photo("astronaut.png"), "max_pixels": 32 * 28 * 28},
            {"type": "image", "image": "file://" + photo("chelsea.png"), "resized_height": 56, "resized_width": 84},
            text("Which one is a cat?"),
        )
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["image_grid_thw"].tolist() == [[1, 10, 10], [1, 4, 6]]  # 140x140 and 56x84 pixels
    direct = processor.image_processor(images=[load_image(photo("chelsea.png"))], resized_height=56, resized_width=84)
    torch.testing.assert_close(inputs["pixel_values"][100:], torch.as_tensor(direct["pixel_values"]), rtol=0, atol=0)

    # Decoding gives back the rendered prompt with each placeholder widened to its token count.
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    widened = prompt.replace(IMAGE, "<|vision_start|>" + "<|image_pad|>" * 25 + "<|vision_end|>", 1)
    widened = widened.replace(IMAGE, "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>", 1)
    assert processor.decode(inputs["input_ids"][0]) == widened


def test_chat_round_trip_with_a_real_clip(processor):
    path = clip("bikes.mp4")
    options = {"nframes": 6, "min_pixels": 16 * 28 * 28, "max_pixels": 48 * 28 * 28}
    messages = [user({"type": "video", "video": path, **options}, text("Describe."))]
    batch = [messages, [user(text("Hi"))]]
    inputs = processor.apply_chat_template(
        batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    frames, fps = load_video(path, **options)
    direct = processor(text=VIDEO, videos=frames, fps=fps, return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values_videos"], direct["pixel_values_videos"], rtol=0, atol=0)
    assert inputs["video_grid_thw"].tolist() == direct["video_grid_thw"].tolist()
    assert inputs["video_grid_thw"][0, 0] == 3
    torch.testing.assert_close(inputs["second_per_grid_ts"], torch.tensor([2 / fps]))
    assert abs(fps - 6 / 10) < 0.05  # 6 frames over bikes.mp4's 10 seconds
    assert (inputs["mm_token_type_ids"][0] == 2).sum() == inputs["video_grid_thw"].prod() // 4
    assert inputs["input_ids"].shape[0] == 2 and inputs["attention_mask"][1, 0] == 0


def test_chat_tokenize_without_dict_returns_ids(processor):
    messages = [{"role": "user", "content": "Hello world"}]
    ids = processor.apply_chat_template(messages, tokenize=True)
    assert ids == [processor.tokenizer(processor.apply_chat_template(messages)).input_ids]


def test_chat_accepts_transformers_and_openai_image_items(processor, photos):
    path = photo("coffee.png")
    items = [{"type": "image", "url": path}, {"type": "image_url", "image_url": {"url": path}}]
    inputs = processor.apply_chat_template([user(*items)], tokenize=True, return_dict=True, return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [inputs["image_grid_thw"].tolist()[0]] * 2


# ---- errors ----------------------------------------------------------------------------------------------------


def test_more_images_than_placeholders(processor, photos):
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> placeholder\(s\) but 2 image\(s\)"):
        processor(images=[photos["chelsea"], photos["coffee"]], text=f"{IMAGE} only one")


def test_fewer_images_than_placeholders(processor, photos):
    with pytest.raises(ValueError, match=r"2 <\|image_pad\|> placeholder\(s\) but 1 image\(s\)"):
        processor(images=[photos["chelsea"]], text=f"{IMAGE}{IMAGE}")
    with pytest.raises(ValueError, match=r"1 <\|video_pad\|> placeholder\(s\) but 0 video\(s\)"):
        processor(text=VIDEO)


def test_zero_size_image(processor):
    with pytest.raises(ValueError, match="zero size"):
        processor(images=np.zeros((0, 28, 3), dtype=np.uint8), text=IMAGE)


def test_corrupt_or_missing_file(processor, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="corrupt.png"):
        processor(images=str(corrupt), text=IMAGE)
    missing = str(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="not found.*missing.png"):
        processor.apply_chat_template([user(image(missing))], tokenize=True)


def test_unsupported_input_types(processor):
    with pytest.raises(TypeError, match="unsupported image type int"):
        processor(images=[42], text=IMAGE)
    with pytest.raises(TypeError, match="videos must be"):
        processor(videos=42, text=VIDEO)
    with pytest.raises(TypeError, match="text must be"):
        processor(text=42)


def test_bad_options(processor):
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['do_sample'\]"):
        processor(text="hi", do_sample=False)
    with pytest.raises(ValueError, match="fps"):
        processor(videos=np.zeros((2, 28, 28, 3), dtype=np.uint8), text=VIDEO, fps=[1.0, 2.0])


def test_bad_aspect_ratio(processor):
    with pytest.raises(ValueError, match="aspect ratio"):
        processor(images=Image.new("RGB", (5000, 20)), text=IMAGE)


def test_unknown_message_item_type(processor):
    with pytest.raises(ValueError, match="unknown message item type 'audio'"):
        processor.apply_chat_template([user({"type": "audio", "audio": "a.wav"})])
    with pytest.raises(ValueError, match="has no media"):
        processor.apply_chat_template([user({"type": "image"})], tokenize=True)


def test_truncation_through_a_vision_span(processor, photos):
    prompt = f"Look: {IMAGE} and tell me"
    with pytest.raises(ValueError, match="truncation would cut through a vision span"):
        processor(images=photos["chelsea"], text=prompt, truncation=True, max_length=20)
    # Cutting only text after the span is fine.
    span = len(processor(images=photos["chelsea"], text=IMAGE)["input_ids"][0])
    kept = processor(images=photos["chelsea"], text=prompt, truncation=True, max_length=span + 3)
    assert len(kept["input_ids"][0]) == span + 3


# ---- serving -----------------------------------------------------------------------------------------------------


def test_num_multimodal_tokens_match_processing(processor, photos, bikes):
    frames, fps = bikes
    inputs = processor(images=[photos["astronaut"], photos["chelsea"]], videos=frames, text=IMAGE + IMAGE + VIDEO)
    counts = processor._get_num_multimodal_tokens(
        image_sizes=[(512, 512), (300, 451)], video_sizes=[frames.shape[:3]]
    )
    assert counts.num_image_tokens == [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    assert counts.num_image_patches == [int(g.prod()) for g in inputs["image_grid_thw"]]
    assert counts.num_video_tokens == [int(inputs["video_grid_thw"][0].prod()) // 4]


def test_serving_attributes(processor):
    assert (processor.image_token, processor.image_token_id) == ("<|image_pad|>", 151655)
    assert (processor.video_token, processor.video_token_id) == ("<|video_pad|>", 151656)
    for name in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                 "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids"):
        assert name in processor.model_input_names


def test_post_process_decodes_a_batch(processor):
    ids = torch.tensor([[151644, 9707, 1879, 151645], [151643, 151643, 108386, 151645]])
    assert processor.post_process_image_text_to_text(ids) == ["Hello world", "你好"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["Hello world", "你好"]


@pytest.mark.skipif(TRANSFORMERS_4, reason="the built-in 4.x model does not take mm_token_type_ids")
def test_image_text_to_text_pipeline(processor):
    """The pipeline drives the processor end to end (chat in, text out) with a tiny random built-in model."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, pipeline

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[0]),
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [user({"type": "image", "image": photo("chelsea.png")}, text("What animal is this?"))]
    out = pipe(text=messages, max_new_tokens=3, generate_kwargs={"do_sample": False})
    assert out[0]["generated_text"][-1]["role"] == "assistant"
    assert isinstance(out[0]["generated_text"][-1]["content"], str)


# ---- saving and loading ----------------------------------------------------------------------------------------


def model_dir(path: Path) -> Path:
    """A folder laid out like the repo root: the code files and the processor and tokenizer configs."""
    for name in CODE_FILES + CONFIG_FILES:
        shutil.copy(ROOT / name, path / name)
    return path


def test_save_and_load_round_trip(processor, photos, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = QwenVLProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == processor.chat_template
    assert loaded.image_processor.max_pixels == MAX_PIXELS
    prompt = [f"{IMAGE} describe", "hi"]
    expected = processor(images=photos["chelsea"], text=prompt, padding=True, return_tensors="pt")
    assert_same_inputs(loaded(images=photos["chelsea"], text=prompt, padding=True, return_tensors="pt"), expected)


def test_auto_processor_with_remote_code(photos, tmp_path):
    loaded = AutoProcessor.from_pretrained(model_dir(tmp_path), trust_remote_code=True)
    assert type(loaded).__name__ == "QwenVLProcessor"
    assert type(loaded.image_processor).__name__ == "QwenVLImageProcessor"
    assert loaded.image_processor.max_pixels == 12845056 and loaded.image_processor.min_pixels == 3136
    assert loaded.chat_template == (ROOT / "chat_template.jinja").read_text(encoding="utf-8")
    inputs = loaded.apply_chat_template(
        [user(image(photo("chelsea.png")), text("Cat?"))], tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert (inputs["input_ids"] == 151655).sum() == inputs["image_grid_thw"].prod() // 4

    saved = tmp_path / "saved"
    loaded.save_pretrained(saved)
    again = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    assert type(again).__name__ == "QwenVLProcessor"
    assert again.tokenizer.padding_side == "left"
