"""Qwen-VL (2023): our classes, processor and conversion against the golden vectors of the original remote code.

tests/golden/qwen_vl_2023/ (README.md there) holds a tiny checkpoint in the original layout and what the original
code computed from it: pixels, vision and Resampler outputs, full logits, greedy tokens with their step logits,
the dynamic-NTK and logn cases, and token ids of the tokenizer and make_context.

The original processor writes an image's path bytes into its 256 span positions; ours writes 256 <imgpad> (the
pixels travel in pixel_values). No logit depends on those ids (the span's embeddings are replaced), so the model is
fed the golden ids with the span rewritten, and token ids are compared with each span taken as a whole.
"""

import base64
import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

import convert_checkpoint
from configuration_qwenvl import QwenVLConfig
from modeling_qwenvl import QwenVLForConditionalGeneration, resize_table, sincos_table
from processing_qwenvl import QwenVLProcessor
from tools import build_qwen_vl_tokenizer

GOLDEN = Path(__file__).parent / "golden" / "qwen_vl_2023"
IMG, END, PAD = 151857, 151858, 151859
STOP = [151643, 151645, 151644]  # <|endoftext|>, and the original's stop words <|im_end|>, <|im_start|>
ATOL = 2e-5
# The resized position tables: ours is one weighted gather of 16 taps, F.interpolate's two passes of 4 taps, so the
# float32 roundings differ (a few ulp of entries near 4).
RESIZE_ATOL = 5e-6


@pytest.fixture(scope="module")
def golden():
    return load_file(GOLDEN / "golden.safetensors")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The tiny checkpoint as the original ships it: its config.json (and the seq_length-64 variants) beside the
    unpacked model.safetensors, keys transformer.* / lm_head."""
    root = tmp_path_factory.mktemp("qwen_vl_2023")
    weights = root / "model.safetensors"
    with gzip.open(GOLDEN / "model.safetensors.gz") as packed, open(weights, "wb") as unpacked:
        shutil.copyfileobj(packed, unpacked)
    folders = {}
    for name in ("config", "config_seq64", "config_seq64_logn_only", "config_seq64_ntk_only"):
        folder = root / name
        folder.mkdir()
        shutil.copy(GOLDEN / f"{name}.json", folder / "config.json")
        os.link(weights, folder / "model.safetensors")
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def loaded(official):
    """The tiny checkpoint loaded from the original folder as it is, once per config."""
    models = {}

    def load(config):
        if config not in models:
            models[config] = QwenVLForConditionalGeneration.from_pretrained(official[config]).eval()
        return models[config]

    return load


@pytest.fixture(scope="module")
def model(loaded):
    return loaded("config")


@pytest.fixture(scope="module")
def pictures():
    return [Image.open(GOLDEN / "image_1.png"), Image.open(GOLDEN / "image_2.png")]


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    dst = tmp_path_factory.mktemp("converted") / "qwen-vl-tiny"
    convert_checkpoint.convert(official["config"], dst)
    return dst


@pytest.fixture(scope="module")
def processor(converted):
    return QwenVLProcessor.from_pretrained(converted)


def pixel_rows(pixel_values):
    """Golden pixels [n, 3, H, W] as our patch rows [n * h * w, 3 * 14 * 14] (raster order) and grids."""
    n, c, height, width = pixel_values.shape
    h, w = height // 14, width // 14
    rows = pixel_values.view(n, c, h, 14, w, 14).permute(0, 2, 4, 1, 3, 5).reshape(n * h * w, c * 14 * 14)
    return rows, torch.tensor([[1, h, w]] * n)


def case_inputs(golden, case):
    """A golden prompt with each image span's path bytes rewritten to <imgpad>, and the pixels of its images."""
    ids = golden[f"{case}.input_ids"][None].clone()
    starts = (ids[0] == IMG).nonzero().flatten().tolist()
    for start in starts:
        ids[0, start + 1 : start + 257] = PAD
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if starts:
        rows, grid = pixel_rows(golden["pixel_values"])
        inputs.update(pixel_values=rows[: 324 * len(starts)], image_grid_thw=grid[: len(starts)])
    return inputs


def spans_whole(ids):
    """Token ids with each <img> ... </img> span as one item (what lies inside is the path or the pads)."""
    ids, out, i = list(ids), [], 0
    while i < len(ids):
        if ids[i] == IMG:
            i = ids.index(END, i)
            out.append("<img>...</img>")
        else:
            out.append(ids[i])
        i += 1
    return out


def max_diff(got, expected):
    return (got - expected).abs().max().item()


# ---- the model, against the original code ------------------------------------------------------------------------


def test_official_parameter_count():
    config = QwenVLConfig.from_pretrained(GOLDEN / "official_config.json")
    with torch.device("meta"):
        model = QwenVLForConditionalGeneration(config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    visual = model.model.visual
    assert count(model) == 9_656_935_168
    assert count(visual) - count(visual.merger) == 1_842_770_688  # ViT: conv, position table, ln_pre, 48 blocks
    assert count(visual.merger) == 92_839_936  # Resampler with its frozen sin-cos table, ln_post and proj
    assert count(model.model.language_model) + count(model.lm_head) == 7_721_324_544
    assert config.family == "qwen_vl" and config.intermediate_size == 11008 and config.num_key_value_heads == 32


def test_vision_tower_and_resampler(model, golden):
    visual = model.model.visual
    seen = {}
    hooks = [
        visual.ln_pre.register_forward_pre_hook(lambda m, args: seen.update(ln_pre_in=args[0])),
        visual.blocks[-1].register_forward_hook(lambda m, args, out: seen.update(blocks_out=out)),
        visual.merger.ln_post.register_forward_pre_hook(lambda m, args: seen.update(resampler_out=args[0])),
    ]
    rows, grid = pixel_rows(golden["pixel_values"])
    with torch.no_grad():
        out = visual(rows, grid)
    for hook in hooks:
        hook.remove()
    assert max_diff(resize_table(visual.pos_embed.weight, 18, 18).flatten(0, 1), golden["vit_pos_embed_interpolated"]) < RESIZE_ATOL
    assert max_diff(seen["ln_pre_in"].view(2, 324, -1), golden["vision_ln_pre_in"]) < ATOL
    assert max_diff(seen["blocks_out"].view(2, 324, -1), golden["vision_blocks_out"]) < ATOL
    assert torch.equal(visual.merger.pos_embed, golden["resampler_query_pos_embed"])
    assert max_diff(sincos_table(256, 16), golden["resampler_query_pos_embed"]) < 1e-6  # our table is the original's
    assert max_diff(resize_table(visual.merger.pos_embed, 18, 18).flatten(0, 1), golden["resampler_key_pos_embed"]) < RESIZE_ATOL
    assert max_diff(seen["resampler_out"].view(2, 256, -1), golden["resampler_out"]) < ATOL
    assert max_diff(out.view(2, 256, -1), golden["vision_out"]) < ATOL


@pytest.mark.parametrize("case", ["one_image", "two_images", "text_only"])
def test_full_logits_and_hidden_states(model, golden, case):
    language_model, seen = model.model.language_model, {}
    hooks = [
        language_model.layers[0].register_forward_pre_hook(lambda m, args: seen.update({0: args[0]})),
        language_model.layers[0].register_forward_hook(lambda m, args, out: seen.update({1: out})),
        language_model.norm.register_forward_hook(lambda m, args, out: seen.update({2: out})),
    ]
    with torch.no_grad():  # the head's rows that the golden logits hold (the others are exactly 0 there)
        hidden = model.model(**case_inputs(golden, case)).last_hidden_state[0]
        logits = hidden @ model.lm_head.weight[golden["vocab_rows"]].T
    for hook in hooks:
        hook.remove()
    assert max_diff(logits, golden[f"{case}.logits"]) < ATOL
    for n, hidden in seen.items():
        if f"{case}.hidden_states.{n}" in golden:
            assert max_diff(hidden[0], golden[f"{case}.hidden_states.{n}"]) < ATOL


def greedy(model, inputs, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=8, do_sample=False, eos_token_id=STOP, pad_token_id=STOP[0], output_scores=True,
        return_dict_in_generate=True, **kwargs,
    )


@pytest.mark.parametrize(
    "config,case,prompt",
    [
        ("config", "one_image", "one_image"),
        ("config", "two_images", "two_images"),
        ("config", "text_only", "text_only"),
        ("config_seq64", "seq64", "one_image"),  # NTK alpha 15 from the prefill, kept while decoding; logn past 64
        ("config_seq64", "seq64_long_text", "seq64_long_text"),  # alpha 1 kept while decoding crosses 64
    ],
)
def test_greedy_tokens_and_step_logits(loaded, golden, config, case, prompt):
    model = loaded(config)
    inputs = case_inputs(golden, prompt)
    out = greedy(model, inputs)
    assert out.sequences[0, inputs["input_ids"].shape[1] :].tolist() == golden[f"{case}.generated_ids"].tolist()
    steps = torch.stack(out.scores)[:, 0][:, golden["vocab_rows"]]
    assert max_diff(steps, golden[f"{case}.generated_step_logits"]) < ATOL


@pytest.mark.parametrize("case", ["seq64_logn_only", "seq64_ntk_only"])
def test_logn_and_ntk_alone(loaded, golden, case):
    with torch.no_grad():
        logits = loaded(f"config_{case}")(**case_inputs(golden, "one_image"), logits_to_keep=1).logits[0, -1]
    logits = logits[golden["vocab_rows"]]
    assert max_diff(logits, golden[f"{case}.logits_last"]) < ATOL


# ---- batches, kernels, cache, beams (a tiny random model with a small vocabulary: the goldens' is 151,936) ----------


SMALL_IMG = 1000  # <img>; </img> and <imgpad> follow


@pytest.fixture(scope="module")
def small():
    """The golden config with 1,024 tokens and seq_length 64 (so that dynamic NTK and logn act), random weights."""
    official = json.loads((GOLDEN / "config.json").read_text())
    torch.manual_seed(0)
    config = QwenVLConfig(**dict(official, vocab_size=1024, seq_length=64, visual=dict(official["visual"], image_start_id=SMALL_IMG)))
    model = QwenVLForConditionalGeneration(config)
    with torch.no_grad():  # larger weights than the default init make greedy choices decisive
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                p.mul_(3.0)
    return model.eval()


def small_prompts(*images_per_prompt):
    """One prompt per count: some text, that many image spans, more text; and 4 x 4 patch pixels per image."""
    g = torch.Generator().manual_seed(0)
    prompts = []
    for n, images in enumerate(images_per_prompt):
        ids = torch.randint(0, 900, (5 + 3 * n,), generator=g).tolist()
        for _ in range(images):
            ids += [SMALL_IMG] + [SMALL_IMG + 2] * 256 + [SMALL_IMG + 1] + torch.randint(0, 900, (4,), generator=g).tolist()
        prompts.append(ids)
    length = max(map(len, prompts))
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    count = sum(images_per_prompt)
    pixels = torch.randn(count * 16, 3 * 14 * 14, generator=g)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 4, 4]] * count)}
    alone, first = [], 0
    for row, (prompt, images) in enumerate(zip(prompts, images_per_prompt)):
        sample = {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}
        if images:
            sample.update(pixel_values=pixels[16 * first : 16 * (first + images)], image_grid_thw=torch.tensor([[1, 4, 4]] * images))
        alone.append(sample)
        first += images
    return batch, alone


def test_left_padded_batch_gives_each_sample_its_own_logits_and_tokens(small):
    """Positions skip padding (the original's index-in-row positions are a defect we do not copy), and each sample's
    NTK alpha comes from its own length: the short text prompt keeps alpha 1 beside one of 290 tokens (alpha 15)."""
    batch, alone = small_prompts(0, 1)
    with torch.no_grad():
        logits = small(**batch).logits
        for row, sample in enumerate(alone):
            n = sample["input_ids"].shape[1]
            assert max_diff(logits[row, -n:], small(**sample).logits[0]) < 1e-4
    together = small.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, sample in enumerate(alone):
        expected = small.generate(**sample, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert together[row, -6:].tolist() == expected[0, -6:].tolist()


def test_eager_equals_sdpa_and_cache_equals_no_cache(small):
    batch, _ = small_prompts(0, 1)
    try:
        small.set_attn_implementation("eager")
        with torch.no_grad():
            eager = small(**batch).logits
        small.set_attn_implementation("sdpa")
        with torch.no_grad():
            sdpa = small(**batch).logits
    finally:
        small.set_attn_implementation("sdpa")
    assert max_diff(eager, sdpa) < 1e-4
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    cached = small.generate(**batch, **options)
    uncached = small.generate(**batch, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)  # the NTK alpha of the prefill is kept while decoding
    assert max_diff(torch.stack(cached.scores), torch.stack(uncached.scores)) < 1e-4


def test_beam_search_with_images(small):
    batch, alone = small_prompts(1, 2)
    together = small.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    for row, sample in enumerate(alone):
        expected = small.generate(**sample, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
        assert together[row, -4:].tolist() == expected[0, -4:].tolist()


def test_save_and_reload_keeps_the_model(small, tmp_path):
    small.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwenvl" and config["sequential_positions"] and config["use_dynamic_ntk"]
    assert "visual" not in config and config["vision_config"]["projector"] == "resampler"
    again = QwenVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch, _ = small_prompts(0, 2)
    with torch.no_grad():
        assert torch.equal(small(**batch).logits, again(**batch).logits)


# ---- processor, tokenizer, chat -------------------------------------------------------------------------------------


def test_pixels_are_bit_exact_with_alpha_dropped(processor, pictures, golden):
    out = processor(images=pictures, text="Picture 1:<img>a.png</img>\nPicture 2:<img></img>\n", return_tensors="pt")
    rows, grid = pixel_rows(golden["pixel_values"])
    assert torch.equal(out["pixel_values"], rows)  # image_2 is RGBA: its alpha is dropped, not composited
    assert out["image_grid_thw"].tolist() == grid.tolist()
    ids = out["input_ids"][0].tolist()
    assert ids.count(PAD) == 512 and ids.count(IMG) == 2 and ids.count(END) == 2


def test_tokenizer_cases(processor):
    cases = json.loads((GOLDEN / "tokenizer_cases.json").read_text())
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 151860
    for name in ("encode_default_allows_all_special", "grounding_tags_raw"):
        assert tokenizer(cases[name]["raw_text"])["input_ids"] == cases[name]["input_ids"], name
    for name in ("raw_base_model_caption", "url_path_raw", "non_ascii_path_raw"):  # the span holds a path
        case = cases[name]
        ids = processor(text=case["raw_text"], images=[Image.new("RGB", (8, 8))])["input_ids"][0]
        assert spans_whole(ids) == spans_whole(case["input_ids"]) and len(ids) == len(case["input_ids"]), name


def message(query, picture):
    """A qwen-vl-utils style message content for an original query with `Picture n:<img>path</img>\\n` items."""
    items = []
    for part in query.split("</img>\n"):
        if "<img>" in part:
            text, _ = part.split("<img>")
            assert text.startswith("Picture ")
            items.append({"type": "image", "image": picture})
        elif part:
            items.append({"type": "text", "text": part})
    return items


def test_chat_template_reproduces_make_context(processor, pictures, golden):
    cases = json.loads((GOLDEN / "tokenizer_cases.json").read_text())
    summary = json.loads((GOLDEN / "summary.json").read_text())
    for case in ("one_image", "two_images", "text_only"):
        conversation = [{"role": "user", "content": message(summary["prompts"][case]["query"], pictures[0])}]
        ids = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)[0]
        gold = golden[f"{case}.input_ids"].tolist()
        assert spans_whole(ids) == spans_whole(gold) and len(ids) == len(gold), case
    history = cases["chat_two_turns_grounding_history"]
    conversation = [
        {"role": "user", "content": message("Picture 1:<img>image_1.png</img>\nWhere is the red circle?", pictures[0])},
        {"role": "assistant", "content": "<ref>the red circle</ref><box>(133,150),(433,600)</box>"},
        {"role": "user", "content": message(history["query"], pictures[1])},
    ]
    ids = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)[0]
    assert spans_whole(ids) == spans_whole(history["input_ids"])  # pictures numbered per turn, tags special
    empty = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(empty, add_generation_prompt=True, tokenize=True)[0] == cases["chat_empty_system"]["input_ids"]
    typed = cases["chat_special_surface_in_user_text"]  # a typed <|im_start|> stays text, <ref>/<box> are tags
    conversation = [{"role": "user", "content": [{"type": "text", "text": typed["query"]}]}]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)[0] == typed["input_ids"]


def test_processor_refuses_videos(processor):
    with pytest.raises(ValueError, match="takes no videos"):
        processor(text="hi", videos=[[Image.new("RGB", (28, 28))] * 2])


# ---- loading, conversion, Auto classes, pipeline ------------------------------------------------------------------


def test_conversion_from_pickle_shards_and_tiktoken_gives_the_same_directory(official, converted, tmp_path):
    """An official folder as it ships (.bin shards, qwen.tiktoken) converts to the same files as the safetensors one;
    from_pretrained reads the .bin only when told use_safetensors=False (with torch.load(weights_only=True))."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(official["config"] / "config.json", src / "config.json")
    tensors = load_file(official["config"] / "model.safetensors")
    names = sorted(tensors)
    torch.save({n: tensors[n] for n in names[::2]}, src / "pytorch_model-00001-of-00002.bin")
    torch.save({n: tensors[n] for n in names[1::2]}, src / "pytorch_model-00002-of-00002.bin")
    vocab = json.loads((Path(convert_checkpoint.ROOT) / "tokenizer.json").read_text())["model"]["vocab"]
    lines = [base64.b64encode(token).decode() + f" {rank}" for rank, token in enumerate(build_qwen_vl_tokenizer.token_bytes(vocab))]
    (src / "qwen.tiktoken").write_text("\r\n".join(lines) + "\r\n")  # CRLF, as one copy of the original has it
    written = convert_checkpoint.convert(src, tmp_path / "dst")
    assert "qwen.tiktoken checked equal" in written["tokenizer files"]
    for name in os.listdir(converted):
        assert (tmp_path / "dst" / name).read_bytes() == (converted / name).read_bytes(), name
    with pytest.raises(OSError, match="only pickle weights"):
        QwenVLForConditionalGeneration.from_pretrained(src)
    model = QwenVLForConditionalGeneration.from_pretrained(src, use_safetensors=False)
    assert model.generation_config.eos_token_id == STOP


def test_a_tiktoken_that_differs_is_refused(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text(base64.b64encode(b"!").decode() + " 0\n")
    with pytest.raises(ValueError, match="has 1 tokens"):
        build_qwen_vl_tokenizer.build(tmp_path / "out", tmp_path / "qwen.tiktoken")


def test_auto_classes_and_pipeline_on_the_converted_directory(converted, golden, pictures):
    model = AutoModelForImageTextToText.from_pretrained(converted, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules") and type(processor).__name__ == "QwenVLProcessor"
    inputs = case_inputs(golden, "one_image")
    with torch.no_grad():
        last = model(**inputs, logits_to_keep=1).logits[0, -1, golden["vocab_rows"]]
        hidden = AutoModel.from_pretrained(converted, trust_remote_code=True)(**inputs).last_hidden_state[0]
    assert max_diff(last, golden["one_image.logits"][-1]) < ATOL
    assert max_diff(hidden @ model.lm_head.weight[golden["vocab_rows"]].T, golden["one_image.logits"]) < ATOL
    chat = [{"role": "user", "content": [{"type": "image", "image": pictures[0]}, {"type": "text", "text": "What is in this picture?"}]}]
    ours = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert max_diff(ours["pixel_values"], inputs["pixel_values"]) == 0.0
    tokens = model.generate(**ours, max_new_tokens=8, do_sample=False)[0, ours["input_ids"].shape[1] :]
    assert tokens.tolist() == golden["one_image.generated_ids"].tolist()
    pipe = transformers.pipeline("image-text-to-text", model=str(converted), trust_remote_code=True)
    out = pipe(text=chat, max_new_tokens=8, generate_kwargs={"do_sample": False}, return_full_text=False)
    assert out[0]["generated_text"] == processor.decode(tokens, skip_special_tokens=True)


def test_bad_official_configs_are_refused():
    official = json.loads((GOLDEN / "config.json").read_text())
    with pytest.raises(ValueError, match="kv_channels"):
        QwenVLConfig(**dict(official, kv_channels=64))
    with pytest.raises(ValueError, match="rotary_pct"):
        QwenVLConfig(**dict(official, rotary_pct=0.5))


# ---- grounding ------------------------------------------------------------------------------------------------------


def test_grounding_boxes_and_quads_in_the_original_picture():
    from grounding_qwenvl import draw_boxes, ground

    answer = "<ref>the red circle</ref><box>(133,150),(433,600)</box> and <ref>a sign</ref><quad>(100,100),(300,120),(290,400),(90,380)</quad>"
    objects = ground(answer, "qwen_vl", (300, 200))
    assert [o.label for o in objects] == ["the red circle", "a sign"]
    assert objects[0].box == pytest.approx((39.9, 30.0, 129.9, 120.0))  # x / 1000 * width, y / 1000 * height
    assert sum(objects[1].quad, ()) == pytest.approx((30.0, 20.0, 90.0, 24.0, 87.0, 80.0, 27.0, 76.0))
    assert objects[1].box == pytest.approx((27.0, 20.0, 90.0, 80.0))
    assert draw_boxes(Image.new("RGB", (300, 200)), objects).getpixel((30, 20)) != (0, 0, 0)
    assert ground("no objects here", "qwen_vl", (300, 200)) == []
    with pytest.raises(ValueError, match="unclosed <box>"):
        ground("<ref>x</ref><box>(1,2),(3,4)", "qwen_vl", (300, 200))
    with pytest.raises(ValueError, match="quad must read"):
        ground("<quad>(1,2),(3,4)</quad>", "qwen_vl", (300, 200))


def test_demo_draws_a_qwen_vl_answer(converted, tmp_path, capsys):
    import demo

    demo.main(["--ground", "--model", str(converted), "--out", str(tmp_path / "grounded.png")])
    printed = capsys.readouterr().out
    assert "family qwen_vl" in printed and "3 object(s) drawn" in printed
    assert Image.open(tmp_path / "grounded.png").size == (168, 168)
