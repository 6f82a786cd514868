"""Every kernel specialization the launchers can produce, compiled ahead of
time for a GPU target on a machine without one: whether it compiles, its
registers, spills and shared memory, and the width of its global accesses.

The specializations come from each kernel module's own ``constexprs`` (the
function its launcher calls): every value of each switch it takes as a bool,
an Enum or a Literal, times the parameter dtypes, deduplicated by the
constexprs they give. A new switch is therefore compiled without editing this
file; a switch of another type fails here until it is given a domain.

Needs the JIT functions, so it runs in a process without TRITON_INTERPRET::

    python -m presam_kernels.backends.triton.codegen --arch 80 90 --out codegen.json

Compiled kernels are cached by Triton under TRITON_CACHE_DIR (the caller sets
a temp dir), the resource counts beside them, so a second run costs seconds.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import enum
import hashlib
import inspect
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import typing
from concurrent.futures import ProcessPoolExecutor

from . import k1_reduce, k2_perturb, k3_restore, k4_restore_step, table

KERNEL_MODULES = {"K1": k1_reduce, "K2": k2_perturb, "K3": k3_restore, "K4": k4_restore_step}
# The parameter dtypes the buckets take to the kernels (Triton's names).
PARAM_DTYPES = ("fp32", "bf16", "fp16", "fp64")
VECTOR_BITS = 128


def _domain(hint) -> tuple:
    if hint is bool:
        return (False, True)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return tuple(hint)
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    raise TypeError(f"a switch annotated {hint!r} has no domain to enumerate: give it one in codegen._domain")


def specializations(module, every: bool = True) -> list[dict]:
    """The distinct constexpr dicts ``module.constexprs`` returns: with
    ``every``, over the product of its annotated switches' domains; else over
    a covering set (each value of each switch at least once, all switches
    moving together: a few kernels, for the quick run of ``make test``).
    Launch constants (parameters with a default) keep their GPU values."""
    sig = inspect.signature(module.constexprs)
    hints = typing.get_type_hints(module.constexprs)
    switches = [name for name, p in sig.parameters.items() if p.default is inspect.Parameter.empty]
    domains = [_domain(hints[name]) for name in switches]
    if every:
        combos = itertools.product(*domains)
    else:
        width = max(len(d) for d in domains)
        combos = [tuple(d[(i + k) % len(d)] for k, d in enumerate(domains)) for i in range(width)]
        combos += [tuple(d[-1 - ((i + k) % len(d))] for k, d in enumerate(domains)) for i in range(width)]
    seen = {}
    for values in combos:
        consts = module.constexprs(**dict(zip(switches, values)))
        seen.setdefault(tuple(sorted(consts.items())), consts)
    return list(seen.values())


def jobs(every: bool = True) -> list[tuple[str, dict, str]]:
    """(kernel name, constexprs, parameter dtype) of every specialization (or
    of a covering set, see ``specializations``), in each dtype the kernel's
    launcher takes (``PARAM_DTYPES`` of the module, else all)."""
    return [
        (name, consts, dtype)
        for name, module in KERNEL_MODULES.items()
        for consts in specializations(module, every)
        for dtype in getattr(module, "PARAM_DTYPES", PARAM_DTYPES)
    ]


def _calls_chunk(node) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "CHUNK_FN" for n in ast.walk(node))


def _hot_lines() -> tuple[str, list]:
    """(file name, line ranges) of the kernels' hot loop: the innermost
    ``while`` loops of ``table.walk_rows`` (the one row walk) that call the
    kernel's chunk function (a row's unmasked chunks). An access is in it when
    one of its call sites is: Triton 3.9 names only the innermost, so a chunk
    function makes its global accesses itself, not through a helper."""
    fn = table.walk_rows
    lines, first = inspect.getsourcelines(fn.fn)
    loops = [n for n in ast.walk(ast.parse(textwrap.dedent("".join(lines)))) if isinstance(n, ast.While) and _calls_chunk(n)]
    inner = [n for n in loops if not any(isinstance(m, ast.While) and m is not n for m in ast.walk(n))]
    return os.path.basename(inspect.getsourcefile(fn.fn)), [range(n.lineno + first - 1, n.end_lineno + first) for n in inner]


# ld.global / st.global with optional cache or eviction qualifiers, vector count and element type.
_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[A-Za-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")
# Triton 3.6: ".loc 1 84 20 // k1.py:84:20 @[ k1.py:99:30 ]" (the comment names each call site);
# Triton 3.9: ".loc 1 84 20, function_name ..., inlined_at 1 99 30 // k1.py:84:20" (the caller's site).
_LOC = re.compile(r"^\s*\.loc\s+\d+\s+\d+\s+\d+\s*(,[^/]*)?//\s*(.*)$")
_INLINED_AT = re.compile(r"inlined_at\s+(\d+)\s+(\d+)\s+\d+")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')


def accesses(ptx: str, hot_file: str, hot: list) -> dict:
    """Widths (bits) of global loads and stores, split into the hot loops' and the rest."""
    out = {"hot_ld": [], "hot_st": [], "other_ld": [], "other_st": []}
    files = {m.group(1): os.path.basename(m.group(2)) for m in map(_FILE.match, ptx.splitlines()) if m}
    sites = []
    for line in ptx.splitlines():
        loc = _LOC.match(line)
        if loc:
            # The source line and its call sites: a hot access has one inside a hot loop.
            sites = [(f, int(n)) for f, n in re.findall(r"([\w.]+):(\d+):\d+", loc.group(2))]
            sites += [(files.get(f, ""), int(n)) for f, n in _INLINED_AT.findall(loc.group(1) or "")]
            continue
        m = _ACCESS.search(line)
        if not m or line.lstrip().startswith("//"):
            continue
        bits = int(m.group(2) or 1) * int(m.group(3))
        is_hot = any(f == hot_file and n in r for f, n in sites for r in hot)
        out[("hot_" if is_hot else "other_") + m.group(1)].append(bits)
    return out


def _ptxas_info(log: str) -> dict:
    """Registers, spills, stack and static shared memory from ``ptxas -v``."""
    used = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (used and frame):
        raise ValueError(f"no resource counts in the ptxas log: {log[-500:]!r}")
    return dict(
        regs=int(used.group(1)),
        static_shared=int(used.group(2) or 0),
        stack=int(frame.group(1)),
        spill_stores=int(frame.group(2)),
        spill_loads=int(frame.group(3)),
    )


def _run_ptxas(ptx: str, arch: int) -> str:
    """``ptxas -v`` on ``ptx`` (for a kernel Triton took from its cache, where no log was printed)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        return subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        ).stderr


def compile_one(job: tuple, arch: int) -> dict:
    """One specialization for ``sm_{arch}``: what it uses, or the compile error."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, consts, dtype = job
    module = KERNEL_MODULES[name]
    fn = module.KERNEL
    options = {"num_warps": module.NUM_WARPS}
    if hasattr(module, "MAX_REGISTERS"):  # as its launcher passes it
        options["maxnreg"] = module.MAX_REGISTERS
    record = dict(kernel=name, arch=arch, dtype=dtype, constexprs=consts, num_warps=module.NUM_WARPS)
    types = {arg: t.replace("PARAM", dtype) for arg, t in module.ARGUMENTS.items()}
    if set(types) | set(consts) != set(fn.arg_names) or set(types) & set(consts):
        raise ValueError(f"{name}: ARGUMENTS and constexprs do not name the kernel's arguments {fn.arg_names}")
    signature = {arg: types.get(arg, "constexpr") for arg in fn.arg_names}
    # Pointer arguments 16-B aligned, as the launcher specialises torch's allocations.
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names) if types.get(arg, "").startswith("*")}
    src = ASTSource(fn, signature=signature, constexprs=consts, attrs=attrs)
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report when it runs ptxas
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # reported, and failed by the test
        record["error"] = f"{type(e).__name__}: {e}"[:2000]
        return record
    ptx = kernel.asm["ptx"]
    key = hashlib.sha256(f"{arch}{ptx}".encode()).hexdigest()
    cached = os.path.join(os.environ.get("TRITON_CACHE_DIR", tempfile.gettempdir()), f"presam-ptxas-{key}.json")
    if "Used" in log.getvalue():
        found = _ptxas_info(log.getvalue())
        with open(cached, "w") as f:
            json.dump(found, f)
    elif os.path.exists(cached):
        with open(cached) as f:
            found = json.load(f)
    else:
        found = _ptxas_info(_run_ptxas(ptx, arch))
    record.update(found)
    record["dynamic_shared"] = kernel.metadata.shared
    record["ptx_hash"] = key[:16]
    record.update(accesses(ptx, *_hot_lines()))
    return record


def run(archs, workers: int = 1, every: bool = True, keep=lambda job: True) -> list:
    """Compile every specialization (see ``jobs``; those ``keep`` keeps) for
    every arch in ``archs``; one process per worker, each taking an even share
    (imports paid once each)."""
    todo = [(job, arch) for arch in archs for job in jobs(every) if keep(job)]
    if workers <= 1:
        return [compile_one(job, arch) for job, arch in todo]
    shares = [todo[k::workers] for k in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_compile_share, shares))
    return [r for part in parts for r in part]


def _compile_share(share):
    return [compile_one(job, arch) for job, arch in share]


def tools_missing() -> str | None:
    """Why nothing can be compiled here (no NVIDIA backend, no ptxas), or None."""
    try:
        import triton.backends
        from triton import knobs
    except ImportError as e:
        return f"triton is not importable: {e}"
    if "nvidia" not in triton.backends.backends:
        return "triton's NVIDIA backend is not installed"
    for tool in ("ptxas",):
        try:
            if getattr(knobs.nvidia, tool).path is None:
                return f"{tool} is not available to triton"
        except Exception as e:
            return f"{tool} is not available to triton: {e}"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--covering", action="store_true", help="a covering set, not every specialization")
    parser.add_argument("--kernels", nargs="+", help="only these kernels (K1 ... K4)")
    parser.add_argument("--dtypes", nargs="+", help="only these parameter dtypes")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: ahead-of-time compilation needs the JIT functions")
    missing = tools_missing()
    import triton

    start = time.perf_counter()
    def keep(job):
        return (not args.kernels or job[0] in args.kernels) and (not args.dtypes or job[2] in args.dtypes)

    records = [] if missing else run(args.arch, args.workers, every=not args.covering, keep=keep)
    with open(args.out, "w") as f:
        json.dump(
            dict(triton=triton.__version__, every=not args.covering, kernels=args.kernels, dtypes=args.dtypes,
                 skipped=missing, seconds=time.perf_counter() - start, records=records),
            f,
        )


if __name__ == "__main__":
    main()
