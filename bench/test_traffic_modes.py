"""SAM's own memory traffic (issue 7): in place vs out of place, restore +
base step vs the fused update, against the per-parameter loop.

``test_traffic_modes``: first_step + second_step on given gradients (the
"fresh" regime of test_step_overhead: new gradient tensors before every
step, untimed), every provider driving the same base SGD(lr=1e-6).
Providers:
  loop                        the common per-parameter loop (baselines.LoopSAM)
  eager_in_place[_flat]       ours, eager, x += e, backup, restore copy
  eager_out_of_place[_flat]   ours, eager, x + e into our buffer, .data switched
  triton_k123[_flat]          ours, Triton K1 + K2 + K3, then base_optimizer.step()
  triton_fused[_flat]         ours, Triton K1 + K2 + K4 (restore fused into SGD)
  triton_oop_fused[_flat]     ours, Triton out of place + K4 reading x in place
(Triton providers on CUDA only: the interpreter times nothing meaningful.)

``test_switch_cost``: the Python work of out-of-place mode alone: pointing
every parameter's .data at its slice and back, per tensor.
``test_auto_crossover``: in place vs out of place on uniform sets of 64
tensors of a given size, to place perturb="auto"'s threshold: eager on the
CPU, the Triton providers with the fused update on CUDA (what each device
runs by default); the two largest sizes on CUDA only.

Report: ``python bench/test_traffic_modes.py run.json`` prints the markdown
section for bench/RESULTS_traffic.md.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import baselines
import shapes
from shapes import DTYPES

PROVIDERS = (
    "loop",
    "eager_in_place",
    "eager_out_of_place",
    "eager_in_place_flat",
    "eager_out_of_place_flat",
    "triton_k123",
    "triton_fused",
    "triton_oop_fused",
    "triton_k123_flat",
    "triton_fused_flat",
    "triton_oop_fused_flat",
)
CROSSOVER_SIZES = (1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 21, 1 << 23)
CROSSOVER_CPU_MAX = 1 << 19  # 64 x 8M fp32 with gradients and buffers: too much for a CI machine
CROSSOVER_PROVIDERS = {  # per device type: (in place, out of place)
    "cpu": ("eager_in_place", "eager_out_of_place"),
    "cuda": ("triton_fused", "triton_oop_fused"),
}


def build(provider, params):
    if provider == "loop":
        return baselines.build("loop", "sam", params)
    import presam_kernels

    backend = "triton" if provider.startswith("triton") else "eager"
    perturb = "out_of_place" if ("out_of_place" in provider or "oop" in provider) else "in_place"
    opt = presam_kernels.SAM(params, torch.optim.SGD, rho=baselines.RHO["sam"], lr=baselines.BASE_LR,
                             backend=backend, flatten=provider.endswith("_flat"), perturb=perturb)
    if provider.startswith("triton_k123"):
        # A (no-op) step hook: the base optimizer is no longer covered, so
        # second_step restores (K3) and calls base_optimizer.step().
        opt.base_optimizer.register_step_pre_hook(lambda *args: None)
    return opt


def unavailable(provider, device):
    if provider.startswith("triton"):
        if device.type != "cuda":
            return "triton providers: CUDA only (the interpreter times nothing meaningful)"
        if not baselines.triton_backend_available():
            return "no triton backend"
    return None


def _warm_steps(bench, provider, shape_list, dtype):
    """``provider`` built on ``shape_list``'s tensors and warmed up: (params,
    optimizer, set_grads, step), set_grads handing out fresh gradients (untimed)."""
    params = shapes.make_params(shape_list, bench.device, dtype)
    grad_values = shapes.make_grads(params)
    opt = build(provider, params)

    def set_grads():
        for p, g in zip(params, grad_values):
            p.grad = g.clone()

    def step():
        opt.first_step()
        opt.second_step()
        bench.sync()

    for _ in range(bench.warm_steps):
        set_grads()
        step()
    return params, opt, set_grads, step


@pytest.mark.parametrize("provider", PROVIDERS)
def test_traffic_modes(benchmark, bench, set_name, dtype_name, provider):
    reason = unavailable(provider, bench.device)
    if reason:
        pytest.skip(reason)
    shape_list = shapes.SETS[set_name]()
    if bench.smoke:
        shape_list = shapes.tiny(shape_list)
    params, opt, set_grads, step = _warm_steps(bench, provider, shape_list, DTYPES[dtype_name])
    if provider != "loop" and provider.startswith("triton"):
        assert opt.last_step_fused == ("fused" in provider)
    benchmark.group = f"traffic {set_name} {dtype_name}"
    benchmark.extra_info.update(dict(
        kind="traffic", set=set_name, dtype=dtype_name, provider=provider, tensors=len(params),
        numel=sum(p.numel() for p in params), device=bench.device.type, device_name=bench.device_name,
        load1=os.getloadavg()[0], code=bench.code_rev, torch=torch.__version__,
    ))
    benchmark.pedantic(step, setup=set_grads, rounds=bench.rounds, iterations=1)


@pytest.mark.parametrize("count", (64, 292))
def test_switch_cost(benchmark, bench, count):
    """Out of place's Python work alone: .data to the slice and back, ``count`` tensors."""
    flat = torch.zeros(count * 256, device=bench.device)
    params = [torch.zeros(256, device=bench.device, requires_grad=True) for _ in range(count)]
    views = [flat[i * 256:(i + 1) * 256] for i in range(count)]

    def switch():
        saved = []
        for p, v in zip(params, views):
            saved.append(p.data)
            p.data = v
        for p, d in zip(params, saved):
            p.data = d

    benchmark.group = "switch cost"
    benchmark.extra_info.update(dict(kind="switch", tensors=count, device=bench.device.type,
                                     load1=os.getloadavg()[0]))
    benchmark.pedantic(switch, rounds=50 if not bench.smoke else 1, iterations=10 if not bench.smoke else 1)


@pytest.mark.parametrize("size", CROSSOVER_SIZES, ids=[f"{s}" for s in CROSSOVER_SIZES])
@pytest.mark.parametrize("mode", ("in_place", "out_of_place"))
def test_auto_crossover(benchmark, bench, size, mode):
    if bench.smoke and size > CROSSOVER_SIZES[0]:
        pytest.skip("smoke: smallest size only")
    if bench.device.type == "cpu" and size > CROSSOVER_CPU_MAX:
        pytest.skip("CUDA only: the CPU crossover is below this size")
    provider = CROSSOVER_PROVIDERS[bench.device.type][mode == "out_of_place"]
    reason = unavailable(provider, bench.device)
    if reason:
        pytest.skip(reason)
    shape_list = [(f"t{i}", (size,)) for i in range(64)]
    _, _, set_grads, step = _warm_steps(bench, provider, shape_list, torch.float32)
    benchmark.group = f"crossover {size}"
    benchmark.extra_info.update(dict(kind="crossover", size=size, tensors=64, provider=provider, mode=mode,
                                     device=bench.device.type, device_name=bench.device_name,
                                     load1=os.getloadavg()[0]))
    benchmark.pedantic(step, setup=set_grads, rounds=bench.rounds * 2, iterations=1)


# -- report -------------------------------------------------------------------
def _report(path):
    with open(path) as f:
        run = json.load(f)
    rows = [(b["extra_info"], b["stats"]) for b in run["benchmarks"]]
    machine = run.get("machine_info", {})
    out = [f"Run: {run.get('datetime', '?')}, {machine.get('cpu', {}).get('brand_raw', machine.get('node', '?'))}, "
           f"torch {rows[0][0].get('torch', '?') if rows else '?'}", ""]
    traffic = [r for r in rows if r[0].get("kind") == "traffic"]
    for set_name in dict.fromkeys(info["set"] for info, _ in traffic):
        group = [(i, s) for i, s in traffic if i["set"] == set_name]
        loop = next((s["median"] for i, s in group if i["provider"] == "loop"), None)
        info0 = group[0][0]
        out += [f"**{set_name}** ({info0['tensors']} tensors, {info0['numel'] / 1e6:.1f}M elements, "
                f"{info0['dtype']}, {info0['device_name']}, load {info0['load1']:.1f}, code {info0['code']})", "",
                "| provider | median ms | IQR ms | loop / provider |", "|---|---|---|---|"]
        for i, s in group:
            speed = f"{loop / s['median']:.2f}x" if loop else "-"
            out.append(f"| {i['provider']} | {s['median'] * 1e3:.1f} | {s['iqr'] * 1e3:.1f} | {speed} |")
        out.append("")
    switch = [r for r in rows if r[0].get("kind") == "switch"]
    if switch:
        out += ["**Switch cost** (.data to the slice and back, Python work only)", "",
                "| tensors | median us per switch round | us per tensor |", "|---|---|---|"]
        for i, s in switch:
            out.append(f"| {i['tensors']} | {s['median'] * 1e6:.0f} | {s['median'] * 1e6 / i['tensors']:.2f} |")
        out.append("")
    cross = [r for r in rows if r[0].get("kind") == "crossover"]
    if cross:
        providers = " vs ".join(dict.fromkeys(i["provider"] for i, _ in cross))
        out += [f"**Crossover** (64 equal fp32 tensors, {providers}, first_step + second_step, fresh gradients)",
                "", "| elements per tensor | in place ms | out of place ms | in / out |", "|---|---|---|---|"]
        for size in dict.fromkeys(i["size"] for i, _ in cross):
            # Runs before the mode was recorded hold the eager provider names.
            med = {i.get("mode", i["provider"].replace("eager_", "")): s["median"] for i, s in cross
                   if i["size"] == size}
            a, b = med.get("in_place"), med.get("out_of_place")
            if a and b:
                out.append(f"| {size} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(_report(sys.argv[1]))
