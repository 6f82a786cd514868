"""How adversarial is the perturbation an optimizer takes from a minibatch,
for the loss over the whole training set?

The preSAM paper explains infoSAM's gain by *adversarial model degradation*:
SAM's e = rho g_B / ||g_B|| ascends the minibatch loss, and with a noisy
minibatch gradient it ascends the loss SAM means to flatten (the full
training loss L) less than it should; infoSAM's noise-damped direction is
meant to ascend L more. At a checkpoint x, for a minibatch B:

    ratio  = (L(x + e) - L(x)) / (L(x + r g / ||g||) - L(x)),  r = ||e||, g = grad L(x)
    cosine = <e, g> / (||e|| ||g||)

with e the optimizer's own perturbation from B. ratio 1 is as adversarial as
the full-batch SAM perturbation of the same length; the cosine says how
closely e points along the noise-free ascent direction.

e comes from a deep copy of the model and the optimizer taking ``first_step``
on B (with the EMA the real optimizer has at x), so the real model and
optimizer are never touched. L is computed as in training (BatchNorm on batch
statistics, noisy labels, no augmentation), over the training set in a fixed
order and chunks of ``FULL_BATCH_CHUNK`` images: on digits one chunk, the
whole set.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from . import data as data_mod

# Minibatches per checkpoint: each costs one forward and backward on the
# minibatch and two forwards over the training set.
DIAGNOSE_BATCHES = 8
FULL_BATCH_CHUNK = 2048

COLUMNS = ("adv_ratio", "adv_cosine")


def full_loss(model, images, labels, dataset, with_grad: bool = False):
    """Mean cross-entropy of ``model`` over (images, labels) in training
    mode, and with ``with_grad`` its gradient (a list, one per parameter)."""
    params = list(model.parameters())
    total = torch.zeros((), dtype=torch.float64, device=images.device)
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in params] if with_grad else None
    for start in range(0, len(labels), FULL_BATCH_CHUNK):
        x = data_mod.normalise(images[start : start + FULL_BATCH_CHUNK], dataset)
        y = labels[start : start + FULL_BATCH_CHUNK]
        with torch.set_grad_enabled(with_grad):
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        if with_grad:
            for acc, g in zip(grads, torch.autograd.grad(loss, params)):
                acc += g
        total += loss.detach()
    n = len(labels)
    return float(total) / n, None if grads is None else [g / n for g in grads]


def _dot(a, b) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def perturbation(model, optimizer, x, y):
    """The perturbation ``optimizer`` would take at ``model``'s parameters
    from the minibatch (x, y), found on deep copies of both (the real ones
    are not touched), and the copy of the model, left at x + e."""
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    optimizer_copy.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model_copy(x), y).backward()
    optimizer_copy.first_step(zero_grad=True)
    with torch.no_grad():
        e = [q.detach() - p.detach() for q, p in zip(model_copy.parameters(), model.parameters())]
    return e, model_copy


def adversarial_effectiveness(model, optimizer, images, labels, dataset, minibatches) -> dict[str, float]:
    """Mean ratio and cosine (module docstring) over ``minibatches`` (index
    tensors into ``images``, uint8 on the model's device, and ``labels``)."""
    probe = copy.deepcopy(model)
    x0 = [p.detach().clone() for p in probe.parameters()]
    loss_at_x, grad = full_loss(probe, images, labels, dataset, with_grad=True)
    grad_norm = math.sqrt(_dot(grad, grad))
    if grad_norm == 0:
        return dict.fromkeys(COLUMNS, math.nan)
    ratios, cosines = [], []
    for idx in minibatches:
        e, at_x_plus_e = perturbation(model, optimizer, data_mod.normalise(images[idx], dataset), labels[idx])
        gain = full_loss(at_x_plus_e, images, labels, dataset)[0] - loss_at_x
        radius = math.sqrt(_dot(e, e))
        with torch.no_grad():
            for p, start, g in zip(probe.parameters(), x0, grad):
                p.copy_(start + (radius / grad_norm) * g)
        sam_gain = full_loss(probe, images, labels, dataset)[0] - loss_at_x
        ratios.append(gain / sam_gain if sam_gain > 0 else math.nan)
        cosines.append(_dot(e, grad) / (radius * grad_norm) if radius > 0 else math.nan)
    return {"adv_ratio": sum(ratios) / len(ratios), "adv_cosine": sum(cosines) / len(cosines)}
