"""The optimizer's per-step host work that scans every parameter (issue 15),
in C++ where the extension is built (csrc/host.cpp), in Python otherwise.
Each returns a value that only ever meets ``==`` with another of its kind."""
from __future__ import annotations

from typing import NamedTuple

import torch

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


class ParamScan(NamedTuple):
    layout_key: object
    data_addresses: object
    any_sparse_grad: bool


def scan_params(groups) -> ParamScan:
    """``layout_key``, ``data_addresses`` and ``any_sparse_grad`` of the
    parameters of ``groups`` (param groups, in order), in one walk over them
    (C++) where the extension is built."""
    compiled = native()
    if compiled is not None:
        return ParamScan(*compiled.scan_params(groups))
    params = [p for group in groups for p in group["params"]]
    sparse = any(p.grad is not None and p.grad.is_sparse for p in params)
    return ParamScan(layout_key(params), data_addresses(params), sparse)


def rows_with_grads(params):
    """(indices of the parameters that have a gradient as a tuple, those
    gradients as a list, a signature of their layouts and addresses or None):
    the signature (C++ only) lets the C++ device-table check skip a walk."""
    compiled = native()
    if compiled is not None:
        return compiled.rows_with_grads(params)
    rows = tuple(i for i, p in enumerate(params) if p.grad is not None)
    return rows, [params[i].grad for i in rows], None


def param_watch(groups, tables):
    """What the steady step (optim/steady.py) checks the parameters with: a
    ``ParamWatch`` (csrc/host.cpp) of every parameter of ``groups`` and its
    gradient as they are now. ``check(groups, with_grads=True)`` gives None
    when anything differs, else per table of ``tables`` its rows' gradients
    now (None for a table of rows over flat buffers; an empty tuple without
    ``with_grads``). None without the extension (every step
    then takes the general path) or where a tensor is not a plain strided one."""
    compiled = native()
    if compiled is None:
        return None
    watch = compiled.ParamWatch(groups, [t.params if t.members is not None else None for t in tables])
    return watch if watch.recordable() else None


def state_watch(params, entries, keys, values, versioned_key):
    """What ``base_update.PlanCache`` checks a base optimizer's state with:
    ``holds(state)`` says whether ``state[params[i]]`` is still ``entries[i]``,
    holding ``values[i * len(keys) + k]`` under ``keys[k]``, each still at its
    data address (``t.data = other`` keeps the object), the tensors under
    ``versioned_key`` unwritten since ``note_versions()`` (also at creation):
    the same version counters and values (a write through ``t.data`` bumps
    no version counter of ``t``)."""
    compiled = native()
    if compiled is not None:
        return compiled.StateWatch(list(params), list(entries), tuple(keys), list(values), versioned_key)
    return _StateWatch(params, entries, keys, values, versioned_key)


class _StateWatch:
    def __init__(self, params, entries, keys, values, versioned_key):
        self._params, self._entries, self._keys = list(params), list(entries), tuple(keys)
        self._values = list(values)
        self._addresses = [_address(v) for v in self._values]
        self._versioned = self._keys.index(versioned_key) if versioned_key in self._keys else None
        self.note_versions()

    def holds(self, state) -> bool:
        n = len(self._keys)
        for i, (p, entry) in enumerate(zip(self._params, self._entries)):
            if dict.get(state, p) is not entry:
                return False
            for k, key in enumerate(self._keys):
                value = entry.get(key)
                if value is not self._values[i * n + k] or _address(value) != self._addresses[i * n + k]:
                    return False
        return self._versions() == self._noted

    def note_versions(self):
        self._noted = self._versions()

    def _versions(self):
        if self._versioned is None:
            return None
        n = len(self._keys)
        steps = [self._values[i * n + self._versioned] for i in range(len(self._params))]
        # float(nan) never equals itself: anything but a one-element CPU tensor never holds.
        return [(step._version, float(step) if step.device.type == "cpu" and step.numel() == 1 else float("nan"))
                if isinstance(step, torch.Tensor) else float("nan") for step in steps]


def _address(value):
    return value.data_ptr() if isinstance(value, torch.Tensor) else 0
