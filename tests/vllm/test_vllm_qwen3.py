"""A Qwen3-VL (DeepStack) qwenvl directory is refused by vLLM's Transformers backend, with a message that points to
vLLM's native Qwen3-VL class: that backend passes only the main vision tokens to the decoder and would drop the
DeepStack features without a word. Runs in .venv-vllm (tests/vllm/run.sh); elsewhere skipped."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip(
    "vllm.entrypoints.llm", reason="vLLM runs in its own venv: bash tests/vllm/setup.sh && bash tests/vllm/run.sh"
)

import torch  # noqa: E402

from configuration_qwenvl import QwenVLConfig  # noqa: E402
from modeling_qwenvl import QwenVLForConditionalGeneration  # noqa: E402
from processing_qwenvl import QwenVLProcessor  # noqa: E402
from tiny_qwen3 import TEXT, VISION  # noqa: E402
from vllm import LLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_the_transformers_backend_refuses_a_deepstack_model(tmp_path):
    torch.manual_seed(0)
    text = dict(TEXT, vocab_size=151936, hidden_size=128, head_dim=32, model_type="qwen3_vl_text")
    vision = dict(VISION, out_hidden_size=128, model_type="qwen3_vl")
    config = QwenVLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    assert config.family == "qwen3_vl"
    QwenVLForConditionalGeneration(config).save_pretrained(tmp_path)
    QwenVLProcessor.from_pretrained(ROOT).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="native Qwen3-VL class"):
        LLM(model=str(tmp_path), model_impl="transformers", trust_remote_code=True, dtype="float32", max_model_len=2048)
