"""Fine-tuning (examples/finetune.py): the collator's labels, Trainer steps on a tiny random model with the
real tokenizer, freezing, gradient checkpointing on both towers, and LoRA (skipped without peft)."""

import importlib.util
import json
import os
import sys

import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from configuration_qwenvl import QwenVLConfig
from modeling_qwenvl import QwenVLForConditionalGeneration
from processing_qwenvl import QwenVLProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import finetune  # noqa: E402

HAS_PEFT = importlib.util.find_spec("peft") is not None
SIDE = 56  # 4 x 4 patches: 4 merged tokens per image or frame pair


def picture(rgb):
    return Image.new("RGB", (SIDE, SIDE), rgb)


def clip(rgbs):
    return [picture(rgb) for rgb in rgbs]


def ask(media, question):
    return {"role": "user", "content": [media, {"type": "text", "text": question}]}


def image_item(rgb):
    return {"type": "image", "image": picture(rgb)}


def video_item(rgbs):
    return {"type": "video", "video": clip(rgbs), "fps": 2.0, "resized_height": SIDE, "resized_width": SIDE}


# A fixed tiny dataset: single- and multi-turn, a system turn, an image and a video.
DATA = [
    {"messages": [ask(image_item((220, 30, 30)), "What color is this?"), {"role": "assistant", "content": "red"}]},
    {"messages": [
        {"role": "system", "content": "Answer in one word."},
        ask(image_item((30, 30, 220)), "What color is this?"),
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "And the opposite color?"},
        {"role": "assistant", "content": [{"type": "text", "text": "orange"}]},
    ]},
    {"messages": [ask(video_item([(0, 0, 0), (80, 80, 80), (160, 160, 160), (240, 240, 240)]), "What happens?"),
                  {"role": "assistant", "content": "it gets brighter"}]},
    {"messages": [ask(image_item((30, 200, 30)), "What color is this?"), {"role": "assistant", "content": "green"}]},
]
ANSWERS = [["red"], ["blue", "orange"], ["it gets brighter"], ["green"]]


@pytest.fixture(scope="module")
def processor():
    return QwenVLProcessor.from_pretrained(ROOT, max_pixels=SIDE * SIDE)


@pytest.fixture(scope="module")
def collator(processor):
    return finetune.ChatCollator(processor)


def tiny_model(seed=0):
    """A random Qwen2.5-VL-family model with the real vocabulary and token ids, small enough for a CPU."""
    torch.manual_seed(seed)
    config = QwenVLConfig(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, mrope_section=[2, 3, 3], tie_word_embeddings=True,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
    )
    return QwenVLForConditionalGeneration(config)


def train(model, collator, output_dir, steps, lr=1e-3, **arguments):
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2, learning_rate=lr,
        save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True, disable_tqdm=True, seed=0,
        **arguments,
    )
    trainer = finetune.QwenVLTrainer(model=model, args=args, train_dataset=DATA, data_collator=collator)
    trainer.train()
    return trainer


def loss_on(model, batch):
    model.eval()
    with torch.no_grad():
        return float(model(**batch, labelled_logits_only=True).loss)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def supervised_runs(labels):
    """The supervised token ids of one row, split into runs of consecutive positions."""
    runs, previous = [], None
    for position in (labels != -100).nonzero().flatten().tolist():
        if previous is None or position != previous + 1:
            runs.append([])
        runs[-1].append(int(labels[position]))
        previous = position
    return runs


# --- the collator ----------------------------------------------------------------------------------


def test_collator_supervises_exactly_the_answers_and_their_im_end(processor, collator):
    batch = collator(DATA)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw",
                          "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}
    reference = processor.apply_chat_template([d["messages"] for d in DATA], tokenize=True, return_dict=True,
                                              return_tensors="pt", padding=True, padding_side="right")
    for name in set(batch) - {"labels"}:
        assert torch.equal(batch[name], reference[name]), name
    for row, answers in enumerate(ANSWERS):
        labels = batch["labels"][row]
        runs = [processor.tokenizer.decode(run) for run in supervised_runs(labels)]
        assert runs == [answer + "<|im_end|>" for answer in answers]
        supervised = labels != -100
        assert torch.equal(batch["input_ids"][row][supervised], labels[supervised])
        assert not supervised[batch["attention_mask"][row] == 0].any()  # padding


def test_collator_masks_vision_tokens_and_the_first_header_newline(processor, collator):
    conversation = [ask(image_item((9, 9, 9)), "Describe."),
                    {"role": "assistant", "content": [image_item((5, 5, 5)), {"type": "text", "text": "\nDark."}]}]
    batch = collator([{"messages": conversation}])
    labels = batch["labels"][0]
    vision = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(finetune.VISION_TOKENS)))
    assert not (torch.isin(batch["input_ids"][0], vision) & (labels != -100)).any()
    assert processor.tokenizer.decode(labels[labels != -100]) == "\nDark.<|im_end|>"


def test_collator_refuses_bad_examples(collator):
    with pytest.raises(ValueError, match="no assistant message"):
        collator([{"messages": [ask(image_item((1, 2, 3)), "Hi?")]}])
    with pytest.raises(TypeError, match="messages"):
        collator(["just text"])
    with pytest.raises(TypeError, match="QwenVLProcessor"):
        finetune.ChatCollator(object())


def test_load_conversations_resolves_relative_media_and_refuses_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    line = {"messages": [{"role": "user", "content": [{"type": "image", "image": "pics/a.png"},
                                                      {"type": "image", "image": "data:image/png;base64,AAAA"}]},
                         {"role": "assistant", "content": "a"}]}
    path.write_text(json.dumps(line) + "\n\n")
    [loaded] = finetune.load_conversations(path)
    items = loaded["messages"][0]["content"]
    assert items[0]["image"] == os.path.join(str(tmp_path), "pics/a.png")
    assert items[1]["image"] == "data:image/png;base64,AAAA"
    path.write_text('{"messages": []}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: each line"):
        finetune.load_conversations(path)


# --- training ----------------------------------------------------------------------------------------


def test_trainer_steps_lower_the_loss(collator, tmp_path):
    model = tiny_model()
    batch = collator(DATA)
    before = loss_on(model, batch)
    train(model, collator, tmp_path, steps=4, lr=5e-3)
    after = loss_on(model, batch)
    assert after < before - 1.0, (before, after)


@pytest.mark.parametrize("parts", [("vision",), ("merger",), ("vision", "language")])
def test_freezing_keeps_the_parts_fixed_and_trains_the_rest(collator, tmp_path, parts):
    model = finetune.freeze(tiny_model(), parts)
    before = snapshot(model)
    train(model, collator, tmp_path, steps=2)
    for part in finetune.FREEZABLE_PARTS:
        changed = [
            not torch.equal(p, before[name])
            for module in finetune.part_modules(model, part) for name, p in model.named_parameters()
            if any(p is q for q in module.parameters())
        ]
        assert (not any(changed)) if part in parts else any(changed), part


def test_freeze_refuses_unknown_parts_and_freezing_everything():
    with pytest.raises(ValueError, match="cannot freeze"):
        finetune.freeze(tiny_model(), ["decoder"])
    with pytest.raises(ValueError, match="nothing to train"):
        finetune.freeze(tiny_model(), list(finetune.FREEZABLE_PARTS))


def test_gradient_checkpointing_recomputes_both_towers_under_trainer(collator, tmp_path):
    """Each checkpointed block is entered twice per step (forward, then recomputed in backward; a pre-hook,
    because the recomputation stops as soon as it has what backward needs), and the step is the same as
    without checkpointing."""
    plain, checkpointed = tiny_model(), tiny_model()
    train(plain, collator, tmp_path, steps=1)
    calls = {"vision": 0, "language": 0}

    def count(tower):
        return lambda *_: calls.__setitem__(tower, calls[tower] + 1)

    checkpointed.model.visual.blocks[0].register_forward_pre_hook(count("vision"))
    checkpointed.model.language_model.layers[0].register_forward_pre_hook(count("language"))
    train(checkpointed, collator, tmp_path, steps=1, **finetune.checkpointing_arguments())
    assert checkpointed.model.visual.gradient_checkpointing and checkpointed.model.language_model.gradient_checkpointing
    assert calls == {"vision": 2, "language": 2}
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_example_script_fine_tunes_a_model_directory(processor, tmp_path):
    model_dir, out = tmp_path / "model", tmp_path / "out"
    tiny_model().save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    (tmp_path / "pics").mkdir()
    picture((200, 40, 40)).save(tmp_path / "pics" / "red.png")
    line = {"messages": [{"role": "user", "content": [{"type": "image", "image": "pics/red.png"},
                                                      {"type": "text", "text": "Color?"}]},
                         {"role": "assistant", "content": "red"}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(line) + "\n")
    finetune.main(["--model", str(model_dir), "--data", str(tmp_path / "data.jsonl"), "--output-dir", str(out),
                   "--max-steps", "2", "--lr", "1e-3", "--freeze", "vision", "--gradient-checkpointing"])
    tuned = QwenVLForConditionalGeneration.from_pretrained(out)
    original = QwenVLForConditionalGeneration.from_pretrained(model_dir)
    assert torch.equal(tuned.model.visual.blocks[0].attn.qkv.weight, original.model.visual.blocks[0].attn.qkv.weight)
    assert not torch.equal(tuned.model.visual.merger.mlp[0].weight, original.model.visual.merger.mlp[0].weight)
    assert QwenVLProcessor.from_pretrained(out).tokenizer("Hello world")["input_ids"] == [9707, 1879]
    # trained with gradient checkpointing (which turns the live cache off), saved with the cache on
    assert tuned.config.use_cache and json.loads((out / "config.json").read_text())["use_cache"] is True
    assert tuned.generation_config.use_cache


def test_example_script_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--lora" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        finetune.parse_args(["--model", "m", "--data", "d", "--output-dir", "o", "--lora", "--freeze", "vision"])


# --- LoRA ----------------------------------------------------------------------------------------------


def test_lora_without_peft_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="pip install peft"):
        finetune.add_lora(tiny_model())


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed (optional extra)")
def test_lora_targets_trains_saves_and_reloads(collator, tmp_path):
    import peft

    model = finetune.add_lora(tiny_model(), rank=4, alpha=8, dropout=0.0)
    adapted = {name.removeprefix("base_model.model.") for name, module in model.named_modules() if hasattr(module, "lora_A")}
    language = {f"model.language_model.layers.{i}.{name}" for i in range(2) for name in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")}
    assert adapted == language | {f"model.visual.blocks.{i}.attn.qkv" for i in range(2)}

    before = snapshot(model)
    train(model, collator, tmp_path, steps=2, lr=1e-2, **finetune.checkpointing_arguments())
    for name, p in model.named_parameters():
        if "lora_B" in name:  # starts at zero; trained, even inside checkpointed vision blocks
            assert p.abs().max() > 0, name
        elif "lora_" not in name:
            assert torch.equal(p, before[name]), name

    batch = collator(DATA)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected)

    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = QwenVLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-4)
