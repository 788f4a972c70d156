"""The chat web page (web_demo.py).

Without a browser: the model side (streaming, stop, file checks, grounding drawn on the picture) on the embedded
model, and the page's handlers (refused uploads, grounding shown in the conversation) where Gradio is installed.

In a browser (needs gradio, playwright and Debian's /usr/bin/chromium; skipped otherwise): the server runs in a
subprocess on a free port of 127.0.0.1 with every outside connection of its process refused and logged
(tests/web_guard.py); headless Chromium uploads examples/color.png, asks, reads the streamed answers of a
multi-turn conversation, uploads a bad picture and an empty clip, sees them refused, goes on chatting, sees boxes
drawn, stops a long answer while a second page's question waits in the queue, clears, and records every request
the pages make: all must go to 127.0.0.1. Screenshots go to the test's tmp_path, and with
QWENVL_SAVE_SCREENSHOT=1 one of the conversation also to docs/web_screenshot.png.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest

import demo
import web_demo
import web_guard

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
COLOR = str(ROOT / "examples" / "color.png")
SHAPE = str(ROOT / "examples" / "shape.png")
MOTION = str(ROOT / "examples" / "motion.mp4")
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
LOCAL_SCHEMES = {"data", "blob", "about", "chrome", "chrome-extension", "devtools"}
SERVER_START_S = 120
ANSWER_S = 60
ANSWERS = set(web_demo.tasks.all_answers())


# ---- the model side, no Gradio --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    return web_demo.Engine.load()


def user_turn(engine, text, *media):
    items = [engine.media_item(web_demo.media_kind(path), path) for path in media]
    return {"role": "user", "content": [*items, {"type": "text", "text": text}]}


def test_engine_streams_and_keeps_pictures_across_turns(engine):
    conversation = [user_turn(engine, "What color is the triangle?", COLOR)]
    replies = [(reply.text, reply.done) for reply in engine.stream(conversation)]
    assert replies[-1] == ("yellow", True)
    assert all(not done for _, done in replies[:-1]) and len(replies) >= 2  # pieces came before the end
    conversation += [{"role": "assistant", "content": "yellow"}, user_turn(engine, "How many shapes are there?")]
    follow_up = list(engine.stream(conversation))[-1]
    assert follow_up.image_grid_thw.tolist() == [[1, 12, 12]]  # the first turn's picture is still seen, at 168 x 168
    assert follow_up.text in ANSWERS  # the model is trained on single questions: any of its answers will do


def test_engine_answers_about_a_clip(engine):
    reply = list(engine.stream([user_turn(engine, "In which direction is the ball moving?", MOTION)]))[-1]
    assert reply.text == "left" and reply.image_grid_thw is None


def test_engine_stop_ends_the_answer(engine):
    stop = threading.Event()
    stop.set()
    reply = list(engine.stream([user_turn(engine, "What color is the triangle?", COLOR)], stop=stop))[-1]
    assert reply.done and reply.stopped and reply.text == ""


def test_engine_sampling_settings(engine):
    settings = web_demo.Settings(temperature=0.7, top_p=0.9, max_new_tokens=3)
    assert settings.generate_kwargs() == {"max_new_tokens": 3, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    greedy = {"max_new_tokens": web_demo.DEFAULT_MAX_NEW_TOKENS, "do_sample": False}
    assert web_demo.Settings().generate_kwargs() == greedy
    reply = list(engine.stream([user_turn(engine, "What color is the triangle?", COLOR)], settings))[-1]
    assert reply.done and len(engine.processor.tokenizer(reply.raw)["input_ids"]) <= 3


def test_engine_check_refuses_unreadable_files(engine, tmp_path):
    text_as_png = tmp_path / "notes.png"
    text_as_png.write_text("not a picture\n")
    empty_clip = tmp_path / "empty.mp4"
    empty_clip.write_bytes(b"")
    for path in (COLOR, MOTION):
        engine.check(engine.media_item(web_demo.media_kind(path), path))
    with pytest.raises(ValueError, match="notes.png"):
        engine.check(engine.media_item("image", str(text_as_png)))
    with pytest.raises(ValueError, match="empty"):
        engine.check(engine.media_item(web_demo.media_kind(str(empty_clip)), str(empty_clip)))


def grounding_reply(engine, answer):
    """A reply as the engine gives it for `answer` about examples/shape.png, with the real image grid."""
    conversation = [user_turn(engine, "Locate every shape.", SHAPE)]
    inputs = engine.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt")
    reply = web_demo.Reply(text=answer, raw=answer, done=True, image_grid_thw=inputs["image_grid_thw"])
    return reply, conversation + [{"role": "assistant", "content": answer}]


def test_engine_draws_grounding_on_the_last_picture(engine):
    from PIL import Image

    reply, conversation = grounding_reply(engine, demo.GROUNDING_EXAMPLES[engine.family])
    drawn = engine.grounding(reply, conversation)
    assert [item.label for item in drawn.objects] == ["red triangle", "yellow square", "blue circle"]
    assert drawn.picture.size == Image.open(SHAPE).size
    assert drawn.picture.tobytes() != Image.open(SHAPE).convert("RGB").tobytes()
    assert "red triangle: box (66, 11, 108, 53)" in drawn.caption()
    plain, conversation = grounding_reply(engine, "yellow")
    assert engine.grounding(plain, conversation) is None


def test_only_loopback_hosts():
    assert web_demo.check_host("127.0.0.1") and web_demo.check_host("localhost") and web_demo.check_host("::1")
    for host in ("0.0.0.0", "192.168.1.2", "example.org"):
        with pytest.raises(ValueError, match="loopback"):
            web_demo.check_host(host)


# ---- the page's handlers, no browser --------------------------------------------------------------------------------


@pytest.fixture
def ui(engine):
    pytest.importorskip("gradio")
    return web_demo.ChatUI(engine)


def test_handlers_refuse_a_bad_upload_and_keep_the_conversation(ui, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    request = SimpleNamespace(session_hash="s")
    chat = [{"role": "user", "content": "earlier"}]
    conversation = [{"role": "user", "content": [{"type": "text", "text": "earlier"}]}]
    box, chat2, conversation2, pending, turn = ui.accept(
        {"text": "What color?", "files": [str(bad), COLOR]}, chat, conversation, [], request)
    assert turn is None and conversation2 == conversation and pending == []
    assert box == {"text": "What color?", "files": [COLOR]}  # the question and the good file stay in the box
    assert "bad.png" in chat2[-1]["content"] and "Upload refused" in chat2[-1]["content"]


def test_handlers_stream_and_show_grounding(ui, engine, monkeypatch):
    reply, _ = grounding_reply(engine, demo.GROUNDING_EXAMPLES[engine.family])
    monkeypatch.setattr(engine, "stream", lambda conversation, settings, stop: iter(
        [web_demo.Reply(text="```json"), reply]))
    request = SimpleNamespace(session_hash="g")
    _, chat, conversation, _, turn = ui.accept({"text": "Locate every shape.", "files": [SHAPE]}, [], [], [], request)
    assert turn is True and conversation[-1]["content"][0]["image"] == SHAPE
    updates = list(ui.respond(chat, conversation, turn, 0.0, 1.0, 64, request))
    assert updates[0][0][-1]["content"] == "```json"  # streamed
    final_chat, final_conversation = updates[-1][0], updates[-1][1]
    assert final_conversation[-1] == {"role": "assistant", "content": reply.text}
    pictures = [m["content"] for m in final_chat if type(m["content"]).__name__ == "Image"]
    assert len(pictures) == 2  # the upload, and the picture with the boxes drawn
    assert "red triangle" in final_chat[-1]["content"]


def test_handlers_stop_and_clear(ui):
    request = SimpleNamespace(session_hash="st")
    _, chat, conversation, _, turn = ui.accept({"text": "What color is the triangle?", "files": [COLOR]}, [], [], [],
                                               request)
    ui.stop(request)  # pressed before the answer started: it ends at once
    final = list(ui.respond(chat, conversation, turn, 0.0, 1.0, 32, request))[-1]
    assert "stopped" in final[0][-1]["content"] and final[1][-1] == {"role": "assistant", "content": ""}
    _, chat, conversation, _, turn = ui.accept({"text": "What color is the triangle?"}, final[0], final[1], [], request)
    final = list(ui.respond(chat, conversation, turn, 0.0, 1.0, 32, request))[-1]  # a new question clears the stop
    assert final[0][-1]["content"] in ANSWERS and len(final[1]) == 4
    assert ui.clear(request)[:4] == ([], [], [], None)


# ---- in a browser ---------------------------------------------------------------------------------------------------


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url, server, log_path):
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited ({server.returncode}):\n{Path(log_path).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the server did not answer within {SERVER_START_S} s:\n{Path(log_path).read_text()[-3000:]}")


def browser_missing():
    """Why the browser test cannot run here, or None."""
    for module in ("gradio", "playwright"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None if os.path.exists(CHROMIUM) else f"no {CHROMIUM} (apt-get install chromium)"


@pytest.fixture(scope="module", autouse=True)
def server_process(request, tmp_path_factory):
    """Starts the server at the beginning of the module when the browser test is to run, so that it loads while
    the tests above run; stops it, by its process id, at the end."""
    if browser_missing() or not any(item.name == "test_chat_in_the_browser" for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    outside_log = folder / "outside_connections.log"
    log_path = folder / "server.log"
    code = (f"import web_guard; web_guard.install({str(outside_log)!r}); web_guard.install_test_answers(); "
            f"import web_demo; web_demo.serve(port={port})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        yield SimpleNamespace(process=process, url=f"http://127.0.0.1:{port}/", outside_log=outside_log,
                              log_path=log_path, started=time.monotonic())
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture
def server(server_process):
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    assert server_process is not None
    wait_until_up(server_process.url, server_process.process, server_process.log_path)
    print(f"server up {time.monotonic() - server_process.started:.1f} s after its start")
    return server_process


def bot_texts(page):
    return page.locator('#chat [data-testid="bot"]').all_inner_texts()


def submit(page, question, files=()):
    """Attach `files` and ask; returns how many answers the page showed before."""
    before = len(bot_texts(page))
    if files:
        page.locator("#ask input[type=file]").set_input_files(list(files))
        page.wait_for_function("n => document.querySelectorAll('#ask .thumbnail-item').length >= n", arg=len(files),
                               timeout=ANSWER_S * 1000)
    box = page.locator("#ask textarea")
    box.fill(question)
    box.press("Enter")
    return before


def ask(page, question, files=()):
    """Attach `files`, ask, and return the page's next answer once it is complete (the box is usable again)."""
    return wait_for_answers(page, submit(page, question, files))


def wait_for_answers(page, before):
    page.wait_for_function(
        """n => {
            const answers = document.querySelectorAll('#chat [data-testid="bot"]');
            const box = document.querySelector('#ask textarea');
            return answers.length > n && box && !box.disabled
                && answers[answers.length - 1].innerText.trim() !== '…';
        }""",
        arg=before, timeout=ANSWER_S * 1000,
    )
    return bot_texts(page)[before:]


def test_chat_in_the_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    requests = []
    started = time.monotonic()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS,
            viewport={"width": 1100, "height": 1000},
        )
        try:
            context.on("request", lambda request: requests.append(request.url))
            page = context.new_page()
            page.on("websocket", lambda socket_: requests.append(socket_.url))
            page.goto(server.url)
            page.wait_for_selector("#ask textarea", timeout=ANSWER_S * 1000)

            assert [text.strip() for text in ask(page, "What color is the triangle?", [COLOR])] == ["yellow"]
            # No new picture: the first one is still part of the conversation (the model, trained on single
            # questions, is not always right on later turns; any of its answers shows the turn worked).
            follow_up = ask(page, "How many shapes are there?")
            assert len(follow_up) == 1 and follow_up[0].strip() in ANSWERS
            page.screenshot(path=str(tmp_path / "conversation.png"))
            if os.environ.get("QWENVL_SAVE_SCREENSHOT") == "1":
                page.screenshot(path=str(ROOT / "docs" / "web_screenshot.png"))

            bad = tmp_path / "holiday.png"
            bad.write_text("this is a text file, not a picture\n")
            refused = ask(page, "What is in this picture?", [str(bad)])
            assert len(refused) == 1 and "Upload refused" in refused[0] and "holiday.png" in refused[0]
            empty = tmp_path / "empty.mp4"
            empty.write_bytes(b"")
            refused = ask(page, "Which way did the ball move?", [str(empty)])
            assert len(refused) == 1 and "empty" in refused[0] and "empty.mp4" in refused[0]
            page.screenshot(path=str(tmp_path / "refused.png"))

            # The server still serves and the conversation goes on, pictures kept.
            answer = ask(page, "What color is the square?")
            assert len(answer) == 1 and answer[0].strip() in ANSWERS
            page.screenshot(path=str(tmp_path / "after_refusal.png"))

            # Boxes and points in an answer are drawn on the picture (the answer is demo.py's grounding example:
            # see web_guard.install_test_answers).
            grounded = ask(page, "Locate every shape " + web_guard.GROUNDING_MARK, [SHAPE])
            assert len(grounded) == 3 and "bbox_2d" in grounded[0]
            assert "red triangle: box (66, 11, 108, 53)" in grounded[2]
            drawn = page.locator('#chat [data-testid="bot"]').nth(-2).locator("img")
            assert drawn.evaluate("img => img.complete && img.naturalWidth") == 168
            page.screenshot(path=str(tmp_path / "grounding.png"))

            # Stop, and the queue: a long answer (see web_guard.install_test_answers) streams in on this page; a
            # question from a second page waits in the queue until Stop ends it, and is then answered on its own.
            other = context.new_page()
            other.goto(server.url)
            other.wait_for_selector("#ask textarea", timeout=ANSWER_S * 1000)
            before = submit(page, "Tell me everything " + web_guard.LONG_ANSWER_MARK)
            page.wait_for_function(
                """n => {
                    const answers = document.querySelectorAll('#chat [data-testid="bot"]');
                    return answers.length > n && answers[answers.length - 1].innerText.trim().length > 3;
                }""", arg=before, timeout=ANSWER_S * 1000)
            other_before = submit(other, "What color is the triangle?", [COLOR])
            other.wait_for_timeout(1000)
            assert page.locator("#ask textarea").is_disabled()  # still writing: a partial answer is shown
            assert "yellow" not in " ".join(bot_texts(other)[other_before:])  # queued behind it
            other.screenshot(path=str(tmp_path / "queued.png"))
            page.locator("#stop").click()
            stopped = wait_for_answers(page, before)
            assert len(stopped) == 1 and stopped[0].strip().endswith("(stopped)")
            assert [text.strip() for text in wait_for_answers(other, other_before)] == ["yellow"]
            other.close()
            page.screenshot(path=str(tmp_path / "stopped.png"))

            page.locator("#clear").click()
            page.wait_for_function(
                """() => !document.querySelector('#chat [data-testid="bot"], #chat [data-testid="user"]')""",
                timeout=ANSWER_S * 1000)
            assert [text.strip() for text in ask(page, "What color is the triangle?", [COLOR])] == ["yellow"]
        finally:
            context.close()

    print(f"browser session {time.monotonic() - started:.1f} s, {len(requests)} requests")
    outside = sorted({url for url in requests if urlparse(url).scheme not in LOCAL_SCHEMES
                      and urlparse(url).hostname != "127.0.0.1"})
    assert requests and not outside, f"the page reached outside 127.0.0.1: {outside}"
    logged = server.outside_log.read_text() if server.outside_log.exists() else ""
    assert not logged, f"the server tried to reach other hosts:\n{logged}"
