"""The memory benchmark (memory.py) at tiny size, and the bounds the README's
memory table states, asserted on its byte counts (deterministic: see
memory.py).  ``memory.TINY_PIECE`` keeps the eager backend's batches small
against the tiny set, as ``PIECE`` is against real models."""
from __future__ import annotations

import pytest

import memory
import shapes

# Above the state: 0-d tensors (the norm, the skip counter, the EMA-ready
# flag), a few hundred bytes over the tiny set's ~90K elements.
HELD_SLACK = 0.01
# The issue-13 bound: peak within 2 B per element of what the state needs.
PEAK_ABOVE_STATE = 2.0

CASES = [
    pytest.param(d, v, m, f, id=f"{d}-{v}-{m}-{'flat' if f else 'default'}")
    for d in ("fp32", "bf16") for v in memory.VARIANTS for m in memory.PERTURB_MODES for f in (False, True)
]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The script run at tiny size, once: (its rows, the file it wrote)."""
    path = tmp_path_factory.mktemp("memory") / "RESULTS_memory.md"
    return memory.main(["--smoke", "--out", str(path)]), path


@pytest.fixture(scope="module")
def rows(smoke_run):
    return smoke_run[0]


def _eager_row(rows, dtype, variant, perturb, flatten):
    (row,) = [r for r in rows if r.provider == "eager" and (r.dtype, r.variant, r.perturb, r.flatten)
              == (dtype, variant, perturb, flatten)]
    return row


def test_memory_script_writes_every_case(smoke_run):
    rows, path = smoke_run
    text = path.read_text()
    assert len(rows) == len(CASES) + 2 * len(memory.LOOP_VARIANT)
    assert text.count("| resnet50_tiny |") == len(rows)
    assert all(r.peak >= r.held > 0 for r in rows if r.provider == "eager")


@pytest.mark.parametrize(("dtype", "variant", "perturb", "flatten"), CASES)
def test_eager_holds_only_the_state_the_variant_needs(rows, dtype, variant, perturb, flatten):
    row = _eager_row(rows, dtype, variant, perturb, flatten)
    needs = memory.state_bytes_per_element(variant, shapes.DTYPES[dtype].itemsize)
    assert needs <= row.held_per_element <= needs + HELD_SLACK, (row.held_per_element, needs)


@pytest.mark.parametrize(("dtype", "variant", "perturb", "flatten"), CASES)
def test_eager_peak_is_within_2_bytes_per_element_of_the_state(rows, dtype, variant, perturb, flatten):
    row = _eager_row(rows, dtype, variant, perturb, flatten)
    needs = memory.state_bytes_per_element(variant, shapes.DTYPES[dtype].itemsize)
    assert row.peak_per_element <= needs + PEAK_ABOVE_STATE, (row.peak_per_element, needs)


def test_real_sets_are_what_the_results_file_names():
    assert shapes.numel(memory.SETS["resnet50"]()) == shapes.EXPECTED["resnet50"][1]
    assert shapes.numel(memory.SETS["single_8m"]()) == 8 << 20
