"""The contract every backend implements (docs/design.md §3).

A backend is an object (the eager, cpp and triton modules are) with a
``name`` and six verbs over bucket tables; it never sees a param group or
an optimizer. ``backends.get`` checks a backend against ``Backend`` when it
resolves one, so a backend missing a verb is refused there, by name, before
any step runs.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Protocol, Sequence, Union

import torch

from ..base_update import Update
from ..buckets import Bucket, Table
from ..preconditioners import Preconditioner

# ``ema_ready``: False when the host knows the EMA has had no finite step
# (the first-step formula, m = g), True when it knows it has, else a 0-d fp32
# device tensor (1.0 = ready), read on the device only.
EmaReady = Union[bool, torch.Tensor]


@dataclass(eq=False)
class Perturbation:
    """What ``perturb`` did, and what its ``restore`` needs to undo it."""

    norm: torch.Tensor  # 0-d fp32: ||c u|| over every row of every table
    skipped: torch.Tensor  # 0-d bool: non-finite norm or found_inf; nothing was written but the backup
    path: str  # the backend whose kernels ran: the backend's own name, or "eager" where it handed the call over
    tables: list  # the tables perturbed
    # Per table, what the path's own restore reads (a launch plan); None for eager.
    plans: list | None = None


class Backend(Protocol):
    name: str

    def perturb(
        self,
        tables: Sequence[Table],
        buckets: Sequence[Bucket],
        spec: Preconditioner,
        rhos: Sequence[float | torch.Tensor],
        ema_ready: EmaReady,
        found_inf: torch.Tensor | None = None,
    ) -> Perturbation:
        """x <- x + e for every row (one global norm over all tables), backup <- x
        (out of place: adversarial <- x + e), EMA <- m_new; a skipped step writes
        only the backup (or the adversarial copy of x)."""

    def restore(self, perturbation: Perturbation) -> None:
        """x <- backup, bit for bit, for every row ``perturbation`` wrote."""

    def restore_and_step(
        self, tables: Sequence[Table], buckets: Sequence[Bucket], prepare: Callable[[], Optional[Update]]
    ) -> bool:
        """x <- the base optimizer's update of the saved x, state written in
        place. ``prepare()`` gives that update (adopting the base state into
        the flat buffers; None where ``base_update`` does not cover the step):
        called only once the backend knows it can walk the rows. False, having
        written nothing, where this backend has no fused step for these rows
        (the caller restores and steps the base optimizer)."""

    def unscale_(self, tables: Sequence[Table], inv_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
        """Gradients /= loss scale in place; overflow recorded in ``found_inf``."""

    def plan_perturb(
        self,
        tables: Sequence[Table],
        buckets: Sequence[Bucket],
        spec: Preconditioner,
        rhos: Sequence[float | torch.Tensor],
        ema_ready: EmaReady,
    ) -> Callable[..., Perturbation]:
        """``perturb``'s host work for these arguments, done once: a launch,
        ``launch(tables, found_inf=None)``, that perturbs as ``perturb`` would.
        The optimizer replays it on later steps whose tables have the same
        rows, tensors at the same addresses with the same layouts
        (optim/steady.py); it must hold no gradient. Its ``reads_grads``
        says whether it reads the tables' gradients: where it does not (it
        reaches them through addresses), a replay's tables may carry None."""

    def plan_restore_and_step(
        self, tables: Sequence[Table], buckets: Sequence[Bucket]
    ) -> Optional[Callable[[Sequence[Table], Callable[[], Optional[Update]]], bool]]:
        """``restore_and_step``'s host work, done once: a launch,
        ``launch(tables, prepare) -> bool``, replayed as ``plan_perturb``'s;
        None where this backend has no fused step for these rows."""


VERBS = ("perturb", "restore", "restore_and_step", "unscale_", "plan_perturb", "plan_restore_and_step")


@dataclass(eq=False)
class PerturbCall:
    """The launch of a backend that keeps no host work between calls: its
    ``perturb`` with these arguments."""

    perturb: Callable
    buckets: Sequence[Bucket]
    spec: Preconditioner
    rhos: Sequence[float | torch.Tensor]
    ema_ready: EmaReady
    reads_grads: ClassVar[bool] = True

    def __call__(self, tables, found_inf=None) -> Perturbation:
        return self.perturb(tables, self.buckets, self.spec, self.rhos, self.ema_ready, found_inf)


@dataclass(eq=False)
class RestoreStepCall:
    """Likewise, its ``restore_and_step``."""

    restore_and_step: Callable
    buckets: Sequence[Bucket]
    reads_grads: ClassVar[bool] = True

    def __call__(self, tables, prepare) -> bool:
        return self.restore_and_step(tables, self.buckets, prepare)


def check(backend) -> None:
    """Raise TypeError unless ``backend`` has a name and every verb of
    ``Backend``, each taking the Protocol's arguments."""
    name = getattr(backend, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"backend {backend!r} has no name (a str attribute 'name')")
    for verb in VERBS:
        impl = getattr(backend, verb, None)
        if not callable(impl):
            raise TypeError(f"backend {name!r} does not implement {verb}() (backends/protocol.py lists the verbs)")
        wanted = [p for p in inspect.signature(getattr(Backend, verb)).parameters if p != "self"]
        have = list(inspect.signature(impl).parameters)
        if have != wanted:
            raise TypeError(f"backend {name!r}: {verb}{tuple(have)} does not take the Protocol's arguments {tuple(wanted)}")
