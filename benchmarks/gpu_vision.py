"""The vision tower on a GPU: the built-in (sdpa); ours with sdpa once per run of equal windows ("runs"); ours
with sdpa as it ships ("sdpa": runs, or torch's varlen kernel where the runs are many); and ours with
flash_attention_2 ("varlen": one varlen kernel call per layer, flash-attn's, or where it is not installed, torch's
own FlashAttention-2 varlen kernel, torch.nn.attention.varlen, standing in for it).

All hold the same random weights of Qwen2.5-VL's official vision tower size (width 1280, 16 heads,
depth 32, full attention in blocks 7/15/23/31) in bfloat16 and see the same inputs. Times are medians of
CUDA-synchronised repetitions after warm-ups; ratios are built-in time / our time. Errors are relative L2
errors of the merged tokens against the same tower in float32 (ours), so that the built-in's
bfloat16 error and ours can be compared.

Usage:
  python benchmarks/gpu_vision.py           # on a CUDA machine; about 2 minutes on an H100
  python benchmarks/gpu_vision.py --small   # a narrow tower and small inputs: a smoke test, CPU too
  python benchmarks/gpu_vision.py --json    # the last line is one JSON object of the results
  python benchmarks/gpu_vision.py --compiled  # also ours with compile_vision() ("compiled"; compile time apart)
"""

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # the CPU benchmark: inputs and model building

import modeling_qwenvl  # run.py put the repo root on the path

OFFICIAL_VISION = dict(
    run.VISION, depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
    fullatt_block_indexes=[7, 15, 23, 31],
)
def mixed_sizes(count=16):
    """Still images of `count` different sizes: windows (and frames) of many lengths, few equal neighbours."""
    parts = [run.still_image_pixels(224 + 28 * (i % 6), 224 + 56 * (i % 5), seed=i) for i in range(count)]
    return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])


CASES = {  # name -> (pixels, grid) builder; 1008 x 756 has windows of several lengths
    "1344px": lambda: run.still_image_pixels(1344, 1344),
    "2016px": lambda: run.still_image_pixels(2016, 2016),
    "1008x756": lambda: run.still_image_pixels(756, 1008),
    "video_32x448": lambda: run.video_pixels(32, 448),
    "16x224": lambda: run.still_image_pixels(224, 224, count=16),
    "16_mixed": mixed_sizes,
}
SMALL_CASES = {
    "448px": lambda: run.still_image_pixels(448, 448),
    "252x336": lambda: run.still_image_pixels(252, 336),
    "4x224": lambda: run.still_image_pixels(224, 224, count=4),
    "8_mixed": lambda: mixed_sizes(8),
}


def timed(fn, device, repetitions):
    times = []
    for _ in range(repetitions):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mib(fn, device):
    if device.type != "cuda":
        return 0.0
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the CPU benchmark's narrow tower and small inputs")
    parser.add_argument("--repetitions", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--compiled", action="store_true", help="also ours with compile_vision() (sdpa)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not args.small:
        run.VISION = OFFICIAL_VISION  # build_models reads it
    with tempfile.TemporaryDirectory() as directory:
        builtin, ours = run.build_models(directory)
    builtin_visual = builtin.model.visual.to(device, dtype)
    float32_visual = copy.deepcopy(ours.model.visual).to(device)
    our_visual = ours.model.visual.to(device, dtype)
    del builtin, ours
    if modeling_qwenvl.flash_attn_varlen_func is None and device.type == "cuda":
        from torch.nn.attention.varlen import (
            varlen_attn,  # same arguments, same FlashAttention-2 code
        )

        modeling_qwenvl.flash_attn_varlen_func = varlen_attn
    kernel = modeling_qwenvl.flash_attn_varlen_func
    kernel_name = f"{kernel.__module__}.{kernel.__name__}" if kernel else "none"

    def with_varlen(pixels, grid):
        if kernel is None:  # on the CPU: the sdpa path again
            return our_visual(pixels, grid)
        our_visual.config._attn_implementation = "flash_attention_2"
        try:
            return our_visual(pixels, grid)
        finally:
            our_visual.config._attn_implementation = "sdpa"

    def by_runs(pixels, grid):
        torch_varlen, modeling_qwenvl.torch_varlen_attn = modeling_qwenvl.torch_varlen_attn, None
        try:
            return our_visual(pixels, grid)
        finally:
            modeling_qwenvl.torch_varlen_attn = torch_varlen

    variants = {  # label -> forward(pixels, grid)
        "builtin": lambda p, g: builtin_visual(p, grid_thw=g),
        "runs": by_runs,  # ours, sdpa once per run of equal segments, always
        "sdpa": lambda p, g: our_visual(p, g),  # ours, default: runs, or torch's varlen kernel where they are many
        "varlen": with_varlen,  # ours, flash_attention_2
    }
    if args.compiled:  # ours, sdpa, row-wise work compiled; the first call of each case (untimed) compiles
        variants["compiled"] = copy.deepcopy(our_visual).compile_vision()
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {dtype}, torch "
          f"{torch.__version__}, varlen kernel: {kernel_name}, vision width "
          f"{run.VISION['hidden_size']} x {run.VISION['depth']} blocks")
    print("ms: median time; x: built-in time / this time; err: relative L2 error against float32; MiB: peak")
    results = {}
    for name, build in (SMALL_CASES if args.small else CASES).items():
        pixels, grid = build()
        pixels, grid = pixels.to(device), grid.to(device)
        row = {"patches": pixels.shape[0]}
        with torch.no_grad():
            reference = float32_visual(pixels, grid)
            pixels = pixels.to(dtype)
            for label, forward in variants.items():
                call = functools.partial(forward, pixels, grid)
                start = time.perf_counter()
                out = call()  # the compiled variant compiles here: its first-call time is reported apart
                synchronize(device)
                row[f"{label}_first_s"] = time.perf_counter() - start
                out = out.pooler_output if hasattr(out, "pooler_output") else out
                row[f"{label}_error"] = relative_error(out, reference)
                row[f"{label}_peak_mib"] = peak_mib(call, device)
                row[f"{label}_s"] = timed(call, device, args.repetitions)
        results[name] = row
        cells = "  ".join(
            f"{label} {row[label + '_s'] * 1e3:.1f} ms x{row['builtin_s'] / row[label + '_s']:.2f} "
            f"err {row[label + '_error']:.1e} {row[label + '_peak_mib']:.0f} MiB" for label in variants
        )
        print(f"{name:>12} {row['patches']:>6} patches  {cells}")
    if args.json:
        print(json.dumps({"device": str(device), "results": results}))


if __name__ == "__main__":
    main()
