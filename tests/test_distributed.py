"""More than one device or process, on the CPU.

- device_map="auto": accelerate places whole vision blocks and decoder layers (`_no_split_modules`), here
  split between the CPU and disk offload by `max_memory`, and the logits stay those of the plain model.

Two gloo processes started from the test (no torchrun):

- DistributedDataParallel: each process takes half of a batch; one training step gives the loss and the
  gradients of one process running the whole batch (the loss is normalised by the labelled tokens of the
  whole batch, as Trainer does across devices).
- Tensor parallelism (transformers 5): loading with the model's tensor-parallel plan shards the language
  model's projections across the two processes and gives the logits of the unsharded model.
"""

import datetime
import os
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

import tiny
from configuration_qwenvl import QwenVLConfig
from modeling_qwenvl import QwenVLForConditionalGeneration

WORLD = 2
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# Prompt tokens, an image grid and answer tokens, per sample: different lengths, so halves pad differently.
SAMPLES = [
    ([10, 11, 12], (1, 4, 4), [20, 21, 22, 2]),
    ([13, 14], (1, 8, 4), [23, 2]),
    ([15, 16, 17, 18], (1, 4, 8), [24, 25, 2]),
    ([19], (1, 4, 4), [26, 27, 28, 29, 2]),
]


def tiny_config():
    return QwenVLConfig(
        vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, mrope_section=[2, 3, 3], bos_token_id=1, eos_token_id=2, pad_token_id=tiny.PAD,
        vision_config=dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        **tiny.TOKEN_IDS,
    )


def batch_of(indices):
    """Right-padded inputs and labels (answers only) of the samples at `indices`."""
    ids, labels, pixels, grids = [], [], [], []
    for i in indices:
        prompt, grid, answer = SAMPLES[i]
        sequence = tiny.sequence(prompt, ("image", grid)) + answer
        ids.append(sequence)
        labels.append([-100] * (len(sequence) - len(answer)) + answer)
        rows, grid_thw = tiny.pixels(grid, seed=i)
        pixels.append(rows)
        grids.append(grid_thw)
    length = max(len(s) for s in ids)
    return {
        "input_ids": torch.tensor([s + [tiny.PAD] * (length - len(s)) for s in ids]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in ids]),
        "labels": torch.tensor([s + [-100] * (length - len(s)) for s in labels]),
        "pixel_values": torch.cat(pixels),
        "image_grid_thw": torch.cat(grids),
    }


def labelled_targets(labels):
    """How many positions the loss counts: each position predicts the next token's label."""
    return int((labels[:, 1:] != -100).sum())


def model_inputs(batch):
    return {name: value for name, value in batch.items() if name != "labels"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    QwenVLForConditionalGeneration(tiny_config()).save_pretrained(path)
    return path


# --- device_map="auto" ----------------------------------------------------------------------------------

NO_SPLIT = {"TextDecoderLayer", "VisionBlock"}
TOWERS = ("model.visual.blocks", "model.language_model.layers")
BUDGETS = range(40, 100, 10)  # percent of the model's size that max_memory allows on the CPU; the rest goes to disk


def block_names(model):
    return [name for name, module in model.named_modules() if type(module).__name__ in NO_SPLIT]


def splits_a_block(device_map, blocks):
    return any(key.startswith(block + ".") for key in device_map for block in blocks)


def devices_of_blocks(device_map, tower):
    """The devices of a tower's blocks where the map places them one by one."""
    return {device for key, device in device_map.items() if re.fullmatch(re.escape(tower) + r"\.\d+", key)}


def model_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_no_split_modules_are_the_block_classes_and_accelerate_honours_them():
    from accelerate import infer_auto_device_map

    model = QwenVLForConditionalGeneration(tiny_config())
    assert set(model._no_split_modules) == NO_SPLIT <= {type(m).__name__ for m in model.modules()}
    blocks, size = block_names(model), model_bytes(model)
    maps = [infer_auto_device_map(model, max_memory={"cpu": size * p // 100}, no_split_module_classes=classes)
            for p in BUDGETS for classes in (list(model._no_split_modules), [])]
    kept_whole, unconstrained = maps[0::2], maps[1::2]
    assert not any(splits_a_block(m, blocks) for m in kept_whole)
    assert any(splits_a_block(m, blocks) for m in unconstrained)  # the names are what keeps blocks whole


def test_device_map_auto_with_disk_offload_keeps_blocks_whole_and_the_logits(model_dir, tmp_path):
    model = QwenVLForConditionalGeneration.from_pretrained(model_dir).eval()
    inputs = model_inputs(batch_of(range(len(SAMPLES))))
    with torch.no_grad():
        expected = model(**inputs).logits
    blocks, size, split_towers = block_names(model), model_bytes(model), set()
    for percent in BUDGETS:
        placed = QwenVLForConditionalGeneration.from_pretrained(
            model_dir, device_map="auto", max_memory={"cpu": size * percent // 100}, offload_folder=tmp_path / str(percent)
        ).eval()
        assert not splits_a_block(placed.hf_device_map, blocks), placed.hf_device_map
        towers = {tower for tower in TOWERS if devices_of_blocks(placed.hf_device_map, tower) == {"cpu", "disk"}}
        if towers:  # a tower's blocks are divided between the CPU and the disk
            split_towers |= towers
            with torch.no_grad():
                torch.testing.assert_close(placed(**inputs).logits, expected)
    assert split_towers == set(TOWERS)


# --- what each process runs --------------------------------------------------------------------------


def worker(rank, model_dir, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(data_parallel_step(rank, model_dir), os.path.join(out_dir, f"ddp{rank}.pt"))
        if TRANSFORMERS_5:
            torch.save(tensor_parallel_forward(model_dir), os.path.join(out_dir, f"tp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def data_parallel_step(rank, model_dir):
    model = QwenVLForConditionalGeneration.from_pretrained(model_dir)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = batch_of(range(rank * len(SAMPLES) // WORLD, (rank + 1) * len(SAMPLES) // WORLD))
    total = torch.tensor(labelled_targets(half["labels"]))
    dist.all_reduce(total)
    # Each process's loss is its share of the whole batch's mean; DDP averages gradients over processes,
    # so scaling by WORLD makes the averaged gradient the whole batch's.
    loss = ddp(**half, num_items_in_batch=int(total)).loss
    (loss * WORLD).backward()
    whole_loss = loss.detach().clone()
    dist.all_reduce(whole_loss)
    return {"loss": whole_loss, "grads": {name: p.grad for name, p in model.named_parameters()}}


def tensor_parallel_forward(model_dir):
    from transformers.distributed import DistributedConfig

    model = QwenVLForConditionalGeneration.from_pretrained(
        model_dir, distributed_config=DistributedConfig(tp_size=WORLD)
    ).eval()
    layer = model.model.language_model.layers[0]
    projections = {"q_proj": layer.self_attn.q_proj, "o_proj": layer.self_attn.o_proj,
                   "gate_proj": layer.mlp.gate_proj, "down_proj": layer.mlp.down_proj}
    with torch.no_grad():
        logits = model(**model_inputs(batch_of(range(len(SAMPLES))))).logits
    return {"logits": logits, "local_shapes": {name: tuple(p.weight.to_local().shape) for name, p in projections.items()}}


# --- the tests ------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    """The folder with both processes' results: one spawn for all the checks."""
    out_dir = tmp_path_factory.mktemp("results")
    mp.spawn(worker, args=(str(model_dir), free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return out_dir


def test_ddp_step_matches_one_process_on_the_whole_batch(model_dir, run):
    model = QwenVLForConditionalGeneration.from_pretrained(model_dir)
    loss = model(**batch_of(range(len(SAMPLES)))).loss
    loss.backward()
    for rank in range(WORLD):
        result = torch.load(os.path.join(run, f"ddp{rank}.pt"))
        torch.testing.assert_close(result["loss"], loss.detach())
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            torch.testing.assert_close(result["grads"][name], p.grad, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4.57 reads tensor-parallel plans only from the config")
def test_tensor_parallel_plan_shards_the_language_model_and_keeps_the_logits(model_dir, run):
    model = QwenVLForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = model(**model_inputs(batch_of(range(len(SAMPLES))))).logits
    for rank in range(WORLD):
        result = torch.load(os.path.join(run, f"tp{rank}.pt"))
        # colwise splits the output features, rowwise the input features
        assert result["local_shapes"] == {"q_proj": (32, 64), "o_proj": (64, 32), "gate_proj": (64, 64),
                                          "down_proj": (64, 64)}
        torch.testing.assert_close(result["logits"], expected, rtol=1e-4, atol=1e-5)


def test_parallel_plans_name_the_language_model_layers():
    """The plans the full model exposes (transformers 5 gathers them from QwenVLTextModel), the same rules as
    the built-in Qwen2.5-VL's; every rule names modules that exist."""
    if not TRANSFORMERS_5:
        pytest.skip("transformers 4.57 reads tensor-parallel plans only from the config")
    model = QwenVLForConditionalGeneration(tiny_config())
    prefix = "model.language_model."
    expected = {f"{prefix}layers.*.self_attn.{p}_proj": "colwise" for p in "qkv"}
    expected.update({f"{prefix}layers.*.self_attn.o_proj": "rowwise", f"{prefix}layers.*.mlp.down_proj": "rowwise",
                     f"{prefix}layers.*.mlp.gate_proj": "colwise", f"{prefix}layers.*.mlp.up_proj": "colwise",
                     f"{prefix}embed_tokens": "embedding_rowwise", "lm_head": "colwise_rep"})
    assert model.tp_plan == expected
    assert list(model.pp_plan) == [f"{prefix}embed_tokens", f"{prefix}layers", f"{prefix}norm"]
    generic_names = {re.sub(r"\.\d+(\.|$)", r".*\1", name) for name, _ in model.named_modules()}
    assert set(model.tp_plan) <= generic_names and set(model.pp_plan) <= generic_names
