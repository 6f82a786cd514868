"""Training runs: one (optimizer, seed) pair at a time, one record per epoch.

A run is a pure function of (data set, optimizer, seed, settings): the seed
fixes the initial weights, which labels are corrupted, the batch order and the
augmentation, each through its own generator, so runs of different optimizers
with one seed see the same noisy labels, the same start and the same batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import data as data_mod
from . import diagnose
from .models import build_model
from .optimizers import VARIANTS, build_optimizer

# Purposes that get their own stream of random numbers within one seed.
_INIT, _NOISE, _SHUFFLE, _AUGMENT, _DIAGNOSE = range(5)

EVAL_BATCH = 1000


def derived_seed(seed: int, purpose: int) -> int:
    """A seed for one purpose of one run. Separate streams keep e.g. the
    label-noise permutation from reappearing as the first epoch's order."""
    return int(np.random.SeedSequence([seed, purpose]).generate_state(1)[0])


@dataclass(frozen=True)
class Settings:
    epochs: int
    batch_size: int
    lr: float
    label_noise: float
    device: torch.device
    diagnose_every: int = 0  # epochs between adversarial-effectiveness checkpoints; 0: off


class _Clock:
    """perf_counter that first waits for the GPU, so a CUDA interval covers
    the kernels it launched; on the CPU, which is synchronous, it is free."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"

    def __call__(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from ``base_lr`` to 0 over the run, per step."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * step / total_steps))


def train_step(model, optimizer, two_pass: bool, criterion, x, y, clock):
    """One step; returns (loss at x as a tensor, logits, seconds in the
    optimizer, seconds for the whole step)."""
    from presam_kernels import disable_running_stats, enable_running_stats

    start = clock()
    logits = model(x)
    loss = criterion(logits, y)
    loss.backward()
    if two_pass:
        t = clock()
        optimizer.first_step(zero_grad=True)
        in_optimizer = clock() - t
        # The second forward must not move BatchNorm's running statistics.
        disable_running_stats(model)
        criterion(model(x), y).backward()
        enable_running_stats(model)
        t = clock()
        optimizer.second_step(zero_grad=True)
        end = clock()
        in_optimizer += end - t
    else:
        t = clock()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = clock()
        in_optimizer = end - t
    return loss.detach(), logits.detach(), in_optimizer, end - start


@torch.no_grad()
def evaluate(model, images, labels, dataset) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on (images, labels), in eval mode."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), EVAL_BATCH):
        x = data_mod.normalise(images[start : start + EVAL_BATCH], dataset)
        y = labels[start : start + EVAL_BATCH]
        logits = model(x)
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train()
    return total_loss / len(labels), correct / len(labels)


def run(dataset, optimizer_name: str, rho, seed: int, settings: Settings, on_epoch=None):
    """Train one model; returns one dict per epoch (the rows of results.csv).
    ``on_epoch(record)`` is called after each epoch (progress reporting)."""
    device = settings.device
    variant = VARIANTS[optimizer_name]
    noisy_labels, _ = data_mod.inject_label_noise(
        dataset.train_labels, settings.label_noise, dataset.num_classes, derived_seed(seed, _NOISE)
    )
    train_images = dataset.train_images.to(device)
    train_labels = noisy_labels.to(device)
    test_images = dataset.test_images.to(device)
    test_labels = dataset.test_labels.to(device)

    torch.manual_seed(derived_seed(seed, _INIT))
    model = build_model(dataset).to(device)
    optimizer = build_optimizer(optimizer_name, model, settings.lr, rho)
    criterion = nn.CrossEntropyLoss()
    shuffle_gen = torch.Generator().manual_seed(derived_seed(seed, _SHUFFLE))
    augment_gen = torch.Generator().manual_seed(derived_seed(seed, _AUGMENT))
    diagnose_gen = torch.Generator().manual_seed(derived_seed(seed, _DIAGNOSE))
    clock = _Clock(device)

    n_train = len(train_labels)
    steps_per_epoch = len(data_mod.batches(n_train, settings.batch_size, torch.Generator()))
    total_steps = settings.epochs * steps_per_epoch
    step = 0
    records = []
    model.train()
    for epoch in range(1, settings.epochs + 1):
        epoch_lr = cosine_lr(settings.lr, step, total_steps)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        optimizer_seconds = step_seconds = 0.0
        epoch_start = clock()
        for idx in data_mod.batches(n_train, settings.batch_size, shuffle_gen):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(settings.lr, step, total_steps)
            idx = idx.to(device)
            x = data_mod.normalise(train_images[idx], dataset)
            if dataset.augment:
                x = data_mod.augment(x, augment_gen)
            y = train_labels[idx]
            loss, logits, t_opt, t_step = train_step(
                model, optimizer, variant.two_pass, criterion, x, y, clock
            )
            # Accumulated on the device: no per-step host sync outside the clock.
            loss_sum += loss * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            optimizer_seconds += t_opt
            step_seconds += t_step
            step += 1
        epoch_seconds = clock() - epoch_start
        test_loss, test_acc = evaluate(model, test_images, test_labels, dataset)
        record = {
            "label_noise": settings.label_noise,
            "optimizer": optimizer_name,
            "rho": "" if rho is None else rho,
            "seed": seed,
            "epoch": epoch,
            "lr": epoch_lr,
            "train_loss": loss_sum.item() / seen,
            "train_acc": correct.item() / seen,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "epoch_seconds": epoch_seconds,
            "step_seconds": step_seconds,
            "optimizer_seconds": optimizer_seconds,
        }
        record.update(dict.fromkeys(diagnose.COLUMNS, ""))
        if settings.diagnose_every and epoch % settings.diagnose_every == 0:
            # The same minibatches for every optimizer of this seed.
            picks = data_mod.batches(n_train, settings.batch_size, diagnose_gen)[: diagnose.DIAGNOSE_BATCHES]
            if variant.two_pass:
                record.update(
                    diagnose.adversarial_effectiveness(
                        model, optimizer, train_images, train_labels, dataset, [i.to(device) for i in picks]
                    )
                )
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return records


# Columns of results.csv that depend on the clock; everything else is a
# function of the seed.
TIMING_COLUMNS = ("epoch_seconds", "step_seconds", "optimizer_seconds")
