"""Tiny random models of both families, built with the reference classes inside transformers,
and token sequences with vision spans, for parity tests."""

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration

# Small vocabulary; special tokens moved inside it.
VOCAB = 320
PAD, IMAGE, VIDEO, VISION_START, VISION_END = 0, 300, 301, 302, 303
TOKEN_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
PATCH_ROW = 3 * 2 * 14 * 14

TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1000000.0,
    bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
)
VISION_25 = dict(
    depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, hidden_act="silu",
    window_size=112, fullatt_block_indexes=[1], tokens_per_second=2, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, in_channels=3,
)
VISION_2 = dict(
    depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=64, hidden_act="quick_gelu", patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
)


def reference_model(family, seed=0, tie=False):
    """A random built-in model of `family` ("2.5" or "2") in float32 eval mode."""
    torch.manual_seed(seed)
    if family == "2.5":
        config = Qwen2_5_VLConfig(text_config=dict(TEXT, tie_word_embeddings=tie), vision_config=dict(VISION_25), tie_word_embeddings=tie, **TOKEN_IDS)
        model = Qwen2_5_VLForConditionalGeneration(config)
    else:
        config = Qwen2VLConfig(text_config=dict(TEXT, tie_word_embeddings=tie), vision_config=dict(VISION_2), tie_word_embeddings=tie, **TOKEN_IDS)
        model = Qwen2VLForConditionalGeneration(config)
    # Larger weights than the default init make greedy choices decisive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                p.mul_(3.0)
    return model.eval()


def qwenvl_model(family, seed=0):
    """Our model of `family` ("2.5" or "2") with the same tiny config, scaled the same way, in float32 eval mode."""
    from configuration_qwenvl import QwenVLConfig
    from modeling_qwenvl import QwenVLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(VISION_25) if family == "2.5" else dict(VISION_2)
    model = QwenVLForConditionalGeneration(QwenVLConfig(vision_config=vision, **{**TEXT, **TOKEN_IDS}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                p.mul_(3.0)
    return model.eval()


def sequence(*parts, merge=2):
    """Token ids from parts: an int list is text, ("image", (t, h, w)) / ("video", (t, h, w)) a span."""
    ids = []
    for part in parts:
        if isinstance(part, tuple):
            kind, (t, h, w) = part
            ids += [VISION_START] + [IMAGE if kind == "image" else VIDEO] * (t * h * w // merge**2) + [VISION_END]
        else:
            ids += list(part)
    return ids


def pixels(*grids, seed=0, row=PATCH_ROW):
    """Random pixel rows (`row` wide) for items with the given (t, h, w) grids."""
    g = torch.Generator().manual_seed(seed)
    rows = sum(t * h * w for t, h, w in grids)
    return torch.randn(rows, row, generator=g), torch.tensor(grids, dtype=torch.long)


def left_pad(sequences, pad=PAD):
    length = max(len(s) for s in sequences)
    ids = torch.tensor([[pad] * (length - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask
