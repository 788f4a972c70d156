"""Ask the embedded qwenvl model (the repo root) about pictures and clips, offline.

  python demo.py                                   # the examples in examples/, with expected answers
  python demo.py --image PATH --question TEXT      # your own picture; the answer streams as it is generated
  python demo.py --video PATH --question TEXT      # your own clip
  python demo.py --chat [--image PATH]             # a conversation on stdin (commands below)
  python demo.py --eval 100 --seed 777             # accuracy per task on fresh synthetic questions
  python demo.py --ground                          # grounding: an example answer drawn on examples/shape.png
  python demo.py --ground ANSWER --image PATH --model DIR    # a grounding answer of the model in DIR, drawn
  python demo.py --web [--model DIR] [--port 7860]  # the chat page on http://127.0.0.1:7860 (needs gradio)

The model is small and trained only on synthetic scenes (shapes of five colours on white; a ball
moving over 4 frames): it answers questions about colour, shape, position, count and motion.

--chat keeps the whole conversation and sends all of it, images included, with every new message. Type a message
and press Enter; /image PATH or /video PATH adds a picture or clip to your next message; /reset starts over;
/quit (or end of input) leaves. A message that fails (a picture or clip that cannot be read, say) is dropped with its
media, and the conversation before it goes on.

--ground runs no model (the embedded one is not trained to ground objects): it reads an answer of an official
model, Qwen2.5-VL's JSON ({"bbox_2d": [x1, y1, x2, y2], "label": ...}, in pixels of the resized image) or
Qwen2-VL's <|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|> (in [0, 1000)),
maps it to the picture's pixels and writes the picture with the boxes drawn to --out. Which of the two the answer is
comes from the family in --model's config.json (only that file is read): give the directory of the model that wrote
ANSWER (official or converted); the default, the repo root, is a Qwen2.5-VL-family model. For Qwen2.5-VL, give the
--max-pixels that the model's processor used, so that the resized size is the one the model saw.
"""

import argparse
import copy
import json
import os
import sys
import warnings

from PIL import Image

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import synthetic_tasks as tasks  # noqa: E402
from image_processing_qwenvl import DEFAULT_MAX_PIXELS  # noqa: E402

EXAMPLES = os.path.join(ROOT, "examples", "questions.json")
# What each family answers to "Locate every shape" on examples/shape.png (168 x 168, which the official
# processor keeps at 168 x 168): written by hand from the shapes' true positions, in each family's coordinates. Keyed
# by QwenVLConfig.family.
GROUNDING_IMAGE = os.path.join(ROOT, "examples", "shape.png")
GROUNDING_EXAMPLES = {
    "qwen2_5_vl": """```json
[
  {"bbox_2d": [66, 11, 108, 53], "label": "red triangle"},
  {"bbox_2d": [9, 13, 41, 45], "label": "yellow square"},
  {"point_2d": [89, 137], "label": "blue circle"}
]
```""",
    "qwen2_vl": "<|object_ref_start|>red triangle<|object_ref_end|><|box_start|>(393,65),(643,315)<|box_end|>, "
    "<|object_ref_start|>yellow square<|object_ref_end|><|box_start|>(54,77),(244,268)<|box_end|> and "
    "<|object_ref_start|>blue circle<|object_ref_end|><|box_start|>(405,690),(655,940)<|box_end|>",
    "qwen3_vl": """```json
[
  {"bbox_2d": [393, 65, 643, 315], "label": "red triangle"},
  {"bbox_2d": [54, 77, 244, 268], "label": "yellow square"},
  {"point_2d": [530, 815], "label": "blue circle"}
]
```""",
    "qwen_vl": "<ref>red triangle</ref><box>(393,65),(643,315)</box>, <ref>yellow square</ref><box>(54,77),(244,268)</box>"
    " and <ref>blue circle</ref><quad>(530,690),(655,815),(530,940),(405,815)</quad>",
}
CHAT_HELP = "commands: /image PATH, /video PATH (added to your next message), /reset, /quit"
# What one chat turn may fail with while the chat goes on: the errors of the processor's and model's contract
# (ValueError, TypeError, OSError: a missing, unreadable or refused picture or clip, a bad line) and PIL's refusal to
# open a picture of too many pixels, which derives from none of them.
TURN_ERRORS = (ValueError, TypeError, OSError, Image.DecompressionBombError)


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
    return [{"role": "user", "content": [tasks.media_item(kind, source), {"type": "text", "text": question}]}]


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

    scores = tasks.evaluate(answer, per_task, seed, progress=True)
    for task, accuracy in scores["per_task"].items():
        print(f"{task:9s} {accuracy:.3f}")
    print(f"overall   {scores['accuracy']:.3f} on {scores['n']} questions")
    print(json.dumps(scores))


# ---- streaming and chat -------------------------------------------------------------------------------------------


def make_streamer(tokenizer, out):
    """A TextStreamer that writes each finished piece of the answer to `out` at once; the prompt is not
    repeated."""
    from transformers import TextStreamer

    class EchoStreamer(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return EchoStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def stream_reply(model, processor, messages, max_new_tokens, out=None):
    """Answer a conversation greedily, writing the answer to `out` (stdout) piece by piece as it is generated;
    returns it."""
    import torch

    out = out or sys.stdout
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        tokens = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=make_streamer(processor.tokenizer, out)
        )
    return processor.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class ChatSession:
    """A conversation as chat messages. `reply(messages)` answers the whole conversation so far; pictures and clips
    added with /image and /video join the next user message."""

    def __init__(self, reply, out=None):
        self.reply, self.out = reply, out or sys.stdout
        self.messages, self.pending = [], []

    def say(self, text):
        self.out.write(text + "\n")
        self.out.flush()

    def handle(self, line):
        """Act on one input line; False when the user leaves. A line that fails (see TURN_ERRORS) is dropped with
        the media pending for it, the conversation before it is kept as it was, and the chat goes on."""
        try:
            return self.act(line)
        except TURN_ERRORS as error:
            self.pending = []
            self.say(f"\nerror: {error} (message and pending media dropped; the earlier turns are kept)")
            return True

    def act(self, line):
        """One input line: a command, or a message to answer."""
        line = line.strip()
        if not line:
            return True
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command in ("/image", "/video"):
            self.add_media(command[1:], argument.strip())
        elif command == "/reset":
            self.messages, self.pending = [], []
            self.say("(conversation cleared)")
        elif line.startswith("/"):
            self.say(f"unknown command {command!r}; {CHAT_HELP}")
        else:
            self.ask(line)
        return True

    def add_media(self, kind, source):
        if not source:
            self.say(f"/{kind} needs a path: /{kind} PATH")
        elif not (os.path.exists(source) or source.startswith(("file://", "data:"))):
            self.say(f"no such file: {source}")
        else:
            self.pending.append(tasks.media_item(kind, source))
            self.say(f"({kind} added: it goes with your next message)")

    def ask(self, text):
        """Answer the conversation with this message added; the message and its answer join the conversation only
        once the answer is complete. The reply gets a copy, so that nothing it does can change the conversation."""
        question = {"role": "user", "content": [*self.pending, {"type": "text", "text": text}]}
        self.out.write("model> ")
        answer = self.reply(copy.deepcopy([*self.messages, question]))
        self.messages += [question, {"role": "assistant", "content": answer}]
        self.pending = []


def run_chat(pipe, first_media, max_new_tokens):
    session = ChatSession(lambda messages: stream_reply(pipe.model, pipe.processor, messages, max_new_tokens))
    session.pending = list(first_media)
    session.say(f"Chat with the model. {CHAT_HELP}")
    for stream in (sys.stdin, sys.stdout):  # a byte that is not text must not end the chat: it reads as U+FFFD
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not sys.stdin.isatty():  # piped input is not shown by the terminal: echo it
            print(line)
        if not session.handle(line):
            break


# ---- grounding ---------------------------------------------------------------------------------------------------


def run_ground(answer, image_path, config, max_pixels, out_path):
    """Read a grounding answer of the model that `config` (a QwenVLConfig) describes, print the objects in the
    picture's pixels and save the picture with them drawn."""
    from grounding_qwenvl import draw_boxes, ground
    from image_processing_qwenvl import load_image, smart_resize

    image = load_image(image_path)  # EXIF orientation applied, as the processor sees the picture
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    height, width = smart_resize(image.height, image.width, factor, max_pixels=max_pixels)
    print(f"family {config.family} (from the model's config.json)")
    objects = ground(answer, config.family, image.size, resized_size=(width, height))
    for item in objects:
        where = f"box {tuple(round(v) for v in item.box)}" if item.box else f"point {tuple(round(v) for v in item.point)}"
        print(f"{item.label or '(no label)'}: {where}")
    draw_boxes(image, objects).save(out_path)
    print(f"{len(objects)} object(s) drawn on {image_path} ({image.width} x {image.height}) -> {out_path}")


def check_arguments(parser, args):
    media = args.image or args.video
    if args.ground is not None:
        if args.question or args.chat or args.eval or args.video:
            parser.error("--ground runs no model: it takes only --image, --model, --max-pixels and --out")
        if args.ground is True and args.image:
            parser.error("--ground without ANSWER draws its example on examples/shape.png; give ANSWER with --image")
        if args.ground is not True and not args.image:
            parser.error("--ground ANSWER needs --image, the picture the answer is about")
        if args.max_pixels < 28 * 28:
            parser.error("--max-pixels must be at least 784 (one 28 x 28 block)")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            parser.error(f"--model {args.model} has no config.json: give the directory of the model that wrote ANSWER")
        return
    if args.web and (args.question or args.chat or args.eval or media):
        parser.error("--web serves the chat page: pictures and questions come from the page; drop the other modes")
    if not 0 < args.port < 65536:
        parser.error(f"--port must be a TCP port (1-65535), got {args.port}")
    if args.eval is not None and args.eval < 1:
        parser.error(f"--eval N needs N of at least 1 (questions per task), got {args.eval}")
    if args.chat and (args.question or args.eval):
        parser.error("--chat reads its questions from stdin: drop --question and --eval")
    if media and not args.question and not args.chat:
        parser.error("--image and --video need --question (or --chat)")
    if args.question and not media:
        parser.error("--question needs --image or --video")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", help="a picture: path, file:// or data: URI")
    source.add_argument("--video", help="a clip: a video file path (needs PyAV)")
    parser.add_argument("--question", help="the question about --image or --video")
    parser.add_argument("--chat", action="store_true", help="a multi-turn conversation on stdin (see above)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer for --question and --chat")
    parser.add_argument("--eval", type=int, metavar="N", help="evaluate on N fresh questions per task")
    parser.add_argument("--seed", type=int, default=777, help="seed of the --eval questions (training never uses 777)")
    parser.add_argument("--web", action="store_true", help="serve the chat page on 127.0.0.1 (docs/web.md)")
    parser.add_argument("--port", type=int, default=7860, help="the chat page's port (with --web)")
    parser.add_argument(
        "--model", default=ROOT,
        help="a qwenvl model directory (default: the repo root); with --ground, the model that wrote ANSWER (its "
        "config.json tells the family)",
    )
    grounding = parser.add_argument_group("grounding (runs no model)")
    grounding.add_argument(
        "--ground", nargs="?", const=True, metavar="ANSWER",
        help="draw the objects of a grounding ANSWER on --image; alone, an example answer on examples/shape.png",
    )
    grounding.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help="max_pixels of the processor that fed the model (Qwen2.5-VL answers in pixels of the resized picture)",
    )
    grounding.add_argument("--out", default="grounded.png", help="where the drawn picture goes (PNG)")
    args = parser.parse_args(argv)
    check_arguments(parser, args)

    if args.ground is not None:
        from configuration_qwenvl import QwenVLConfig

        example = args.ground is True
        try:
            config = QwenVLConfig.from_pretrained(args.model)
            if config.family not in GROUNDING_EXAMPLES:
                raise ValueError(f"--ground: {config.family} models have no grounding format that qwenvl reads")
            answer = GROUNDING_EXAMPLES[config.family] if example else args.ground
            run_ground(answer, GROUNDING_IMAGE if example else args.image, config, args.max_pixels, args.out)
        except (ValueError, OSError) as error:
            parser.exit(2, f"demo.py: error: {error}\n")
        return
    if args.web:
        import importlib.util

        if importlib.util.find_spec("gradio") is None:
            parser.exit(2, "demo.py: error: --web needs gradio: run make web, or pip install -r requirements-web.txt\n")
        import web_demo

        web_demo.serve(model_dir=args.model, port=args.port)
        return
    pipe = load_pipeline(args.model)
    kind, source = ("image", args.image) if args.image else ("video", args.video)
    if args.eval:
        run_eval(pipe, args.eval, args.seed)
    elif args.chat:
        run_chat(pipe, [tasks.media_item(kind, source)] if source else [], args.max_new_tokens)
    elif source:
        stream_reply(pipe.model, pipe.processor, user_chat(kind, source, args.question), args.max_new_tokens)
    else:
        run_examples(pipe)


if __name__ == "__main__":
    main()
