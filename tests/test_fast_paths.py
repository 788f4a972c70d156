"""The shortcuts that make the model fast give the same results as the plain computation:
labelled-only logits, chunked vision encoding, vision blocks in row slices, the folded patch
embedding of still images, query-chunked eager attention, grid plans cached per shape, position
tables resized by one gather, and the compiled decoding head."""

import pytest
import torch
import torch.nn.functional as F

import modeling_qwenvl
from modeling_qwenvl import QwenVLForConditionalGeneration, chunks_of_frames, segment_runs
from tiny import PATCH_ROW, pixels, reference_model, sequence


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = reference_model("2.5")
    directory = tmp_path_factory.mktemp("fast")
    reference.save_pretrained(directory)
    return reference, QwenVLForConditionalGeneration.from_pretrained(directory).eval()


def still_pixels(*grids, seed=0):
    """Pixel rows of still images: each row's two frames are the same, as the processor makes them."""
    moving, grid = pixels(*grids, seed=seed)
    frames = moving.view(moving.shape[0], 3, 2, -1)
    return frames[:, :, :1].expand_as(frames).reshape(-1, PATCH_ROW).contiguous(), grid


@pytest.mark.parametrize("tie", [False, True])
def test_labelled_logits_only_gives_the_same_loss_and_gradients(tmp_path, tie):
    reference_model("2.5", tie=tie).save_pretrained(tmp_path)
    ours = QwenVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert (ours.lm_head.weight is ours.get_input_embeddings().weight) == tie
    image, grid = still_pixels((1, 8, 8))
    ids = torch.tensor([sequence([5, 6], ("image", (1, 8, 8)), [7, 8, 9, 10])] * 2)
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    batch = dict(input_ids=ids, pixel_values=torch.cat([image, image]), image_grid_thw=torch.cat([grid, grid]),
                 labels=labels)

    def loss_and_grads(**option):
        ours.zero_grad()
        loss = ours(**batch, **option).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    full_loss, full_grads = loss_and_grads()
    loss, grads = loss_and_grads(labelled_logits_only=True)
    ours.zero_grad()
    assert torch.allclose(loss, full_loss, atol=1e-6)
    for name, grad in full_grads.items():
        # tied, the lookup's gradient went in sparse; its sum with the head's is dense, as optimizers need
        assert grads[name].layout == torch.strided, name
        assert torch.allclose(grads[name], grad, atol=1e-6), name
    with torch.no_grad():
        logits = ours(**batch, labelled_logits_only=True).logits
    assert logits.shape == (2 * 3, ours.config.vocab_size)


def test_still_images_use_the_folded_patch_embedding_and_match_the_reference(pair):
    reference, ours = pair
    image, grid = still_pixels((1, 12, 12), (1, 8, 16))
    with torch.no_grad():
        expected = reference.model.visual(image, grid_thw=grid)
        expected = getattr(expected, "pooler_output", expected)
        got = ours.model.visual(image, grid)
        folded = ours.model.visual.patch_embed(image)
        plain = image @ ours.model.visual.patch_embed.proj.weight.flatten(1).t()
    assert (got - expected).abs().max() < 1e-5
    assert (folded - plain).abs().max() < 1e-5


def test_chunking_cuts_only_between_frames():
    grid = torch.tensor([[1, 8, 8], [3, 4, 4], [1, 16, 16]])
    chunks = chunks_of_frames(grid, max_patches=80)
    assert [g.tolist() for _, _, g in chunks] == [[[1, 8, 8], [1, 4, 4]], [[2, 4, 4]], [[1, 16, 16]]]
    assert [(s, e) for s, e, _ in chunks] == [(0, 80), (80, 112), (112, 368)]


def test_chunked_vision_encoding_equals_one_pass(pair):
    _, ours = pair
    video, video_grid = pixels((4, 8, 8), seed=1)
    image, image_grid = still_pixels((1, 12, 12))
    pixel_values, grid = torch.cat([image, video]), torch.cat([image_grid, video_grid])
    visual = ours.model.visual
    with torch.no_grad():
        whole = visual(pixel_values, grid)
        visual.config.max_patches_per_chunk = 100  # every frame its own chunk
        try:
            chunked = visual(pixel_values, grid)
        finally:
            visual.config.max_patches_per_chunk = 65536
    assert (chunked - whole).abs().max() < 1e-5


def test_segment_runs_hold_whole_segments_within_the_row_bound():
    cu_seqlens = torch.tensor([0, 4, 8, 12, 16, 20, 26, 30, 34])  # 4 x 5 rows, 6, then 4 x 2
    assert segment_runs(cu_seqlens, max_rows=8) == [(0, 2, 4), (8, 2, 4), (16, 1, 4), (20, 1, 6), (26, 2, 4)]
    assert segment_runs(cu_seqlens, max_rows=3) == [(0, 1, 4), (4, 1, 4), (8, 1, 4), (12, 1, 4), (16, 1, 4),
                                                    (20, 1, 6), (26, 1, 4), (30, 1, 4)]  # a long segment stays whole
    assert segment_runs(cu_seqlens, max_rows=100) == [(0, 5, 4), (20, 1, 6), (26, 2, 4)]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_vision_blocks_in_row_slices_equal_one_slice(pair, monkeypatch, implementation):
    """Tiny slices (a few windows per attention call, a few rows per MLP pass) give the same tokens and the same
    gradients as one slice per block."""
    _, ours = pair
    pixel_values, grid = pixels((1, 28, 20), (2, 8, 8))
    visual = ours.model.visual
    visual.config._attn_implementation = implementation

    def run():
        visual._plans.clear()  # plans hold the runs, which depend on the slice size
        visual.zero_grad(set_to_none=True)
        out = visual(pixel_values, grid)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), visual.blocks[0].attn.qkv.weight.grad.clone(), visual.blocks[0].mlp.up_proj.weight.grad
    try:
        whole = run()
        monkeypatch.setattr(modeling_qwenvl, "SLICE_ELEMENTS", 50 * 64)  # 50 rows per MLP pass, 1-3 windows per run
        sliced = run()
    finally:
        visual.config._attn_implementation = "sdpa"
        visual._plans.clear()
        visual.zero_grad(set_to_none=True)
    for a, b in zip(whole, sliced):
        assert (a - b).abs().max() < 1e-5


def test_eager_attention_in_query_chunks_equals_sdpa(pair, monkeypatch):
    _, ours = pair
    pixel_values, grid = pixels((1, 28, 20), (2, 8, 8))
    visual = ours.model.visual
    with torch.no_grad():
        sdpa = visual(pixel_values, grid)
        monkeypatch.setattr(modeling_qwenvl, "EAGER_SCORE_BUDGET", 4096)  # many small query chunks
        visual.config._attn_implementation = "eager"
        try:
            eager = visual(pixel_values, grid)
        finally:
            visual.config._attn_implementation = "sdpa"
    assert (eager - sdpa).abs().max() < 1e-5


def test_long_segments_attend_from_contiguous_copies_with_the_same_result(pair, monkeypatch):
    """Segments of CONTIGUOUS_SEGMENT_ROWS rows or more are copied into SDPA's layout first (faster on the CPU)."""
    _, ours = pair
    pixel_values, grid = pixels((1, 28, 20), (2, 8, 8))
    visual = ours.model.visual
    with torch.no_grad():
        strided = visual(pixel_values, grid)
        copies = []
        real_contiguous = torch.Tensor.contiguous
        monkeypatch.setattr(modeling_qwenvl, "CONTIGUOUS_SEGMENT_ROWS", 64)  # the frames (560 and 64 rows), not windows
        monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(t.shape) or real_contiguous(t, *a, **k))
        copied = visual(pixel_values, grid)
    assert copies and all(shape[2] >= 64 for shape in copies)
    assert (copied - strided).abs().max() < 1e-6


def test_grid_plans_are_computed_once_per_shape(pair, monkeypatch):
    _, ours = pair
    visual = ours.model.visual
    visual._plans.clear()
    calls = []
    original = modeling_qwenvl.plan_grids
    monkeypatch.setattr(modeling_qwenvl, "plan_grids", lambda *a: calls.append(1) or original(*a))
    pixel_values, grid = pixels((1, 8, 8))
    with torch.no_grad():
        for _ in range(3):
            visual(pixel_values, grid)
        visual(*pixels((1, 8, 12)))
    assert len(calls) == 2


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k):
    """What flash-attn's (and torch's) varlen kernel computes, one segment at a time: a stand-in on the CPU."""
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k) and max_q == max_k
    bounds = cu_seqlens_q.tolist()
    assert max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
    out = [torch.nn.functional.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)))
           for a, b in zip(bounds, bounds[1:])]
    return torch.cat(out, dim=1).transpose(0, 1)


def test_a_varlen_kernel_runs_once_per_layer_over_segments_of_any_length(pair, monkeypatch):
    """With flash_attention_2 the tower calls the varlen kernel once per block, with every window (windows of
    several lengths here) or every frame in one packed call, and gets what sdpa gets run by run."""
    _, ours = pair
    pixel_values, grid = pixels((1, 28, 20), (2, 8, 8))
    visual = ours.model.visual
    calls = []
    monkeypatch.setattr(modeling_qwenvl, "flash_attn_varlen_func",
                        lambda *args: calls.append(args[3].tolist()) or reference_varlen(*args))
    with torch.no_grad():
        sdpa = visual(pixel_values, grid)
        visual.config._attn_implementation = "flash_attention_2"
        try:
            varlen = visual(pixel_values, grid)
        finally:
            visual.config._attn_implementation = "sdpa"
    assert len(calls) == visual.config.depth
    plan = visual.grid_plan(grid, "cpu")
    assert len(plan.windows) == 1 and len(plan.windows[0].runs) > 1  # windows of unequal length: several sdpa calls
    assert calls[0] == plan.windows[0].cu_seqlens.tolist()
    assert calls[visual.config.fullatt_block_indexes[0]] == [0, 28 * 20, 28 * 20 + 64, 28 * 20 + 128]
    assert (varlen - sdpa).abs().max() < 1e-5


def test_flash_attention_2_without_flash_attn_names_the_missing_package(pair, monkeypatch):
    _, ours = pair
    visual = ours.model.visual
    monkeypatch.setattr(modeling_qwenvl, "flash_attn_varlen_func", None)
    visual.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ImportError, match="flash-attn"):
            visual(*pixels((1, 8, 8)))
    finally:
        visual.config._attn_implementation = "sdpa"


def test_slices_group_whole_runs_within_the_row_bound():
    from modeling_qwenvl import Run, slices_of_runs

    def layout(slices):  # (start, end, runs) of each slice, and its segment boundaries
        return [(s.start, s.end, s.runs) for s in slices], [(s.cu_seqlens.tolist(), s.max_length) for s in slices]

    runs = [Run(*run) for run in [(0, 2, 4), (8, 2, 4), (16, 1, 4), (20, 1, 6), (26, 2, 4)]]
    assert layout(slices_of_runs(runs, max_rows=100)) == (
        [(0, 34, [(0, 2, 4), (8, 2, 4), (16, 1, 4), (20, 1, 6), (26, 2, 4)])],
        [([0, 4, 8, 12, 16, 20, 26, 30, 34], 6)],
    )
    assert layout(slices_of_runs(runs, max_rows=16))[0] == [
        (0, 16, [(0, 2, 4), (8, 2, 4)]), (16, 26, [(0, 1, 4), (4, 1, 6)]), (26, 34, [(0, 2, 4)])
    ]
    assert layout(slices_of_runs(runs, max_rows=16))[1][1] == ([0, 4, 10], 6)  # counted from the slice's start
    assert layout(slices_of_runs([Run(0, 1, 40), Run(40, 1, 4)], max_rows=16))[0] == [
        (0, 40, [(0, 1, 40)]), (40, 44, [(0, 1, 4)])
    ]


def test_sdpa_takes_torch_varlen_kernel_only_on_cuda_half_precision_and_fragmented_segments(pair):
    from types import SimpleNamespace

    from modeling_qwenvl import segment_slices, varlen_kernel

    (fragmented,) = segment_slices(torch.tensor([0, 4, 8, 14]), 100, "cpu")
    (uniform,) = segment_slices(torch.tensor([0, 4, 8, 12]), 100, "cpu")
    cuda_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert varlen_kernel("sdpa", cuda_bf16, fragmented) is modeling_qwenvl.torch_varlen_attn
    assert varlen_kernel("sdpa", cuda_bf16, uniform) is None  # one batched SDPA call does as well
    assert varlen_kernel("sdpa", SimpleNamespace(is_cuda=True, dtype=torch.float32), fragmented) is None
    assert varlen_kernel("sdpa", SimpleNamespace(is_cuda=False, dtype=torch.bfloat16), fragmented) is None
    assert varlen_kernel("eager", cuda_bf16, fragmented) is None


@pytest.mark.parametrize("mode", ["bicubic", "bilinear_align_corners"])
def test_position_tables_resize_as_f_interpolate_values_and_gradients(mode):
    """resize_table is a weighted gather over taps (one F.embedding_bag), not F.interpolate: the same table and the
    same gradient for the learned table, within float32 rounding, growing, shrinking and keeping the size."""
    torch_mode, align_corners = ("bicubic", False) if mode == "bicubic" else ("bilinear", True)
    generator = torch.Generator().manual_seed(0)
    for side, height, width in ((16, 20, 12), (16, 7, 30), (16, 16, 16), (8, 1, 5)):
        table = torch.randn(side, side, 8, generator=generator, requires_grad=True)
        upstream = torch.randn(height, width, 8, generator=generator)
        ours = modeling_qwenvl.resize_table(table, height, width, mode)
        (ours * upstream).sum().backward()
        our_grad, table.grad = table.grad, None
        expected = F.interpolate(table.permute(2, 0, 1)[None], size=(height, width), mode=torch_mode,
                                 align_corners=align_corners)[0].permute(1, 2, 0)
        (expected * upstream).sum().backward()
        assert (ours - expected).abs().max() < 5e-6
        assert (our_grad - table.grad).abs().max() < 5e-6


def compiled_head(head, hidden):
    """vocabulary_logits(head, hidden) under torch.compile: (logits, the code of the traced graph)."""
    graphs = []

    def recording_backend(graph, example_inputs):
        graphs.append(graph.code)
        return graph.forward

    logits = torch.compile(modeling_qwenvl.vocabulary_logits, backend=recording_backend, fullgraph=True)(head, hidden)
    return logits, graphs[0]


@pytest.mark.parametrize("rows, fused", [(1, True), (4, True), (5, False)])
def test_compiled_decoding_head_is_a_fused_multiply_and_sum_for_a_few_rows(rows, fused):
    """The head's logits under torch.compile on the CPU: up to FUSED_HEAD_ROWS rows as multiply-and-sum (one pass
    over the weight for inductor), more rows through the linear layer; the same logits either way."""
    head = torch.nn.Linear(32, 300, bias=False)
    hidden = torch.randn(rows, 1, 32)
    logits, code = compiled_head(head, hidden)
    torch.testing.assert_close(logits, head(hidden), rtol=0, atol=1e-5)
    assert ("linear" not in code) == fused
    assert modeling_qwenvl.vocabulary_logits(head, hidden).equal(head(hidden))  # eager: always the layer


def test_a_quantized_head_keeps_its_own_kernel_when_compiled():
    class QuantizedLinear(torch.nn.Linear):  # stands in for bitsandbytes' Linear8bitLt and Linear4bit
        pass

    _, code = compiled_head(QuantizedLinear(32, 300, bias=False), torch.randn(1, 1, 32))
    assert "linear" in code
