"""Whether the gradient EMA has had a step with finite gradients: ``ema_ready``
(docs/design.md §1; until it has, the step is plain SAM with m = g).

The flag lives on the device (a 0-d fp32 tensor per device, 1.0 once ready)
and is set there from the step's skip flag, so that no step reads it on the
host. The host only knows whether a step with gradients has run since the
optimizer was built or loaded; until then the backends are told ``False``
and take the first-step path without reading a flag.
"""
from __future__ import annotations

import torch


class EmaReady:
    def __init__(self):
        self.flags = {}  # device -> 0-d fp32 tensor, 1.0 once the EMA had a finite step
        self.known = False  # whether a flag can be 1.0 (a step with gradients ran, or a checkpoint set one)
        self._saved_ema = {}  # bucket -> fp32 buffer the EMA is copied into before a GradScaler step

    def flag(self, device) -> torch.Tensor:
        if device not in self.flags:
            self.flags[device] = torch.zeros((), dtype=torch.float32, device=device)
        return self.flags[device]

    def for_step(self, device):
        """What the backends' ``ema_ready`` argument takes: False when the host
        knows the EMA is not ready, else the device flag (never read here)."""
        return self.flag(device) if self.known else False

    def note_step(self, skipped: torch.Tensor):
        """A step with gradients ran: the EMA is ready unless it was skipped."""
        flag = self.flag(skipped.device)
        torch.maximum(flag, (~skipped).float(), out=flag)
        self.known = True

    def load(self, device, value: torch.Tensor):
        self.flag(device).copy_(value)
        self.known = True

    def reset(self):
        for flag in self.flags.values():
            flag.zero_()
        self.known = False

    def save(self, buckets) -> dict:
        """Copy each bucket's EMA aside (into buffers reused step after step);
        returns a copy of the flags, for ``roll_back``."""
        saved = {}
        for b in buckets:
            buffer = self._saved_ema.get(b)
            if buffer is None:
                buffer = torch.empty_like(b.buffers.grad_ema)
            saved[b] = buffer
            buffer.copy_(b.buffers.grad_ema)
        self._saved_ema = saved  # buckets rebuilt since drop out
        return {device: self.flag(device).clone() for device in {b.layout.device for b in buckets}}

    def roll_back(self, buckets, flags: dict):
        """The EMA and its flags as ``save`` found them."""
        for b in buckets:
            b.buffers.grad_ema.copy_(self._saved_ema[b])
        for device, flag in flags.items():
            self.flag(device).copy_(flag)
