"""On a CUDA GPU only (skipped elsewhere, CI included): the vision tower's varlen kernel paths give what SDPA run
by run gives, forward and backward, in bfloat16.

Run on a GPU machine with `python -m pytest tests/test_gpu.py`."""

import pytest
import torch
from tiny import pixels

import modeling_qwenvl
from configuration_qwenvl import QwenVLVisionConfig
from modeling_qwenvl import QwenVLVisionModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture
def tower():
    torch.manual_seed(0)
    config = QwenVLVisionConfig(
        depth=4, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=64,
        fullatt_block_indexes=[1, 3], window_size=112,
    )
    model = QwenVLVisionModel(config).to("cuda", torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    return model


def encode_with_grads(model, pixel_values, grid):
    model.zero_grad(set_to_none=True)
    out = model(pixel_values, grid)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), model.blocks[0].attn.qkv.weight.grad.clone(), model.blocks[1].attn.qkv.weight.grad.clone()


@pytest.mark.parametrize("path", ["sdpa", "flash_attention_2"])
def test_varlen_kernel_matches_sdpa_run_by_run(tower, monkeypatch, path):
    """Images of three sizes: windows of several lengths, so "sdpa" takes torch's varlen kernel; "flash_attention_2"
    takes flash-attn's, or torch's standing in where flash-attn is not installed."""
    pixel_values, grid = pixels((1, 28, 20), (1, 16, 16), (2, 8, 12))
    pixel_values, grid = pixel_values.to("cuda", torch.bfloat16), grid.cuda()
    torch_varlen = modeling_qwenvl.torch_varlen_attn
    assert torch_varlen is not None, "this torch has no torch.nn.attention.varlen"
    monkeypatch.setattr(modeling_qwenvl, "torch_varlen_attn", None)
    by_runs = encode_with_grads(tower, pixel_values, grid)
    monkeypatch.setattr(modeling_qwenvl, "torch_varlen_attn", torch_varlen)

    calls = []
    name = "flash_attn_varlen_func" if path == "flash_attention_2" else "torch_varlen_attn"
    kernel = getattr(modeling_qwenvl, name) or torch_varlen
    monkeypatch.setattr(modeling_qwenvl, name, lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    tower.config._attn_implementation = path
    varlen = encode_with_grads(tower, pixel_values, grid)
    assert calls, "the varlen kernel was not used"
    for a, b in zip(varlen, by_runs):
        assert relative_error(a, b) < 2e-2


def test_compiled_vision_tower_matches_eager(tower):
    """compile_vision() with inductor on the GPU: the same merged tokens for two sizes, one compile for both."""
    sizes = [((1, 28, 20), (1, 16, 16)), ((2, 8, 12),)]
    inputs = [tuple(t.cuda() for t in pixels(*grids)) for grids in sizes]
    with torch.no_grad():
        expected = [tower(p.bfloat16(), g) for p, g in inputs]
        tower.compile_vision()
        for (p, g), eager in zip(inputs, expected):
            assert relative_error(tower(p.bfloat16(), g), eager) < 2e-2


@pytest.mark.parametrize("implementation", ["static", "offloaded", "offloaded_static"])
def test_cache_implementations_give_the_dynamic_caches_tokens_on_the_gpu(implementation):
    """The offloaded caches copy through CUDA streams, so they run only here; "static" also compiles the decoding
    step with transformers' defaults (inductor, reduce-overhead: CUDA graphs)."""
    from transformers import CompileConfig
    from tiny import PAD, qwenvl_model, sequence

    model = qwenvl_model("2.5").cuda()
    input_ids = torch.tensor([sequence([5, 6, 7], ("image", (1, 8, 8)), [8, 9])], device="cuda")
    image_pixels, grid = (t.cuda() for t in pixels((1, 8, 8)))
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=image_pixels,
                  image_grid_thw=grid, max_new_tokens=16, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    compiled = {"compile_config": CompileConfig()} if implementation == "static" else {}
    with torch.no_grad():
        dynamic = model.generate(**inputs)
        other = model.generate(**inputs, cache_implementation=implementation, **compiled)
    assert other.tolist() == dynamic.tolist()
