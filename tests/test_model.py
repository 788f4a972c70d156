"""The model against the built-in transformers classes (the oracle), in float32 on CPU.

Reference = the built-in model run on each sample alone, unpadded, with the official M-RoPE
positions (tests/official_positions.py) passed in as position_ids: neither installed reference
computes video positions by the official rule (docs/design.md, "M-RoPE positions: the official rule")."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from configuration_qwenvl import QwenVLConfig
from modeling_qwenvl import CACHE_NAME, QwenVLForConditionalGeneration, QwenVLModel, get_window_index
from official_configs import OFFICIAL_CONFIGS
from official_positions import official_positions
from tiny import IMAGE, PAD, TEXT, VIDEO, VISION_2, VISION_25, TOKEN_IDS, left_pad, pixels, reference_model, sequence

FAMILIES = ["2.5", "2"]
ATOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(family, built-in model, our model loaded from the built-in's save)."""
    family = request.param
    reference = reference_model(family)
    directory = tmp_path_factory.mktemp(f"ref{family}")
    reference.save_pretrained(directory)
    ours, info = QwenVLForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return family, reference, ours.eval()


def tokens_per_second(family):
    return 2 if family == "2.5" else None


# Each sample: (parts, image grids, video grids, second_per_grid_ts)
SAMPLES = {
    "text": ([[5, 6, 7, 8, 9, 10, 11]], [], [], []),
    "one_image": ([[5, 6, 7], ("image", (1, 8, 8)), [8, 9]], [(1, 8, 8)], [], []),
    # 6x6 merged is not a multiple of the 4x4 window; 4x8 merged is
    "two_images": (
        [[5], ("image", (1, 12, 12)), [8, 9], ("image", (1, 8, 16)), [10, 11, 12]], [(1, 12, 12), (1, 8, 16)], [], []
    ),
    "video": ([[5, 6], ("video", (4, 8, 8)), [8, 9, 10]], [], [(4, 8, 8)], [0.5]),
    "video_two_thirds": ([[5], ("video", (4, 4, 8)), [7, 8]], [], [(4, 4, 8)], [2 / 3]),
}


def sample_inputs(name, seed=0):
    parts, image_grids, video_grids, seconds = SAMPLES[name]
    inputs = {"ids": sequence(*parts)}
    if image_grids:
        inputs["pixel_values"], inputs["image_grid_thw"] = pixels(*image_grids, seed=seed)
    if video_grids:
        inputs["pixel_values_videos"], inputs["video_grid_thw"] = pixels(*video_grids, seed=seed + 100)
        inputs["second_per_grid_ts"] = torch.tensor(seconds)
    return inputs


def official(family, inputs):
    return official_positions(
        inputs["ids"], inputs.get("image_grid_thw", torch.zeros(0, 3)).tolist(),
        inputs.get("video_grid_thw", torch.zeros(0, 3)).tolist(), inputs.get("second_per_grid_ts", torch.zeros(0)).tolist(),
        image_id=IMAGE, video_id=VIDEO, tokens_per_second=tokens_per_second(family),
    )


def vision_kwargs(inputs):
    return {k: v for k, v in inputs.items() if k != "ids"}


@torch.no_grad()
def reference_logits(family, reference, inputs):
    positions = official(family, inputs)[:, None]
    ids = torch.tensor([inputs["ids"]])
    return reference(input_ids=ids, position_ids=positions, **vision_kwargs(inputs)).logits[0]


@torch.no_grad()
def reference_greedy(family, reference, inputs, steps):
    inputs = dict(inputs)
    tokens = []
    for _ in range(steps):
        next_token = int(reference_logits(family, reference, inputs)[-1].argmax())
        tokens.append(next_token)
        inputs["ids"] = inputs["ids"] + [next_token]
    return tokens


# --- window index: the worked examples of docs/design.md ------------------------------


def test_window_index_small_worked_example():
    window_index, cu = get_window_index(torch.tensor([[2, 8, 8]]), window_size=8, spatial_merge_size=2, patch_size=2)
    assert window_index.tolist() == [
        0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15,
        16, 17, 20, 21, 18, 19, 22, 23, 24, 25, 28, 29, 26, 27, 30, 31,
    ]
    assert cu.tolist() == [0, 16, 32, 48, 64, 80, 96, 112, 128]


def test_window_index_real_settings_worked_example():
    window_index, cu = get_window_index(torch.tensor([[1, 12, 12]]), window_size=112, spatial_merge_size=2, patch_size=14)
    assert window_index[:16].tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 18, 19, 20, 21]
    assert window_index[16:24].tolist() == [4, 5, 10, 11, 16, 17, 22, 23]
    assert cu.tolist() == [0, 64, 96, 128, 144]
    assert sorted(window_index.tolist()) == list(range(36))


def test_window_index_several_items_are_offset():
    grids = torch.tensor([[1, 4, 4], [2, 4, 8]])
    window_index, cu = get_window_index(grids, window_size=112, spatial_merge_size=2, patch_size=14)
    assert sorted(window_index.tolist()) == list(range(4 + 16))
    assert cu.tolist() == [0, 16, 48, 80]  # one window per frame: 4, then 8 and 8 merged tokens


# --- positions: the official rule, hand-checked -----------------------------------------------


def model_for_positions(family):
    vision = dict(VISION_25) if family == "2.5" else dict(VISION_2)
    return QwenVLModel(QwenVLConfig(vision_config=vision, **{**TEXT, **TOKEN_IDS}))


@pytest.fixture(scope="module")
def position_models():
    return {family: model_for_positions(family) for family in FAMILIES}


def test_positions_text_only(position_models):
    positions, deltas = position_models["2.5"].get_rope_index(torch.tensor([[5, 6, 7]]))
    assert positions[:, 0].tolist() == [[0, 1, 2]] * 3
    assert deltas.tolist() == [[0]]


def test_positions_image_hand_checked(position_models):
    ids = torch.tensor([sequence([5], ("image", (1, 4, 4)), [6])])  # text, start, 4 image tokens, end, text
    positions, deltas = position_models["2.5"].get_rope_index(ids, image_grid_thw=torch.tensor([[1, 4, 4]]))
    assert positions[0, 0].tolist() == [0, 1, 2, 2, 2, 2, 4, 5]
    assert positions[1, 0].tolist() == [0, 1, 2, 2, 3, 3, 4, 5]
    assert positions[2, 0].tolist() == [0, 1, 2, 3, 2, 3, 4, 5]
    assert deltas.tolist() == [[6 - 8]]


@pytest.mark.parametrize(
    "seconds, expected_times",
    [(0.5, [0, 1, 2, 3]), (1.0, [0, 2, 4, 6]), (2 / 3, [0, 1, 2, 4]), (2.0, [0, 4, 8, 12])],
)
def test_positions_video_time_is_absolute_for_qwen25(position_models, seconds, expected_times):
    ids = torch.tensor([sequence([5], ("video", (4, 2, 2)), [6])])
    positions, _ = position_models["2.5"].get_rope_index(
        ids, video_grid_thw=torch.tensor([[4, 2, 2]]), second_per_grid_ts=torch.tensor([seconds])
    )
    start = 2  # after the text token and <|vision_start|>
    assert positions[0, 0, 2:6].tolist() == [start + t for t in expected_times]
    assert positions[1, 0, 2:6].tolist() == [start] * 4
    # the official rule: text continues after the largest position of any axis (time included)
    assert positions[:, 0, 6].tolist() == [start + expected_times[-1] + 1] * 3


def test_positions_video_frame_index_for_qwen2(position_models):
    ids = torch.tensor([sequence([5], ("video", (4, 2, 2)), [6])])
    positions, _ = position_models["2"].get_rope_index(
        ids, video_grid_thw=torch.tensor([[4, 2, 2]]), second_per_grid_ts=torch.tensor([2.0])
    )
    assert positions[0, 0, 2:6].tolist() == [2, 3, 4, 5]
    assert positions[:, 0, 6].tolist() == [6, 6, 6]


def test_positions_text_after_long_video_continues_after_time(position_models):
    # 16 grids of 2 s at 2 tokens/s: time reaches 60; the 5.x reference would continue at start + 2
    ids = torch.tensor([sequence([5], ("video", (16, 4, 4)), [6, 7])])
    positions, deltas = position_models["2.5"].get_rope_index(
        ids, video_grid_thw=torch.tensor([[16, 4, 4]]), second_per_grid_ts=torch.tensor([2.0])
    )
    start = 2
    assert positions[0, 0, -4].item() == start + 60  # last video token's time
    assert positions[:, 0, -3].tolist() == [start + 61] * 3  # <|vision_end|>
    assert deltas.item() == (start + 63) + 1 - ids.shape[1]  # last position + 1 - length


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_match_the_official_rule_on_mixed_sequences(position_models, family):
    torch.manual_seed(0)
    model = position_models[family]
    for trial in range(20):
        parts, images, videos, seconds = [], [], [], []
        for _ in range(int(torch.randint(1, 5, ()))):
            parts.append(torch.randint(4, 200, (int(torch.randint(0, 4, ())),)).tolist())
            kind = "image" if torch.rand(()) < 0.5 else "video"
            grid = (1 if kind == "image" else int(torch.randint(1, 5, ())), 2 * int(torch.randint(1, 4, ())), 2 * int(torch.randint(1, 4, ())))
            parts.append((kind, grid))
            (images if kind == "image" else videos).append(grid)
            if kind == "video":
                seconds.append(float(torch.tensor([0.5, 2 / 3, 1.0, 1.5, 4.0])[torch.randint(0, 5, ())]))
        ids = sequence(*parts, [9])
        got, _ = model.get_rope_index(
            torch.tensor([ids]), torch.tensor(images) if images else None, torch.tensor(videos) if videos else None,
            torch.tensor(seconds) if seconds else None,
        )
        expected = official_positions(ids, images, videos, seconds, image_id=IMAGE, video_id=VIDEO, tokens_per_second=tokens_per_second(family))
        assert torch.equal(got[:, 0], expected), trial


def test_positions_padding_is_skipped(position_models):
    a = sequence([5, 6], ("image", (1, 4, 4)), [7])
    b = sequence([5, 6, 7, 8, 9, 10, 11, 12, 13, 14])
    grid = torch.tensor([[1, 4, 4]])
    ids, mask = left_pad([a, b])
    model = position_models["2.5"]
    batched, deltas = model.get_rope_index(ids, image_grid_thw=grid, attention_mask=mask)
    alone, alone_deltas = model.get_rope_index(torch.tensor([a]), image_grid_thw=grid)
    assert torch.equal(batched[:, 0, -len(a):], alone[:, 0])
    assert deltas[0].item() == alone_deltas.item()
    right_ids = torch.tensor([a + [PAD] * (len(b) - len(a)), b])
    right_mask = (torch.arange(len(b))[None] < torch.tensor([[len(a)], [len(b)]])).long()
    right, _ = model.get_rope_index(right_ids, image_grid_thw=grid, attention_mask=right_mask)
    assert torch.equal(right[:, 0, : len(a)], alone[:, 0])


def test_positions_accept_mm_token_type_ids_instead_of_ids(position_models):
    ids = torch.tensor([sequence([5], ("image", (1, 4, 4)), [6])])
    types = (ids == IMAGE).long()
    grid = torch.tensor([[1, 4, 4]])
    from_types, _ = position_models["2.5"].get_rope_index(None, grid, mm_token_type_ids=types)
    from_ids, _ = position_models["2.5"].get_rope_index(ids, grid)
    assert torch.equal(from_types, from_ids)


# --- parity with the built-in model -----------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLES))
def test_logits_match_reference(pair, name):
    family, reference, ours = pair
    inputs = sample_inputs(name)
    expected = reference_logits(family, reference, inputs)
    with torch.no_grad():
        got = ours(input_ids=torch.tensor([inputs["ids"]]), **vision_kwargs(inputs)).logits[0]
    assert (got - expected).abs().max() < ATOL


def batch_of_three():
    names = ["two_images", "text", "one_image"]
    samples = [sample_inputs(name, seed=i) for i, name in enumerate(names)]
    ids, mask = left_pad([s["ids"] for s in samples])
    images = [s for s in samples if "pixel_values" in s]
    batch = dict(
        input_ids=ids, attention_mask=mask,
        pixel_values=torch.cat([s["pixel_values"] for s in images]),
        image_grid_thw=torch.cat([s["image_grid_thw"] for s in images]),
    )
    return samples, batch


def test_left_padded_batch_matches_each_sample_alone(pair):
    family, reference, ours = pair
    samples, batch = batch_of_three()
    with torch.no_grad():
        logits = ours(**batch).logits
    for i, sample in enumerate(samples):
        expected = reference_logits(family, reference, sample)
        assert (logits[i, -len(sample["ids"]):] - expected).abs().max() < ATOL, i


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_tokens_match_reference(pair, use_cache):
    family, reference, ours = pair
    samples, batch = batch_of_three()
    with torch.no_grad():
        generated = ours.generate(
            **batch, max_new_tokens=24, do_sample=False, use_cache=use_cache, pad_token_id=PAD, eos_token_id=None
        )
    new_tokens = generated[:, batch["input_ids"].shape[1]:].tolist()
    for i, sample in enumerate(samples):
        assert new_tokens[i] == reference_greedy(family, reference, sample, 24), i


def test_video_greedy_tokens_match_reference(pair):
    family, reference, ours = pair
    inputs = sample_inputs("video")
    with torch.no_grad():
        generated = ours.generate(
            input_ids=torch.tensor([inputs["ids"]]), **vision_kwargs(inputs), max_new_tokens=8, do_sample=False,
            pad_token_id=PAD, eos_token_id=None,
        )
    assert generated[0, len(inputs["ids"]):].tolist() == reference_greedy(family, reference, inputs, 8)


def test_beam_search_and_sampling_expand_pixels_per_sample(pair):
    _, _, ours = pair
    samples, batch = batch_of_three()
    settings = dict(max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        beams = ours.generate(**batch, **settings)
        sampled = ours.generate(**batch, max_new_tokens=4, do_sample=True, num_return_sequences=2, pad_token_id=PAD)
        for i, sample in enumerate(samples):
            alone = ours.generate(input_ids=torch.tensor([sample["ids"]]), **vision_kwargs(sample), **settings)
            assert beams[i, -4:].tolist() == alone[0, -4:].tolist(), i
    assert sampled.shape == (6, batch["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_vision_tower_matches_reference(pair, implementation):
    _, reference, ours = pair
    pixel_values, grid = pixels((1, 12, 12), (2, 8, 16), (1, 28, 20))
    ours.model.visual.config._attn_implementation = implementation
    try:
        with torch.no_grad():
            got = ours.model.visual(pixel_values, grid)
            expected = reference.model.visual(pixel_values, grid_thw=grid)
            expected = getattr(expected, "pooler_output", expected)  # a tensor on transformers 4.x
    finally:
        ours.model.visual.config._attn_implementation = "sdpa"
    assert (got - expected).abs().max() < ATOL


def test_eager_language_model_matches_sdpa(pair):
    _, _, ours = pair
    _, batch = batch_of_three()
    with torch.no_grad():
        sdpa = ours(**batch).logits
        ours.config._attn_implementation = "eager"
        try:
            eager = ours(**batch).logits
        finally:
            ours.config._attn_implementation = "sdpa"
    mask = batch["attention_mask"].bool()
    assert (sdpa[mask] - eager[mask]).abs().max() < ATOL


def test_loss_matches_reference(pair):
    family, reference, ours = pair
    inputs = sample_inputs("one_image")
    ids = torch.tensor([inputs["ids"]])
    labels = ids.clone()
    labels[:, :-3] = -100
    positions = official(family, inputs)[:, None]
    with torch.no_grad():
        expected = reference(input_ids=ids, position_ids=positions, labels=labels, **vision_kwargs(inputs)).loss
        got = ours(input_ids=ids, labels=labels, **vision_kwargs(inputs)).loss
    assert abs(got.item() - expected.item()) < ATOL


def test_gradient_checkpointing_gives_the_same_gradients(pair):
    _, _, ours = pair
    inputs = sample_inputs("one_image")
    ids = torch.tensor([inputs["ids"]])

    def gradients():
        ours.zero_grad()
        ours(input_ids=ids, labels=ids, **vision_kwargs(inputs)).loss.backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    ours.train()
    try:
        plain = gradients()
        ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert ours.model.visual.gradient_checkpointing and ours.model.language_model.gradient_checkpointing
        checkpointed = gradients()
    finally:
        ours.gradient_checkpointing_disable()
        ours.eval()
        ours.zero_grad()
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_cache_is_accepted_under_both_names(pair):
    _, _, ours = pair
    inputs = sample_inputs("one_image")
    ids = torch.tensor([inputs["ids"]])
    with torch.no_grad():
        full = ours(input_ids=ids, **vision_kwargs(inputs)).logits
        prefix = ours(input_ids=ids[:, :-2], use_cache=True, **vision_kwargs(inputs))
        cache = prefix[CACHE_NAME]
        step = ours(input_ids=ids[:, -2:], past_key_values=cache, rope_deltas=prefix.rope_deltas)
    assert (step.logits - full[:, -2:]).abs().max() < ATOL


def test_tied_embeddings_are_honoured(tmp_path):
    reference = reference_model("2.5", tie=True)
    reference.save_pretrained(tmp_path)
    ours = QwenVLForConditionalGeneration.from_pretrained(tmp_path)
    assert ours.lm_head.weight.data_ptr() == ours.model.language_model.embed_tokens.weight.data_ptr()
    assert torch.equal(ours.lm_head.weight, reference.lm_head.weight)


# --- checkpoint layouts ----------------------------------------------------------------------


def hub_layout_name(key):
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key.replace("model.language_model.", "model.", 1)


def test_hub_layout_loads_with_the_same_logits(pair, tmp_path):
    family, reference, ours = pair
    state = {hub_layout_name(k): v.contiguous() for k, v in reference.state_dict().items()}
    assert any(k.startswith("visual.") for k in state) and any(k.startswith("model.layers.") for k in state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    vision = dict(VISION_25) if family == "2.5" else dict(VISION_2)
    hub_config = dict(
        TEXT, **TOKEN_IDS, model_type="qwen2_5_vl" if family == "2.5" else "qwen2_vl", vision_config=vision,
        tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096, max_window_layers=2,
    )
    (tmp_path / "config.json").write_text(json.dumps(hub_config))
    loaded, info = QwenVLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = sample_inputs("two_images")
    with torch.no_grad():
        got = loaded(input_ids=torch.tensor([inputs["ids"]]), **vision_kwargs(inputs)).logits
        expected = ours(input_ids=torch.tensor([inputs["ids"]]), **vision_kwargs(inputs)).logits
    assert torch.equal(got, expected)


def test_save_writes_one_canonical_layout_and_reloads(pair, tmp_path):
    _, _, ours = pair
    ours.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert all(k.startswith(("model.language_model.", "model.visual.", "lm_head.")) for k in keys)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwenvl"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_qwenvl.QwenVLForConditionalGeneration"
    assert os.path.exists(tmp_path / "modeling_qwenvl.py") and os.path.exists(tmp_path / "configuration_qwenvl.py")
    reloaded, info = QwenVLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for (name, a), b in zip(ours.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_auto_classes_load_a_saved_directory_with_remote_code(pair, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    _, _, ours = pair
    ours.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path, trust_remote_code=True).model_type == "qwenvl"
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(model).__name__ == "QwenVLForConditionalGeneration"
    assert type(AutoModel.from_pretrained(tmp_path, trust_remote_code=True)).__name__ == "QwenVLModel"
    inputs = sample_inputs("one_image")
    with torch.no_grad():
        got = model(input_ids=torch.tensor([inputs["ids"]]), **vision_kwargs(inputs)).logits
        expected = ours(input_ids=torch.tensor([inputs["ids"]]), **vision_kwargs(inputs)).logits
    assert torch.equal(got, expected)


# --- configurations ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OFFICIAL_CONFIGS))
def test_official_configs_have_the_builtin_parameter_count(name):
    from transformers import (
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
    )

    hub = OFFICIAL_CONFIGS[name]
    if hub["model_type"] == "qwen2_vl":
        builtin_class, builtin_config = Qwen2VLForConditionalGeneration, Qwen2VLConfig
    else:
        builtin_class, builtin_config = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig
    with torch.device("meta"):
        builtin = builtin_class(builtin_config(**hub))
        ours = QwenVLForConditionalGeneration(QwenVLConfig(**hub))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in builtin.parameters())


def test_config_reads_both_families_and_both_shapes(tmp_path):
    qwen2 = QwenVLConfig(**OFFICIAL_CONFIGS["Qwen2-VL-7B"])
    vision = qwen2.vision_config
    assert (vision.norm_type, vision.gated_mlp, vision.fullatt_block_indexes, vision.tokens_per_second) == (
        "layernorm", False, None, None
    )
    assert (vision.hidden_size, vision.intermediate_size, vision.out_hidden_size) == (1280, 5120, 3584)
    qwen25 = QwenVLConfig(**OFFICIAL_CONFIGS["Qwen2.5-VL-3B"])
    vision = qwen25.vision_config
    assert (vision.norm_type, vision.gated_mlp, vision.fullatt_block_indexes, vision.tokens_per_second) == (
        "rmsnorm", True, [7, 15, 23, 31], 2
    )
    assert qwen25.tie_word_embeddings and qwen25.mrope_section == [16, 24, 24] and qwen25.hidden_size == 2048
    # transformers 5 shape: nested text_config with rope_parameters
    nested = dict(
        model_type="qwen2_5_vl", vision_config=OFFICIAL_CONFIGS["Qwen2.5-VL-3B"]["vision_config"],
        text_config=dict(
            hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
            intermediate_size=11008, vocab_size=151936, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
        ),
        tie_word_embeddings=True,
    )
    (tmp_path / "config.json").write_text(json.dumps(nested))
    loaded = QwenVLConfig.from_pretrained(tmp_path)
    for field in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "mrope_section", "rope_theta"):
        assert getattr(loaded, field) == getattr(qwen25, field), field
    assert loaded.vision_config.to_diff_dict() == qwen25.vision_config.to_diff_dict()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mrope_section=[16, 24, 23]), "mrope_section"),
        (dict(rope_scaling={"type": "mrope", "mrope_section": [8, 8]}), "mrope_section"),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope type"),
        (dict(num_attention_heads=5), "divisible"),
        (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(vision_config=dict(hidden_size=30, num_heads=4)), "divisible by num_heads"),
        (dict(vision_config=dict(window_size=100)), "window_size"),
        (dict(vision_config=dict(fullatt_block_indexes=[40])), "fullatt_block_indexes"),
        (dict(vision_config=dict(norm_type="batchnorm")), "norm_type"),
    ],
)
def test_bad_configs_are_refused_with_a_clear_message(change, message):
    with pytest.raises(ValueError, match=message):
        QwenVLConfig(**change)


# --- bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(image_grid_thw=torch.tensor([[1, 8, 10]])), ValueError, "describes 80 patches"),
        (dict(image_grid_thw=torch.tensor([[1, 7, 8]])), ValueError, "divisible by spatial_merge_size"),
        (dict(image_grid_thw=torch.tensor([[0, 8, 8]])), ValueError, "positive"),
        (dict(image_grid_thw=torch.tensor([[1.0, 8, 8]])), TypeError, "integers"),
        (dict(image_grid_thw=torch.tensor([1, 8, 8])), ValueError, r"shape \[n, 3\]"),
        (dict(image_grid_thw=None), ValueError, "without image_grid_thw"),
        (dict(pixel_values=torch.zeros(64, 100)), ValueError, "pixel values must have shape"),
        (dict(pixel_values=torch.zeros(64, 1176, dtype=torch.long)), TypeError, "floating point"),
        (dict(input_ids=torch.tensor([sequence([5], ("image", (1, 8, 8)))[:-4]])), ValueError, "do not match"),
        (dict(input_ids=torch.tensor([[5, 6, 7]])), ValueError, "do not match"),
        (dict(input_ids=torch.tensor([[5, 6, 1000]])), ValueError, "input_ids must lie in"),
        (dict(input_ids=torch.tensor([[5.0, 6.0]])), TypeError, "integer token ids"),
    ],
)
def test_bad_model_inputs_get_clear_errors(pair, change, error, message):
    _, _, ours = pair
    inputs = sample_inputs("one_image")
    kwargs = dict(input_ids=torch.tensor([inputs["ids"]]), **vision_kwargs(inputs))
    kwargs.update(change)
    with pytest.raises(error, match=message), torch.no_grad():
        ours(**kwargs)


def test_positions_refuse_grids_that_do_not_match_placeholders(position_models):
    model = position_models["2.5"]
    ids = torch.tensor([sequence([5], ("image", (1, 4, 4)), [6])])
    with pytest.raises(ValueError, match="more <\\|image_pad\\|> tokens"):
        model.get_rope_index(ids)
    with pytest.raises(ValueError, match="placeholders for 1"):
        model.get_rope_index(ids, image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]))
    with pytest.raises(ValueError, match="truncated"):
        model.get_rope_index(ids, image_grid_thw=torch.tensor([[1, 8, 8]]))


def test_continuing_a_cache_without_rope_deltas_is_refused(pair):
    _, _, ours = pair
    inputs = sample_inputs("one_image")
    ids = torch.tensor([inputs["ids"]])
    with torch.no_grad():
        prefix = ours(input_ids=ids, use_cache=True, **vision_kwargs(inputs))
        cache = prefix[CACHE_NAME]
        with pytest.raises(ValueError, match="rope_deltas"):
            ours(input_ids=ids[:, -1:], past_key_values=cache)
