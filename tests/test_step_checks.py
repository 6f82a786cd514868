"""Checks made at step time, each raising (or skipping the step) before
anything changes: a GradScaler given to one step only, rho as a tensor,
radii too large for fp32, complex and overlapping parameters, and the
smaller cases of issue 13 (frozen parameters, empty first steps, the common
wrapper's adaptive flag)."""
from __future__ import annotations


import pytest
import torch

from presam_kernels import SAM
from test_midstep import assert_same, snapshot

PERTURB = pytest.mark.parametrize("perturb", ["in_place", "out_of_place"])


def scaler():
    return torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)


@PERTURB
def test_grad_scaler_given_to_first_step_only_refuses_before_the_base_step(perturb, flatten, backend):
    p = torch.zeros(3, requires_grad=True)
    opt = SAM([p], torch.optim.SGD, rho=0.1, lr=0.1, flatten=flatten, backend=backend, perturb=perturb)
    s = scaler()
    s.scale(torch.ones(()))  # as scaler.scale(loss).backward() would, creating the scale
    p.grad = torch.full((3,), 1024.0)
    opt.first_step(grad_scaler=s)
    p.grad = torch.full((3,), 2048.0)  # the second backward, scaled
    before = snapshot(opt, [p])
    with pytest.raises(RuntimeError, match="grad_scaler"):
        opt.second_step()
    assert_same(before, snapshot(opt, [p]))
    opt.second_step(grad_scaler=s)
    s.update()
    assert torch.allclose(p.detach(), torch.full((3,), -0.2))  # lr 0.1 times the unscaled gradient 2
