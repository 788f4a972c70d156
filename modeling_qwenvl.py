"""qwenvl: Qwen2.5-VL and Qwen2-VL as one readable, single-file model.

The data flows top to bottom through this file, one section per step:

    pixels -> patches (PatchEmbed) -> window order (get_window_index) -> vision blocks (packed attention over
    segments) -> merger (2x2 -> 1) -> raster order -> scattered into the text embeddings (scatter_vision)
    -> M-RoPE positions (get_rope_index) -> Qwen2 decoder -> logits

The families differ only by switches of `QwenVLVisionConfig` (norm, MLP, window layers, video time scaling); how the
coming families fit is in docs/design.md ("The layout: one house for five families"). Shapes use N = patches,
M = N / 4 merged tokens, B = batch, L = sequence length, H = heads, D = head size.
"""

import inspect
import json
import math
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

try:  # optional: varlen kernel for the vision tower on GPUs
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

try:  # torch's own varlen kernel (FlashAttention-2 inside; CUDA, torch >= 2.9)
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except ImportError:
    torch_varlen_attn = None

try:  # as remote code, the files form a package; from a checkout, they are plain modules
    from .configuration_qwenvl import AUTO_MAP, RESAMPLER_HEAD_DIM, QwenVLConfig, QwenVLVisionConfig
except ImportError:
    from configuration_qwenvl import AUTO_MAP, RESAMPLER_HEAD_DIM, QwenVLConfig, QwenVLVisionConfig

# ----------------------------------------------------------------------------------------------------------------------
# Compat: every place where transformers 4.57 and 5.x differ for this file, detected by feature.
# 1. 5.x passes the KV cache to `forward` as `cache=` and reads it back from `outputs.cache`; 4.x uses
#    `past_key_values` for both.
CACHE_NAME = (
    "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)
# 2. Attention kernels by name: 5.x looks them up with `get_interface` (and lets `set_attn_implementation` switch a
#    loaded model only when the source does so); 4.x indexes the registry (and lets it switch when the source reads
#    `ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]` beside an `eager_attention_forward`).
#    See TextAttention.
HAS_ATTENTION_GET_INTERFACE = hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface")
# 3. 5.x keeps checkpoint renamings per architecture name (vLLM's Transformers backend applies them); 4.x has no
#    such registry. Used in "Loading and saving".
try:
    from transformers.conversion_mapping import WeightRenaming, register_checkpoint_conversion_mapping
except ImportError:
    register_checkpoint_conversion_mapping = None
# 4. 5.x saves weights back in the layout they were loaded from unless told otherwise.
SAVES_ORIGINAL_FORMAT = "save_original_format" in inspect.signature(PreTrainedModel.save_pretrained).parameters
# 5. 5.x's built-in Qwen3-VL MoE holds its fused experts as [E, 2I, hidden] and saves them so; the official files and
#    4.x hold [E, hidden, 2I] (ours too). On 5.x a converter registered under our name transposes the former on load
#    (it leaves a tensor alone whose shape is already ours). Used in "Loading and saving".
try:
    from transformers.core_model_loading import Transpose, WeightConverter

    EXPERT_CONVERTERS = [
        WeightConverter(f"mlp.experts.{name}", f"mlp.experts.{name}", operations=[Transpose(1, 2, check_dims=True)])
        for name in ("gate_up_proj", "down_proj")
    ]
except ImportError:
    EXPERT_CONVERTERS = []
# 6. 5.x fuses the experts of its DeepSeek-V3 decoder into `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj`
#    [E, H, I] (and converts official per-expert weights on load); 4.x keeps them one by one. Told apart by the
#    parameter names in `kimi_state_dict`.
# 7. Static caches (`generate(cache_implementation="static")`): 5.x names their capacity `get_max_length` and counts
#    the written tokens itself; 4.x names it `get_max_cache_shape` and writes where `cache_kwargs["cache_position"]`
#    says. See static_capacity and TextAttention.
CACHE_CAPACITY = "get_max_length" if hasattr(Cache, "get_max_length") else "get_max_cache_shape"
# ----------------------------------------------------------------------------------------------------------------------


# ======================================================================================================================
# Shared layers and the base class
# ======================================================================================================================


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class QwenVLPreTrainedModel(PreTrainedModel):
    config_class = QwenVLConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TextDecoderLayer", "VisionBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _supports_cache_class = True
    # Weights of a checkpoint that a class leaves out when it loads (QwenVLModel: the head). Not
    # `_keys_to_ignore_on_load_unexpected`: vLLM's Transformers backend drops checkpoint weights that match that
    # list of the body it serves, so an untied head (Qwen-VL, Qwen2.5-VL-7B) would stay zero there.
    _unused_checkpoint_keys = ()

    @classmethod
    def from_pretrained(cls, *args, strict=True, **kwargs):
        """Loads a checkpoint that matches its config, or refuses it ("Loading and saving" at the end of the file).

        Weights load from safetensors only: a pickle checkpoint (`pytorch_model.bin`) can run arbitrary code while it
        loads, so it is refused unless the caller passes `use_safetensors=False`. With `strict` (the default) a local
        checkpoint whose layer counts differ from its config is refused before any weight is allocated, and weights
        that are missing (they would be random) or unexpected (they would be dropped) are an error;
        `strict=False` loads such a checkpoint with transformers' warnings instead."""
        if kwargs.get("use_safetensors") is None:
            kwargs["use_safetensors"] = True
        directory = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        directory = os.path.normpath(os.path.join(str(directory), kwargs.get("subfolder") or ""))
        if kwargs["use_safetensors"]:
            refuse_pickle_only_directory(directory)
        if not strict:
            return super().from_pretrained(*args, **kwargs)
        if cls.config_class is QwenVLConfig and os.path.isdir(directory):
            config = kwargs.get("config")
            check_layer_counts(directory, config if isinstance(config, QwenVLConfig) else QwenVLConfig.from_pretrained(directory))
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        info["unexpected_keys"] = [k for k in info["unexpected_keys"] if not k.startswith(cls._unused_checkpoint_keys)]
        refuse_missing_or_unexpected(directory, info)
        return (model, info) if wants_info else model

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, PositionTable)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, TextExperts):
            nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
            nn.init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Resampler):
            nn.init.normal_(module.query, mean=0.0, std=std)


# ======================================================================================================================
# Vision tower: pixels -> patches -> window order -> blocks -> merger -> merged tokens in raster order
# ======================================================================================================================


# The float16 guard. The official weights grow vision activations beyond float16's range (65504) in the last blocks,
# so with float16 weights the vision tower keeps its residual stream in float32: the patch embedding's output is
# widened (`residual_dtype`), the projections that write into the stream run in float32 (`project`), and its norms
# read the wider stream (`LayerNorm`). Every other dtype runs as it is.
def residual_dtype(dtype):
    return torch.float32 if dtype == torch.float16 else dtype


def project(layer, x, dtype):
    """layer(x) in `dtype`, the residual stream's (the float16 guard)."""
    if dtype == layer.weight.dtype:
        return layer(x)
    if not layer.weight.is_floating_point():  # quantized: the layer computes at its own precision (layer_input)
        return layer(x.to(dtype)).to(dtype)
    bias = layer.bias.to(dtype) if layer.bias is not None else None
    return F.linear(x.to(dtype), layer.weight.to(dtype), bias)


def layer_input(layer, x):
    """x in the dtype a linear layer computes in. A weight quantized to integers (bitsandbytes' 8-bit and 4-bit
    layers) gives only its storage type: such a layer converts its input itself, so x goes in as it is."""
    return x.to(layer.weight.dtype) if layer.weight.is_floating_point() else x


class LayerNorm(nn.LayerNorm):
    """LayerNorm that also normalises a wider input than its weights (the float16 guard)."""

    def forward(self, x):
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def make_norm(norm_type, dim, eps=1e-6):
    return RMSNorm(dim, eps=eps) if norm_type == "rmsnorm" else LayerNorm(dim, eps=eps)


class PatchEmbed(nn.Module):
    """One linear map per row of `pixel_values` (a Conv3d with kernel = stride, kept as Conv3d
    so checkpoints load; computed as a matmul, which is the same maths and faster). A tower for still images only
    (temporal_patch_size 1, MoonViT) has a Conv2d, as its checkpoints do."""

    def __init__(self, config):
        super().__init__()
        self.temporal_patch_size = config.temporal_patch_size
        bias = config.patch_embed_bias
        if config.temporal_patch_size == 1:
            kernel = (config.patch_size, config.patch_size)
            self.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel, stride=kernel, bias=bias)
        else:
            kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
            self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel, stride=kernel, bias=bias)

    def forward(self, pixel_values):  # [N, C*T*P*P] -> [N, hidden]
        weight = self.proj.weight  # [hidden, C, T, P, P], or [hidden, C, P, P] without a time axis
        if self.proj.bias is not None or self.temporal_patch_size == 1:  # nothing to fold
            return F.linear(pixel_values.to(weight.dtype), weight.flatten(1), self.proj.bias)
        frames = pixel_values.view(pixel_values.shape[0], weight.shape[1], self.temporal_patch_size, -1)
        if torch.equal(frames[:, :, :1].expand_as(frames), frames):
            # a still image is its frame repeated: sum the kernel over time and read one frame (the bias once)
            folded = weight.sum(2).flatten(1)
            out = frames[:, :, 0].reshape(frames.shape[0], -1).to(folded.dtype) @ folded.t()
        else:
            out = pixel_values.to(weight.dtype) @ weight.flatten(1).t()
        return out if self.proj.bias is None else out + self.proj.bias


class PositionTable(nn.Module):
    """MoonViT's learned position table, held [side, side, hidden] as its checkpoints hold it (the others' tables are
    an nn.Embedding [side*side, hidden]); resized like them by `resized_position_table`."""

    def __init__(self, config):
        super().__init__()
        side = math.isqrt(config.num_position_embeddings)
        self.weight = nn.Parameter(torch.empty(side, side, config.hidden_size))


# ======================================================================================================================
# Vision tower: where each patch sits (rotary tables, window order, frame boundaries)
# ======================================================================================================================


def patch_hw_positions(grid_thw, merge_size):
    """(h, w) of every patch, in the merge order of `pixel_values` (t, h/m, w/m, m, m). -> [N, 2]"""
    positions = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h).view(h // merge_size, merge_size, 1, 1).expand(-1, -1, w // merge_size, merge_size)
        wpos = torch.arange(w).view(1, 1, w // merge_size, merge_size).expand(h // merge_size, merge_size, -1, -1)
        hw = torch.stack([hpos.transpose(1, 2).flatten(), wpos.transpose(1, 2).flatten()], dim=-1)
        positions.append(hw.repeat(t, 1))
    return torch.cat(positions)


def vision_rotary_tables(config, grid_thw, device):
    """cos and sin of the 2-D rotary embedding, one row per patch. -> 2 x [N, D/2] float32

    Half of each head's frequencies rotate with the patch row, half with the column. Both halves
    of a head (rotate_half pairs dimension i with i + D/2) turn by the same angles, so only one
    half of the table is kept."""
    head_dim = config.hidden_size // config.num_heads
    quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2)
    inv_freq = 1.0 / (config.rope_theta**quarter)
    hw = patch_hw_positions(grid_thw, config.spatial_merge_size).to(device)
    table = torch.arange(int(grid_thw[:, 1:].max()), device=device, dtype=torch.float)[:, None] * inv_freq.to(device)
    angles = table[hw]  # [N, 2, D/4]: each frequency's angle by row (h) and by column (w)
    if config.vision_rope_layout == "pairs":  # MoonViT: pair 2j turns with the column, pair 2j + 1 with the row
        angles = angles.flip(1).transpose(1, 2)
    angles = angles.flatten(1)  # [N, D/2]: "halves": h frequencies then w frequencies
    return angles.cos(), angles.sin()


def float32(value):
    """A Python number rounded to float32 (and back to a Python float)."""
    return torch.tensor(value, dtype=torch.float32).item()


def cubic_weights(t, a=-0.75):
    """Keys' cubic convolution (F.interpolate's, A = -0.75): the weights of the taps at offsets -1, 0, 1, 2 from the
    table position before each point, which lies t ([n, 1], in [0, 1)) past it. -> [n, 4]"""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return torch.cat([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=1)


def interpolation_taps(size, side, interpolation):
    """Which rows of a `side`-row table each of `size` output positions reads, and with what weights, along one
    axis: F.interpolate's rule for the mode, clamped at the edges. K = 4 (bicubic) or 2.
    -> ([size, K] int64, [size, K] float32)"""
    out = torch.arange(size, dtype=torch.float64)
    # F.interpolate's kernel holds the scale in float32 and rounds each source position once (a fused multiply-add):
    # done the same way here, the resized table stays within a few float32 rounding steps of F.interpolate's.
    if interpolation == "bicubic":  # align_corners=False
        source = ((out + 0.5) * float32(side / size) - 0.5).float()
        offsets = torch.arange(-1, 3)
    else:  # "bilinear_align_corners": output position i reads table position i * (side - 1) / (size - 1)
        source = (out * float32((side - 1) / max(size - 1, 1))).float()
        offsets = torch.arange(2)
    first = source.floor()
    t = (source - first)[:, None]
    weights = cubic_weights(t) if interpolation == "bicubic" else torch.cat([1 - t, t], dim=1)
    return (first.long()[:, None] + offsets).clamp(0, side - 1), weights


def grid_taps(side, height, width, interpolation):
    """The 2-D taps of a side x side table resized to height x width: every (row tap, column tap) pair, its weight
    their product. -> ([h, w, K*K] int64 into the flattened table, [h, w, K*K] float32)"""
    rows, row_weights = interpolation_taps(height, side, interpolation)
    cols, col_weights = interpolation_taps(width, side, interpolation)
    index = rows[:, None, :, None] * side + cols[None, :, None, :]  # [h, w, K, K]
    weights = row_weights[:, None, :, None] * col_weights[None, :, None, :]
    return index.flatten(2), weights.flatten(2)


def table_rows(table, taps):
    """Rows of a square position table ([S*S, C] or [S, S, C]) read at `taps` ([..., K] index and weight), each a
    weighted sum of K entries, in float32: one gather instead of an image resize, and no reordering after.
    -> [..., C]"""
    index, weights = taps
    flat = table.float().reshape(-1, table.shape[-1])
    bags, bag_weights = index.reshape(-1, index.shape[-1]), weights.reshape(-1, weights.shape[-1])  # [rows, K]
    rows = F.embedding_bag(bags.to(flat.device), flat, per_sample_weights=bag_weights.to(flat.device), mode="sum")
    return rows.view(*index.shape[:-1], -1)


def resize_table(table, height, width, interpolation="bicubic"):
    """A square position table resized to a height x width grid, in float32, as F.interpolate would. -> [h, w, C]

    "bicubic" is F.interpolate's (Qwen-VL 2023, Kimi-VL); "bilinear_align_corners" puts patch row r at table row
    r * (S - 1) / (height - 1), as Qwen3-VL does."""
    side = math.isqrt(table[..., 0].numel())
    return table_rows(table, grid_taps(side, height, width, interpolation))


def position_taps(config, grid_thw):
    """The taps of the learned position table for every patch of every frame, in the patches' order (merge order:
    each merge x merge block contiguous). -> ([N, K] int64, [N, K] float32)"""
    merge, side = config.spatial_merge_size, math.isqrt(config.num_position_embeddings)
    index, weights = [], []
    for t, h, w in grid_thw.tolist():
        for taps, out in zip(grid_taps(side, h, w, config.position_interpolation), (index, weights)):
            taps = taps.view(h // merge, merge, w // merge, merge, -1).transpose(1, 2).reshape(h * w, -1)
            out.append(taps.repeat(t, 1))
    return torch.cat(index), torch.cat(weights)


def resized_position_table(config, table, grid_thw):
    """The learned position table resized to every frame's patch grid, one row per patch in merge order. -> [N, C]"""
    return table_rows(table, position_taps(config, grid_thw))


def get_window_index(grid_thw, window_size, spatial_merge_size, patch_size):
    """Order merged tokens window by window, and delimit the windows.

    A window is `window_size` pixels square, i.e. `window_size // (patch_size * merge)` merged
    tokens per side; windows never cross a frame. Returns `window_index` [M] (for each slot in
    window order, the raster index of the merged token there) and `cu_window_seqlens` (window
    boundaries counted in patches, starting at 0)."""
    tokens_per_side = window_size // spatial_merge_size // patch_size
    window_index, window_sizes, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        mh, mw = h // spatial_merge_size, w // spatial_merge_size
        windows_per_row = mw // tokens_per_side + 1  # the official layout pads even an exact fit
        windows_per_col = mh // tokens_per_side + 1
        frame = torch.arange(t).view(t, 1, 1)
        row = torch.arange(mh).view(1, mh, 1) // tokens_per_side
        col = torch.arange(mw).view(1, 1, mw) // tokens_per_side
        window_id = ((frame * windows_per_col + row) * windows_per_row + col).flatten()
        window_index.append(torch.argsort(window_id, stable=True) + offset)
        counts = torch.bincount(window_id, minlength=t * windows_per_col * windows_per_row)
        window_sizes.append(counts[counts > 0])
        offset += t * mh * mw
    window_sizes = torch.cat(window_sizes) * spatial_merge_size**2
    cu_window_seqlens = F.pad(window_sizes.cumsum(0), (1, 0))
    return torch.cat(window_index), cu_window_seqlens


def frame_seqlens(grid_thw):
    """Boundaries of every frame of every image or video, in patches (full attention segments)."""
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(per_frame.cumsum(0), (1, 0))


def raster_to_merge_index(grid_thw, merge_size):
    """For each row in merge order (t, h/m, w/m, m, m), the row of the same patch in raster order (t, h, w). -> [N]"""
    index, offset = [], 0
    for t, h, w in grid_thw.tolist():
        raster = torch.arange(t * h * w).view(t, h // merge_size, merge_size, w // merge_size, merge_size)
        index.append(raster.permute(0, 1, 3, 2, 4).flatten() + offset)
        offset += t * h * w
    return torch.cat(index)


def to_window_order(x, window_index):
    """Reorder rows of x ([N, ...]) by whole 2x2 groups, following window_index ([M])."""
    groups = x.view(window_index.shape[0], -1, *x.shape[1:])
    return groups[window_index].flatten(0, 1)


def inverse_permutation(index):
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.shape[0], device=index.device)
    return inverse


# ======================================================================================================================
# Vision tower: packed attention (row slices, runs of equal segments, varlen kernels)
# ======================================================================================================================


# On the CPU a vision block works on slices of the tokens whose largest activation ([rows, 3 * hidden] for
# attention, [rows, intermediate] for the MLP) stays within this many elements: 16 MiB in float32. Larger
# temporaries are fresh pages from the OS on every call, which the kernel maps and zeroes on first touch: that costs
# about a quarter of a large matmul's time. Small ones are reused. Attention slices hold whole segments (a segment
# longer than the bound is one slice), so slicing never changes what a token attends to. GPU allocators keep freed
# memory, so there a block works on all rows at once.
SLICE_ELEMENTS = 1 << 22


def rows_per_slice(width, device):
    """How many rows of a [rows, width] activation one slice holds (see SLICE_ELEMENTS)."""
    return max(1, SLICE_ELEMENTS // width) if device.type == "cpu" else sys.maxsize


class Run(NamedTuple):
    """`count` consecutive segments of `length` rows from row `start`: attention takes them as one batch."""

    start: int
    count: int
    length: int


class Slice(NamedTuple):
    """Rows [start, end) of whole segments: q, k, v and the output projection run once per slice."""

    start: int
    end: int
    runs: list  # [Run], rows counted from the slice's start
    cu_seqlens: torch.Tensor  # [segments + 1] int32 boundaries from the slice's start, on the device (varlen kernels)
    max_length: int  # the longest segment


def segment_runs(cu_seqlens, max_rows):
    """Group consecutive segments of equal length into runs of at most `max_rows` rows (or one segment). -> [Run]"""
    runs, start = [], 0
    for length in (cu_seqlens[1:] - cu_seqlens[:-1]).tolist():
        last = runs[-1] if runs else None
        joins = last and last.length == length and last.start + last.count * length == start
        if joins and (last.count + 1) * length <= max_rows:
            runs[-1] = last._replace(count=last.count + 1)
        else:
            runs.append(Run(start, 1, length))
        start += length
    return runs


def slices_of_runs(runs, max_rows, device="cpu"):
    """Group consecutive runs into slices of at most `max_rows` rows (or one run). -> [Slice]

    Many short runs (images of many sizes) then cost one matmul for q, k, v, not one each."""
    groups = []  # [start, end, runs counted from start]
    for run in runs:
        end = run.start + run.count * run.length
        if groups and end - groups[-1][0] <= max_rows:
            groups[-1][1] = end
            groups[-1][2].append(run._replace(start=run.start - groups[-1][0]))
        else:
            groups.append([run.start, end, [run._replace(start=0)]])
    slices = []
    for start, end, members in groups:
        bounds = [0] + [run.start + (i + 1) * run.length for run in members for i in range(run.count)]
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
        slices.append(Slice(start, end, members, cu_seqlens, max(run.length for run in members)))
    return slices


def segment_slices(cu_seqlens, max_rows, device):
    """The attention segments of one kind of layer (frames or windows), as the slices the blocks work on."""
    return slices_of_runs(segment_runs(cu_seqlens, max_rows), max_rows, device)


# Eager attention materialises scores; this bounds them (elements) per call.
EAGER_SCORE_BUDGET = 1 << 22  # 16 MiB of float32 scores


# SDPA's CPU kernel reads the keys and values once per block of queries: for a long segment, rows strided through
# q/k/v (each a third of a fused qkv row) then cost more than copying them into place first. Measured: the copy
# makes attention 15% faster at 9216 rows, breaks even at 4096 and is 13% slower at 1024. Eager attention's
# matmuls take the strided rows as they are, so it gets no copies.
CONTIGUOUS_SEGMENT_ROWS = 4096


def segment_attention(q, k, v, count, length, implementation):
    """Bidirectional attention within each of `count` consecutive segments of `length` rows. q, k, v: [count*length, H, D].

    "eager" runs the softmax written out; any other name ("sdpa", or a backend registered for the decoder, such as
    vLLM's "vllm", which serves causal attention over its own KV cache and not packed segments) runs torch's
    scaled_dot_product_attention, each segment as one batch entry."""
    qs, ks, vs = (x.view(count, length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))  # [count, H, length, D]
    if implementation == "eager":
        out = eager_segment_attention(qs, ks, vs, q.shape[-1] ** -0.5)
    else:
        if length >= CONTIGUOUS_SEGMENT_ROWS and q.device.type == "cpu":
            qs, ks, vs = qs.contiguous(), ks.contiguous(), vs.contiguous()
        out = F.scaled_dot_product_attention(qs, ks, vs)
    return out.transpose(1, 2).reshape(q.shape)


def runs_attention(q, k, v, runs, implementation):
    """Attention over one slice, once per run of equal segments. q, k, v: [rows, H, D]."""
    if len(runs) == 1:
        return segment_attention(q, k, v, runs[0].count, runs[0].length, implementation)
    out = torch.empty_like(q)
    for start, count, length in runs:
        rows = slice(start, start + count * length)
        out[rows] = segment_attention(q[rows], k[rows], v[rows], count, length, implementation)
    return out


def eager_segment_attention(q, k, v, scale):
    """softmax(q k^T / sqrt(D)) v in float32, in query chunks so that no more than
    EAGER_SCORE_BUDGET scores exist at once. q, k, v: [n, H, L, D]."""
    n, heads, length, _ = q.shape
    chunk = max(1, EAGER_SCORE_BUDGET // (n * heads * length))
    # Written into one output: small per-chunk results kept alive between the large score buffers would fragment
    # the heap, so that freed score buffers could not be reused (the peak then grew by up to 10x, at random).
    out = torch.empty(n, heads, length, v.shape[-1], dtype=v.dtype, device=v.device)
    for start in range(0, length, chunk):
        scores = (q[:, :, start : start + chunk] * scale) @ k.transpose(-1, -2)
        out[:, :, start : start + chunk] = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype) @ v
    return out


def varlen_kernel(implementation, weight, piece):
    """The packed variable-length attention kernel for a slice whose q, k, v come from `weight`, or None (then
    attention runs once per run of equal segments).

    "flash_attention_2" takes flash-attn's: one call per layer covers every window of every image, whatever their
    lengths. "sdpa" takes torch's own (the same FlashAttention-2 code) on CUDA in float16/bfloat16 where the
    segments fall into several runs: with sixteen images of different sizes it was 1.9x faster than SDPA run by run
    on an H200, where for one run of equal segments batched SDPA was as fast or up to 7% faster (benchmarks/README.md)."""
    if implementation == "flash_attention_2":
        if flash_attn_varlen_func is None:
            raise ImportError('attn_implementation="flash_attention_2" needs the flash-attn package: pip install flash-attn')
        return flash_attn_varlen_func
    half = weight.dtype in (torch.float16, torch.bfloat16)
    fragmented = len(piece.runs) > 1
    if implementation == "sdpa" and torch_varlen_attn is not None and weight.is_cuda and half and fragmented:
        return torch_varlen_attn
    return None


@dataclass
class GridPlan:
    """What the vision tower needs to know about a batch of grids, apart from the pixels."""

    cos: torch.Tensor  # [N, D/2] float32, rows in the order the blocks see the patches
    sin: torch.Tensor
    frames: list  # [Slice] full attention: every frame of every image
    windows: list | None = None  # [Slice] window attention (Qwen2.5-VL)
    window_index: torch.Tensor | None = None  # [M] merged-token order of the blocks
    inverse_index: torch.Tensor | None = None  # [M] back to raster order
    merge_index: torch.Tensor | None = None  # [N] raster-ordered pixel rows into merge order (MoonViT)
    position_taps: tuple | None = None  # ([N, K], [N, K]) where each patch reads the learned position table


def plan_grids(config, grid_thw, device):
    cos, sin = vision_rotary_tables(config, grid_thw, device) if config.vision_rope else (None, None)
    max_rows = rows_per_slice(3 * config.hidden_size, torch.device(device))
    plan = GridPlan(cos, sin, segment_slices(frame_seqlens(grid_thw), max_rows, device))
    if config.patch_order == "raster":
        plan.merge_index = raster_to_merge_index(grid_thw, config.spatial_merge_size).to(device)
    if config.num_position_embeddings is not None:
        plan.position_taps = tuple(taps.to(device) for taps in position_taps(config, grid_thw))
    if config.uses_window_attention:
        window_index, cu_window_seqlens = get_window_index(
            grid_thw, config.window_size, config.spatial_merge_size, config.patch_size
        )
        plan.window_index = window_index.to(device)
        plan.inverse_index = inverse_permutation(plan.window_index)
        plan.cos, plan.sin = to_window_order(cos, plan.window_index), to_window_order(sin, plan.window_index)
        plan.windows = segment_slices(cu_window_seqlens, max_rows, device)
    return plan


def chunks_of_frames(grid_thw, max_patches):
    """Split items into chunks of at most `max_patches` patches, cutting only between frames
    (attention never crosses a frame, so each chunk encodes exactly as it would in one pass).
    -> [(first row, end row, grid_thw of the chunk)]"""
    chunks, current, size, start = [], [], 0, 0
    for t, h, w in grid_thw.tolist():
        while t:
            frames = min(t, max(1, (max_patches - size) // (h * w)))
            if size and size + frames * h * w > max_patches:
                chunks.append((start, start + size, torch.tensor(current)))
                start, current, size = start + size, [], 0
                continue
            current.append([frames, h, w])
            size, t = size + frames * h * w, t - frames
    chunks.append((start, start + size, torch.tensor(current)))
    return chunks


# ======================================================================================================================
# Vision tower: blocks, merger and the tower itself
# ======================================================================================================================


def apply_vision_rotary(qk, cos, sin):
    """Rotate q and k together ([N, 2, H, D]) in float32, as the official model does.

    x * cos + rotate_half(x) * sin, written per half so that it takes three passes over the
    data instead of ten (on the CPU such elementwise passes are a large part of a block's time)."""
    x1, x2 = qk.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, None], sin[:, None, None]  # [N, 1, 1, D/2]
    rotated = torch.cat([torch.addcmul(x1 * cos, x2, sin, value=-1), torch.addcmul(x2 * cos, x1, sin)], dim=-1)
    return rotated.to(qk.dtype)


def apply_vision_rotary_pairs(qk, cos, sin):
    """The same rotation on (x[2i], x[2i+1]) pairs, MoonViT's layout ([N, 2, H, D]; cos, sin [N, D/2]), in float32."""
    x1, x2 = qk.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None, None], sin[:, None, None]  # [N, 1, 1, D/2]
    rotated = torch.stack([torch.addcmul(x1 * cos, x2, sin, value=-1), torch.addcmul(x2 * cos, x1, sin)], dim=-1)
    return rotated.flatten(-2).to(qk.dtype)


class VisionAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.config = config

    def forward(self, x, slices, cos, sin):  # x: [N, hidden], the residual stream's dtype
        outputs = [self.attend(x, cos, sin, piece) for piece in slices]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def attend(self, x, cos, sin, piece):  # one Slice of whole segments -> [rows, hidden]
        rows = slice(piece.start, piece.end)
        if cos is not None:
            cos, sin = cos[rows], sin[rows]
        q, k, v = self.rotated_qkv(x[rows], cos, sin)
        implementation = self.config._attn_implementation
        kernel = varlen_kernel(implementation, self.qkv.weight, piece)
        if kernel is not None:  # one call for every segment of the slice, whatever their lengths
            out = kernel(q, k, v, piece.cu_seqlens, piece.cu_seqlens, piece.max_length, piece.max_length)
        else:
            out = runs_attention(q, k, v, piece.runs, implementation)
        return project(self.proj, out.flatten(1), x.dtype)

    def rotated_qkv(self, x, cos, sin):  # -> q, k, v: [N, H, D]
        qkv = self.qkv(layer_input(self.qkv, x)).view(x.shape[0], 3, self.num_heads, -1)
        if cos is None:  # no 2-D rotary: the tower adds learned absolute positions instead (Qwen-VL 2023)
            return qkv.unbind(1)
        rotate = apply_vision_rotary_pairs if self.config.vision_rope_layout == "pairs" else apply_vision_rotary
        q, k = rotate(qkv[:, :2], cos, sin).unbind(1)
        return q, k, qkv[:, 2]


class VisionMLP(nn.Module):
    """Qwen2.5-VL: SwiGLU with bias (gate/up/down). Qwen2-VL: fc1 -> QuickGELU -> fc2."""

    def __init__(self, config):
        super().__init__()
        self.gated = config.gated_mlp
        self.intermediate_size = config.intermediate_size
        self.act = ACT2FN[config.hidden_act]
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
            self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
            self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        else:
            self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
            self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x):  # x: [N, hidden], the residual stream's dtype
        rows = rows_per_slice(self.intermediate_size, x.device)
        if x.shape[0] <= rows:
            return self.rows(x)
        return torch.cat([self.rows(part) for part in x.split(rows)])

    def rows(self, x):
        if self.gated:
            h = layer_input(self.gate_proj, x)
            return project(self.down_proj, self.act(self.gate_proj(h)) * self.up_proj(h), x.dtype)
        return project(self.fc2, self.act(self.fc1(layer_input(self.fc1, x))), x.dtype)


class VisionBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = make_norm(config.norm_type, config.hidden_size, config.norm_eps)
        self.norm2 = make_norm(config.norm_type, config.hidden_size, config.norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x, slices, cos, sin):
        x = x + self.attn(self.norm1(x), slices, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm each patch, concatenate each 2x2 group, project to the language model's width.

    A DeepStack merger (Qwen3-VL, `post_shuffle_norm`) concatenates first and norms the whole group."""

    def __init__(self, config, post_shuffle_norm=False):
        super().__init__()
        self.group_dim = config.hidden_size * config.spatial_merge_size**2
        self.post_shuffle_norm = post_shuffle_norm
        self.ln_q = make_norm(config.norm_type, self.group_dim if post_shuffle_norm else config.hidden_size, config.norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(self.group_dim, self.group_dim), nn.GELU(), nn.Linear(self.group_dim, config.out_hidden_size)
        )

    def forward(self, x):  # [N, hidden] -> [M, out_hidden]
        if self.post_shuffle_norm:
            groups = self.ln_q(x.view(-1, self.group_dim))
        else:
            groups = self.ln_q(x).view(-1, self.group_dim)
        return self.mlp(layer_input(self.mlp[0], groups))


def check_grid_thw(grid_thw, pixel_values, config):
    """Refuse grids that cannot describe `pixel_values`, before they turn into shape errors."""
    if not isinstance(grid_thw, torch.Tensor):
        raise TypeError(f"grid_thw must be a torch.Tensor of shape [n, 3], got {type(grid_thw).__name__}")
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
        raise ValueError(f"grid_thw must have shape [n, 3] with n >= 1, got {tuple(grid_thw.shape)}")
    if grid_thw.is_floating_point():
        raise TypeError(f"grid_thw must hold integers, got {grid_thw.dtype}")
    grid_thw = grid_thw.cpu()
    if (grid_thw <= 0).any():
        raise ValueError(f"grid_thw entries must be positive, got {grid_thw.tolist()}")
    merge = config.spatial_merge_size
    if (grid_thw[:, 1:] % merge).any():
        raise ValueError(
            f"grid heights and widths must be divisible by spatial_merge_size={merge}, got {grid_thw.tolist()}"
        )
    row_size = config.in_channels * config.temporal_patch_size * config.patch_size**2
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2 or pixel_values.shape[1] != row_size:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel values must have shape [patches, {row_size}], got {shape}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel values must be floating point, got {pixel_values.dtype}")
    # One NaN would spread through attention to every token. The sum is a cheap first test (one pass, no mask); only
    # when it is not finite (a NaN or inf, or an overflow of huge finite values) does the exact test run.
    if not bool(pixel_values.sum().isfinite()) and not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("pixel values contain NaN or infinite values; check how the images were preprocessed")
    patches = int(grid_thw.prod(-1).sum())
    if patches != pixel_values.shape[0]:
        raise ValueError(
            f"grid_thw {grid_thw.tolist()} describes {patches} patches but pixel values have {pixel_values.shape[0]}"
        )
    return grid_thw


# One lock for every tower's plan cache: module-level, so that a model still deep-copies and pickles.
PLAN_CACHE_LOCK = threading.Lock()


class QwenVLVisionModel(QwenVLPreTrainedModel):
    """pixel_values [N, 3*2*14*14] + grid_thw [images, 3] -> merged tokens [M, out_hidden] in raster order.

    With DeepStack (Qwen3-VL) each merged token also carries the features of the extra mergers, one per level, after
    its own: [M, (1 + levels) * out_hidden] (vLLM's native Qwen3-VL widens its vision output the same way); see
    `split_deepstack`. Inputs larger than `config.max_patches_per_chunk` patches are encoded chunk by chunk (whole
    frames), which bounds activation memory and gives the same result."""

    config_class = QwenVLVisionConfig
    main_input_name = "pixel_values"
    _no_split_modules = ["VisionBlock"]
    PLANS_KEPT = 8

    def __init__(self, config):
        super().__init__(config)
        self.patch_embed = PatchEmbed(config)
        if config.num_position_embeddings is not None:  # as the checkpoints hold it: [S*S, C], MoonViT [S, S, C]
            self.pos_embed = PositionTable(config) if config.patch_order == "raster" else nn.Embedding(
                config.num_position_embeddings, config.hidden_size
            )
        if config.pre_norm:
            self.ln_pre = make_norm(config.norm_type, config.hidden_size)
        self.blocks = nn.ModuleList([VisionBlock(config) for _ in range(config.depth)])
        self.final_norm = None
        if config.final_norm:
            self.final_norm = make_norm(config.norm_type, config.hidden_size, config.norm_eps)
        self.merger = Resampler(config) if config.projector == "resampler" else PatchMerger(config)
        if config.deepstack_visual_indexes is not None:
            self.deepstack_merger_list = nn.ModuleList(
                [PatchMerger(config, post_shuffle_norm=True) for _ in config.deepstack_visual_indexes]
            )
        self.gradient_checkpointing = False
        self._plans = {}  # grid shapes -> GridPlan, most recent last
        self.post_init()

    def forward(self, pixel_values, grid_thw):
        grid_thw = check_grid_thw(grid_thw, pixel_values, self.config)
        chunks = chunks_of_frames(grid_thw, self.config.max_patches_per_chunk or pixel_values.shape[0])
        if len(chunks) == 1:
            return self.encode(pixel_values, grid_thw)
        return torch.cat([self.encode(pixel_values[start:end], grid) for start, end, grid in chunks])

    def encode(self, pixel_values, grid_thw):
        plan = self.grid_plan(grid_thw, pixel_values.device)
        x = self.patch_embed(pixel_values)
        x = x.to(residual_dtype(x.dtype))
        if plan.merge_index is not None:  # MoonViT's pixels come in raster order
            x = x[plan.merge_index]
        if self.config.num_position_embeddings is not None:
            x = x + table_rows(self.pos_embed.weight, plan.position_taps).to(x.dtype)
        if self.config.pre_norm:
            x = self.ln_pre(x)
        if plan.window_index is not None:
            x = to_window_order(x, plan.window_index)
        deepstack = []
        for i, block in enumerate(self.blocks):
            full = plan.windows is None or i in self.config.fullatt_block_indexes
            slices = plan.frames if full else plan.windows
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(block.__call__, x, slices, plan.cos, plan.sin)
            else:
                x = block(x, slices, plan.cos, plan.sin)
            if self.config.deepstack_visual_indexes is not None and i in self.config.deepstack_visual_indexes:
                level = self.config.deepstack_visual_indexes.index(i)
                deepstack.append(self.deepstack_merger_list[level](x))
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.config.projector == "resampler":
            return self.merger(x, grid_thw)
        merged = torch.cat([self.merger(x), *deepstack], dim=-1) if deepstack else self.merger(x)
        return merged[plan.inverse_index] if plan.inverse_index is not None else merged

    def compile_vision(self, **options):
        """Opt-in: torch.compile the work each block does row by row (norms, q/k/v with the rotary turn, the MLP)
        and the merger, with the row count dynamic, so that new image sizes reuse the compiled code. Attention over
        segments and its output projection stay eager: their layout changes with every image size, and a lone kernel
        gains nothing from fusion. `options` go to torch.compile. Returns the tower.

        What it buys is the elementwise passes around the matmuls fused (benchmarks/README.md); the first call
        compiles for tens of seconds on a CPU, so it pays in a server, not in a one-off call."""
        options = {"dynamic": True, **options}
        for block in self.blocks:
            block.norm1.compile(**options)
            block.norm2.compile(**options)
            block.attn.rotated_qkv = torch.compile(block.attn.rotated_qkv, **options)  # the instance's, not the class's
            block.mlp.compile(**options)
        self.merger.compile(**options)
        return self

    def grid_plan(self, grid_thw, device):
        """The GridPlan of these grids, from the cache of recent ones. A server calls the model from several
        threads, so the cache changes under a lock (a plan itself is never changed once made)."""
        key = (tuple(map(tuple, grid_thw.tolist())), str(device))
        with PLAN_CACHE_LOCK:
            plan = self._plans.pop(key, None)
        plan = plan or plan_grids(self.config, grid_thw, device)
        with PLAN_CACHE_LOCK:
            self._plans[key] = plan
            while len(self._plans) > self.PLANS_KEPT:
                self._plans.pop(next(iter(self._plans)))
        return plan


# ======================================================================================================================
# Qwen-VL (2023): a learned position table for the patches, and the Resampler in place of the merger
# ======================================================================================================================


def sincos_table(dim, side):
    """The fixed 2-D sin-cos table of the Resampler's queries: row i * side + j holds
    [sin(j w), cos(j w), sin(i w), cos(i w)], each dim / 4 wide, w_k = 10000^(-k / (dim / 4)). -> [side*side, dim]"""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float) / (dim // 4))
    i, j = torch.meshgrid(torch.arange(side, dtype=torch.float), torch.arange(side, dtype=torch.float), indexing="ij")
    row, col = i.flatten()[:, None] * omega, j.flatten()[:, None] * omega
    return torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=-1)


class Resampler(nn.Module):
    """`num_queries` learned queries cross-attend to each frame's patches, then ln_post and a projection.
    [N, hidden] -> [frames * num_queries, out_hidden]

    Queries carry the fixed sin-cos table, keys the same table resized to the patch grid, values no position.
    The table is a frozen parameter, kept in checkpoints as the original saves it."""

    def __init__(self, config):
        super().__init__()
        dim, queries = config.out_hidden_size, config.num_queries
        self.num_heads = dim // RESAMPLER_HEAD_DIM
        self.query = nn.Parameter(torch.empty(queries, dim))
        self.pos_embed = nn.Parameter(sincos_table(dim, math.isqrt(queries)), requires_grad=False)
        self.kv_proj = nn.Linear(config.hidden_size, dim, bias=False)
        self.ln_q = LayerNorm(dim, eps=1e-6)
        self.ln_kv = LayerNorm(dim, eps=1e-6)
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=True)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.o_proj = nn.Linear(dim, dim, bias=True)
        self.ln_post = LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, grid_thw):
        q = self.heads(self.q_proj(self.ln_q(self.query) + self.pos_embed))[None]  # [1, H, Q, D]
        outputs, start = [], 0
        for t, h, w in grid_thw.tolist():
            patches = layer_input(self.kv_proj, x[start : start + t * h * w].view(t, h * w, -1))
            start += t * h * w
            kv = self.ln_kv(self.kv_proj(patches))  # [t, h*w, dim]
            k = self.heads(self.k_proj(kv + resize_table(self.pos_embed, h, w).flatten(0, 1).to(kv.dtype)))
            out = F.scaled_dot_product_attention(q.expand(t, -1, -1, -1), k, self.heads(self.v_proj(kv)))
            outputs.append(self.o_proj(out.transpose(1, 2).flatten(2)).flatten(0, 1))  # [t * Q, dim]
        return self.proj(self.ln_post(torch.cat(outputs)))

    def heads(self, x):  # [..., L, dim] -> [..., H, L, D]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(-2, -3)


# ======================================================================================================================
# Positions: where each token sits in (time, height, width)
# ======================================================================================================================


def get_rope_index(
    config, input_ids=None, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
    attention_mask=None, mm_token_type_ids=None,
):
    """M-RoPE positions by the official rule. -> ([3, B, L], rope_deltas [B, 1])

    docs/design.md, "M-RoPE positions: the official rule", has the rule and where the installed references differ.

    Text tokens get (p, p, p). A vision span starting at p gets (p + t', p + h, p + w) over its
    merged grid, t' being the frame index (Qwen2-VL, images) or
    long(t * second_per_grid_ts * tokens_per_second) in float32 (Qwen2.5-VL videos). After a
    span, text continues at the maximum position so far + 1. Padding is skipped, so a padded
    sample gets the positions it would get alone."""
    if config.sequential_positions:
        return sequential_positions(input_ids if input_ids is not None else mm_token_type_ids, attention_mask)
    token_types = mm_token_type_ids if mm_token_type_ids is not None else token_types_of(config, input_ids)
    batch, length = token_types.shape
    check_attention_mask(attention_mask, token_types.shape)
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(token_types, dtype=torch.bool)
    if config.vision_config.text_timestamps:  # Qwen3-VL: time is in the text, each temporal patch its own span
        spans = {1: VisionSpans(image_grid_thw, None, "image"), 2: VisionSpans(video_grid_thw, None, "video", per_frame=True)}
    else:
        spans = {1: VisionSpans(image_grid_thw, None, "image"), 2: VisionSpans(video_grid_thw, second_per_grid_ts, "video")}
    position_ids = torch.zeros(3, batch, length, dtype=torch.long)
    rope_deltas = torch.zeros(batch, 1, dtype=torch.long)
    for b in range(batch):
        types = token_types[b][valid[b]].cpu()
        pieces, next_pos = [], 0
        for kind, run_length in runs_of(types):
            if kind == 0:
                pieces.append(torch.arange(next_pos, next_pos + run_length).expand(3, -1))
                next_pos += run_length
                continue
            grid, seconds = spans[kind].take(run_length)  # a run of placeholders is exactly one item
            pieces.append(vision_positions(config, grid, seconds if kind == 2 else None) + next_pos)
            next_pos = int(pieces[-1].max()) + 1
        sample = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        position_ids[:, b, valid[b].cpu()] = sample
        rope_deltas[b] = next_pos - sample.shape[1]
    for vision in spans.values():
        vision.check_all_used()
    return position_ids.to(token_types.device), rope_deltas.to(token_types.device)


def sequential_positions(input_ids, attention_mask):
    """1-D positions (Qwen-VL 2023, Kimi-VL): every token one step further, image tokens included, padding skipped; as
    (i, i, i). -> ([3, B, L], rope_deltas [B, 1] of zeros)"""
    check_attention_mask(attention_mask, input_ids.shape)
    zeros = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
    return text_positions(attention_mask, 0, input_ids.shape[1], zeros, input_ids.device), zeros


def check_attention_mask(attention_mask, shape):
    """Positions skip padding token by token, so the mask must have one entry per token."""
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(shape)}, got {tuple(attention_mask.shape)}"
        )


def check_position_ids(position_ids, shape):
    """Given position ids: [3, B, L] (time, height, width) or [B, L] (text only: the same on all three axes)."""
    batch, length = shape
    if not isinstance(position_ids, torch.Tensor) or tuple(position_ids.shape) not in ((3, batch, length), (batch, length)):
        got = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"position_ids must have shape [3, {batch}, {length}] or [{batch}, {length}], got {got}")
    return position_ids if position_ids.dim() == 3 else position_ids.unsqueeze(0).expand(3, -1, -1)


def token_types_of(config, input_ids):
    """0 for text, 1 for image placeholders, 2 for video placeholders."""
    if input_ids is None:
        raise ValueError("positions with images or videos need input_ids or mm_token_type_ids")
    return (input_ids == config.image_token_id).long() + 2 * (input_ids == config.video_token_id).long()


def runs_of(types):
    """[(kind, length)] for each maximal run of equal token types."""
    change = torch.nonzero(types[1:] != types[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), types.shape[0]]
    return [(int(types[s]), e - s) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


class VisionSpans:
    """Hands out the grids of one modality in order, checking them against the placeholders."""

    def __init__(self, grid_thw, second_per_grid_ts, name, per_frame=False):
        if grid_thw is not None and not isinstance(grid_thw, torch.Tensor):
            raise TypeError(f"{name}_grid_thw must be a torch.Tensor of shape [n, 3], got {type(grid_thw).__name__}")
        if grid_thw is not None and (grid_thw.dim() != 2 or grid_thw.shape[1] != 3):
            raise ValueError(f"{name}_grid_thw must have shape [n, 3], got {tuple(grid_thw.shape)}")
        self.grids = grid_thw.tolist() if grid_thw is not None else []
        if per_frame:  # each temporal patch is one span of its own, after its timestamp text (Qwen3-VL)
            self.grids = [[1, h, w] for t, h, w in self.grids for _ in range(t)]
        self.per_frame = per_frame
        self.seconds = None
        if second_per_grid_ts is not None:
            self.seconds = torch.as_tensor(second_per_grid_ts, dtype=torch.float64).flatten().tolist()
            self.check_seconds(name)
        self.name, self.used = name, 0

    def check_seconds(self, name):
        """One positive, finite duration per video: they set the video tokens' time positions."""
        if len(self.seconds) != len(self.grids):
            raise ValueError(
                f"second_per_grid_ts has {len(self.seconds)} values but {name}_grid_thw has {len(self.grids)} {name}s: "
                "give one per video"
            )
        if not all(0 < s < math.inf for s in self.seconds):
            raise ValueError(f"second_per_grid_ts must be positive and finite, got {self.seconds}")

    def take(self, run_length):
        if self.used == len(self.grids):
            raise ValueError(
                f"the text has more <|{self.name}_pad|> tokens than the {len(self.grids)} {self.name}(s) given in "
                f"{self.name}_grid_thw"
            )
        grid = self.grids[self.used]
        tokens = grid[0] * grid[1] * grid[2] // 4
        if tokens != run_length:  # each span is one item: <|vision_start|>, its placeholders, <|vision_end|>
            raise ValueError(
                f"{self.name} {self.used} has grid {grid} ({tokens} tokens) but its placeholder span has "
                f"{run_length} <|{self.name}_pad|> tokens; was the text truncated or edited?"
                + (" (Qwen3-VL writes each temporal patch of a video as a span of its own)" if self.per_frame else "")
            )
        seconds = self.seconds[self.used] if self.seconds is not None else 1.0
        self.used += 1
        return grid, seconds

    def check_all_used(self):
        if self.used != len(self.grids):
            raise ValueError(
                f"{len(self.grids)} {self.name}(s) given in {self.name}_grid_thw but the text has placeholders for "
                f"{self.used}"
            )


# float32 holds every integer up to 2**24 exactly; the rotary angles of larger positions (and a float time cast to a
# long beyond int64) would be silently wrong.
MAX_EXACT_POSITION = 2**24


def vision_positions(config, grid, second_per_grid_t):
    """Positions of one image or video relative to its start. -> [3, t*h*w/4]"""
    merge = config.vision_config.spatial_merge_size
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    frame = torch.arange(t)
    tokens_per_second = config.vision_config.tokens_per_second
    if second_per_grid_t is not None and tokens_per_second is not None:
        time = torch.arange(t, dtype=torch.float32) * torch.tensor(second_per_grid_t, dtype=torch.float32)
        if float(time[-1]) * tokens_per_second >= MAX_EXACT_POSITION:
            raise ValueError(
                f"second_per_grid_ts {second_per_grid_t:.3g} puts this video's time positions past 2**24, where "
                "float32 rotary angles stop being exact (was the video sampled at a tiny fps?)"
            )
        frame = (time * tokens_per_second).long()
    return torch.stack(
        [
            frame.view(t, 1, 1).expand(t, h, w),
            torch.arange(h).view(1, h, 1).expand(t, h, w),
            torch.arange(w).view(1, 1, w).expand(t, h, w),
        ]
    ).flatten(1)


def text_positions(attention_mask, past_length, new_length, rope_deltas, device):
    """Positions of text tokens appended after a cached prefix. -> [3, B, new_length]"""
    if attention_mask is not None:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_length:]
    else:
        positions = torch.arange(past_length, past_length + new_length, device=device)[None]
    return (positions.to(device) + rope_deltas.to(device)).unsqueeze(0).expand(3, -1, -1)


# ======================================================================================================================
# Language model: Qwen2 decoder with M-RoPE
# ======================================================================================================================


def mrope_axes(mrope_section, interleaved, device=None):
    """The axis (0 time, 1 height, 2 width) that turns each frequency pair, highest frequency first. -> [D/2] long

    Chunked (Qwen2/2.5-VL): the first `mrope_section[0]` pairs turn with time, the next with height, the last with
    width. Interleaved (Qwen3-VL, [24, 20, 20]): pairs cycle T H W, T H W, ... while each axis has pairs left, the
    remainder turns with time, so every axis spans high and low frequencies. Made on `device` from arange: no
    host-to-device copy on a decoding step."""
    time, height, _ = mrope_section
    pair = torch.arange(sum(mrope_section), device=device)
    if not interleaved:
        return (pair >= time).long() + (pair >= time + height).long()
    axis = pair % 3
    pairs_left = pair < 3 * torch.where(axis == 1, mrope_section[1], mrope_section[2])
    return torch.where((axis > 0) & pairs_left, axis, 0)


class MultimodalRotaryEmbedding(nn.Module):
    """cos/sin for M-RoPE: the head's frequency pairs are shared by `mrope_section` between the temporal, height and
    width axes of position_ids (`mrope_axes`), each pair turned by its own axis."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.mrope_section = list(config.mrope_section)  # a plain list, not a buffer: models are built on the meta device
        self.interleaved = config.mrope_interleaved

    def forward(self, position_ids, dtype, ntk_alpha=None):  # position_ids: [3, B, L] -> 2 x [B, L, D]
        # Made on the positions' device: no host-to-device copy on a decoding step.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=position_ids.device) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if ntk_alpha is not None:  # dynamic NTK: each sample's own base -> [B, 1, D/2]
            base = self.theta * ntk_alpha.double() ** (self.head_dim / (self.head_dim - 2))
            inv_freq = 1.0 / (base.float().to(exponents.device)[:, None, None] ** exponents)
        axes = mrope_axes(self.mrope_section, self.interleaved, position_ids.device)
        positions = position_ids.float()[axes]  # [D/2, B, L]: each pair's axis
        angles = positions.permute(1, 2, 0) * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def dynamic_ntk_alpha(lengths, seq_length):
    """The NTK factor of a prefill of `lengths` tokens ([B]): 2^ceil(log2(T / seq_length) + 1) - 1, at least 1, so 1
    up to seq_length, 3 up to twice that, 7, 15, ... -> [B] float64"""
    alpha = 2 ** torch.ceil(torch.log2(lengths.double() / seq_length) + 1) - 1
    return alpha.clamp(min=1)


def logn_query_scale(positions, seq_length):
    """log_seq_length(p + 1) for queries at positions p past seq_length, else 1 (logn attention). [B, L] -> [B, 1, L, 1]"""
    steps = positions.double() + 1
    scale = torch.where(steps > seq_length, torch.log(steps) / math.log(seq_length), torch.ones_like(steps))
    return scale.float()[:, None, :, None]


def apply_rotary(q, k, cos, sin):  # q, k: [B, H, L, D]; cos, sin: [B, L, D]
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# A padded prompt's dense mask has B * L * L entries, and attention under a mask takes the slow path; above this many
# each sample attends alone over its own tokens instead (PaddedPrompt), so that a long prompt batched with a short one
# costs what the two cost apart. Below it, one masked call for the whole batch is faster.
DENSE_MASK_ELEMENTS = 1 << 24


class PaddedPrompt(NamedTuple):
    """A padded prompt whose samples each hold their tokens in one span (left or right padding), in place of a mask:
    attention runs sample by sample over its span, with the kernel's own causal path."""

    spans: list  # [(start, end)] per sample

    def attend_each(self, attend, module, q, k, v, **options):  # q, k, v: [B, H, L, D] -> [B, L, H, D]
        out = q.new_zeros(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])  # padding rows stay zero
        for b, (start, end) in enumerate(self.spans):
            if end > start:
                rows = slice(start, end)
                one = (slice(b, b + 1), slice(None), rows)
                out[b : b + 1, rows] = attend(module, q[one], k[one], v[one], None, **options)[0]
        return out


def token_spans(attention_mask):
    """[(start, end)] of each row's tokens, or None where some row's tokens are not one span (a host sync: prompts
    only)."""
    valid = attention_mask.bool()
    starts = valid.int().argmax(-1)
    ends = starts + valid.sum(-1)
    positions = torch.arange(valid.shape[1], device=valid.device)
    if not torch.equal((positions >= starts[:, None]) & (positions < ends[:, None]), valid):
        return None
    return list(zip(starts.tolist(), ends.tolist()))


def causal_mask(attention_mask, past_length, new_length, implementation):
    """Boolean mask [B, 1, new, past+new] (True = attend), None where none is needed, or a long padded prompt's
    PaddedPrompt.

    Each query may always see itself, so rows of padding never become all-masked (that
    gives NaN, which then leaks through zero attention weights). An attention function that
    transformers has no mask function for (such as vLLM's, which masks by its own sequence
    metadata) gets none, as in transformers' own models: that spares a [L, L] mask per step.
    Only a prompt without a cache asks whether the mask has padding (a host sync, once per prompt); a decoding
    step builds its mask from the attention mask as it is."""
    if implementation == "flash_attention_2":
        return attention_mask
    if implementation not in ALL_MASK_ATTENTION_FUNCTIONS:  # the registry transformers' own masks are built from
        return None
    if attention_mask is None and (new_length == 1 or (past_length == 0 and implementation == "sdpa")):
        return None
    if past_length == 0 and implementation == "sdpa" and bool(attention_mask.all()):
        return None  # sdpa's own causal path
    if attention_mask is not None and past_length == 0 and new_length > 1 and implementation in ("sdpa", "eager"):
        if attention_mask.shape[0] * new_length**2 > DENSE_MASK_ELEMENTS and (spans := token_spans(attention_mask)):
            return PaddedPrompt(spans)
    device = attention_mask.device if attention_mask is not None else None
    keys = torch.arange(past_length + new_length, device=device)
    queries = torch.arange(past_length, past_length + new_length, device=device)
    mask = (keys[None, :] <= queries[:, None])[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, -keys.shape[0]:]
        mask = mask | (keys[None, :] == queries[:, None])[None, None]
    return mask


def static_capacity(cache):
    """The number of key slots of a static cache (one that is allocated once and written in place, as
    `generate(cache_implementation="static")` makes), or None for a cache that grows."""
    if cache is None or not cache.is_compileable:
        return None
    return getattr(cache, CACHE_CAPACITY)()


def static_cache_mask(attention_mask, past_length, new_length, capacity, device):
    """Boolean mask [B or 1, 1, new, capacity] over all the key slots of a static cache (True = attend).

    A static cache hands attention every slot, unwritten ones too: a query sees the slots up to its own, less the
    padding. `past_length` may be a 0-d tensor (a static cache counts its tokens on the device); nothing here
    branches on it, so one compiled decoding step serves every position. Slots past the attention mask's end are
    not written yet (`create_masks_for_generate` pads it to the capacity, so that each step has the same shapes)."""
    keys = torch.arange(capacity, device=device)
    queries = past_length + torch.arange(new_length, device=device)
    mask = (keys[None, :] <= queries[:, None])[None, None]
    if attention_mask is not None:
        kept = F.pad(attention_mask.bool().to(device), (0, capacity - attention_mask.shape[-1]))
        mask = (mask & kept[:, None, None]) | (keys[None, :] == queries[:, None])  # a padding query sees itself
    return mask


def eager_attention_forward(module, q, k, v, mask, scaling, dropout=0.0, **kwargs):
    """Attention written out, for `attn_implementation="eager"`. q: [B, H, L, D], k/v: [B, Hkv, S, D]."""
    k = k.repeat_interleave(module.num_key_value_groups, dim=1)
    v = v.repeat_interleave(module.num_key_value_groups, dim=1)
    scores = (q * scaling) @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif q.shape[2] > 1:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1 + k.shape[2] - q.shape[2]), float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ v).transpose(1, 2), weights


class TextAttention(nn.Module):
    """Grouped-query attention with q/k/v bias (Qwen2) or without bias and with a per-head RMSNorm on q and k before
    the rotary (Qwen3); any transformers attention backend by name."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, query_scale=None, **kwargs):  # x: [B, L, hidden]
        batch, length, _ = x.shape
        # Three plain calls on x, and below the kernel looked up from ALL_ATTENTION_FUNCTIONS and called once: vLLM's
        # Transformers backend reads this source for exactly these shapes, to fuse q/k/v into one matmul and to
        # route attention to its own kernel.
        heads = (batch, length, -1, self.head_dim)
        q = self.q_proj(x).view(heads)
        k = self.k_proj(x).view(heads)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        if query_scale is not None:  # logn attention
            q = q * query_scale.to(q.dtype)
        if cache is not None:  # 4.x static caches write at cache_position (compat item 7)
            k, v = cache.update(k, v, self.layer_idx, {"cache_position": kwargs.get("cache_position")})
        # Looked up on every call, so that set_attn_implementation switches a loaded model (compat item 2).
        if self.config._attn_implementation == "eager":
            attend = eager_attention_forward
        elif HAS_ATTENTION_GET_INTERFACE:
            attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        else:
            attend = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        dropout = self.config.attention_dropout if self.training else 0.0
        if isinstance(mask, PaddedPrompt):
            out = mask.attend_each(attend, self, q, k, v, scaling=self.scaling, dropout=dropout)
        else:
            out, _ = attend(self, q, k, v, mask, scaling=self.scaling, dropout=dropout, **kwargs)
        return self.o_proj(out.reshape(batch, length, -1))


class TextMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class TextExperts(nn.Module):
    """`num_experts` SwiGLU experts, fused as the official files store them: `gate_up_proj` [E, hidden, 2I] (gate in
    the first I columns, up in the last), `down_proj` [E, I, hidden], applied as x @ W.

    Rows come grouped by expert (`ends`: where each expert's rows end); torch's grouped matmul runs every expert on
    its rows in one call, without reading the group sizes on the host (no device sync, also while decoding)."""

    def __init__(self, config):
        super().__init__()
        size = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, 2 * size))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, size, config.hidden_size))
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x, ends):  # x: [rows, hidden] grouped by expert, ends: [E] int32 -> [rows, hidden]
        gate, up = F.grouped_mm(x, self.gate_up_proj, offs=ends).chunk(2, dim=-1)
        return F.grouped_mm(self.act(gate) * up, self.down_proj, offs=ends)


class TextMoE(nn.Module):
    """The sparse MLP (Qwen3-VL MoE): a softmax router over all experts in float32, the top `num_experts_per_tok`
    kept (renormalised to sum to 1 with `norm_topk_prob`), each token the weighted sum of its experts. No shared
    experts. The (token, choice) pairs are grouped by expert, so that each chosen expert runs once on one contiguous
    block of rows."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = TextExperts(config)

    def forward(self, x):  # [B, L, hidden]
        tokens = x.reshape(-1, x.shape[-1])
        probabilities = torch.softmax(self.gate(tokens), dim=-1, dtype=torch.float32)
        weights, chosen = probabilities.topk(self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        flat = chosen.flatten()
        order = flat.argsort()  # (token, choice) pairs, grouped by expert
        # rows per expert, counted on the device (torch.bincount would read its size on the host)
        counts = flat.new_zeros(self.gate.out_features, dtype=torch.int32).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        outputs = self.experts(tokens[order // self.top_k], counts.cumsum(0, dtype=torch.int32))  # [T*k, hidden]
        per_choice = torch.empty_like(outputs)
        per_choice[order] = outputs  # back to (token, choice) order
        per_choice = per_choice.view(tokens.shape[0], self.top_k, -1) * weights.to(x.dtype)[..., None]
        return per_choice.sum(1).view(x.shape)


class TextDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = TextAttention(config, layer_idx)
        self.mlp = TextMoE(config) if config.is_sparse_layer(layer_idx) else TextMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, **kwargs):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, **kwargs)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepStack(NamedTuple):
    """A prompt's DeepStack features (Qwen3-VL): after decoder layer k, `levels[k]` is added at the vision positions,
    on the residual stream between layers."""

    positions: torch.Tensor  # [B, L] bool: the <|image_pad|> and <|video_pad|> tokens
    levels: torch.Tensor  # [levels, V, hidden]: one row per vision position, in sequence order

    def add(self, x, level):  # x: [B, L, hidden]
        return x.index_put((self.positions,), self.levels[level].to(x.dtype), accumulate=True)


class QwenVLTextModel(QwenVLPreTrainedModel):
    """The Qwen2 / Qwen3 decoder: embeddings [B, L, hidden] + positions [3, B, L] -> hidden states."""

    _no_split_modules = ["TextDecoderLayer"]
    # Parallel plans, keyed relative to this model. transformers 5 reads a model class's own `_tp_plan`/`_pp_plan`
    # and prefixes them into every model that holds this one (so the full model gets
    # `model.language_model.layers.*...`, as the built-in Qwen2.5-VL does); `config.base_model_tp_plan` would not
    # do here, because QwenVLModel shares this config and would take the plan with the wrong prefix.
    _tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    _pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([TextDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MultimodalRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self, inputs_embeds=None, position_ids=None, attention_mask=None, cache=None, input_ids=None, deepstack=None,
        **kwargs,
    ):
        """`input_ids` stands in for `inputs_embeds` (engines such as vLLM call the decoder by these names);
        `position_ids` [3, B, L] are required, since only the caller knows where images shifted them. `deepstack`
        (Qwen3-VL, prompts with pixels): the DeepStack features added at the vision positions after the first
        layers."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        past_length = cache.get_seq_length() if cache is not None else 0
        x = inputs_embeds
        cos, sin = self.rotary_emb(position_ids, x.dtype, self.ntk_alpha(attention_mask, cache, past_length, x.shape))
        if self.config.use_logn_attn and not self.training:
            kwargs["query_scale"] = logn_query_scale(position_ids[0], self.config.seq_length)
        if (capacity := static_capacity(cache)) is not None:
            mask = static_cache_mask(attention_mask, past_length, x.shape[1], capacity, x.device)
            kwargs["cache_position"] = past_length + torch.arange(x.shape[1], device=x.device)
        else:
            mask = causal_mask(attention_mask, past_length, x.shape[1], self.config._attn_implementation)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, cos, sin, mask, cache)
            else:
                x = layer(x, cos, sin, mask, cache, **kwargs)
            if deepstack is not None and i < len(deepstack.levels):
                x = deepstack.add(x, i)
        return self.norm(x)

    def ntk_alpha(self, attention_mask, cache, past_length, shape):
        """Dynamic NTK (inference only): the factor set by each sample's prefill length, kept on the cache for the
        decoding steps that follow (it changes only at the next prefill). -> [B] or None"""
        if not self.config.use_dynamic_ntk or self.training:
            return None
        if past_length > 0:
            return getattr(cache, "ntk_alpha", None)
        lengths = attention_mask.sum(-1) if attention_mask is not None else torch.full(shape[:1], shape[1])
        alpha = dynamic_ntk_alpha(lengths, self.config.seq_length)
        if cache is not None:
            cache.ntk_alpha = alpha
        return alpha


# ======================================================================================================================
# The whole model: vision tokens scattered into the text, the decoder, the vocabulary head, generation
# ======================================================================================================================


# transformers' own output classes name the cache field as the installed version expects.
@dataclass
class QwenVLModelOutput(BaseModelOutputWithPast):
    rope_deltas: torch.Tensor | None = None  # [B, 1]: cached decoding continues at position + rope_deltas


@dataclass
class QwenVLCausalLMOutput(CausalLMOutputWithPast):
    rope_deltas: torch.Tensor | None = None


VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
MODALITIES = (
    ("image", "pixel_values", "image_grid_thw", None),
    ("video", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"),
)


class QwenVLModel(QwenVLPreTrainedModel):
    """Vision tower + language model: input ids and pixels -> final hidden states."""

    # Loading the body of a checkpoint that has a head: its head is left out (see QwenVLPreTrainedModel).
    _unused_checkpoint_keys = ("lm_head.",)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Also reads Qwen3-VL's hub names and Kimi-VL's official layout (the body alone: its head is left out)."""
        kwargs.setdefault("key_mapping", {**QWEN3_KEY_MAPPING, **KIMI_BODY_KEY_MAPPING})
        return super().from_pretrained(*args, **kwargs)

    def __init__(self, config):
        super().__init__(config)
        refuse_engine_without_deepstack(config)
        self.visual = QwenVLVisionModel(config.vision_config)
        if config.text_config is not None:  # Kimi-VL: transformers' own DeepSeek-V3, as LLaVA-style models hold theirs
            self.language_model = AutoModel.from_config(
                config.text_config, attn_implementation=config._attn_implementation
            )
        else:
            self.language_model = QwenVLTextModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    def get_image_features(self, pixel_values, image_grid_thw, return_dict=False, **kwargs):
        """Merged vision tokens of each image. -> tuple of [tokens_i, hidden]

        With `return_dict=True` (how transformers 5 and vLLM's Transformers backend call it) the tuple comes as the
        `pooler_output` of a `BaseModelOutputWithPooling`, as the built-in Qwen2.5-VL returns it. With DeepStack
        (Qwen3-VL) each token carries its DeepStack levels after its own features (`split_deepstack`)."""
        return vision_output(self._vision_features(pixel_values, image_grid_thw), return_dict)

    def get_video_features(self, pixel_values_videos, video_grid_thw, return_dict=False, **kwargs):
        return vision_output(self._vision_features(pixel_values_videos, video_grid_thw), return_dict)

    def _vision_features(self, pixel_values, grid_thw):
        merged = self.visual(pixel_values, grid_thw)
        return merged.split(vision_tokens_per_item(self.config.vision_config, grid_thw))

    def get_rope_index(
        self, input_ids=None, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
        attention_mask=None, mm_token_type_ids=None, **kwargs,
    ):
        return get_rope_index(
            self.config, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask,
            mm_token_type_ids,
        )

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
        inputs_embeds=None, use_cache=None, pixel_values=None, pixel_values_videos=None, image_grid_thw=None,
        video_grid_thw=None, second_per_grid_ts=None, mm_token_type_ids=None, rope_deltas=None,
        sparse_embedding_grad=False, image_grid_hws=None, **kwargs,
    ):
        """`sparse_embedding_grad=True` gives the embedding table a sparse gradient (only the rows looked up); for
        the tied head's loss path of QwenVLForConditionalGeneration, which adds it to the head's dense one."""
        cache = cache if cache is not None else past_key_values
        if image_grid_hws is not None:
            pixel_values, image_grid_thw = still_image_inputs(pixel_values, image_grid_hws)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache()
        past_length = cache.get_seq_length() if cache is not None else 0
        if inputs_embeds is None:
            # once per prompt: a decoding step's token is the model's (and a compiled step cannot stop for a host check)
            if not torch.compiler.is_compiling() and (past_length == 0 or input_ids.shape[-1] > 1):
                check_input_ids(input_ids, self.config.vocab_size)
            embedding = self.get_input_embeddings()
            if sparse_embedding_grad and type(embedding) is nn.Embedding:
                inputs_embeds = F.embedding(input_ids, embedding.weight, embedding.padding_idx, sparse=True)
            else:
                inputs_embeds = embedding(input_ids)
        deepstack = {}
        if pixel_values is not None:
            inputs_embeds, deepstack["image"] = self.scatter_vision(
                input_ids, inputs_embeds, pixel_values, image_grid_thw, "image"
            )
        if pixel_values_videos is not None:
            inputs_embeds, deepstack["video"] = self.scatter_vision(
                input_ids, inputs_embeds, pixel_values_videos, video_grid_thw, "video"
            )

        if position_ids is None:
            position_ids, rope_deltas = self.positions(
                input_ids, inputs_embeds, attention_mask, past_length, image_grid_thw, video_grid_thw,
                second_per_grid_ts, mm_token_type_ids, rope_deltas,
            )
        else:
            position_ids = check_position_ids(position_ids, inputs_embeds.shape[:2])
        if self.config.text_config is not None:  # transformers' own decoder: 1-D positions, its own masks
            hidden = self.language_model(
                inputs_embeds=inputs_embeds, position_ids=position_ids[0], attention_mask=attention_mask,
                use_cache=cache is not None, **{CACHE_NAME: cache}, **kwargs,
            ).last_hidden_state
        else:
            deepstack = deepstack_of(self.config, input_ids, deepstack)
            hidden = self.language_model(inputs_embeds, position_ids, attention_mask, cache, deepstack=deepstack, **kwargs)
        return QwenVLModelOutput(last_hidden_state=hidden, rope_deltas=rope_deltas, **{CACHE_NAME: cache})

    def scatter_vision(self, input_ids, inputs_embeds, pixel_values, grid_thw, kind):
        """Replace each <|image_pad|> (or <|video_pad|>) embedding, in order, by one vision token.
        -> (embeddings, DeepStack features [levels, placeholders, hidden] or None)"""
        if grid_thw is None:
            raise ValueError(f"{kind} pixel values were given without {kind}_grid_thw")
        if input_ids is None:
            raise ValueError(f"{kind} pixel values need input_ids to find the <|{kind}_pad|> placeholders")
        features = torch.cat(self._vision_features(pixel_values, grid_thw))
        features, deepstack = split_deepstack(features, self.config.vision_config)
        token_id = self.config.image_token_id if kind == "image" else self.config.video_token_id
        placeholders = input_ids == token_id
        count = int(placeholders.sum())
        if count != features.shape[0]:
            raise ValueError(
                f"{kind} features and {kind} tokens do not match: the text has {count} <|{kind}_pad|> tokens but "
                f"{kind}_grid_thw gives {features.shape[0]} merged tokens; each {kind} needs t*h*w/4 placeholders"
            )
        return inputs_embeds.masked_scatter(placeholders[..., None], features.to(inputs_embeds)), deepstack

    def positions(
        self, input_ids, inputs_embeds, attention_mask, past_length, image_grid_thw, video_grid_thw,
        second_per_grid_ts, mm_token_type_ids, rope_deltas,
    ):
        """M-RoPE positions of the new tokens and the rope_deltas that continue them."""
        new_length = inputs_embeds.shape[1]
        if past_length == 0:
            if input_ids is None and mm_token_type_ids is None:
                if image_grid_thw is not None or video_grid_thw is not None:
                    raise ValueError("with inputs_embeds and images or videos, pass position_ids or mm_token_type_ids")
                zeros = torch.zeros(inputs_embeds.shape[0], 1, dtype=torch.long, device=inputs_embeds.device)
                return text_positions(attention_mask, 0, new_length, zeros, inputs_embeds.device), zeros
            return self.get_rope_index(
                input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, mm_token_type_ids
            )
        if rope_deltas is None:
            raise ValueError(
                "continuing from a non-empty cache needs rope_deltas (returned by the call that filled the cache) "
                "or explicit position_ids: earlier images shift the positions of later text"
            )
        return text_positions(attention_mask, past_length, new_length, rope_deltas, inputs_embeds.device), rope_deltas


def split_deepstack(features, vision_config):
    """Merged tokens [M, (1 + levels) * hidden] -> main tokens [M, hidden], DeepStack features [levels, M, hidden]
    (None without DeepStack)."""
    if vision_config.deepstack_visual_indexes is None:
        return features, None
    parts = features.view(features.shape[0], 1 + len(vision_config.deepstack_visual_indexes), -1).transpose(0, 1)
    return parts[0], parts[1:]


def deepstack_of(config, input_ids, features):
    """The prompt's DeepStack (or None): each modality's features {"image": [levels, n, hidden] or None, "video": ...}
    placed in the sequence order of all vision positions, images and videos interleaved."""
    features = {kind: levels for kind, levels in features.items() if levels is not None}
    if not features:
        return None
    token_ids = {"image": config.image_token_id, "video": config.video_token_id}
    positions = torch.zeros_like(input_ids, dtype=torch.bool)
    for kind in features:
        positions |= input_ids == token_ids[kind]
    first = next(iter(features.values()))
    levels = first.new_empty(first.shape[0], int(positions.sum()), first.shape[-1])
    for kind, modality in features.items():
        levels[:, input_ids[positions] == token_ids[kind]] = modality
    return DeepStack(positions, levels)


def vision_tokens_per_item(vision_config, grid_thw):
    """How many tokens each image or video becomes: a 2x2 merge, or the Resampler's queries per frame. -> [int]"""
    if vision_config.projector == "resampler":
        return (grid_thw[:, 0] * vision_config.num_queries).tolist()
    return (grid_thw.prod(-1) // vision_config.spatial_merge_size**2).tolist()


def still_image_inputs(pixel_values, image_grid_hws):
    """Kimi-VL's processor outputs, pixel rows [N, 3, P, P] and grids [images, 2] (h, w), as rows [N, 3*P*P] and
    grid_thw [images, 3]."""
    if not isinstance(image_grid_hws, torch.Tensor) or image_grid_hws.dim() != 2 or image_grid_hws.shape[1] != 2:
        got = tuple(image_grid_hws.shape) if isinstance(image_grid_hws, torch.Tensor) else type(image_grid_hws).__name__
        raise ValueError(f"image_grid_hws must be a tensor of shape [images, 2], got {got}")
    grid_thw = torch.cat([torch.ones_like(image_grid_hws[:, :1]), image_grid_hws], dim=1)
    return (pixel_values.flatten(1) if pixel_values is not None else None), grid_thw


def vision_output(features, return_dict):
    """Per-item vision tokens as returned by get_image_features / get_video_features."""
    return BaseModelOutputWithPooling(pooler_output=features) if return_dict else features


def check_input_ids(input_ids, vocab_size):
    """Shape, dtype and range of token ids (the range test syncs with the device: call it once per prompt)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, length] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per sample")
    if input_ids.dtype not in (torch.int64, torch.int32):  # what an embedding lookup takes
        raise TypeError(f"input_ids must hold integer token ids (int64 or int32), got {input_ids.dtype}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got values in [{int(input_ids.min())}, {int(input_ids.max())}]")


# A compiled CPU decoding step multiplies the head's [vocab, hidden] weight by one row per sequence. CPU BLAS runs
# that matrix-vector product far below memory speed (34 ms for the 151936 x 256 head on an AVX2 EPYC, MKL); written
# as multiply-and-sum, inductor emits one vectorised pass over the weight (12 ms) and, like BLAS, never materialises
# the product. It wins up to 4 rows (22 against 62 ms at 2, 43 against 64 at 4), loses at 8.
FUSED_HEAD_ROWS = 4


def vocabulary_logits(head, hidden):
    """head(hidden): [..., hidden] -> [..., vocab]."""
    weight = head.weight
    fused = (
        torch.compiler.is_compiling() and hidden.device.type == "cpu" and type(head) is nn.Linear
        and type(weight.data) is torch.Tensor and hidden.shape[:-1].numel() <= FUSED_HEAD_ROWS
    )  # a quantized head (bitsandbytes' layers, torchao's weight tensors) keeps its own kernel
    if fused:
        return (hidden.unsqueeze(-2) * weight).sum(-1)
    return head(hidden)


def token_loss(logits, targets, num_items_in_batch=None):
    """Cross-entropy in float32; targets of -100 are ignored. With `num_items_in_batch` (gradient
    accumulation in Trainer) the sum is divided by the whole batch's count of labelled tokens."""
    logits, targets = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=-100)
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / num_items_in_batch


class QwenVLForConditionalGeneration(QwenVLPreTrainedModel, GenerationMixin):
    """QwenVLModel + the vocabulary head; generate() with images and videos."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_rep"}
    # A decoding step over a static cache compiles as one graph (generate(..., compile_config=...)); the prompt's step
    # (vision tower, positions, checks) runs eager, as transformers runs it. tests/test_compiled.py.
    _can_compile_fullgraph = True

    def __init__(self, config):
        super().__init__(config)
        self.model = QwenVLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.text_config is not None:
            # Kimi-VL's checkpoint names have no common prefix (`vision_tower.`, `language_model.`, ...): with one
            # declared, 4.x would take them for a base model's and prefix them all, the head's too.
            self.base_model_prefix = ""
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Also loads the official hub layouts (Qwen2/2.5-VL `model.layers.*` + `visual.*`, Qwen3-VL, Kimi-VL), renamed
        on the fly, and an original Qwen-VL (2023) directory as it ships (`transformer.*`, converted on the fly)."""
        if is_qwen_vl_2023_directory(args[0] if args else kwargs.get("pretrained_model_name_or_path")):
            return load_qwen_vl_2023(cls, *args, **kwargs)
        kwargs.setdefault("key_mapping", {**HUB_KEY_MAPPING, **QWEN3_KEY_MAPPING, **KIMI_KEY_MAPPING})
        return super().from_pretrained(*args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """Always writes the canonical layout (`model.language_model.*`, `model.visual.*`, `lm_head.*`), every Auto
        class in auto_map, and `use_cache: true`: training turns the cache off on the live config (gradient
        checkpointing needs that), and a saved model that kept it would recompute the whole sequence for every new
        token. The live model's settings are left as they were."""
        if SAVES_ORIGINAL_FORMAT:
            kwargs.setdefault("save_original_format", False)
        if self.config.text_config is not None:  # Kimi-VL keeps its official layout
            kwargs.setdefault("state_dict", kimi_state_dict(self.state_dict()))
        self.config.auto_map = dict(AUTO_MAP)
        if self.config.family == "qwen3_vl" and kwargs.get("state_dict") is None:
            kwargs["state_dict"] = qwen3_hub_state_dict(self.state_dict())
        live = self.config.use_cache, self.generation_config.use_cache
        self.config.use_cache = self.generation_config.use_cache = True
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            self.config.use_cache, self.generation_config.use_cache = live

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(self, pixel_values, image_grid_thw, return_dict=False, **kwargs):
        return self.model.get_image_features(pixel_values, image_grid_thw, return_dict, **kwargs)

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
        inputs_embeds=None, labels=None, use_cache=None, pixel_values=None, pixel_values_videos=None,
        image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None, mm_token_type_ids=None,
        rope_deltas=None, logits_to_keep=0, num_items_in_batch=None, labelled_logits_only=False, image_grid_hws=None,
        **kwargs,
    ):
        """With `labels`, returns the next-token loss. `labelled_logits_only=True` sends only the
        positions that have a label through the vocabulary head (the same loss, much less work
        when few tokens are supervised); the returned logits are then [labelled positions, vocab]."""
        # A tied head's gradient is a dense [vocab, hidden] table: the lookup's then goes in as the rows it touched
        # (summed into the head's by autograd) instead of as a second dense table (zeroed, filled, then added).
        sparse_embedding_grad = (
            labelled_logits_only and labels is not None and self.lm_head.weight is self.get_input_embeddings().weight
        )
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            pixel_values=pixel_values, pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
            mm_token_type_ids=mm_token_type_ids, rope_deltas=rope_deltas, sparse_embedding_grad=sparse_embedding_grad,
            image_grid_hws=image_grid_hws, **kwargs,
        )
        hidden, loss = outputs.last_hidden_state, None
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=-100).to(hidden.device)  # each position predicts the next
            if labelled_logits_only:
                hidden, targets = hidden[targets != -100], targets[targets != -100]
            logits = self.lm_head(hidden)
            loss = token_loss(logits, targets, num_items_in_batch)
        else:
            logits = vocabulary_logits(self.lm_head, hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return QwenVLCausalLMOutput(
            loss=loss, logits=logits, rope_deltas=outputs.rope_deltas, **{CACHE_NAME: getattr(outputs, CACHE_NAME)}
        )

    # -- generation: positions, and which pixels each step needs ---------------------------

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, rope_deltas=None, **kwargs):
        """Positions are computed here, from the whole sequence, so nothing carries over between
        `generate` calls; the first step of a call also encodes only the images whose
        placeholders are not already in the cache (a new image in a later turn)."""
        inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        cache = inputs.get(CACHE_NAME)
        past_length = cache.get_seq_length() if cache is not None else 0
        new_length = (inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]).shape[1]
        if past_length > 0 and rope_deltas is not None:  # decoding: only new text tokens
            inputs["position_ids"] = text_positions(attention_mask, past_length, new_length, rope_deltas, input_ids.device)
            for name in VISION_INPUTS:
                inputs.pop(name, None)
        else:
            position_ids, rope_deltas = self.model.get_rope_index(
                input_ids, kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw"),
                kwargs.get("second_per_grid_ts"), attention_mask,
            )
            inputs["position_ids"] = position_ids[:, :, -new_length:]
            inputs.update(vision_inputs_after(self.config, input_ids, past_length, kwargs))
        inputs["rope_deltas"] = rope_deltas
        return inputs

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """generate() asks for the mask of a static cache here (on both lines): the 2-D mask padded with zeros to
        the cache's capacity, so that every decoding step has the same shapes and a compiled step compiles once.
        The model adds the causal part over the cache's slots itself (static_cache_mask)."""
        capacity = static_capacity(kwargs.get(CACHE_NAME))
        if attention_mask is None or capacity is None:
            return attention_mask
        return F.pad(attention_mask, (0, capacity - attention_mask.shape[-1]))

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["rope_deltas"] = outputs.rope_deltas
        return model_kwargs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and num_return_sequences repeat each sample; pixel rows belong to samples
        by their placeholders, not by row, so they are repeated per sample here."""
        if model_kwargs.get("image_grid_hws") is not None:
            model_kwargs["pixel_values"], model_kwargs["image_grid_thw"] = still_image_inputs(
                model_kwargs.get("pixel_values"), model_kwargs.pop("image_grid_hws")
            )
        vision = {name: model_kwargs.pop(name) for name in VISION_INPUTS if model_kwargs.get(name) is not None}
        if expand_size > 1 and vision:
            vision = expand_vision_inputs(self.config, input_ids, vision, expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs.update(vision)
        return input_ids, model_kwargs


def spans_per_sample(config, input_ids, token_id):
    """How many images (or videos) each sample holds: placeholder runs start after <|vision_start|>."""
    starts = (input_ids[:, 1:] == token_id) & (input_ids[:, :-1] == config.vision_start_token_id)
    return starts.sum(-1).tolist()


def span_grids(config, kind, grid_thw):
    """The grids of the placeholder spans of one modality. A Qwen3-VL video has a span per temporal patch; its pixel
    rows come frame by frame, so it splits exactly into items of one frame each (which encode alike)."""
    if kind != "video" or not config.vision_config.text_timestamps:
        return grid_thw
    frames = grid_thw.repeat_interleave(grid_thw[:, 0], dim=0)
    return torch.cat([torch.ones_like(frames[:, :1]), frames[:, 1:]], dim=1)


def rows_of_items(grid_thw):
    """Start and end row of each item's patches in the packed pixel tensor."""
    ends = grid_thw.prod(-1).cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends))


def vision_inputs_after(config, input_ids, past_length, kwargs):
    """The vision inputs of the items whose placeholders lie after the cached prefix."""
    if past_length == 0:
        return {name: kwargs[name] for name in VISION_INPUTS if kwargs.get(name) is not None}
    selected = {name: None for name in VISION_INPUTS}
    for kind, pixels_name, grid_name, seconds_name in MODALITIES:
        grid = kwargs.get(grid_name)
        if grid is None or kwargs.get(pixels_name) is None:
            continue
        grid = span_grids(config, kind, grid)
        token_id = config.image_token_id if kind == "image" else config.video_token_id
        cached = spans_per_sample(config, input_ids[:, :past_length], token_id)
        total = spans_per_sample(config, input_ids, token_id)
        keep, first = [], 0
        for n_cached, n_total in zip(cached, total):
            keep.extend(range(first + n_cached, first + n_total))
            first += n_total
        if not keep:
            continue
        rows = rows_of_items(grid)
        selected[pixels_name] = torch.cat([kwargs[pixels_name][slice(*rows[i])] for i in keep])
        selected[grid_name] = grid[keep]
        if seconds_name and kwargs.get(seconds_name) is not None:
            selected[seconds_name] = torch.as_tensor(kwargs[seconds_name])[keep]
    return selected


def expand_vision_inputs(config, input_ids, vision, expand_size):
    """Repeat each sample's vision items expand_size times, sample by sample."""
    expanded = dict(vision)
    for kind, pixels_name, grid_name, seconds_name in MODALITIES:
        grid = vision.get(grid_name)
        if grid is None:
            continue
        grid = span_grids(config, kind, grid)
        token_id = config.image_token_id if kind == "image" else config.video_token_id
        order, first = [], 0
        for count in spans_per_sample(config, input_ids, token_id):
            order.extend(list(range(first, first + count)) * expand_size)
            first += count
        if pixels_name in vision:
            rows = rows_of_items(grid)
            expanded[pixels_name] = torch.cat([vision[pixels_name][slice(*rows[i])] for i in order])
        expanded[grid_name] = grid[order]
        if seconds_name in vision:
            expanded[seconds_name] = torch.as_tensor(vision[seconds_name])[order]
    return expanded


# ======================================================================================================================
# Loading and saving
# ======================================================================================================================


# Official hub files (saved by transformers 4.49-4.51) put the language model at `model.*`
# and the vision tower at `visual.*`; `from_pretrained(key_mapping=...)` works on 4.57 and 5.x.
HUB_KEY_MAPPING = {
    r"^visual\.": "model.visual.",
    r"^model\.(?!visual\.|language_model\.)": "model.language_model.",
}
# Qwen3-VL's hub files name the vision MLP and the mergers differently from our modules (`linear_fc1` for `fc1`,
# `norm` / `linear_fc1` / `linear_fc2` for `ln_q` / `mlp.0` / `mlp.2`); read on load, written back on save.
# Prefixed with `model.` or not (QwenVLModel strips it); transformers 5 takes one group per pattern.
QWEN3_MERGERS = r"^((?:model\.)?visual\.(?:merger|deepstack_merger_list\.\d+)\.)"
QWEN3_VISION_MLP = r"^((?:model\.)?visual\.blocks\.\d+\.mlp\.)"
# (prefix, hub name, our name): read with QWEN3_KEY_MAPPING, written back with QWEN3_HUB_NAMES.
QWEN3_RENAMES = (
    (QWEN3_VISION_MLP, "linear_fc1", "fc1"),
    (QWEN3_VISION_MLP, "linear_fc2", "fc2"),
    (QWEN3_MERGERS, "norm", "ln_q"),
    (QWEN3_MERGERS, "linear_fc1", "mlp.0"),
    (QWEN3_MERGERS, "linear_fc2", "mlp.2"),
)
QWEN3_KEY_MAPPING = {prefix + re.escape(hub) + r"\.": rf"\1{ours}." for prefix, hub, ours in QWEN3_RENAMES}
QWEN3_HUB_NAMES = {prefix + re.escape(ours) + r"\.": rf"\1{hub}." for prefix, hub, ours in QWEN3_RENAMES}


def qwen3_hub_state_dict(state_dict):
    """Our weights under the names of Qwen3-VL's hub files (what its official loaders, vLLM's included, read)."""
    renamed = {}
    for name, tensor in state_dict.items():
        for pattern, replacement in QWEN3_HUB_NAMES.items():
            name, found = re.subn(pattern, replacement, name)
            if found:
                break
        renamed[name] = tensor
    return renamed


# Kimi-VL's official layout against ours, "{}" standing for a block number. Loaded through the same key_mapping (the
# prefixes of the two families never meet, so the renamings can apply in any order) and written back by
# save_pretrained (`kimi_state_dict`), so that a Kimi-VL checkpoint keeps its layout.
KIMI_NAMES = (
    ("vision_tower.patch_embed.pos_emb.", "model.visual.pos_embed."),
    ("vision_tower.patch_embed.proj.", "model.visual.patch_embed.proj."),
    ("vision_tower.encoder.blocks.{}.norm0.", "model.visual.blocks.{}.norm1."),
    ("vision_tower.encoder.blocks.{}.norm1.", "model.visual.blocks.{}.norm2."),
    ("vision_tower.encoder.blocks.{}.wqkv.", "model.visual.blocks.{}.attn.qkv."),
    ("vision_tower.encoder.blocks.{}.wo.", "model.visual.blocks.{}.attn.proj."),
    ("vision_tower.encoder.blocks.{}.mlp.fc0.", "model.visual.blocks.{}.mlp.fc1."),
    ("vision_tower.encoder.blocks.{}.mlp.fc1.", "model.visual.blocks.{}.mlp.fc2."),
    ("vision_tower.encoder.final_layernorm.", "model.visual.final_norm."),
    ("multi_modal_projector.pre_norm.", "model.visual.merger.ln_q."),
    ("multi_modal_projector.linear_1.", "model.visual.merger.mlp.0."),
    ("multi_modal_projector.linear_2.", "model.visual.merger.mlp.2."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)


def name_pattern(prefix):
    return "^" + re.escape(prefix).replace(re.escape("{}"), r"(\d+)")


KIMI_KEY_MAPPING = {name_pattern(official): ours.replace("{}", r"\1") for official, ours in KIMI_NAMES}
KIMI_BODY_KEY_MAPPING = {pattern: target.removeprefix("model.") for pattern, target in KIMI_KEY_MAPPING.items()}
KIMI_SAVE_MAPPING = {re.compile(name_pattern(ours)): official.replace("{}", r"\1") for official, ours in KIMI_NAMES}


def kimi_state_dict(state_dict):
    """Our weights under Kimi-VL's official names, the experts one by one as the official files hold them (compat
    item 6). Copies, not views: safetensors refuses tensors that share memory."""
    official = {}
    for name, tensor in state_dict.items():
        for pattern, target in KIMI_SAVE_MAPPING.items():
            name, renamed = pattern.subn(target, name)
            if renamed:
                break
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: gate rows, then up rows
            for expert, weight in enumerate(tensor):
                gate, up = weight.chunk(2)
                official[f"{name[:-len('gate_up_proj')]}{expert}.gate_proj.weight"] = gate.clone()
                official[f"{name[:-len('gate_up_proj')]}{expert}.up_proj.weight"] = up.clone()
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            for expert, weight in enumerate(tensor):
                official[f"{name[:-len('down_proj')]}{expert}.down_proj.weight"] = weight.clone()
        else:
            official[name] = tensor
    return official


# Where the layers of either layout are numbered: (config field, what it counts, tensor-name pattern).
LAYER_PATTERNS = (
    ("num_hidden_layers", "decoder layers", re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.")),
    ("vision_config.depth", "vision blocks", re.compile(r"^(?:model\.)?visual\.blocks\.(\d+)\.")),
)
# vLLM's Transformers backend does not call from_pretrained: it renames checkpoint weights with the conversions 5.x
# keeps per architecture name (compat item 3). Registering the same renaming under ours lets it serve the hub layout
# too (and 5.x's from_pretrained then applies it beside key_mapping, which changes nothing: the renaming is
# idempotent).
if register_checkpoint_conversion_mapping is not None:
    register_checkpoint_conversion_mapping(
        "QwenVLForConditionalGeneration",
        [WeightRenaming(source, target) for source, target in {**HUB_KEY_MAPPING, **KIMI_KEY_MAPPING}.items()],
        overwrite=True,  # this file may be imported twice: from a checkout and as a model directory's remote code
    )
    # Looked up per module class: the body's converters serve it alone (AutoModel) and inside the whole model.
    register_checkpoint_conversion_mapping("QwenVLModel", EXPERT_CONVERTERS, overwrite=True)


def refuse_engine_without_deepstack(config):
    """vLLM's Transformers backend builds our model with its own attention implementation ("vllm") and takes only the
    main vision tokens from get_image_features: the DeepStack features would be dropped without a word, and Qwen3-VL
    then reads text worse and falls into repetition loops. Refuse that pairing."""
    if config.vision_config.deepstack_visual_indexes is not None and config._attn_implementation == "vllm":
        raise ValueError(
            "this is a Qwen3-VL (DeepStack) model: vLLM's Transformers backend (model_impl='transformers') would "
            "silently drop its DeepStack features. Serve it with vLLM's native Qwen3-VL class instead: "
            "vllm serve <official checkpoint> (without model_impl='transformers'); see README, 'Qwen3-VL'"
        )


def checkpoint_tensor_names(directory):
    """The tensor names of a local safetensors checkpoint, read from its index or file headers (no weights)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as file:
            return list(json.load(file).get("weight_map", {}))
    single = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(single):
        return []
    with safe_open(single, framework="pt") as file:
        return list(file.keys())


def check_layer_counts(directory, config):
    """Refuse a config whose decoder or vision depth differs from the checkpoint's, before the model is built: the
    extra layers would be random, missing ones silently dropped, and a huge count allocates for minutes first."""
    names = checkpoint_tensor_names(directory)
    for field, what, pattern in LAYER_PATTERNS:
        layers = {int(match.group(1)) for name in names if (match := pattern.match(name))}
        expected = config.vision_config.depth if field.startswith("vision") else config.num_hidden_layers
        if layers and len(layers) != expected:
            raise ValueError(
                f"{directory}: config.json says {field}={expected} but the checkpoint holds {len(layers)} {what}; "
                "fix the config (or pass strict=False to load it anyway)"
            )


def refuse_missing_or_unexpected(directory, info):
    """Missing weights would be random and unexpected ones ignored: both mean the checkpoint is not this model."""
    for kind in ("missing_keys", "unexpected_keys"):
        keys = sorted(info.get(kind) or [])
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            raise ValueError(
                f"{directory}: {len(keys)} {kind.replace('_keys', '')} weight(s): {shown}. The checkpoint does not "
                "match its config; pass strict=False to load it anyway"
            )


# The original Qwen-VL (2023) checkpoint (`transformer.*`, `lm_head.*`): renamed here; the tensors whose layout
# differs from our modules are reshaped in qwen_vl_2023_state_dict.
QWEN_VL_2023_RENAMES = tuple(
    (re.compile(source), target) for source, target in (
        (r"^transformer\.wte\.", "model.language_model.embed_tokens."),
        (r"^transformer\.ln_f\.", "model.language_model.norm."),
        (r"^transformer\.h\.(\d+)\.ln_1\.", r"model.language_model.layers.\1.input_layernorm."),
        (r"^transformer\.h\.(\d+)\.ln_2\.", r"model.language_model.layers.\1.post_attention_layernorm."),
        (r"^transformer\.h\.(\d+)\.attn\.c_proj\.", r"model.language_model.layers.\1.self_attn.o_proj."),
        (r"^transformer\.h\.(\d+)\.mlp\.w1\.", r"model.language_model.layers.\1.mlp.up_proj."),  # SiLU is on w2
        (r"^transformer\.h\.(\d+)\.mlp\.w2\.", r"model.language_model.layers.\1.mlp.gate_proj."),
        (r"^transformer\.h\.(\d+)\.mlp\.c_proj\.", r"model.language_model.layers.\1.mlp.down_proj."),
        (r"^transformer\.visual\.positional_embedding$", "model.visual.pos_embed.weight"),
        (r"^transformer\.visual\.conv1\.", "model.visual.patch_embed.proj."),
        (r"^transformer\.visual\.ln_pre\.", "model.visual.ln_pre."),
        (r"^transformer\.visual\.transformer\.resblocks\.(\d+)\.ln_1\.", r"model.visual.blocks.\1.norm1."),
        (r"^transformer\.visual\.transformer\.resblocks\.(\d+)\.ln_2\.", r"model.visual.blocks.\1.norm2."),
        (r"^transformer\.visual\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"model.visual.blocks.\1.attn.proj."),
        (r"^transformer\.visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"model.visual.blocks.\1.mlp.fc1."),
        (r"^transformer\.visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"model.visual.blocks.\1.mlp.fc2."),
        (r"^transformer\.visual\.attn_pool\.attn\.out_proj\.", "model.visual.merger.o_proj."),
        (r"^transformer\.visual\.attn_pool\.(query|pos_embed|kv_proj\.|ln_q\.|ln_kv\.)", r"model.visual.merger.\1"),
        (r"^transformer\.visual\.ln_post\.", "model.visual.merger.ln_post."),
        (r"^lm_head\.", "lm_head."),
    )
)
# Fused [q; k; v] rows (the decoder's c_attn, the Resampler's attention), split into three Linears.
QWEN_VL_2023_FUSED_QKV = re.compile(r"^transformer\.(?:h\.(\d+)\.attn\.c_attn\.|visual\.attn_pool\.attn\.in_proj_)(weight|bias)$")
QWEN_VL_2023_VIT_QKV = re.compile(r"^transformer\.visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj\.(weight|bias)$")


def is_qwen_vl_2023_directory(directory):
    """Whether `directory` is an original Qwen-VL / Qwen-VL-Chat folder (config.json with model_type "qwen" and a
    `visual` dict)."""
    path = os.path.join(str(directory), "config.json")
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError):  # no such folder or file, or not JSON: not one (the caller's own reading says why)
        return False
    return isinstance(config, dict) and config.get("model_type") == "qwen" and "visual" in config


def qwen_vl_2023_state_dict(tensors, config):
    """The original Qwen-VL (2023) tensors under our names and layouts. Fused q/k/v are split; the ViT's q/k/v rows,
    interleaved per head ([q_h; k_h; v_h] for each head h), are reordered to [q; k; v]; the original applies
    `x @ proj`, a Linear holds proj^T; the 2-D patch convolution gains a time axis of 1."""
    heads = config.vision_config.num_heads
    converted, unknown = {}, []
    for name, tensor in tensors.items():
        if match := QWEN_VL_2023_FUSED_QKV.match(name):
            layer, kind = match.groups()
            prefix = f"model.language_model.layers.{layer}.self_attn." if layer else "model.visual.merger."
            for part, piece in zip("qkv", tensor.chunk(3)):
                converted[f"{prefix}{part}_proj.{kind}"] = piece.contiguous()
        elif match := QWEN_VL_2023_VIT_QKV.match(name):
            per_head = tensor.unflatten(0, (heads, 3, -1)).transpose(0, 1).flatten(0, 2)
            converted[match.expand(r"model.visual.blocks.\1.attn.qkv.\2")] = per_head.contiguous()
        elif name == "transformer.visual.proj":
            converted["model.visual.merger.proj.weight"] = tensor.t().contiguous()
        elif renamed := next((pattern.sub(target, name) for pattern, target in QWEN_VL_2023_RENAMES if pattern.match(name)), None):
            converted[renamed] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"not a Qwen-VL (2023) checkpoint: unknown weight(s) {', '.join(sorted(unknown)[:5])}")
    return converted


def read_checkpoint_tensors(directory, allow_pickle=False):
    """Every tensor of a local checkpoint folder: its safetensors files, or else its pickle `.bin` shards, read with
    torch.load(weights_only=True) and only when `allow_pickle` (the caller passed use_safetensors=False)."""
    names = sorted(os.listdir(directory))
    files = [n for n in names if n.endswith(".safetensors")]
    if files:
        tensors = {}
        for name in files:
            with safe_open(os.path.join(directory, name), framework="pt") as file:
                tensors.update({key: file.get_tensor(key) for key in file.keys()})
        return tensors
    if not allow_pickle:
        refuse_pickle_only_directory(directory)
        raise OSError(f"{directory} holds no weights (no .safetensors or pytorch_model*.bin files)")
    tensors = {}
    for name in (n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")):
        tensors.update(torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True, mmap=True))
    return tensors


def load_qwen_vl_2023(cls, directory, *args, **kwargs):
    """An original Qwen-VL (2023) folder, as it ships, loaded into `cls`: its config.json read by QwenVLConfig, its
    tensors converted by qwen_vl_2023_state_dict, its generation_config.json's stopping and sampling kept."""
    config = kwargs.pop("config", None) or QwenVLConfig.from_pretrained(directory)
    tensors = read_checkpoint_tensors(directory, allow_pickle=kwargs.pop("use_safetensors", None) is False)
    model = cls.from_pretrained(None, *args, config=config, state_dict=qwen_vl_2023_state_dict(tensors, config), **kwargs)
    model.generation_config = qwen_vl_2023_generation_config(directory, model.generation_config)
    return model


def qwen_vl_2023_generation_config(directory, generation_config):
    """The original generation_config.json in our terms: a chat model ("chatml") stops at <|im_end|> or
    <|im_start|> as the original's stop words do (it then forces <|endoftext|>), a base model ("raw") at
    <|endoftext|>; sampling settings as given."""
    path = os.path.join(directory, "generation_config.json")
    original = {}
    if os.path.isfile(path):
        with open(path) as file:
            original = json.load(file)
    eos = original.get("eos_token_id", 151643)
    chat = original.get("chat_format", "chatml") == "chatml"
    generation_config.eos_token_id = [eos, 151645, 151644] if chat else [eos]
    generation_config.pad_token_id = original.get("pad_token_id", eos)
    for name in ("do_sample", "top_k", "top_p", "max_new_tokens"):
        if name in original:
            setattr(generation_config, name, original[name])
    return generation_config


def refuse_pickle_only_directory(directory):
    """A clear error for a local checkpoint whose weights exist only as pickle files."""
    if not os.path.isdir(directory):
        return
    names = os.listdir(directory)
    pickles = sorted(n for n in names if n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json")))
    if pickles and not any(n.endswith(".safetensors") for n in names):
        raise OSError(
            f"{directory} holds only pickle weights ({', '.join(pickles)}); qwenvl loads safetensors only, because "
            "unpickling can run arbitrary code. Convert the checkpoint to safetensors, or pass "
            "use_safetensors=False to from_pretrained if you trust where the file came from."
        )


__all__ = [
    "QwenVLPreTrainedModel",
    "QwenVLVisionModel",
    "QwenVLTextModel",
    "QwenVLModel",
    "QwenVLForConditionalGeneration",
    "get_window_index",
    "get_rope_index",
]


QwenVLModel.register_for_auto_class("AutoModel")
QwenVLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
