"""qwenvl served by a real engine: vLLM's Transformers backend, offline, on the CPU, in one process.

A tiny random qwenvl directory with the real tokenizer is served with `vllm.LLM(model_impl="transformers",
trust_remote_code=True)`; greedy tokens (and their log-probabilities) must equal our own `generate()` on the same
inputs, for one image, two images, a video, and a batch of 8 mixed prompts in one call (which is also timed).
Both weight layouts are served: the official hub layout (a converted checkpoint) and our save_pretrained's.

Runs in .venv-vllm, which `tests/vllm/setup.sh` builds (vLLM pins an older transformers than the main suite);
`tests/vllm/run.sh` runs this file. Elsewhere it is skipped.
"""

import os
import shutil
import time
from pathlib import Path

import pytest

# The engine runs inside this process (no engine-core subprocess), with a small KV cache (GiB): the test is one
# process on a shared machine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# A submodule, not the bare name: with tests/ on sys.path, this folder would pass for a `vllm` namespace package.
pytest.importorskip(
    "vllm.entrypoints.llm", reason="vLLM runs in its own venv: bash tests/vllm/setup.sh && bash tests/vllm/run.sh"
)

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from image_processing_qwenvl import load_video  # noqa: E402
from modeling_qwenvl import QwenVLForConditionalGeneration  # noqa: E402
from processing_qwenvl import QwenVLProcessor  # noqa: E402
from tiny import VISION_25  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
MAX_PIXELS = 64 * 28 * 28
MAX_TOKENS = 8
# Same float32 weights, different kernels (vLLM's CPU attention, its fused norms and projections): log-probabilities
# agree closely but not bit for bit.
LOGPROB_TOLERANCE = 1e-3
TIMED_RUNS = 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random Qwen2.5-VL with the real vocabulary, as two qwenvl directories: one written by our
    save_pretrained (`model.language_model.*`, `model.visual.*`), and one with the official hub layout
    (`model.*`, `visual.*`), which is what convert_checkpoint.py leaves, since it keeps the official weight files.

    vLLM's CPU attention takes head sizes from 32 up, so the language model is 128 wide with 4 heads."""
    torch.manual_seed(0)
    text = dict(
        vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, rope_theta=1e6,
        tie_word_embeddings=True,
    )
    vision = dict(VISION_25, out_hidden_size=128)
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    reference = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger weights than the default init make greedy choices decisive
        for name, p in reference.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                p.mul_(3.0)
    builtin_dir = tmp_path_factory.mktemp("builtin")
    reference.save_pretrained(builtin_dir)
    saved_dir = tmp_path_factory.mktemp("saved")
    QwenVLForConditionalGeneration.from_pretrained(builtin_dir).save_pretrained(saved_dir)
    QwenVLProcessor.from_pretrained(ROOT, max_pixels=MAX_PIXELS).save_pretrained(saved_dir)
    hub_dir = tmp_path_factory.mktemp("hub")
    shutil.copytree(saved_dir, hub_dir, dirs_exist_ok=True)
    weights = load_file(saved_dir / "model.safetensors")
    save_file({hub_name(name): t for name, t in weights.items()}, hub_dir / "model.safetensors", {"format": "pt"})
    return saved_dir, hub_dir


def hub_name(name):
    """A weight's name in the official hub files."""
    return name.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)


def serve(directory, **options):
    return LLM(
        model=str(directory), model_impl="transformers", trust_remote_code=True, dtype="float32", max_model_len=4096,
        seed=0, **options,
    )


@pytest.fixture(scope="module")
def served(checkpoints):
    """Our model and processor, and vLLM serving the hub-layout directory (its decoder compiled, as by default).

    The engine's prefix cache and multimodal processor cache are off: a prompt seen before would otherwise skip work
    in the engine, which would hide bugs and flatter its timing."""
    _, hub_dir = checkpoints
    ours = QwenVLForConditionalGeneration.from_pretrained(hub_dir).eval()
    processor = QwenVLProcessor.from_pretrained(hub_dir)
    llm = serve(
        hub_dir, limit_mm_per_prompt={"image": 2, "video": 1}, enable_prefix_caching=False, mm_processor_cache_gb=0
    )
    return ours, processor, llm


def picture(name):
    return Image.open(EXAMPLES / name).convert("RGB")


def clip():
    frames, _ = load_video(str(EXAMPLES / "motion.mp4"), min_pixels=112 * 112, max_pixels=112 * 112)
    return frames


def request(processor, question, images=(), video=None):
    """One prompt with its media, in the shape vLLM takes it: the chat-template text and `multi_modal_data`."""
    content = [{"type": "image"} for _ in images] + ([{"type": "video"}] if video is not None else [])
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    media = {}
    if images:
        media["image"] = list(images)
    if video is not None:
        media["video"] = video
    return {"prompt": prompt, "multi_modal_data": media}


def requests(processor):
    shape, color, count, position = (picture(f"{name}.png") for name in ("shape", "color", "count", "position"))
    video = clip()
    return {
        "one image": request(processor, "Which shape is red?", [shape]),
        "two images": request(processor, "What differs between the pictures?", [color, count]),
        "video": request(processor, "What moves?", video=video),
        "image and video": request(processor, "Is the picture in the clip?", [position], video),
        "text": request(processor, "Say hello."),
        "other image": request(processor, "How many shapes?", [count]),
        "same image again": request(processor, "Which shape is red?", [shape]),
        "two images swapped": request(processor, "What differs between the pictures?", [count, color]),
    }


def our_inputs(processor, batch):
    """Our processor's inputs for a list of vLLM requests: one left-padded batch, media in prompt order."""
    images, videos = [], []
    for item in batch:
        images += item["multi_modal_data"].get("image", [])
        if "video" in item["multi_modal_data"]:
            videos.append(item["multi_modal_data"]["video"])
    return processor(
        text=[item["prompt"] for item in batch], images=images or None, videos=videos or None, padding=True,
        return_tensors="pt",
    )


def our_generate(ours, inputs):
    """Greedy tokens of each sample and the log-probability of each chosen token."""
    with torch.no_grad():
        out = ours.generate(
            **inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    logprobs = torch.stack(out.scores, dim=1).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    return tokens.tolist(), logprobs


def vllm_generate(llm, batch):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0)
    outputs = llm.generate(batch, params, use_tqdm=False)
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    logprobs = torch.tensor(
        [[step[token].logprob for step, token in zip(out.outputs[0].logprobs, ids)] for out, ids in zip(outputs, tokens)]
    )
    return tokens, logprobs


def test_served_by_the_transformers_backend(served):
    _, _, llm = served
    assert llm.llm_engine.model_config.architecture == "TransformersMultiModalForCausalLM"


@pytest.mark.parametrize("name", ["one image", "two images", "video"])
def test_greedy_tokens_match_our_generate(served, name):
    ours, processor, llm = served
    item = requests(processor)[name]
    expected_tokens, expected_logprobs = our_generate(ours, our_inputs(processor, [item]))
    tokens, logprobs = vllm_generate(llm, [item])
    assert tokens == expected_tokens
    assert (logprobs - expected_logprobs).abs().max() < LOGPROB_TOLERANCE


def test_a_batch_of_8_mixed_prompts(served, capsys):
    """One `llm.generate` call on 8 prompts (images, videos, both, text) equals our batched `generate`. Both are
    timed from prompts and media to tokens (processing included), best of TIMED_RUNS; the engine's prefix and
    processor caches are off (see `served`), so each of its runs does all the work, as ours does."""
    ours, processor, llm = served
    batch = list(requests(processor).values())
    assert len(batch) == 8

    (expected_tokens, expected_logprobs), our_seconds = timed(lambda: our_generate(ours, our_inputs(processor, batch)))
    (tokens, logprobs), vllm_seconds = timed(lambda: vllm_generate(llm, batch))

    assert tokens == expected_tokens
    assert (logprobs - expected_logprobs).abs().max() < LOGPROB_TOLERANCE
    assert len({tuple(answer) for answer in tokens}) > 1  # the pictures change the answers: the comparison bites
    generated = sum(map(len, tokens))
    with capsys.disabled():
        print(
            f"\n8 mixed prompts, {generated} tokens, best of {TIMED_RUNS}: vLLM {generated / vllm_seconds:.0f} "
            f"tokens/s ({vllm_seconds:.3f} s), our generate() {generated / our_seconds:.0f} tokens/s "
            f"({our_seconds:.3f} s); torch threads {torch.get_num_threads()}"
        )


def timed(run):
    """(result, best wall time in seconds) of TIMED_RUNS calls."""
    seconds = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - start)
    return result, min(seconds)


def test_the_saved_layout_is_served_too(checkpoints, served):
    """The directory our save_pretrained writes (weights not renamed), served by a second engine without compiling."""
    ours, processor, _ = served
    item = requests(processor)["one image"]
    expected_tokens, expected_logprobs = our_generate(ours, our_inputs(processor, [item]))
    tokens, logprobs = vllm_generate(serve(checkpoints[0], limit_mm_per_prompt={"image": 1, "video": 0}, enforce_eager=True), [item])
    assert tokens == expected_tokens
    assert (logprobs - expected_logprobs).abs().max() < LOGPROB_TOLERANCE
