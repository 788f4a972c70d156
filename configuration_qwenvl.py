"""Configuration for qwenvl: Qwen2.5-VL and Qwen2-VL in one set of classes.

The two families differ only by switches in `QwenVLVisionConfig`:

| switch                  | Qwen2.5-VL              | Qwen2-VL                   |
|-------------------------|-------------------------|----------------------------|
| `norm_type`             | "rmsnorm"               | "layernorm"                |
| `gated_mlp`             | True (SwiGLU with bias) | False (fc1 -> act -> fc2)  |
| `fullatt_block_indexes` | e.g. [7, 15, 23, 31]    | None (every layer is full) |
| `tokens_per_second`     | 2 (absolute video time) | None (frame index)         |

Both official config.json shapes are read: the hub's flat text fields with
`rope_scaling={"type": "mrope", ...}` and transformers 5's nested `text_config`
with `rope_parameters`; Qwen2-VL's vision naming (`embed_dim`, `mlp_ratio`, `hidden_size`
meaning the merger's output) is recognised by the presence of `embed_dim`.

Qwen3-VL (dense and MoE) adds switches of its own, each off for the two families above: on the vision side
`patch_embed_bias`, `num_position_embeddings` (the learned table), `deepstack_visual_indexes` and `text_timestamps`
(video time written in the text); on the text side `head_dim`, `attention_bias`, `qk_norm`, `mrope_interleaved` and
the MoE group (`num_experts` > 0, ...). Its official nested file is recognised by `model_type` `qwen3_vl*`.
"""

import inspect
import math

from transformers import AutoConfig, PretrainedConfig

# Every Auto class a saved model directory answers to (written into its config.json on save).
AUTO_MAP = {
    "AutoConfig": "configuration_qwenvl.QwenVLConfig",
    "AutoModel": "modeling_qwenvl.QwenVLModel",
    "AutoModelForImageTextToText": "modeling_qwenvl.QwenVLForConditionalGeneration",
}
# Qwen-VL (2023)'s Resampler has heads of this size (the original: output_dim // 128 heads).
RESAMPLER_HEAD_DIM = 128
# How a learned position table is resized to a patch grid (`QwenVLVisionConfig.position_interpolation`).
POSITION_INTERPOLATIONS = {"bicubic", "bilinear_align_corners"}


class QwenVLVisionConfig(PretrainedConfig):
    model_type = "qwenvl_vision"
    base_config_key = "vision_config"

    def __init__(
        self,
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        in_channels=3,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=3584,
        hidden_act="silu",
        norm_type="rmsnorm",
        gated_mlp=True,
        window_size=112,
        fullatt_block_indexes=(7, 15, 23, 31),
        tokens_per_second=2,
        rope_theta=10000.0,
        initializer_range=0.02,
        max_patches_per_chunk=65536,
        patch_embed_bias=False,
        num_position_embeddings=None,
        position_interpolation="bicubic",
        deepstack_visual_indexes=None,
        text_timestamps=False,
        pre_norm=False,
        vision_rope=True,
        projector="merger",
        num_queries=256,
        # MoonViT (Kimi-VL) switches
        vision_rope_layout="halves",
        final_norm=False,
        norm_eps=1e-6,
        patch_order="merge",
        **kwargs,
    ):
        if str(kwargs.get("model_type", "")).startswith("qwen3_vl"):  # the official Qwen3-VL file names only sizes
            patch_embed_bias, text_timestamps = True, True
            position_interpolation = "bilinear_align_corners"
            norm_type, gated_mlp = "layernorm", False
            window_size, fullatt_block_indexes, tokens_per_second = None, None, None
        if kwargs.get("model_type") == "moonvit":  # Kimi-VL's MoonViT naming and its fixed design
            depth = kwargs.pop("num_hidden_layers", 27)
            num_heads = kwargs.pop("num_attention_heads", 16)
            merge = kwargs.pop("merge_kernel_size", (2, 2))
            table = kwargs.pop("init_pos_emb_height", 64), kwargs.pop("init_pos_emb_width", 64)
            if merge[0] != merge[1] or table[0] != table[1]:
                raise ValueError(
                    f"MoonViT with a non-square merge kernel {merge} or position table {table} is not supported"
                )
            spatial_merge_size, num_position_embeddings = merge[0], table[0] * table[1]
            temporal_patch_size, hidden_act, norm_eps = 1, "gelu_pytorch_tanh", 1e-5
            norm_type, gated_mlp = "layernorm", False
            window_size, fullatt_block_indexes, tokens_per_second = None, None, None
            patch_embed_bias, vision_rope_layout, final_norm, patch_order = True, "pairs", True, "raster"
        if "embed_dim" in kwargs:  # Qwen2-VL naming: hidden_size is the merger's output there
            out_hidden_size = hidden_size
            hidden_size = kwargs.pop("embed_dim")
            intermediate_size = int(hidden_size * kwargs.pop("mlp_ratio", 4))
            hidden_act = kwargs.pop("hidden_act", "quick_gelu")
            norm_type, gated_mlp = "layernorm", False
            window_size, fullatt_block_indexes, tokens_per_second = None, None, None
        in_channels = kwargs.pop("in_chans", in_channels)
        for name in ("spatial_patch_size", "model_type", "rope_parameters", "mlp_ratio"):
            kwargs.pop(name, None)
        super().__init__(**kwargs)
        self.depth = depth
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_heads = num_heads
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.spatial_merge_size = spatial_merge_size
        self.out_hidden_size = out_hidden_size
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.gated_mlp = gated_mlp
        self.window_size = window_size
        self.fullatt_block_indexes = list(fullatt_block_indexes) if fullatt_block_indexes is not None else None
        self.tokens_per_second = tokens_per_second
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        # The vision tower encodes larger inputs in chunks of whole frames (bounded memory, same result).
        self.max_patches_per_chunk = max_patches_per_chunk
        # A learned position table of `num_position_embeddings` rows (a square grid) resized to each frame's patch
        # grid: "bicubic" (Qwen-VL 2023, Kimi-VL) or "bilinear_align_corners" (Qwen3-VL).
        self.num_position_embeddings = num_position_embeddings
        self.position_interpolation = position_interpolation
        # Qwen3-VL: a patch bias, DeepStack mergers reading the outputs of these blocks, and video time written as
        # text (each temporal patch its own span).
        self.patch_embed_bias = patch_embed_bias
        self.deepstack_visual_indexes = list(deepstack_visual_indexes) if deepstack_visual_indexes is not None else None
        self.text_timestamps = text_timestamps
        # Qwen-VL (2023): a LayerNorm before the blocks, no 2-D rotary, and a Resampler of `num_queries` learned
        # queries in place of the 2x2 merger.
        self.pre_norm = pre_norm
        self.vision_rope = vision_rope
        self.projector = projector
        self.num_queries = num_queries
        # MoonViT: 2-D rotary on (x[2i], x[2i+1]) pairs, a final norm, norms with `norm_eps`, and pixels in raster
        # order.
        self.vision_rope_layout = vision_rope_layout
        self.final_norm = final_norm
        self.norm_eps = norm_eps
        self.patch_order = patch_order
        self._validate()

    def _validate(self):
        check_sizes(
            "vision_config", self, "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
            "temporal_patch_size", "spatial_merge_size", "out_hidden_size",
        )
        check_positive_finite("vision_config", self, "rope_theta", "norm_eps")
        self._validate_moonvit_switches()
        if self.norm_type not in ("rmsnorm", "layernorm"):
            raise ValueError(f"vision_config.norm_type must be 'rmsnorm' or 'layernorm', got {self.norm_type!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision_config.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.vision_rope and (self.hidden_size // self.num_heads) % 4:
            raise ValueError("the vision head size must be divisible by 4 (2-D rotary: half for h, half for w)")
        if self.fullatt_block_indexes is not None:
            if not self.window_size:
                raise ValueError("fullatt_block_indexes is set, so window_size must be a positive number of pixels")
            window_tokens, rest = divmod(self.window_size, self.patch_size * self.spatial_merge_size)
            if rest or window_tokens < 1:
                raise ValueError(
                    f"window_size ({self.window_size}) must be a positive multiple of "
                    f"patch_size * spatial_merge_size ({self.patch_size * self.spatial_merge_size})"
                )
            bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"fullatt_block_indexes {bad} are outside the {self.depth} vision blocks")
        self._validate_qwen3()
        self._validate_resampler()

    def _validate_qwen3(self):
        if self.deepstack_visual_indexes is not None:
            bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"deepstack_visual_indexes {bad} are outside the {self.depth} vision blocks")
        if self.text_timestamps and self.tokens_per_second is not None:
            raise ValueError("text_timestamps (video time in the text) and tokens_per_second (time on the rotary axis) exclude each other")

    def _validate_resampler(self):
        if self.projector not in ("merger", "resampler"):
            raise ValueError(f"vision_config.projector must be 'merger' or 'resampler', got {self.projector!r}")
        if self.position_interpolation not in POSITION_INTERPOLATIONS:
            raise ValueError(
                f"vision_config.position_interpolation must be one of {sorted(POSITION_INTERPOLATIONS)}, "
                f"got {self.position_interpolation!r}"
            )
        if self.num_position_embeddings is not None:
            check_sizes("vision_config", self, "num_position_embeddings")
            if math.isqrt(self.num_position_embeddings) ** 2 != self.num_position_embeddings:
                raise ValueError(
                    f"vision_config.num_position_embeddings ({self.num_position_embeddings}) must be a square number "
                    "(the table is a square grid)"
                )
        if self.projector == "resampler":
            check_sizes("vision_config", self, "num_queries")
            if math.isqrt(self.num_queries) ** 2 != self.num_queries:
                raise ValueError(f"vision_config.num_queries ({self.num_queries}) must be a square number (a 2-D grid)")
            if self.out_hidden_size % RESAMPLER_HEAD_DIM:
                raise ValueError(
                    f"vision_config.out_hidden_size ({self.out_hidden_size}) must be a multiple of "
                    f"{RESAMPLER_HEAD_DIM}: the Resampler has heads of that size"
                )

    def _validate_moonvit_switches(self):
        if self.vision_rope_layout not in ("halves", "pairs"):
            raise ValueError(
                f"vision_config.vision_rope_layout must be 'halves' or 'pairs', got {self.vision_rope_layout!r}"
            )
        if self.patch_order not in ("merge", "raster"):
            raise ValueError(f"vision_config.patch_order must be 'merge' or 'raster', got {self.patch_order!r}")

    @property
    def uses_window_attention(self):
        return self.fullatt_block_indexes is not None


class QwenVLConfig(PretrainedConfig):
    """The whole model: Qwen2 language-model fields (flat, as in the hub files) plus `vision_config`.

    Defaults are Qwen2.5-VL-7B's. Any official config.json, either family and either shape,
    can be passed as keyword arguments (that is what `from_pretrained` does).
    """

    model_type = "qwenvl"
    sub_configs = {"vision_config": QwenVLVisionConfig}
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # The config of a language model taken from transformers as it is (Kimi-VL: DeepSeek-V3); None for the Qwen2
    # decoder of this file. A class attribute, so that configs without one do not save it.
    text_config = None

    def __init__(
        self,
        vision_config=None,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        mrope_section=(16, 24, 24),  # frequency pairs turned by time, height, width
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        head_dim=None,
        attention_bias=True,
        qk_norm=False,
        mrope_interleaved=False,
        num_experts=0,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=(),
        sequential_positions=False,
        use_dynamic_ntk=False,
        use_logn_attn=False,
        seq_length=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.mrope_section = mrope_section
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        # Qwen3-VL's decoder: an explicit head size (None: hidden_size / heads), q/k/v without bias, a per-head
        # RMSNorm on q and k before the rotary, M-RoPE frequencies interleaved over the axes, and with num_experts
        # > 0 sparse MLPs (top-k of num_experts SwiGLU experts) in every decoder_sparse_step-th layer not listed in
        # mlp_only_layers.
        self.head_dim = head_dim
        self.attention_bias = attention_bias
        self.qk_norm = qk_norm
        self.mrope_interleaved = mrope_interleaved
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.decoder_sparse_step = decoder_sparse_step
        self.mlp_only_layers = list(mlp_only_layers)
        # Qwen-VL (2023): 1-D positions, every token one step further (M-RoPE with (i, i, i)); past `seq_length`
        # tokens, a prefill rotates with a larger base (dynamic NTK, kept while decoding) and queries are scaled
        # by log_seq_length(position + 1) (logn); both at inference only. seq_length is None for the other families:
        # vLLM reads a seq_length as the length limit of any model.
        self.sequential_positions = sequential_positions
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.seq_length = seq_length
        if "visual" in kwargs:
            vision_config = self._read_qwen_vl_2023(kwargs)
        self.mrope_section = list(self.mrope_section)
        text_config = composed_text_config(kwargs)
        if text_config is not None:
            _compose_fields(self, text_config, kwargs)
        for name, value in _official_text_fields(kwargs).items():  # the other shapes fill the fields not given
            if getattr(self, name) == TEXT_DEFAULTS[name]:
                setattr(self, name, value)
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.mrope_section = list(self.mrope_section)
        self.mlp_only_layers = list(self.mlp_only_layers)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(vision_config, dict):
            vision_config = QwenVLVisionConfig(**vision_config)
        self.vision_config = vision_config if vision_config is not None else QwenVLVisionConfig()
        if self.text_config is not None:  # the projector writes into the composed decoder's width
            self.vision_config.out_hidden_size = self.hidden_size
        kwargs.setdefault("bos_token_id", 151643)
        kwargs.setdefault("eos_token_id", 151645)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self._validate()

    @property
    def family(self):
        """Which generation this config describes, read from its switches: "qwen3_vl" (dense or MoE), "qwen2_5_vl",
        "qwen2_vl", "qwen_vl" (2023) or "kimi_vl"."""
        if self.vision_config.projector == "resampler":
            return "qwen_vl"
        if self.text_config is not None:
            return "kimi_vl"
        if self.vision_config.deepstack_visual_indexes is not None:
            return "qwen3_vl"
        return "qwen2_5_vl" if self.vision_config.norm_type == "rmsnorm" else "qwen2_vl"

    def is_sparse_layer(self, index):
        """Whether decoder layer `index` has the mixture of experts instead of the dense MLP."""
        return self.num_experts > 0 and index not in self.mlp_only_layers and (index + 1) % self.decoder_sparse_step == 0

    def _read_qwen_vl_2023(self, kwargs):
        """The original Qwen-VL / Qwen-VL-Chat config.json (model_type "qwen"): Qwen-7B's flat names and a `visual`
        dict. Sets our fields from it and returns the vision config."""
        visual = kwargs.pop("visual")
        kv_channels = kwargs.pop("kv_channels", self.hidden_size // self.num_attention_heads)
        if kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"kv_channels ({kv_channels}) * num_attention_heads ({self.num_attention_heads}) must equal "
                f"hidden_size ({self.hidden_size}), as the original Qwen-VL code requires"
            )
        if kwargs.pop("rotary_pct", 1.0) != 1.0:
            raise ValueError("rotary_pct below 1.0 is not supported: every official Qwen-VL model rotates whole heads")
        self.intermediate_size //= 2  # the original's intermediate_size counts w1 and w2 together
        self.num_key_value_heads = self.num_attention_heads
        self.rms_norm_eps = kwargs.pop("layer_norm_epsilon", 1e-6)
        self.rope_theta = float(kwargs.pop("rotary_emb_base", 10000))
        self.mrope_section = [kv_channels // 2, 0, 0]  # positions are (i, i, i): any split is 1-D RoPE
        self.sequential_positions = True
        start = visual.get("image_start_id", 151857)
        self.vision_start_token_id, self.vision_end_token_id, self.image_token_id = start, start + 1, start + 2
        self.video_token_id = None
        kwargs.setdefault("bos_token_id", 151643)
        kwargs.setdefault("eos_token_id", 151643)
        kwargs.setdefault("pad_token_id", 151643)
        for name in QWEN_VL_2023_UNUSED:
            kwargs.pop(name, None)
        width = visual["width"]
        return QwenVLVisionConfig(
            depth=visual["layers"], hidden_size=width, intermediate_size=int(width * visual["mlp_ratio"]),
            num_heads=visual["heads"], patch_size=visual["patch_size"], temporal_patch_size=1, spatial_merge_size=1,
            out_hidden_size=visual["output_dim"], hidden_act="gelu", norm_type="layernorm", gated_mlp=False,
            window_size=None, fullatt_block_indexes=None, tokens_per_second=None, num_position_embeddings=256,
            pre_norm=True, vision_rope=False, projector="resampler", num_queries=256,
        )

    def _validate(self):
        check_sizes(
            "config", self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings",
        )
        check_positive_finite("config", self, "rope_theta", "rms_norm_eps")
        if self.use_dynamic_ntk or self.use_logn_attn:  # None elsewhere: engines read seq_length as a length limit
            check_sizes("config", self, "seq_length")
        check_sizes("config", self, "head_dim")
        if self.num_experts:
            check_sizes("config", self, "num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step")
            if self.num_experts_per_tok > self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must not exceed num_experts ({self.num_experts})"
                )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        deepstack = self.vision_config.deepstack_visual_indexes or []
        if len(deepstack) > self.num_hidden_layers:
            raise ValueError(
                f"{len(deepstack)} DeepStack levels (vision_config.deepstack_visual_indexes) need as many decoder "
                f"layers to add them after, but num_hidden_layers is {self.num_hidden_layers}"
            )
        if self.text_config is None and (len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != self.head_dim):
            raise ValueError(
                f"mrope_section {self.mrope_section} must have 3 parts (temporal, height, width) summing to half "
                f"the attention head size ({self.head_dim} // 2 = {self.head_dim // 2})"
            )

    def get_text_config(self, *args, **kwargs):
        """The language model's settings: this config itself, seen through a distinct object.

        The text fields live on this config (flat, as in the hub files), so the view shares all its attributes: a
        change made through either (such as an engine setting `_attn_implementation`) shows in both. It is a
        distinct object because engines tell a multimodal config from a text-only one by identity: vLLM's
        Transformers backend serves a model as multimodal only when `config.get_text_config() is not config`.
        """
        if self.text_config is not None:  # a composed decoder has its own config
            return self.text_config
        view = object.__new__(type(self))
        view.__dict__ = self.__dict__
        return view

    def to_dict(self):
        """With a composed decoder, the official shape: its fields live in `text_config` only."""
        output = super().to_dict()
        if self.text_config is not None:
            for name in TEXT_DEFAULTS:
                output.pop(name, None)
        return output


# ---- Kimi-VL: the official `kimi_vl` shape ----------------------------------------------------------------------

# Language models taken from transformers as they are (`AutoModel.from_config(text_config)`), by model_type.
COMPOSED_DECODERS = ("deepseek_v3",)
# Fields of a composed decoder's config that this file's code reads, mirrored onto QwenVLConfig (never saved there).
MIRRORED_TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
)
# Kimi-VL's token ids: `media_placeholder_token_id` is in its config.json; the token before each placeholder run,
# `<|media_content|>`, is not (163603 is UNCONFIRMED, from third-party tables), so it is a config field here.
KIMI_TOKEN_DEFAULTS = {"media_placeholder_token_id": 163605, "media_content_token_id": 163603}


def composed_text_config(kwargs):
    """Pop a `text_config` of a decoder taken from transformers (COMPOSED_DECODERS) out of `kwargs`, as that config
    class; None (and `kwargs` untouched) for any other."""
    text_config = kwargs.get("text_config")
    if isinstance(text_config, dict):
        model_type = text_config.get("model_type")
    else:
        model_type = getattr(text_config, "model_type", None)
    if model_type not in COMPOSED_DECODERS:
        return None
    kwargs.pop("text_config")
    return AutoConfig.for_model(**text_config) if isinstance(text_config, dict) else text_config


def _compose_fields(config, text_config, kwargs):
    """Kimi-VL: keep the decoder's config as it is, mirror the fields this file reads, and take the media ids."""
    config.text_config = text_config
    for name in MIRRORED_TEXT_FIELDS:
        setattr(config, name, getattr(text_config, name))
    for name, default in KIMI_TOKEN_DEFAULTS.items():
        setattr(config, name, kwargs.pop(name, default))
    config.image_token_id = config.media_placeholder_token_id
    config.vision_start_token_id = config.media_content_token_id  # the token right before each placeholder run
    config.video_token_id = None  # images only, as the official processor
    config.sequential_positions = True  # 1-D positions, images taking ordinary ones
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        if getattr(text_config, name, None) is not None:
            kwargs.setdefault(name, getattr(text_config, name))


def _official_text_fields(kwargs):
    """Pop the official shapes' text settings out of `kwargs`, under our flat names.

    Reads a nested `text_config` (transformers 5 files), which fills the same fields as the flat arguments, and
    `rope_scaling` / `rope_parameters`
    (which hold `mrope_section` and `rope_theta`); drops the sliding-window fields, which
    the official models leave disabled.
    """
    fields = {}
    text_config = kwargs.pop("text_config", None)
    if text_config is not None:
        text_config = text_config if isinstance(text_config, dict) else text_config.to_dict()
        if str(text_config.get("model_type", "")).startswith("qwen3_vl"):  # the Qwen3 decoder norms q and k per head
            fields["qk_norm"] = True
        if "num_local_experts" in text_config:  # transformers 5's name for num_experts
            fields["num_experts"] = text_config["num_local_experts"]
        for key, value in text_config.items():
            if key in TEXT_DEFAULTS or key in ("rope_scaling", "rope_parameters", "use_sliding_window"):
                fields[key] = value
            elif key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
                kwargs.setdefault(key, value)
    for key in ("rope_scaling", "rope_parameters", "use_sliding_window"):
        if key in kwargs:
            fields[key] = kwargs.pop(key)
    for key in ("rope_scaling", "rope_parameters"):
        rope = fields.pop(key, None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("mrope", "default"):
            raise ValueError(f"rope type {rope_type!r} is not supported by qwenvl (only M-RoPE)")
        for name in ("mrope_section", "rope_theta", "mrope_interleaved"):
            if name in rope:
                fields[name] = rope[name]
    if fields.pop("use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported: the official models use full causal attention")
    for key in ("sliding_window", "max_window_layers", "layer_types", "model_type"):
        kwargs.pop(key, None)
    return fields


# Fields of the original Qwen-VL config.json that change nothing at inference in float32 (dtype flags, dropout
# probabilities of 0, the tokenizer's name, flags the original code ignores).
QWEN_VL_2023_UNUSED = (
    "no_bias", "scale_attn_weights", "emb_dropout_prob", "attn_dropout_prob", "bf16", "fp16", "fp32", "onnx_safe",
    "use_flash_attn", "tokenizer_type", "softmax_in_fp32", "model_type",
)


def check_sizes(where, config, *names):
    """Sizes and counts are positive integers: a zero or negative one builds a model without layers or fails deep
    inside torch."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}.{name} must be a positive integer, got {value!r}")


def check_positive_finite(where, config, *names):
    """Rotary bases and norm epsilons: zero, negative or infinite values give NaN in the first layer."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{where}.{name} must be a positive finite number, got {value!r}")


# The language model's fields and their defaults: the arguments of QwenVLConfig after vision_config.
TEXT_DEFAULTS = {
    name: list(parameter.default) if isinstance(parameter.default, tuple) else parameter.default
    for name, parameter in list(inspect.signature(QwenVLConfig.__init__).parameters.items())[2:-1]
}

QwenVLConfig.register_for_auto_class()
