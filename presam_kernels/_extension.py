"""Loads the compiled half of the package (csrc/, ``presam_kernels._C``), which
registers the ``presam_cpp::`` ops of the "cpp" backend.

The library is built with AVX2 (setup.py), so it is loaded only on a CPU
that torch itself runs at AVX2 or above; elsewhere, or where the build did
not happen, the package runs on the eager backend and says so once.
"""
from __future__ import annotations

import warnings

import torch

# torch.backends.cpu.get_cpu_capability() values at which AVX2 code runs.
_AVX2_OR_ABOVE = ("AVX2", "AVX512", "AVX512_BF16", "AMX")

_state: dict = {}


def _load():
    if "available" in _state:
        return
    reason = None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _AVX2_OR_ABOVE:
        reason = f"this CPU runs torch at {capability}; the extension is built for AVX2"
    else:
        try:
            from . import _C  # noqa: F401  (its static initialisers register the ops)
        except ImportError as exc:
            reason = f"it is not built ({exc}); reinstall with a C++ compiler: pip install --no-build-isolation -e ."
    _state["available"] = reason is None
    _state["reason"] = reason


def extension_available() -> bool:
    """Whether the C++ extension (the "cpp" backend's fused CPU kernels) is loaded."""
    _load()
    return _state["available"]


def unavailable_reason() -> str | None:
    """Why the extension is not loaded, or None when it is."""
    _load()
    return _state["reason"]


def warn_once_falling_back():
    """The one warning that CPU parameters run on eager because the extension is missing."""
    if _state.get("warned"):
        return
    _state["warned"] = True
    warnings.warn(
        f"presam_kernels: the C++ extension is not available ({unavailable_reason()}); "
        "CPU parameters run on the eager backend",
        RuntimeWarning,
        stacklevel=4,
    )
