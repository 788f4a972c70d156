"""Fine-tune a qwenvl model on chat conversations with images and videos, with transformers' Trainer.

The data is a JSONL file with one conversation per line, in the qwen-vl-utils message format that the
processor's chat template takes:

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}

Relative image and video paths are read from the JSONL file's folder. Only the assistant's answers are
supervised, each with its closing <|im_end|>: the system and user turns, the images and videos and the
padding are not. The loss runs the vocabulary head on the supervised positions only.

By default every weight trains; --freeze keeps parts fixed (e.g. `--freeze vision` trains the merger and
the language model), and --lora trains LoRA adapters on the language model's attention and MLP projections
and the vision blocks' qkv instead (needs the optional `peft` package). --gradient-checkpointing recomputes
the activations of both towers' blocks in the backward pass, to fit longer sequences and larger images.

Usage: python examples/finetune.py --model DIR --data train.jsonl --output-dir OUT [--lora] [--freeze ...]
"""

import argparse
import dataclasses
import json
import os
import re
import sys

import torch
from transformers import Trainer, TrainingArguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from modeling_qwenvl import QwenVLForConditionalGeneration  # noqa: E402
from processing_qwenvl import QwenVLProcessor  # noqa: E402

# An assistant turn as the chat template writes it; group 1 is what the model must learn to write.
ANSWER = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)
VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>")
# The tokens the processor widens to one per merged vision token.
PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>")
BATCH_KEYS = (
    "input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
    "second_per_grid_ts",
)
IGNORE = -100  # the label of a position that is not supervised


# --- data ------------------------------------------------------------------------------------------


def load_conversations(path):
    """The conversations of a JSONL file as [{"messages": [...]}], relative media paths made absolute."""
    folder = os.path.dirname(os.path.abspath(path))
    conversations = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise ValueError(f'{path}:{number}: each line must be an object {{"messages": [...]}}')
            conversations.append({"messages": [resolve_media(message, folder) for message in record["messages"]]})
    if not conversations:
        raise ValueError(f"{path} holds no conversations")
    return conversations


def resolve_media(message, folder):
    """The message with each relative image or video path joined to `folder` (URLs and data: URIs kept)."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    content = []
    for item in message["content"]:
        if isinstance(item, dict):
            item = dict(item)
            for key in ("image", "video"):
                if is_relative_path(item.get(key)):
                    item[key] = os.path.join(folder, item[key])
        content.append(item)
    return {**message, "content": content}


def is_relative_path(value):
    if not isinstance(value, str) or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value):  # http:, file:, data: ...
        return False
    return not os.path.isabs(value)


def messages_of(example, index):
    """The message list of one dataset example: {"messages": [...]} or the list itself."""
    messages = example.get("messages") if isinstance(example, dict) else example
    if not isinstance(messages, list) or not messages:
        raise TypeError(
            f'example {index} must be {{"messages": [...]}} or a non-empty list of messages, got {type(example).__name__}'
        )
    if not any(isinstance(message, dict) and message.get("role") == "assistant" for message in messages):
        raise ValueError(f"example {index} has no assistant message, so nothing in it would be supervised")
    return messages


class ChatCollator:
    """Conversations -> one right-padded batch for the model's forward, labelled on the answers only.

    The processor builds the inputs: it renders the chat template, loads the media and widens each
    placeholder to its image's or video's token count. The labels come from the rendered text: the
    characters of each answer (after `<|im_start|>assistant\\n`, up to and including its `<|im_end|>`) are
    mapped to tokens through the tokenizer's character offsets, which holds for every turn of a multi-turn
    conversation. A token that straddles the start of an answer (the header's newline merged with an
    answer that itself opens with a newline) stays unsupervised: a generation prompt already ends with
    that newline."""

    def __init__(self, processor):
        # Duck-typed: AutoProcessor(trust_remote_code=True) gives a QwenVLProcessor from another module.
        if not callable(getattr(processor, "apply_chat_template", None)) or not hasattr(processor, "tokenizer"):
            raise TypeError(f"ChatCollator needs a QwenVLProcessor, got {type(processor).__name__}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.vision_ids = set(self.tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)))
        self.placeholder_ids = set(self.tokenizer.convert_tokens_to_ids(list(PLACEHOLDERS)))
        self.placeholders = torch.tensor(sorted(self.placeholder_ids))

    def __call__(self, examples):
        conversations = [messages_of(example, index) for index, example in enumerate(examples)]
        inputs = self.processor.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_tensors="pt", padding=True, padding_side="right"
        )
        prompts = self.processor.apply_chat_template(conversations)
        batch = {name: inputs[name] for name in BATCH_KEYS if name in inputs}
        batch["labels"] = self.labels(prompts, inputs["input_ids"], inputs["attention_mask"])
        return batch

    def labels(self, prompts, input_ids, attention_mask):
        """input_ids where a token belongs to an answer, IGNORE everywhere else."""
        labels = torch.full_like(input_ids, IGNORE)
        for row, prompt in enumerate(prompts):
            text_ids, text_labels = self.text_token_labels(prompt)
            # The processor's row is the same tokens with each placeholder widened, then padding:
            # the tokens that are neither line up one to one with the text's.
            kept = attention_mask[row].bool() & ~torch.isin(input_ids[row], self.placeholders)
            positions = kept.nonzero().flatten()
            if input_ids[row, positions].tolist() != text_ids:
                raise RuntimeError(
                    f"sample {row}: the processor's tokens differ from those of the rendered conversation, "
                    "so the answers cannot be located in them"
                )
            labels[row, positions] = torch.tensor(text_labels, dtype=labels.dtype)
        return labels

    def text_token_labels(self, prompt):
        """Token ids and labels of a rendered conversation, its placeholders left out."""
        encoding = self.tokenizer(prompt, return_offsets_mapping=True)
        answers = [match.span(1) for match in ANSWER.finditer(prompt)]
        ids, labels = [], []
        for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            if token in self.placeholder_ids:
                continue
            in_answer = any(first <= start and end <= last for first, last in answers)
            ids.append(token)
            labels.append(token if in_answer and token not in self.vision_ids else IGNORE)
        return ids, labels


# --- what trains ------------------------------------------------------------------------------------

FREEZABLE_PARTS = {
    "vision": "the vision encoder: patch embedding and vision blocks",
    "merger": "the merger, which projects each 2x2 group of patches into the language model",
    "language": "the language model: embeddings, decoder layers, final norm and vocabulary head",
}


def part_modules(model, part):
    if not isinstance(getattr(getattr(model, "model", None), "visual", None), torch.nn.Module):
        raise TypeError(f"expected a QwenVLForConditionalGeneration, got {type(model).__name__}")
    visual = model.model.visual
    return {
        "vision": [visual.patch_embed, visual.blocks],
        "merger": [visual.merger],
        "language": [model.model.language_model, model.lm_head],
    }[part]


def freeze(model, parts):
    """Keep the named parts (keys of FREEZABLE_PARTS) of a QwenVLForConditionalGeneration fixed."""
    unknown = sorted(set(parts) - set(FREEZABLE_PARTS))
    if unknown:
        raise ValueError(f"cannot freeze {unknown}: the parts are {sorted(FREEZABLE_PARTS)}")
    for part in parts:
        for module in part_modules(model, part):
            module.requires_grad_(False)
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise ValueError(f"freezing {sorted(set(parts))} leaves nothing to train")
    return model


# A regex on whole module names: the Qwen2.5-VL vision MLP has gate/up/down_proj too, which stay out.
LORA_TARGETS = (
    r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    r"|model\.visual\.blocks\.\d+\.attn\.qkv"
)


def add_lora(model, rank=16, alpha=32, dropout=0.05):
    """Wrap the model in a PEFT LoRA model: only the adapters on LORA_TARGETS train."""
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs the optional peft package: pip install peft") from None
    if rank < 1:
        raise ValueError(f"the LoRA rank must be at least 1, got {rank}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS)
    return peft.get_peft_model(model, config)


class QwenVLTrainer(Trainer):
    """A Trainer whose loss sends only the labelled positions through the vocabulary head (the model's
    `labelled_logits_only`): the same loss, without [batch, length, vocab] logits for prompts and images."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        return super().compute_loss(model, {**inputs, "labelled_logits_only": True}, *args, **kwargs)


def checkpointing_arguments():
    """TrainingArguments fields that turn gradient checkpointing on, for the blocks of both towers.

    Non-reentrant, so that a checkpointed block whose input needs no gradient (a frozen or LoRA-wrapped
    vision tower) still passes gradients to its own trainable weights. transformers 5 renamed the fields."""
    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a qwenvl directory or an official Qwen2-VL / Qwen2.5-VL checkpoint")
    parser.add_argument("--processor", help="where the processor files are (default: --model)")
    parser.add_argument("--data", required=True, help="JSONL file, one {\"messages\": [...]} per line")
    parser.add_argument("--output-dir", required=True, help="where the fine-tuned model (or adapter) is saved")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=1, help="conversations per step and device")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: 2e-4 with --lora, 1e-5 without)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--max-pixels", type=int, help="cap on each image's pixels (default: the processor's)")
    parser.add_argument("--freeze", nargs="+", default=[], choices=sorted(FREEZABLE_PARTS),
                        help="; ".join(f"{name}: {text}" for name, text in FREEZABLE_PARTS.items()))
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the weights (pip install peft)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--merge-lora", action="store_true",
                        help="save the model with the adapters merged in (a plain qwenvl directory) instead of the adapters")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.lora and args.freeze:
        parser.error("--freeze applies to full fine-tuning; with --lora only the adapters train")
    if args.merge_lora and not args.lora:
        parser.error("--merge-lora needs --lora")
    check_output_dir(parser, args)
    return args


def check_output_dir(parser, args):
    """Refuse, before training, an --output-dir whose saving would write over the model or processor being read:
    the same directory (by real path: symbolic links followed), or one holding the very same files (hard links, as
    convert_checkpoint.py makes, or symbolic ones). Saving would overwrite the input model, or with the repo root as
    the model fail with shutil.SameFileError after the whole run."""
    for option, source in (("--model", args.model), ("--processor", args.processor)):
        if source is None or not os.path.isdir(source):
            continue  # a Hub name: nothing local to overwrite
        if os.path.realpath(source) == os.path.realpath(args.output_dir):
            parser.error(
                f"--output-dir {args.output_dir} is the {option} directory: saving would overwrite what this run "
                "reads; choose a new directory"
            )
        shared = files_shared(source, args.output_dir)
        if shared:
            parser.error(
                f"--output-dir {args.output_dir} holds {', '.join(shared[:3])}, the very files of {option} "
                f"{source} (hard or symbolic links): saving would overwrite them; choose a new directory"
            )


def files_shared(directory, other):
    """The names of the files in `other` that are files of `directory` (the same file on disk), sorted."""
    def identities(folder):
        found = {}
        if os.path.isdir(folder):
            for entry in os.scandir(folder):
                if entry.is_file():  # follows symbolic links, as writing to one would
                    status = entry.stat()
                    found[(status.st_dev, status.st_ino)] = entry.name
        return found

    ours = identities(directory)
    return sorted(name for key, name in identities(other).items() if key in ours)


def main(argv=None):
    args = parse_args(argv)
    processor_options = {"max_pixels": args.max_pixels} if args.max_pixels else {}
    processor = QwenVLProcessor.from_pretrained(args.processor or args.model, **processor_options)
    conversations = load_conversations(args.data)
    model = QwenVLForConditionalGeneration.from_pretrained(args.model)
    model = add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout) if args.lora else freeze(model, args.freeze)

    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr if args.lr is not None else (2e-4 if args.lora else 1e-5),
        warmup_steps=args.warmup_steps, lr_scheduler_type="cosine", logging_steps=args.logging_steps,
        save_strategy="no", report_to=[], seed=args.seed, bf16=args.bf16,
        remove_unused_columns=False,  # the collator reads the "messages" column
        **(checkpointing_arguments() if args.gradient_checkpointing else {}),
    )
    trainer = QwenVLTrainer(
        model=model, args=training_args, train_dataset=conversations, data_collator=ChatCollator(processor)
    )
    result = trainer.train()
    if args.merge_lora:
        trainer.model.merge_and_unload().save_pretrained(args.output_dir)
    else:
        trainer.save_model(args.output_dir)
    processor.save_pretrained(args.output_dir)
    return result


if __name__ == "__main__":
    main()
