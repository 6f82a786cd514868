"""The label-noise comparison behind ``python -m presam_kernels compare``.

Trains a small CNN on a real data set whose training labels are partly
replaced by random other classes, once per optimizer and seed, and reports
clean test accuracy: the preSAM paper's claim, in miniature, is that infoSAM
generalises better than SAM, ASAM and SGD, most clearly under label noise.

Modules, one job each: ``data`` (loading, label noise, batches), ``models``
(the CNN), ``optimizers`` (the variants and their default radii), ``train``
(one run), ``diagnose`` (how adversarial a perturbation is for the full
training loss), ``report`` (CSV, table, plots), ``cli`` (options and the
command).
"""

from .cli import main

__all__ = ["main"]
