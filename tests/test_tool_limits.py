"""The tools around the model at their limits: the grounding parser on pathological answers (linear work, no
RecursionError), demo.py --chat through bad turns, demo.py --eval counts, finetune.py's --output-dir over its own
model, and convert_checkpoint.py on configs that disagree with their weights and on failures part way.

No wall-clock speed targets here (they live in benchmarks/): the parser's work is counted, and a generous time guard
only keeps a regression to quadratic work from hanging the run."""

import contextlib
import errno
import io
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from safetensors.torch import save_file

import convert_checkpoint
import demo
import grounding_qwenvl
from grounding_qwenvl import parse_qwen2, parse_qwen25
from processing_qwenvl import QwenVLProcessor
from test_convert import hub_layout
from test_demo_interactive import model_dir as chat_model_dir  # noqa: F401 (a fixture)
from test_portable import tiny_model
from tiny import TEXT, TOKEN_IDS, VISION_25, reference_model

ROOT = Path(__file__).resolve().parent.parent
IMAGE = str(ROOT / "examples" / "shape.png")
sys.path.insert(0, str(ROOT / "examples"))
import finetune  # noqa: E402

KB, MB = 100_000, 1_000_000
GUARD_SECONDS = 120  # far above the few seconds a linear parse of 1 MB takes; the quadratic one took minutes


@contextlib.contextmanager
def time_guard(seconds=GUARD_SECONDS):
    """Fail instead of hanging when the work inside takes far longer than it can when linear."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s: the work is no longer linear in the input")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- grounding: pathological answers -----------------------------------------------------------------------------

# Answers that mention grounding and are full of brackets that start no complete JSON value: each bracket made
# json's decoder read on and count the lines before it (open_braces: 4 s for 100 KB, minutes for 1 MB), or recurse
# until RecursionError (open_brackets).
PATHOLOGICAL_JSON = {
    "failing_brackets": lambda size: '"bbox_2d" ' + "[x " * (size // 3),
    "open_braces": lambda size: '"bbox_2d" ' + "{" * size,
    "open_brackets": lambda size: '"bbox_2d" ' + "[" * size,
    "unclosed_string": lambda size: '"bbox_2d" ["' + "[1," * (size // 3),
}


class CountingTokens:
    """Stands in for grounding_qwenvl.JSON_TOKEN and counts the tokens read."""

    def __init__(self, pattern):
        self.pattern, self.calls = pattern, 0

    def match(self, text, position):
        self.calls += 1
        return self.pattern.match(text, position)


class CountingDecoder:
    """Stands in for grounding_qwenvl.JSON_DECODER and counts the characters it is asked to decode."""

    def __init__(self, decoder):
        self.decoder, self.characters = decoder, 0

    def raw_decode(self, text, start):
        value, end = self.decoder.raw_decode(text, start)
        self.characters += end - start
        return value, end


def parse_work(text, monkeypatch):
    """Tokens read plus characters decoded while parse_qwen25 reads `text` (whose grounding it cannot read)."""
    tokens = CountingTokens(grounding_qwenvl.JSON_TOKEN)
    decoder = CountingDecoder(grounding_qwenvl.JSON_DECODER)
    monkeypatch.setattr(grounding_qwenvl, "JSON_TOKEN", tokens)
    monkeypatch.setattr(grounding_qwenvl, "JSON_DECODER", decoder)
    with time_guard(), pytest.raises(ValueError):
        parse_qwen25(text)
    monkeypatch.undo()
    return tokens.calls + decoder.characters


@pytest.mark.parametrize("kind", sorted(PATHOLOGICAL_JSON))
def test_json_grounding_work_grows_linearly_with_the_answer(kind, monkeypatch):
    small = parse_work(PATHOLOGICAL_JSON[kind](KB), monkeypatch)
    large = parse_work(PATHOLOGICAL_JSON[kind](MB), monkeypatch)
    assert 0 < small <= 2 * KB
    assert large / small < 12, (small, large)  # 10 times the text: about 10 times the work, not 100


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + '{"bbox_2d": [1, 2, 3, 4]}' + "]" * 100_000,  # complete, deeper than json's decoder goes
        '"bbox_2d" ' + "[" * 100_000,  # never closed
        '{"a": ' * 50_000 + '{"bbox_2d": [1, 2, 3, 4]}' + "}" * 50_000,
    ],
    ids=["deep-complete", "deep-open", "deep-objects"],
)
def test_deeply_nested_json_is_a_value_error_not_a_recursion_error(text):
    with pytest.raises(ValueError, match="nested too deeply|only 0 are in valid JSON"):
        parse_qwen25(text)


def test_json_extents_agree_with_json_at_every_bracket():
    """The linear reader finds exactly the values json's decoder reads, on random soups of JSON pieces."""
    pieces = ['[', ']', '{', '}', ',', ':', '"', '"bbox_2d"', '"a"', '1', '-2.5e3', '01', 'true', 'null', 'NaN',
              '-Infinity', ' ', '\n', '\\', '\\"', '\\u00e9', '\\u12', 'x', '\x01', '[1,2,3,4]', '.']
    generator = random.Random(0)
    decoder = json.JSONDecoder()
    for _ in range(3000):
        text = "".join(generator.choice(pieces) for _ in range(generator.randint(1, 25)))
        extents = grounding_qwenvl._JsonExtents(text)
        for bracket in re.finditer(r"[\[{]", text):
            try:
                expected = decoder.raw_decode(text, bracket.start())[1]
            except (json.JSONDecodeError, RecursionError):
                expected = None
            assert extents.end(bracket.start()) == expected, (text, bracket.start())


def test_unclosed_qwen2_markers_are_read_in_linear_time():
    """An object reference that never closes made the lazy regex read to the end again for each one (9 s for
    100 KB); now 1 MB of them is plain text, read once."""
    with time_guard():
        assert parse_qwen2("<|object_ref_start|>" * (MB // 20)) == []
        with pytest.raises(ValueError, match="must read"):
            parse_qwen2("<|box_start|>" * (MB // 26) + "<|box_end|>" * (MB // 26))


def test_qwen2_markup_matches_the_lazy_regex():
    lazy = re.compile(
        r"<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>|<\|box_start\|>(?P<box>.*?)<\|box_end\|>", re.S
    )
    pieces = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "(1,2),(3,4)", "a", ", "]
    generator = random.Random(0)
    for _ in range(3000):
        text = "".join(generator.choice(pieces) for _ in range(generator.randint(1, 12)))
        expected = [
            ("object_ref" if m.group("box") is None else "box", m.group("label") or m.group("box") or "", m.start(), m.end())
            for m in lazy.finditer(text)
        ]
        assert list(grounding_qwenvl._qwen2_markup(text)) == expected, text


# ---- demo.py --chat through bad turns ----------------------------------------------------------------------------


def png_claiming(width, height):
    """A PNG whose header claims width x height pixels: PIL refuses to open one over its decompression-bomb limit
    with DecompressionBombError, which is neither a ValueError nor an OSError."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "bomb.png").write_bytes(png_claiming(20_000, 20_000))
    (folder / "text.png").write_text("not a picture")
    (folder / "truncated.png").write_bytes(Path(IMAGE).read_bytes()[:200])
    (folder / "folder.png").mkdir()
    (folder / "text.mp4").write_text("not a clip")
    return folder




def bad_turns(folder):
    return [
        ["/image " + str(folder / "bomb.png"), "too many pixels?"],
        ["/image " + str(folder / "text.png"), "not a picture?"],
        ["/image " + str(folder / "truncated.png"), "cut short?"],
        ["/image " + str(folder / "folder.png"), "a folder?"],
        ["/image file:///no/such/picture.png", "nowhere?"],
        ["/image data:image/png;base64,AAAA", "garbage?"],
        ["/video " + str(folder / "text.mp4"), "not a clip?"],
    ]


def test_chat_survives_bad_turns_and_keeps_the_conversation(bad_files):
    """Every bad turn is dropped with its media; the next turn still sends the earlier turns and their picture."""
    model, processor = tiny_model(), QwenVLProcessor.from_pretrained(ROOT)
    seen = []

    def reply(messages):
        seen.append(messages)
        return demo.stream_reply(model, processor, messages, 3, out=io.StringIO())

    out = io.StringIO()
    session = demo.ChatSession(reply, out=out)
    for line in ["/image " + IMAGE, "What is red?"]:
        assert session.handle(line)
    kept = json.dumps(session.messages)
    for turn in bad_turns(bad_files):
        for line in turn:
            assert session.handle(line)
        assert json.dumps(session.messages) == kept and session.pending == [], turn
    assert out.getvalue().count("\nerror: ") == len(bad_turns(bad_files))
    assert session.handle("And what is blue?")
    last = seen[-1]
    assert [m["role"] for m in last] == ["user", "assistant", "user"]
    assert last[0]["content"][0]["image"] == IMAGE and last[2]["content"] == [{"type": "text", "text": "And what is blue?"}]


@pytest.mark.parametrize("error", [ValueError("bad value"), TypeError("bad type"), OSError(errno.EIO, "bad disk")])
def test_a_reply_that_fails_after_changing_its_input_leaves_the_conversation(error):
    def reply(messages):
        if len(messages) > 1:
            messages.clear()  # whatever the reply does to what it is given
            raise error
        return "first answer"

    out = io.StringIO()
    session = demo.ChatSession(reply, out=out)
    session.handle("hello")
    kept = json.dumps(session.messages)
    assert session.handle("/image " + IMAGE) and session.handle("again")
    assert json.dumps(session.messages) == kept and session.pending == []
    assert f"error: {error}" in out.getvalue()


def test_chat_on_stdin_survives_bad_pictures_and_bytes_that_are_not_text(chat_model_dir, bad_files):
    lines = ["/image " + IMAGE, "What is red?", *bad_turns(bad_files)[0], *bad_turns(bad_files)[1]]
    stdin = "\n".join(lines).encode() + b"\n\xff\xfe not text\nAnd what is blue?\n/quit\nnever read\n"
    done = subprocess.run(
        [sys.executable, str(ROOT / "demo.py"), "--model", str(chat_model_dir), "--chat", "--max-new-tokens", "3"],
        input=stdin, capture_output=True, cwd=ROOT, timeout=GUARD_SECONDS,
    )
    stdout = done.stdout.decode("utf-8", "replace")
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert stdout.count("\nerror: ") == 2 and "exceeds limit" in stdout and "cannot read image" in stdout
    assert stdout.count("model> ") == 5  # two answers, two failed turns, and the line that was not text
    assert "never read" not in stdout


# ---- demo.py --eval ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "count,message", [("-1", "--eval N needs N of at least 1"), ("0", "--eval N needs N of at least 1"),
                      ("1.5", "invalid int value"), ("many", "invalid int value")],
)
def test_eval_counts_below_one_are_refused(count, message, monkeypatch, capsys):
    monkeypatch.setattr(demo, "load_pipeline", lambda model: pytest.fail("--eval was accepted"))
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--eval", count])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---- finetune.py --output-dir ------------------------------------------------------------------------------------


@pytest.fixture
def model_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    return model


def finetune_argv(model, output, *extra):
    return ["--model", str(model), "--data", "train.jsonl", "--output-dir", str(output), *extra]


@pytest.mark.parametrize("how", ["same", "dot", "symlink", "hard-linked-weights", "processor"])
def test_output_dir_over_the_model_is_refused_before_training(how, model_files, tmp_path, monkeypatch, capsys):
    output, extra = model_files, []
    if how == "dot":
        output = f"{model_files}/."
    elif how == "symlink":
        output = tmp_path / "link"
        output.symlink_to(model_files, target_is_directory=True)
    elif how == "hard-linked-weights":  # as convert_checkpoint.py links them: saving would write into the source
        output = tmp_path / "converted"
        output.mkdir()
        os.link(model_files / "model.safetensors", output / "model.safetensors")
    elif how == "processor":
        output, extra = tmp_path / "processor", ["--processor", str(tmp_path / "processor")]
        output.mkdir()
    monkeypatch.setattr(finetune.QwenVLProcessor, "from_pretrained", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(finetune_argv(model_files, output, *extra))
    assert exit_info.value.code == 2
    assert re.search(r"--output-dir .* (is the --(model|processor) directory|the very files of --model)", capsys.readouterr().err)


def test_output_dirs_that_do_not_overwrite_the_model_are_accepted(model_files, tmp_path):
    for output in (tmp_path / "new", model_files / "finetuned", tmp_path):
        assert finetune.parse_args(finetune_argv(model_files, output)).output_dir == str(output)


# ---- convert_checkpoint.py ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_official(tmp_path_factory):
    """A Qwen2.5-VL checkpoint in the hub layout (`model.layers.N.`, `visual.blocks.N.`): 2 layers, 3 blocks."""
    directory = tmp_path_factory.mktemp("official") / "src"
    directory.mkdir()
    reference = reference_model("2.5")
    save_file(hub_layout(reference.state_dict(), tie=False), directory / "model.safetensors")
    config = dict(TEXT, **TOKEN_IDS, model_type="qwen2_5_vl", vision_config=dict(VISION_25), tie_word_embeddings=False)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def with_config(src, folder, **changes):
    """A copy of the checkpoint `src` in `folder` (weights hard-linked) with config.json changed."""
    folder.mkdir()
    os.link(src / "model.safetensors", folder / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        if key == "depth":
            config["vision_config"] = dict(config["vision_config"], depth=value)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_hidden_layers": 100_000}, "num_hidden_layers=100000 but the checkpoint holds 2 decoder layers"),
        ({"depth": 100_000}, "vision_config.depth=100000 but the checkpoint holds 3 vision blocks"),
        ({"num_hidden_layers": 1}, "num_hidden_layers=1 but the checkpoint holds 2 decoder layers"),
    ],
)
def test_layer_counts_that_disagree_with_the_weights_are_refused_before_building(
    small_official, tmp_path, monkeypatch, changes, message
):
    monkeypatch.setattr(convert_checkpoint, "QwenVLForConditionalGeneration", lambda config: pytest.fail("built"))
    broken = with_config(small_official, tmp_path / "broken", **changes)
    with pytest.raises(ValueError, match=message):
        convert_checkpoint.convert(broken, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_weights_of_another_shape_are_still_refused(small_official, tmp_path):
    broken = with_config(small_official, tmp_path / "broken", intermediate_size=96)
    with pytest.raises(ValueError, match=r"do not fit its config.json: .*with a wrong shape"):
        convert_checkpoint.convert(broken, tmp_path / "dst")


def fail_placing_weights(source, target, copy):
    raise OSError(errno.ENOSPC, "No space left on device", target)


@pytest.mark.parametrize("dst_exists", [False, True])
def test_a_failure_part_way_leaves_no_partial_destination(small_official, tmp_path, monkeypatch, dst_exists):
    dst = tmp_path / "out" / "converted"
    if dst_exists:
        dst.mkdir(parents=True)  # an empty destination is allowed, and stays empty
    monkeypatch.setattr(convert_checkpoint, "place_weights", fail_placing_weights)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint.convert(small_official, dst)
    assert os.listdir(dst.parent) == (["converted"] if dst_exists else [])
    assert not dst_exists or os.listdir(dst) == []


def test_command_line_reports_a_failure_part_way_without_a_traceback(small_official, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(convert_checkpoint, "place_weights", fail_placing_weights)
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.main(["--src", str(small_official), "--dst", str(tmp_path / "dst")])
    assert exit_info.value.code == 2 and "No space left on device" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_complete_conversion_is_renamed_into_place(small_official, tmp_path):
    dst = tmp_path / "converted"
    dst.mkdir()
    written = convert_checkpoint.convert(small_official, dst)
    assert sorted(os.listdir(dst)) == sorted(written) and os.listdir(tmp_path) == ["converted"]
    assert os.stat(dst / "model.safetensors").st_ino == os.stat(small_official / "model.safetensors").st_ino
