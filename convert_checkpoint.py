"""Turn an official Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense or MoE) checkpoint directory into a qwenvl model directory.

    python convert_checkpoint.py --src Qwen2.5-VL-7B-Instruct --dst qwen25-vl-7b          # weights hard-linked
    python convert_checkpoint.py --src Qwen2.5-VL-7B-Instruct --dst qwen25-vl-7b --copy   # weights copied

The result loads anywhere, without this repo, with trust_remote_code=True:

    AutoModelForImageTextToText.from_pretrained(dst, trust_remote_code=True)
    AutoProcessor.from_pretrained(dst, trust_remote_code=True)
    pipeline("image-text-to-text", model=dst, trust_remote_code=True)

What DST receives:
  config.json             the official config read through QwenVLConfig (model_type qwenvl), with auto_map;
                          the summary names its family (QwenVLConfig.family: qwen3_vl, qwen2_5_vl or qwen2_vl)
  *_qwenvl.py             the four code files
  tokenizer files         the source's if it has them, else this repo's (the same Qwen tokenizer);
                          tokenizer_config.json gets padding_side "left", which batched generate needs
  chat template           the source's (chat_template.jinja/.json, or the one inside tokenizer_config.json),
                          else this repo's chat_template.jinja
  preprocessor_config.json  our image processor and auto_map, keeping the source's min/max pixels
  generation_config.json  the source's, else one made from the config
  LICENSE, README.md      copied when present: the weights' licence travels with them
  weights                 model.safetensors or the shards and model.safetensors.index.json, unchanged

The weights are not rewritten: qwenvl renames the hub layout (model.layers.*, visual.*; Qwen3-VL's linear_fc1 and
merger.norm names) while loading, and Qwen3-VL MoE experts are stored as qwenvl holds them ([E, hidden, 2I]). They are
hard-linked (no extra disk space; a symbolic link where SRC and DST are on different file systems) or, with
--copy, copied. Nothing is loaded into memory: weight names and shapes are checked against the config from the
safetensors headers alone.

A hard link shares its data with the source file: writing into a linked file (for example save_pretrained into
DST) would change the source checkpoint too. Save fine-tuned models to a new directory, or convert with --copy.
"""

import argparse
import base64
import errno
import json
import os
import re
import shutil
import struct
import uuid
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast

from configuration_qwenvl import AUTO_MAP, QwenVLConfig
from image_processing_qwenvl import QwenVLImageProcessor
from modeling_qwenvl import (
    HUB_KEY_MAPPING, QWEN3_KEY_MAPPING, QwenVLForConditionalGeneration, check_layer_counts, is_qwen_vl_2023_directory, kimi_state_dict,
    qwen_vl_2023_generation_config, qwen_vl_2023_state_dict, read_checkpoint_tensors,
)
from processing_qwenvl import PROCESSOR_AUTO_MAP
from safetensors.torch import save_file
from tools.build_qwen_vl_tokenizer import build as build_qwen_vl_tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
# The Qwen3-VL chat template, for a Qwen3-VL checkpoint that ships none.
QWEN3_CHAT_TEMPLATE = "chat_template_qwen3_vl.jinja"
OFFICIAL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "kimi_vl")
CODE_FILES = ("configuration_qwenvl.py", "modeling_qwenvl.py", "processing_qwenvl.py", "image_processing_qwenvl.py")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
)
CARRIED_FILES = ("LICENSE", "README.md")
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# The official preprocessor_config.json settings that our image processor takes over; the others name the
# official classes.
IMAGE_PROCESSOR_KEYS = (
    "min_pixels", "max_pixels", "size", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
    "image_std", "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb",
)
# What a source without preprocessor_config.json gets, per family: Qwen3-VL's official file (the same in every
# checkpoint of the family), not our processor's Qwen2.5 defaults (14-px patches, CLIP's mean and std).
FAMILY_PREPROCESSOR_DEFAULTS = {
    "qwen3_vl": {
        "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    },
}
# os.link fails with these where the file system cannot hard-link (EXDEV: SRC and DST on different ones).
NO_HARD_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


# ---- reading the source --------------------------------------------------------------------------------------


def read_json_object(path):
    """A JSON file that must hold an object (every config file does)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_official_config(src):
    """The source's config.json as a dict, refused unless it is a Qwen2-VL, Qwen2.5-VL or Qwen3-VL one."""
    if not os.path.isdir(src):
        raise ValueError(f"--src {src!r} is not a directory")
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{src} has no config.json, so it is not a model checkpoint directory")
    config = read_json_object(path)
    model_type = config.get("model_type")
    if model_type not in OFFICIAL_MODEL_TYPES:
        raise ValueError(
            f"{path} has model_type {model_type!r}; expected {' or '.join(OFFICIAL_MODEL_TYPES)} "
            "(an official Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint)"
        )
    return config


def qwenvl_config(official, src):
    """Our config for the official one: either family and either config.json shape, with auto_map."""
    try:
        config = QwenVLConfig.from_dict(dict(official))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{os.path.join(src, 'config.json')} cannot be read as a qwenvl config: {error}") from error
    config.architectures = ["QwenVLForConditionalGeneration"]
    config.auto_map = dict(AUTO_MAP)
    return config


def weight_files(src):
    """(file names to place in DST, the index file name or None, the index's weight map or None)."""
    index_path = os.path.join(src, WEIGHTS_INDEX)
    if os.path.isfile(index_path):
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map (tensor name -> shard file)")
        shards = sorted(set(weight_map.values()))
        nested = [shard for shard in shards if not isinstance(shard, str) or os.path.basename(shard) != shard]
        if nested:
            raise ValueError(f"{index_path} names shards that are not plain file names: {nested[:3]}")
        missing = [shard for shard in shards if not os.path.isfile(os.path.join(src, shard))]
        if missing:
            raise ValueError(
                f"{index_path} lists {len(missing)} shard(s) that are not in {src}: {missing[:5]} "
                "(an incomplete download?)"
            )
        return shards, WEIGHTS_INDEX, weight_map
    if os.path.isfile(os.path.join(src, SINGLE_WEIGHTS)):
        return [SINGLE_WEIGHTS], None, None
    others = sorted(name for name in os.listdir(src) if name.endswith((".safetensors", ".bin", ".pt", ".pth")))
    hint = f"; found {others[:5]}, which are not that: save them as safetensors first" if others else ""
    raise ValueError(f"{src} has no safetensors weights ({SINGLE_WEIGHTS} or {WEIGHTS_INDEX}){hint}")


def safetensors_shapes(path):
    """{tensor name: shape} from a safetensors file's JSON header, without reading any tensor data."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file: it is shorter than a header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path} is not a safetensors file: its header claims {length} bytes")
        header = f.read(length)
    try:
        entries = json.loads(header)
        entries.pop("__metadata__", None)
        return {name: tuple(entry["shape"]) for name, entry in entries.items()}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a safetensors file: its header cannot be read ({error!r})") from error


def stored_shapes(src, shards, weight_map):
    """{tensor name: shape} over all the weight files; with an index, each tensor must be in its listed shard."""
    shapes, holder = {}, {}
    for shard in shards:
        for name, shape in safetensors_shapes(os.path.join(src, shard)).items():
            shapes[name], holder[name] = shape, shard
    for name, shard in (weight_map or {}).items():
        if holder.get(name) != shard:
            raise ValueError(f"{WEIGHTS_INDEX} puts {name!r} in {shard}, but that file does not hold it")
    return shapes


def canonical_name(name):
    """The name a hub-layout weight gets on load (the first matching rule of the key mapping, as transformers does)."""
    for pattern, replacement in {**HUB_KEY_MAPPING, **QWEN3_KEY_MAPPING}.items():
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    return name


def check_weights(config, shapes, src):
    """Refuse weights whose names or shapes do not fit the config, comparing with a model built on the meta device
    (no memory); a tied lm_head may be absent, as in the 2B/3B checkpoints."""
    with torch.device("meta"):
        model = QwenVLForConditionalGeneration(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {canonical_name(name): shape for name, shape in shapes.items()}
    if config.family == "kimi_vl":  # compared under the official names, experts one by one
        expected = {name: tuple(tensor.shape) for name, tensor in kimi_state_dict(model.state_dict()).items()}
        found = dict(shapes)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{name} {found[name]} (config needs {expected[name]})"
        for name in sorted(set(expected) & set(found)) if expected[name] != found[name]
    ]
    problems = [
        f"{len(names)} {what}: {names[:4]}"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("with a wrong shape", wrong))
        if names
    ]
    if problems:
        raise ValueError(f"the weights in {src} do not fit its config.json: " + "; ".join(problems))


# ---- the other files -----------------------------------------------------------------------------------------


def tokenizer_directory(src):
    """The source when it ships a tokenizer, else this repo (the same Qwen tokenizer)."""
    has_tokenizer = os.path.isfile(os.path.join(src, "tokenizer.json")) or all(
        os.path.isfile(os.path.join(src, name)) for name in ("vocab.json", "merges.txt")
    )
    return src if has_tokenizer else ROOT


def left_padding(tokenizer_config_path):
    """The tokenizer config with padding_side "left": generate continues each row after its last token."""
    return dict(read_json_object(tokenizer_config_path), padding_side="left")


def chat_template_file(src, family):
    """(directory, file name) of the chat template to copy, or (None, None) when the source's template lives in
    the tokenizer_config.json that is copied anyway. Without one of its own, a source gets ours for its family
    (written as chat_template.jinja)."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.isfile(os.path.join(src, name)):
            return src, name
    tokenizer_config = os.path.join(src, "tokenizer_config.json")
    if tokenizer_directory(src) == src and os.path.isfile(tokenizer_config):
        if read_json_object(tokenizer_config).get("chat_template"):
            return None, None
    return ROOT, QWEN3_CHAT_TEMPLATE if family == "qwen3_vl" else "chat_template.jinja"


def preprocessor_config(src, family):
    """Our image processor's config, keeping the source's settings (min/max pixels above all); without a source file,
    the family's official settings."""
    path = os.path.join(src, "preprocessor_config.json")
    if os.path.isfile(path):
        official = read_json_object(path)
        settings = {key: official[key] for key in IMAGE_PROCESSOR_KEYS if key in official}
    else:
        settings = dict(FAMILY_PREPROCESSOR_DEFAULTS.get(family, {}))
    try:
        processor = QwenVLImageProcessor(**settings)  # refuse now what the processor would refuse when loading
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path} has settings the qwenvl image processor cannot use: {error}") from error
    config = {key: value for key, value in processor.to_dict().items() if not key.startswith("_")}
    config.update(
        auto_map=dict(PROCESSOR_AUTO_MAP), image_processor_type="QwenVLImageProcessor", processor_class="QwenVLProcessor"
    )
    return config


def write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def check_destination(dst):
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"--dst {dst!r} exists and is not a directory")
    if os.path.isdir(dst) and os.listdir(dst):
        raise ValueError(f"--dst {dst!r} is not empty: choose a new or empty directory (nothing is overwritten)")


def place_weights(source, target, copy):
    """Copy, or hard-link (a symbolic link to the real file where the file system cannot); returns which."""
    if copy:
        shutil.copyfile(source, target)
        return "copied"
    try:
        os.link(source, target)  # follows a symbolic source (a Hub cache snapshot) to the real file
        return "hard-linked"
    except OSError as error:
        if error.errno not in NO_HARD_LINK:
            raise
    os.symlink(os.path.realpath(source), target)
    return "symlinked"


# ---- conversion ----------------------------------------------------------------------------------------------


class Plan(NamedTuple):
    """What a conversion writes, all of it read from the source and checked before anything is written."""

    config: QwenVLConfig
    shards: list  # the weight files
    index: Optional[str]  # the weights' index file, or None for a single file
    processor_config: dict
    tokenizer_dir: str  # the source, or this repo
    template: tuple  # (directory, file name) of the chat template to copy, or (None, None)
    generation_path: Optional[str]  # the source's generation_config.json, or None: one is made from the config


def plan_conversion(src):
    """Read and check everything `src` must provide; ValueError naming the first problem."""
    config = qwenvl_config(read_official_config(src), src)
    shards, index, weight_map = weight_files(src)
    shapes = stored_shapes(src, shards, weight_map)
    # The layer counts first, from the tensor names alone: check_weights builds the model (on the meta device, yet
    # every layer is still Python objects), which took minutes and gigabytes for a config claiming 100000 layers.
    check_layer_counts(src, config)
    check_weights(config, shapes, src)
    generation_path = os.path.join(src, "generation_config.json")
    if os.path.isfile(generation_path):
        read_json_object(generation_path)  # copied as it is, but refused now if it is not a config
    else:
        generation_path = None
    if config.family == "kimi_vl":
        return Plan(config, shards, index, kimi_preprocessor_config(src), src, (None, None), generation_path)
    processor_config = preprocessor_config(src, config.family)
    template = chat_template_file(src, config.family)
    return Plan(config, shards, index, processor_config, tokenizer_directory(src), template, generation_path)


def convert(src, dst, copy=False):
    """Convert the official checkpoint directory `src` into the qwenvl directory `dst` (new or empty).

    Everything is checked before anything is written. The files are written into a new directory beside `dst`, which
    becomes `dst` only once it is complete: a failure part way (a full disk, an unreadable file) leaves no partial
    `dst` behind. Returns {file name in dst: how it got there}.
    """
    qwen_vl_2023 = is_qwen_vl_2023_directory(src)
    plan = plan_qwen_vl_2023(src) if qwen_vl_2023 else plan_conversion(src)
    check_destination(dst)
    target = os.path.realpath(dst)  # an empty dst that is a symbolic link: replace the directory it points to
    partial = new_directory_beside(target)
    try:
        written = write_qwen_vl_2023(src, partial, plan) if qwen_vl_2023 else write_directory(src, partial, plan, copy)
        if os.path.isdir(target):
            os.rmdir(target)  # an empty dst is allowed: the complete directory takes its place
        os.rename(partial, target)
    except BaseException:  # interrupted too: whatever was written goes
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return written


def new_directory_beside(target):
    """A new, uniquely named directory in the folder that holds `target` (created if needed): on the same file
    system, so that renaming it to `target` is one step, and hidden, so that a listing does not show it as a model."""
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    partial = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:12]}")
    os.mkdir(partial)  # not tempfile.mkdtemp: that directory is private (mode 700), and dst would stay so
    return partial


def write_directory(src, dst, plan, copy):
    """Write every file of the converted model into the new, empty directory `dst`; {file name: how}."""
    written = {}

    def origin(directory):
        return "the source" if directory == src else "qwenvl"

    def copy_file(directory, name, target=None):
        shutil.copyfile(os.path.join(directory, name), os.path.join(dst, target or name))
        written[target or name] = f"copied from {origin(directory)}"

    plan.config.to_json_file(os.path.join(dst, "config.json"))
    written["config.json"] = f"written (model_type qwenvl, family {plan.config.family}, auto_map)"
    for name in CODE_FILES:
        copy_file(ROOT, name)
    if plan.config.family == "kimi_vl":
        kimi_tokenizer(src).save_pretrained(dst)
        written["tokenizer.json"] = "converted from the source's tiktoken.model (with its chat template)"
    for name in TOKENIZER_FILES if plan.config.family != "kimi_vl" else ():
        if name == "tokenizer_config.json" and os.path.isfile(os.path.join(plan.tokenizer_dir, name)):
            write_json(os.path.join(dst, name), left_padding(os.path.join(plan.tokenizer_dir, name)))
            written[name] = f"from {origin(plan.tokenizer_dir)}, padding_side left"
        elif os.path.isfile(os.path.join(plan.tokenizer_dir, name)):
            copy_file(plan.tokenizer_dir, name)
    template_dir, template_name = plan.template
    if template_name is not None:  # ours is always chat_template.jinja in the converted folder
        copy_file(template_dir, template_name, "chat_template.jinja" if template_dir == ROOT else None)
    write_json(os.path.join(dst, "preprocessor_config.json"), plan.processor_config)
    written["preprocessor_config.json"] = "written (QwenVLImageProcessor, auto_map)"
    if plan.generation_path is not None:
        copy_file(src, "generation_config.json")
    else:
        GenerationConfig.from_model_config(plan.config).save_pretrained(dst)
        written["generation_config.json"] = "written from the config"
    for name in CARRIED_FILES:
        if os.path.isfile(os.path.join(src, name)):
            copy_file(src, name)
    if plan.index is not None:
        copy_file(src, plan.index)
    # a progress bar (stderr) for sharded checkpoints: copying 70 GB of shards takes minutes
    for shard in tqdm(plan.shards, desc="weights", unit="shard", disable=len(plan.shards) < 2):
        written[shard] = place_weights(os.path.join(src, shard), os.path.join(dst, shard), copy)
    return written


# ---- Qwen-VL (2023) ----------------------------------------------------------------------------------------------
# The original Qwen-VL / Qwen-VL-Chat folders (model_type "qwen", keys transformer.*) ship pickle `.bin` shards and
# fused q/k/v: their tensors are read (torch.load with weights_only=True: tensors only, no code runs), converted by
# modeling_qwenvl.qwen_vl_2023_state_dict and written as one model.safetensors.


class QwenVL2023Plan(NamedTuple):
    config: QwenVLConfig
    state_dict: dict  # our tensor names -> tensors
    processor_config: dict
    tiktoken: Optional[str]  # the source's qwen.tiktoken, checked against our tokenizer, or None


def plan_qwen_vl_2023(src):
    official = read_json_object(os.path.join(src, "config.json"))
    config = qwenvl_config(official, src)
    tensors = read_checkpoint_tensors(src, allow_pickle=True)
    state_dict = qwen_vl_2023_state_dict(tensors, config)
    check_weights(config, {name: tuple(tensor.shape) for name, tensor in state_dict.items()}, src)
    image_processor = QwenVLImageProcessor(
        image_size=official["visual"]["image_size"], drop_alpha=True, patch_size=config.vision_config.patch_size,
        temporal_patch_size=1, merge_size=1,
    )
    processor_config = {key: value for key, value in image_processor.to_dict().items() if not key.startswith("_")}
    processor_config.update(
        auto_map=dict(PROCESSOR_AUTO_MAP), image_processor_type="QwenVLImageProcessor", processor_class="QwenVLProcessor"
    )
    tiktoken = os.path.join(src, "qwen.tiktoken")
    return QwenVL2023Plan(config, state_dict, processor_config, tiktoken if os.path.isfile(tiktoken) else None)


def write_qwen_vl_2023(src, dst, plan):
    written = {}
    plan.config.to_json_file(os.path.join(dst, "config.json"))
    written["config.json"] = f"written (model_type qwenvl, family {plan.config.family}, auto_map)"
    for name in CODE_FILES:
        shutil.copyfile(os.path.join(ROOT, name), os.path.join(dst, name))
        written[name] = "copied from qwenvl"
    build_qwen_vl_tokenizer(Path(dst), Path(plan.tiktoken) if plan.tiktoken else None)
    written["tokenizer files"] = "built from qwenvl's" + (" (qwen.tiktoken checked equal)" if plan.tiktoken else "")
    write_json(os.path.join(dst, "preprocessor_config.json"), plan.processor_config)
    written["preprocessor_config.json"] = "written (QwenVLImageProcessor, 448 px square, auto_map)"
    generation = qwen_vl_2023_generation_config(src, GenerationConfig.from_model_config(plan.config))
    generation.save_pretrained(dst)
    written["generation_config.json"] = "written from the source's (stop ids, sampling)"
    for name in CARRIED_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            written[name] = "copied from the source"
    save_file(plan.state_dict, os.path.join(dst, SINGLE_WEIGHTS), metadata={"format": "pt"})
    written[SINGLE_WEIGHTS] = "converted (fused q/k/v split, keys renamed)"
    return written


# ---- Kimi-VL: tokenizer and image processor settings ------------------------------------------------------------

# The split pattern of Kimi-VL's tokenizer (`pat_str` of its tokenization_moonshot.py): Han runs first, letters
# without Han, numbers in threes, then the usual punctuation and whitespace rules.
KIMI_PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
# Special tokens follow the vocabulary: 256 slots, the unnamed ones "<|reserved_token_{id}|>".
KIMI_SPECIAL_SLOTS = 256
# The chat template, for a checkpoint that ships none (third-party copies agree; the Hub's exact bytes are unverified).
KIMI_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{'<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>'}}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{'<|im_system|>'}}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{'<|im_user|>'}}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{'<|im_assistant|>'}}{%- endif -%}"
    "{{- message['role'] -}}{{'<|im_middle|>'}}"
    "{%- if message['content'] is string -%}{{- message['content'] + '<|im_end|>' -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{'<|media_start|>image<|media_content|><|media_pad|><|media_end|>'}}"
    "{%- else -%}{{content['text']}}{%- endif -%}"
    "{%- endfor -%}{{'<|im_end|>'}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<|im_assistant|>assistant<|im_middle|>'}}{%- endif -%}"
)


def byte_characters():
    """GPT-2's printable stand-in for each byte, the alphabet of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def read_tiktoken_ranks(path):
    """A tiktoken vocabulary file: one "base64-token rank" per line. -> {token bytes: rank}"""
    ranks = {}
    with open(path, "rb") as file:
        for line in file:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def tiktoken_as_tokenizer(ranks, pattern, special_tokens):
    """A tiktoken vocabulary as a `tokenizers` byte-level BPE that gives the same ids: each merge ranked by the token it
    makes (tiktoken merges the pair whose result has the lowest rank), a piece found whole in the vocabulary taken
    as it is (`ignore_merges`, as tiktoken does), and `special_tokens` (names in id order) after the vocabulary."""
    chars = byte_characters()

    def text(token):
        return "".join(chars[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
    vocab = {text(token): rank for token, rank in ranks.items()}
    tokenizer = Tokenizer(
        models.BPE(vocab, [(text(a), text(b)) for a, b in merges], fuse_unk=False, ignore_merges=True)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special_tokens])
    return tokenizer


def kimi_tokenizer(src):
    """Kimi-VL's tokenizer (a tiktoken.model and the tokenizer_config.json naming its special tokens) as a fast
    tokenizer that needs no tokenizer code, with the source's chat template (else KIMI_CHAT_TEMPLATE)."""
    vocabulary = os.path.join(src, "tiktoken.model")
    if not os.path.isfile(vocabulary):
        raise ValueError(f"{src} has no tiktoken.model: Kimi-VL's tokenizer vocabulary comes with its checkpoint")
    ranks = read_tiktoken_ranks(vocabulary)
    config_path = os.path.join(src, "tokenizer_config.json")
    config = read_json_object(config_path) if os.path.isfile(config_path) else {}
    named = {int(i): token["content"] for i, token in config.get("added_tokens_decoder", {}).items()}
    specials = [named.get(i, f"<|reserved_token_{i}|>") for i in range(len(ranks), len(ranks) + KIMI_SPECIAL_SLOTS)]
    template = config.get("chat_template")
    if os.path.isfile(os.path.join(src, "chat_template.jinja")):
        with open(os.path.join(src, "chat_template.jinja"), encoding="utf-8") as file:
            template = file.read()
    roles = {name: config[name] for name in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(name)}
    roles = {name: token["content"] if isinstance(token, dict) else token for name, token in roles.items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=tiktoken_as_tokenizer(ranks, KIMI_PATTERN, specials),
        chat_template=template or KIMI_CHAT_TEMPLATE,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],  # 4.x's base class would add token_type_ids
        **roles,
    )


def kimi_preprocessor_config(src):
    """Our image processor in Kimi-VL mode (in_token_limit), with the source's limit, mean and std."""
    path = os.path.join(src, "preprocessor_config.json")
    official = read_json_object(path) if os.path.isfile(path) else {}
    merge = official.get("merge_kernel_size", [2, 2])
    processor = QwenVLImageProcessor(
        in_token_limit=official.get("in_token_limit", 4096), patch_size=official.get("patch_size", 14),
        merge_size=merge[0], temporal_patch_size=1, image_mean=official.get("image_mean", [0.5] * 3),
        image_std=official.get("image_std", [0.5] * 3),
    )
    config = {key: value for key, value in processor.to_dict().items() if not key.startswith("_")}
    config.update(
        auto_map=dict(PROCESSOR_AUTO_MAP), image_processor_type="QwenVLImageProcessor",
        processor_class="QwenVLProcessor",
    )
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="the official checkpoint directory (config.json, safetensors)")
    parser.add_argument("--dst", required=True, help="the qwenvl directory to create (new or empty)")
    parser.add_argument("--copy", action="store_true", help="copy the weight files instead of hard-linking them")
    args = parser.parse_args(argv)
    try:
        written = convert(args.src, args.dst, copy=args.copy)
    except (ValueError, OSError) as error:  # OSError: a file that cannot be read or written (nothing is left in dst)
        parser.exit(2, f"convert_checkpoint.py: error: {error}\n")
    for name, how in written.items():
        print(f"{name:40s} {how}")
    print(f"\n{args.dst} loads with AutoModelForImageTextToText / AutoProcessor (trust_remote_code=True).")


if __name__ == "__main__":
    main()
