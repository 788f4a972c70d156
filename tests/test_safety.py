"""Safety of loading and importing.

- Weights load from safetensors only: a pickle checkpoint (`pytorch_model.bin`) can run code while it is
  unpickled, so it is refused with a clear message unless the caller passes `use_safetensors=False`.
- Importing the code files and loading a saved model and processor make no network connection, even with the
  Hugging Face offline switches unset (checked in a fresh interpreter whose sockets refuse to connect).
- The code files import only the standard library, the declared run-time requirements and each other (plus
  optional extras, imported under `try/except ImportError`).
- requirements.txt and requirements-4.57.txt pin the same packages except transformers.
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from modeling_qwenvl import QwenVLForConditionalGeneration, QwenVLModel
from processing_qwenvl import QwenVLProcessor
from tiny import qwenvl_model

ROOT = Path(__file__).resolve().parent.parent
CODE_FILES = ["configuration_qwenvl.py", "modeling_qwenvl.py", "processing_qwenvl.py", "image_processing_qwenvl.py"]
# Imported only under try/except ImportError, and named in the README.
OPTIONAL_IMPORTS = {"flash_attn"}
# Distribution names whose import name differs.
IMPORT_NAMES = {"pillow": "PIL"}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny model saved by save_pretrained (safetensors, code files, auto_map)."""
    model = qwenvl_model("2.5")
    directory = tmp_path_factory.mktemp("qwenvl")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture
def pickle_only(saved_model, tmp_path):
    """The same model with its weights as a pickle `pytorch_model.bin` and no safetensors."""
    model, directory = saved_model
    for path in directory.iterdir():
        if not path.name.endswith(".safetensors"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    return tmp_path


# --- safetensors only -----------------------------------------------------------------------------


@pytest.mark.parametrize("load", [QwenVLForConditionalGeneration.from_pretrained, QwenVLModel.from_pretrained])
@pytest.mark.parametrize("option", [{}, {"use_safetensors": None}, {"use_safetensors": True}])
def test_pickle_weights_are_refused_by_default(pickle_only, load, option):
    with pytest.raises(OSError, match=r"only pickle weights \(pytorch_model.bin\).*use_safetensors=False"):
        load(pickle_only, **option)


def test_pickle_weights_are_refused_through_the_auto_classes(pickle_only):
    with pytest.raises(OSError, match="only pickle weights"):
        AutoModel.from_pretrained(pickle_only, trust_remote_code=True)


def test_pickle_weights_load_when_the_user_opts_in(saved_model, pickle_only):
    model, _ = saved_model
    loaded = QwenVLForConditionalGeneration.from_pretrained(pickle_only, use_safetensors=False)
    for (name, expected), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, got), name


def test_safetensors_are_preferred_beside_a_pickle(saved_model, tmp_path):
    """A directory with both loads the safetensors file, never unpickling the other."""
    model, directory = saved_model
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle: loading this would fail")
    loaded = QwenVLForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


# --- a checkpoint that does not match its config ----------------------------------------------------------


def copy_with(directory, destination, config_changes=None, tensors=None):
    """A copy of a saved model with config.json fields changed and/or its tensors replaced by `tensors(state)`."""
    import json

    from safetensors.torch import load_file, save_file

    for path in directory.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())
    config = json.loads((destination / "config.json").read_text())
    for key, value in (config_changes or {}).items():
        *parents, name = key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        target[name] = value
    (destination / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors(load_file(destination / "model.safetensors")), destination / "model.safetensors",
                  metadata={"format": "pt"})
    return destination


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 3}, "num_hidden_layers=3 but the checkpoint holds 2 decoder layers"),
    ({"num_hidden_layers": 100000}, "num_hidden_layers=100000 but the checkpoint holds 2 decoder layers"),
    ({"vision_config.depth": 2}, "vision_config.depth=2 but the checkpoint holds 3 vision blocks"),
], ids=["one-layer-more", "huge", "vision-depth"])
def test_a_config_that_disagrees_with_its_weights_is_refused_before_building(saved_model, tmp_path, changes, message):
    directory = copy_with(saved_model[1], tmp_path, config_changes=changes)
    with pytest.raises(ValueError, match=message):
        QwenVLForConditionalGeneration.from_pretrained(directory)
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(directory, trust_remote_code=True)


@pytest.mark.parametrize("tensors, message", [
    (lambda state: {k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}, "1 missing weight"),
    (lambda state: dict(state, **{"model.language_model.extra.weight": torch.zeros(2)}), "1 unexpected weight"),
], ids=["missing", "unexpected"])
def test_missing_or_unexpected_weights_are_refused_unless_asked(saved_model, tmp_path, tensors, message):
    directory = copy_with(saved_model[1], tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match=message + r".*strict=False"):
        QwenVLForConditionalGeneration.from_pretrained(directory)
    model, info = QwenVLForConditionalGeneration.from_pretrained(directory, strict=False, output_loading_info=True)
    assert info["missing_keys"] or info["unexpected_keys"]


def test_the_body_of_a_checkpoint_with_a_head_loads_strictly(saved_model):
    """AutoModel on a whole model's checkpoint leaves its vocabulary head out: expected, not an error."""
    model = QwenVLModel.from_pretrained(saved_model[1])
    assert torch.equal(model.language_model.norm.weight, saved_model[0].model.language_model.norm.weight)


# --- no network -----------------------------------------------------------------------------------

# Runs in a fresh interpreter: sockets refuse to connect before anything is imported, and every attempt is
# recorded (a library may catch the error and carry on, which must not hide the attempt).
OFFLINE_SCRIPT = textwrap.dedent(
    """
    import socket, sys
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise OSError("network disabled by tests/test_safety.py")

    socket.socket.connect = socket.socket.connect_ex = refuse
    socket.create_connection = socket.getaddrinfo = refuse

    root, directory = sys.argv[1], sys.argv[2]
    sys.path.insert(0, root)
    import configuration_qwenvl, image_processing_qwenvl, modeling_qwenvl, processing_qwenvl
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = modeling_qwenvl.QwenVLForConditionalGeneration.from_pretrained(directory)
    auto_model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True)
    processor = processing_qwenvl.QwenVLProcessor.from_pretrained(directory)
    auto_processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    image = np.zeros((56, 84, 3), np.uint8)
    inputs = auto_processor(images=image, text="<|vision_start|><|image_pad|><|vision_end|>", return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    auto_model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert not attempts, attempts
    print("no connection attempted")
    """
)


def test_import_and_load_make_no_network_connection(saved_model, tmp_path):
    _, directory = saved_model
    QwenVLProcessor.from_pretrained(ROOT).save_pretrained(directory)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # an empty cache: nothing cached can stand in for a download
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(ROOT), str(directory)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no connection attempted" in result.stdout


# --- declared dependencies --------------------------------------------------------------------------


def requirement_names(path):
    """{distribution name: version} of the pins in a requirements file (`-r` includes left out)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r "):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def runtime_requirements():
    """Import names of requirements.txt's pins (what the code files may import)."""
    names = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = line.partition("==")[0].strip().lower()
            names.add(IMPORT_NAMES.get(name, name.replace("-", "_")))
    return names


def imported_modules(path):
    """(top-level modules imported anywhere in the file, those imported under try/except ImportError)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(catches_import_error(h) for h in node.handlers):
            guarded_nodes.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    modules, guarded = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue  # relative imports are the package's own files
        for name in names:
            modules.add(name.split(".")[0])
            if id(node) in guarded_nodes:
                guarded.add(name.split(".")[0])
    return modules, guarded


def catches_import_error(handler):
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


@pytest.mark.parametrize("name", CODE_FILES)
def test_code_files_import_only_declared_dependencies(name):
    siblings = {Path(f).stem for f in CODE_FILES}
    allowed = set(sys.stdlib_module_names) | runtime_requirements() | siblings
    modules, guarded = imported_modules(ROOT / name)
    assert modules - allowed - OPTIONAL_IMPORTS == set(), "undeclared imports"
    optional_used = modules & OPTIONAL_IMPORTS
    assert optional_used <= guarded, f"optional imports {optional_used - guarded} are not under try/except ImportError"


def test_requirement_files_differ_only_in_transformers():
    latest = requirement_names(ROOT / "requirements.txt")
    older = requirement_names(ROOT / "requirements-4.57.txt")
    assert latest.keys() == older.keys()
    assert {name for name in latest if latest[name] != older[name]} == {"transformers"}
    assert older["transformers"].startswith("4.57.")
    # the test environments: the same test pins; the chat page's (gradio, playwright) on transformers 5 only
    latest_dev = requirement_names(ROOT / "requirements-dev.txt")
    older_dev = requirement_names(ROOT / "requirements-4.57-dev.txt")
    assert {name: v for name, v in latest_dev.items() if name != "playwright"} == older_dev
    assert "-r requirements-web.txt" in (ROOT / "requirements-dev.txt").read_text()
