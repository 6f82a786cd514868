"""The eager backend's batches (``eager.PIECE``): rows cut into slices and
small rows grouped must give the float64 oracle's x + e, EMA and a bit-exact
restore, as whole rows do.  ``PIECE`` is made small here so that the odd
shapes of test_numerics are cut (4097 elements: 65 slices, the last of 1)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from presam_kernels.backends import eager
from helpers import BF16, CL, FP32, SHAPES, VARIANTS, make_tensors, noisy_gradients, run_against_oracle

SMALL_PIECE = 64
# A channels_last tensor above SMALL_PIECE elements, cut in memory order.
SHAPES_CUT = SHAPES["mixed"] + [((8, 3, 5, 5), CL)]


@pytest.fixture
def small_piece(monkeypatch):
    monkeypatch.setattr(eager, "PIECE", SMALL_PIECE)


@pytest.mark.parametrize("perturb", ["in_place", "out_of_place"])
@pytest.mark.parametrize("tol", [pytest.param(FP32, id="fp32"), pytest.param(BF16, id="bf16")])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_sliced_batches_match_float64_oracle(name, tol, perturb, flatten, small_piece):
    variant = VARIANTS[name]
    variant = replace(variant, kwargs={**variant.kwargs, "perturb": perturb})
    xs = make_tensors(SHAPES_CUT, tol[0])
    run_against_oracle(variant, xs, noisy_gradients(xs, variant.steps), tol, flatten=flatten, backend="eager")


@pytest.mark.parametrize("name", ["sam", "infosam_asam"])
def test_row_whose_gradient_is_strided_unlike_its_parameter_matches_oracle(name, small_piece):
    """A channels_last parameter with a contiguous gradient cannot be cut in
    memory order: it is taken whole, and must still be right."""
    variant = VARIANTS[name]
    xs = make_tensors(SHAPES_CUT, torch.float32)
    grad_steps = [[g.contiguous() for g in gs] for gs in noisy_gradients(xs, variant.steps)]
    assert not grad_steps[0][-1].is_contiguous(memory_format=CL)
    run_against_oracle(variant, xs, grad_steps, FP32, flatten=False, backend="eager")
