"""Equivalences that must hold whatever the inputs, checked on tiny random models in float32 on CPU.

- A padded batch gives each sample exactly what it gets alone: forward logits with left and right padding, and
  greedy tokens from `generate` (which takes left padding).
- `attn_implementation="eager"` gives the same logits as "sdpa", for the whole model (vision tower included).
- A second turn that adds a new image, continued from the first turn's cache, gives the tokens (and scores) that
  the whole conversation gives from scratch.
- Nothing carries over from one `generate` call to the next (rope_deltas in particular).

Generating with the cache against recomputing without it is `test_model.test_greedy_tokens_match_reference`
(use_cache True and False, both against the built-in model); it is not repeated here.
"""

import contextlib

import pytest
import torch

from modeling_qwenvl import CACHE_NAME, QwenVLForConditionalGeneration
from tiny import PAD, left_pad, pixels, qwenvl_model, sequence

FAMILIES = ["2.5", "2"]
ATOL = 1e-5
GREEDY = dict(do_sample=False, pad_token_id=PAD, eos_token_id=None)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return qwenvl_model(request.param)


class Sample:
    """One request: token ids with vision spans, and the pixels of its images and videos."""

    def __init__(self, parts, images=(), videos=(), seconds=(), seed=0):
        self.ids = sequence(*parts)
        self.images, self.videos, self.seconds = list(images), list(videos), list(seconds)
        self.image_pixels = pixels(*images, seed=seed)[0] if images else None
        self.video_pixels = pixels(*videos, seed=seed + 100)[0] if videos else None

    def vision(self):
        return vision_inputs([self])


def vision_inputs(samples):
    """The vision keyword arguments of a batch: every sample's items, in sample order."""
    inputs = {}
    if any(s.images for s in samples):
        inputs["pixel_values"] = torch.cat([s.image_pixels for s in samples if s.images])
        inputs["image_grid_thw"] = torch.tensor([grid for s in samples for grid in s.images])
    if any(s.videos for s in samples):
        inputs["pixel_values_videos"] = torch.cat([s.video_pixels for s in samples if s.videos])
        inputs["video_grid_thw"] = torch.tensor([grid for s in samples for grid in s.videos])
        inputs["second_per_grid_ts"] = torch.tensor([sec for s in samples for sec in s.seconds])
    return inputs


def mixed_samples():
    """Different lengths and contents: two images; text only; a video then an image."""
    return [
        Sample([[5], ("image", (1, 12, 12)), [8, 9], ("image", (1, 8, 16)), [10]], images=[(1, 12, 12), (1, 8, 16)]),
        Sample([[5, 6, 7, 8, 9, 10, 11, 12, 13]], seed=1),
        Sample([[7], ("video", (4, 4, 8)), [8], ("image", (1, 4, 4)), [9, 10]], images=[(1, 4, 4)],
               videos=[(4, 4, 8)], seconds=[2 / 3], seed=2),
    ]


def right_pad(sequences):
    length = max(len(s) for s in sequences)
    ids = torch.tensor([s + [PAD] * (length - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences])
    return ids, mask


@torch.no_grad()
def logits_alone(model, sample):
    return model(input_ids=torch.tensor([sample.ids]), **sample.vision()).logits[0]


# --- a batch equals its samples one by one ---------------------------------------------------


@pytest.fixture(params=["one-masked-call", "per-sample"])
def padded_prompt_path(request, monkeypatch):
    """Both ways a padded prompt attends: one call under a dense mask, or each sample alone over its own span
    (what long prompts take: forced here by lowering the bound)."""
    import modeling_qwenvl

    if request.param == "per-sample":
        monkeypatch.setattr(modeling_qwenvl, "DENSE_MASK_ELEMENTS", 0)
    return request.param


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("pad", [left_pad, right_pad], ids=["left", "right"])
def test_padded_batch_logits_equal_each_sample_alone(model, pad, implementation, padded_prompt_path):
    model.set_attn_implementation(implementation)
    try:
        check_padded_batch_logits(model, pad)
    finally:
        model.set_attn_implementation("sdpa")


def check_padded_batch_logits(model, pad):
    samples = mixed_samples()
    ids, mask = pad([s.ids for s in samples])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, **vision_inputs(samples)).logits
    for i, sample in enumerate(samples):
        kept = batched[i][mask[i].bool()]  # the sample's own positions, wherever the padding went
        assert (kept - logits_alone(model, sample)).abs().max() < ATOL, i


def test_left_padded_batch_generates_each_sample_alone(model, padded_prompt_path):
    samples = mixed_samples()
    ids, mask = left_pad([s.ids for s in samples])
    with torch.no_grad():
        batched = model.generate(
            input_ids=ids, attention_mask=mask, **vision_inputs(samples), max_new_tokens=12, **GREEDY
        )
        for i, sample in enumerate(samples):
            alone = model.generate(input_ids=torch.tensor([sample.ids]), **sample.vision(), max_new_tokens=12, **GREEDY)
            assert batched[i, ids.shape[1]:].tolist() == alone[0, len(sample.ids):].tolist(), i


# --- attention implementations ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_equals_sdpa_for_the_whole_model(family, tmp_path):
    qwenvl_model(family).save_pretrained(tmp_path)
    samples = mixed_samples()
    ids, mask = left_pad([s.ids for s in samples])
    logits = {}
    for implementation in ("eager", "sdpa"):
        loaded = QwenVLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        # the choice must reach the vision tower too, or half the model goes untested
        assert loaded.model.visual.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = loaded(input_ids=ids, attention_mask=mask, **vision_inputs(samples)).logits
    valid = mask.bool()
    assert (logits["eager"][valid] - logits["sdpa"][valid]).abs().max() < ATOL


# --- a conversation continued from its cache ------------------------------------------------------


@contextlib.contextmanager
def grids_seen_by_vision_tower(model):
    """Collects the grid_thw of every call to the vision tower inside the block."""
    seen = []
    hook = model.model.visual.register_forward_hook(lambda module, args, out: seen.append(args[1].tolist()))
    try:
        yield seen
    finally:
        hook.remove()


def test_second_turn_with_a_new_image_continues_the_cache(model):
    """Turn 2 reuses turn 1's cache and encodes only the new image; the answer equals a fresh run's."""
    first = Sample([[5, 6], ("image", (1, 8, 8)), [7, 8]], images=[(1, 8, 8)])
    new_image = Sample([[9], ("image", (1, 8, 12)), [10, 11]], images=[(1, 8, 12)], seed=7)
    settings = dict(max_new_tokens=6, return_dict_in_generate=True, output_scores=True, **GREEDY)
    with torch.no_grad():
        turn1 = model.generate(input_ids=torch.tensor([first.ids]), **first.vision(), **settings)
        conversation = torch.cat([turn1.sequences, torch.tensor([new_image.ids])], dim=1)
        both_images = dict(
            pixel_values=torch.cat([first.image_pixels, new_image.image_pixels]),
            image_grid_thw=torch.tensor(first.images + new_image.images),
        )
        cache = {CACHE_NAME: getattr(turn1, CACHE_NAME)}
        with grids_seen_by_vision_tower(model) as encoded:
            continued = model.generate(input_ids=conversation, **both_images, **cache, **settings)
        fresh = model.generate(input_ids=conversation, **both_images, **settings)
    assert encoded == [[[1, 8, 12]]]  # only the new image: the first one is in the cache already
    assert continued.sequences.tolist() == fresh.sequences.tolist()
    for step, (a, b) in enumerate(zip(continued.scores, fresh.scores)):
        assert (a - b).abs().max() < ATOL, step


def test_nothing_leaks_from_one_generate_call_into_the_next(model):
    """A, then B, then A again: A's answer does not change, and B's is the one recomputed without any cache.

    The requests have different rope_deltas (a large image shifts positions, plain text does not)."""
    a = Sample([[5], ("image", (1, 16, 16)), [6, 7]], images=[(1, 16, 16)])
    b = Sample([[8, 9, 10, 11, 12]])

    def answer(sample, **options):
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([sample.ids]), **sample.vision(), max_new_tokens=8, **GREEDY, **options
            )
        return out[0, len(sample.ids):].tolist()

    first_a, first_b, second_a = answer(a), answer(b), answer(a)
    assert second_a == first_a
    assert first_b == answer(b, use_cache=False)  # without a cache, every step recomputes positions from scratch
    assert first_a == answer(a, use_cache=False)



def test_the_vision_tower_serves_many_threads_at_once(monkeypatch):
    """A server calls the model from threads: the grid-plan cache (kept small here, so that plans are evicted all
    the time) must not race, and every thread gets what it gets alone."""
    import sys
    import threading

    import modeling_qwenvl

    visual = qwenvl_model("2.5").model.visual
    monkeypatch.setattr(modeling_qwenvl.QwenVLVisionModel, "PLANS_KEPT", 2)
    grids = [torch.tensor([[1, 2 * (1 + i % 3), 2 * (1 + i // 3)]]) for i in range(6)]
    requests = [pixels(tuple(grid[0].tolist())) for grid in grids]
    with torch.no_grad():
        alone = [visual(*request) for request in requests]
    errors = []

    def serve(thread):
        try:
            for step in range(300):  # the cache alone, many times: where the race was
                visual.grid_plan(grids[(thread + step) % len(grids)], "cpu")
            with torch.no_grad():
                for i, request in enumerate(requests):
                    assert torch.equal(visual(*request), alone[i])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=serve, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


def test_a_long_prompt_padded_with_a_short_one_costs_what_it_costs_alone():
    """Peak memory of a process that runs an 8000-token prompt batched with a left-padded 5-token one stays within
    twice that of one that runs the long prompt alone (measured 1.1x: 460 MB against 425 MB). Under a dense
    [B, L, L] mask it took 2.4x (1048 MB), and the mask grows with the square of the length: 16.5 GB at 40k tokens."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("padded_memory.py")
    peaks = {}
    for mode in ("alone", "padded"):
        out = subprocess.run([sys.executable, str(script), "8000", mode], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[mode] = float(out.stdout.split()[-1])
    assert peaks["padded"] <= 2 * peaks["alone"], peaks
