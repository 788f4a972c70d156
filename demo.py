"""Ask the embedded qwenvl model (the repo root) about pictures and clips, offline.

  python demo.py                                   # the examples in examples/, with expected answers
  python demo.py --image PATH --question TEXT      # your own picture
  python demo.py --video PATH --question TEXT      # your own clip
  python demo.py --eval 100 --seed 777             # accuracy per task on fresh synthetic questions

The model is small and trained only on synthetic scenes (shapes of five colours on white; a ball
moving over 4 frames): it answers questions about colour, shape, position, count and motion.
"""

import argparse
import json
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import synthetic_tasks as tasks  # noqa: E402

EXAMPLES = os.path.join(ROOT, "examples", "questions.json")


def load_pipeline(model_dir):
    import torch
    from transformers import pipeline
    from transformers.utils import logging

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    return pipeline("image-text-to-text", model=model_dir, trust_remote_code=True, dtype=torch.float32)


def ask(pipe, chats, max_new_tokens=8):
    """Answers for a list of chats, greedy."""
    outputs = pipe(text=chats, max_new_tokens=max_new_tokens, generate_kwargs={"do_sample": False}, return_full_text=False)
    return [out[0]["generated_text"].strip() if isinstance(out, list) else out["generated_text"].strip() for out in outputs]


def user_chat(kind, source, question):
    # the model was trained on 168 x 168 pictures: larger inputs are scaled down to that many pixels
    item = {"type": kind, kind: source, "min_pixels": 28 * 28, "max_pixels": tasks.IMAGE_SIZE**2}
    return [{"role": "user", "content": [item, {"type": "text", "text": question}]}]


def run_examples(pipe):
    with open(EXAMPLES) as f:
        examples = json.load(f)
    chats = [user_chat(e["kind"], os.path.join(ROOT, "examples", e["file"]), e["question"]) for e in examples]
    for example, answer in zip(examples, ask(pipe, chats)):
        mark = "ok " if tasks.answer_matches(answer, example["expected"]) else "   "
        print(f"{mark}[{example['file']}] {example['question']}\n    model: {answer}    expected: {example['expected']}")


def run_eval(pipe, per_task, seed):
    def answer(examples):
        return ask(pipe, [tasks.messages(e, tasks.render(e)) for e in examples])

    scores = tasks.evaluate(answer, per_task, seed)
    for task, accuracy in scores["per_task"].items():
        print(f"{task:9s} {accuracy:.3f}")
    print(f"overall   {scores['accuracy']:.3f} on {scores['n']} questions")
    print(json.dumps(scores))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", help="a picture: path, file:// or data: URI")
    source.add_argument("--video", help="a clip: a video file path (needs PyAV)")
    parser.add_argument("--question", help="the question about --image or --video")
    parser.add_argument("--eval", type=int, metavar="N", help="evaluate on N fresh questions per task")
    parser.add_argument("--seed", type=int, default=777, help="seed of the --eval questions (training never uses 777)")
    parser.add_argument("--model", default=ROOT, help="a qwenvl model directory (default: the repo root)")
    args = parser.parse_args()
    if (args.image or args.video) and not args.question:
        parser.error("--image and --video need --question")
    if args.question and not (args.image or args.video):
        parser.error("--question needs --image or --video")

    pipe = load_pipeline(args.model)
    if args.eval:
        run_eval(pipe, args.eval, args.seed)
    elif args.image or args.video:
        kind = "image" if args.image else "video"
        print(ask(pipe, [user_chat(kind, args.image or args.video, args.question)])[0])
    else:
        run_examples(pipe)


if __name__ == "__main__":
    main()
