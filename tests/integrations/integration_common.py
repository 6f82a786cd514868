"""Shared pieces of the framework tests: a tiny BatchNorm model, fixed
batches, and the README's two-step loop they are all compared with."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from presam_kernels import disable_running_stats, enable_running_stats

N_BATCHES, BATCH, FEATURES, CLASSES = 8, 8, 6, 3


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))


def make_batches(n: int = N_BATCHES):
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(n * BATCH, FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (n * BATCH,), generator=gen)
    return x, y


def as_batches(x, y):
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]


def readme_loop(model, opt, batches, accumulate=1, clip=None, autocast_dtype=None, scheduler=None):
    """The README's loop: accumulation recipe, BatchNorm statistics frozen in
    the second pass, clipping after the second backward."""
    model.train()

    def backward_all(window):
        for x, y in window:
            with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = F.cross_entropy(model(x), y) / len(window)
            loss.backward()

    for start in range(0, len(batches), accumulate):
        window = batches[start : start + accumulate]
        backward_all(window)
        opt.first_step(zero_grad=True)
        disable_running_stats(model)
        backward_all(window)
        enable_running_stats(model)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.second_step(zero_grad=True)
        if scheduler is not None:
            scheduler.step()


def assert_same_state(model, reference, atol=1e-6, rtol=1e-6):
    """Parameters and buffers (BatchNorm statistics) agree."""
    ours = dict(model.state_dict())
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(
            ours[name].float(), value.float(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )
