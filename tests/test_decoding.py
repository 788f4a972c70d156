"""The model at the repo root as a user runs it: the cache is on, decoding never waits for the device, and
`set_attn_implementation` really switches the kernels of a loaded model (on both transformers lines)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

import modeling_qwenvl
from modeling_qwenvl import QwenVLForConditionalGeneration
from processing_qwenvl import QwenVLProcessor

ROOT = Path(__file__).resolve().parent.parent
OUR_FILES = ("modeling_qwenvl.py", "configuration_qwenvl.py", "processing_qwenvl.py", "image_processing_qwenvl.py")

pytestmark = pytest.mark.skipif(not (ROOT / "model.safetensors").exists(), reason="the repo root has no weights")


@pytest.fixture(scope="module")
def processor():
    return QwenVLProcessor.from_pretrained(ROOT)


@pytest.fixture(scope="module")
def model():
    return QwenVLForConditionalGeneration.from_pretrained(ROOT).float().eval()


def color_question(processor):
    messages = [{"role": "user", "content": [{"type": "image", "image": str(ROOT / "examples" / "color.png")},
                                             {"type": "text", "text": "What colour is the shape?"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def test_the_shipped_files_turn_the_cache_on():
    assert json.loads((ROOT / "config.json").read_text())["use_cache"] is True
    assert json.loads((ROOT / "generation_config.json").read_text())["use_cache"] is True


def test_generate_on_the_repo_root_feeds_one_token_per_step(processor):
    """As loaded (no options): after the prompt, each step sends only the new token and no pixels."""
    model = QwenVLForConditionalGeneration.from_pretrained(ROOT)
    inputs = color_question(processor)
    calls = []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append((kwargs["input_ids"].shape[1], kwargs.get("pixel_values") is not None)),
        with_kwargs=True,
    )
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert calls[0] == (inputs["input_ids"].shape[1], True)
    assert calls[1:] == [(1, False)] * 7


def test_save_pretrained_writes_the_cache_on_and_leaves_the_live_model_as_it_was(model, tmp_path):
    model.config.use_cache = model.generation_config.use_cache = False  # what training with checkpointing leaves
    try:
        model.save_pretrained(tmp_path)
        assert model.config.use_cache is False and model.generation_config.use_cache is False
    finally:
        model.config.use_cache = model.generation_config.use_cache = True
    assert json.loads((tmp_path / "config.json").read_text())["use_cache"] is True
    assert GenerationConfig.from_pretrained(tmp_path).use_cache is True  # 4.57 leaves a default value out of the file


class HostSyncCounter:
    """Counts tensor -> Python conversions (each one waits for the device) made directly by our code files."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self.wrap(getattr(torch.Tensor, name), name))

    def wrap(self, method, name):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.endswith(OUR_FILES):
                self.calls.append(f"{name} in {caller.co_name} ({Path(caller.co_filename).name})")
            return method(tensor, *args, **kwargs)

        return counted


def test_decoding_steps_do_not_sync_with_the_device(model, processor, monkeypatch):
    """Inputs are validated once per prompt: 16 more decoding steps add no tensor -> Python conversion of ours."""
    inputs = color_question(processor)
    counter = HostSyncCounter(monkeypatch)

    def conversions(new_tokens):
        counter.calls.clear()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
        return list(counter.calls)

    conversions(1)  # the first call also plans the picture's grid, which the tower then keeps
    prompt_only = conversions(1)
    assert prompt_only, "the counter sees the prompt's validation"
    assert conversions(17) == prompt_only  # the same conversions: none from the 16 decoding steps


def test_set_attn_implementation_switches_the_kernels_of_a_loaded_model(model, processor, monkeypatch):
    """sdpa -> eager -> sdpa on both towers: eager runs the attention written out (and sees the weights), sdpa runs
    torch's kernel, and the logits agree within 1e-5."""
    inputs = color_question(processor)
    seen = {"eager text": 0, "eager vision": 0, "sdpa": 0}
    eager_text, eager_vision = modeling_qwenvl.eager_attention_forward, modeling_qwenvl.eager_segment_attention
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def count(name, function):
        def counted(*args, **kwargs):
            seen[name] += 1
            return function(*args, **kwargs)

        return counted

    def eager_text_spy(*args, **kwargs):
        out, weights = eager_text(*args, **kwargs)
        assert weights is not None and torch.allclose(weights.sum(-1), torch.ones(()))  # eager sees the weights
        seen["eager text"] += 1
        return out, weights

    monkeypatch.setattr(modeling_qwenvl, "eager_attention_forward", eager_text_spy)
    monkeypatch.setattr(modeling_qwenvl, "eager_segment_attention", count("eager vision", eager_vision))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", count("sdpa", sdpa))

    def logits_with(implementation):
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        assert model.model.visual.config._attn_implementation == implementation
        for name in seen:
            seen[name] = 0
        with torch.no_grad():
            logits = model(**inputs).logits
        return logits, dict(seen)

    layers, blocks = model.config.num_hidden_layers, model.config.vision_config.depth
    first, counts = logits_with("sdpa")
    assert counts["eager text"] == counts["eager vision"] == 0 and counts["sdpa"] >= layers + blocks
    eager, counts = logits_with("eager")
    assert counts == {"eager text": layers, "eager vision": counts["eager vision"], "sdpa": 0}
    assert counts["eager vision"] >= blocks
    again, counts = logits_with("sdpa")
    assert counts["eager text"] == counts["eager vision"] == 0 and counts["sdpa"] >= layers + blocks
    assert (eager - first).abs().max() < 1e-5
    assert torch.equal(again, first)
