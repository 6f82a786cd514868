"""``python -m presam_kernels compare``: the label-noise comparison.

Parses and checks the options (every error names the option), loads the data
set, trains every optimizer with every seed, and writes the table, the CSV
and the plot. The work itself lives in data, train and report.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import replace

from .data import DATASETS, DatasetError, load_dataset, subset
from .diagnose import DIAGNOSE_BATCHES
from .optimizers import DEFAULT_RHO, VARIANTS

DEFAULT_OPTIMIZERS = ("sgd", "sam", "asam", "infosam")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_NOISE = 0.4
DEFAULT_OUT = "compare-out"

# Per data set: (epochs, batch size, learning rate). digits: 3 seeds x
# {SGD, SAM, ASAM, infoSAM} take about 3 minutes on 2 CPU cores.
DEFAULT_TRAINING = {
    "digits": (30, 64, 0.05),
    "cifar10": (100, 128, 0.05),
    "cifar100": (100, 128, 0.05),
}

# CPU threads for torch per data set (None: torch's default). On digits'
# 8x8 images the model gains nothing from intra-op threads, and on a busy
# machine two spinning OpenMP threads made epochs up to 10x slower than one.
DEFAULT_THREADS = {"digits": 1, "cifar10": None, "cifar100": None}

# --quick: a few epochs on a fixed subset, one seed (under 30 s on 2 cores).
QUICK_EPOCHS = 3
QUICK_TRAIN = 600
QUICK_TEST = 2000
QUICK_SEEDS = (0,)


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_optimizers(text: str) -> list[str]:
    names = [n.lower() for n in _csv_list(text)]
    if not names:
        raise ValueError("give at least one optimizer")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(
            f"unknown optimizer {', '.join(map(repr, unknown))}; choose from {', '.join(VARIANTS)}"
        )
    return list(dict.fromkeys(names))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in _csv_list(text)]
    except ValueError:
        raise ValueError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"expected one or more non-negative integers, got {text!r}")
    return list(dict.fromkeys(seeds))


def parse_label_noise(text: str) -> list[float]:
    """``0.4`` or ``0,0.2,0.4,0.6``: the levels, each in [0, 1), in the order given."""
    items = _csv_list(text)
    if not items:
        raise ValueError(f"give at least one level in [0, 1), such as 0.4 or 0,0.2,0.4,0.6, got {text!r}")
    levels = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a number") from None
        if not (math.isfinite(value) and 0.0 <= value < 1.0):
            raise ValueError(f"must lie in [0, 1), got {item}")
        levels.append(value)
    return list(dict.fromkeys(levels))


def _positive_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive finite number, got {text!r}")
    return value


def parse_rho(text: str) -> dict[str, float] | float:
    """``0.1`` (every sharpness-aware optimizer) or ``sam=0.1,infosam=2``
    (those named; the others keep their defaults)."""
    if "=" not in text:
        return _positive_float(text.strip(), "rho")
    radii = {}
    for item in _csv_list(text):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise ValueError(f"expected NAME=VALUE pairs such as sam=0.1,infosam=2, got {item!r}")
        if name not in VARIANTS:
            raise ValueError(
                f"unknown optimizer {name!r}; choose from {', '.join(DEFAULT_RHO)}"
            )
        if name not in DEFAULT_RHO:
            raise ValueError(f"{name} takes no radius")
        radii[name] = _positive_float(value.strip(), f"rho for {name}")
    return radii


def resolve_rho(spec, optimizers) -> dict[str, float | None]:
    """The radius each optimizer runs with (None for SGD)."""
    rho = {}
    for name in optimizers:
        if name not in DEFAULT_RHO:
            rho[name] = None
        elif isinstance(spec, float):
            rho[name] = spec
        else:
            rho[name] = (spec or {}).get(name, DEFAULT_RHO[name])
    return rho


def _checked(parser, option, parse, text):
    try:
        return parse(text)
    except ValueError as exc:
        parser.error(f"argument {option}: {exc}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ", ".join(f"{k} {v[0]} epochs / batch {v[1]} / lr {v[2]}" for k, v in DEFAULT_TRAINING.items())
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits (default): scikit-learn's bundled 8x8 handwritten digits, 1348 training and "
        "449 test images, nothing to download. cifar10 / cifar100: read from --data-dir.",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder of the CIFAR python-pickle release (cifar-10-batches-py/ with data_batch_1..5 "
        "and test_batch, or cifar-100-python/ with train and test), or the folder containing it. "
        "Never downloaded.",
    )
    parser.add_argument(
        "--label-noise",
        metavar="P",
        default=str(DEFAULT_NOISE),
        help="fraction in [0, 1) of training labels replaced by a uniformly random other class, "
        "chosen by the seed; test labels stay clean (default %(default)s). A comma-separated list "
        "(0,0.2,0.4,0.6) runs every optimizer and seed once per level and adds noise.png, test "
        "accuracy against the level (the paper's Figure 2)",
    )
    parser.add_argument(
        "--optimizers",
        metavar="LIST",
        default=",".join(DEFAULT_OPTIMIZERS),
        help=f"comma-separated, from: {', '.join(VARIANTS)} (default %(default)s). All wrap SGD "
        "with momentum 0.9 and weight decay 5e-4.",
    )
    parser.add_argument(
        "--seeds",
        metavar="LIST",
        help="comma-separated integer seeds; each fixes the initial weights, the noisy labels, "
        "the batch order and the augmentation, shared by all optimizers "
        "(default 0,1,2; 0 with --quick)",
    )
    parser.add_argument(
        "--epochs",
        metavar="N",
        type=int,
        help=f"training epochs, cosine learning-rate decay to zero over them (default per data set: "
        f"{defaults}; {QUICK_EPOCHS} with --quick)",
    )
    parser.add_argument("--batch-size", metavar="N", type=int, help="training batch size (default per data set)")
    parser.add_argument("--lr", metavar="LR", help="peak learning rate (default per data set)")
    parser.add_argument(
        "--rho",
        metavar="SPEC",
        help="perturbation radius: one value for every sharpness-aware optimizer, or NAME=VALUE "
        "pairs such as sam=0.1,infosam=2 (others keep their defaults). The useful radii differ "
        "by more than 10x between variants. Defaults, from a sweep on digits with 40%% label "
        "noise: " + ", ".join(f"{k}={v}" for k, v in DEFAULT_RHO.items()),
    )
    parser.add_argument(
        "--diagnose-every",
        metavar="N",
        type=int,
        default=0,
        help="every N epochs, measure how adversarial each sharpness-aware optimizer's perturbation "
        f"from a minibatch is for the full training loss ({DIAGNOSE_BATCHES} minibatches, the same "
        "for every optimizer): the loss increase over the full-batch SAM perturbation's of the same "
        "length, and the cosine between the two. Written to results.csv (adv_ratio, adv_cosine) "
        "and diagnostic.png; the training itself is unchanged. Default 0: off",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto (default) uses CUDA when available",
    )
    parser.add_argument(
        "--threads",
        metavar="N",
        type=int,
        help="CPU threads for torch (default 1 on digits, where more only cost time; torch's "
        "default on CIFAR). Results are reproducible for a given thread count.",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=DEFAULT_OUT,
        help="output folder for results.csv and the plots (default %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_EPOCHS} epochs on {QUICK_TRAIN} training images (at most "
        f"{QUICK_TEST} test images), one seed, unless --epochs / --seeds say otherwise",
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return parser


DESCRIPTION = (
    "Train a small CNN on data with noisy labels with several sharpness-aware optimizers and "
    "compare their test accuracy (the preSAM paper's label-noise experiment in miniature). "
    "Prints a table per label-noise level and writes results.csv and accuracy.png (and, for several "
    "levels, noise.png) to --out."
)


def resolve(args, parser):
    """Checked settings from parsed ``args``; errors go through ``parser.error``."""
    import torch

    from .train import Settings

    epochs, batch_size, lr = DEFAULT_TRAINING[args.dataset]
    if args.quick:
        epochs = QUICK_EPOCHS
    if args.epochs is not None:
        if args.epochs < 1:
            parser.error(f"argument --epochs: must be at least 1, got {args.epochs}")
        epochs = args.epochs
    if args.batch_size is not None:
        if args.batch_size < 1:
            parser.error(f"argument --batch-size: must be at least 1, got {args.batch_size}")
        batch_size = args.batch_size
    if not 0 <= args.diagnose_every <= epochs:
        parser.error(
            f"argument --diagnose-every: must lie in [0, {epochs}] (0: off; at most the number of "
            f"epochs), got {args.diagnose_every}"
        )
    if args.lr is not None:
        lr = _checked(parser, "--lr", lambda t: _positive_float(t, "lr"), args.lr)

    levels = _checked(parser, "--label-noise", parse_label_noise, args.label_noise)

    optimizers = _checked(parser, "--optimizers", parse_optimizers, args.optimizers)
    rho_spec = _checked(parser, "--rho", parse_rho, args.rho) if args.rho is not None else None
    seeds = (
        _checked(parser, "--seeds", parse_seeds, args.seeds)
        if args.seeds is not None
        else list(QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    )

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda requested but this torch has no usable CUDA device")
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    threads = DEFAULT_THREADS[args.dataset] if args.threads is None else args.threads
    if threads is not None and threads < 1:
        parser.error(f"argument --threads: must be at least 1, got {threads}")
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    if args.dataset != "digits" and args.data_dir is None:
        parser.error(f"argument --data-dir: --dataset {args.dataset} is read from --data-dir (never downloaded)")

    settings = Settings(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        label_noise=levels[0],
        device=device,
        diagnose_every=args.diagnose_every,
    )
    return settings, levels, optimizers, resolve_rho(rho_spec, optimizers), seeds


def _percent(level: float) -> str:
    return f"{100 * level:g}%"


def run_command(args, parser) -> int:
    """Everything after parsing: load, train, report."""
    settings, levels, optimizers, rho, seeds = resolve(args, parser)
    try:
        dataset = load_dataset(args.dataset, args.data_dir)
    except DatasetError as exc:
        parser.error(str(exc))
    if args.quick:
        dataset = subset(dataset, QUICK_TRAIN, QUICK_TEST)

    import torch
    from tqdm import tqdm

    from . import report, train

    if settings.device.type == "cuda":
        # Same seeds, same numbers, as far as cuDNN allows.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    n_train, n_test = len(dataset.train_labels), len(dataset.test_labels)
    replaced = ", ".join(f"{_percent(p)}: {round(p * n_train)}" for p in levels)
    print(
        f"{dataset.name}: {n_train} training images (labels replaced, per level: {replaced}), "
        f"{n_test} clean test images; {settings.epochs} epochs, batch {settings.batch_size}, "
        f"lr {settings.lr:g} (cosine), seeds {','.join(map(str, seeds))}, device {settings.device}"
    )
    sys.stdout.flush()

    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "results.csv")
    png_path = os.path.join(args.out, "accuracy.png")
    noise_path = os.path.join(args.out, "noise.png")
    records = []
    total = len(levels) * len(optimizers) * len(seeds) * settings.epochs
    with tqdm(total=total, file=sys.stderr, disable=not sys.stderr.isatty(), unit="epoch") as bar:
        for level in levels:
            level_settings = replace(settings, label_noise=level)
            for name in optimizers:
                for seed in seeds:
                    bar.set_description(f"noise {_percent(level)} {name} seed {seed}")

                    def on_epoch(record):
                        bar.update(1)
                        bar.set_postfix(test_acc=f"{100 * record['test_acc']:.1f}%")

                    records += train.run(dataset, name, rho[name], seed, level_settings, on_epoch)
                    report.write_csv(records, csv_path)  # partial results survive an interrupt

    spread = f"mean ± 1 std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    report.plot_accuracy(records, png_path, f"{dataset.name}: {spread}")
    for level in levels:
        print()
        print(f"label noise {_percent(level)}:")
        print(report.format_table(report.summarise([r for r in records if r["label_noise"] == level])))
    print()
    print(f"per-epoch results: {csv_path}")
    print(f"plot: {png_path}")
    if len(levels) > 1:
        report.plot_noise_sweep(records, noise_path, f"{dataset.name}, {settings.epochs} epochs: {spread}")
        print(f"accuracy against label noise: {noise_path}")
    if settings.diagnose_every:
        diagnostic_path = os.path.join(args.out, "diagnostic.png")
        report.plot_diagnostic(records, diagnostic_path, f"{dataset.name}: adversarial effectiveness, {spread}")
        print(f"adversarial effectiveness: {diagnostic_path}")
    return 0


def main(argv=None, prog: str | None = "python -m presam_kernels compare") -> int:
    parser = build_parser(prog)
    return run_command(parser.parse_args(argv), parser)
