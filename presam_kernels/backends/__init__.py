"""Backends implement the same verbs per bucket table, the contract written
down in ``protocol.Backend``: ``perturb``, ``restore``, ``restore_and_step``
and ``unscale_``.  ``resolve`` maps a user's choice to a backend's name and
``get`` returns that backend, checked against the contract."""
from __future__ import annotations

import os
import warnings

from .. import _extension
from .._extension import extension_available
from . import eager, protocol

BACKENDS = ("auto", "eager", "triton", "cpp")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def named_choice(choice: str):
    """The backend the user named (the argument, else ``PRESAM_BACKEND``), or
    None where they left the choice to us ("auto")."""
    if choice == "auto":
        choice = os.environ.get("PRESAM_BACKEND", "auto") or "auto"
    return None if choice == "auto" else choice


def resolve(choice: str, devices, sharded: bool = False) -> str:
    """The backend name for ``choice`` ("auto", "eager", "triton", "cpp") on ``devices``.

    ``PRESAM_BACKEND`` overrides "auto" only.  DTensor (sharded) parameters
    take the eager path whatever the choice: their norm needs a collective.
    """
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        choice = os.environ.get("PRESAM_BACKEND", "auto") or "auto"
        if choice not in BACKENDS:
            raise ValueError(f"PRESAM_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if sharded:
        if choice not in ("auto", "eager"):
            warnings.warn(
                f"backend={choice!r}: DTensor (FSDP2) parameters run on the eager backend, whose norm "
                "takes the collective over the mesh (opt.backend says 'eager')",
                RuntimeWarning,
                stacklevel=2,
            )
        return "eager"
    if choice == "auto":
        on_cuda = any(d.type == "cuda" for d in devices)
        choice = "triton" if on_cuda and triton_available() else "eager"
        if not on_cuda and all(d.type == "cpu" for d in devices):
            if extension_available():
                choice = "cpp"
            else:
                _extension.warn_once_falling_back()
    if choice == "cpp":
        if not extension_available():
            raise ValueError(f"backend='cpp' needs the C++ extension: {_extension.unavailable_reason()}; "
                             "or use backend='auto' or 'eager'")
        elsewhere = sorted({str(d) for d in devices if d.type != "cpu"})
        if elsewhere:
            raise ValueError(f"backend='cpp' runs on CPU tensors; these parameters are on {elsewhere}: "
                             "use backend='auto' or 'triton'")
    if choice == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton); or use backend='eager'")
        from .triton.table import supported_device

        unsupported = sorted({str(d) for d in devices if not supported_device(d)})
        if unsupported:
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, for "
                f"testing); these parameters are on {unsupported}: use backend='auto' or 'eager'"
            )
    return choice


def _load(name: str):
    if name == "eager":
        return eager
    if name == "cpp":
        from . import cpp

        return cpp
    from . import triton as triton_backend

    return triton_backend


# name -> a function returning the backend (imported on first use).
LOADERS = {"eager": _load, "cpp": _load, "triton": _load}


def get(name: str) -> protocol.Backend:
    """The backend called ``name``; TypeError when it does not implement the
    contract (every verb of ``protocol.Backend``, with its arguments)."""
    backend = LOADERS[name](name)
    protocol.check(backend)
    return backend
