"""Quantized loading: `from_pretrained(..., quantization_config=...)` with bitsandbytes 8-bit and 4-bit and torchao
int8 weight-only gives the built-in model's greedy tokens under the same config, for both families, on a tiny
model whose layer sizes bitsandbytes takes (multiples of 16). A quantized weight is stored as integers, so the model
never casts activations to a weight's dtype (layer_input); the float16 guard keeps the vision stream finite with
quantized projections. Official AWQ/GPTQ checkpoints carry their `quantization_config` in config.json: it reaches
transformers' quantizers unchanged."""

import copy
import json

import pytest
import torch
import transformers
from transformers import BitsAndBytesConfig, TorchAoConfig
from transformers.quantizers import AutoQuantizationConfig

from configuration_qwenvl import QwenVLConfig
from modeling_qwenvl import QwenVLForConditionalGeneration
from test_numerics import plant_large_activations
from tiny import IMAGE, PAD, pixels, reference_model, sequence

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

# transformers 5 computes M-RoPE positions only when told which tokens are images (4.57 does not take the argument).
TAKES_TOKEN_TYPES = int(transformers.__version__.split(".")[0]) >= 5


def int8_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


CONFIGS = {
    "bnb_8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "bnb_4bit": lambda: BitsAndBytesConfig(load_in_4bit=True),
    "torchao_int8": int8_weight_only,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> a directory holding a tiny built-in model of that family, and the model's class."""
    models = {}
    for family in ("2.5", "2"):
        directory = tmp_path_factory.mktemp(f"quantized{family}")
        reference = reference_model(family)
        reference.save_pretrained(directory)
        models[family] = directory, type(reference)
    return models


def image_prompt():
    """Images only: for videos the two installed references place positions differently from the official rule."""
    input_ids = torch.tensor([sequence([5, 6], ("image", (1, 8, 8)), [7], ("image", (1, 4, 8)), [8, 9, 10])])
    image_pixels, image_grid = pixels((1, 8, 8), (1, 4, 8))
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=image_pixels,
                image_grid_thw=image_grid)


@pytest.mark.parametrize("family, name", [
    ("2.5", "bnb_8bit"), ("2.5", "bnb_4bit"), ("2.5", "torchao_int8"), ("2", "bnb_8bit"), ("2", "torchao_int8"),
])
def test_quantized_loading_gives_the_builtin_tokens(saved, family, name):
    directory, builtin_class = saved[family]
    builtin = builtin_class.from_pretrained(directory, quantization_config=CONFIGS[name](), device_map="cpu")
    ours = QwenVLForConditionalGeneration.from_pretrained(directory, quantization_config=CONFIGS[name](), device_map="cpu")
    inputs = image_prompt()
    token_types = {"mm_token_type_ids": (inputs["input_ids"] == IMAGE).long()}
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        expected = builtin.generate(**inputs, **(token_types if TAKES_TOKEN_TYPES else {}), **settings)
        got = ours.generate(**inputs, **settings)
    assert got.tolist() == expected.tolist()
    assert not ours.model.language_model.layers[0].mlp.down_proj.weight.is_floating_point() or name == "torchao_int8"


@pytest.mark.parametrize("name", ["bnb_8bit", "torchao_int8"])
def test_float16_guard_keeps_quantized_projections_finite(saved, tmp_path, name):
    """Vision activations beyond float16's range (as the official weights make): the residual stream stays float32."""
    model = QwenVLForConditionalGeneration.from_pretrained(saved["2.5"][0])
    plant_large_activations(model)
    model.save_pretrained(tmp_path)
    expected_model = copy.deepcopy(model).eval()
    quantized = QwenVLForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=CONFIGS[name](), device_map="cpu", dtype=torch.float16
    )
    image_pixels, grid = pixels((1, 8, 8))
    with torch.no_grad():
        expected = expected_model.model.visual(image_pixels, grid)
        got = quantized.model.visual(image_pixels.half(), grid)
    assert torch.isfinite(got).all()
    assert ((got.float() - expected).norm() / expected.norm()).item() < 0.05


def test_official_awq_config_reaches_transformers_quantizer_unchanged(saved, tmp_path, monkeypatch):
    """As in Qwen/Qwen2.5-VL-7B-Instruct-AWQ: the quantizer (here refused for want of its kernels on this CPU machine)
    is transformers' own, given the checkpoint's settings as they are."""
    awq = {"bits": 4, "group_size": 128, "modules_to_not_convert": ["visual"], "quant_method": "awq",
           "version": "gemm", "zero_point": True}
    config = json.loads((saved["2.5"][0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": awq}))
    assert QwenVLConfig.from_pretrained(tmp_path).quantization_config == awq
    handed = []
    original = AutoQuantizationConfig.from_dict.__func__
    monkeypatch.setattr(
        AutoQuantizationConfig, "from_dict", classmethod(lambda cls, settings: handed.append(settings) or original(cls, settings))
    )
    with pytest.raises((ImportError, ValueError), match="(?i)awq|gptq"):  # transformers' own: no AWQ kernels here
        QwenVLForConditionalGeneration.from_pretrained(tmp_path, strict=False)
    assert handed == [awq]
