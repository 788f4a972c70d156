"""The vision tower in bfloat16 and float16: finite on saturated images, and close to float32.

Tolerances are relative L2 errors of the merged vision tokens against our own float32 output:
bfloat16 keeps 8 bits of mantissa (a relative rounding of 2^-9 per operation), and over a few
blocks that accumulates to about 1% here, so the bound is 3%; float16 keeps 11 bits (2^-12),
about 0.1% here, bound 0.5%.

The official weights grow the vision residual stream beyond float16's range (65504) in the
last blocks. Random tiny weights do not, so one test plants large activations (a bias of 4e4
in two blocks, 8e4 in total): the built-in tower then returns NaN in float16, ours stays finite
because it keeps the residual stream, and the projections writing into it, in float32."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from image_processing_qwenvl import QwenVLImageProcessor
from modeling_qwenvl import QwenVLForConditionalGeneration
from tiny import reference_model

BOUNDS = {torch.bfloat16: 0.03, torch.float16: 0.005}
SIZE = 448


def saturated_images():
    white = Image.new("RGB", (SIZE, SIZE), "white")
    squares = (np.indices((SIZE, SIZE)).sum(0) // 14 % 2 * 255).astype(np.uint8)  # 14 px black and white squares
    return {"white": white, "checkerboard": Image.fromarray(squares).convert("RGB")}


@pytest.fixture(scope="module", params=["2.5", "2"])
def models(request, tmp_path_factory):
    reference = reference_model(request.param)
    directory = tmp_path_factory.mktemp("numerics")
    reference.save_pretrained(directory)
    return reference, QwenVLForConditionalGeneration.from_pretrained(directory).eval()


def relative_error(got, expected):
    return ((got.float() - expected).norm() / expected.norm()).item()


def vision_inputs(image):
    features = QwenVLImageProcessor()(images=[image], return_tensors="pt")
    return features["pixel_values"], features["image_grid_thw"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["white", "checkerboard"])
def test_half_precision_stays_finite_and_close(models, dtype, name):
    _, ours = models
    pixels, grid = vision_inputs(saturated_images()[name])
    with torch.no_grad():
        expected = ours.model.visual(pixels, grid)
        got = copy.deepcopy(ours.model.visual).to(dtype)(pixels.to(dtype), grid)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert relative_error(got, expected) < BOUNDS[dtype]


def plant_large_activations(model):
    with torch.no_grad():
        for block in model.model.visual.blocks[-2:]:
            mlp = block.mlp
            (mlp.down_proj if hasattr(mlp, "down_proj") else mlp.fc2).bias[:8] = 4e4


def test_float16_survives_activations_beyond_its_range(models):
    reference, ours = (copy.deepcopy(m) for m in models)
    plant_large_activations(reference)
    plant_large_activations(ours)
    pixels, grid = vision_inputs(saturated_images()["checkerboard"])
    with torch.no_grad():
        expected = ours.model.visual(pixels, grid)
        builtin = reference.to(torch.float16).model.visual(pixels.half(), grid_thw=grid)
        builtin = getattr(builtin, "pooler_output", builtin)
        got = ours.to(torch.float16).model.visual(pixels.half(), grid)
    assert not torch.isfinite(builtin).all()  # the failure users of the built-in model report
    assert torch.isfinite(got).all()
    assert relative_error(got, expected) < BOUNDS[torch.float16]
