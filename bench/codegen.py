"""Writes codegen.md: what every Triton kernel specialization costs on the GPU,
from ahead-of-time compilation (no GPU needed): registers per thread, spills,
shared memory, the width of the hot loops' global accesses, and the occupancy
each implies on an H100; then which launch constants that data supports.

    PYTHONPATH=. python3 bench/codegen.py            # compiles (a few minutes on 2 cores), writes bench/codegen.md
    PYTHONPATH=. python3 bench/codegen.py --python .venv/bin/python .venv-t39/bin/python   # one run per Triton
    PYTHONPATH=. python3 bench/codegen.py --json a.json b.json   # from saved codegen runs

Runs of several Triton versions: the tables are the first version's (the
pinned one), with the others' registers and spills as extra columns.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from presam_kernels.backends.triton import table  # noqa: E402
from presam_kernels.backends.triton.codegen import KERNEL_MODULES  # noqa: E402
from presam_kernels.preconditioners import Constraint, Objective  # noqa: E402

# H100 SXM (sm_90): per SM.
H100_SMS = 132
H100 = dict(regs=65536, max_warps=64, max_blocks=32, shared=228 * 1024, reg_unit=256, shared_per_block_reserved=1024)
KERNEL_NAMES = {"K1": "reduce", "K2": "perturb", "K3": "restore", "K4": "restore + base step"}
OBJECTIVES = {o.code: o.value for o in Objective}
CONSTRAINTS = {c.code: c.value for c in Constraint}


def programs_per_sm(regs: int, warps: int, shared: int) -> int:
    """Resident programs (thread blocks) per H100 SM for a kernel of ``regs``
    registers per thread, ``warps`` warps and ``shared`` bytes of shared memory."""
    per_warp = -(-regs * 32 // H100["reg_unit"]) * H100["reg_unit"]  # registers are allocated per warp
    by_regs = (H100["regs"] // per_warp) // warps
    by_warps = H100["max_warps"] // warps
    by_shared = H100["shared"] // (shared + H100["shared_per_block_reserved"])
    return min(by_regs, by_warps, by_shared, H100["max_blocks"])


def occupancy(regs: int, warps: int, shared: int) -> float:
    return programs_per_sm(regs, warps, shared) * warps / H100["max_warps"]


def describe(run: dict) -> str:
    what = "every specialization" if run.get("every", True) else "a covering set (every value of every switch)"
    if run.get("kernels"):
        what += " of " + ", ".join(run["kernels"])
    if run.get("dtypes"):
        what += " in " + ", ".join(run["dtypes"])
    return what + " for " + ", ".join(f"sm_{a}" for a in sorted({r["arch"] for r in run["records"]}))


def merge(runs: list) -> dict:
    """One report's data from several codegen runs (of one Triton version)."""
    seen = {}
    for run in runs:
        for r in run["records"]:
            seen[(r["kernel"], json.dumps(r["constexprs"], sort_keys=True), r["dtype"], r["arch"])] = r
    return dict(
        triton=runs[0]["triton"],
        skipped=next((run["skipped"] for run in runs if run.get("skipped")), None),
        what="; then, replacing those records, ".join(describe(run) for run in runs),
        records=list(seen.values()),
    )


def compile_all(python: str = sys.executable) -> dict:
    """Every specialization for sm_80 and sm_90 under ``python``'s Triton (cached
    per version in the temp dir, as tests/test_codegen.py caches them)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    version = subprocess.run(
        [python, "-c", "import triton; print(triton.__version__)"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    env.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"presam-codegen-triton-{version}"))
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "codegen.json")
        subprocess.run(
            [python, "-m", "presam_kernels.backends.triton.codegen", "--arch", "80", "90",
             "--workers", str(os.cpu_count() or 1), "--out", out],
            env=env, check=True,
        )
        with open(out) as f:
            return json.load(f)


def _class(r) -> str:
    """A row's class of specialization: the switches that move registers."""
    c = r["constexprs"]
    if r["kernel"] in ("K1", "K2"):
        parts = [OBJECTIVES[c["OBJECTIVE"]], CONSTRAINTS[c["CONSTRAINT"]]]
        if c["OBJECTIVE"]:
            parts.append("EMA warm" if c["EMA_READY"] else "EMA cold")
        return " / ".join(parts)
    if r["kernel"] == "K4":
        return ("SGD" if c["KIND"] == 0 else "Adam, AdamW") + (" / from backup" if c["FROM_BACKUP"] else "")
    return "copy"


def _group(records) -> dict:
    by = collections.defaultdict(list)
    for r in records:
        by[_key(r)].append(r)
    return by


def _other_cells(rows: list) -> str:
    if not rows:
        return " - | - |"
    regs = lambda arch: _span([r["regs"] for r in rows if r["arch"] == arch] or [0])  # noqa: E731
    return f" {regs(90)} ({regs(80)}) | {max(r['spill_stores'] + r['spill_loads'] for r in rows)} |"


def _programs(r) -> int:
    return programs_per_sm(r["regs"], r["num_warps"], r["static_shared"] + r["dynamic_shared"])


def _programs_line(all_90: list, fewest_k2: int) -> str:
    """What the sm_90 registers say of PROGRAMS_PER_SM: whether every launch is one resident wave."""
    wanted = table.PROGRAMS_PER_SM
    short = [r for r in all_90 if _programs(r) < wanted]
    fewest = min(_programs(r) for r in all_90)
    tail = (
        f" Whether {wanted} x 4 warps = {wanted * 4} warps per SM keep enough bytes in flight to reach copy "
        "bandwidth is what `bench/launch_sweep.py` measures: **needs a GPU**."
    )
    if not short:
        return (
            f"- **PROGRAMS_PER_SM = {wanted}: supported.** Every sm_90 specialization fits at least {fewest} "
            f"programs per SM (K2: {fewest_k2}), so the launch's {wanted} x {H100_SMS} programs are all resident "
            "at once: one wave, no tail of programs waiting for a slot." + tail
        )
    classes = sorted({
        f"{r['kernel']} {r['dtype']} {_class(r)}, {'aligned' if r['constexprs']['ALIGNED'] else 'unaligned'}"
        for r in short
    })
    aligned = [r for r in short if r["constexprs"]["ALIGNED"]]
    return (
        f"- **PROGRAMS_PER_SM = {wanted}: supported except for {len(short)} of {len(all_90)} sm_90 "
        f"specializations** ({len(aligned)} of them on aligned rows), which fit only {fewest} programs per SM by "
        f"their registers, so on an H100 a launch of {wanted} x {H100_SMS} programs runs in two waves there: "
        + "; ".join(classes[:8]) + ("; ..." if len(classes) > 8 else "")
        + f". Every other specialization (K2: at least {fewest_k2}) is one resident wave." + tail
    )


def _widths(bits: list) -> str:
    return "/".join(str(b) for b in sorted(set(bits))) or "-"


def _span(values) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _key(r) -> tuple:
    return (r["kernel"], r["dtype"], r["constexprs"]["ALIGNED"])


def render(data: dict, before: dict | None = None, others: list = ()) -> str:
    """The report of ``data`` (one Triton version's records); ``others``:
    other versions' data, whose registers and spills join the per-kernel table."""
    records = [r for r in data["records"] if "error" not in r]
    errors = [r for r in data["records"] if "error" in r] + [r for o in others for r in o["records"] if "error" in r]
    other_by = [
        (o["triton"], collections.defaultdict(list, _group(r for r in o["records"] if "error" not in r)))
        for o in others
    ]
    lines = [
        "# Kernel code generation (ahead of time, no GPU)",
        "",
        f"Written by `bench/codegen.py` from Triton {data['triton']}: {data['what']} "
        f"({len(data['records'])} kernels: "
        + ", ".join(f"{n} {sum(r['kernel'] == n for r in data['records'])}" for n in KERNEL_MODULES)
        + "). "
        f"{len(errors)} failed to compile. Registers and spills from `ptxas -v`; access widths from the PTX "
        "(`ld/st.global[.vN]`, bits per instruction) of the hot loop (a row's unmasked chunks); occupancy: "
        "resident warps / 64 on an H100 SM at the kernel's registers, warps and shared memory.",
    ]
    for version, o in zip((v for v, _ in other_by), others):
        lines.append(
            f"Also Triton {version}: {o['what']} ({len(o['records'])} kernels, "
            f"{sum('error' in r for r in o['records'])} failed to compile): its registers and spills are the last "
            "columns of the first table."
        )
    lines += [
        "",
        "## Per kernel and dtype (sm_90 unless said)",
        "",
        "| kernel | dtype | rows | registers sm_90 (sm_80) | spills (B) | shared (B) | hot ld bits | hot st bits "
        "| programs/SM (H100) | occupancy |"
        + "".join(f" Triton {v}: registers sm_90 (sm_80) | Triton {v}: spills (B) |" for v, _ in other_by),
        "|---|---|---|---|---|---|---|---|---|---|" + "---|---|" * len(other_by),
    ]
    by = _group(records)
    for (kernel, dtype, aligned), rows in sorted(by.items()):
        h = [r for r in rows if r["arch"] == 90]
        a = [r for r in rows if r["arch"] == 80]
        regs90 = [r["regs"] for r in h]
        shared = [r["static_shared"] + r["dynamic_shared"] for r in h]
        warps = h[0]["num_warps"]
        progs = [programs_per_sm(r["regs"], warps, r["static_shared"] + r["dynamic_shared"]) for r in h]
        occ = [occupancy(r["regs"], warps, r["static_shared"] + r["dynamic_shared"]) for r in h]
        lines.append(
            f"| {kernel} {KERNEL_NAMES[kernel]} | {dtype} | {'aligned' if aligned else 'unaligned'} "
            f"| {_span(regs90)} ({_span([r['regs'] for r in a])}) "
            f"| {max(r['spill_stores'] + r['spill_loads'] for r in rows)} | {_span(shared)} "
            f"| {_widths([b for r in h for b in r['hot_ld']])} | {_widths([b for r in h for b in r['hot_st']])} "
            f"| {_span(progs)} | {_span([round(100 * o) for o in occ])}% |"
            + "".join(_other_cells(ob[(kernel, dtype, aligned)]) for _, ob in other_by)
        )
    before = before or {}

    def renamed(classes: dict) -> dict:  # the earlier report said "first step" for "EMA cold"
        return {k.replace("first step", "EMA cold").replace("later step", "EMA warm"): v for k, v in classes.items()}

    before_fp32 = renamed(before.get("fp32, PARTIALS_BLOCK 1024", {}))
    before_bf16 = renamed(before.get("bf16, PARTIALS_BLOCK 2048", {}))
    lines += [
        "",
        "## K1 and K2 registers per variant (sm_90, aligned rows, in place)",
        "",
        "K2 before: " + before.get("source", "not given") + ".",
        "",
        "| variant | K1 fp32 | K2 fp32 | K2 fp32 before | K2 bf16 | K2 bf16 before | K2 bf16 programs/SM (occupancy) |",
        "|---|---|---|---|---|---|---|",
    ]
    pick = collections.defaultdict(dict)
    for r in records:
        c = r["constexprs"]
        if r["arch"] == 90 and c["ALIGNED"] and not c.get("OUT_OF_PLACE", False):
            pick[_class(r)][(r["kernel"], r["dtype"])] = r
    for cls, ks in pick.items():
        if ("K2", "bf16") not in ks:
            continue
        k2 = ks[("K2", "bf16")]
        shared = k2["static_shared"] + k2["dynamic_shared"]
        def regs(key):
            return ks[key]["regs"] if key in ks else "-"

        lines.append(
            f"| {cls} | {regs(('K1', 'fp32'))} | {regs(('K2', 'fp32'))} | {before_fp32.get(cls, '-')} "
            f"| {k2['regs']} | {before_bf16.get(cls, '-')} | {programs_per_sm(k2['regs'], k2['num_warps'], shared)} "
            f"({round(100 * occupancy(k2['regs'], k2['num_warps'], shared))}%) |"
        )
    worst = max(records, key=lambda r: r["regs"])
    k2_90 = [r for r in records if r["kernel"] == "K2" and r["arch"] == 90]
    fewest = min(programs_per_sm(r["regs"], r["num_warps"], r["static_shared"] + r["dynamic_shared"]) for r in k2_90)
    all_90 = [r for r in records if r["arch"] == 90]
    fewest_any = min(
        programs_per_sm(r["regs"], r["num_warps"], r["static_shared"] + r["dynamic_shared"]) for r in all_90
    )
    lines += [
        "",
        f"Most registers: {worst['regs']} ({worst['kernel']} sm_{worst['arch']} {worst['dtype']} {_class(worst)}, "
        f"{'aligned' if worst['constexprs']['ALIGNED'] else 'unaligned'}).",
        "",
        "## The launch constants against this data",
        "",
        f"Set in `backends/triton/table.py` and the kernel files: CHUNK = {table.CHUNK} elements, "
        f"PROGRAMS_PER_SM = {table.PROGRAMS_PER_SM}, PARTIALS_BLOCK = {table.PARTIALS_BLOCK}, NUM_WARPS = "
        + ", ".join(f"{n} {m.NUM_WARPS}" for n, m in KERNEL_MODULES.items())
        + ".",
        "",
        _programs_line(all_90, fewest),
        f"- **CHUNK = {table.CHUNK} at 4 warps: supported for the access width.** It gives each thread "
        f"{table.CHUNK // 128} consecutive elements, which the aligned hot loops move as 128-bit accesses "
        "(the tables above: every aligned row's hot loop is 128 bits wide in every dtype). A smaller chunk "
        "(512: 4 fp32 per thread) would still be 128-bit for fp32 but not for 16-bit dtypes. Whether a larger "
        "chunk (more bytes in flight per thread) is faster: **needs a GPU**.",
        "- **NUM_WARPS = 4: supported as far as registers go** (no kernel is limited below "
        f"{fewest_any} programs per SM by its registers at 4 warps); the best warps per program for bandwidth: "
        "**needs a GPU**.",
        f"- **PARTIALS_BLOCK = {table.PARTIALS_BLOCK}: supported.** K2's norm loop holds 4 partials per thread, "
        "whatever the number of programs and buckets (it used to hold next_power_of_2(programs x buckets)).",
        "- Unaligned rows (a parameter or offset not on 16 B): scalar accesses, 16-bit for bf16/fp16 (see the "
        "table); they are rare (torch allocates on 512 B, the buckets align slices to 16 elements), and their "
        "cost is for a GPU to measure.",
    ]
    if errors:
        lines += ["", "## Compile errors", ""] + [
            f"- {r['kernel']} sm_{r['arch']} {r['dtype']} {r['constexprs']}: {r['error'][:300]}" for r in errors
        ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", nargs="+", help="saved runs of presam_kernels.backends.triton.codegen")
    parser.add_argument(
        "--python", nargs="+", default=[sys.executable],
        help="compile under each of these interpreters (one Triton version each; the first is the report's)",
    )
    parser.add_argument(
        "--before", default=os.path.join(ROOT, "bench", "codegen_k2_before.json"),
        help="K2's registers per variant class in an earlier kernel version (JSON)",
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "codegen.md"))
    args = parser.parse_args()
    runs = []
    for path in args.json or []:
        with open(path) as f:
            runs.append(json.load(f))
    runs = runs or [compile_all(python) for python in args.python]
    versions = list(dict.fromkeys(run["triton"] for run in runs))  # in the order given
    data, *others = [merge([run for run in runs if run["triton"] == v]) for v in versions]
    if data.get("skipped"):
        sys.exit(f"nothing compiled: {data['skipped']}")
    before = None
    if args.before and os.path.exists(args.before):
        with open(args.before) as f:
            before = json.load(f)
    with open(args.out, "w") as f:
        f.write(render(data, before, others))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
