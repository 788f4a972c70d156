"""Train the small embedded qwenvl model from scratch on synthetic visual questions, on the CPU.

The model keeps the real architecture (window attention with full-attention layers, the 2x2
merger, M-RoPE, the real Qwen tokenizer and chat template); it is only small. Training uses
transformers' Trainer. Two things make it fast enough for 2 CPU cores:
- the loss is a softmax over the answer vocabulary plus random negatives from the whole
  vocabulary, computed only at supervised positions (the shipped model answers with the full
  vocabulary: the negatives teach it to keep every other token low);
- only the embedding rows of tokens that occur in the synthetic data are trained, as a small
  separate table, merged back into the full (tied) embedding at the end.

Usage: python examples/train_tiny.py [--output-dir DIR] [--to-root]        (the recipe, from scratch)
       python examples/train_tiny.py --steps N [--init-from DIR] [--lr X] ...  (one run of your own)
"""

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

import synthetic_tasks as tasks  # noqa: E402
from configuration_qwenvl import AUTO_MAP, QwenVLConfig  # noqa: E402
from image_processing_qwenvl import DEFAULT_FPS  # noqa: E402
from modeling_qwenvl import QwenVLForConditionalGeneration  # noqa: E402
from processing_qwenvl import QwenVLProcessor  # noqa: E402


# The official rope_theta (1e6), with which training starts. M-RoPE gives the width axis the head's lowest
# frequencies: with 1e6 and this model's 16 frequency pairs, moving one token across the picture turns the width
# pairs by at most 2e-4 radians, so the language model hardly sees where a token is, and questions about position
# stay near chance. The recipe's stage 3 switches to rotary base 20 (width 0.06-0.15 rad per token,
# height 0.19-0.47, time 0.32-1): see README, "The embedded model".
ROPE_THETA = 1e6


def embedded_config(rope_theta=ROPE_THETA):
    """Qwen2.5-VL family with the real vocabulary; small enough to train on 2 CPU cores."""
    config = QwenVLConfig(
        vocab_size=151936, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, mrope_section=[4, 6, 6], tie_word_embeddings=True, max_position_embeddings=32768,
        rope_theta=rope_theta,
        vision_config=dict(
            depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128,
            fullatt_block_indexes=[1, 3], window_size=112, tokens_per_second=2,
        ),
    )
    config.architectures = ["QwenVLForConditionalGeneration"]
    return config


# --- data ----------------------------------------------------------------------------------


class Encoder:
    """Example -> model inputs, with labels on the answer and the closing <|im_end|> only.

    The chat template and the processor are applied once per kind of input to learn the token
    layout around the question; each example then costs one small tokenization. `check` proves
    the layout equals the processor's own output."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.templates = {kind: self._template(kind) for kind in ("image", "video")}
        self.layouts = {kind: self._layout(kind) for kind in ("image", "video")}

    def rendered_prompt(self, example):
        return self.processor.apply_chat_template(tasks.messages(example, None), add_generation_prompt=True, tokenize=False)

    def prompt(self, example):
        """rendered_prompt's text without rendering the template again (`check` proves them equal)."""
        before, after = self.templates["video" if example.is_video else "image"]
        return before + example.question + after

    def _template(self, kind):  # the prompt's text before and after the question
        marker = "QUESTION"
        probe = tasks.Example("probe", marker, "", motion=("left", (0, 0)) if kind == "video" else None)
        return self.rendered_prompt(probe).split(marker)

    def _layout(self, kind):
        before, after = self.templates[kind]
        pad = f"<|{kind}_pad|>"
        head, tail = before.split(pad)
        return self.tokenizer(head)["input_ids"], self.tokenizer.convert_tokens_to_ids(pad), tail, after

    def __call__(self, example):
        visual = tasks.render(example)
        kind = "video" if example.is_video else "image"
        head, pad_id, tail, after = self.layouts[kind]
        image_processor = self.processor.image_processor
        if example.is_video:
            features = dict(image_processor(videos=[visual], return_tensors="pt"))
            features["second_per_grid_ts"] = torch.tensor([image_processor.temporal_patch_size / DEFAULT_FPS])
            grid = features["video_grid_thw"]
        else:
            features = dict(image_processor(images=[visual], return_tensors="pt"))
            grid = features["image_grid_thw"]
        pads = [pad_id] * int(grid.prod() // image_processor.merge_size**2)
        prompt_ids = head + pads + self.tokenizer(tail + example.question + after)["input_ids"]
        answer = self.tokenizer(example.answer + "<|im_end|>")["input_ids"]
        features["input_ids"] = prompt_ids + answer
        features["labels"] = [-100] * len(prompt_ids) + answer
        return features

    def check(self, examples):
        for example in examples:
            visual = tasks.render(example)
            media = {"videos": [visual], "fps": DEFAULT_FPS} if example.is_video else {"images": [visual]}
            assert self.prompt(example) == self.rendered_prompt(example), example
            reference = self.processor(text=[self.prompt(example)], return_tensors="pt", **media)
            ours = self(example)
            n_prompt = ours["labels"].count(-100)
            assert ours["input_ids"][:n_prompt] == reference["input_ids"][0].tolist(), example
            for name in ("pixel_values", "pixel_values_videos", "second_per_grid_ts"):
                if name in reference:
                    assert torch.equal(torch.as_tensor(ours[name]), torch.as_tensor(reference[name])), name


def side_question(rng):
    """A training-only step towards "is A left or right of B?": "What color is the shape on the left?" (or which
    shape, or top/bottom) about two shapes apart along that axis. Answering it needs each shape's tokens to say which
    side of the other it is on, which the comparison between two named shapes then reads."""
    horizontal = rng.random() < 0.5
    axis = 1 if horizontal else 0
    a, b = tasks.two_apart(rng, axis)
    first, last = sorted((a, b), key=lambda item: item.cell[axis])
    side = rng.choice(("on the left", "on the right") if horizontal else ("at the top", "at the bottom"))
    target = first if side in ("on the left", "at the top") else last
    if rng.random() < 0.5:
        return tasks.Example("position", f"What color is the shape {side}?", target.color, [a, b])
    return tasks.Example("position", f"Which shape is {side}?", target.shape, [a, b])


CURRICULUM = {"side": side_question}  # training-only question kinds: off unless given a weight


class QuestionSet(torch.utils.data.Dataset):
    """Question i is drawn from its own seeded generator: any order of indices gives the same data.
    Tasks come in a fixed rotation in which each task appears `weights[task]` times."""

    def __init__(self, encoder, seed, size, weights):
        self.encoder, self.seed, self.size = encoder, seed, size
        kinds = [(task, weights.get(task, 1)) for task in tasks.TASKS] + [(k, weights.get(k, 0)) for k in CURRICULUM]
        self.rotation = [task for task, weight in kinds for _ in range(weight)]

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        rng = random.Random(self.seed * 1_000_003 + index)
        task = self.rotation[index % len(self.rotation)]
        return self.encoder(CURRICULUM[task](rng) if task in CURRICULUM else tasks.sample(task, rng))


def collate(batch, pad_id):
    length = max(len(b["input_ids"]) for b in batch)
    out = {
        "input_ids": torch.tensor([b["input_ids"] + [pad_id] * (length - len(b["input_ids"])) for b in batch]),
        "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (length - len(b["input_ids"])) for b in batch]),
        "labels": torch.tensor([b["labels"] + [-100] * (length - len(b["labels"])) for b in batch]),
    }
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        parts = [b[name] for b in batch if name in b]
        if parts:
            out[name] = torch.cat([torch.as_tensor(p) for p in parts])
    return out


def data_vocabulary(encoder, seed, count=4000):
    """Every token id the synthetic prompts and answers use (scanned from a long seeded sample)."""
    rng = random.Random(seed)
    ids = set()
    for _ in range(count):
        example = tasks.sample(rng.choice(tasks.TASKS), rng)
        ids.update(encoder.tokenizer(encoder.prompt(example) + example.answer + "<|im_end|>")["input_ids"])
    for answer in tasks.all_answers():
        ids.update(encoder.tokenizer(answer + "<|im_end|>")["input_ids"])
    return sorted(ids)


# --- the trainable part of the vocabulary ---------------------------------------------------


class TrainableRows(nn.Module):
    """The tied embedding during training: the full table frozen, the rows of `ids` trainable."""

    def __init__(self, full, ids):
        super().__init__()
        self.full = full  # the frozen nn.Parameter shared with lm_head
        self.rows = nn.Parameter(full.detach()[ids].clone())
        slot = torch.full((full.shape[0],), -1, dtype=torch.long)
        slot[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("slot", slot, persistent=False)

    def weight_of(self, ids):
        slot = self.slot[ids]
        # F.embedding rather than rows[slot]: on the CPU its backward sums repeated rows in a fixed order, where the
        # indexing backward's multi-threaded accumulation made runs on 2 threads differ from step to step
        trained = F.embedding(slot.clamp(min=0), self.rows)
        return torch.where((slot >= 0)[..., None], trained, self.full[ids])

    def forward(self, ids):
        return self.weight_of(ids)


class AnswerVocabularyTrainer(Trainer):
    """Loss over the answer vocabulary plus random negatives, at supervised positions only."""

    def __init__(self, *args, answer_ids, negatives, **kwargs):
        super().__init__(*args, **kwargs)
        self.answer_ids = torch.tensor(answer_ids)
        self.negatives = negatives
        self.vocab_size = self.model.config.vocab_size

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        hidden, targets = hidden[targets != -100], targets[targets != -100]
        negatives = torch.randint(0, self.vocab_size, (self.negatives,))
        candidates = torch.cat([self.answer_ids, negatives[~torch.isin(negatives, self.answer_ids)]])
        logits = hidden @ model.model.language_model.embed_tokens.weight_of(candidates).t()
        target_slot = (targets[:, None] == candidates[None, :]).float().argmax(-1)
        loss = F.cross_entropy(logits.float(), target_slot)
        return (loss, None) if return_outputs else loss


class Progress(TrainerCallback):
    """Prints loss and steps/s; every `every` steps merges the trained rows into a plain model,
    prints its accuracy per task on held-out questions and exports it (so an interrupted run
    still leaves its latest model)."""

    def __init__(self, snapshot, evaluate, every, log_path, output_dir):
        self.snapshot, self.evaluate, self.every = snapshot, evaluate, every
        self.log_path, self.output_dir, self.start = log_path, output_dir, time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            elapsed = time.time() - self.start
            print(f"step {state.global_step} loss {logs['loss']:.4f} {state.global_step / elapsed:.2f} steps/s "
                  f"{elapsed / 60:.1f} min", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            plain = self.snapshot()
            record = {"step": state.global_step, "minutes": round((time.time() - self.start) / 60, 1),
                      **self.evaluate(plain)}
            print(json.dumps(record), flush=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            export(plain, self.output_dir)


def plain_model(model, rows):
    """A plain qwenvl model with the trained rows merged into the tied embedding (float32)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.language_model.embed_tokens.")}
    full = rows.full.detach().clone()
    full[rows.slot >= 0] = rows.rows.detach()[rows.slot[rows.slot >= 0]]
    state["model.language_model.embed_tokens.weight"] = full
    state["lm_head.weight"] = full
    plain = QwenVLForConditionalGeneration(model.config)
    plain.load_state_dict(state)
    return plain.eval()


def export(plain, output_dir):
    """Save the model in bfloat16 (a copy: `plain` stays float32)."""
    copy = QwenVLForConditionalGeneration(plain.config)
    copy.load_state_dict(plain.state_dict())
    copy.to(torch.bfloat16)
    copy.config.auto_map = dict(AUTO_MAP)
    copy.save_pretrained(output_dir)


# --- evaluation -----------------------------------------------------------------------------


def generate_answers(model, processor, examples, max_new_tokens=6):
    """Greedy answers over the full vocabulary, one batch."""
    texts = [processor.apply_chat_template(tasks.messages(e, None), add_generation_prompt=True, tokenize=False) for e in examples]
    visuals = [tasks.render(e) for e in examples]
    images = [v for e, v in zip(examples, visuals) if not e.is_video]
    videos = [v for e, v in zip(examples, visuals) if e.is_video]
    inputs = processor(
        text=texts, images=images or None, videos=videos or None, fps=DEFAULT_FPS, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# --- main -------------------------------------------------------------------------------------


def task_weights(text):
    weights = {}
    for part in filter(None, text.split(",")):
        task, _, count = part.partition("=")
        known = (*tasks.TASKS, *CURRICULUM)
        if task not in known or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"expected TASK=N with TASK in {known} and N >= 1, got {part!r}")
        weights[task] = int(count)
    return weights


@dataclass(frozen=True)
class Stage:
    """The settings of one training run (its command-line flags); unset ones keep the from-scratch defaults."""
    steps: int = 5000
    lr: float = 1e-3  # peak learning rate of both towers
    embedding_lr: float = 3e-3  # peak learning rate of the trained embedding rows
    warmup: int = 300
    seed: int = 0
    eval_every: int = 1000  # steps between held-out evaluations (0: never)
    task_weights: str = ""  # e.g. "color=2,side=3": how often each task comes up (default 1, "side" 0)
    rope_theta: float | None = None  # the language model's rotary base (None: ROPE_THETA from scratch, else the model's own)
    init_from: str | None = None  # a qwenvl model directory to continue from (None: from scratch)


# Each stage continues from the one before. Stage 3 switches to rotary base 20; stages 3-14 mix in the training-only
# "side" questions. Stages 1-9 made the shipped weights; 10-14 were added after a from-scratch rerun of 1-9 fell
# short (README, "The embedded model": learning curves, timings, measured figures).
RECIPE = (
    ("stage1", Stage()),
    ("stage2", Stage(steps=2800, lr=5e-4, embedding_lr=1.5e-3, warmup=100, seed=1, eval_every=700,
                     task_weights="color=2,shape=2,position=2")),
    ("stage3", Stage(steps=4500, lr=5e-4, embedding_lr=1e-3, warmup=200, seed=43, eval_every=1500, rope_theta=20,
                     task_weights="color=2,position=3,side=3")),
    ("stage4", Stage(steps=1200, lr=2e-4, embedding_lr=5e-4, warmup=100, seed=47, eval_every=0,
                     task_weights="color=2,shape=2,position=3,side=2")),
    ("stage5", Stage(steps=600, lr=1e-4, embedding_lr=3e-4, warmup=50, seed=53, eval_every=0,
                     task_weights="color=2,shape=3,position=2,side=1")),
    ("stage6", Stage(steps=3000, lr=3e-4, embedding_lr=8e-4, warmup=100, seed=59, eval_every=1000,
                     task_weights="color=2,shape=2,position=4,side=3")),
    ("stage7", Stage(steps=1000, lr=1e-4, embedding_lr=3e-4, warmup=50, seed=61, eval_every=0,
                     task_weights="color=2,shape=3,position=3,side=1")),
    ("stage8", Stage(steps=1500, lr=1.5e-4, embedding_lr=4e-4, warmup=50, seed=67, eval_every=0,
                     task_weights="color=2,shape=4,position=3,side=1")),
    ("stage9", Stage(steps=1000, lr=1e-4, embedding_lr=3e-4, warmup=50, seed=71, eval_every=0,
                     task_weights="color=2,shape=5,position=3,side=1")),
    ("stage10", Stage(steps=3000, lr=2e-4, embedding_lr=5e-4, warmup=100, seed=73, eval_every=1000,
                      task_weights="color=4,shape=2,position=4,side=2")),
    ("stage11", Stage(steps=1500, lr=1.5e-4, embedding_lr=4e-4, warmup=50, seed=79, eval_every=0,
                      task_weights="color=2,shape=2,position=6,side=3")),
    ("stage12", Stage(steps=3000, lr=1.5e-4, embedding_lr=4e-4, warmup=50, seed=83, eval_every=1000,
                      task_weights="color=2,shape=3,position=6,side=3")),
    ("stage13", Stage(steps=1000, lr=1e-4, embedding_lr=3e-4, warmup=50, seed=89, eval_every=0,
                      task_weights="color=2,shape=5,position=4,side=2")),
    ("stage14", Stage(steps=1500, lr=1e-4, embedding_lr=3e-4, warmup=50, seed=97, eval_every=0,
                      task_weights="color=2,shape=6,position=3,side=1")),
)
DONE = "final_eval.json"  # written last by a finished stage: a rerun of the recipe skips that stage


def train_stage(stage, output_dir, batch_size=32, negatives=256, eval_per_task=40, threads=2):
    """One training run; leaves a bf16 model in output_dir and returns its held-out accuracy."""
    torch.set_num_threads(threads)
    torch.manual_seed(stage.seed)
    processor = QwenVLProcessor.from_pretrained(ROOT)
    encoder = Encoder(processor)
    if stage.init_from:
        config = QwenVLConfig.from_pretrained(stage.init_from)
        config.rope_theta = stage.rope_theta or config.rope_theta
        model = QwenVLForConditionalGeneration.from_pretrained(stage.init_from, config=config, dtype=torch.float32)
    else:
        model = QwenVLForConditionalGeneration(embedded_config(stage.rope_theta or ROPE_THETA))
    model.config.pad_token_id = processor.tokenizer.pad_token_id

    embedding = model.model.language_model.embed_tokens
    embedding.weight.requires_grad_(False)
    rows = TrainableRows(embedding.weight, data_vocabulary(encoder, stage.seed + 1))
    model.model.language_model.embed_tokens = rows
    answer_ids = sorted({i for a in tasks.all_answers() for i in processor.tokenizer(a + "<|im_end|>")["input_ids"]})

    tower_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("embed_tokens.rows")]
    optimizer = torch.optim.AdamW(
        [{"params": tower_params, "lr": stage.lr}, {"params": [rows.rows], "lr": stage.embedding_lr, "weight_decay": 0.0}],
        betas=(0.9, 0.95), weight_decay=0.01,
    )
    training_args = TrainingArguments(
        output_dir=output_dir, max_steps=stage.steps, per_device_train_batch_size=batch_size,
        learning_rate=stage.lr, warmup_steps=stage.warmup, lr_scheduler_type="cosine", logging_steps=50,
        save_strategy="no", report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
        seed=stage.seed, use_cpu=True, disable_tqdm=True,
    )
    os.makedirs(output_dir, exist_ok=True)
    log_path = os.path.join(output_dir, "eval_log.jsonl")
    open(log_path, "w").close()
    encoder.check([tasks.sample(task, random.Random(i)) for i, task in enumerate(tasks.TASKS)])
    questions = QuestionSet(encoder, stage.seed, stage.steps * batch_size, task_weights(stage.task_weights))
    def evaluate(plain):
        return tasks.evaluate(lambda chunk: generate_answers(plain, processor, chunk), eval_per_task, 10_000 + stage.seed)

    trainer = AnswerVocabularyTrainer(
        model=model, args=training_args, train_dataset=questions, optimizers=(optimizer, None),
        data_collator=lambda batch: collate(batch, processor.tokenizer.pad_token_id),
        answer_ids=answer_ids, negatives=negatives,
        callbacks=[Progress(lambda: plain_model(model, rows), evaluate, stage.eval_every, log_path, output_dir)],
    )
    started = time.time()
    trainer.train()
    plain = plain_model(model, rows)
    final = {"final": evaluate(plain), "minutes": round((time.time() - started) / 60, 1)}
    print(json.dumps(final), flush=True)
    export(plain, output_dir)
    with open(os.path.join(output_dir, DONE), "w") as f:
        json.dump({**final, "stage": dataclasses.asdict(stage)}, f)
    return final


def run_recipe(recipe, output_dir, **options):
    """Every stage in order, stage k in output_dir/<name> continuing from stage k-1; finished stages are skipped,
    so an interrupted run resumes at the stage it was in. Returns the last stage's directory."""
    previous = None
    for name, stage in recipe:
        stage_dir = os.path.join(output_dir, name)
        if not os.path.exists(os.path.join(stage_dir, DONE)):
            print(f"--- {name}: {stage}", flush=True)
            train_stage(dataclasses.replace(stage, init_from=previous), stage_dir, **options)
        previous = stage_dir
    return previous


def main():
    recipe = "\n".join(f"  {name}: {stage}" for name, stage in RECIPE)
    parser = argparse.ArgumentParser(description=__doc__, epilog=f"the recipe (RECIPE):\n{recipe}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "runs", "tiny"), help="where the trained model goes")
    parser.add_argument("--to-root", action="store_true", help="also copy the weights and config.json to the repo root")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--negatives", type=int, default=256, help="random vocabulary negatives per step")
    parser.add_argument("--eval-per-task", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads (a seeded run repeats bit for bit at the same count)")
    single = parser.add_argument_group("one run of your own (any of these turns the recipe off)")
    for field in dataclasses.fields(Stage):
        kind = {"rope_theta": float, "init_from": str}.get(field.name, type(field.default))
        single.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None,
                            help=f"default: {field.default!r} (see Stage)")
    args = parser.parse_args()
    options = dict(batch_size=args.batch_size, negatives=args.negatives, eval_per_task=args.eval_per_task,
                   threads=args.threads)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Stage) if getattr(args, f.name) is not None}
    try:
        task_weights(given.get("task_weights", ""))  # a bad TASK=N list fails here, before any work
    except argparse.ArgumentTypeError as error:
        parser.error(f"--task-weights: {error}")
    if given:
        train_stage(Stage(**given), args.output_dir, **options)
        final_dir = args.output_dir
    else:
        final_dir = run_recipe(RECIPE, args.output_dir, **options)
    if args.to_root:
        for name in ("model.safetensors", "config.json", "generation_config.json"):
            shutil.copy(os.path.join(final_dir, name), os.path.join(ROOT, name))


if __name__ == "__main__":
    main()
