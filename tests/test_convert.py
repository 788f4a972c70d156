"""convert_checkpoint.py on tiny official-like checkpoints of both families: hub-shaped config.json, weights in
the hub layout (one file or an index of shards), official processor files or none. The converted directory must
load with the Auto classes and the pipeline (remote code) and give the built-in model's logits (the oracle)."""

import errno
import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import convert_checkpoint
import processing_qwenvl
from convert_checkpoint import convert
from official_configs import OFFICIAL_CONFIGS
from tiny import TEXT, VISION_2, VISION_25

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "examples" / "shape.png"
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
# The real vocabulary and special token ids, so that the real tokenizer's text can be fed to the tiny models.
OFFICIAL_IDS = dict(
    vocab_size=151936, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, image_token_id=151655,
    video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
)
SOURCE_MAX_PIXELS = 100 * 28 * 28  # a non-default value that the conversion must keep
SOURCE_SYSTEM_PROMPT = "You are a converted assistant."


def builtin_model(family, tie):
    """A random built-in model (the oracle) with the real vocabulary, float32, eval mode."""
    torch.manual_seed(0)
    text = dict(TEXT, **OFFICIAL_IDS, tie_word_embeddings=tie)
    if family == "2.5":
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(VISION_25), tie_word_embeddings=tie)
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    else:
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=dict(VISION_2), tie_word_embeddings=tie)
        model = transformers.Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():  # larger weights than the default init: logits that differ between positions
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                p.mul_(3.0)
    return model.eval()


def hub_config(family, tie):
    """config.json as the official hub files have it: flat text fields, rope_scaling of type mrope."""
    vision = dict(VISION_25) if family == "2.5" else dict(VISION_2)
    return dict(
        TEXT, **OFFICIAL_IDS, vision_token_id=151654, tie_word_embeddings=tie, torch_dtype="float32",
        model_type="qwen2_5_vl" if family == "2.5" else "qwen2_vl",
        architectures=["Qwen2_5_VLForConditionalGeneration" if family == "2.5" else "Qwen2VLForConditionalGeneration"],
        vision_config=dict(vision, in_chans=3, spatial_patch_size=14), use_sliding_window=False, sliding_window=4096,
        max_window_layers=2,
    )


def hub_layout(state_dict, tie):
    """The built-in's weights under the official hub names (`model.layers.*`, `visual.*`); a tied lm_head is left
    out, as in the 2B/3B checkpoints."""
    renamed = {}
    for key, value in state_dict.items():
        if tie and key == "lm_head.weight":
            continue
        if key.startswith("model.visual."):
            key = key[len("model."):]
        renamed[key.replace("model.language_model.", "model.", 1)] = value.contiguous()
    return renamed


def write_weights(directory, state, shards):
    if shards == 1:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name] for name in names[i::shards]}
        save_file(part, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


def write_official_files(directory):
    """The processor-side files of an official repo: tokenizer (naming the official processor, no padding side),
    chat_template.json, preprocessor_config.json, generation_config.json, LICENSE."""
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copyfile(ROOT / name, directory / name)
    tokenizer_config = json.loads((ROOT / "tokenizer_config.json").read_text())
    tokenizer_config.pop("padding_side")
    tokenizer_config["processor_class"] = "Qwen2_5_VLProcessor"
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    template = (ROOT / "chat_template.jinja").read_text().replace("You are a helpful assistant.", SOURCE_SYSTEM_PROMPT)
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    preprocessor = dict(
        min_pixels=3136, max_pixels=SOURCE_MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor",
    )
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    generation = dict(bos_token_id=151643, pad_token_id=151643, eos_token_id=[151645, 151643], top_k=1)
    (directory / "generation_config.json").write_text(json.dumps(generation))
    (directory / "LICENSE").write_text("the weights' licence\n")


def write_official_checkpoint(directory, family, reference, tie, shards=1, official_files=False):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hub_config(family, tie)))
    write_weights(directory, hub_layout(reference.state_dict(), tie), shards)
    if official_files:
        write_official_files(directory)
    return directory


@pytest.fixture(scope="module")
def official_25(tmp_path_factory):
    """(oracle, source dir, converted dir): Qwen2.5-VL, untied, one weights file, the official processor files."""
    reference = builtin_model("2.5", tie=False)
    src = write_official_checkpoint(tmp_path_factory.mktemp("official") / "src", "2.5", reference, False, official_files=True)
    dst = tmp_path_factory.mktemp("converted") / "qwenvl"
    convert(src, dst)
    return reference, src, dst


def chat():
    content = [{"type": "image", "image": str(IMAGE), "max_pixels": 64 * 28 * 28}, {"type": "text", "text": "What is red?"}]
    return [{"role": "user", "content": content}]


def assert_source_logits(reference, dst):
    """The converted directory, loaded through remote code, gives the oracle's logits on a real image and prompt."""
    model = AutoModelForImageTextToText.from_pretrained(dst, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(dst, trust_remote_code=True)
    assert type(model).__name__ == "QwenVLForConditionalGeneration"
    assert type(model).__module__.startswith("transformers_modules")
    assert type(processor).__name__ == "QwenVLProcessor"
    inputs = processor.apply_chat_template(chat(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    reference_inputs = dict(inputs)
    if TRANSFORMERS_4:  # 4.x's built-in forward has no mm_token_type_ids
        reference_inputs.pop("mm_token_type_ids")
    with torch.no_grad():
        got = model(**inputs).logits
        expected = reference(**reference_inputs).logits
    assert (got - expected).abs().max() < 1e-5
    return processor


def test_converted_qwen25_gives_the_source_logits_and_keeps_its_processor_files(official_25):
    reference, src, dst = official_25
    processor = assert_source_logits(reference, dst)
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "qwenvl" and config["architectures"] == ["QwenVLForConditionalGeneration"]
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_qwenvl.QwenVLForConditionalGeneration"
    assert processor.image_processor.max_pixels == SOURCE_MAX_PIXELS
    assert SOURCE_SYSTEM_PROMPT in processor.apply_chat_template(chat(), tokenize=False)
    assert processor.tokenizer.padding_side == "left"
    preprocessor = json.loads((dst / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"] == processing_qwenvl.PROCESSOR_AUTO_MAP
    for name in ("generation_config.json", "LICENSE", "tokenizer.json", "chat_template.json"):
        assert filecmp.cmp(src / name, dst / name, shallow=False), name
    for name in convert_checkpoint.CODE_FILES:
        assert filecmp.cmp(ROOT / name, dst / name, shallow=False), name


@pytest.mark.parametrize("family,tie,shards", [("2", True, 1), ("2.5", True, 3)], ids=["qwen2-tied", "qwen25-3-shards"])
def test_converted_checkpoint_gives_the_source_logits(tmp_path, monkeypatch, family, tie, shards):
    reference = builtin_model(family, tie)
    src = write_official_checkpoint(tmp_path / "src", family, reference, tie, shards)
    with monkeypatch.context() as patch:  # the conversion reads only headers: every tensor loader is off limits
        for module, name in ((safetensors, "safe_open"), (safetensors.torch, "load_file"), (torch, "load")):
            patch.setattr(module, name, lambda *args, **kwargs: pytest.fail("a tensor was loaded"))
        written = convert(src, tmp_path / "dst")
    assert written["generation_config.json"] == "written from the config"
    assert written["chat_template.jinja"] == "copied from qwenvl"
    assert f"family {'qwen2_vl' if family == '2' else 'qwen2_5_vl'}" in written["config.json"]  # QwenVLConfig.family
    if shards > 1:
        assert sum(name.endswith(".safetensors") for name in os.listdir(tmp_path / "dst")) == shards
        assert (tmp_path / "dst" / "model.safetensors.index.json").exists()
    processor = assert_source_logits(reference, tmp_path / "dst")
    assert processor.chat_template == (ROOT / "chat_template.jinja").read_text()
    assert processor.image_processor.max_pixels == 12845056  # the official default, without a preprocessor file


def test_pipeline_on_the_converted_directory(official_25):
    _, _, dst = official_25
    pipe = transformers.pipeline("image-text-to-text", model=str(dst), trust_remote_code=True)
    out = pipe(text=chat(), max_new_tokens=5, generate_kwargs={"do_sample": False}, return_full_text=False)
    inputs = pipe.processor.apply_chat_template(chat(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        tokens = pipe.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = pipe.processor.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert out[0]["generated_text"] == expected


def test_a_chat_template_inside_tokenizer_config_is_kept(official_25, tmp_path):
    _, src, _ = official_25
    source = tmp_path / "src"
    shutil.copytree(src, source, copy_function=os.link, ignore=shutil.ignore_patterns("chat_template.*", "tokenizer_config.json"))
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = "{% for m in messages %}<|im_start|>{{ m['role'] }} says {{ m['content'] }}{% endfor %}"
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    written = convert(source, tmp_path / "dst")
    assert not any(name.startswith("chat_template") for name in written)
    processor = AutoProcessor.from_pretrained(tmp_path / "dst", trust_remote_code=True)
    assert processor.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user says hi"


@pytest.mark.parametrize("name", list(OFFICIAL_CONFIGS))
def test_official_weight_names_and_shapes_pass_the_check(name):
    """The hub-layout names and shapes of each official checkpoint (the built-in model on the meta device) fit the
    config read through QwenVLConfig: the check refuses nothing that the official files hold."""
    hub = OFFICIAL_CONFIGS[name]
    family = "2" if hub["model_type"] == "qwen2_vl" else "2.5"
    builtin_class = transformers.Qwen2VLForConditionalGeneration if family == "2" else transformers.Qwen2_5_VLForConditionalGeneration
    builtin_config = transformers.Qwen2VLConfig if family == "2" else transformers.Qwen2_5_VLConfig
    with torch.device("meta"):
        builtin = builtin_class(builtin_config(**hub))
    shapes = {key: tuple(value.shape) for key, value in hub_layout(builtin.state_dict(), hub["tie_word_embeddings"]).items()}
    config = convert_checkpoint.qwenvl_config(hub, name)
    convert_checkpoint.check_weights(config, shapes, name)
    with pytest.raises(ValueError, match="1 with a wrong shape"):
        convert_checkpoint.check_weights(config, dict(shapes, **{"visual.merger.mlp.2.bias": (7,)}), name)


# ---- linking and copying -------------------------------------------------------------------------------------


def inode(path):
    return os.stat(path).st_ino


def test_weights_are_hard_linked_by_default_and_copied_with_copy(official_25, tmp_path):
    _, src, linked = official_25
    assert inode(linked / "model.safetensors") == inode(src / "model.safetensors")
    assert not os.path.islink(linked / "model.safetensors")
    written = convert(src, tmp_path / "copied", copy=True)
    assert written["model.safetensors"] == "copied"
    assert inode(tmp_path / "copied" / "model.safetensors") != inode(src / "model.safetensors")
    assert filecmp.cmp(src / "model.safetensors", tmp_path / "copied" / "model.safetensors", shallow=False)
    # small files are always copied, so editing them in the output never touches the source
    assert inode(tmp_path / "copied" / "tokenizer.json") != inode(src / "tokenizer.json")
    assert inode(linked / "tokenizer.json") != inode(src / "tokenizer.json")


def test_symbolic_link_where_hard_links_are_impossible(official_25, tmp_path, monkeypatch):
    _, src, _ = official_25

    def cross_device(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(convert_checkpoint.os, "link", cross_device)
    written = convert(src, tmp_path / "dst")
    assert written["model.safetensors"] == "symlinked"
    target = tmp_path / "dst" / "model.safetensors"
    assert os.path.islink(target) and os.path.realpath(target) == os.path.realpath(src / "model.safetensors")


def test_a_hub_cache_snapshot_links_to_the_real_file(official_25, tmp_path):
    """Hub cache snapshots hold symbolic links to blobs: the hard link goes to the blob itself."""
    _, src, _ = official_25
    snapshot = tmp_path / "snapshot"
    shutil.copytree(src, snapshot, symlinks=True, ignore=shutil.ignore_patterns("model.safetensors"))
    os.symlink(src / "model.safetensors", snapshot / "model.safetensors")
    convert(snapshot, tmp_path / "dst")
    assert inode(tmp_path / "dst" / "model.safetensors") == inode(src / "model.safetensors")


# ---- the command line ----------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "convert_checkpoint.py"), *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


def test_command_line_help_conversion_and_error(official_25, tmp_path):
    _, src, _ = official_25
    assert "--copy" in run_cli("--help").stdout
    done = run_cli("--src", src, "--dst", tmp_path / "dst", "--copy")
    assert done.returncode == 0, done.stderr
    assert "model.safetensors" in done.stdout and "copied" in done.stdout and "family qwen2_5_vl" in done.stdout
    failed = run_cli("--src", tmp_path / "nowhere", "--dst", tmp_path / "dst2")
    assert failed.returncode == 2 and "is not a directory" in failed.stderr
    assert not (tmp_path / "dst2").exists()


# ---- directories that are not such checkpoints ---------------------------------------------------------------


def break_source(kind, src, broken):
    """Make `broken` a damaged copy of the checkpoint `src`."""
    shutil.copytree(src, broken)
    config = json.loads((broken / "config.json").read_text())
    if kind == "no config.json":
        (broken / "config.json").unlink()
    elif kind == "config.json not JSON":
        (broken / "config.json").write_text("{model_type: qwen2_5_vl")
    elif kind == "wrong model_type":
        (broken / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    elif kind == "bad config values":
        (broken / "config.json").write_text(json.dumps(dict(config, num_attention_heads=3)))
    elif kind == "only .bin weights":
        (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    elif kind == "missing shard":
        index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}
        (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
        (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    elif kind == "weights of another size":
        (broken / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3, intermediate_size=96)))
    elif kind == "not safetensors":
        (broken / "model.safetensors").write_bytes(b"\x01")
    elif kind == "bad preprocessor_config.json":
        (broken / "preprocessor_config.json").write_text(json.dumps({"max_pixels": -5}))
    return broken


@pytest.mark.parametrize(
    "kind,message",
    [
        ("no config.json", "has no config.json"),
        ("config.json not JSON", "is not valid JSON"),
        ("wrong model_type", "has model_type 'llama'; expected qwen2_vl or qwen2_5_vl"),
        ("bad config values", "cannot be read as a qwenvl config"),
        ("only .bin weights", r"has no safetensors weights .*found \['pytorch_model.bin'\]"),
        ("missing shard", r"lists 1 shard\(s\) that are not in .*model-00002-of-00002.safetensors"),
        ("weights of another size", r"num_hidden_layers=3 but the checkpoint holds 2 decoder layers"),  # counted first
        ("not safetensors", "is not a safetensors file"),
        ("bad preprocessor_config.json", "settings the qwenvl image processor cannot use"),
    ],
)
def test_bad_sources_are_refused_before_anything_is_written(official_25, tmp_path, kind, message):
    _, src, _ = official_25
    broken = break_source(kind, src, tmp_path / "broken")
    with pytest.raises(ValueError, match=message):
        convert(broken, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_bad_destinations_are_refused(official_25, tmp_path):
    _, src, dst = official_25
    with pytest.raises(ValueError, match="is not empty"):
        convert(src, dst)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        convert(src, tmp_path / "file")
    with pytest.raises(ValueError, match="is not a directory"):
        convert(tmp_path / "file", tmp_path / "dst")
