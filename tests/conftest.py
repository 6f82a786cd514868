"""Shared fixtures: a fixed seed for every test, and the axes the numerics
tests run over (backend, bucket mode, device)."""
import os

import pytest
import torch

# docs/design.md §4: without CUDA the Triton kernels run on the CPU under the
# interpreter, which reads this variable when @triton.jit runs, so it is set
# before the package is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

from presam_kernels import backends, extension_available  # noqa: E402


def _available_backends():
    """"eager" always; "cpp" when the C++ extension is built; "triton" once its
    backend module exposes the verbs."""
    names = ["eager"] + (["cpp"] if extension_available() and DEVICE.type == "cpu" else [])
    try:
        from presam_kernels.backends import triton as triton_backend
    except ImportError:
        return names
    if hasattr(triton_backend, "perturb") and backends.triton_available():
        names.append("triton")
    return names


# The interpreter dereferences host addresses, compiled kernels device ones:
# tensors live on the GPU when there is one and the kernels are compiled.
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETER else "cpu")
BACKENDS = _available_backends()
SEED = 1234


@pytest.fixture(autouse=True)
def fixed_seed():
    """Every test starts from the same torch RNG state, whatever ran before it."""
    torch.manual_seed(SEED)
    yield


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=[False, True], ids=["per_tensor", "flatten"])
def flatten(request):
    return request.param


@pytest.fixture
def device():
    return DEVICE


# PRESAM_ALL_CASES=1 (`make test-all-cases`; .ci/run does not run it yet, see there):
# only the interpreted Triton cases that `make test` skips as not core, and the
# codegen test over every specialization (tests/test_codegen.py).
ALL_CASES = os.environ.get("PRESAM_ALL_CASES", "") == "1"
# PRESAM_EVERY_CASE=1 (`make test-triton-next`, with -m triton): core cases and
# the rest in one run.
EVERY_CASE = os.environ.get("PRESAM_EVERY_CASE", "") == "1"


def pytest_collection_modifyitems(config, items):
    # -m triton: every test that runs the Triton kernels through the optimizer
    # (a "triton" backend parameter, or "triton" in its name or file name).
    for item in items:
        callspec = getattr(item, "callspec", None)
        if "triton" in item.nodeid or (callspec is not None and callspec.params.get("backend") == "triton"):
            item.add_marker(pytest.mark.triton)
        # pytest-xdist (`make test`: -n 2 --dist loadgroup): a module-scoped
        # fixture (spawned ranks, a codegen sweep) is built once per worker that
        # runs a test of its module, so such a module runs on one worker.
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if any(d.scope == "module" for fixturedefs in defs.values() for d in fixturedefs):
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    if not ALL_CASES:
        return
    wanted = {"core_case", "codegen_report"}  # the codegen test compiles every specialization then
    kept = [item for item in items if wanted & set(getattr(item, "fixturenames", ()))]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


def non_core_skipped(backend, is_core: bool):
    """Skip what this run leaves to the other: `make test` runs the core cases
    of the interpreted Triton backend (about a second per step), PRESAM_ALL_CASES
    the rest; a GPU, or the eager backend, runs every case in `make test`."""
    if EVERY_CASE:
        return
    interpreted = backend == "triton" and INTERPRETER
    if ALL_CASES and not (interpreted and not is_core):
        pytest.skip("PRESAM_ALL_CASES: `make test` runs this case")
    if not ALL_CASES and interpreted and not is_core:
        pytest.skip("Triton interpreter: core cases only here; `make test-all-cases` runs the rest")


@pytest.fixture
def core_case(backend):
    """``check(is_core)``: see ``non_core_skipped``."""

    def check(is_core: bool):
        non_core_skipped(backend, is_core)

    return check
