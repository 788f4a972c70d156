"""What a serving engine asks of qwenvl beyond transformers' own use, checked without an engine on both transformers
lines. vLLM's Transformers backend (served for real in tests/vllm/) reads these: the processor's replacement offsets
and video side, the text config as a distinct object, vision features as `pooler_output`, and attention dispatched
by name to a function that has no mask function (its own kernel masks by sequence metadata)."""

from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import tiny
from processing_qwenvl import QwenVLProcessor
from test_processor import builtin_processor

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MAX_PIXELS = 64 * 28 * 28
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
TEXTS = ["a <|vision_start|><|image_pad|><|vision_end|> b", "<|vision_start|><|image_pad|><|vision_end|>c"]


@pytest.fixture(scope="module")
def processor():
    return QwenVLProcessor.from_pretrained(ROOT, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def pictures():
    return [Image.open(EXAMPLES / name).convert("RGB") for name in ("shape.png", "count.png")]


def test_replacement_offsets_locate_each_item(processor, pictures):
    frames = [pictures[0]] * 4
    texts = [TEXTS[0], TEXTS[1] + " <|vision_start|><|video_pad|><|vision_end|>"]
    inputs = processor(
        text=texts, images=pictures, videos=[frames], padding=True, return_text_replacement_offsets=True,
        return_tensors="pt",
    )
    offsets = inputs["text_replacement_offsets"]  # a list, not converted to tensors
    grids = [*inputs["image_grid_thw"], *inputs["video_grid_thw"]]
    entries = [entry for sample in offsets for entry in sample]
    assert [entry["type"] for entry in entries] == ["image", "image", "video"]
    for text, sample in zip(texts, offsets):
        for entry in sample:
            start, end = entry["span"]
            assert text[start:end] == entry["text"]
            assert entry["new_span"][1] - entry["new_span"][0] == len(entry["replacement"])
    for entry, grid in zip(entries, grids):
        assert entry["replacement"] == entry["text"] * (int(grid.prod()) // 4)
    assert "text_replacement_offsets" not in processor(text=TEXTS, images=pictures)


@pytest.mark.skipif(TRANSFORMERS_4, reason="transformers 4.x processors do not report replacement offsets")
def test_replacement_offsets_are_the_builtin_processors(processor, pictures):
    builtin = builtin_processor(processor.tokenizer)
    builtin.image_processor.max_pixels = MAX_PIXELS
    expected = builtin(text=TEXTS, images=pictures, return_text_replacement_offsets=True)["text_replacement_offsets"]
    assert processor(text=TEXTS, images=pictures, return_text_replacement_offsets=True)["text_replacement_offsets"] == expected


def test_video_view_names_the_video_outputs(processor):
    video = processor.video_processor
    assert video.temporal_patch_size == processor.image_processor.temporal_patch_size
    assert video.size == processor.image_processor.size
    assert not set(video.model_input_names) & set(processor.image_processor.model_input_names)
    assert set(video.model_input_names) <= set(processor.model_input_names)


def test_text_config_is_a_distinct_view_of_the_config():
    config = tiny.qwenvl_model("2.5").config
    text = config.get_text_config()
    assert text is not config and text.hidden_size == config.hidden_size
    text._attn_implementation = "eager"
    assert config._attn_implementation == "eager"


def test_vision_features_come_per_item_as_pooler_output():
    model = tiny.qwenvl_model("2.5")
    pixels, grid = tiny.pixels((1, 4, 4), (1, 4, 8))
    with torch.no_grad():
        plain = model.get_image_features(pixels, grid)
        output = model.get_image_features(pixels, grid, return_dict=True)
        video = model.model.get_video_features(pixels, grid, return_dict=True)
    assert [x.shape[0] for x in plain] == [4, 8]
    for features in (output.pooler_output, video.pooler_output):
        assert all(torch.equal(a, b) for a, b in zip(features, plain))


def test_an_attention_function_registered_by_name():
    """A function with no mask function in transformers gets no mask (it masks by itself), and the vision tower,
    whose packed attention cannot use a decoder kernel, runs SDPA: the logits are those of "sdpa"."""
    masks = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, None, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register("qwenvl_test_recording", recording_attention)
    model = tiny.qwenvl_model("2.5")
    ids = torch.tensor([tiny.sequence([5, 6], ("image", (1, 4, 4)), [7, 8, 9])])
    pixels, grid = tiny.pixels((1, 4, 4))
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        expected = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
        model.config._attn_implementation = "qwenvl_test_recording"
        got = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
    assert len(masks) == model.config.num_hidden_layers and all(mask is None for mask in masks)
    assert torch.allclose(got, expected, atol=1e-6)
