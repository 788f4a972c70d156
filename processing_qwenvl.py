"""Processor for Qwen2.5-VL, Qwen2-VL and Qwen3-VL: turns text, images and videos into model inputs.

Text carries one placeholder per image (`<|image_pad|>`) and per video (`<|video_pad|>`), normally written by the
chat template between `<|vision_start|>` and `<|vision_end|>`. The processor runs the vision inputs through
`QwenVLImageProcessor` and widens each placeholder to as many copies as the vision encoder will produce merged
tokens for it (`grid_t * grid_h * grid_w / merge_size**2`), so the model can scatter vision features into them.
Qwen3-VL writes a video differently: each temporal patch is its own span after its time in plain text,
`<0.3 seconds><|vision_start|>{pads}<|vision_end|><1.3 seconds><|vision_start|>...` (see `text_timestamps`).

Images and videos both go through the image processor: there is deliberately no `video_processor` part, because
transformers 5.x validates that part against a registry that exists only when torchvision is installed.
"""

import math
import numbers
import os
import re

import jinja2
import jinja2.meta
import torch
import transformers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.utils import PaddingStrategy

try:  # as remote code, the files form a package; from a checkout, they are plain modules
    from .image_processing_qwenvl import (
        QwenVLImageProcessor, _short, check_fps, image_list, load_image, load_video, video_list,
    )
except ImportError:
    from image_processing_qwenvl import (
        QwenVLImageProcessor, _short, check_fps, image_list, load_image, load_video, video_list,
    )

# The processor's family is in its image processor's config: Qwen3-VL's official preprocessor_config.json has
# patch_size 16, Qwen2-VL's and Qwen2.5-VL's 14. Only Qwen3-VL writes video time into the text.
TIMESTAMPED_VIDEO_PATCH_SIZE = 16


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
# `split_special_tokens` is not passed on as such: the processor applies it itself (see `_tokenize`).
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
    "split_special_tokens",
)
# Options of the processor's own, besides the media options below.
OUTPUT_OPTIONS = ("return_tensors", "return_mm_token_type_ids", "return_text_replacement_offsets")
IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTIONS = ("fps", "nframes", "video_start", "video_end", "total_pixels", *IMAGE_OPTIONS)
# A call-level media option (e.g. apply_chat_template(fps=1)) that an item's own option replaces besides the one of
# the same name: the two spell the same choice, so keeping both would contradict the item (fps vs nframes; pixel
# bounds vs a fixed size).
_RESIZED = ("resized_height", "resized_width")
ITEM_OPTION_OVERRIDES = {
    "fps": ("nframes",),
    "nframes": ("fps",),
    "min_pixels": _RESIZED,
    "max_pixels": _RESIZED,
    "total_pixels": _RESIZED,
}
# Where a chat item keeps its image or video; "url" and "path" are the transformers chat conventions.
IMAGE_SOURCE_KEYS = ("image", "url", "path", "image_url")
VIDEO_SOURCE_KEYS = ("video", "url", "path")
MESSAGE_ITEM_TYPES = ("text", "image", "image_url", "video")
# The media kind an item is by a key it carries, when it has no "type" (as qwen-vl-utils and the official template
# read items). chat_template.jinja reads items by the same rule; `_item_type` is the processor's side of it.
MEDIA_KIND_BY_KEY = {"image": "image", "image_url": "image", "video": "video"}

# Request budget defaults; None turns a limit off (`QwenVLProcessor(max_items_per_request=None)`).
# - Items: the official examples send one to a few dozen images or videos per conversation, and batches of
#   conversations add up; 1024 leaves room for batches of multi-image chats while bounding the per-item work
#   (file reads, URL fetches, decoding) that happens before any token can be counted.
# - Vision tokens: the official per-image maximum is 16384 merged tokens (max_pixels 12845056) and one video at
#   qwen-vl-utils' default total_pixels is about 115200. 2**18 = 262144 tokens admits 16 maximum-size images or
#   two such videos per call -- twice Qwen2.5-VL's 128000-position context -- while bounding pixel_values at
#   about 4.9 GB (4 patch rows of 1176 float32 per token) and the vision tower's work to match.
DEFAULT_MAX_ITEMS_PER_REQUEST = 1024
DEFAULT_MAX_VISION_TOKENS_PER_REQUEST = 2**18
REQUEST_LIMITS = ("max_items_per_request", "max_vision_tokens_per_request")
# Kimi-VL (an image processor with `in_token_limit`): images only, each written by the template as
# <|media_start|>image<|media_content|><|media_pad|><|media_end|>, its tokenizer a converted tiktoken vocabulary.
KIMI_IMAGE_TOKEN = "<|media_pad|>"
# Kimi-VL: <|media_start|>image<|media_content|> + pads + <|media_end|>, and no videos (start, image, video, end,
# and the one more token its spans hold).
KIMI_VISION_MARKERS = ("<|media_start|>", KIMI_IMAGE_TOKEN, None, "<|media_end|>", "<|media_content|>")
# Private-use characters stand in for the "<" of user text while the chat template renders (see `_TextEscape`).
_PRIVATE_USE = range(0xE000, 0xF900)

# The vision markers of each tokenizer: span start, image placeholder, video placeholder, span end.
QWEN2_VISION_MARKERS = ("<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>")
# Qwen-VL (2023): <img> + 256 <imgpad> + </img>, and no videos. The original always reserves 256 positions, one per
# Resampler query, whatever the picture; its raw prompts name a picture inside the span (`<img>path</img>`), which
# `__call__` reads as the placeholder of the next image given.
QWEN_VL_VISION_MARKERS = ("<img>", "<imgpad>", None, "</img>")
QWEN_VL_IMAGE_TOKENS = 256
QWEN_VL_IMAGE_SPAN = re.compile(r"<img>.*?</img>", re.DOTALL)
# The special tokens that message text may spell in a Qwen-VL chat (the original make_context's IMAGE_ST: grounding
# and image tags); every other special-token string typed in a message is read as text, as the original does.
QWEN_VL_TEXT_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")


class QwenVLProcessor(ProcessorMixin):
    """Qwen2.5-VL / Qwen2-VL processor: a `QwenVLImageProcessor` for images and videos plus the Qwen2 tokenizer.
    With a Qwen-VL (2023) tokenizer (it has `<imgpad>`, see tools/build_qwen_vl_tokenizer.py) the spans are
    `<img>` + 256 `<imgpad>` + `</img>` and there are no videos.

    Padding follows the tokenizer's `padding_side`, which the shipped tokenizer config sets to "left" so that a
    padded batch can be passed straight to `generate`; pass `padding_side="right"` to a call to change it.

    Each call (`__call__`, or `apply_chat_template` with `tokenize=True`; a batch of conversations is one call) is
    a request with a budget: at most `max_items_per_request` images and videos, and at most
    `max_vision_tokens_per_request` merged vision tokens (see DEFAULT_MAX_ITEMS_PER_REQUEST and
    DEFAULT_MAX_VISION_TOKENS_PER_REQUEST for the defaults). Both are constructor arguments and attributes, saved
    with the processor; None turns a limit off. A request over budget is refused with a ValueError: the item count
    before any item is read; the tokens item by item, before the next item is read (a decoded video's tokens
    are counted from its sampled frames before they are cut into patches; an image's once it is encoded, since
    its size is known only after the image processor decodes it, with its bounded decoding).
    """

    if IS_TRANSFORMERS_4:  # see IS_TRANSFORMERS_4 above
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        max_items_per_request=DEFAULT_MAX_ITEMS_PER_REQUEST,
        max_vision_tokens_per_request=DEFAULT_MAX_VISION_TOKENS_PER_REQUEST,
    ):
        if image_processor is None or tokenizer is None:
            raise ValueError("QwenVLProcessor needs both an image_processor and a tokenizer")
        if chat_template is None:  # built by hand: use the template the tokenizer read from chat_template.jinja
            chat_template = tokenizer.chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        # Plain attributes named as the arguments, so that save_pretrained writes them to processor_config.json.
        self.max_items_per_request = _check_limit(max_items_per_request, "max_items_per_request")
        self.max_vision_tokens_per_request = _check_limit(
            max_vision_tokens_per_request, "max_vision_tokens_per_request"
        )
        self.is_qwen_vl = tokenizer.convert_tokens_to_ids("<imgpad>") not in (None, tokenizer.unk_token_id)
        markers = QWEN_VL_VISION_MARKERS if self.is_qwen_vl else QWEN2_VISION_MARKERS
        if getattr(image_processor, "in_token_limit", None) is not None:
            markers = KIMI_VISION_MARKERS
        self.image_token = markers[1]
        self.video_token = markers[2]
        self.image_token_id = self._token_id(self.image_token)
        self.video_token_id = self._token_id(self.video_token) if self.video_token else None
        # A vision span is <|vision_start|>, its pads, <|vision_end|>: truncation must keep all of each span.
        self._span_tokens = {token: self._token_id(token) for token in markers if token}

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, *processor_dict, **kwargs):
        """Load the parts of a saved processor: always this file's own image processor, and the tokenizer.

        transformers would resolve the image processor by the class name in its config, which fails for remote
        code unless that class was registered in this session; and AutoTokenizer would read the model's config.json
        and ask whether to trust its remote code, although the tokenizer is a plain Qwen2 one. (`processor_dict`,
        which only transformers 5.x passes, is not needed: the parts read their own configs.) The processor's own
        options (the request limits) are not the parts' business: transformers hands them to `__init__`.
        """
        kwargs = {name: value for name, value in kwargs.items() if name not in REQUEST_LIMITS}
        image_processor = QwenVLImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        # Kimi-VL's tokenizer is its tiktoken vocabulary converted to tokenizer.json (convert_checkpoint.py)
        tokenizer_class = PreTrainedTokenizerFast if image_processor.in_token_limit is not None else Qwen2TokenizerFast
        return [image_processor, tokenizer_class.from_pretrained(pretrained_model_name_or_path, **kwargs)]

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

    @property
    def text_timestamps(self) -> bool:
        """Whether videos are written Qwen3-VL's way: each temporal patch its own `<|vision_start|>...<|vision_end|>`
        span after its time as text (`<1.3 seconds>`), and no `second_per_grid_ts`. True when the image processor
        has Qwen3-VL's 16-px patches (its official preprocessor_config.json), False for Qwen2-VL's and Qwen2.5-VL's
        14 px. The model's switch of the same name (`vision_config.text_timestamps`) reads such prompts."""
        return self.image_processor.patch_size == TIMESTAMPED_VIDEO_PATCH_SIZE

    # ---- main entry point ----------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, **kwargs) -> BatchFeature:
        """Prepare model inputs from text with `<|image_pad|>` / `<|video_pad|>` placeholders and their media.

        Args:
            images: an image or a list of images, in placeholder order. An image is a PIL image, an array or
                tensor, or a path / `file://` / `data:image` / http(s) string. A list with one list of images per
                text (`[[a, b], [], [c]]`) is checked per sample: each text must hold its own images' placeholders.
            text: a string or a non-empty list of strings (one per sample), each placeholder standing for one
                image / video.
            videos: a video or a list of videos, in placeholder order. A video is a path (decoded, sampled at `fps`
                and resized by `load_video`), or its frames as a `[T, H, W, 3]` array / tensor or a list of frames,
                taken as already sampled at `fps` and sized (e.g. by `load_video`; sides are only rounded to
                multiples of 28).
            **kwargs: `min_pixels`, `max_pixels`, `resized_height`, `resized_width` for the images; `fps` (one
                number, or one per video; default 2.0) for the videos; `frame_times` (Qwen3-VL: per video None or
                the time in seconds of each of its frames, e.g. from `load_video(..., return_frame_times=True)`;
                frames without are `fps` apart from 0 s); `return_tensors`;
                `return_mm_token_type_ids` (default True); `return_text_replacement_offsets` (default False, see
                Returns); everything else goes to the tokenizer (`padding`, `truncation`, `max_length`,
                `padding_side`, ...). `split_special_tokens=True` reads every special-token string in the text
                as plain text except the vision markers (`<|vision_start|>`, the two placeholders,
                `<|vision_end|>`), which are how the text names its media.

        Returns:
            BatchFeature with `input_ids`, `attention_mask`, `mm_token_type_ids` (0 text, 1 image, 2 video) when
            text is given; `pixel_values`, `image_grid_thw` for images; `pixel_values_videos`, `video_grid_thw`,
            `second_per_grid_ts` (temporal_patch_size / fps, seconds per temporal patch) for videos (Qwen2/2.5; a
            Qwen3-VL processor writes each temporal patch's time into the text instead: `text_timestamps`). With
            `return_text_replacement_offsets=True`, also `text_replacement_offsets`: per sample, one dict per
            placeholder in order (`type` "image" / "video", `span` in the text given, `new_span` in the widened
            text, `text` the placeholder, `replacement` what it became), as transformers' processors report them;
            vLLM's Transformers backend locates each item's tokens with it.

        Raises:
            ValueError: the placeholder count differs from the number of images or videos, the request is over
                its budget (`max_items_per_request`, `max_vision_tokens_per_request`), `text` is an empty list,
                or truncation (`truncation=True` with a `max_length`) would cut through a vision span. Cutting a
                span would leave the model with vision features that have no tokens to go to, so it is refused
                rather than silently dropping pixels: raise `max_length` or shorten the text.
            TypeError: an input of an unsupported type, or an unknown option.
        """
        if images is None and text is None and videos is None:
            raise ValueError("QwenVLProcessor needs at least one of text, images or videos")
        _check_known_options(kwargs, (*IMAGE_OPTIONS, "fps", "frame_times", *OUTPUT_OPTIONS, *TOKENIZER_OPTIONS))
        image_options = {name: kwargs.pop(name) for name in IMAGE_OPTIONS if name in kwargs}
        fps = kwargs.pop("fps", None)
        image_inputs = [] if images is None else image_list(images)
        video_inputs = [] if videos is None else video_list(videos, paths=True)
        frame_times = self._given_frame_times(kwargs.pop("frame_times", None), video_inputs)

        texts = None if text is None else _as_text_list(text)
        if texts is not None and self.is_qwen_vl:
            texts = [QWEN_VL_IMAGE_SPAN.sub(f"<img>{self.image_token}</img>", sample) for sample in texts]
        if texts is not None:
            # Checked before any media is read: counting needs only the lists.
            images_per_sample = _images_per_sample(images, len(texts))
            self._check_placeholder_counts(
                texts,
                len(image_inputs) if images_per_sample is None else images_per_sample,
                len(video_inputs),
            )
        self._check_item_count(len(image_inputs) + len(video_inputs))
        budget = _TokenBudget(self.max_vision_tokens_per_request)
        video_items = self._load_call_videos(video_inputs, fps, budget, frame_times)
        image_items = [(image, image_options) for image in image_inputs]
        return self._build(texts, image_items, video_items, budget, **kwargs)

    def _load_call_videos(self, videos: list, fps, budget: "_TokenBudget", frame_times: list) -> list:
        """Pair each video with its frames-per-second: paths are decoded at that rate (and charged to the budget
        before the next is decoded), frames are taken as is, with the frame times given for them (or None)."""
        fps_per_video = _fps_per_video(fps, len(videos))
        items = []
        for video, video_fps, times in zip(videos, fps_per_video, frame_times):
            if isinstance(video, (str, os.PathLike)):
                frames, sampled_fps, times = self._read_video(os.fspath(video), dict(fps=video_fps))
                budget.spend(self._decoded_video_tokens(frames), f"video {len(items)}")
                items.append((frames, sampled_fps, True, times))
            else:
                items.append((video, video_fps, False, times))
        return items

    def _given_frame_times(self, frame_times, videos: list) -> list:
        """The `frame_times` of a call, checked: per video, None or the time in seconds of each of its frames."""
        if frame_times is None:
            return [None] * len(videos)
        if not self.text_timestamps:
            raise ValueError(
                "frame_times is for Qwen3-VL processors (patch_size 16), which write video time into the text; "
                "this one takes each video's time from fps"
            )
        if not isinstance(frame_times, (list, tuple)) or len(frame_times) != len(videos):
            raise ValueError(
                f"frame_times must hold one list of seconds per video ({len(videos)}), got {_short(frame_times)}"
            )
        checked = []
        for index, (video, times) in enumerate(zip(videos, frame_times)):
            if times is not None and isinstance(video, (str, os.PathLike)):
                raise ValueError(f"video {index} is a file, whose frames' times come from the file: give it None")
            valid = isinstance(times, (list, tuple)) and all(
                isinstance(t, numbers.Real) and not isinstance(t, bool) and math.isfinite(t) for t in times
            )
            if times is not None and not (valid and len(times) == len(video)):
                raise ValueError(
                    f"frame_times[{index}] must be None or one finite number of seconds per frame of video {index} "
                    f"({len(video)} frames), got {_short(times)}"
                )
            checked.append(None if times is None else [float(t) for t in times])
        return checked

    def _read_video(self, video, options: dict) -> tuple:
        """`load_video` with an item's options: (frames, sampled fps, frame times). A Qwen3-VL processor reads at
        its own side multiple (patch_size * merge_size: 32, with the video bounds of 32) and keeps each frame's time
        for the text; the Qwen2/2.5 ones read as qwen-vl-utils' defaults (28), and need no times (None)."""
        if not self.text_timestamps:
            return (*load_video(video, **options), None)
        factor = self.image_processor.patch_size * self.image_processor.merge_size
        return load_video(video, **options, factor=factor, return_frame_times=True)

    def _build(
        self,
        texts,
        image_items,
        video_items,
        budget: "_TokenBudget",
        return_tensors=None,
        return_mm_token_type_ids=True,
        return_text_replacement_offsets=False,
        split_special_tokens=None,
        text_escape=None,
        **tokenizer_kwargs,
    ) -> BatchFeature:
        """Encode the loaded media, widen the placeholders and tokenize.

        `texts` are already checked against the media counts. `image_items` are (image, options) pairs, encoded
        one at a time and charged to `budget` as they come. `video_items` are (frames, fps, charged, frame times)
        of sampled frames; `charged` says whether the budget already holds their tokens (decoded videos); the
        frame times (seconds, from `load_video`) are None for frames given as such, which are `fps` apart. `text_escape`
        (chat only) is the `_TextEscape` that hid user text's special tokens in `texts`.
        """
        data, offsets = {}, None
        image_counts, video_counts = [], []
        if image_items:
            encoded = [self._encode_charged_image(item, index, budget) for index, item in enumerate(image_items)]
            image_features = _concat(encoded)
            image_counts = self._tokens_per_grid(_image_grid_thw(image_features))
            data.update(image_features)
        video_texts = []
        if video_items:
            video_features = _concat([self._encode_charged_video(item, budget) for item in video_items])
            video_counts = self._tokens_per_grid(video_features["video_grid_thw"])
            data.update(video_features)
            if self.text_timestamps:  # time is in the text, not in the positions
                video_texts = self._timestamped_videos(video_features["video_grid_thw"], video_items)
            else:
                tp = self.image_processor.temporal_patch_size
                data["second_per_grid_ts"] = [tp / fps for _, fps, _, _ in video_items]
                video_texts = [self.video_token * count for count in video_counts]
        # Decoded videos were charged from their frames' sizes; the grids made have the final word.
        _TokenBudget(budget.limit).spend(sum(image_counts) + sum(video_counts), "its media")

        if texts is not None:
            image_texts = [self.image_token * count for count in image_counts]
            texts, offsets = self._expand_placeholders(texts, image_texts, video_texts)
            encoding = self._tokenize(texts, self._splits(split_special_tokens), text_escape, **tokenizer_kwargs)
            self._check_spans_kept(texts, encoding["input_ids"])
            data.update(encoding)
            if return_mm_token_type_ids:
                data["mm_token_type_ids"] = self._mm_token_type_ids(encoding["input_ids"])
        features = BatchFeature(data, tensor_type=return_tensors)
        if return_text_replacement_offsets and offsets is not None:
            features["text_replacement_offsets"] = offsets  # added after the tensor conversion: it stays a list
        return features

    # ---- request budget --------------------------------------------------------------------------------------

    def _check_item_count(self, count: int) -> None:
        """Refuse a request with more images and videos than `max_items_per_request`, before any is read."""
        limit = _check_limit(self.max_items_per_request, "max_items_per_request")
        if limit is not None and count > limit:
            raise ValueError(
                f"this request has {count} images and videos, more than max_items_per_request={limit}: send them "
                f"in several requests, or raise the limit with QwenVLProcessor(..., max_items_per_request=N) or "
                f"processor.max_items_per_request = N (None turns it off)"
            )

    def _decoded_video_tokens(self, frames) -> int:
        """Merged tokens of a video decoded by `load_video` (uint8 [T, H, W, 3]), from its shape: known before the
        frames are cut into patches, and before the next item is decoded."""
        num_frames, height, width = frames.shape[:3]
        return self._video_patches(num_frames, height, width) // self.image_processor.merge_size**2

    # ---- vision ----------------------------------------------------------------------------------------------

    def _encode_image(self, image, options: dict) -> dict:
        return dict(self.image_processor(images=[image], return_tensors="pt", **options))

    def _encode_charged_image(self, item: tuple, index: int, budget: "_TokenBudget") -> dict:
        """Encode one image and charge its tokens, so that an over-budget request stops before the next is read.

        The image processor reads the image (decoding a large picture straight to about its target size), so its
        size, and with it its token count, is known only then; its own pixel bounds cap what one image can cost.
        """
        features = self._encode_image(*item)
        budget.spend(self._tokens_per_grid(_image_grid_thw(features))[0], f"image {index}")
        return features

    def _encode_charged_video(self, item: tuple, budget: "_TokenBudget") -> dict:
        frames, _, charged, _ = item
        features = self._encode_video(frames)
        if not charged:  # frames given as such: counted once encoded, as images are
            budget.spend(self._tokens_per_grid(features["video_grid_thw"])[0], "a video given as frames")
        return features

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
        """Merged vision tokens per image / video: every merge_size x merge_size block of patches is one token (Qwen-VL
        2023: the Resampler's 256 queries per picture)."""
        if self.is_qwen_vl:
            return [int(t) * QWEN_VL_IMAGE_TOKENS for t, _, _ in grid_thw.tolist()]
        return [int(t * h * w) // self.image_processor.merge_size**2 for t, h, w in grid_thw.tolist()]

    def _timestamped_videos(self, grid_thw: torch.Tensor, video_items: list) -> list[str]:
        """Each video's text in Qwen3-VL's layout: per temporal patch, `<t seconds>` (the mean time of its first and
        last frame) and a span of its pads. Frames given as such are `fps` apart from 0 s; decoded ones carry their
        times in the clip."""
        tp = self.image_processor.temporal_patch_size
        texts, counts = [], self._tokens_per_grid(grid_thw)
        for grid, count, (frames, fps, _, times) in zip(grid_thw.tolist(), counts, video_items):
            times = [index / fps for index in range(len(frames))] if times is None else times
            stamps = temporal_patch_timestamps(times, tp)  # one per temporal patch, as the grid counts them
            texts.append(timestamped_video_text(stamps, self.video_token * (count // grid[0])))
        return texts

    # ---- text ------------------------------------------------------------------------------------------------

    def _check_placeholder_counts(self, texts: list[str], images, videos, unit: str = "sample") -> None:
        """Refuse texts whose placeholders do not match the media, before any media is read.

        `images` / `videos` are one count per text, checked text by text (so that one sample's media cannot fill
        another's placeholders), or one count for the whole batch (media given as one flat list, whose order is
        all that ties them to the texts).
        """
        expected = ((self.image_token, images, "image"), (self.video_token, videos, "video"))
        for token, counts, kind in expected:
            if token is None:  # Qwen-VL (2023) and Kimi-VL take no videos
                if (counts if isinstance(counts, int) else sum(counts)) > 0:
                    raise ValueError(f"this model takes no {kind}s (it reads images only)")
                continue
            if isinstance(counts, int):
                found = sum(sample.count(token) for sample in texts)
                if found != counts:
                    raise ValueError(
                        f"the text has {found} {token} placeholder(s) but {counts} {kind}(s) were given: "
                        f"each {kind} needs exactly one {token} in the text, in the same order"
                    )
                continue
            for index, (sample, count) in enumerate(zip(texts, counts)):
                found = sample.count(token)
                if found != count:
                    raise ValueError(self._placeholder_mismatch(unit, index, token, kind, found, count))

    @staticmethod
    def _placeholder_mismatch(unit: str, index: int, token: str, kind: str, found: int, count: int) -> str:
        """The error for one sample or conversation whose placeholders differ from its media."""
        if unit != "conversation":
            return (
                f"{unit} {index} has {found} {token} placeholder(s) but {count} {kind}(s) were given for it: each "
                f"text needs one {token} per {kind} of its own list, in the same order"
            )
        if found > count:  # the template writes one per item, so the rest came from the text
            return (
                f"conversation {index} has {found} {token} placeholder(s) but {count} {kind} item(s): {found - count} "
                f"typed in its message text. Remove them, or pass split_special_tokens=True to read special-token "
                "strings in message text as plain text"
            )
        return (
            f"conversation {index} has {found} {token} placeholder(s) but {count} {kind} item(s): the chat template "
            f"wrote no placeholder for some {kind} items"
        )

    def _expand_placeholders(
        self, texts: list[str], image_texts: list[str], video_texts: list[str]
    ) -> tuple[list[str], list[list[dict]]]:
        """Replace each placeholder by its image's / video's text (its pads; a Qwen3-VL video's timestamped spans),
        in order across the batch.

        Returns the widened texts and, per sample, where each placeholder was and what it became (see `__call__`).
        """
        texts_left = {"image": iter(image_texts), "video": iter(video_texts)}
        widened = [self._widen_sample(sample, texts_left) for sample in texts]
        return [text for text, _ in widened], [offsets for _, offsets in widened]

    def _placeholder_pattern(self) -> re.Pattern:
        """What a placeholder is in the text. A Qwen3-VL video's spans bring their own <|vision_start|> and
        <|vision_end|>, so there the template's whole `<|vision_start|><|video_pad|><|vision_end|>` is replaced
        (as the Qwen code does; a bare `<|video_pad|>` too)."""
        placeholders = [token for token in (self.image_token, self.video_token) if token]  # Qwen-VL 2023, Kimi-VL: no video
        if self.text_timestamps:
            placeholders.insert(0, f"<|vision_start|>{self.video_token}<|vision_end|>")
        return re.compile("|".join(re.escape(placeholder) for placeholder in placeholders))

    def _widen_sample(self, sample: str, texts_left: dict) -> tuple[str, list[dict]]:
        """One sample's placeholders widened, taking each item's text from `texts_left` in order."""
        pieces, offsets, end, length = [], [], 0, 0
        for match in self._placeholder_pattern().finditer(sample):
            kind = "image" if match.group() == self.image_token else "video"
            replacement = next(texts_left[kind])
            before = sample[end : match.start()]
            start = length + len(before)
            pieces += [before, replacement]
            length = start + len(replacement)
            offsets.append(
                {
                    "type": kind,
                    "span": match.span(),
                    "new_span": (start, start + len(replacement)),
                    "text": match.group(),
                    "replacement": replacement,
                }
            )
            end = match.end()
        pieces.append(sample[end:])
        return "".join(pieces), offsets

    def _splits(self, split_special_tokens) -> bool:
        """Whether to read stray special-token strings as text: as asked, else the tokenizer's own default (its
        config may set split_special_tokens), which the processor applies itself rather than the tokenizer."""
        if split_special_tokens is None:
            return bool(getattr(self.tokenizer, "split_special_tokens", False))
        return bool(split_special_tokens)

    def _tokenize(self, texts: list[str], split_special_tokens: bool, text_escape, **tokenizer_kwargs) -> dict:
        """Token ids of the widened texts; with `split_special_tokens`, special-token strings that are not the
        template's (chat) or the vision markers (`__call__`) are read as plain text.

        Splitting the whole text, as the tokenizer would, would also split the placeholders and the template's
        own tokens. Instead the text is cut at the special tokens that stay, and each piece between them is
        tokenized with the tokenizer's split_special_tokens=True. The tokenizer itself cuts text at special tokens
        and encodes each piece on its own, so text without stray special strings gets the same ids either way.
        """
        if not split_special_tokens:
            return self.tokenizer(texts, split_special_tokens=False, **tokenizer_kwargs)
        if text_escape is None:  # __call__: the text is the caller's; its vision markers name the media
            kept, restore = self._span_tokens, lambda piece: piece
        else:  # chat: every special token left in the escaped prompt was written by the template
            kept, restore = self._special_tokens(), text_escape.restore
        ids = self._ids_keeping_special_tokens(texts, kept, restore)
        return self._finish_encoding(ids, **tokenizer_kwargs)

    def _special_tokens(self) -> dict[str, int]:
        """Every special token of the tokenizer (those split_special_tokens=True reads as text), by its text."""
        added = self.tokenizer.added_tokens_decoder.items()
        return {token.content: token_id for token_id, token in added if token.special}

    def _ids_keeping_special_tokens(self, texts: list[str], kept: dict[str, int], restore) -> list[list[int]]:
        """Token ids of each text: `kept` strings as their special tokens, everything between them (after
        `restore`) tokenized as plain text. All pieces of all texts go to the tokenizer in one call."""
        pattern = re.compile("|".join(re.escape(token) for token in sorted(kept, key=len, reverse=True)))
        # Per text, its parts in order: a list holds a kept token's id, an int is the index of a text piece.
        layouts, pieces = [], []
        for text in texts:
            layout, end = [], 0
            for match in pattern.finditer(text):
                if match.start() > end:
                    layout.append(len(pieces))
                    pieces.append(restore(text[end : match.start()]))
                layout.append([kept[match.group()]])
                end = match.end()
            if end < len(text):
                layout.append(len(pieces))
                pieces.append(restore(text[end:]))
            layouts.append(layout)
        piece_ids = (
            self.tokenizer(pieces, add_special_tokens=False, split_special_tokens=True)["input_ids"] if pieces else []
        )
        return [
            [token_id for part in layout for token_id in (part if isinstance(part, list) else piece_ids[part])]
            for layout in layouts
        ]

    def _finish_encoding(
        self,
        ids: list[list[int]],
        padding=False,
        truncation=None,
        max_length=None,
        pad_to_multiple_of=None,
        padding_side=None,
        add_special_tokens=True,
        return_attention_mask=None,
        return_token_type_ids=None,
        return_length=False,
        verbose=True,
    ) -> dict:
        """Truncate and pad token ids as the tokenizer's own call would (the Qwen2 tokenizer adds no special
        tokens, so `add_special_tokens` changes nothing)."""
        if truncation not in (None, False, "do_not_truncate"):
            limit = self.tokenizer.model_max_length if max_length is None else max_length
            keep_end = self.tokenizer.truncation_side == "left"
            ids = [sample[max(0, len(sample) - limit) :] if keep_end else sample[:limit] for sample in ids]
        encoding = {"input_ids": ids}
        if return_token_type_ids:
            encoding["token_type_ids"] = [[0] * len(sample) for sample in ids]
        pads_to_max_length = padding not in (True, False) and PaddingStrategy(padding) is PaddingStrategy.MAX_LENGTH
        encoding = self.tokenizer.pad(
            encoding,
            padding=padding,
            max_length=max_length if pads_to_max_length else None,  # else it only bounded the truncation
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
            verbose=verbose,
        )
        if return_length:  # as the tokenizer counts it: after padding
            encoding["length"] = [len(sample) for sample in encoding["input_ids"]]
        return dict(encoding)

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

        A message is `{"role": "system" | "user" | "assistant", "content": str | list of items}` (the roles
        chat_template.jinja renders; another template decides its own). Items follow
        qwen-vl-utils: `{"type": "text", "text": ...}`;
        `{"type": "image", "image": X, "min_pixels"/"max_pixels" or "resized_height"/"resized_width": ...}` with X
        a PIL image, array, path, `file://`, `data:image/...;base64,` or http(s) URL (the keys "url", "path" and
        OpenAI's `{"type": "image_url", "image_url": {"url": ...}}` work too);
        `{"type": "video", "video": path or list of frames, "fps" or "nframes", "video_start", "video_end",
        "min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width"}`. An item without "type" is
        an image or a video by the key "image" / "image_url" / "video" it carries, else text; the template writes
        one placeholder for each image and video item, and only for those.

        Keyword arguments the template uses (such as `add_vision_id=True`, which writes "Picture N: " before
        each image and "Video N: " before each video) go to the template. The media options above, given to the
        call (e.g. `max_pixels=...`, `fps=1.0`), apply to every item that takes them, unless the item sets its
        own. The rest, and `processor_kwargs`, go to `__call__`'s tokenization (e.g. `padding`, `truncation`,
        `max_length`). With `split_special_tokens=True`, special-token strings typed in message text (such as
        `<|im_end|>` or `<|image_pad|>`) are tokenized as plain text, while the template's own stay special.

        A batch of conversations is one request for the budget (see the class), and each conversation must hold
        exactly its own items' placeholders: a placeholder typed in a conversation's text is refused (unless
        `split_special_tokens=True` makes it text), so that no conversation takes another's media.

        Returns the prompt string (a list for a batch) unless `tokenize`; then the `input_ids`, or with
        `return_dict` the same BatchFeature as `__call__`, with `second_per_grid_ts` from each video's sampled fps
        (Qwen3-VL: the `<t seconds>` of each temporal patch, from its frames' times in the clip).
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
        render = dict(
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **template_kwargs,
        )

        prompts = self._render(conversations, render)
        if not tokenize:
            return prompts if is_batched else prompts[0]

        _check_known_options(call_kwargs, (*VIDEO_OPTIONS, *OUTPUT_OPTIONS, *TOKENIZER_OPTIONS), template_variables)
        item_defaults = {name: call_kwargs.pop(name) for name in VIDEO_OPTIONS if name in call_kwargs}
        # Qwen-VL (2023) chats read special-token strings in message text as text by default, as make_context does.
        split_special_tokens = self._splits(call_kwargs.pop("split_special_tokens", True if self.is_qwen_vl else None))
        text_escape = None
        if split_special_tokens:
            kept = QWEN_VL_TEXT_TAGS if self.is_qwen_vl else ()
            text_escape = _TextEscape.unused_in(prompts + [template], self._special_tokens(), kept)
            prompts = self._render([text_escape.hide_in(conv) for conv in conversations], render)

        media = [list(_media_items(conv)) for conv in conversations]
        self._check_placeholder_counts(
            prompts,
            [sum(kind == "image" for kind, _ in items) for items in media],
            [sum(kind == "video" for kind, _ in items) for items in media],
            unit="conversation",
        )
        self._check_item_count(sum(len(items) for items in media))
        budget = _TokenBudget(self.max_vision_tokens_per_request)
        image_items, video_items = self._load_chat_media(media, item_defaults, budget)
        inputs = self._build(
            prompts,
            image_items,
            video_items,
            budget,
            return_tensors=return_tensors,
            split_special_tokens=split_special_tokens,
            text_escape=text_escape,
            **call_kwargs,
        )
        return inputs if return_dict else inputs["input_ids"]

    def _render(self, conversations: list, render: dict) -> list[str]:
        """The prompts of the conversations. A refusal by the template itself (its `raise_exception`, e.g. for a
        role it does not render: chat_template.jinja renders only system, user and assistant) is a ValueError.
        The template decides the roles, so a custom template (say, one that renders tool turns) keeps its own."""
        try:
            return self.tokenizer.apply_chat_template(conversations, tokenize=False, **render)
        except jinja2.TemplateError as err:
            if type(err) is not jinja2.TemplateError:  # syntax errors, undefined names: the template is broken
                raise
            raise ValueError(f"the chat template refused the conversation: {err}") from err

    def _load_chat_media(self, media: list[list[tuple]], defaults: dict, budget: "_TokenBudget") -> tuple[list, list]:
        """The images (with their options: their own, and the call's where they have none) and the decoded videos
        of the conversations, in order. Videos are decoded here, each charged to the budget before the next; the
        images are read and charged when `_build` encodes them."""
        image_items, video_items = [], []
        for conv_index, items in enumerate(media):
            for kind, item in items:
                if kind == "image":
                    options = _item_options(item, defaults, IMAGE_OPTIONS)
                    image_items.append((_item_source(item, IMAGE_SOURCE_KEYS), options))
                else:
                    options = _item_options(item, defaults, VIDEO_OPTIONS)
                    frames, fps, times = self._read_video(_item_source(item, VIDEO_SOURCE_KEYS), options)
                    budget.spend(self._decoded_video_tokens(frames), f"a video of conversation {conv_index}")
                    video_items.append((frames, fps, True, times))
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
            data["num_image_tokens"] = [QWEN_VL_IMAGE_TOKENS if self.is_qwen_vl else n // merge_area for n in patches]
        if video_sizes is not None:
            data["num_video_tokens"] = [self._video_patches(*size) // merge_area for size in video_sizes]
        return MultiModalData(**data)

    def _video_patches(self, num_frames: int, height: int, width: int) -> int:
        """Patch rows of a video as `_encode_video` hands it to the image processor (at its own size), which
        alone knows how it sizes and bounds frames."""
        return self.image_processor.get_number_of_video_patches(num_frames, height, width)


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


# ---- video timestamps (Qwen3-VL) -------------------------------------------------------------------------------


def temporal_patch_timestamps(frame_times: list[float], temporal_patch_size: int) -> list[float]:
    """The time of each temporal patch of frames at `frame_times` (seconds): the mean of its first and last frame's.

    The frames are padded to whole patches by repeating the last one, with its time. Frame times come from the
    sampled frame indices over the clip's own (source) frame rate: a sampled rate would shift every stamp of a clip
    whose frames were not sampled from 0 at exactly that rate.
    """
    times = list(frame_times) + [frame_times[-1]] * (-len(frame_times) % temporal_patch_size)
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def timestamped_video_text(timestamps: list[float], patch_pads: str) -> str:
    """A video's text in Qwen3-VL's layout: `<t seconds><|vision_start|>{patch_pads}<|vision_end|>` per temporal
    patch, t with one decimal (Python's rounding: 0.25 gives "0.2"), as the Qwen code (transformers 4.57's
    Qwen3VLProcessor, the official training data) writes it. transformers 5.x keeps the template's outer
    `<|vision_start|>...<|vision_end|>` around all of it; the model was trained without."""
    return "".join(f"<{time:.1f} seconds><|vision_start|>{patch_pads}<|vision_end|>" for time in timestamps)


# ---- input normalisation ---------------------------------------------------------------------------------------


def _image_grid_thw(features: dict) -> torch.Tensor:
    """The image grids of encoded features as [n, 3]: Kimi-VL's image processor gives (h, w) pairs (image_grid_hws)."""
    if "image_grid_hws" not in features:
        return features["image_grid_thw"]
    hws = features["image_grid_hws"]
    return torch.cat([torch.ones_like(hws[:, :1]), hws], dim=1)


def _fps_per_video(fps, num_videos: int) -> list[float]:
    fps_list = list(fps) if isinstance(fps, (list, tuple)) else [fps] * num_videos
    if len(fps_list) != num_videos:
        raise ValueError(f"got {len(fps_list)} fps values for {num_videos} videos; pass one number or one per video")
    return [check_fps(value) for value in fps_list]


def _as_text_list(text) -> list[str]:
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, (list, tuple)) or not all(isinstance(sample, str) for sample in texts):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
    if not texts:
        # The tokenizer itself fails on [] with an IndexError; an empty batch has no shape to return either.
        raise ValueError("text is an empty list: pass at least one string, or text=None to process media alone")
    return list(texts)


def _images_per_sample(images, num_texts: int):
    """One image count per text when `images` holds one list per text (`[[a, b], [], [c]]`), else None."""
    if not isinstance(images, (list, tuple)) or len(images) != num_texts:
        return None
    if not all(isinstance(sample, (list, tuple)) for sample in images):
        return None
    return [len(image_list(sample)) for sample in images]


def _concat(features: list[dict]) -> dict:
    """Join the image processor's per-item outputs into one batch (patches and grids are both stacked by row)."""
    return {key: torch.cat([feature[key] for feature in features]) for key in features[0]}


def _check_known_options(options: dict, accepted: tuple, template_variables=()) -> None:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        template_part = f" and the chat template's variables {sorted(template_variables)}" if template_variables else ""
        raise TypeError(
            f"QwenVLProcessor got unexpected keyword argument(s) {unknown}; it takes {list(accepted)}{template_part} "
            "(generation options such as do_sample belong to generate)"
        )


# ---- request budget --------------------------------------------------------------------------------------------


def _check_limit(value, name: str):
    """A request limit: a positive integer, or None for no limit."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None (no limit), got {_short(value)}")
    return value


class _TokenBudget:
    """A request's running count of merged vision tokens, refused once past `max_vision_tokens_per_request`."""

    def __init__(self, limit):
        self.limit = _check_limit(limit, "max_vision_tokens_per_request")
        self.used = 0

    def spend(self, tokens: int, what: str) -> None:
        self.used += tokens
        if self.limit is not None and self.used > self.limit:
            raise ValueError(
                f"this request needs more than max_vision_tokens_per_request={self.limit} vision tokens ({what} "
                f"brings it to {self.used}): lower max_pixels (or total_pixels / fps for videos), send fewer images "
                "and videos per request, or raise the limit with QwenVLProcessor(..., "
                "max_vision_tokens_per_request=N) or processor.max_vision_tokens_per_request = N (None turns it off)"
            )


# ---- chat helpers ----------------------------------------------------------------------------------------------


def _as_conversation_list(conversation) -> tuple[list, bool]:
    """(list of conversations, whether a batch was given). A conversation is a list of message dicts."""
    if isinstance(conversation, (list, tuple)) and not conversation:
        raise ValueError("the conversation is empty: pass a list of messages, or a list of such lists")
    if isinstance(conversation, (list, tuple)) and isinstance(conversation[0], (list, tuple)):
        return [list(conv) for conv in conversation], True
    if isinstance(conversation, (list, tuple)):
        return [list(conversation)], False
    raise TypeError(
        f"conversation must be a list of messages or a list of such lists, got {type(conversation).__name__}"
    )


def _check_conversation(conversation: list) -> None:
    if not conversation:
        raise ValueError("a conversation of the batch is empty: each needs at least one message")
    for position, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {position} must be a dict with 'role' and 'content', got {_short(message)}")
        if not isinstance(message["role"], str):  # which roles are known is the template's call (see `_render`)
            raise ValueError(f"message {position} has role {_short(message['role'])}; a role is a string")
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


def _media_items(conversation: list[dict]):
    """(kind, item) for every image and video item of a conversation, in order; kind is "image" or "video"."""
    for item in _content_items(conversation):
        kind = _item_type(item)
        if kind != "text":
            yield kind, item


def _item_type(item) -> str:
    """What an item is: "text", "image" or "video" ("image_url" items are images).

    Its "type" says, or without one, as in qwen-vl-utils, a media key it carries ("image", "image_url", "video"),
    else a "text" key. chat_template.jinja reads items by the same rule, so the template writes a placeholder for
    exactly the items loaded here. An item whose type and media keys disagree is refused: it has no one reading.
    """
    if not isinstance(item, dict):
        raise TypeError(f"a message content item must be a dict, got {type(item).__name__}: {_short(item)}")
    declared = item.get("type")
    carried = sorted({kind for key, kind in MEDIA_KIND_BY_KEY.items() if key in item})
    if declared:
        if declared not in MESSAGE_ITEM_TYPES:
            raise ValueError(
                f"unknown message item type {_short(declared)} in {_short(item)}; "
                f"expected one of {MESSAGE_ITEM_TYPES}"
            )
        kind = "image" if declared == "image_url" else declared
        if carried and carried != [kind]:
            raise ValueError(f"a message item of type {declared!r} carries {carried} media: {_short(item)}")
        return kind
    if len(carried) > 1:
        raise ValueError(f"a message item without a type carries both image and video media: {_short(item)}")
    if carried:
        return carried[0]
    if "text" in item:
        return "text"
    raise ValueError(
        f"unknown message item type None in {_short(item)}; give it a type, one of {MESSAGE_ITEM_TYPES}"
    )


def _item_source(item: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in item:
            value = item[key]
            # OpenAI style: {"type": "image_url", "image_url": {"url": ...}}
            return value["url"] if isinstance(value, dict) and "url" in value else value
    raise ValueError(f"message item {_short(item)} has no media; put it under one of the keys {keys}")


def _item_options(item: dict, call_options: dict, names: tuple[str, ...]) -> dict:
    """An item's media options: its own, and the call's (e.g. `apply_chat_template(max_pixels=...)`) where it has
    none. The per-item checks and clamping then happen in the image processor / load_video, for both alike."""
    own = {name: item[name] for name in names if name in item}
    inherited = {name: value for name, value in call_options.items() if name in names}
    for name in own:
        for other in ITEM_OPTION_OVERRIDES.get(name, ()):
            inherited.pop(other, None)
    return {**inherited, **own}


class _TextEscape:
    """Keeps the special-token strings of message text away from the tokenizer while a chat template renders it.

    Every character a special token starts with ("<" for Qwen's) becomes, in message text, a private-use character
    found nowhere in the rendered prompts or the template. No special token can then come from the text, typed
    whole or formed across two text items, so every one left in the prompt is the template's. After the prompt is
    cut at those, each text piece gets its characters back (`restore`) and is tokenized as plain text. The swap is
    one character for one, so offsets in the escaped prompt hold for the real one.
    """

    def __init__(self, table: dict[str, str], kept=()):
        self._hide = str.maketrans(table)
        self._restore = str.maketrans({private: lead for lead, private in table.items()})
        self._kept = {token.translate(self._hide): token for token in kept}  # special tokens text may spell

    @classmethod
    def unused_in(cls, texts: list[str], special_tokens, kept=()) -> "_TextEscape":
        used = set().union(*(set(text) for text in texts))
        free = (chr(code) for code in _PRIVATE_USE if chr(code) not in used)
        table = {}
        for lead in sorted({token[0] for token in special_tokens}):
            table[lead] = next(free, None)
            if table[lead] is None:
                raise ValueError("split_special_tokens=True needs a private-use character that the text does not use")
        return cls(table, kept)

    def hide(self, text: str) -> str:
        text = text.translate(self._hide)
        for hidden, token in self._kept.items():
            text = text.replace(hidden, token)
        return text

    def restore(self, text: str) -> str:
        return text.translate(self._restore)

    def hide_in(self, conversation: list[dict]) -> list[dict]:
        """A copy of the conversation with its message text hidden (media items are shared, not copied)."""
        return [{**message, "content": self._hide_content(message["content"])} for message in conversation]

    def _hide_content(self, content):
        if isinstance(content, str):
            return self.hide(content)
        return [
            {**item, "text": self.hide(item["text"])} if isinstance(item.get("text"), str) else item for item in content
        ]


def _template_variables(template: str) -> set[str]:
    """The variables a chat template reads, so that call kwargs can be told apart from template kwargs."""
    return jinja2.meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(template))
