"""A whole SAM training step on small models: forward, backward, first_step,
forward, backward, second_step, for the loop and for ours.

Gradients are handed out the way each mode expects: zero_grad(set_to_none=True)
for the loop and our default mode; with flatten=True our zero_grad keeps the
gradients allocated (one fill over the flat buffer).
"""
from __future__ import annotations

import os

import pytest
import torch

import baselines
import models

PROVIDERS = ("loop", "ours_eager", "ours_eager_flat", "ours_triton", "ours_triton_flat")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("variant", ("sam", "infosam"))
@pytest.mark.parametrize("model_name", tuple(models.MODELS))
def test_whole_step(benchmark, bench, model_name, variant, provider):
    reason = baselines.unavailable(provider, variant, bench.device)
    if reason:
        pytest.skip(reason)
    make_model, make_batch, loss_fn = models.MODELS[model_name]("smoke" if bench.smoke else "full")
    torch.manual_seed(0)
    model = make_model().to(bench.device)
    gen = torch.Generator().manual_seed(0)
    x, y = make_batch(bench.device, gen)
    params = [p for p in model.parameters() if p.requires_grad]
    probe = bench.memory_probe()
    probe.start()
    opt = baselines.build(provider, variant, params)

    def step():
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
        bench.sync()

    for _ in range(bench.warm_steps):
        step()
    peak = probe.stop()
    numel = sum(p.numel() for p in params)
    benchmark.group = f"whole {model_name} {variant}"
    benchmark.extra_info.update(
        kind="whole", set=model_name, dtype="fp32", variant=variant, regime="train", provider=provider,
        tensors=len(params), numel=numel, device=bench.device.type, device_name=bench.device_name,
        peak_extra_bytes=peak, smoke=bench.smoke, torch=torch.__version__, load1=os.getloadavg()[0],
        code=bench.code_rev,
    )
    benchmark.pedantic(step, rounds=bench.rounds, iterations=1)
    assert all(torch.isfinite(p).all() for p in params)
