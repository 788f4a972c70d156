"""A chat page for a qwenvl model, served by Gradio on this machine only and working offline.

    python -c "import web_demo; web_demo.serve()"            # the embedded model (the repo root), port 7860
    python -c "import web_demo; web_demo.serve('/path/to/a/qwenvl/model', port=8000)"

Upload one or more pictures or a clip, ask, and the answer streams in; later questions keep the conversation's
earlier pictures. Stop ends the answer being written, Clear starts over, "Sampling" sets temperature (0: greedy,
the default), top-p and the longest answer. When an answer holds boxes or points (Qwen2.5-VL's JSON or Qwen2-VL's
<|box_start|> markup, by the model's family), the last picture is shown with them drawn.

Offline: the server listens on a loopback address only (127.0.0.1 by default; any other host is refused), with no
share link, no analytics, no version check, no server-side rendering and no MCP server; the theme uses the system's
fonts, so the page loads nothing but what this server sends. The model is read from a local directory only.

One answer is written at a time: requests from other pages wait in Gradio's queue (concurrency 1) and never mix.
A file that cannot be read (a text file named .png, an empty clip) is refused with a message in the page; nothing
is sent and the conversation goes on.

`build_app(...)` returns the gr.Blocks (call `app.launch(**launch_options(port))`); `Engine` is the model side
(streaming, stop, grounding) and needs no Gradio.
"""

import ipaddress
import mimetypes
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import demo  # noqa: E402  (puts examples/ on sys.path)
import synthetic_tasks as tasks  # noqa: E402
from grounding_qwenvl import draw_boxes, ground  # noqa: E402
from image_processing_qwenvl import load_image, load_video  # noqa: E402

# Set before Gradio and huggingface_hub are imported: nothing phones home.
OFFLINE_ENVIRONMENT = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GRADIO_SSR_MODE": "False",
    "DO_NOT_TRACK": "1",
}
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace"]
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v", ".mpg", ".mpeg", ".ogv", ".3gp")
DEFAULT_MAX_NEW_TOKENS = 128
GENERATE_LOCK = threading.Lock()  # one generate at a time, even if a cancelled one is still finishing
# No footer links, and no share-to-Hugging-Face button on the pictures in the conversation (it would upload them).
CSS = '#chat { flex-grow: 1; } footer { display: none !important; } #chat button[aria-label="Share"] { display: none; }'



def offline_environment():
    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ[key] = value


def media_kind(path):
    """"video" for clip files (by name), else "image"."""
    guessed = mimetypes.guess_type(path)[0] or ""
    return "video" if guessed.startswith("video/") or path.lower().endswith(VIDEO_SUFFIXES) else "image"


# ---- the model side -----------------------------------------------------------------------------------------------


@dataclass
class Settings:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def generate_kwargs(self):
        kwargs = {"max_new_tokens": max(1, int(self.max_new_tokens))}
        if self.temperature and self.temperature > 0:
            kwargs.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p))
        else:
            kwargs["do_sample"] = False
        return kwargs


@dataclass
class Reply:
    """An answer as it is written: `text` grows while streaming; when done, `raw` is the answer with special
    tokens (Qwen2-VL's grounding markers) and `stopped` tells whether Stop ended it."""

    text: str = ""
    raw: str = ""
    done: bool = False
    stopped: bool = False
    image_grid_thw: object = None


@dataclass
class Grounding:
    picture: object  # PIL image with the objects drawn
    objects: list = field(default_factory=list)

    def caption(self):
        parts = []
        for item in self.objects:
            where = "box (%d, %d, %d, %d)" % tuple(round(v) for v in item.box) if item.box else (
                "point (%d, %d)" % tuple(round(v) for v in item.point))
            parts.append(f"{item.label or 'object'}: {where}")
        return "Drawn on the last picture (pixels of the original): " + "; ".join(parts)


class Engine:
    """A qwenvl model and processor: answers a conversation, streaming, stoppable; reads grounding answers.

    Each picture and clip frame is bounded as the embedded model was trained (`training_size`:
    synthetic_tasks.media_item, 168 x 168), or to `max_pixels`, or else by the processor's own bounds."""

    def __init__(self, model, processor, training_size=False, max_pixels=None, name="model"):
        self.model, self.processor, self.name = model, processor, name
        self.training_size, self.max_pixels = training_size, max_pixels
        self.family = getattr(model.config, "family", "qwen2_5_vl")
        self.patch_size = getattr(processor.image_processor, "patch_size", 14)

    @classmethod
    def load(cls, model_dir=ROOT, max_pixels=None):
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(f"{model_dir} is not a model directory (no config.json): the web demo loads local "
                             "models only")
        offline_environment()
        pipe = demo.load_pipeline(model_dir)
        embedded = os.path.realpath(model_dir) == os.path.realpath(ROOT)
        name = os.path.basename(os.path.normpath(model_dir)) or model_dir
        return cls(pipe.model, pipe.processor, training_size=embedded and not max_pixels, max_pixels=max_pixels,
                   name="embedded model" if embedded else name)

    def media_item(self, kind, path):
        """The chat item for a picture or clip at `path`."""
        if self.training_size:
            return tasks.media_item(kind, path)
        if self.max_pixels:
            return {"type": kind, kind: path, "min_pixels": 28 * 28, "max_pixels": int(self.max_pixels)}
        return {"type": kind, kind: path}

    def check(self, item):
        """Raise ValueError with a short reason when the item's file cannot be read as its kind."""
        kind = item["type"]
        path = item[kind]
        if not os.path.isfile(path):
            raise ValueError("the file is missing")
        if os.path.getsize(path) == 0:
            raise ValueError("the file is empty (0 bytes)")
        try:
            if kind == "image":
                load_image(path)
            else:
                bounds = {k: item[k] for k in ("min_pixels", "max_pixels") if k in item}
                load_video(path, **bounds)
        except Exception as error:  # PIL, PyAV and numpy raise many kinds; all mean "unreadable"
            reason = str(error).replace(path, os.path.basename(path)) or type(error).__name__
            raise ValueError(reason) from error

    def stream(self, messages, settings=None, stop=None):
        """Answer `messages` (chat messages with picture / clip items), yielding the growing Reply after each
        piece; the last one has `done` set. Setting the `stop` event ends the answer at the next token."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        settings = settings or Settings()
        stop = stop or threading.Event()
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        reply = Reply(image_grid_thw=inputs.get("image_grid_thw"))
        tokenizer = self.processor.tokenizer
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        outcome = {}

        class StopFlag(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        def work():
            try:
                with GENERATE_LOCK, torch.no_grad():
                    if stop.is_set():  # stopped while waiting for its turn
                        outcome["tokens"] = inputs["input_ids"][:, :0]
                        streamer.end()
                        return
                    tokens = self.model.generate(
                        **inputs, **settings.generate_kwargs(), streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([StopFlag()]),
                    )
                outcome["tokens"] = tokens[:, inputs["input_ids"].shape[1]:]
            except BaseException as error:  # handed to the caller's thread below
                outcome["error"] = error
                streamer.end()

        thread = threading.Thread(target=work, name="qwenvl-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    reply.text += piece
                    yield reply
            thread.join()
        finally:
            if thread.is_alive():  # the caller went away (closed page, cancel): end the generation
                stop.set()
        if "error" in outcome:
            raise outcome["error"]
        new_tokens = outcome["tokens"][0]
        reply.text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        reply.raw = tokenizer.decode(new_tokens, skip_special_tokens=False)
        reply.stopped = stop.is_set()
        reply.done = True
        yield reply

    def grounding(self, reply, messages):
        """The last picture of the conversation with the answer's boxes and points drawn, or None when the answer
        has none. ValueError when the answer has grounding that cannot be read."""
        images = [item for message in messages if isinstance(message.get("content"), list)
                  for item in message["content"] if isinstance(item, dict) and item.get("type") == "image"]
        grid = reply.image_grid_thw
        if not images or grid is None or len(grid) != len(images):
            return None
        picture = load_image(images[-1]["image"])
        objects = ground(reply.raw or reply.text, self.family, picture.size, image_grid_thw=grid[-1],
                         patch_size=self.patch_size)
        return Grounding(draw_boxes(picture, objects), objects) if objects else None


# ---- the page -----------------------------------------------------------------------------------------------------


class SessionControl:
    """Per page: the stop flag of its answer, and a counter that Clear bumps so a finishing answer is dropped."""

    def __init__(self):
        self.stop = threading.Event()
        self.epoch = 0


def _session(request):
    return getattr(request, "session_hash", None) or "no session"


def _file_path(entry):
    return entry if isinstance(entry, str) else (entry.get("path") if isinstance(entry, dict) else str(entry))


def _bubble(role, content):
    return {"role": role, "content": content}


class ChatUI:
    """The page's handlers; `build_app` wires them to the components. Values: `chat` is the Chatbot's list of
    messages (what the page shows), `conv` the model's messages (pictures included), `pending` the items sent
    without a question (they join the next one), `turn` True when a question waits for its answer."""

    def __init__(self, engine):
        import gradio as gr

        self.gr, self.engine = gr, engine
        self.controls = {}

    def control(self, request):
        return self.controls.setdefault(_session(request), SessionControl())

    def accept(self, message, chat, conv, pending, request=None):
        """A submitted message: check its files, show it and queue it for an answer (or refuse it)."""
        gr = self.gr
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [_file_path(entry) for entry in message.get("files") or []]
        chat, conv, pending = list(chat or []), list(conv or []), list(pending or [])
        items, good, problems = [], [], []
        for path in files:
            kind = media_kind(path)
            item = self.engine.media_item(kind, path)
            try:
                self.engine.check(item)
            except ValueError as error:
                problems.append(f"“{os.path.basename(path)}” is not a {'clip' if kind == 'video' else 'picture'} "
                                f"that can be read: {error}")
            else:
                items.append(item)
                good.append(path)
        if problems:
            note = "; ".join(problems) + ". Nothing was sent: remove that file and try again."
            gr.Warning(note)
            chat.append(_bubble("assistant", "**Upload refused.** " + note))
            return {"text": text, "files": good}, chat, conv, pending, None
        if not text and not items:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), None
        chat += [_bubble("user", self.media_bubble(path)) for path in good]
        if not text:  # pictures without a question: they go with the next one
            chat.append(_bubble("assistant", "(Got it: ask a question about it.)"))
            return self.gr.MultimodalTextbox(value=None), chat, conv, pending + items, None
        self.control(request).stop.clear()
        conv.append({"role": "user", "content": [*pending, *items, {"type": "text", "text": text}]})
        chat.append(_bubble("user", text))
        return gr.MultimodalTextbox(value=None, interactive=False), chat, conv, [], True

    def media_bubble(self, path):
        """A picture or clip as the page shows it in the conversation (no share-to-Hub button: offline)."""
        if media_kind(path) == "video":
            return self.gr.Video(value=path, buttons=["download"], label=os.path.basename(path))
        return self.gr.Image(value=path, buttons=["fullscreen"], label=os.path.basename(path))

    def respond(self, chat, conv, turn, temperature, top_p, max_new_tokens, request=None):
        """Stream the answer to the last question into the page; on success it joins the conversation."""
        gr = self.gr
        if not turn or not conv or conv[-1]["role"] != "user":
            yield gr.skip(), gr.skip(), gr.skip(), None
            return
        control = self.control(request)
        epoch = control.epoch
        chat = list(chat or []) + [_bubble("assistant", "…")]
        settings = Settings(temperature or 0.0, top_p if top_p is not None else 1.0,
                            max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
        reply = Reply()
        try:
            for reply in self.engine.stream(conv, settings, control.stop):
                if control.epoch != epoch:  # cleared meanwhile
                    control.stop.set()
                    return
                if not reply.done:
                    chat[-1] = _bubble("assistant", reply.text)
                    yield list(chat), gr.skip(), gr.skip(), gr.skip()
        except Exception as error:  # an unreadable file, a bad setting, ...: drop this question, keep the page
            traceback.print_exc()
            note = f"Could not answer: {error}. That question was dropped; the conversation goes on."
            gr.Warning(note)
            chat[-1] = _bubble("assistant", "**Error.** " + note)
            yield chat, conv[:-1], gr.MultimodalTextbox(interactive=True), None
            return
        if control.epoch != epoch:
            return
        answer = reply.text
        chat[-1] = _bubble("assistant", (answer or "") + (" *(stopped)*" if reply.stopped else "") or "(no answer)")
        conv = conv + [{"role": "assistant", "content": answer}]
        try:
            drawn = self.engine.grounding(reply, conv)
        except (ValueError, TypeError) as error:
            chat.append(_bubble("assistant", f"(The answer has boxes or points that could not be read: {error})"))
        else:
            if drawn is not None:
                chat.append(_bubble("assistant", gr.Image(value=drawn.picture, label="Boxes and points", type="pil",
                                                          buttons=["download", "fullscreen"])))
                chat.append(_bubble("assistant", drawn.caption()))
        yield chat, conv, gr.MultimodalTextbox(interactive=True), None

    def stop(self, request=None):
        self.control(request).stop.set()

    def clear(self, request=None):
        control = self.control(request)
        control.epoch += 1
        control.stop.set()
        return [], [], [], None, self.gr.MultimodalTextbox(value=None, interactive=True)

    def forget(self, request=None):
        control = self.controls.pop(_session(request), None)
        if control is not None:
            control.stop.set()


def theme():
    import gradio as gr

    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def build_app(model_dir=ROOT, engine=None, max_pixels=None, title="qwenvl chat"):
    """The chat page as a gr.Blocks (not launched). `engine` replaces the model of `model_dir` (tests)."""
    offline_environment()
    import gradio as gr

    engine = engine or Engine.load(model_dir, max_pixels=max_pixels)
    ui = ChatUI(engine)
    with gr.Blocks(title=title, analytics_enabled=False, fill_height=True) as app:
        gr.Markdown(
            f"### {title}\nModel: `{engine.name}` ({engine.family}). Attach pictures or a clip with the clip button, "
            "ask, press Enter. Later questions keep the earlier pictures."
        )
        chatbot = gr.Chatbot(
            label="Conversation", elem_id="chat", height=640, feedback_options=None, buttons=["copy"],
            allow_file_downloads=False, group_consecutive_messages=False,
            placeholder="Upload a picture or clip and ask about it.",
        )
        box = gr.MultimodalTextbox(
            elem_id="ask", file_types=["image", "video"], file_count="multiple", sources=["upload"],
            placeholder="Ask about your pictures…", show_label=False, autofocus=True,
        )
        with gr.Row():
            stop_button = gr.Button("Stop", elem_id="stop", variant="stop", size="sm")
            clear_button = gr.Button("Clear", elem_id="clear", size="sm")
        with gr.Accordion("Sampling", open=False):
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (when sampling)")
            max_new_tokens = gr.Slider(1, 1024, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens")
        if engine.training_size:
            _examples(gr, box)
        conv, pending, turn = gr.State([]), gr.State([]), gr.State(None)

        # Gradio hands a handler its page's gr.Request only when the parameter is annotated so.
        def accept(message, chat, conversation, waiting, request: gr.Request):
            return ui.accept(message, chat, conversation, waiting, request)

        def respond(chat, conversation, question, temperature, top_p, max_new_tokens, request: gr.Request):
            yield from ui.respond(chat, conversation, question, temperature, top_p, max_new_tokens, request)

        def stop(request: gr.Request):
            ui.stop(request)

        def clear(request: gr.Request):
            return ui.clear(request)

        def forget(request: gr.Request):
            ui.forget(request)

        accepted = box.submit(accept, [box, chatbot, conv, pending], [box, chatbot, conv, pending, turn],
                              concurrency_limit=None)
        answered = accepted.then(
            respond, [chatbot, conv, turn, temperature, top_p, max_new_tokens], [chatbot, conv, box, turn],
            concurrency_id="model", concurrency_limit=1, show_progress_on=[chatbot],
        )
        stop_button.click(stop, None, None, queue=False)
        clear_button.click(clear, None, [chatbot, conv, pending, turn, box], queue=False, cancels=[answered])
        chatbot.clear(clear, None, [chatbot, conv, pending, turn, box], queue=False, cancels=[answered])
        app.unload(forget)
    app.queue(default_concurrency_limit=1)
    app.qwenvl_ui = ui
    return app


def _examples(gr, box):
    import json

    with open(demo.EXAMPLES) as f:
        examples = json.load(f)
    gr.Examples(
        [[{"text": e["question"], "files": [os.path.join(ROOT, "examples", e["file"])]}] for e in examples],
        inputs=[box], label="Examples", examples_per_page=5,
    )


def check_host(host):
    name = "127.0.0.1" if host == "localhost" else host
    try:
        loopback = ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"host {host!r} is not a loopback address: the web demo serves this machine only (127.0.0.1)")
    return host


def launch_options(port=7860, host="127.0.0.1", block=True):
    """app.launch() keywords for an offline, local-only server."""
    return dict(
        server_name=check_host(host), server_port=int(port), share=False, inbrowser=False, show_error=True,
        prevent_thread_lock=not block, ssr_mode=False, mcp_server=False, pwa=False, enable_monitoring=False,
        footer_links=[], max_file_size="200mb", theme=theme(), css=CSS,
    )


def serve(model_dir=ROOT, port=7860, host="127.0.0.1", max_pixels=None, block=True):
    """Serve the chat page for the model in `model_dir` at http://host:port (loopback only). With block=False it
    returns the running gr.Blocks (stop it with app.close())."""
    check_host(host)
    app = build_app(model_dir, max_pixels=max_pixels)
    app.launch(**launch_options(port, host, block))
    return app


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Serve the qwenvl chat page on this machine (offline).")
    parser.add_argument("--model", default=ROOT, help="a qwenvl model directory (default: the embedded model)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--max-pixels", type=int, help="bound on each picture's pixels (default: the processor's; "
                        "the embedded model: its training size)")
    args = parser.parse_args()
    serve(args.model, args.port, args.host, args.max_pixels)
