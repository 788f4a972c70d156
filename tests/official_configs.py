"""The official config.json files of the seven Qwen2-VL / Qwen2.5-VL checkpoints, in the hub's
shape (flat text fields, rope_scaling of type mrope), from the numbers in docs/design.md ("Official configurations and checkpoint layouts")."""

COMMON = dict(
    bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653,
    vision_token_id=151654, image_token_id=151655, video_token_id=151656, hidden_act="silu",
    initializer_range=0.02, max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1000000.0,
    use_cache=True, use_sliding_window=False, sliding_window=32768, attention_dropout=0.0,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)


def _qwen2(hidden, layers, heads, kv, ffn, vocab, tied):
    return dict(
        COMMON, architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn,
        vocab_size=vocab, tie_word_embeddings=tied, max_window_layers=layers,
        vision_config=dict(
            depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, hidden_size=hidden, patch_size=14,
            spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2,
        ),
    )


def _qwen25(hidden, layers, heads, kv, ffn, vocab, tied, vision_ffn):
    return dict(
        COMMON, architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=ffn, vocab_size=vocab, tie_word_embeddings=tied, max_window_layers=layers,
        vision_config=dict(
            depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=vision_ffn, num_heads=16, in_chans=3,
            out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, spatial_patch_size=14, window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, temporal_patch_size=2,
        ),
    )


OFFICIAL_CONFIGS = {
    "Qwen2-VL-2B": _qwen2(1536, 28, 12, 2, 8960, 151936, True),
    "Qwen2-VL-7B": _qwen2(3584, 28, 28, 4, 18944, 152064, False),
    "Qwen2-VL-72B": _qwen2(8192, 80, 64, 8, 29568, 152064, False),
    "Qwen2.5-VL-3B": _qwen25(2048, 36, 16, 2, 11008, 151936, True, 3420),
    "Qwen2.5-VL-7B": _qwen25(3584, 28, 28, 4, 18944, 152064, False, 3420),
    "Qwen2.5-VL-32B": _qwen25(5120, 64, 40, 8, 27648, 152064, False, 3456),
    "Qwen2.5-VL-72B": _qwen25(8192, 80, 64, 8, 29568, 152064, False, 3456),
}
