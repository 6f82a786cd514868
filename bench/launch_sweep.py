"""Measures the Triton kernels' launch constants (elements per chunk, programs
per SM, warps per program), which are set in ``backends/triton`` without a
measurement yet: SAM's perturb (K1 + K2) and restore (K3) on a flat fp32
bucket and on 64 equal tensors, as GB/s under docs/design.md §3's bytes
and as % of the device-to-device copy measured in the same run.

    PYTHONPATH=. python3 bench/launch_sweep.py          # GPU machine, about a minute
    PYTHONPATH=. python3 bench/launch_sweep.py --dry    # CPU under the interpreter, tiny sizes

It prints one table; pick the fastest row that is fastest on both layouts
and write the figures next to the constants they choose.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

DRY = "--dry" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from presam_kernels import SAM  # noqa: E402
from presam_kernels.backends.triton import k1_reduce, k2_perturb, k3_restore  # noqa: E402
from presam_kernels.backends.triton import table as triton_table  # noqa: E402

# docs/design.md §3, SAM in fp32: K1 reads g (4 B); K2 reads g and x and
# writes backup and x (16 B); K3 reads backup and writes x (8 B).
PERTURB_BYTES = 20
RESTORE_BYTES = 8
KERNEL_MODULES = (k1_reduce, k2_perturb, k3_restore)


def configure(chunk: int, programs_per_sm: int, warps: int):
    if triton_table.interpreting():
        triton_table.INTERPRETER_CHUNK = chunk
        triton_table.INTERPRETER_PROGRAMS = programs_per_sm
    else:
        triton_table.CHUNK = chunk
        triton_table.PROGRAMS_PER_SM = programs_per_sm
        triton_table._programs.clear()
    for module in KERNEL_MODULES:
        module.NUM_WARPS = warps


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, reps: int) -> float:
        """Median seconds of ``fn``."""
        times = []
        for _ in range(reps):
            if self.cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]


def copy_gbps(numel, device, timer) -> float:
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * 4 * numel / timer(lambda: dst.copy_(src), 10) / 1e9


def measure(layout: str, numel: int, device, timer, reps: int) -> tuple[float, float]:
    """(perturb seconds, restore seconds), medians."""
    count = 1 if layout == "flat" else 64
    params = [torch.randn(numel // count, device=device, requires_grad=True) for _ in range(count)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.0, flatten=layout == "flat", backend="triton",
              perturb="in_place")
    for _ in range(2):  # compile, build the tables
        opt.first_step()
        opt.restore()
    perturb_times, restore_times = [], []
    for _ in range(reps):
        perturb_times.append(timer(opt.first_step, 1))
        restore_times.append(timer(opt.restore, 1))
    del opt, params
    return sorted(perturb_times)[reps // 2], sorted(restore_times)[reps // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, interpreter, tiny sizes")
    parser.add_argument("--numel", type=int, default=None, help="elements per layout (default 256M; dry 2K)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry else "cuda")
    numel = args.numel or ((2 << 10) if args.dry else (256 << 20))
    chunks, programs, warps = ([256], [2, 3], [4]) if args.dry else ([1024, 2048, 4096], [2, 4, 8], [4, 8])
    reps = 1 if args.dry else 10
    timer = Timer(device)
    copy = copy_gbps(numel, device, timer)
    name = "CPU (interpreter)" if args.dry else torch.cuda.get_device_name(device)
    print(f"# launch sweep: {name}, {numel:,} fp32 elements, torch {torch.__version__}, "
          f"copy {copy:.0f} GB/s, SAM, medians of {reps}")
    print("| chunk | programs/SM | warps | layout | perturb ms | perturb GB/s | % copy | restore ms | restore GB/s | % copy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for chunk, per_sm, warp in itertools.product(chunks, programs, warps):
        configure(chunk, per_sm, warp)
        for layout in ("flat", "64 tensors"):
            perturb, restore = measure(layout, numel, device, timer, reps)
            p_gbps = PERTURB_BYTES * numel / perturb / 1e9
            r_gbps = RESTORE_BYTES * numel / restore / 1e9
            print(f"| {chunk} | {per_sm} | {warp} | {layout} | {perturb * 1e3:.3f} | {p_gbps:.0f} | "
                  f"{100 * p_gbps / copy:.0f} | {restore * 1e3:.3f} | {r_gbps:.0f} | {100 * r_gbps / copy:.0f} |",
                  flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
