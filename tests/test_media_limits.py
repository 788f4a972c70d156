"""Resource limits of media loading (image_processing_qwenvl): memory, remote fetching, per-item bounds, errors.

A request names its media, so it must not be able to make the processor hang, flood the memory or ask for more
pixels than the processor was set up to give. Memory is measured in a child process, each load in a process forked
from it (tests/media_memory.py); servers are real, on 127.0.0.1, and stopped at the end of each test.

| case | limit | test |
|------|-------|------|
| 768-frame 1080p clip | peak RSS within 2.5 GB (before: 12.6 GB) | test_long_hd_clip_loads_within_a_small_multiple_of_its_output |
| video frames over PIL's picture limit | ValueError | test_video_frames_over_pils_picture_limit_are_refused |
| more frames than MAX_FRAMES | ValueError naming the limit | test_more_frames_than_max_frames_are_refused |
| server sending a byte every 0.5 s | refused at the deadline | test_a_dripping_server_is_cut_off_at_the_deadline |
| server sending without end | refused at the byte cap, little memory | test_a_flooding_server_is_cut_off_at_the_byte_cap, test_a_declared_oversized_body_is_refused_before_reading |
| redirect to another host | refused by default | test_redirects_follow_the_policy |
| remote fetching turned off | refused without connecting | test_remote_fetching_can_be_turned_off |
| video URLs other than http(s) (rtsp, udp, ...) | refused | test_other_video_url_schemes_are_refused |
| per-item min/max pixels, resized size | clamped to the processor's max_pixels | test_image_items_are_clamped_to_the_processor_bounds, test_chat_items_are_clamped_to_the_processor_bounds |
| video items (min_pixels, total_pixels, resized size) | clamped to the video bounds | test_video_items_are_clamped_to_the_video_bounds, test_video_frames_share_the_video_budget_in_the_image_processor |
| eight 4000x3000 PNGs | one held at full size | test_many_large_pictures_are_loaded_one_at_a_time |
| pictures far over their target | decoded smaller, results close | test_large_pictures_are_shrunk_while_decoding |
| DecompressionBombError, MemoryError | ValueError naming the source | test_decoding_errors_become_value_errors |
| wrong types (str fps, video_start, ...) | clear ValueError / TypeError | test_wrong_types_get_clear_errors |
| fps 1e-30 | ValueError under MIN_FPS | test_frame_rates_under_one_per_hour_are_refused |
| multi-MB inputs in messages | shortened to about 100 characters | test_huge_inputs_are_shortened_in_messages |
"""

import contextlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import PIL.Image
import PIL.ImageFile
import PIL.JpegImagePlugin
import pytest

import image_processing_qwenvl as media
from image_processing_qwenvl import (
    MAX_FRAMES,
    VIDEO_MAX_PIXELS,
    FetchPolicy,
    QwenVLImageProcessor,
    check_fps,
    load_image,
    load_video,
    sample_frame_indices,
    smart_nframes,
)

ROOT = Path(__file__).resolve().parent.parent
MEMORY_SCRIPT = str(ROOT / "tests" / "media_memory.py")


def measure(jobs, headroom_gb=6, timeout=300) -> list[dict]:
    """Run tests/media_memory.py on ``jobs`` (one child process, each job forked from it); one report per job."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEDIA_MEMORY_HEADROOM_GB=str(headroom_gb))
    done = subprocess.run(
        [sys.executable, MEMORY_SCRIPT, json.dumps(jobs)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [report["job"] for report in reports] == jobs, done.stderr[-2000:]
    return reports


def gradient(width, height) -> np.ndarray:
    """A smooth uint8 RGB picture: compresses well, and resizing it shows every filtering difference."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1).astype(np.uint8)


def still_clip(path, frames, width, height, rate=30):
    """An mpeg4 clip of ``frames`` frames of one gradient, made in well under a second.

    PyAV's encoder codes the picture three times; the third coded frame, predicted from a picture it equals,
    changes nothing, so the clip is the key frame followed by copies of that packet.
    """
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = frames + 1
        stream.codec_context.max_b_frames = 0
        picture = av.VideoFrame.from_ndarray(gradient(width, height), format="rgb24").reformat(format="yuv420p")
        packets = []
        for index in range(3):
            picture.pts = index
            packets += stream.encode(picture)
        packets += stream.encode()
        time_base, key, same = packets[0].time_base, bytes(packets[0]), bytes(packets[2])
        for index in range(frames):
            packet = av.Packet(key if index == 0 else same)
            packet.stream, packet.time_base, packet.pts, packet.dts = stream, time_base, index, index
            packet.is_keyframe = index == 0
            container.mux(packet)
    return str(path)


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def tokens(grid) -> int:
    """Merged tokens of one grid (t, h, w) in patches."""
    return int(np.prod(np.asarray(grid))) // 4


# ---------------------------------------------------------------------------------------------------------------
# 1. Videos decode within a memory bound
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    """Peak memory of three loads, measured in one child process (the imports, 9 s of CPU, are paid once; each load
    runs in a process forked from it): a 768-frame 1080p clip, eight 4000x3000 PNGs, a flooding server."""
    folder = tmp_path_factory.mktemp("memory")
    clip = still_clip(folder / "long.mp4", MAX_FRAMES, 1920, 1080)
    picture = folder / "large.png"
    PIL.Image.fromarray(gradient(4000, 3000)).save(picture, compress_level=1)
    with serving() as httpd:
        jobs = [["video", clip, MAX_FRAMES], ["pictures", str(picture), 8, 1003520], ["fetch", httpd.url + "/flood"]]
        reports = measure(jobs, headroom_gb=3)
    return {report["job"][0]: report for report in reports}


def test_long_hd_clip_loads_within_a_small_multiple_of_its_output(memory):
    """768 frames of 1080p (1920x1080): each frame is resized as it is decoded, so the load holds the output (768
    frames of 336x644, 475 MB of uint8) and a few full frames. Before, every frame was kept at full size twice:
    12.6 GB. Measured here: 0.94 GB peak (0.36 GB of it the imports), 0.57 GB growth; 15 s on two idle cores,
    up to 60 s on busy ones."""
    report = memory["video"]
    assert report["error"] is None
    assert report["output_mb"] == pytest.approx(768 * 336 * 644 * 3 / 2**20)
    assert report["peak_mb"] < 2.5 * 1024
    assert report["growth_mb"] < 2 * report["output_mb"]


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """800 frames of 64x48 at 30 fps."""
    return still_clip(tmp_path_factory.mktemp("clip") / "small.mp4", 800, 64, 48)


def test_video_frames_over_pils_picture_limit_are_refused(small_clip, monkeypatch):
    # PIL refuses pictures over 2 * MAX_IMAGE_PIXELS (179 million pixels by default); frames get the same limit,
    # checked on the header before anything is decoded. A lower limit shows it on a small clip.
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"64x48 = 3072 pixels, more than the 2000 .*MAX_IMAGE_PIXELS"):
        load_video(small_clip, nframes=4)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)  # PIL's switch for no limit applies too
    assert load_video(small_clip, nframes=4)[0].shape[0] == 4


def test_more_frames_than_max_frames_are_refused(small_clip):
    with pytest.raises(ValueError, match=r"790 frames .* more than MAX_FRAMES \(768\)"):
        load_video(small_clip, nframes=790)
    frames, _ = load_video(small_clip, nframes=790, allow_larger_items=True)
    assert frames.shape[0] == 790
    # with fps, max_frames already caps the count, as in qwen-vl-utils
    assert load_video(small_clip, fps=30.0, max_frames=10**6)[0].shape[0] == MAX_FRAMES


# ---------------------------------------------------------------------------------------------------------------
# 2. Remote fetching: deadline, byte cap, redirects, off switch
# ---------------------------------------------------------------------------------------------------------------

PICTURE = png_bytes(gradient(40, 30))


class MediaHandler(http.server.BaseHTTPRequestHandler):
    """Routes: /picture.png, /drip (a byte every 0.5 s), /flood (bytes without end), /huge (declares 1 GB),
    /to-localhost and /to-same-host (redirects to /picture.png)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        port = self.server.server_address[1]
        routes = {
            "/picture.png": lambda: self.reply(PICTURE),
            "/drip": self.drip,
            "/flood": self.flood,
            "/huge": lambda: self.head_only(10**9),
            "/to-localhost": lambda: self.redirect(f"http://localhost:{port}/picture.png"),
            "/to-same-host": lambda: self.redirect("/picture.png"),
        }
        try:
            routes.get(self.path, lambda: self.send_error(404))()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def reply(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def head_only(self, length):
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.end_headers()

    def drip(self):
        self.head_only(10**6)
        for _ in range(120):  # a minute at most, should a client never give up
            self.wfile.write(b"\x89")
            self.wfile.flush()
            time.sleep(0.5)

    def flood(self):
        self.send_response(200)
        self.end_headers()  # no Content-Length: the body runs until the connection closes
        chunk = b"\x00" * 2**20
        for _ in range(4096):  # 4 GiB at most
            self.wfile.write(chunk)


class CountingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    connections = 0

    def verify_request(self, request, client_address):
        self.connections += 1
        return True


@contextlib.contextmanager
def serving():
    """A media server on 127.0.0.1 (``MediaHandler``) while the block runs; its base URL is ``server.url``."""
    httpd = CountingServer(("127.0.0.1", 0), MediaHandler)
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def server():
    with serving() as httpd:
        yield httpd


def test_a_dripping_server_is_cut_off_at_the_deadline(server, monkeypatch):
    # the module default is the policy of every call that names none; a caller may replace it
    monkeypatch.setattr(media, "FETCH_POLICY", FetchPolicy(deadline_s=2.0))
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"could not fetch .*/drip'.*deadline_s \(2.0 s\)"):
        load_image(server.url + "/drip")
    elapsed = time.monotonic() - start
    assert 1.9 < elapsed < 3.0, elapsed  # measured: 2.0 s


def test_a_flooding_server_is_cut_off_at_the_byte_cap(memory):
    """The default cap (64 MiB) stops the download; the process grows by about 0.05 GB (before: by gigabytes,
    until the memory ran out)."""
    report = memory["fetch"]
    assert report["error"].startswith("ValueError: could not fetch") and "max_bytes (67108864 bytes)" in report["error"]
    assert report["growth_mb"] < 512


def test_a_declared_oversized_body_is_refused_before_reading(server):
    with pytest.raises(ValueError, match=r"Content-Length 1000000000 is over FetchPolicy.max_bytes"):
        load_image(server.url + "/huge")


def test_redirects_follow_the_policy(server):
    with pytest.raises(ValueError, match=r"redirect to 'http://localhost:\d+/picture.png' was refused: .*another host"):
        load_image(server.url + "/to-localhost")
    assert load_image(server.url + "/to-same-host").size == (40, 30)  # the default allows the same host
    assert load_image(server.url + "/to-localhost", fetch_policy=FetchPolicy(redirects="any")).size == (40, 30)
    with pytest.raises(ValueError, match="redirects is 'none'"):
        load_image(server.url + "/to-same-host", fetch_policy=FetchPolicy(redirects="none"))
    with pytest.raises(ValueError, match=r"more than FetchPolicy.max_redirects \(0\)"):
        load_image(server.url + "/to-same-host", fetch_policy=FetchPolicy(max_redirects=0))


def test_remote_fetching_can_be_turned_off(server, monkeypatch):
    url = server.url + "/picture.png"
    with pytest.raises(ValueError, match="remote fetching is turned off"):
        load_image(url, fetch_policy=FetchPolicy(enabled=False))
    monkeypatch.setenv("QWENVL_REMOTE_MEDIA", "0")  # the switch for servers, whatever the policy
    for call in (lambda: load_image(url), lambda: load_video(url), lambda: QwenVLImageProcessor()(images=[url])):
        with pytest.raises(ValueError, match=r"remote fetching is turned off .*picture.png"):
            call()
    assert server.connections == 0
    monkeypatch.setenv("QWENVL_REMOTE_MEDIA", "1")
    assert load_image(url).size == (40, 30) and server.connections == 1


def test_other_video_url_schemes_are_refused():
    # FFmpeg would open these itself, with neither deadline nor size cap
    with pytest.raises(ValueError, match="only files and http"):
        load_video("udp://127.0.0.1:9")


# ---------------------------------------------------------------------------------------------------------------
# 3. Per-item options within the processor's bounds; pictures loaded one at a time
# ---------------------------------------------------------------------------------------------------------------

ONE_PIXEL_PNG = png_bytes(np.zeros((1, 1, 3), np.uint8))  # 69 bytes


def test_image_items_are_clamped_to_the_processor_bounds():
    processor = QwenVLImageProcessor(max_pixels=256 * 28 * 28)
    # a 69-byte picture asking for 10 million pixels gets the processor's 256 tokens (before: 12,769 tokens)
    out = processor(images=[ONE_PIXEL_PNG], min_pixels=10**7, max_pixels=10**7)
    assert out["image_grid_thw"].tolist() == [[1, 32, 32]] and tokens(out["image_grid_thw"][0]) == 256
    out = processor(images=[ONE_PIXEL_PNG], resized_height=3000, resized_width=3000)
    assert tokens(out["image_grid_thw"][0]) <= 256  # 225: smart_resize floors the scaled sides
    # what a call may ask below the bound it gets
    out = processor(images=[ONE_PIXEL_PNG], min_pixels=64 * 28 * 28)
    assert tokens(out["image_grid_thw"][0]) == 64
    # vLLM's count without pixels agrees
    assert processor.get_number_of_image_patches(1, 1, {"min_pixels": 10**7}) == 1024
    # allow_larger_items lifts the clamp, for trusted callers
    trusting = QwenVLImageProcessor(max_pixels=256 * 28 * 28, allow_larger_items=True)
    out = trusting(images=[ONE_PIXEL_PNG], min_pixels=1024 * 28 * 28, max_pixels=1024 * 28 * 28)
    assert tokens(out["image_grid_thw"][0]) == 1024


def test_chat_items_are_clamped_to_the_processor_bounds():
    from processing_qwenvl import QwenVLProcessor

    processor = QwenVLProcessor.from_pretrained(ROOT, max_pixels=64 * 28 * 28)
    item = {"type": "image", "image": ONE_PIXEL_PNG, "min_pixels": 10**7, "max_pixels": 10**7}
    messages = [{"role": "user", "content": [item, {"type": "text", "text": "What is it?"}]}]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert tokens(out["image_grid_thw"][0]) == 64


def test_video_items_are_clamped_to_the_video_bounds(monkeypatch):
    frames = [gradient(56, 56)] * 4
    # a resized size keeps within total_pixels (before: 1988x1988 per frame, whatever total_pixels said)
    video, _ = load_video(frames, resized_height=2000, resized_width=2000, total_pixels=100_000)
    assert video.shape[1] * video.shape[2] <= 2 * 100_000 / 4
    # min_pixels cannot lift a frame over VIDEO_MAX_PIXELS (before: refused, min_pixels over the image maximum)
    video, _ = load_video(frames, min_pixels=10**9)
    assert video.shape[1] * video.shape[2] <= VIDEO_MAX_PIXELS
    # total_pixels cannot lift the whole video over VIDEO_TOTAL_PIXELS (a small budget shows it on small frames)
    monkeypatch.setattr(media, "VIDEO_TOTAL_PIXELS", 20 * 28 * 28)
    video, _ = load_video([gradient(280, 280)] * 4, total_pixels=10**12)
    assert video.shape[1] * video.shape[2] <= 2 * 20 * 28 * 28 / 4
    video, _ = load_video([gradient(280, 280)] * 4, total_pixels=10**12, allow_larger_items=True)
    assert video.shape[1:3] == (336, 336)  # as in qwen-vl-utils: the default min_pixels (128 tokens) lifts it


def test_video_frames_share_the_video_budget_in_the_image_processor(monkeypatch):
    processor = QwenVLImageProcessor()
    monkeypatch.setattr(media, "VIDEO_TOTAL_PIXELS", 20 * 28 * 28)  # 20 tokens for a whole video
    for resized in ({}, {"resized_height": 280, "resized_width": 280}):
        out = processor(videos=[[gradient(280, 280)] * 4], **resized)
        assert tokens(out["video_grid_thw"][0]) <= 20
        assert int(np.prod(out["video_grid_thw"][0])) == processor.get_number_of_video_patches(4, 280, 280)
    assert processor.get_number_of_video_patches(4, 56, 56) == 2 * 4 * 4  # small frames are not changed


def test_many_large_pictures_are_loaded_one_at_a_time(memory):
    """Eight 4000x3000 PNGs (640 KB each) at transformers' default max_pixels (1003520): the process grows by
    0.22 GB, the output 0.18 GB of it (before: 0.58 GB, every picture decoded at full size first). At the official
    max_pixels (12845056) the output alone is 2.2 GB: 3.04 GB peak, before 3.37 GB."""
    report = memory["pictures"]
    assert report["error"] is None
    assert report["output_mb"] == pytest.approx(8 * 840 * 1148 * 6 * 4 / 2**20, rel=1e-3)  # each 840x1148
    assert report["growth_mb"] < 350


def test_large_pictures_are_shrunk_while_decoding(tmp_path, monkeypatch):
    processor = QwenVLImageProcessor(max_pixels=256 * 28 * 28)
    # within twice the target: decoded at full size, bit-identical to a resize of the full picture
    moderate = gradient(900, 700)
    (tmp_path / "moderate.png").write_bytes(png_bytes(moderate))
    np.testing.assert_array_equal(
        processor(str(tmp_path / "moderate.png"))["pixel_values"], processor(moderate)["pixel_values"]
    )
    # far larger: reduced (PNG) or decoded smaller (JPEG) first, then resized to the same size; the values differ
    # from a resize of the full picture by a fraction of a level
    large = gradient(4000, 3000)
    shrunk = []
    for cls, method in ((PIL.Image.Image, "reduce"), (PIL.JpegImagePlugin.JpegImageFile, "draft")):
        original = getattr(cls, method)
        monkeypatch.setattr(cls, method, lambda self, *args, _f=original, _m=method: shrunk.append((_m, args[-1]))
                            or _f(self, *args))
    PIL.Image.fromarray(large).save(tmp_path / "large.png")
    PIL.Image.fromarray(large).save(tmp_path / "large.jpg", quality=95)
    full = processor(large)  # resized to 364x504: sides 3000 // (2 * 504) = 2 times larger than needed
    for name in ("large.png", "large.jpg"):
        ours = processor(str(tmp_path / name))
        assert ours["image_grid_thw"].tolist() == full["image_grid_thw"].tolist()
        assert np.abs(ours["pixel_values"] - full["pixel_values"]).mean() < 0.02  # a level is 0.015 normalized
    assert shrunk == [("reduce", 2), ("draft", (2000, 1500))]
    # the EXIF orientation still applies to a picture decoded smaller or reduced
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: portrait
    for name in ("turned.jpg", "turned.png"):
        PIL.Image.fromarray(large).save(tmp_path / name, exif=exif)
        turned = processor(str(tmp_path / name))
        assert turned["image_grid_thw"].tolist() == [[1, full["image_grid_thw"][0, 2], full["image_grid_thw"][0, 1]]]
    # and frames of a video may be such pictures
    out = processor(videos=[[str(tmp_path / "turned.jpg"), str(tmp_path / "turned.png")]])
    assert out["video_grid_thw"].tolist() == turned["image_grid_thw"].tolist()


# ---------------------------------------------------------------------------------------------------------------
# 6. Decoding errors inside the contract
# ---------------------------------------------------------------------------------------------------------------


def test_decoding_errors_become_value_errors(tmp_path, small_clip, monkeypatch):
    path = tmp_path / "picture.png"
    path.write_bytes(png_bytes(gradient(64, 64)))
    with monkeypatch.context() as patch:
        patch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 * 1000: PIL's DecompressionBombError
        with pytest.raises(ValueError, match=r"image '.*picture.png' is too large to decode"):
            load_image(str(path))

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    with monkeypatch.context() as patch:
        patch.setattr(PIL.ImageFile.ImageFile, "load", out_of_memory)
        with pytest.raises(ValueError, match=r"not enough memory to decode image '.*picture.png' \(64x64 pixels\)"):
            load_image(str(path))
    with monkeypatch.context() as patch:
        patch.setattr(media, "_frame_pixels", out_of_memory)
        with pytest.raises(ValueError, match=r"not enough memory to decode 4 frames of video '.*small.mp4'"):
            load_video(small_clip, nframes=4)


# ---------------------------------------------------------------------------------------------------------------
# 11. Clear errors: wrong types, absurd frame rates, huge inputs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: load_video([gradient(28, 28)] * 2, fps="2"), ValueError, "fps must be a positive number"),
        (lambda: smart_nframes(10, "25"), TypeError, "video_fps must be a number"),
        (lambda: smart_nframes(10, 25.0, min_frames="4"), TypeError, "min_frames must be an integer"),
        (lambda: sample_frame_indices("10", 25.0), TypeError, "total_frames must be an integer"),
        (lambda: sample_frame_indices(10, "25"), TypeError, "video frame rate must be a number"),
        (lambda: sample_frame_indices(100, 25.0, video_start="1"), TypeError, "video_start must be a number"),
        (lambda: sample_frame_indices(100, 25.0, video_end=float("nan")), TypeError, "video_end must be a number"),
        (lambda: load_video("clip.mp4", total_pixels="9"), TypeError, "total_pixels must be a number"),
        (lambda: load_video("clip.mp4", max_frames=None), TypeError, "max_frames must be an integer"),
    ],
    ids=["fps-str", "video-fps-str", "min-frames-str", "total-str", "rate-str", "start-str", "end-nan",
         "total-pixels-str", "max-frames-none"],
)
def test_wrong_types_get_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_frame_rates_under_one_per_hour_are_refused(small_clip):
    frames = [gradient(28, 28)] * 2
    for fps in (1e-30, 1 / 3601):
        with pytest.raises(ValueError, match=r"at least MIN_FPS = 1/3600 \(one frame per hour\)"):
            load_video(frames, fps=fps)
    assert load_video(frames, fps=1 / 3600)[1] == check_fps(1 / 3600)
    with pytest.raises(ValueError, match="at least MIN_FPS"):
        load_video(small_clip, fps=1e-30)


def test_huge_inputs_are_shortened_in_messages():
    huge = "x" * 5_000_000
    calls = [
        lambda: load_image(huge),
        lambda: load_image("data:image/png;base64," + "!" * 5_000_000),
        lambda: load_image("data:text/plain;base64," + huge),
        lambda: load_image("http://127.0.0.1:9/" + huge),  # port 9 (discard) is closed: refused at once
        lambda: load_video(huge),
        lambda: load_video([gradient(28, 28)] * 2, fps=huge),
        lambda: check_fps(huge),
        lambda: QwenVLImageProcessor()(images=[gradient(28, 28)], min_pixels=huge),
    ]
    for call in calls:
        with pytest.raises((ValueError, TypeError)) as caught:
            call()
        assert len(str(caught.value)) < 400, str(caught.value)[:500]
        assert "xxxxx" in str(caught.value) or "!!!!!" in str(caught.value)  # the start is still shown
