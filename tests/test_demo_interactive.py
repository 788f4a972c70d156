"""demo.py's streaming, --chat and --ground, without the trained weights: a tiny random qwenvl directory stands in
for the model, and the grounding example needs no model at all."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import demo
from configuration_qwenvl import QwenVLConfig
from modeling_qwenvl import QwenVLForConditionalGeneration
from processing_qwenvl import QwenVLProcessor
from test_portable import tiny_model

ROOT = Path(__file__).resolve().parent.parent
IMAGE = str(ROOT / "examples" / "shape.png")
CHAT_LINES = ["/image " + IMAGE, "What is red?", "", "/unknown", "And what is blue?", "/quit", "never read"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model().save_pretrained(directory)
    QwenVLProcessor.from_pretrained(ROOT).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_and_processor(model_dir):
    return QwenVLForConditionalGeneration.from_pretrained(model_dir).eval(), QwenVLProcessor.from_pretrained(model_dir)


class Recorder:
    """A text stream that notes how many forward passes the model had made at each write."""

    def __init__(self, passes):
        self.passes, self.writes = passes, []

    def write(self, text):
        self.writes.append((text, len(self.passes)))

    def flush(self):
        pass


def test_answers_stream_while_they_are_generated(model_and_processor):
    model, processor = model_and_processor
    passes = []
    hook = model.register_forward_hook(lambda *args: passes.append(1))
    try:
        out = Recorder(passes)
        answer = demo.stream_reply(model, processor, demo.user_chat("image", IMAGE, "What is red?"), 12, out=out)
    finally:
        hook.remove()
    assert "".join(text for text, _ in out.writes).strip() == answer
    assert len(out.writes) >= 2
    assert out.writes[0][1] < len(passes)  # the first piece was out before the last forward pass
    inputs = processor.apply_chat_template(demo.user_chat("image", IMAGE, "What is red?"), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert answer == processor.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_chat_session_keeps_the_conversation_and_attaches_media_to_the_next_message():
    seen = []

    def reply(messages):
        seen.append([dict(m) for m in messages])
        return f"answer {len(seen)}"

    out = io.StringIO()
    session = demo.ChatSession(reply, out=out)
    handled = [session.handle(line) for line in CHAT_LINES[:6]]
    assert handled == [True, True, True, True, True, False]
    first, second = seen
    assert [m["role"] for m in first] == ["user"] and first[0]["content"][0]["image"] == IMAGE
    assert first[0]["content"][1] == {"type": "text", "text": "What is red?"}
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == "answer 1"
    assert second[2]["content"] == [{"type": "text", "text": "And what is blue?"}]  # the image went with turn 1 only
    assert "unknown command '/unknown'" in out.getvalue()
    session.handle("/image no/such/file.png")
    assert "no such file" in out.getvalue() and session.pending == []
    session.handle("/reset")
    assert session.messages == [] and session.pending == []


def test_a_failing_turn_is_dropped_and_the_chat_goes_on():
    def reply(messages):
        raise ValueError("cannot identify image file")

    out = io.StringIO()
    session = demo.ChatSession(reply, out=out)
    session.handle("/image " + IMAGE)
    session.handle("hello")
    assert session.messages == [] and session.pending == []
    assert "error: cannot identify image file" in out.getvalue()


def test_chat_on_stdin_resends_the_whole_conversation(model_dir, model_and_processor):
    model, processor = model_and_processor
    done = subprocess.run(
        [sys.executable, str(ROOT / "demo.py"), "--model", str(model_dir), "--chat", "--max-new-tokens", "4"],
        input="\n".join(CHAT_LINES) + "\n", capture_output=True, text=True, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model> ") == 2 and "(image added" in done.stdout
    assert "never read" not in done.stdout  # /quit ends the chat
    # the same conversation in this process: every answer the subprocess streamed matches
    session = demo.ChatSession(lambda messages: demo.stream_reply(model, processor, messages, 4, out=io.StringIO()), out=io.StringIO())
    for line in CHAT_LINES[:6]:
        session.handle(line)
    answers = [m["content"] for m in session.messages if m["role"] == "assistant"]
    assert len(answers) == 2
    for answer in answers:
        assert answer in done.stdout


# ---- grounding ---------------------------------------------------------------------------------------------------


def qwen2_config_dir(directory):
    """A directory holding only a Qwen2-VL-family config.json (--ground reads nothing else)."""
    QwenVLConfig(vision_config=dict(embed_dim=64, hidden_size=128, depth=2, num_heads=4)).save_pretrained(directory)
    return directory


def qwen3_config_dir(directory):
    """A directory holding only a Qwen3-VL-family config.json (DeepStack is what makes the family)."""
    vision = dict(
        depth=2, hidden_size=64, num_heads=4, norm_type="layernorm", gated_mlp=False, window_size=None,
        fullatt_block_indexes=None, tokens_per_second=None, deepstack_visual_indexes=[0], text_timestamps=True,
    )
    QwenVLConfig(vision_config=vision).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_ground_draws_the_built_in_example(family, tmp_path, capsys):
    """The family comes from --model's config: the repo root's (Qwen2.5-VL) by default, or a Qwen2-VL or Qwen3-VL one
    (both answer in 0..1000 of each side)."""
    out = tmp_path / "grounded.png"
    directories = {"qwen2_vl": qwen2_config_dir, "qwen3_vl": qwen3_config_dir}
    model = [] if family == "qwen2_5_vl" else ["--model", str(directories[family](tmp_path / family))]
    demo.main(["--ground", *model, "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"family {family}" in printed
    assert "red triangle: box (66, 11, 108, 53)" in printed and "3 object(s)" in printed
    drawn = Image.open(out)
    assert drawn.size == (168, 168) and drawn.convert("RGB").getpixel((9, 30)) != (235, 200, 30)  # an edge is drawn


def test_ground_maps_an_answer_for_a_resized_picture(tmp_path, capsys):
    picture = tmp_path / "wide.png"
    Image.new("RGB", (1000, 500), "white").save(picture)
    # with max_pixels 200704 the processor resizes 1000 x 500 to 616 x 308: the box is scaled back by 1000/616
    answer = '```json\n[{"bbox_2d": [308, 154, 616, 308], "label": "half"}]\n```'
    out = tmp_path / "out.png"
    demo.main(["--ground", answer, "--image", str(picture), "--max-pixels", "200704", "--out", str(out)])
    assert "half: box (500, 250, 1000, 500)" in capsys.readouterr().out
    assert Image.open(out).size == (1000, 500)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ground", "--image", IMAGE], "--ground without ANSWER draws its example"),
        (["--ground", "{}"], "--ground ANSWER needs --image"),
        (["--ground", "--chat"], "--ground runs no model"),
        (["--ground", "--family", "2.5"], "unrecognized arguments: --family"),  # read from --model's config instead
        (["--ground", "--model", str(ROOT / "examples")], "has no config.json"),
        (["--ground", '{"bbox_2d": [1, 2', "--image", IMAGE], "only 0 are in valid JSON"),
        (["--chat", "--question", "hi"], "--chat reads its questions from stdin"),
        (["--image", IMAGE], "--image and --video need --question"),
        (["--question", "hi"], "--question needs --image or --video"),
        (["--image", IMAGE, "--question", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        demo.main([*argv, "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.png")
