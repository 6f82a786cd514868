"""Shared settings and fixtures of the benchmarks.

Smoke mode (``--benchmark-disable``, as ``make test`` runs, or
``PRESAM_BENCH_SMOKE=1``): every parameter set shrunk to a few tiny tensors,
one round, so the bench folder costs CI seconds. Otherwise the real sets.

Environment (all optional):
  PRESAM_BENCH_SETS      comma list of sets (resnet50, vit_b16, gpt2_medium, llama_1b);
                         default resnet50,vit_b16 on CPU, all four on CUDA
  PRESAM_BENCH_DTYPES    comma list of fp32, bf16; default fp32 on CPU, fp32,bf16 on CUDA
  PRESAM_BENCH_DEVICE    cpu or cuda; default cuda when available
  PRESAM_BENCH_ROUNDS    timed rounds per benchmark; default 10 on CPU, 20 on CUDA
  PRESAM_BENCH_KERNEL_SIZES  kernel table sizes, e.g. 1M,16M,256M; default 1M,16M on CPU
  PRESAM_BENCH_COMPILED  set/dtype/variant triples the compiled loop runs on
                         (e.g. resnet50/fp32/sam); default all
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from shapes import DTYPES

SMOKE_ENV = "PRESAM_BENCH_SMOKE"


def pytest_configure(config):
    if config.getoption("benchmark_disable", default=False):
        os.environ.setdefault(SMOKE_ENV, "1")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def smoke() -> bool:
    return os.environ.get(SMOKE_ENV, "") == "1"


def bench_device() -> torch.device:
    name = os.environ.get("PRESAM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _env_list(name, default):
    value = os.environ.get(name, "").strip()
    return [v.strip() for v in value.split(",") if v.strip()] if value else list(default)


def selected_sets():
    import shapes

    if smoke():
        default = list(shapes.SETS)  # tiny versions of all of them
    elif bench_device().type == "cuda":
        default = list(shapes.SETS)
    else:
        default = ["resnet50", "vit_b16"]  # 2 cores, 24 GB: the big sets are opt-in
    sets = _env_list("PRESAM_BENCH_SETS", default)
    unknown = [s for s in sets if s not in shapes.SETS]
    if unknown:
        raise pytest.UsageError(f"PRESAM_BENCH_SETS: unknown sets {unknown}; known: {list(shapes.SETS)}")
    return sets


def selected_dtypes():
    default = ["fp32", "bf16"] if (smoke() or bench_device().type == "cuda") else ["fp32"]
    dtypes = _env_list("PRESAM_BENCH_DTYPES", default)
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise pytest.UsageError(f"PRESAM_BENCH_DTYPES: unknown {unknown}; known: {list(DTYPES)}")
    return dtypes


def _parse_size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(text[:-1]) * mult[text[-1]] if text[-1] in mult else int(text)


def selected_kernel_sizes():
    if smoke():
        return [4096]
    default = ["1M", "16M", "256M"] if bench_device().type == "cuda" else ["1M", "16M"]
    return [_parse_size(s) for s in _env_list("PRESAM_BENCH_KERNEL_SIZES", default)]


def pytest_generate_tests(metafunc):
    if "set_name" in metafunc.fixturenames:
        metafunc.parametrize("set_name", selected_sets())
    if "dtype_name" in metafunc.fixturenames:
        metafunc.parametrize("dtype_name", selected_dtypes())
    if "kernel_size" in metafunc.fixturenames:
        sizes = selected_kernel_sizes()
        metafunc.parametrize("kernel_size", sizes, ids=[_size_id(n) for n in sizes])


def _size_id(n: int) -> str:
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


# -- memory -----------------------------------------------------------------
def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class MemoryProbe:
    """Peak memory above the level at ``start()``.

    CUDA: the caching allocator's peak of allocated bytes (exact).
    CPU: the process's resident-set high-water mark, reset through
    /proc/self/clear_refs (tracemalloc does not see torch's allocations). It is
    approximate: glibc may serve a new tensor from heap memory that an earlier
    tensor freed, which the baseline already counted. None where unreadable.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = None

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = _proc_status_kb("VmRSS") * 1024
        except OSError:
            self.base = None

    def stop(self):
        if self.base is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return max(0, _proc_status_kb("VmHWM") * 1024 - self.base)


# -- fixtures ---------------------------------------------------------------
class Settings:
    def __init__(self):
        self.smoke = smoke()
        self.device = bench_device()
        self.rounds = 1 if self.smoke else int(os.environ.get(
            "PRESAM_BENCH_ROUNDS", "20" if self.device.type == "cuda" else "10"))
        # Untimed steps before timing: warm caches, infoSAM's EMA past its first
        # step, compilation; the memory probe spans them.
        self.warm_steps = 1 if self.smoke else 2
        compiled = os.environ.get("PRESAM_BENCH_COMPILED", "").strip()
        self.compiled_only = None if not compiled else {c.strip() for c in compiled.split(",") if c.strip()}
        self.device_name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else _cpu_name())
        self.code_rev = _code_rev()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory_probe(self):
        return MemoryProbe(self.device)


def _code_rev() -> str:
    """The commit, "+dirty" when the tree has changes, and a hash of the eager
    backend's source: the code a number was measured with."""
    import hashlib
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "presam_kernels"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "?", ""
    try:
        with open(os.path.join(root, "presam_kernels", "backends", "eager.py"), "rb") as f:
            eager = hashlib.sha1(f.read()).hexdigest()[:8]
    except OSError:
        eager = "?"
    return f"{head}{'+dirty' if dirty else ''} (eager.py {eager})"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


@pytest.fixture(scope="session")
def bench():
    # The first optimizer step of a process imports torch._dynamo (seconds,
    # hundreds of MB): do it here, outside every timing and memory probe.
    p = torch.zeros(1, requires_grad=True)
    p.grad = torch.zeros(1)
    torch.optim.SGD([p], lr=0.0).step()
    return Settings()


@pytest.fixture(autouse=True)
def _one_thread_in_smoke_mode():
    """Tiny tensors gain nothing from intra-op threads, and on a busy CI box
    OpenMP's spinning threads make them seconds slow; restored afterwards."""
    if not smoke():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def copy_gbps(bench):
    """The device's copy bandwidth in GB/s (read + write bytes, 1e9), measured
    once per run with the same torch and thread count: the 100 % of the
    "% of copy" columns.

    The fastest of several copies of the same bytes, each its best of
    ``rounds``, interleaved so that a busy spell hits them alike: a single
    ``Tensor.copy_`` timed alone reported 29.7 GB/s in a run whose steps moved
    45 GB/s of docs/design.md bytes (rows at 115-160 % "of copy"), so one op is not
    a bandwidth. Candidates: ``copy_``, an element-wise op writing into
    ``out`` (TensorIterator's parallel loop), and, when the extension is
    built, its parallel memcpy (``presam_cpp::restore_``, chunks over threads)."""
    n = (1 << 20) if bench.smoke else (64 << 20 if bench.device.type == "cpu" else 256 << 20)
    src = torch.ones(n, dtype=torch.float32, device=bench.device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages
    candidates = {"copy_": lambda: dst.copy_(src), "mul_out": lambda: torch.mul(src, 1.0, out=dst)}
    if bench.device.type == "cpu":
        import presam_kernels

        if presam_kernels.extension_available():
            from presam_kernels.backends import cpp  # noqa: F401  (loads the ops)

            candidates["parallel_memcpy"] = lambda: torch.ops.presam_cpp.restore_([dst], src, [0])
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(3 if bench.smoke else 10):
        for name, copy in candidates.items():
            bench.sync()
            t0 = time.perf_counter()
            copy()
            bench.sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    return 2 * 4 * n / min(best.values()) / 1e9
