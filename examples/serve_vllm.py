"""Serve a qwenvl model with vLLM, offline: pictures and a clip in, text out.

vLLM runs qwenvl through its Transformers backend (`model_impl="transformers"`) with the code files that the model
directory holds (`trust_remote_code=True`); no vLLM code is needed for this model. --model is a qwenvl directory:
an official checkpoint converted with convert_checkpoint.py, or anything QwenVLForConditionalGeneration and
QwenVLProcessor saved.

    python examples/serve_vllm.py --model DIR --image examples/shape.png --question "Which shape is red?"
    python examples/serve_vllm.py --model DIR --image a.png --image b.png --question "What differs?"
    python examples/serve_vllm.py --model DIR --video examples/motion.mp4 --question "What moves?"

Needs vLLM: `bash tests/vllm/setup.sh` builds .venv-vllm with its CPU build (run this script with
.venv-vllm/bin/python); on GPUs install vLLM's CUDA build and pass --tensor-parallel-size N.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from image_processing_qwenvl import DEFAULT_FPS, load_image, load_video  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a qwenvl model directory")
    parser.add_argument("--image", action="append", default=[], help="a picture (path); repeat for several")
    parser.add_argument("--video", help="a clip (path), sampled at --fps")
    parser.add_argument(
        "--fps", type=float, default=DEFAULT_FPS,
        help=f"frames per second sampled from --video (default {DEFAULT_FPS:g})",
    )
    parser.add_argument("--question", default="Describe what you see.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to shard the language model over")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 or float32")
    parser.add_argument("--max-model-len", type=int, default=8192, help="longest prompt + answer, in tokens")
    return parser.parse_args(argv)


def build_request(processor, args):
    """The prompt (our chat template, one placeholder per picture or clip) and its media, as `LLM.generate` takes
    them. The clip is decoded and sampled here; the processor is told its sampled rate, which sets video time."""
    content = [{"type": "image"} for _ in args.image]
    media, processor_kwargs = {}, {}
    if args.image:
        media["image"] = [load_image(path) for path in args.image]
    if args.video:
        content.append({"type": "video"})
        frames, fps = load_video(args.video, fps=args.fps)
        media["video"] = frames
        processor_kwargs["fps"] = fps
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return {"prompt": prompt, "multi_modal_data": media, "mm_processor_kwargs": processor_kwargs}


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    llm = LLM(
        model=args.model,
        model_impl="transformers",
        trust_remote_code=True,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len,
        limit_mm_per_prompt={"image": len(args.image), "video": int(args.video is not None)},
    )
    outputs = llm.generate(build_request(processor, args), SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    print(outputs[0].outputs[0].text)


if __name__ == "__main__":
    main()
