"""qwenvl against the built-in transformers Qwen2.5-VL (and Qwen3-VL, dense and MoE), side by side in one process.

Both models hold the same random weights (the built-in one is saved, ours loads that save) and see
the same inputs. Each case alternates built-in and ours for several repetitions after a warm-up
and reports medians; ratios are built-in time / our time (above 1: we are faster). Peak memory is
measured in a fresh subprocess per model (peak RSS reset through /proc/self/clear_refs) and
reported as ours / built-in (below 1: we use less).

Usage:
  python benchmarks/run.py --quick          # about 2-3 minutes on 2 CPU cores
  python benchmarks/run.py --json           # the last line is one JSON object of the ratios
  python benchmarks/run.py --compiled       # also: compiled paths (static cache, compile_vision, compiled
                                            # training step) and quantized loading's peak memory
"""

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The vision tower of the baseline: width 320, 5 heads, depth 8, 112 px windows, 2 full layers.
VISION = dict(
    depth=8, hidden_size=320, intermediate_size=864, num_heads=5, out_hidden_size=256, hidden_act="silu",
    window_size=112, fullatt_block_indexes=[3, 7], tokens_per_second=2, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, in_channels=3,
)
TEXT = dict(
    vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}, rope_theta=1e6,
    tie_word_embeddings=True,
)
PATCH_ROW = 3 * 2 * 14 * 14


# --- models and inputs ------------------------------------------------------------------------


def build_models(directory):
    """The built-in model with random weights, and ours loaded from its save: the same weights."""
    import transformers

    from modeling_qwenvl import QwenVLForConditionalGeneration

    torch.manual_seed(0)
    config = transformers.Qwen2_5_VLConfig(text_config=dict(TEXT), vision_config=dict(VISION), tie_word_embeddings=True)
    builtin = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    builtin.save_pretrained(directory)
    ours = QwenVLForConditionalGeneration.from_pretrained(directory).eval()
    return builtin, ours


def still_image_pixels(height, width, count=1, seed=0):
    """Pixel rows of still images (each frame repeated, as the processor makes them)."""
    g = torch.Generator().manual_seed(seed)
    rows = (height // 14) * (width // 14)
    frame = torch.randn(count * rows, 3, 1, 14 * 14, generator=g)
    pixels = frame.expand(-1, -1, 2, -1).reshape(count * rows, PATCH_ROW).contiguous()
    grid = torch.tensor([[1, height // 14, width // 14]] * count)
    return pixels, grid


def video_pixels(frames, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    t, side = frames // 2, size // 14
    return torch.randn(t * side * side, PATCH_ROW, generator=g), torch.tensor([[t, side, side]])


def vision_flops(grid, config):
    """Multiply-adds x 2 of one vision forward (linear layers and attention matmuls)."""
    width, inner, depth = config["hidden_size"], config["intermediate_size"], config["depth"]
    frames = [(h * w, t) for t, h, w in grid.tolist()]
    patches = sum(n * t for n, t in frames)
    linear = 2 * patches * (PATCH_ROW * width + depth * (4 * width * width + 3 * width * inner))
    merged = patches // 4
    linear += 2 * merged * (16 * width * width + 4 * width * config["out_hidden_size"])
    full_layers = len(config["fullatt_block_indexes"])
    full_attention = sum(4 * n * n * width * t for n, t in frames) * full_layers
    window_attention = 4 * patches * 64 * width * (depth - full_layers)  # windows of 8 x 8 patches at most
    return linear + full_attention + window_attention


def photo_1080p():
    """A real photo (scikit-image's coffee) scaled to 1920 x 1080, as JPEG bytes."""
    import skimage

    path = os.path.join(os.path.dirname(skimage.__file__), "data", "coffee.png")
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").resize((1920, 1080), Image.BICUBIC).save(buffer, format="JPEG", quality=92)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


# --- timing -----------------------------------------------------------------------------------


def compare(builtin_fn, our_fn, repetitions):
    """Median seconds of each, alternating after one warm-up of each."""
    builtin_fn(), our_fn()
    times = {"builtin": [], "ours": []}
    for _ in range(repetitions):
        for name, fn in (("builtin", builtin_fn), ("ours", our_fn)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["builtin"]), statistics.median(times["ours"])


def matmul_flops_per_second(size=1536, repetitions=5):
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repetitions))
    return 2 * size**3 / best


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- peak memory, one fresh process per measurement -------------------------------------------


def peak_memory_child(directory, which, implementation, family):
    """Runs in a subprocess: the peak RSS increase (bytes) of one 1344 px vision forward (family "qwen2_5" or
    "qwen3": which built-in class, and which patch size)."""
    import transformers

    from modeling_qwenvl import QwenVLForConditionalGeneration

    builtin_class, pixels_of, warm_side = {
        "qwen2_5": ("Qwen2_5_VLForConditionalGeneration", still_image_pixels, 56),
        "qwen3": ("Qwen3VLForConditionalGeneration", qwen3_pixels, 64),
    }[family]
    torch.set_num_threads(2)
    if which == "ours":
        model = QwenVLForConditionalGeneration.from_pretrained(directory).eval()
        model.model.visual.config._attn_implementation = implementation
        run = lambda p, g: model.model.visual(p, g)  # noqa: E731
    else:
        model = getattr(transformers, builtin_class).from_pretrained(
            directory, attn_implementation=implementation
        ).eval()
        run = lambda p, g: model.model.visual(p, grid_thw=g)  # noqa: E731
    pixels, grid = pixels_of(1344, 1344)
    with torch.no_grad():
        run(*pixels_of(warm_side, warm_side))
        baseline = _rss()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        run(pixels, grid)
    print(json.dumps({"peak_increase": _vm("VmHWM") - baseline}))


def _vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss():
    return _vm("VmRSS")


# Peak-memory children map every allocation above 128 KiB on its own and unmap it when freed. With glibc's default,
# freed buffers stay in its heap, and fragmentation moved the peak of one Qwen3-VL forward between 174 and 288 MiB in
# six identical runs; with this setting the six gave 113.3-114.7 MiB, the tensors' own peak.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def peak_in_child(function, *args):
    """run.<function>(*args) in a fresh process: the peak RSS increase (bytes) it prints."""
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r});"
        f"import run; run.{function}(*{args!r})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **CHILD_ENV}).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_increase"]


def peak_memory(directory, which, implementation, family="qwen2_5"):
    return peak_in_child("peak_memory_child", str(directory), which, implementation, family)


# --- the cases -------------------------------------------------------------------------------


def vision_case(builtin, ours, pixels, grid, repetitions):
    with torch.no_grad():
        return compare(
            lambda: builtin.model.visual(pixels, grid_thw=grid), lambda: ours.model.visual(pixels, grid), repetitions
        )


def processor_case(repetitions):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from image_processing_qwenvl import QwenVLImageProcessor

    image = photo_1080p()
    builtin = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    ours = QwenVLImageProcessor()
    assert torch.equal(
        torch.as_tensor(builtin(images=[image], return_tensors="pt")["pixel_values"]),
        ours(images=[image], return_tensors="pt")["pixel_values"],
    )
    return compare(lambda: builtin(images=[image], return_tensors="pt"), lambda: ours(images=[image], return_tensors="pt"),
                   repetitions * 3)


def generate_inputs():
    pixels, grid = still_image_pixels(448, 448)
    image_tokens = int(grid.prod()) // 4
    ids = [151644, 872, 198, 151652] + [151655] * image_tokens + [151653, 3838, 374, 419, 30, 151645, 198, 151644, 77091, 198]
    input_ids = torch.tensor([ids])
    types = (input_ids == 151655).long()
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                image_grid_thw=grid, mm_token_type_ids=types)


def generate_cases(builtin, ours, repetitions):
    inputs = generate_inputs()
    settings = dict(do_sample=False, pad_token_id=151643, eos_token_id=None)

    def run(model, new_tokens):
        with torch.no_grad():
            return lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)

    prefill = compare(run(builtin, 1), run(ours, 1), repetitions)
    full = compare(run(builtin, 32), run(ours, 32), repetitions)
    decode = tuple(31 / max(f - p, 1e-9) for f, p in zip(full, prefill))  # tokens per second
    return prefill, decode


def train_batch():
    """4 samples, each one 224 px image, a question and a 4-token answer (the only labelled positions)."""
    pixels, grid = still_image_pixels(224, 224, count=4)
    image_tokens = int(grid[0].prod()) // 4
    prompt = [151644, 872, 198, 151652] + [151655] * image_tokens + [151653] + [3838, 374, 419, 30] * 8
    ids = torch.tensor([prompt + [151645, 198, 151644, 77091, 198, 3838, 374, 419, 151645]] * 4)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_grid_thw=grid,
                labels=labels)


def train_case(builtin, ours, repetitions):
    """One training step (forward, backward) on 4 samples with one 224 px image and a 4-token answer."""
    batch = train_batch()
    builtin.train(), ours.train()

    def step(model, **extra):
        def run():
            model.zero_grad(set_to_none=True)
            model(**batch, **extra).loss.backward()
        return run

    try:
        return compare(step(builtin), step(ours, labelled_logits_only=True), repetitions)
    finally:
        builtin.eval(), ours.eval()


# --- Qwen3-VL ---------------------------------------------------------------------------------


# The baseline's widths with Qwen3-VL's switches: 16 px patches with bias, the 48 x 48 position table, full attention
# per frame, three DeepStack levels; a Qwen3 decoder (q/k norm, explicit head_dim, interleaved M-RoPE) and its MoE.
QWEN3_VISION = dict(
    depth=8, hidden_size=320, intermediate_size=864, num_heads=5, out_hidden_size=256, hidden_act="gelu_pytorch_tanh",
    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=2304,
    deepstack_visual_indexes=[1, 3, 5],
)
QWEN3_TEXT = dict(
    vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, rope_theta=5e6, tie_word_embeddings=True,
    rope_scaling={"rope_type": "default", "mrope_section": [12, 10, 10], "mrope_interleaved": True},
)
# Experts of 96 (hidden 256 is neither I nor 2I: transformers 5 would load square experts untransposed).
QWEN3_MOE = dict(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=96, decoder_sparse_step=1, mlp_only_layers=[])
QWEN3_PATCH_ROW = 3 * 2 * 16 * 16


def build_qwen3_models(directory, moe=False):
    """The built-in Qwen3-VL (or Qwen3-VL MoE) with random weights, and ours loaded from its save."""
    import transformers

    from modeling_qwenvl import QwenVLForConditionalGeneration

    torch.manual_seed(0)
    if moe:
        config = transformers.Qwen3VLMoeConfig(
            text_config=dict(QWEN3_TEXT, **QWEN3_MOE), vision_config=dict(QWEN3_VISION), tie_word_embeddings=True
        )
        builtin = transformers.Qwen3VLMoeForConditionalGeneration(config).eval()
    else:
        config = transformers.Qwen3VLConfig(text_config=dict(QWEN3_TEXT), vision_config=dict(QWEN3_VISION), tie_word_embeddings=True)
        builtin = transformers.Qwen3VLForConditionalGeneration(config).eval()
    builtin.save_pretrained(directory)
    return builtin, QwenVLForConditionalGeneration.from_pretrained(directory).eval()


def qwen3_pixels(height, width, count=1, seed=0):
    """Pixel rows of still images on Qwen3-VL's 16 px patches."""
    g = torch.Generator().manual_seed(seed)
    rows = (height // 16) * (width // 16)
    frame = torch.randn(count * rows, 3, 1, 16 * 16, generator=g)
    pixels = frame.expand(-1, -1, 2, -1).reshape(count * rows, QWEN3_PATCH_ROW).contiguous()
    return pixels, torch.tensor([[1, height // 16, width // 16]] * count)


def qwen3_vision_case(builtin, ours, pixels, grid, repetitions):
    """The whole tower with its DeepStack mergers (the built-in returns them beside the main tokens)."""
    with torch.no_grad():
        return compare(
            lambda: builtin.model.visual(pixels, grid_thw=grid), lambda: ours.model.visual(pixels, grid), repetitions
        )


def qwen3_prefill_case(builtin, ours, repetitions):
    """One forward over a prompt with a 448 px image and some text: vision, DeepStack and the decoder."""
    import transformers

    pixels, grid = qwen3_pixels(448, 448)
    ids = [151644, 872, 198, 151652] + [151655] * (int(grid.prod()) // 4) + [151653] + [3838, 374, 419, 30] * 16
    inputs = dict(input_ids=torch.tensor([ids]), pixel_values=pixels, image_grid_thw=grid)
    extra = {} if transformers.__version__.startswith("4.") else {"mm_token_type_ids": (inputs["input_ids"] == 151655).long()}
    with torch.no_grad():
        return compare(lambda: builtin(**inputs, **extra), lambda: ours(**inputs), repetitions)


def qwen3_cases(record, repetitions):
    """The Qwen3-VL lines: vision at 1344 px and on sixteen 256 px images, MoE prefill, eager peak memory."""
    with tempfile.TemporaryDirectory() as directory:
        builtin, ours = build_qwen3_models(directory)
        b, o = qwen3_vision_case(builtin, ours, *qwen3_pixels(1344, 1344), repetitions)
        record("qwen3 vision 1344 px (sdpa)", b, o, "s", "qwen3_vision_1344_speedup")
        b, o = qwen3_vision_case(builtin, ours, *qwen3_pixels(256, 256, count=16), repetitions)
        record("qwen3 vision 16 x 256 px images", b, o, "s", "qwen3_vision_multi_image_speedup")
        del builtin, ours
        builtin_sdpa = peak_memory(directory, "builtin", "sdpa", "qwen3")
        ours_eager = peak_memory(directory, "ours", "eager", "qwen3")
        record("qwen3 peak memory 1344 px, ours eager", builtin_sdpa / 2**20, ours_eager / 2**20, "MiB",
               "qwen3_vision_eager_1344_peak_mem_ratio", ratio=ours_eager / builtin_sdpa)
    with tempfile.TemporaryDirectory() as directory:
        builtin, ours = build_qwen3_models(directory, moe=True)
        b, o = qwen3_prefill_case(builtin, ours, repetitions)
        record("qwen3 MoE prefill (448 px + text)", b, o, "s", "qwen3_moe_prefill_speedup")


# --- compiled paths and quantized loading (--compiled) -----------------------------------------


def compile_for_generate():
    """transformers' own compiled decoding: a CompileConfig that also compiles on the CPU."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True  # a class attribute, not a constructor argument
    return config


def first_and_steady(fn, repetitions):
    """(seconds of the first call, median seconds of the next ones): the first call is where compiling happens."""
    first = _timed(fn)
    return first, statistics.median(_timed(fn) for _ in range(repetitions))


def compiled_generate_cases(builtin, ours, repetitions):
    """Prefill and decode with a static cache and compiled decoding, each model by transformers' own mechanism.
    -> {name: (prefill s, decode tok/s, compile s)}"""
    from transformers import StaticCache

    from modeling_qwenvl import CACHE_NAME

    inputs = generate_inputs()
    settings = dict(do_sample=False, pad_token_id=151643, eos_token_id=None, compile_config=compile_for_generate())
    token_types = {"mm_token_type_ids": inputs.pop("mm_token_type_ids")}
    results = {}
    for name, model, extra in (("builtin", builtin, token_types), ("ours", ours, {})):
        def run(new_tokens):
            def go():
                cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + 32)
                with torch.no_grad():
                    model.generate(**inputs, **extra, **{CACHE_NAME: cache}, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, **settings)
            return go

        first, full = first_and_steady(run(32), repetitions)
        prefill = statistics.median(_timed(run(1)) for _ in range(repetitions))
        results[name] = (prefill, 31 / max(full - prefill, 1e-9), first - full)
    return results


def compiled_vision_case(ours, pixels, grid, repetitions):
    """Our compiled vision tower (compile_vision) on a deep copy: -> (seconds, compile seconds, max abs diff)."""
    import copy

    tower = copy.deepcopy(ours.model.visual)
    with torch.no_grad():
        expected = tower(pixels, grid)
        tower.compile_vision()
        first, steady = first_and_steady(lambda: tower(pixels, grid), repetitions)
        diff = (tower(pixels, grid) - expected).abs().max().item()
    return steady, first - steady, diff


def compiled_train_cases(builtin, ours, repetitions):
    """The training step under torch.compile (what Trainer(torch_compile=True) does), each model.
    -> {name: (seconds, compile seconds)}"""
    batch = train_batch()
    results = {}
    for name, model, extra in (("builtin", builtin, {}), ("ours", ours, {"labelled_logits_only": True})):
        model.train()
        compiled = torch.compile(model)

        def step():
            model.zero_grad(set_to_none=True)
            compiled(**batch, **extra).loss.backward()

        try:
            first, steady = first_and_steady(step, repetitions)
        finally:
            model.eval()
        results[name] = (steady, first - steady)
    return results


QUANTIZATIONS = ("bnb_8bit", "bnb_4bit", "torchao_int8")


def quantization_config(method):
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if method == "bnb_8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if method == "bnb_4bit":
        return BitsAndBytesConfig(load_in_4bit=True)
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def quantized_memory_child(directory, which, method):
    """Runs in a subprocess: the peak RSS increase (bytes) of loading the model quantized and generating 8 tokens."""
    import transformers

    from modeling_qwenvl import QwenVLForConditionalGeneration

    torch.set_num_threads(2)
    inputs = generate_inputs()
    token_types = inputs.pop("mm_token_type_ids")
    baseline = _rss()
    config = quantization_config(method) if method != "none" else None
    if which == "ours":
        model = QwenVLForConditionalGeneration.from_pretrained(directory, quantization_config=config, device_map="cpu")
    else:
        model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            directory, quantization_config=config, device_map="cpu"
        )
        inputs["mm_token_type_ids"] = token_types
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=151643)
    print(json.dumps({"peak_increase": _vm("VmHWM") - baseline}))


def quantized_memory(directory, which, method):
    return peak_in_child("quantized_memory_child", str(directory), which, method)


def compiled_report(builtin, ours, directory, repetitions, eager, record, results):
    """The --compiled cases: each compiled path against the built-in's best (eager or its own compiled path) and
    against our eager time (`eager`: case -> our eager time from the main run); compile times apart."""
    compile_times = {}
    generated = compiled_generate_cases(builtin, ours, repetitions)
    builtin_decode = max(eager["builtin_decode"], generated["builtin"][1])
    record("compiled decode (static cache)", builtin_decode, generated["ours"][1], "tok/s", "compiled_decode_speedup",
           ratio=generated["ours"][1] / builtin_decode)
    results["compiled_decode_over_our_eager"] = round(generated["ours"][1] / eager["ours_decode"], 3)
    builtin_prefill = min(eager["builtin_prefill"], generated["builtin"][0])
    record("compiled prefill (static cache)", builtin_prefill, generated["ours"][0], "s", "compiled_prefill_speedup")
    compile_times["decode_ours"], compile_times["decode_builtin"] = generated["ours"][2], generated["builtin"][2]
    vision = {
        "multi_image": still_image_pixels(224, 224, count=16), "1344": still_image_pixels(1344, 1344),
        "video": video_pixels(32, 448),
    }
    for key, (pixels, grid) in vision.items():
        seconds, compile_seconds, diff = compiled_vision_case(ours, pixels, grid, repetitions)
        record(f"compiled vision {key}", eager[f"builtin_{key}"], seconds, "s", f"compiled_vision_{key}_speedup")
        results[f"compiled_vision_{key}_over_our_eager"] = round(eager[f"ours_{key}"] / seconds, 3)
        results[f"compiled_vision_{key}_max_abs_diff"] = diff
        compile_times[f"vision_{key}"] = compile_seconds
    trained = compiled_train_cases(builtin, ours, repetitions)
    builtin_train = min(eager["builtin_train"], trained["builtin"][0])
    record("compiled train step", builtin_train, trained["ours"][0], "s", "compiled_train_step_speedup")
    results["compiled_train_step_over_our_eager"] = round(eager["ours_train"] / trained["ours"][0], 3)
    compile_times["train_ours"], compile_times["train_builtin"] = trained["ours"][1], trained["builtin"][1]
    results["compile_seconds"] = {name: round(value, 1) for name, value in compile_times.items()}
    for method in ("none", *QUANTIZATIONS):
        builtin_peak = quantized_memory(directory, "builtin", method)
        our_peak = quantized_memory(directory, "ours", method)
        record(f"peak memory load+generate, {method}", builtin_peak / 2**20, our_peak / 2**20, "MiB",
               f"quantized_{method}_peak_mem_ratio", ratio=our_peak / builtin_peak)
        results[f"quantized_{method}_peak_mib_ours"] = round(our_peak / 2**20, 1)


# --- main -------------------------------------------------------------------------------------


def kimi_vision_case(repetitions):
    """Kimi-VL's MoonViT + projector (full width 1152, 2 of its 27 blocks) against transformers' Kimi_K25 vision
    tower + projector (the same maths for images), at 1344 px and for 8 images of 448 px; None without Kimi_K25
    (transformers 4.57). Random weights: the times do not depend on them."""
    import transformers

    from configuration_qwenvl import QwenVLVisionConfig
    from modeling_qwenvl import QwenVLVisionModel

    if not hasattr(transformers, "Kimi_K25Config"):
        return None
    from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25MultimodalProjection, Kimi_K25VisionModel

    moonvit = dict(num_hidden_layers=2, num_attention_heads=16, hidden_size=1152, intermediate_size=4304, patch_size=14)
    config = transformers.Kimi_K25Config(
        vision_config=dict(moonvit, pos_emb_height=64, pos_emb_width=64, merge_kernel_size=[2, 2]),
        text_config=dict(model_type="deepseek_v3", hidden_size=2048), projection_hidden_size=1152,
    )
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    builtin = Kimi_K25VisionModel(config.vision_config).eval()
    projector = Kimi_K25MultimodalProjection(config).eval()
    ours = QwenVLVisionModel(QwenVLVisionConfig(model_type="moonvit", out_hidden_size=2048, **moonvit)).eval()
    ours.config._attn_implementation = "sdpa"
    times = []
    for side, count in ((1344, 1), (448, 8)):
        g = torch.Generator().manual_seed(0)
        rows = (side // 14) ** 2 * count
        pixels = torch.randn(rows, 3, 14, 14, generator=g)
        grid = torch.tensor([[1, side // 14, side // 14]] * count)
        with torch.no_grad():
            times.append(
                compare(
                    lambda: projector(builtin(pixels, grid).pooler_output),
                    lambda: ours(pixels.flatten(1), grid),
                    repetitions,
                )
            )
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about 2-3 minutes)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of all figures")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compiled", action="store_true",
                        help="also the compiled paths and quantized loading (compiles for minutes on a CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repetitions = 3 if args.quick else 7
    rows, results, eager = [], {}, {}  # eager: our and the built-in's eager figures, for --compiled

    def record(name, builtin_value, our_value, unit, key=None, ratio=None):
        ratio = builtin_value / our_value if ratio is None else ratio
        rows.append((name, builtin_value, our_value, unit, ratio))
        if key:
            results[key] = round(ratio, 3)

    with tempfile.TemporaryDirectory() as directory:
        builtin, ours = build_models(directory)
        machine_flops = matmul_flops_per_second()
        pixels, grid = still_image_pixels(1344, 1344)
        b, o = vision_case(builtin, ours, pixels, grid, repetitions)
        eager.update(builtin_1344=b, ours_1344=o)
        record("vision 1344 px (sdpa)", b, o, "s", "vision_1344_speedup")
        fraction = vision_flops(grid, VISION) / o / machine_flops
        results["vision_1344_matmul_peak_fraction"] = round(fraction, 3)
        results["machine_matmul_gflops"] = round(machine_flops / 1e9, 1)
        b, o = vision_case(builtin, ours, *video_pixels(32, 448), repetitions)
        eager.update(builtin_video=b, ours_video=o)
        record("vision video 32 x 448 px", b, o, "s", "vision_video_speedup")
        b, o = vision_case(builtin, ours, *still_image_pixels(224, 224, count=16), repetitions)
        eager.update(builtin_multi_image=b, ours_multi_image=o)
        record("vision 16 x 224 px images", b, o, "s", "vision_multi_image_speedup")
        b, o = processor_case(repetitions)
        record("image processor 1920x1080", b, o, "s", "processor_1080p_speedup")
        (b, o), (bd, od) = generate_cases(builtin, ours, repetitions)
        eager.update(builtin_prefill=b, ours_prefill=o, builtin_decode=bd, ours_decode=od)
        record("generate prefill (448 px)", b, o, "s", "generate_prefill_speedup")
        record("generate decode", bd, od, "tok/s", "generate_decode_speedup", ratio=od / bd)
        b, o = train_case(builtin, ours, repetitions)
        eager.update(builtin_train=b, ours_train=o)
        record("train step (answers labelled)", b, o, "s", "train_step_speedup")
        if args.compiled:
            compiled_report(builtin, ours, directory, repetitions, eager, record, results)
        kimi = kimi_vision_case(repetitions)
        if kimi is not None:  # transformers 5.x: against Kimi_K25
            record("kimi vision 1344 px vs Kimi_K25", *kimi[0], "s", "kimi_vision_1344_speedup")
            record("kimi vision 8 x 448 px vs Kimi_K25", *kimi[1], "s", "kimi_vision_8_images_speedup")
        del builtin, ours
        builtin_sdpa = peak_memory(directory, "builtin", "sdpa")
        ours_eager = peak_memory(directory, "ours", "eager")
        ours_sdpa = peak_memory(directory, "ours", "sdpa")
        record("peak memory 1344 px, ours eager", builtin_sdpa / 2**20, ours_eager / 2**20, "MiB",
               "vision_eager_1344_peak_mem_ratio", ratio=ours_eager / builtin_sdpa)
        record("peak memory 1344 px, ours sdpa", builtin_sdpa / 2**20, ours_sdpa / 2**20, "MiB",
               "vision_sdpa_1344_peak_mem_ratio", ratio=ours_sdpa / builtin_sdpa)
    qwen3_cases(record, repetitions)

    print(f"{'case':34s} {'built-in':>10s} {'ours':>10s}  unit   ratio")
    for name, b, o, unit, ratio in rows:
        print(f"{name:34s} {b:10.4g} {o:10.4g}  {unit:5s} {ratio:6.2f}")
    print(f"vision 1344 px: {fraction:.2f} of the measured float32 matmul peak ({machine_flops / 1e9:.0f} GFLOP/s)")
    print("time ratios are built-in / ours; the decode ratio is ours / built-in tokens per second; "
          "memory ratios are ours / built-in")
    if "compile_seconds" in results:
        print("compile time (s, first call minus a steady one; in no ratio):", results["compile_seconds"])
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
