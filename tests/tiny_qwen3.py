"""Tiny random Qwen3-VL models (dense and MoE) built with transformers' own classes, and token sequences in the
layout the Qwen code writes for them (videos: `<t seconds>` text before each temporal patch's own span)."""

import torch
import transformers

import tiny
from tiny import IMAGE, PAD, VIDEO, VISION_END, VISION_START, left_pad  # noqa: F401 (the same ids as the Qwen2.5 ones)

VOCAB = 320
TOKEN_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
PATCH_ROW = 3 * 2 * 16 * 16

# head_dim 32 differs from hidden / heads (16): the explicit head size is exercised. Three DeepStack levels, so
# features go in after decoder layers 0, 1 and 2.
TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=4096, rope_theta=5e6,
    rope_scaling={"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True},
    attention_bias=False, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
)
# Experts of 24: neither hidden == 2 * I nor hidden == I, so transformers 5 transposes them on load (a square
# expert is loaded untransposed there: docs/design.md, Qwen3-VL).
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
VISION = dict(
    depth=4, hidden_size=48, intermediate_size=96, num_heads=2, in_channels=3, patch_size=16, spatial_merge_size=2,
    temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 3],
    hidden_act="gelu_pytorch_tanh",
)


def reference_model(variant, seed=0):
    """A random built-in Qwen3-VL ("dense" or "moe") in float32 eval mode, with weights large enough that greedy
    choices are decisive and norms and biases that are not their initial constants."""
    torch.manual_seed(seed)
    if variant == "moe":
        config = transformers.Qwen3VLMoeConfig(text_config=dict(TEXT, **MOE), vision_config=dict(VISION), tie_word_embeddings=False, **TOKEN_IDS)
        model = transformers.Qwen3VLMoeForConditionalGeneration(config)
    else:
        config = transformers.Qwen3VLConfig(text_config=dict(TEXT), vision_config=dict(VISION), tie_word_embeddings=False, **TOKEN_IDS)
        model = transformers.Qwen3VLForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                p.mul_(3.0)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def mm_token_types(input_ids):
    return (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()


def builtin_inputs(inputs):
    """transformers 5 wants the token types for M-RoPE; 4.57 finds them in input_ids itself."""
    if transformers.__version__.startswith("4."):
        return dict(inputs)
    return dict(inputs, mm_token_type_ids=mm_token_types(inputs["input_ids"]))


def timestamp(seconds):
    """`<t seconds>` as tokens of the tiny vocabulary: one token per character (digits and the dot)."""
    return [10 + "0123456789.".index(c) for c in f"{seconds:.1f}"] + [25]


def sequence(*parts, merge=2):
    """Token ids: an int list is text, ("image", (t, h, w)) an image span, ("video", (t, h, w), seconds) a video
    written as the 4.57 processor does: a timestamp and its own span per temporal patch."""
    ids = []
    for part in parts:
        if not isinstance(part, tuple):
            ids += list(part)
        elif part[0] == "image":
            t, h, w = part[1]
            ids += [VISION_START] + [IMAGE] * (t * h * w // merge**2) + [VISION_END]
        else:
            (t, h, w), seconds = part[1], part[2]
            for frame in range(t):
                ids += timestamp(seconds[frame]) + [VISION_START] + [VIDEO] * (h * w // merge**2) + [VISION_END]
    return ids


def pixels(*grids, seed=0):
    return tiny.pixels(*grids, seed=seed, row=PATCH_ROW)
