"""Write the repo root's config.json: the small embedded model's architecture, with auto_map.

Usage: python tools/write_root_config.py [--dst DIR]
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configuration_qwenvl import QwenVLConfig  # noqa: E402

AUTO_MAP = {
    "AutoConfig": "configuration_qwenvl.QwenVLConfig",
    "AutoModel": "modeling_qwenvl.QwenVLModel",
    "AutoModelForImageTextToText": "modeling_qwenvl.QwenVLForConditionalGeneration",
}


def embedded_config():
    """Qwen2.5-VL family, real tokenizer vocabulary, small enough to train on 2 CPU cores."""
    config = QwenVLConfig(
        vocab_size=151936, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, mrope_section=[4, 6, 6], tie_word_embeddings=True, max_position_embeddings=32768,
        vision_config=dict(
            depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128,
            fullatt_block_indexes=[3], window_size=112, tokens_per_second=2,
        ),
    )
    config.architectures = ["QwenVLForConditionalGeneration"]
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dst", default=ROOT, help="directory to write config.json into (default: repo root)")
    args = parser.parse_args()
    data = embedded_config().to_dict()
    data["auto_map"] = AUTO_MAP
    with open(os.path.join(args.dst, "config.json"), "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
