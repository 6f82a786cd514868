"""Bytes per parameter element the optimizer holds between steps and at its
peak during a step, per variant, dtype, perturb mode and bucket mode, against
the common per-parameter SAM loop (``baselines.LoopSAM``, and the infoSAM
authors' loop).

Run ``PYTHONPATH=. python bench/memory.py`` (about two minutes on 2 cores);
it writes RESULTS_memory.md next to this file.  ``--smoke --out PATH``
measures tiny sets (what ``make test`` runs, bench/test_memory.py).

How bytes are counted (CPU; deterministic, so tests can assert them):

- held: every tensor storage reachable from the optimizer object (its state,
  its buckets' flat buffers, the base optimizer's state), counted once each,
  less the parameters' and gradients' own storages (the model's), after the
  steps below.  With ``flatten=True`` the flat parameter and gradient buffers are the
  parameters' and gradients' storages, so they count as the model's.
- peak: held plus the highest level of the step's own allocations above the
  level when the step began.  The profiler with memory profiling on
  receives every allocation and free of torch's CPU allocator, each with the
  allocator's running total; that total depends only on the sequence of ops
  (single thread, no caching on the CPU), so it is the same on every run.
  It sees temporaries inside an op too (a bf16 ``addcmul`` into a bf16
  output computes in fp32 through two row-sized fp32 temporaries), which a
  TorchDispatchMode would not.  We drive the profiler through
  ``torch.autograd``'s three calls rather than ``torch.profiler.profile``,
  whose first use imports for seconds (the smoke test's budget).

A step is ``first_step()`` + ``second_step()`` on given gradients (no forward,
no backward), base ``torch.optim.SGD`` without momentum (it holds nothing).
After one warm-up step (state is created lazily, and infoSAM's first step is
plain SAM) the profiler runs over two steps and only the second counts: a
free is counted only for blocks allocated while profiling, and the first
step allocates what the second frees (the loop's ``old_p``, replaced every
step).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys

import torch
from torch._C._profiler import _EventType, _ExperimentalConfig
from torch.autograd import ProfilerActivity, ProfilerConfig, ProfilerState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baselines  # noqa: E402
import shapes  # noqa: E402

import presam_kernels  # noqa: E402

VARIANTS = ("SAM", "ASAM", "FisherSAM", "VaSSO", "InfoSAM")
HAS_EMA = {"VaSSO", "InfoSAM"}
PERTURB_MODES = ("in_place", "out_of_place")
# The common loop of the same variant, where bench/baselines.py has one.
LOOP_VARIANT = {"SAM": "sam", "ASAM": "asam", "InfoSAM": "infosam"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_memory.md")


def single_tensor():
    """One 8M-element tensor: the per-parameter loop's worst case, where a
    tensor's temporaries are the model's size."""
    return [("w", (2048, 4096))]


SETS = {"resnet50": shapes.resnet50, "single_8m": single_tensor}


def state_bytes_per_element(variant: str, element_size: int) -> int:
    """What the variant's state needs: a backup of x or the adversarial
    point (the parameter's dtype), plus the fp32 EMA for VaSSO and infoSAM."""
    return element_size + (4 if variant in HAS_EMA else 0)


@dataclasses.dataclass
class Row:
    set_name: str
    dtype: str
    variant: str
    provider: str  # "eager" or "loop"
    perturb: str
    flatten: bool | None
    numel: int
    held: int  # bytes
    peak: int  # bytes

    @property
    def held_per_element(self) -> float:
        return self.held / self.numel

    @property
    def peak_per_element(self) -> float:
        return self.peak / self.numel


def build_ours(variant, params, perturb, flatten):
    cls = getattr(presam_kernels, variant)
    return cls(params, torch.optim.SGD, lr=baselines.BASE_LR, backend="eager", perturb=perturb, flatten=flatten)


def held_bytes(opt, params) -> int:
    """Bytes of the storages reachable from ``opt``, less the parameters' and gradients'."""
    model = {p.untyped_storage().data_ptr() for p in params}
    model |= {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    found = {}
    _collect(opt, found, set())
    return sum(n for ptr, n in found.items() if ptr not in model)


def _collect(obj, found, seen):
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.nbytes():
            found[storage.data_ptr()] = storage.nbytes()
        return
    if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, type)):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for key, value in obj.items():
            _collect(key, found, seen)
            _collect(value, found, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            _collect(item, found, seen)
    elif type(obj).__module__.split(".")[0] in ("presam_kernels", "torch", "baselines") and hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            _collect(value, found, seen)


def _step(opt):
    opt.first_step()
    opt.second_step()


def transient_peak_bytes(opt) -> int:
    """Highest level of the step's allocations above the level it began at
    (the second of two profiled steps)."""
    _profiled(_step, opt)
    result = _profiled(_step, opt)
    events = [e for e in _walk(result.experimental_event_tree()) if e.typed[0] == _EventType.Allocation]
    if not events:
        return 0
    events.sort(key=lambda e: e.start_time_ns)
    first = events[0].typed[1]
    start = first.total_allocated - first.alloc_size
    return max(0, max(e.typed[1].total_allocated for e in events) - start)


def _profiled(fn, *args):
    """Run fn(*args) under the CPU profiler with memory profiling; its result."""
    config = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
    activities = {ProfilerActivity.CPU}
    torch.autograd._prepare_profiler(config, activities)
    torch.autograd._enable_profiler(config, activities)
    try:
        fn(*args)
    finally:
        result = torch.autograd._disable_profiler()
    return result


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def measure(set_name, shape_list, dtype_name, variant, provider, perturb=None, flatten=None) -> Row:
    params = shapes.make_params(shape_list, dtype=shapes.DTYPES[dtype_name])
    for p, g in zip(params, shapes.make_grads(params)):
        p.grad = g
    if provider == "eager":
        opt = build_ours(variant, params, perturb, flatten)
    else:
        opt = baselines.build("loop", LOOP_VARIANT[variant], params)
    _step(opt)  # infoSAM's plain-SAM first step; the lazily made state
    transient = transient_peak_bytes(opt)
    held = held_bytes(opt, params)  # after the steps: what the last step left, as the next one begins
    peak = held + transient
    numel = sum(p.numel() for p in params)
    return Row(set_name, dtype_name, variant, provider, perturb or "-", flatten, numel, held, peak)


def run(sets, dtypes=("fp32", "bf16"), variants=VARIANTS, piece=None):
    """Every (set, dtype, variant, perturb mode, bucket mode), and the loop;
    ``piece`` replaces the eager backend's ``PIECE`` for the run (tiny sets)."""
    from presam_kernels.backends import eager

    saved_piece = eager.PIECE
    eager.PIECE = piece or saved_piece
    try:
        return _run(sets, dtypes, variants)
    finally:
        eager.PIECE = saved_piece


def _run(sets, dtypes, variants):
    rows = []
    for set_name, shape_list in sets.items():
        for dtype_name in dtypes:
            for variant in variants:
                for perturb in PERTURB_MODES:
                    for flatten in (False, True):
                        rows.append(measure(set_name, shape_list, dtype_name, variant, "eager", perturb, flatten))
                if variant in LOOP_VARIANT:
                    rows.append(measure(set_name, shape_list, dtype_name, variant, "loop"))
    return rows


def table(rows) -> str:
    lines = [
        "| set | dtype | variant | provider | perturb | flatten | state needs B/elem | held B/elem | peak B/elem |",
        "|---|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        size = shapes.DTYPES[r.dtype].itemsize
        needs = state_bytes_per_element(r.variant, size) if r.provider == "eager" else "-"
        flatten = "-" if r.flatten is None else str(r.flatten)
        lines.append(
            f"| {r.set_name} | {r.dtype} | {r.variant} | {r.provider} | {r.perturb} | {flatten} | {needs} | "
            f"{r.held_per_element:.2f} | {r.peak_per_element:.2f} |"
        )
    return "\n".join(lines)


def write_results(rows, path=RESULTS):
    from presam_kernels.backends import eager

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    text = f"""# Memory: bytes per parameter element

Written by `bench/memory.py`; do not edit by hand (see that file's docstring
for how bytes are counted).  Run: {now}; torch {torch.__version__}; eager
backend, `PIECE` = {eager.PIECE} elements.

"held": bytes the optimizer keeps between steps (its state and buffers,
not the parameters and gradients).  "peak": held plus the step's own
temporaries at their highest.  "state needs": a backup of x or the
adversarial point (the parameter's dtype) plus, for VaSSO and infoSAM, the
fp32 EMA.  "loop": the common per-parameter SAM loop (bench/baselines.py:
LoopSAM for SAM and ASAM, the infoSAM authors' loop), for reference.
`single_8m` is one tensor of 8M elements: the loop's worst case, where one
tensor's temporaries are the whole model's size.

{table(rows)}
"""
    with open(path, "w") as f:
        f.write(text)


def tiny_sets():
    return {"resnet50_tiny": shapes.tiny(shapes.resnet50(), count=12, cap=64)}


# With tiny sets, batches of this many elements: the real PIECE would hold a
# tiny set in one batch, whose temporaries would then be the set's size.
TINY_PIECE = 2048


def main(argv=None):
    """Measure and write the results file; returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sets (what make test runs)")
    parser.add_argument("--out", default=RESULTS, help="the results file (default: bench/RESULTS_memory.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        rows = run(tiny_sets(), piece=TINY_PIECE)
    else:
        rows = run({name: make() for name, make in SETS.items()})
    write_results(rows, args.out)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
