"""The embedded model at the repo root answers synthetic questions through the pipeline, offline.

The floor is the issue's bar for this small eval (0.90 overall on 20 questions per task); the shipped checkpoint
scores 0.98 here (README, "The embedded model")."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import synthetic_tasks as tasks  # noqa: E402

ACCURACY_FLOOR = 0.90
PER_TASK = 20

pytestmark = pytest.mark.skipif(not (ROOT / "model.safetensors").exists(), reason="the repo root has no weights")


@pytest.fixture(scope="module")
def pipe():
    import demo

    return demo.load_pipeline(str(ROOT))


def test_small_eval_reaches_the_shipped_level(pipe):
    import demo

    scores = tasks.evaluate(lambda examples: demo.ask(pipe, [tasks.messages(e, tasks.render(e)) for e in examples]),
                            PER_TASK, seed=778)
    assert scores["n"] == PER_TASK * len(tasks.TASKS)
    assert scores["accuracy"] >= ACCURACY_FLOOR, scores


def test_demo_runs_offline_from_the_readme_command(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "demo.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    examples = json.loads((ROOT / "examples" / "questions.json").read_text())
    assert out.stdout.count("expected:") == len(examples)


def test_training_script_runs_and_exports_a_loadable_model(tmp_path):
    """Two steps of examples/train_tiny.py from scratch: the export loads and answers (accuracy is not checked)."""
    out_dir = tmp_path / "tiny"
    command = [sys.executable, "examples/train_tiny.py", "--output-dir", str(out_dir), "--steps", "2", "--batch-size",
               "2", "--warmup", "1", "--eval-every", "0", "--eval-per-task", "1"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    final = json.loads([line for line in out.stdout.splitlines() if line.startswith('{"final"')][-1])
    assert final["final"]["n"] == len(tasks.TASKS)

    from modeling_qwenvl import QwenVLForConditionalGeneration

    model = QwenVLForConditionalGeneration.from_pretrained(out_dir)
    assert model.config.rope_theta == 1e6  # the script's default from scratch: see ROPE_THETA in train_tiny.py


def test_recipe_chains_its_stages_and_resumes(tmp_path, monkeypatch):
    """The script's default run is RECIPE: each stage continues from the one before (here a second stage switches the
    rotary base, as the shipped stage 3 does), and a rerun skips the finished stages."""
    import train_tiny

    tiny = dict(steps=2, warmup=1, eval_every=0)
    recipe = (("first", train_tiny.Stage(**tiny)), ("second", train_tiny.Stage(**tiny, seed=1, rope_theta=20)))
    options = dict(batch_size=2, eval_per_task=1)
    last = train_tiny.run_recipe(recipe, str(tmp_path), **options)
    assert last == str(tmp_path / "second")

    from modeling_qwenvl import QwenVLForConditionalGeneration

    first = QwenVLForConditionalGeneration.from_pretrained(tmp_path / "first")
    second = QwenVLForConditionalGeneration.from_pretrained(tmp_path / "second")
    assert (first.config.rope_theta, second.config.rope_theta) == (1e6, 20)
    done = json.loads((tmp_path / "second" / train_tiny.DONE).read_text())
    assert done["stage"]["init_from"] == str(tmp_path / "first")

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(train_tiny, "train_stage", must_not_train)
    assert train_tiny.run_recipe(recipe, str(tmp_path), **options) == last


def test_trained_rows_gradient_repeats_bit_for_bit():
    """A seeded run repeats exactly on 2 threads: the gradient of the trained embedding rows, where a batch repeats the
    same ids hundreds of times, is summed in a fixed order. An indexing backward (rows[slot]) summed repeated rows with
    thread-timing-dependent order, which shows once another process competes for the cores, as the busy loop does."""
    import torch
    import train_tiny

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        generator = torch.Generator().manual_seed(0)
        full = torch.nn.Parameter(torch.randn(300, 128, generator=generator), requires_grad=False)
        rows = train_tiny.TrainableRows(full, list(range(280)))  # the last 20 ids stay frozen
        ids = torch.randint(0, 300, (32, 120), generator=generator)
        ids[:, :60] = 4  # one trained token repeated, as the chat template's tokens are in every example
        upstream = torch.randn(32, 120, 128, generator=generator)
        grads = []
        for _ in range(20):
            rows.rows.grad = None
            (rows(ids) * upstream).sum().backward()
            grads.append(rows.rows.grad.clone())
    finally:
        busy.kill()
        busy.wait()
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], grad) for grad in grads[1:])
    expected = torch.zeros(300, 128, dtype=torch.float64).index_add_(0, ids.flatten(), upstream.double().flatten(0, 1))
    torch.testing.assert_close(grads[0].double(), expected[:280], rtol=1e-5, atol=1e-4)
