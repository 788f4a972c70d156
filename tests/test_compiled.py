"""Compiled paths: decoding compiled through transformers' own mechanism (a static cache and a `CompileConfig`) traces
one graph that serves every step and every prompt length within the cache, and a compiled training step with
`labelled_logits_only` gives the eager step's loss and gradients.

Compiling with inductor takes minutes on this CPU, so these tests compile with the "eager" and "aot_eager" backends:
whether a graph is reused or recompiled is decided by dynamo's guards, before any backend sees the graph, and
"aot_eager" traces the backward as inductor would. `benchmarks/run.py --compiled` runs inductor and checks its
results against eager."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig, StaticCache

from modeling_qwenvl import CACHE_NAME
from tiny import PAD, pixels, qwenvl_model, sequence


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compile_on_any_device(**options):
    config = CompileConfig(**options)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told (a class attribute, not a field)
    return config


@torch._dynamo.config.patch(error_on_recompile=True)
def test_compiled_decoding_traces_one_graph_for_every_step_and_prompt_length():
    model = qwenvl_model("2.5")
    config = compile_on_any_device(fullgraph=True, backend="eager", mode="default")
    image_pixels, grid = pixels((1, 4, 4))
    for text_length in (3, 8, 15):  # three prompt lengths, one cache capacity
        input_ids = torch.tensor([sequence([5] * text_length, ("image", (1, 4, 4)), [8, 9])])
        inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=image_pixels,
                      image_grid_thw=grid, do_sample=False, pad_token_id=PAD, eos_token_id=None, max_new_tokens=32,
                      min_new_tokens=32)
        with torch.no_grad():
            compiled = model.generate(
                **inputs, **{CACHE_NAME: StaticCache(config=model.config, max_cache_len=64)}, compile_config=config
            )
            eager = model.generate(**inputs)
        assert compiled.tolist() == eager.tolist()
    assert counters["stats"]["unique_graphs"] == 1  # 31 steps x 3 prompts, one graph: never recompiled
    assert not counters["graph_break"]
    assert not hasattr(model, "rope_deltas") and not hasattr(model.model, "rope_deltas")  # positions stay per call


def test_compiled_training_step_with_labelled_logits_only_matches_eager():
    """Text only, to keep the test short: the vision tower's host-side planning splits the graph (it runs eager
    between compiled pieces, as under Trainer's torch_compile=True); the benchmark compiles the full step."""
    model = qwenvl_model("2.5").train()
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]] * 2)
    labels = torch.full_like(input_ids, -100)
    labels[:, -3:] = input_ids[:, -3:]
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                 labelled_logits_only=True)

    def step(forward):
        model.zero_grad(set_to_none=True)
        loss = forward(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.to_dense() for p in model.parameters() if p.grad is not None]

    eager_loss, eager_grads = step(model)
    compiled_loss, compiled_grads = step(torch.compile(model, backend="aot_eager"))  # what Trainer(torch_compile=True) does
    assert (compiled_loss - eager_loss).abs() < 1e-5
    assert len(compiled_grads) == len(eager_grads)
    assert max((a - b).abs().max() for a, b in zip(compiled_grads, eager_grads)) < 1e-5


def test_compiled_vision_tower_matches_eager_and_reuses_its_graphs_for_new_sizes():
    tower = qwenvl_model("2.5").model.visual
    sizes = [((1, 8, 8),), ((1, 12, 20), (1, 4, 4)), ((2, 16, 8),)]  # a new total row count and layout each call
    with torch.no_grad():
        expected = [tower(*pixels(*grids)) for grids in sizes]
        tower.compile_vision(backend="aot_eager")
        for grids, eager in zip(sizes, expected):
            assert (tower(*pixels(*grids)) - eager).abs().max() < 1e-5
        graphs = counters["stats"]["unique_graphs"]
        tower(*pixels((1, 28, 20)))
    assert counters["stats"]["unique_graphs"] == graphs  # a fourth size compiles nothing new
    assert graphs <= 8  # norms, q/k/v with rotary, MLP, merger: a few graphs (and row-count specialisations), not one per size
