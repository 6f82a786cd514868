"""Shared fixtures: a fixed seed for every test, and the axes the numerics
tests run over (backend, bucket mode, device)."""
import os

import pytest
import torch

# DESIGN.md section 4: without CUDA the Triton kernels run on the CPU under the
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


@pytest.fixture
def core_case(backend):
    """``check(is_core)`` skips a non-core case on the interpreted Triton
    backend: the interpreter takes about a second per step, so on the CPU the
    triton backend runs each test's core cases only (a GPU runs them all)."""

    def check(is_core: bool):
        if backend == "triton" and INTERPRETER and not is_core:
            pytest.skip("Triton interpreter: core cases only; a GPU runs every case")

    return check
