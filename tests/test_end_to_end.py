"""Processor + model together, with the real tokenizer: our pair against the built-in pair on the
same weights, the image-text-to-text pipeline on a qwenvl directory, and the embedded model."""

from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

import oracles
from modeling_qwenvl import QwenVLForConditionalGeneration
from processing_qwenvl import QwenVLProcessor
from test_processor import builtin_processor
from tiny import VISION_25

ROOT = Path(__file__).resolve().parent.parent
MAX_PIXELS = 64 * 28 * 28
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random built-in Qwen2.5-VL with the real vocabulary, and ours saved as a qwenvl directory."""
    torch.manual_seed(0)
    text = dict(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1e6,
        tie_word_embeddings=True,
    )
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(VISION_25), tie_word_embeddings=True)
    reference = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                p.mul_(3.0)
    builtin_dir = tmp_path_factory.mktemp("builtin")
    reference.save_pretrained(builtin_dir)
    ours = QwenVLForConditionalGeneration.from_pretrained(builtin_dir).eval()
    processor = QwenVLProcessor.from_pretrained(ROOT, max_pixels=MAX_PIXELS)
    qwenvl_dir = tmp_path_factory.mktemp("qwenvl")
    ours.save_pretrained(qwenvl_dir)
    processor.save_pretrained(qwenvl_dir)
    return reference, ours, processor, qwenvl_dir


def chat(image_path, question):
    return [{"role": "user", "content": [{"type": "image", "image": str(image_path)}, {"type": "text", "text": question}]}]


def test_our_pair_matches_the_builtin_pair(pair):
    reference, ours, processor, _ = pair
    photo = Image.open(oracles.skimage_photo("chelsea.png")).convert("RGB")
    prompt = processor.apply_chat_template(chat("x.png", "What animal is this?"), add_generation_prompt=True, tokenize=False)
    our_inputs = processor(text=[prompt], images=[photo], return_tensors="pt")
    builtin_inputs = builtin_processor(processor.tokenizer)
    builtin_inputs.image_processor.max_pixels = MAX_PIXELS
    builtin_inputs = dict(builtin_inputs(text=[prompt], images=[photo], return_tensors="pt"))
    if TRANSFORMERS_4:
        builtin_inputs.pop("mm_token_type_ids", None)
    with torch.no_grad():
        expected = reference(**builtin_inputs).logits
        got = ours(**our_inputs).logits
        assert (got - expected).abs().max() < 1e-5
        expected_tokens = reference.generate(**builtin_inputs, max_new_tokens=8, do_sample=False)
        got_tokens = ours.generate(**our_inputs, max_new_tokens=8, do_sample=False)
    assert got_tokens.tolist() == expected_tokens.tolist()


def test_pipeline_on_a_qwenvl_directory(pair):
    _, ours, processor, qwenvl_dir = pair
    pipe = transformers.pipeline("image-text-to-text", model=str(qwenvl_dir), trust_remote_code=True)
    assert type(pipe.model).__name__ == "QwenVLForConditionalGeneration"
    messages = chat(oracles.skimage_photo("coffee.png"), "What is in the cup?")
    out = pipe(text=messages, max_new_tokens=6, generate_kwargs={"do_sample": False}, return_full_text=False)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        tokens = ours.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = processor.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert out[0]["generated_text"] == expected
