#!/usr/bin/env python
"""Build the Qwen-VL (2023) tokenizer files from our Qwen2 tokenizer, with Qwen-VL's special tokens.

The original tokenizer is tiktoken's `qwen.tiktoken` (151,643 byte-level tokens) plus 217 special tokens. Those
151,643 tokens, their ids and the pre-tokenizer regex are exactly our Qwen2 `tokenizer.json`'s (the spec
compared all of them and 93,375 encoded tokens), so the fast tokenizer is ours with the added tokens replaced:

    151643 <|endoftext|>, 151644 <|im_start|>, 151645 <|im_end|>, 151646 + n <|extra_n|> (n = 0..204),
    151851 <ref> </ref> <box> </box> <quad> </quad> <img> </img> <imgpad> (to 151859)

Written to --dst: tokenizer.json, tokenizer_config.json, vocab.json and merges.txt (copied), chat_template.jinja
(tools/qwen_vl_chat_template.jinja: the original make_context). With --tiktoken, the vocabulary of an original
`qwen.tiktoken` is first checked to equal ours token by token (else nothing is written), so the files are the
same whichever source is named.

Usage:
    python tools/build_qwen_vl_tokenizer.py --dst DIR [--tiktoken path/to/qwen.tiktoken]
"""

import argparse
import base64
import json
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = Path(__file__).resolve().parent / "qwen_vl_chat_template.jinja"
NUM_REGULAR_TOKENS = 151643
# Inside the original make_context only these are special in message text (IMAGE_ST); grounding answers use them.
TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{n}|>" for n in range(205)), *TAGS]

# The original tokenizer has no eos or pad token; generation stops on <|endoftext|> (and a chat reply at
# <|im_end|>), which also pads. Padding goes on the left, as for batched generation.
TOKENIZER_SETTINGS = {
    "tokenizer_class": "Qwen2Tokenizer",
    "bos_token": None,
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "additional_special_tokens": SPECIAL_TOKENS[1:],
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "errors": "replace",
    "split_special_tokens": False,
    "model_max_length": 8192,
    "padding_side": "left",
}


def added_tokens() -> list[dict]:
    return [
        {"id": NUM_REGULAR_TOKENS + i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, text in enumerate(SPECIAL_TOKENS)
    ]


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in tokenizer.json, back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            codes[chr(byte)] = byte
        else:
            codes[chr(256 + extra)] = byte
            extra += 1
    return codes


def token_bytes(vocab: dict[str, int]) -> list[bytes]:
    """The bytes of every regular token, by id."""
    decode = byte_decoder()
    tokens = [b""] * len(vocab)
    for text, token_id in vocab.items():
        tokens[token_id] = bytes(decode[char] for char in text)
    return tokens


def check_tiktoken(path: Path, vocab: dict[str, int]) -> None:
    """Refuse a qwen.tiktoken whose (bytes, rank) pairs are not exactly our regular tokens (CRLF or LF lines)."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[int(rank)] = base64.b64decode(token)
    ours = token_bytes(vocab)
    if sorted(ranks) != list(range(len(ours))):
        raise ValueError(f"{path} has {len(ranks)} tokens, ours {len(ours)}")
    differ = [rank for rank, token in ranks.items() if ours[rank] != token]
    if differ:
        raise ValueError(f"{path} differs from our tokenizer at {len(differ)} ids, e.g. {differ[:5]}")


def build(dst: Path, tiktoken: Path | None = None, src: Path = REPO_ROOT) -> None:
    tokenizer = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer["model"]["vocab"]
    if len(vocab) != NUM_REGULAR_TOKENS or sorted(vocab.values()) != list(range(NUM_REGULAR_TOKENS)):
        raise ValueError(f"expected regular token ids 0..{NUM_REGULAR_TOKENS - 1}, got {len(vocab)} tokens")
    if tiktoken is not None:
        check_tiktoken(tiktoken, vocab)
    tokenizer["added_tokens"] = added_tokens()
    decoder = {str(entry["id"]): {k: v for k, v in entry.items() if k != "id"} for entry in tokenizer["added_tokens"]}
    dst.mkdir(parents=True, exist_ok=True)
    write_json(dst / "tokenizer.json", tokenizer)
    write_json(dst / "tokenizer_config.json", {"added_tokens_decoder": decoder, **TOKENIZER_SETTINGS})
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / name, dst / name)
    shutil.copyfile(CHAT_TEMPLATE, dst / "chat_template.jinja")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dst", type=Path, required=True, help="output folder")
    parser.add_argument("--tiktoken", type=Path, help="an original qwen.tiktoken, checked against our vocabulary")
    args = parser.parse_args(argv)
    try:
        build(args.dst, args.tiktoken)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote the Qwen-VL (2023) tokenizer files to {args.dst}")


if __name__ == "__main__":
    main()
