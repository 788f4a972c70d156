"""Qwen-VL (2023) served by vLLM's Transformers backend, offline, on the CPU, in one process (see test_vllm.py).

A tiny random Qwen-VL-family directory (the real vocabulary and tokenizer, 56 px pictures: 4 x 4 patches, still 256
Resampler queries per picture) written by our save_pretrained is served with `vllm.LLM(model_impl="transformers",
trust_remote_code=True)`; greedy tokens and their log-probabilities must equal our own `generate()`.

The head is untied: vLLM's backend drops the checkpoint weights that the served body's
`_keys_to_ignore_on_load_unexpected` names, so QwenVLModel keeps its head-skipping in `_unused_checkpoint_keys`.
Dynamic NTK and logn act only past `seq_length` (2048) tokens, which these prompts stay below: under vLLM the model
sees no cache and no attention mask, so an NTK factor would come from a step's token count, not a prompt's.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip(
    "vllm.entrypoints.llm", reason="vLLM runs in its own venv: bash tests/vllm/setup.sh && bash tests/vllm/run.sh"
)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from configuration_qwenvl import QwenVLConfig  # noqa: E402
from image_processing_qwenvl import QwenVLImageProcessor  # noqa: E402
from modeling_qwenvl import QwenVLForConditionalGeneration  # noqa: E402
from processing_qwenvl import QwenVLProcessor  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tools.build_qwen_vl_tokenizer import build as build_tokenizer  # noqa: E402

EXAMPLES = ROOT / "examples"
MAX_TOKENS = 8
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Our model and processor, and vLLM serving the same directory. vLLM's CPU attention takes head sizes from 32
    up: the decoder is 128 wide with 2 heads of 64; the Resampler (heads of 128) is one head."""
    torch.manual_seed(0)
    visual = dict(heads=4, image_size=56, image_start_id=151857, layers=2, mlp_ratio=4.9231, output_dim=128, patch_size=14, width=64)
    config = QwenVLConfig(
        visual=visual, vocab_size=151936, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=2, kv_channels=64, seq_length=2048, use_dynamic_ntk=True, use_logn_attn=True,
    )
    model = QwenVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger weights than the default init make greedy choices decisive
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                p.mul_(3.0)
    directory = tmp_path_factory.mktemp("qwen_vl")
    model.save_pretrained(directory)
    build_tokenizer(directory)
    image_processor = QwenVLImageProcessor(image_size=56, drop_alpha=True, temporal_patch_size=1, merge_size=1)
    image_processor.save_pretrained(directory)
    processor = QwenVLProcessor.from_pretrained(directory)
    processor.save_pretrained(directory)
    llm = LLM(
        model=str(directory), model_impl="transformers", trust_remote_code=True, dtype="float32", max_model_len=2048,
        seed=0, limit_mm_per_prompt={"image": 2}, enable_prefix_caching=False, mm_processor_cache_gb=0,
        enforce_eager=True,
    )
    return model, processor, llm


def request(processor, question, images=()):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return {"prompt": prompt, "multi_modal_data": {"image": list(images)} if images else {}}


def test_greedy_tokens_match_our_generate(served):
    model, processor, llm = served
    shape, count = (Image.open(EXAMPLES / f"{name}.png").convert("RGB") for name in ("shape", "count"))
    for item in (request(processor, "Which shape is red?", [shape]), request(processor, "Compare.", [shape, count])):
        inputs = processor(text=[item["prompt"]], images=item["multi_modal_data"]["image"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        expected = out.sequences[0, inputs["input_ids"].shape[1] :]
        expected_logprobs = torch.stack(out.scores, 1)[0].log_softmax(-1).gather(-1, expected[:, None])[:, 0]
        served_out = llm.generate([item], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0), use_tqdm=False)
        tokens = list(served_out[0].outputs[0].token_ids)
        logprobs = torch.tensor([step[t].logprob for step, t in zip(served_out[0].outputs[0].logprobs, tokens)])
        assert tokens == expected.tolist()
        assert (logprobs - expected_logprobs[: len(tokens)]).abs().max() < LOGPROB_TOLERANCE
