"""generate() with a static cache (`cache_implementation="static"`, the fixed-shape cache that compiled decoding needs)
gives the dynamic cache's greedy tokens: single prompts and left-padded batches, images and videos, both families, a
conversation continued from the cache, and the model at the repo root (where it used to fail with a shape error).

"sliding_window" is transformers' older name for the same cache where no layer slides (ours never do: the config
refuses use_sliding_window). "offloaded" caches copy through CUDA streams: tests/test_gpu.py covers them."""

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, StaticCache

from modeling_qwenvl import CACHE_NAME, QwenVLForConditionalGeneration
from processing_qwenvl import QwenVLProcessor
from tiny import PAD, left_pad, pixels, qwenvl_model, sequence

ROOT = Path(__file__).resolve().parent.parent
GREEDY = dict(do_sample=False, pad_token_id=PAD, eos_token_id=None)


@pytest.fixture(scope="module", params=["2.5", "2"])
def model(request):
    return qwenvl_model(request.param)


def padded_batch():
    """An image prompt and a longer video prompt, left-padded into one batch."""
    with_image = sequence([5, 6, 7], ("image", (1, 4, 4)), [8, 9])
    with_video = sequence([5], ("video", (2, 4, 8)), [10, 11, 12, 13, 14, 15, 16, 17])
    input_ids, attention_mask = left_pad([with_image, with_video])
    image_pixels, image_grid = pixels((1, 4, 4))
    video_pixels, video_grid = pixels((2, 4, 8), seed=1)
    return dict(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=image_pixels, image_grid_thw=image_grid,
        pixel_values_videos=video_pixels, video_grid_thw=video_grid, second_per_grid_ts=torch.tensor([1.0]),
    )


def single_image():
    input_ids = torch.tensor([sequence([5, 6, 7], ("image", (1, 8, 8)), [8, 9])])
    image_pixels, image_grid = pixels((1, 8, 8))
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=image_pixels,
                image_grid_thw=image_grid)


@pytest.mark.parametrize("inputs, implementation", [
    (single_image, "static"), (padded_batch, "static"), (single_image, "sliding_window"),
])
def test_static_cache_gives_the_dynamic_caches_tokens(model, inputs, implementation):
    inputs = inputs()
    with torch.no_grad():
        dynamic = model.generate(**inputs, max_new_tokens=10, **GREEDY)
        static = model.generate(**inputs, max_new_tokens=10, cache_implementation=implementation, **GREEDY)
    assert static.tolist() == dynamic.tolist()
    assert len(set(dynamic[:, inputs["input_ids"].shape[1]:].flatten().tolist())) > 1  # not a degenerate run


def continue_conversation(model, cache):
    """Two turns: the second prompt is the first, its reply and a new user turn with a new image, from `cache`."""
    first = padded_batch()
    with torch.no_grad():
        reply = model.generate(**first, max_new_tokens=4, **{CACHE_NAME: cache}, **GREEDY)
    new_turn = torch.tensor([sequence([7], ("image", (1, 4, 4)), [8, 9])] * 2)
    input_ids = torch.cat([reply, new_turn], 1)
    grown = input_ids.shape[1] - first["input_ids"].shape[1]
    attention_mask = torch.cat([first["attention_mask"], torch.ones(2, grown, dtype=torch.long)], 1)
    new_pixels, new_grid = pixels((1, 4, 4), seed=2)  # one new image per sample, after sample 0's first image
    second = dict(
        first, input_ids=input_ids, attention_mask=attention_mask,
        pixel_values=torch.cat([first["pixel_values"], new_pixels, new_pixels]),
        image_grid_thw=torch.cat([first["image_grid_thw"], new_grid, new_grid]),
    )
    with torch.no_grad():
        continued = model.generate(**second, max_new_tokens=6, **{CACHE_NAME: cache}, **GREEDY)
        fresh = model.generate(**second, max_new_tokens=6, **GREEDY)
    return continued, fresh


def test_a_conversation_continues_from_a_static_cache(model):
    continued, fresh = continue_conversation(model, StaticCache(config=model.config, max_cache_len=96))
    assert continued.tolist() == fresh.tolist()
    from_dynamic, _ = continue_conversation(model, DynamicCache())
    assert continued.tolist() == from_dynamic.tolist()


@pytest.mark.skipif(not (ROOT / "model.safetensors").exists(), reason="the repo root has no weights")
def test_the_model_at_the_repo_root_decodes_with_a_static_cache():
    processor = QwenVLProcessor.from_pretrained(ROOT)
    model = QwenVLForConditionalGeneration.from_pretrained(ROOT).float().eval()
    messages = [{"role": "user", "content": [{"type": "image", "image": str(ROOT / "examples" / "color.png")},
                                             {"type": "text", "text": "What colour is the shape?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **settings)
        static = model.generate(**inputs, cache_implementation="static", **settings)
    assert static.tolist() == dynamic.tolist()
