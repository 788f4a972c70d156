"""Processor for Qwen2.5-VL and Qwen2-VL: turns text, images and videos into model inputs.

Text carries one placeholder per image (`<|image_pad|>`) and per video (`<|video_pad|>`), normally written by the
chat template between `<|vision_start|>` and `<|vision_end|>`. The processor runs the vision inputs through
`QwenVLImageProcessor` and widens each placeholder to as many copies as the vision encoder will produce merged
tokens for it (`grid_t * grid_h * grid_w / merge_size**2`), so the model can scatter vision features into them.

Images and videos both go through the image processor: there is deliberately no `video_processor` part, because
transformers 5.x validates that part against a registry that exists only when torchvision is installed.
"""

import os
import re

import jinja2.meta
import torch
import transformers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import Qwen2TokenizerFast
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessorMixin

try:  # as remote code, the files form a package; from a checkout, they are plain modules
    from .image_processing_qwenvl import (
        QwenVLImageProcessor, check_fps, image_list, load_image, load_video, smart_resize, video_list,
    )
except ImportError:
    from image_processing_qwenvl import (
        QwenVLImageProcessor, check_fps, image_list, load_image, load_video, smart_resize, video_list,
    )


# What differs between transformers 4.x and 5.x for this file, and all that it does about it:
# - 5.x finds a processor's parts from the argument names of `__init__` (and warns about the old class attributes);
#   4.x only from the class attributes `attributes` and `<part>_class`, which QwenVLProcessor defines on 4.x alone.
# - 5.x passes `_get_arguments_from_pretrained` an extra positional argument, which the override below absorbs.
IS_TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5

# Where a saved processor's configs name its classes (`auto_map`), so that AutoImageProcessor and AutoProcessor
# load them as remote code; save_pretrained writes the same, and convert_checkpoint.py writes this.
PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "image_processing_qwenvl.QwenVLImageProcessor",
    "AutoProcessor": "processing_qwenvl.QwenVLProcessor",
}
# Tokenizer options a call may pass on. Options that split or reshape samples (overflowing tokens, stride, text
# pairs, pre-split words) are left out: placeholders and vision spans must stay whole, one sample per text.
TOKENIZER_OPTIONS = (
    "padding",
    "truncation",
    "max_length",
    "pad_to_multiple_of",
    "padding_side",
    "add_special_tokens",
    "return_attention_mask",
    "return_token_type_ids",
    "return_length",
    "verbose",
)
IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTIONS = ("fps", "nframes", "video_start", "video_end", "total_pixels", *IMAGE_OPTIONS)
# Where a chat item keeps its image or video; "url" and "path" are the transformers chat conventions.
IMAGE_SOURCE_KEYS = ("image", "url", "path", "image_url")
VIDEO_SOURCE_KEYS = ("video", "url", "path")
MESSAGE_ITEM_TYPES = ("text", "image", "image_url", "video")


class QwenVLProcessor(ProcessorMixin):
    """Qwen2.5-VL / Qwen2-VL processor: a `QwenVLImageProcessor` for images and videos plus the Qwen2 tokenizer.

    Padding follows the tokenizer's `padding_side`, which the shipped tokenizer config sets to "left" so that a
    padded batch can be passed straight to `generate`; pass `padding_side="right"` to a call to change it.
    """

    if IS_TRANSFORMERS_4:  # see IS_TRANSFORMERS_4 above
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
        if image_processor is None or tokenizer is None:
            raise ValueError("QwenVLProcessor needs both an image_processor and a tokenizer")
        if chat_template is None:  # built by hand: use the template the tokenizer read from chat_template.jinja
            chat_template = tokenizer.chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = self._token_id(self.image_token)
        self.video_token_id = self._token_id(self.video_token)
        # A vision span is <|vision_start|>, its pads, <|vision_end|>: truncation must keep all of each span.
        self._span_tokens = {
            token: self._token_id(token)
            for token in ("<|vision_start|>", self.image_token, self.video_token, "<|vision_end|>")
        }

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, *processor_dict, **kwargs):
        """Load the parts of a saved processor: always this file's own image processor, and the tokenizer.

        transformers would resolve the image processor by the class name in its config, which fails for remote
        code unless that class was registered in this session; and AutoTokenizer would read the model's config.json
        and ask whether to trust its remote code, although the tokenizer is a plain Qwen2 one. (`processor_dict`, which only transformers 5.x
        passes, is not needed: the parts read their own configs.)
        """
        return [
            QwenVLImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs),
            Qwen2TokenizerFast.from_pretrained(pretrained_model_name_or_path, **kwargs),
        ]

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token; it is not a Qwen2-VL / Qwen2.5-VL tokenizer")
        return token_id

    @property
    def model_input_names(self) -> list[str]:
        names = self.tokenizer.model_input_names + self.image_processor.model_input_names
        names += self.video_processor.model_input_names + ["second_per_grid_ts", "mm_token_type_ids"]
        return list(dict.fromkeys(names))

    @property
    def video_processor(self) -> "QwenVLVideoView":
        """The image processor's video side, for engines that look for a video part (see `QwenVLVideoView`)."""
        return QwenVLVideoView(self.image_processor)

    # ---- main entry point ----------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, **kwargs) -> BatchFeature:
        """Prepare model inputs from text with `<|image_pad|>` / `<|video_pad|>` placeholders and their media.

        Args:
            images: an image or a (possibly per-sample nested) list of images, in placeholder order. An image is a
                PIL image, an array or tensor, or a path / `file://` / `data:image` / http(s) string.
            text: a string or a list of strings (one per sample), each placeholder standing for one image / video.
            videos: a video or a list of videos, in placeholder order. A video is a path (decoded, sampled at `fps`
                and resized by `load_video`), or its frames as a `[T, H, W, 3]` array / tensor or a list of frames,
                taken as already sampled at `fps` and sized (e.g. by `load_video`; sides are only rounded to
                multiples of 28).
            **kwargs: `min_pixels`, `max_pixels`, `resized_height`, `resized_width` for the images; `fps` (one
                number, or one per video; default 2.0) for the videos; `return_tensors`;
                `return_mm_token_type_ids` (default True); `return_text_replacement_offsets` (default False, see
                Returns); everything else goes to the tokenizer (`padding`, `truncation`, `max_length`,
                `padding_side`, ...).

        Returns:
            BatchFeature with `input_ids`, `attention_mask`, `mm_token_type_ids` (0 text, 1 image, 2 video) when
            text is given; `pixel_values`, `image_grid_thw` for images; `pixel_values_videos`, `video_grid_thw`,
            `second_per_grid_ts` (temporal_patch_size / fps, seconds per temporal patch) for videos. With
            `return_text_replacement_offsets=True`, also `text_replacement_offsets`: per sample, one dict per
            placeholder in order (`type` "image" / "video", `span` in the text given, `new_span` in the widened
            text, `text` the placeholder, `replacement` what it became), as transformers' processors report them;
            vLLM's Transformers backend locates each item's tokens with it.

        Raises:
            ValueError: the placeholder count differs from the number of images or videos, or truncation
                (`truncation=True` with a `max_length`) would cut through a vision span. Cutting a span would
                leave the model with vision features that have no tokens to go to, so it is refused rather than
                silently dropping pixels: raise `max_length` or shorten the text.
            TypeError: an input of an unsupported type.
        """
        if images is None and text is None and videos is None:
            raise ValueError("QwenVLProcessor needs at least one of text, images or videos")
        image_options = {name: kwargs.pop(name) for name in IMAGE_OPTIONS if name in kwargs}
        fps = kwargs.pop("fps", None)

        image_items = [(image, image_options) for image in ([] if images is None else image_list(images))]
        video_items = self._video_items_from_call([] if videos is None else video_list(videos, paths=True), fps)
        return self._build(text, image_items, video_items, **kwargs)

    def _video_items_from_call(self, videos: list, fps) -> list:
        """Pair each video with its frames-per-second: paths are decoded at that rate, frames are taken as is."""
        fps_per_video = _fps_per_video(fps, len(videos))
        items = []
        for video, video_fps in zip(videos, fps_per_video):
            if isinstance(video, (str, os.PathLike)):
                items.append(load_video(os.fspath(video), fps=video_fps))
            else:
                items.append((video, video_fps))
        return items

    def _build(
        self,
        text,
        image_items,
        video_items,
        return_tensors=None,
        return_mm_token_type_ids=True,
        return_text_replacement_offsets=False,
        **tokenizer_kwargs,
    ) -> BatchFeature:
        """Encode the media, widen the placeholders and tokenize.

        `image_items` are (image, options) pairs; `video_items` are (frames, fps) pairs of sampled frames.
        """
        unknown = sorted(set(tokenizer_kwargs) - set(TOKENIZER_OPTIONS))
        if unknown:
            raise TypeError(
                f"QwenVLProcessor got unexpected keyword argument(s) {unknown}; it takes {list(IMAGE_OPTIONS)}, fps, "
                f"return_tensors, return_mm_token_type_ids, return_text_replacement_offsets and the tokenizer options "
                f"{list(TOKENIZER_OPTIONS)} "
                "(generation options such as do_sample belong to generate)"
            )
        data, offsets = {}, None
        image_counts, video_counts = [], []
        if image_items:
            image_features = _concat([self._encode_image(image, options) for image, options in image_items])
            image_counts = self._tokens_per_grid(image_features["image_grid_thw"])
            data.update(image_features)
        if video_items:
            video_features = _concat([self._encode_video(frames) for frames, _ in video_items])
            video_counts = self._tokens_per_grid(video_features["video_grid_thw"])
            data.update(video_features)
            data["second_per_grid_ts"] = [self.image_processor.temporal_patch_size / fps for _, fps in video_items]

        if text is not None:
            texts = _as_text_list(text)
            texts, offsets = self._expand_placeholders(texts, image_counts, video_counts)
            encoding = self.tokenizer(texts, **tokenizer_kwargs)
            self._check_spans_kept(texts, encoding["input_ids"])
            data.update(encoding)
            if return_mm_token_type_ids:
                data["mm_token_type_ids"] = self._mm_token_type_ids(encoding["input_ids"])
        features = BatchFeature(data, tensor_type=return_tensors)
        if return_text_replacement_offsets and offsets is not None:
            features["text_replacement_offsets"] = offsets  # added after the tensor conversion: it stays a list
        return features

    # ---- vision ----------------------------------------------------------------------------------------------

    def _encode_image(self, image, options: dict) -> dict:
        return dict(self.image_processor(images=[image], return_tensors="pt", **options))

    def _encode_video(self, frames) -> dict:
        # The frames are already sampled and sized (by `load_video`, or by the caller). Asking for their own size
        # only rounds the sides to multiples of patch_size * merge_size (28), instead of resizing them again under
        # the image pixel limits.
        frames = [load_image(frame) for frame in frames]
        height, width = frames[0].height, frames[0].width
        return dict(
            self.image_processor(videos=[frames], resized_height=height, resized_width=width, return_tensors="pt")
        )

    def _tokens_per_grid(self, grid_thw: torch.Tensor) -> list[int]:
        """Merged vision tokens per image / video: every merge_size x merge_size block of patches is one token."""
        return [int(t * h * w) // self.image_processor.merge_size**2 for t, h, w in grid_thw.tolist()]

    # ---- text ------------------------------------------------------------------------------------------------

    def _expand_placeholders(
        self, texts: list[str], image_counts: list[int], video_counts: list[int]
    ) -> tuple[list[str], list[list[dict]]]:
        """Repeat each placeholder as many times as its image / video has tokens, in order across the batch.

        Returns the widened texts and, per sample, where each placeholder was and what it became (see `__call__`).
        """
        expected = ((self.image_token, image_counts, "image"), (self.video_token, video_counts, "video"))
        for token, counts, kind in expected:
            found = sum(sample.count(token) for sample in texts)
            if found != len(counts):
                raise ValueError(
                    f"the text has {found} {token} placeholder(s) but {len(counts)} {kind}(s) were given: "
                    f"each {kind} needs exactly one {token} in the text, in the same order"
                )
        tokens_left = {self.image_token: iter(image_counts), self.video_token: iter(video_counts)}
        widened = [self._widen_sample(sample, tokens_left) for sample in texts]
        return [text for text, _ in widened], [offsets for _, offsets in widened]

    def _widen_sample(self, sample: str, tokens_left: dict) -> tuple[str, list[dict]]:
        """One sample's placeholders widened, taking each item's token count from `tokens_left` in order."""
        kinds = {self.image_token: "image", self.video_token: "video"}
        pattern = re.compile(f"{re.escape(self.image_token)}|{re.escape(self.video_token)}")
        pieces, offsets, end, length = [], [], 0, 0
        for match in pattern.finditer(sample):
            replacement = match.group() * next(tokens_left[match.group()])
            before = sample[end : match.start()]
            start = length + len(before)
            pieces += [before, replacement]
            length = start + len(replacement)
            offsets.append(
                {
                    "type": kinds[match.group()],
                    "span": match.span(),
                    "new_span": (start, start + len(replacement)),
                    "text": match.group(),
                    "replacement": replacement,
                }
            )
            end = match.end()
        pieces.append(sample[end:])
        return "".join(pieces), offsets

    def _check_spans_kept(self, texts: list[str], input_ids: list[list[int]]) -> None:
        """Refuse a tokenization that lost part of a vision span, which only truncation can do."""
        for index, (sample, ids) in enumerate(zip(texts, input_ids)):
            for token, token_id in self._span_tokens.items():
                if sample.count(token) != ids.count(token_id):
                    raise ValueError(
                        f"truncation would cut through a vision span in sample {index} ({token} appears "
                        f"{sample.count(token)} times in the text but {ids.count(token_id)} times after "
                        "truncation): raise max_length, shorten the text or pass truncation=False"
                    )

    def _mm_token_type_ids(self, input_ids: list[list[int]]) -> list[list[int]]:
        kinds = {self.image_token_id: 1, self.video_token_id: 2}
        return [[kinds.get(token_id, 0) for token_id in ids] for ids in input_ids]

    # ---- chat ------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation,
        chat_template=None,
        add_generation_prompt=False,
        continue_final_message=False,
        tokenize=False,
        return_dict=False,
        return_tensors=None,
        processor_kwargs=None,
        **kwargs,
    ):
        """Render one conversation (a list of messages) or a batch of them, and optionally build model inputs.

        A message is `{"role": ..., "content": str | list of items}`. Items follow qwen-vl-utils:
        `{"type": "text", "text": ...}`;
        `{"type": "image", "image": X, "min_pixels"/"max_pixels" or "resized_height"/"resized_width": ...}` with X
        a PIL image, array, path, `file://`, `data:image/...;base64,` or http(s) URL (the keys "url", "path" and
        OpenAI's `{"type": "image_url", "image_url": {"url": ...}}` work too);
        `{"type": "video", "video": path or list of frames, "fps" or "nframes", "video_start", "video_end",
        "min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width"}`.

        Keyword arguments the template uses (such as `add_vision_id=True`, which writes "Picture N: " before
        each image and "Video N: " before each video) go to the template; the rest, and `processor_kwargs`, go to
        `__call__` (e.g. `padding`, `truncation`, `max_length`).

        Returns the prompt string (a list for a batch) unless `tokenize`; then the `input_ids`, or with
        `return_dict` the same BatchFeature as `__call__`, with `second_per_grid_ts` from each video's sampled fps.
        """
        conversations, is_batched = _as_conversation_list(conversation)
        for conv in conversations:
            _check_conversation(conv)
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this processor has no chat template; pass chat_template=")
        template_variables = _template_variables(template)
        template_kwargs = {k: v for k, v in kwargs.items() if k in template_variables}
        call_kwargs = {k: v for k, v in kwargs.items() if k not in template_variables}
        call_kwargs.update(processor_kwargs or {})

        prompts = self.tokenizer.apply_chat_template(
            conversations,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **template_kwargs,
        )
        if not tokenize:
            return prompts if is_batched else prompts[0]

        image_items, video_items = self._load_chat_media(conversations)
        inputs = self._build(prompts, image_items, video_items, return_tensors=return_tensors, **call_kwargs)
        return inputs if return_dict else inputs["input_ids"]

    def _load_chat_media(self, conversations: list[list[dict]]) -> tuple[list, list]:
        """Load every image and video of the conversations in order, each with its own options."""
        image_items, video_items = [], []
        for conv in conversations:
            for item in _content_items(conv):
                kind = _item_type(item)
                if kind in ("image", "image_url"):
                    options = {name: item[name] for name in IMAGE_OPTIONS if name in item}
                    image_items.append((load_image(_item_source(item, IMAGE_SOURCE_KEYS)), options))
                elif kind == "video":
                    options = {name: item[name] for name in VIDEO_OPTIONS if name in item}
                    video_items.append(load_video(_item_source(item, VIDEO_SOURCE_KEYS), **options))
        return image_items, video_items

    # ---- decoding and serving --------------------------------------------------------------------------------

    def post_process_image_text_to_text(
        self, generated_outputs, skip_special_tokens=True, clean_up_tokenization_spaces=False, **kwargs
    ) -> list[str]:
        """Decode a batch of generated token ids (as the image-text-to-text pipeline expects) into strings."""
        return self.tokenizer.batch_decode(
            generated_outputs,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder counts for inputs of the given sizes, without pixels (used by vLLM's Transformers backend).

        `image_sizes` are (height, width) pairs of the original images; `video_sizes` are
        (num_frames, height, width) of sampled frames as `__call__` takes them. `min_pixels` / `max_pixels` in
        kwargs apply to the images as they would in `__call__`.
        """
        image_options = {name: kwargs[name] for name in ("min_pixels", "max_pixels") if name in kwargs}
        merge_area = self.image_processor.merge_size**2
        data = {}
        if image_sizes is not None:
            patches = [self.image_processor.get_number_of_image_patches(h, w, image_options) for h, w in image_sizes]
            data["num_image_patches"] = patches
            data["num_image_tokens"] = [n // merge_area for n in patches]
        if video_sizes is not None:
            data["num_video_tokens"] = [self._video_patches(*size) // merge_area for size in video_sizes]
        return MultiModalData(**data)

    def _video_patches(self, num_frames: int, height: int, width: int) -> int:
        """Patch rows of a video as `_encode_video` sizes it: frames in temporal pairs, sides rounded to 28."""
        patch_size = self.image_processor.patch_size
        height, width = smart_resize(height, width, patch_size * self.image_processor.merge_size)
        temporal = -(-num_frames // self.image_processor.temporal_patch_size)
        return temporal * (height // patch_size) * (width // patch_size)


# save_pretrained then copies the code files next to the configs and names the class in `auto_map`, so the saved
# folder loads anywhere with AutoProcessor.from_pretrained(folder, trust_remote_code=True).
QwenVLProcessor.register_for_auto_class()


class QwenVLVideoView:
    """What an engine reads from a processor's video part, taken from `QwenVLImageProcessor`, which does videos too.

    vLLM's Transformers backend serves videos only for a processor with a `video_processor`, and reads from it the
    `temporal_patch_size` (frames per temporal patch), the `size` pixel bounds and the `model_input_names` that tell
    video outputs from image outputs. `QwenVLProcessor.video_processor` builds this view on each access, so it always
    shows the current image processor; it is not a part of the processor and is not saved.
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, image_processor: QwenVLImageProcessor):
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.size = image_processor.size


# ---- input normalisation ---------------------------------------------------------------------------------------


def _fps_per_video(fps, num_videos: int) -> list[float]:
    fps_list = list(fps) if isinstance(fps, (list, tuple)) else [fps] * num_videos
    if len(fps_list) != num_videos:
        raise ValueError(f"got {len(fps_list)} fps values for {num_videos} videos; pass one number or one per video")
    return [check_fps(value) for value in fps_list]


def _as_text_list(text) -> list[str]:
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, (list, tuple)) or not all(isinstance(sample, str) for sample in texts):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
    return list(texts)


def _concat(features: list[dict]) -> dict:
    """Join the image processor's per-item outputs into one batch (patches and grids are both stacked by row)."""
    return {key: torch.cat([feature[key] for feature in features]) for key in features[0]}


# ---- chat helpers ----------------------------------------------------------------------------------------------


def _as_conversation_list(conversation) -> tuple[list, bool]:
    """(list of conversations, whether a batch was given). A conversation is a list of message dicts."""
    if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
        return [list(conv) for conv in conversation], True
    if isinstance(conversation, (list, tuple)):
        return [list(conversation)], False
    raise TypeError(
        f"conversation must be a list of messages or a list of such lists, got {type(conversation).__name__}"
    )


def _check_conversation(conversation: list) -> None:
    for position, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {position} must be a dict with 'role' and 'content', got {message!r}")
        content = message["content"]
        if not isinstance(content, (str, list, tuple)):
            raise TypeError(
                f"message {position} content must be a string or a list of items, got {type(content).__name__}"
            )
    for item in _content_items(conversation):
        _item_type(item)


def _content_items(conversation: list[dict]):
    """Every content item of a conversation, in order (string contents have none)."""
    for message in conversation:
        if not isinstance(message["content"], str):
            yield from message["content"]


def _item_type(item) -> str:
    """An item's type, read from "type" or, as qwen-vl-utils allows, from the key it carries."""
    if not isinstance(item, dict):
        raise TypeError(f"a message content item must be a dict, got {type(item).__name__}: {item!r}")
    kind = item.get("type") or next((key for key in MESSAGE_ITEM_TYPES if key in item), None)
    if kind not in MESSAGE_ITEM_TYPES:
        raise ValueError(f"unknown message item type {kind!r} in {item!r}; expected one of {MESSAGE_ITEM_TYPES}")
    return kind


def _item_source(item: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in item:
            value = item[key]
            # OpenAI style: {"type": "image_url", "image_url": {"url": ...}}
            return value["url"] if isinstance(value, dict) and "url" in value else value
    raise ValueError(f"message item {item!r} has no media; put it under one of the keys {keys}")


def _template_variables(template: str) -> set[str]:
    """The variables a chat template reads, so that call kwargs can be told apart from template kwargs."""
    return jinja2.meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(template))
