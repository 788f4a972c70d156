"""A directory written by model.save_pretrained + processor.save_pretrained holds everything needed (code files,
auto_map, processor and tokenizer configs): it loads and generates in a Python process that has never seen this
repo. push_to_hub uploads exactly those files (the Hub is replaced by a recorder)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import transformers

from configuration_qwenvl import QwenVLConfig
from modeling_qwenvl import QwenVLForConditionalGeneration
from processing_qwenvl import QwenVLProcessor

ROOT = Path(__file__).resolve().parent.parent
CODE_FILES = {"configuration_qwenvl.py", "modeling_qwenvl.py", "processing_qwenvl.py", "image_processing_qwenvl.py"}
AUTO_CLASSES = {"AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoProcessor", "AutoImageProcessor"}
QUESTION = "What is red?"

# Run with `python -I` (no PYTHONPATH, no user site, not even the current directory on sys.path) in a directory
# away from the repo, with a fresh HF_HOME: only the saved folder can supply the code.
LOAD_AND_GENERATE = """
import json, sys
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor
directory, image, question = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
loaded = [model, processor, processor.image_processor,
          AutoConfig.from_pretrained(directory, trust_remote_code=True),
          AutoImageProcessor.from_pretrained(directory, trust_remote_code=True)]
messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
print(json.dumps({
    "tokens": tokens.tolist(),
    "modules": [type(thing).__module__ for thing in loaded],
    "repo_modules": sorted(name for name in sys.modules if name.endswith("_qwenvl") and "transformers_modules" not in name),
}))
"""


def tiny_model():
    """A random qwenvl model with the real vocabulary (so the real tokenizer's ids fit)."""
    torch.manual_seed(0)
    config = QwenVLConfig(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, mrope_section=[2, 3, 3], tie_word_embeddings=True,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1]),
    )
    model = QwenVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # decisive greedy choices: no near-ties that thread counts could flip
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                p.mul_(3.0)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model()
    processor = QwenVLProcessor.from_pretrained(ROOT, max_pixels=64 * 28 * 28)
    directory = tmp_path_factory.mktemp("saved") / "tiny-qwenvl"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor, directory


def auto_map_entries(directory):
    """Every auto_map entry in the folder's JSON files (5.x nests the image processor's inside processor_config)."""
    entries = {}

    def collect(value):
        if isinstance(value, dict):
            entries.update(value.get("auto_map") or {})
            for inner in value.values():
                collect(inner)

    for name in os.listdir(directory):
        if name.endswith(".json") and name not in ("tokenizer.json",):
            collect(json.loads((directory / name).read_text()))
    return entries


def test_saved_directory_holds_code_files_and_auto_map(saved):
    _, _, directory = saved
    names = set(os.listdir(directory))
    assert CODE_FILES <= names
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert names & {"processor_config.json", "preprocessor_config.json"}
    entries = auto_map_entries(directory)
    assert set(entries) == AUTO_CLASSES
    for target in entries.values():
        assert f"{target.split('.')[0]}.py" in names, target


def test_saved_directory_loads_and_generates_where_the_repo_was_never_seen(saved, tmp_path):
    model, processor, directory = saved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    image = shutil.copy(ROOT / "examples" / "shape.png", elsewhere / "shape.png")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_AND_GENERATE, str(directory), str(image), QUESTION],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["repo_modules"] == []
    assert all(module.startswith("transformers_modules") for module in result["modules"]), result["modules"]
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert result["tokens"] == expected.tolist()


# ---- push_to_hub -------------------------------------------------------------------------------------------------


class RecordingHub:
    """Stands in for the Hub's create_repo / create_commit: records each commit's files with their bytes."""

    def __init__(self):
        self.repos, self.commits = [], []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            with open(operation.path_or_fileobj, "rb") as f:  # read now: push_to_hub deletes its folder afterwards
                files[operation.path_in_repo] = f.read()
        self.commits.append(SimpleNamespace(repo_id=repo_id, files=files))
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}", oid="0" * 40)


@pytest.fixture
def hub(monkeypatch):
    recorder = RecordingHub()
    # 5.x calls methods of a shared HfApi; 4.x calls huggingface_hub's functions, bound at import into
    # transformers.utils.hub. Both are replaced; the model card is made locally instead of read from the Hub.
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, *args, **kwargs: recorder.create_repo(*args, **kwargs))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda api, *args, **kwargs: recorder.create_commit(*args, **kwargs))
    for name in ("create_repo", "create_commit"):
        if hasattr(transformers.utils.hub, name):
            monkeypatch.setattr(transformers.utils.hub, name, getattr(recorder, name))
    monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(lambda cls, *args, **kwargs: cls("---\n---\n# tiny\n")))
    return recorder


def test_push_to_hub_uploads_what_save_pretrained_writes(saved, hub, tmp_path, monkeypatch):
    model, processor, directory = saved
    monkeypatch.chdir(tmp_path)  # 4.x would push from ./tiny-qwenvl if such a folder existed
    model.push_to_hub("someone/tiny-qwenvl")
    processor.push_to_hub("someone/tiny-qwenvl")
    assert [commit.repo_id for commit in hub.commits] == ["someone/tiny-qwenvl"] * 2
    uploaded = {}
    for commit in hub.commits:
        assert "README.md" in commit.files  # the model card push_to_hub adds
        uploaded.update(commit.files)
    del uploaded["README.md"]
    saved_files = {name: (directory / name).read_bytes() for name in os.listdir(directory)}
    assert set(uploaded) == set(saved_files)
    for name, content in saved_files.items():
        assert uploaded[name] == content, name
    assert {"model.safetensors", "modeling_qwenvl.py", "configuration_qwenvl.py"} <= set(hub.commits[0].files)
    assert {"processing_qwenvl.py", "image_processing_qwenvl.py", "tokenizer.json"} <= set(hub.commits[1].files)
