"""The GPU code of every kernel specialization, checked without a GPU (issue 11).

The interpreter runs the arithmetic but accepts code the compiler rejects (K4
once read a plain module global), and says nothing of registers, spills or
access widths. Here every specialization the launchers can produce
(``codegen.jobs()``: built from each kernel module's own ``constexprs``) is
compiled ahead of time for sm_80 and sm_90 in one subprocess without
TRITON_INTERPRET (two workers), its results cached in a temp dir per Triton
version. ``make test`` compiles a covering set (every value of every switch,
every dtype: about 120 kernels, ~40 s on 2 cores, seconds when cached);
PRESAM_ALL_CASES=1 (``make test-codegen-all``, ``make test-triton-next``) every
specialization (about 1000 kernels, ~4-5 min on 2 cores).
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")

from presam_kernels.backends.triton import codegen  # noqa: E402

ARCHS = (80, 90)
# Every specialization (else a covering set): as tests/conftest.py reads it.
ALL_CASES = os.environ.get("PRESAM_ALL_CASES", "") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def codegen_report():
    missing = codegen.tools_missing()
    if missing:
        pytest.skip(f"cannot compile for a GPU here: {missing}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"presam-codegen-triton-{triton.__version__}")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "codegen.json")
        done = subprocess.run(
            [sys.executable, "-m", "presam_kernels.backends.triton.codegen", "--arch", *map(str, ARCHS),
             "--workers", str(min(2, os.cpu_count() or 1)), "--out", out, *([] if ALL_CASES else ["--covering"])],
            env=env, capture_output=True, text=True, timeout=1800,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        with open(out) as f:
            found = json.load(f)
    if found["skipped"]:
        pytest.skip(f"cannot compile for a GPU here: {found['skipped']}")
    return found["records"]


def _name(r):
    return f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['constexprs']}"


def test_every_specialization_is_compiled_for_sm80_and_sm90(codegen_report):
    expected = {(k, json.dumps(c, sort_keys=True), d, a) for k, c, d in codegen.jobs(ALL_CASES) for a in ARCHS}
    got = {(r["kernel"], json.dumps(r["constexprs"], sort_keys=True), r["dtype"], r["arch"]) for r in codegen_report}
    assert got == expected
    assert {r["kernel"] for r in codegen_report} == {"K1", "K2", "K3", "K4"}
    errors = [f"{_name(r)}: {r['error']}" for r in codegen_report if "error" in r]
    assert not errors, "\n".join(errors[:5]) + f"\n({len(errors)} failed to compile)"


def test_no_specialization_spills_registers(codegen_report):
    spilled = [
        f"{_name(r)}: {r['regs']} registers, {r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads"
        for r in codegen_report if "error" not in r and (r["spill_stores"] or r["spill_loads"])
    ]
    assert not spilled, "\n".join(spilled[:10])


def test_aligned_hot_loops_load_and_store_128_bits_at_a_time(codegen_report):
    """On aligned rows the unmasked chunk loop moves parameter, gradient and
    state in 16-B vectors (ld/st.global.v4.b32, or v2.b64 for fp64)."""
    aligned = [r for r in codegen_report if "error" not in r and r["constexprs"]["ALIGNED"]]
    assert aligned
    narrow = [
        f"{_name(r)}: loads {sorted(set(r['hot_ld']))} bits, stores {sorted(set(r['hot_st']))} bits"
        for r in aligned
        if not r["hot_ld"] or any(bits != codegen.VECTOR_BITS for bits in r["hot_ld"] + r["hot_st"])
    ]
    assert not narrow, "\n".join(narrow[:10]) + f"\n({len(narrow)} of {len(aligned)})"


def test_specializations_come_from_the_launchers_switches():
    """Each switch the launcher takes (bool, Enum, Literal) is enumerated: a
    kernel module whose ``constexprs`` grows a switch is compiled with it."""
    for name, module in codegen.KERNEL_MODULES.items():
        specs = codegen.specializations(module)
        keys = set(specs[0])
        assert keys == set(module.KERNEL.arg_names) - set(module.ARGUMENTS), name
        for key in keys - {"BLOCK", "PARTIALS_BLOCK"}:
            assert len({s[key] for s in specs}) > 1, f"{name}: switch {key} takes one value only"
