"""The official config.json files of the six Qwen3-VL Instruct checkpoints, in the hub's nested shape (written by
transformers 4.57.0.dev0), from the numbers in the Qwen3-VL specification, and their parameter counts on the meta
device (the built-in classes give the same totals on 4.57 and 5.24)."""

TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def _text(model_type, hidden, layers, heads, kv, ffn, tied, **moe):
    return dict(
        model_type=model_type, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, attention_bias=False, attention_dropout=0.0,
        hidden_act="silu", initializer_range=0.02, max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_theta=5000000, rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        tie_word_embeddings=tied, use_cache=True, vocab_size=151936, bos_token_id=151643, eos_token_id=151645, **moe,
    )


def _vision(model_type, width, depth, ffn, deepstack, out):
    return dict(
        model_type=model_type, depth=depth, hidden_size=width, intermediate_size=ffn, num_heads=16, in_channels=3,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=out, num_position_embeddings=2304,
        deepstack_visual_indexes=deepstack, hidden_act="gelu_pytorch_tanh", initializer_range=0.02,
    )


def _dense(hidden, layers, heads, kv, ffn, tied, small_vision):
    vision = (1024, 24, 4096, [5, 11, 17]) if small_vision else (1152, 27, 4304, [8, 16, 24])
    return dict(
        architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl", tie_word_embeddings=tied,
        text_config=_text("qwen3_vl_text", hidden, layers, heads, kv, ffn, tied),
        vision_config=_vision("qwen3_vl", *vision, hidden), **TOKEN_IDS,
    )


def _moe(hidden, layers, heads, kv, ffn, expert_ffn):
    moe = dict(
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=expert_ffn, decoder_sparse_step=1,
        mlp_only_layers=[], norm_topk_prob=True, router_aux_loss_coef=0.001,
    )
    return dict(
        architectures=["Qwen3VLMoeForConditionalGeneration"], model_type="qwen3_vl_moe", tie_word_embeddings=False,
        text_config=_text("qwen3_vl_moe_text", hidden, layers, heads, kv, ffn, False, **moe),
        vision_config=_vision("qwen3_vl_moe", 1152, 27, 4304, [8, 16, 24], hidden), **TOKEN_IDS,
    )


OFFICIAL_QWEN3_CONFIGS = {
    "Qwen3-VL-2B-Instruct": _dense(2048, 28, 16, 8, 6144, True, True),
    "Qwen3-VL-4B-Instruct": _dense(2560, 36, 32, 8, 9728, True, True),
    "Qwen3-VL-8B-Instruct": _dense(4096, 36, 32, 8, 12288, False, False),
    "Qwen3-VL-32B-Instruct": _dense(5120, 64, 64, 8, 25600, False, False),
    "Qwen3-VL-30B-A3B-Instruct": _moe(2048, 48, 32, 4, 6144, 768),
    "Qwen3-VL-235B-A22B-Instruct": _moe(4096, 94, 64, 4, 12288, 1536),
}

PARAMETER_COUNTS = {
    "Qwen3-VL-2B-Instruct": 2_127_532_032,
    "Qwen3-VL-4B-Instruct": 4_437_815_808,
    "Qwen3-VL-8B-Instruct": 8_767_123_696,
    "Qwen3-VL-32B-Instruct": 33_357_390_064,
    "Qwen3-VL-30B-A3B-Instruct": 31_070_754_032,
    "Qwen3-VL-235B-A22B-Instruct": 235_670_022_896,
}
