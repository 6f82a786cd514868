"""The optimizer's per-step host work that scans every parameter (issue 15),
in C++ where the extension is built (csrc/host.cpp), in Python otherwise.
Each returns a value that only ever meets ``==`` with another of its kind."""
from __future__ import annotations

from . import _extension

# Whether the C++ scans and the Triton table cache run where the extension is
# built (off: the Python path, as bench/test_host_overhead.py compares them).
# Set it before an optimizer is built: the two paths' keys never compare equal.
USE_NATIVE = True
_compiled = None  # presam_kernels._C, once loaded


def native():
    """The extension module when the C++ host path runs, else None."""
    global _compiled
    if not USE_NATIVE:
        return None
    if _compiled is None:  # called a dozen times a step: the check runs once
        if not _extension.extension_available():
            return None
        from . import _C

        _compiled = _C
    return _compiled


def layout_key(params):
    """Identity, device and dtype of every parameter."""
    compiled = native()
    if compiled is not None:
        return compiled.layout_key(params)
    return tuple((id(p), p.device, p.dtype) for p in params)


def data_addresses(tensors):
    """Every tensor's data_ptr()."""
    compiled = native()
    if compiled is not None:
        return compiled.data_addresses(tensors)
    return tuple(t.data_ptr() for t in tensors)


def any_sparse_grad(params) -> bool:
    """Whether any parameter has a sparse gradient."""
    compiled = native()
    if compiled is not None:
        return compiled.any_sparse_grad(params)
    return any(p.grad is not None and p.grad.is_sparse for p in params)


def rows_with_grads(params):
    """(indices of the parameters that have a gradient as a tuple, those gradients as a list)."""
    compiled = native()
    if compiled is not None:
        return compiled.rows_with_grads(params)
    rows = tuple(i for i, p in enumerate(params) if p.grad is not None)
    return rows, [params[i].grad for i in rows]
