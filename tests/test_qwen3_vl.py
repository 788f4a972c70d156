"""Qwen3-VL (dense and MoE) in our classes, against transformers' own `qwen3_vl` / `qwen3_vl_moe` of the same line.

Tiny random models are built with the built-in classes (`tiny_qwen3.py`), saved in their layout and loaded by ours.
Videos are written as the Qwen code writes them (transformers 4.57's processor and the official training code): a
`<t seconds>` timestamp and a span of its own per temporal patch. transformers 5.x's processor keeps an extra outer
<|vision_start|>...<|vision_end|> pair around a video; the model side is the same given the same token ids.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AttentionInterface

from configuration_qwenvl import QwenVLConfig
from modeling_qwenvl import QwenVLForConditionalGeneration, QwenVLModel, get_rope_index, mrope_axes
from official_configs_qwen3 import OFFICIAL_QWEN3_CONFIGS, PARAMETER_COUNTS
from test_portable import hub  # noqa: F401  (the recording stand-in for the Hub)
from tiny_qwen3 import (
    VIDEO, VISION_END, VISION_START, builtin_inputs, left_pad, mm_token_types, pixels, reference_model, sequence,
)

TOLERANCE = 2e-5  # float32 logits, the built-in of the same transformers line
VARIANTS = ["dense", "moe"]


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, tmp_path_factory):
    """(variant, built-in model, ours loaded from the built-in's saved folder, that folder)."""
    reference = reference_model(request.param)
    directory = tmp_path_factory.mktemp(f"builtin-{request.param}")
    reference.save_pretrained(directory)
    ours = QwenVLForConditionalGeneration.from_pretrained(directory).eval()
    return request.param, reference, ours, directory


def one_image():
    pv, grid = pixels((1, 4, 6))
    return dict(input_ids=torch.tensor([sequence([5, 6], ("image", (1, 4, 6)), [7, 8])]), pixel_values=pv, image_grid_thw=grid)


def odd_images():
    grids = [(1, 2, 6), (1, 6, 2), (1, 4, 10)]  # odd sizes in merged tokens: 1 x 3, 3 x 1, 2 x 5
    pv, grid = pixels(*grids)
    ids = sequence([5], ("image", grids[0]), [6, 7], ("image", grids[1]), [8], ("image", grids[2]), [9])
    return dict(input_ids=torch.tensor([ids]), pixel_values=pv, image_grid_thw=grid)


def video():
    pv, grid = pixels((3, 4, 4), seed=1)  # three temporal patches, each after its own timestamp
    ids = sequence([5, 6], ("video", (3, 4, 4), [0.3, 1.3, 2.4]), [7, 8])
    return dict(input_ids=torch.tensor([ids]), pixel_values_videos=pv, video_grid_thw=grid)


def video_outer_pair():
    """transformers 5.x's processor layout: the same spans inside one more <|vision_start|> ... <|vision_end|>."""
    inputs = video()
    spans = sequence(("video", (3, 4, 4), [0.3, 1.3, 2.4]))
    inputs["input_ids"] = torch.tensor([[5, 6, VISION_START] + spans + [VISION_END, 7, 8]])
    return inputs


def padded_batch():
    """Left padding; an image and a video interleaved, two images, text only."""
    samples = [
        sequence([5], ("image", (1, 4, 4)), [6], ("video", (2, 4, 6), [0.5, 1.5]), [7, 8]),
        sequence([9, 10, 11], ("image", (1, 2, 4)), [12], ("image", (1, 4, 2))),
        sequence([13, 14, 15, 16]),
    ]
    ids, mask = left_pad(samples)
    pv, grid = pixels((1, 4, 4), (1, 2, 4), (1, 4, 2))
    pvv, vgrid = pixels((2, 4, 6), seed=2)
    return dict(
        input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, pixel_values_videos=pvv,
        video_grid_thw=vgrid,
    )


INPUTS = {
    "text": lambda: dict(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]])),
    "one image": one_image,
    "odd images": odd_images,
    "video": video,
    "video, 5.x layout": video_outer_pair,
    "padded batch": padded_batch,
}


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def valid(logits, inputs):
    """Logits of real tokens only (padding rows differ between implementations and mean nothing)."""
    mask = inputs.get("attention_mask")
    return logits if mask is None else logits[mask.bool()]


@pytest.mark.parametrize("name", list(INPUTS))
def test_logits_match_the_builtin(pair, name):
    _, reference, ours, _ = pair
    inputs = INPUTS[name]()
    expected = valid(logits_of(reference, builtin_inputs(inputs)), inputs)
    for implementation in ("sdpa", "eager"):
        ours.set_attn_implementation(implementation)
        got = valid(logits_of(ours, inputs), inputs)
        assert (got - expected).abs().max() < TOLERANCE, implementation
    ours.set_attn_implementation("sdpa")
    assert expected.abs().max() > 1.0  # the comparison bites


@pytest.mark.parametrize("name", ["odd images", "video", "video, 5.x layout", "padded batch"])
def test_positions_match_the_builtin(pair, name):
    _, reference, ours, _ = pair
    inputs = INPUTS[name]()
    grids = {key: inputs.get(key) for key in ("image_grid_thw", "video_grid_thw", "attention_mask")}
    extra = {} if transformers.__version__.startswith("4.") else {"mm_token_type_ids": mm_token_types(inputs["input_ids"])}
    expected, expected_deltas = reference.model.get_rope_index(input_ids=inputs["input_ids"], **grids, **extra)
    got, deltas = ours.model.get_rope_index(inputs["input_ids"], **grids)
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    assert torch.equal(got[:, mask], expected[:, mask])
    if transformers.__version__.startswith("4."):  # 4.57 counts padding in the length (its decoding then adds the
        deltas = deltas.flatten() - (~mask).sum(-1)  # padded cache position: the same positions either way)
    assert torch.equal(deltas.flatten(), expected_deltas.flatten())


def test_video_frames_are_spans_of_their_own_with_time_zero(pair):
    _, _, ours, _ = pair
    inputs = video()
    positions, _ = ours.model.get_rope_index(inputs["input_ids"], video_grid_thw=inputs["video_grid_thw"])
    frames = inputs["input_ids"][0] == VIDEO
    starts = positions[0, 0, frames].view(3, 4)[:, 0]  # each frame's time axis: the text position where it starts
    assert torch.equal(positions[0, 0, frames].view(3, 4), starts[:, None].expand(3, 4))  # offset 0 within a frame
    assert bool((starts[1:] > starts[:-1]).all())


def test_greedy_tokens_with_and_without_cache_and_as_the_builtin(pair):
    _, reference, ours, _ = pair
    inputs = padded_batch()
    with torch.no_grad():
        cached = ours.generate(**inputs, max_new_tokens=6, do_sample=False)
        uncached = ours.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
        builtin = reference.generate(**builtin_inputs(inputs), max_new_tokens=6, do_sample=False)
    assert cached.tolist() == uncached.tolist() == builtin.tolist()


def test_beam_search_repeats_video_frames_per_sample(pair):
    """Beams repeat each sample's vision items; a Qwen3-VL video is counted by its spans, one per temporal patch."""
    _, reference, ours, _ = pair
    inputs = padded_batch()
    options = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    with torch.no_grad():
        got = ours.generate(**inputs, **options)
        assert got.shape[0] == 2 * inputs["input_ids"].shape[0]
        if transformers.__version__.startswith("4."):
            pytest.skip("4.57's own beam expansion counts a Qwen3-VL video once per span and fails on it")
        expected = reference.generate(**builtin_inputs(inputs), **options)
    assert got.tolist() == expected.tolist()


def test_deepstack_changes_the_logits(pair):
    """With the DeepStack mergers' outputs zeroed the logits move: the features do reach the decoder."""
    _, _, ours, directory = pair
    inputs = padded_batch()
    with_deepstack = valid(logits_of(ours, inputs), inputs)
    without = QwenVLForConditionalGeneration.from_pretrained(directory).eval()
    with torch.no_grad():
        for merger in without.model.visual.deepstack_merger_list:
            merger.mlp[2].weight.zero_()
            merger.mlp[2].bias.zero_()
    assert (valid(logits_of(without, inputs), inputs) - with_deepstack).abs().max() > 1e-2


def test_chunked_vision_encoding_carries_deepstack(pair):
    _, _, ours, _ = pair
    inputs = padded_batch()
    whole = logits_of(ours, inputs)
    ours.model.visual.config.max_patches_per_chunk = 16  # every frame its own chunk
    try:
        chunked = logits_of(ours, inputs)
    finally:
        ours.model.visual.config.max_patches_per_chunk = 65536
    assert (chunked - whole).abs().max() < 1e-5


# ---- loading and saving ------------------------------------------------------------------------------------------


def tensor_shapes(path):
    with safe_open(str(path), framework="pt") as file:
        return {name: file.get_slice(name).get_shape() for name in file.keys()}


def test_config_reads_the_official_switches(pair):
    variant, reference, ours, _ = pair
    config = ours.config
    assert config.family == "qwen3_vl"
    assert (config.head_dim, config.attention_bias, config.qk_norm, config.mrope_interleaved) == (32, False, True, True)
    vision = config.vision_config
    assert (vision.patch_embed_bias, vision.num_position_embeddings, vision.text_timestamps) == (True, 64, True)
    assert (vision.norm_type, vision.gated_mlp, vision.fullatt_block_indexes) == ("layernorm", False, None)
    assert config.num_experts == (8 if variant == "moe" else 0)


def test_saved_in_the_hub_layout_and_reloaded(pair, tmp_path):
    """Our save writes the official names (`linear_fc1`, `merger.norm`, experts [E, hidden, 2I]); the folder loads
    back to the same logits, here and in a fresh process through the Auto classes (code from the folder only)."""
    variant, reference, ours, _ = pair
    ours.save_pretrained(tmp_path)
    shapes = tensor_shapes(tmp_path / "model.safetensors")
    assert set(shapes) == set(reference.state_dict())  # untied: lm_head.weight is saved
    if variant == "moe":
        assert shapes["model.language_model.layers.0.mlp.experts.gate_up_proj"] == [8, 64, 48]
        assert shapes["model.language_model.layers.0.mlp.experts.down_proj"] == [8, 24, 64]
    inputs = padded_batch()
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = logits_of(ours, inputs)
    assert torch.equal(logits_of(QwenVLForConditionalGeneration.from_pretrained(tmp_path).eval(), inputs), expected)
    if variant == "dense":
        return  # one fresh process (40 s on a busy machine) for the variant with the most to load
    with torch.no_grad():
        expected_tokens = ours.generate(**inputs, max_new_tokens=4, do_sample=False)
    script = (
        "import sys, torch, transformers\n"
        "d = sys.argv[1]\n"
        "inputs = torch.load(d + '/inputs.pt')\n"
        "model = transformers.AutoModelForImageTextToText.from_pretrained(d, trust_remote_code=True).eval()\n"
        "body = transformers.AutoModel.from_pretrained(d, trust_remote_code=True)\n"
        "assert type(body).__name__ == 'QwenVLModel' and type(model).__module__.startswith('transformers_modules')\n"
        "with torch.no_grad():\n"
        "    print(model.generate(**inputs, max_new_tokens=4, do_sample=False).tolist())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-I", "-c", script, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected_tokens.tolist()


def test_official_folder_converts_and_loads(pair, tmp_path):
    """An official-layout folder (hub names, experts [E, hidden, 2I], nested config.json) through convert_checkpoint.py
    gives the built-in's logits."""
    import convert_checkpoint

    _, reference, ours, directory = pair
    official = tmp_path / "official"
    ours.save_pretrained(official)  # the hub layout
    (official / "config.json").write_text((directory / "config.json").read_text())  # the official nested config
    written = convert_checkpoint.convert(str(official), str(tmp_path / "converted"))
    assert "family qwen3_vl" in written["config.json"]
    shipped = (Path(convert_checkpoint.ROOT) / convert_checkpoint.QWEN3_CHAT_TEMPLATE).read_text()
    assert (tmp_path / "converted" / "chat_template.jinja").read_text() == shipped  # the source had none
    # nor a preprocessor_config.json: the converted folder gets Qwen3-VL's official settings, not Qwen2.5's
    processor = json.loads((tmp_path / "converted" / "preprocessor_config.json").read_text())
    assert (processor["patch_size"], processor["merge_size"], processor["image_mean"]) == (16, 2, [0.5, 0.5, 0.5])
    assert (processor["min_pixels"], processor["max_pixels"]) == (65536, 16777216)
    converted = QwenVLForConditionalGeneration.from_pretrained(tmp_path / "converted").eval()
    inputs = video()
    expected = logits_of(reference, builtin_inputs(inputs))
    assert (logits_of(converted, inputs) - expected).abs().max() < TOLERANCE


def test_auto_model_loads_the_body(pair):
    _, reference, _, directory = pair
    body = QwenVLModel.from_pretrained(directory)
    assert type(body).__name__ == "QwenVLModel"
    inputs = one_image()
    with torch.no_grad():
        expected = reference.model(**builtin_inputs(inputs)).last_hidden_state
        got = body(**inputs).last_hidden_state
    assert (got - expected).abs().max() < TOLERANCE


# ---- official configurations --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OFFICIAL_QWEN3_CONFIGS))
def test_official_parameter_counts(name):
    config = QwenVLConfig(**OFFICIAL_QWEN3_CONFIGS[name])
    assert config.family == "qwen3_vl"
    with torch.device("meta"):
        model = QwenVLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[name]


def test_interleaved_mrope_axes():
    """[24, 20, 20]: T H W repeated 20 times, then T for the last four pairs (spec 1.3); chunked for Qwen2/2.5."""
    assert mrope_axes([24, 20, 20], True).tolist() == [0, 1, 2] * 20 + [0] * 4
    assert mrope_axes([16, 24, 24], False).tolist() == [0] * 16 + [1] * 24 + [2] * 24
    assert mrope_axes([6, 5, 5], True).tolist() == [0, 1, 2] * 5 + [0]


# ---- bad inputs --------------------------------------------------------------------------------------------------


def test_a_video_written_as_one_span_is_refused_with_the_layout_named():
    config = QwenVLConfig(**OFFICIAL_QWEN3_CONFIGS["Qwen3-VL-2B-Instruct"])
    ids = torch.tensor([[5, 151652] + [151656] * 8 + [151653, 6]])  # two temporal patches in one span
    with pytest.raises(ValueError, match="each temporal patch of a video as a span of its own"):
        get_rope_index(config, ids, video_grid_thw=torch.tensor([[2, 4, 4]]))


def test_more_deepstack_levels_than_decoder_layers_are_refused():
    official = OFFICIAL_QWEN3_CONFIGS["Qwen3-VL-2B-Instruct"]
    with pytest.raises(ValueError, match="3 DeepStack levels"):
        QwenVLConfig(**dict(official, text_config=dict(official["text_config"], num_hidden_layers=2)))


# ---- serving -----------------------------------------------------------------------------------------------------


def test_vllm_transformers_backend_is_refused():
    """vLLM's Transformers backend builds the model with attention "vllm" and passes only the main vision tokens:
    DeepStack would be lost silently, so a DeepStack model refuses to be built that way."""
    AttentionInterface.register("vllm", lambda module, q, k, v, mask, **kwargs: (q.transpose(1, 2), None))
    config = QwenVLConfig(**OFFICIAL_QWEN3_CONFIGS["Qwen3-VL-2B-Instruct"])
    config._attn_implementation = "vllm"
    with torch.device("meta"), pytest.raises(ValueError, match="native Qwen3-VL"):
        QwenVLModel(config)


def test_pipeline_and_push_of_a_qwen3_folder(tmp_path, hub, monkeypatch):
    """A Qwen3-VL folder as a converted checkpoint holds it (model, the real tokenizer, the official preprocessor
    settings, the Qwen3 chat template) answers through pipeline("image-text-to-text") what generate() gives, and
    push_to_hub (to a recording stand-in for the Hub) uploads the model and processor files."""
    from PIL import Image
    from test_qwen3_vl_processor import qwen3_folder
    from tiny_qwen3 import TEXT, VISION

    torch.manual_seed(0)
    text = dict(TEXT, vocab_size=151936, model_type="qwen3_vl_text")  # the real tokenizer's ids
    config = QwenVLConfig(text_config=text, vision_config=dict(VISION, model_type="qwen3_vl"))
    assert config.family == "qwen3_vl" and config.image_token_id == 151655
    folder = qwen3_folder(tmp_path)
    QwenVLForConditionalGeneration(config).save_pretrained(folder)
    pipe = transformers.pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    picture = Image.new("RGB", (96, 64), "red")
    messages = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "Red?"}]}]
    out = pipe(text=messages, max_new_tokens=4, generate_kwargs={"do_sample": False}, return_full_text=False)
    inputs = pipe.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        tokens = pipe.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = pipe.processor.batch_decode(tokens[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert out[0]["generated_text"] == expected
    monkeypatch.chdir(tmp_path)
    pipe.model.push_to_hub("someone/tiny-qwen3-vl")
    pipe.processor.push_to_hub("someone/tiny-qwen3-vl")
    uploaded = {name for commit in hub.commits for name in commit.files}
    assert {"model.safetensors", "config.json", "modeling_qwenvl.py", "processing_qwenvl.py", "tokenizer.json"} <= uploaded
