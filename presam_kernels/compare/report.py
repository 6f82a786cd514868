"""What a comparison leaves behind: results.csv, the summary table, the plot."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass

import numpy as np

from .diagnose import COLUMNS as DIAGNOSTIC_COLUMNS
from .train import TIMING_COLUMNS

CSV_COLUMNS = (
    "label_noise",
    "optimizer",
    "rho",
    "seed",
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
) + DIAGNOSTIC_COLUMNS + TIMING_COLUMNS


def write_csv(records, path) -> None:
    """One row per optimizer x seed x epoch; floats written in full (repr), so
    two runs with one seed can be compared for equality."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow({k: record[k] for k in CSV_COLUMNS})


def noise_levels(records) -> list[float]:
    """The label-noise levels of ``records``, in run order."""
    return list(dict.fromkeys(r["label_noise"] for r in records))


def _by_optimizer(records):
    """{optimizer: [per seed: its records, by epoch]}, in run order; for one
    label-noise level (callers filter)."""
    grouped: dict[str, dict[int, list]] = {}
    for r in records:
        grouped.setdefault(r["optimizer"], {}).setdefault(r["seed"], []).append(r)
    return {name: [runs[s] for s in sorted(runs)] for name, runs in grouped.items()}


def _field(runs, key) -> np.ndarray:
    return np.array([[r[key] for r in run] for run in runs], dtype=float)


@dataclass(frozen=True)
class Summary:
    """One line of the table: an optimizer over all its seeds."""

    optimizer: str
    rho: str
    seeds: int
    final_acc_mean: float
    final_acc_std: float  # sample std over seeds; nan with one seed
    best_acc: float  # highest seed-mean test accuracy over the epochs
    best_epoch: int
    final_train_loss: float  # on the noisy labels, seed mean
    seconds_per_epoch: float
    optimizer_share: float  # time in the optimizer / time of the whole step
    # Means over seeds and diagnosed epochs (nan where none): see diagnose.py.
    adv_ratio: float = math.nan
    adv_cosine: float = math.nan


def _diagnosed_mean(runs, key) -> float:
    values = [float(r[key]) for run in runs for r in run if r.get(key, "") != ""]
    return float(np.mean(values)) if values else math.nan


def summarise(records) -> list[Summary]:
    rows = []
    for name, runs in _by_optimizer(records).items():
        acc = _field(runs, "test_acc")
        final = acc[:, -1]
        mean_curve = acc.mean(axis=0)
        best = int(np.argmax(mean_curve))
        rows.append(
            Summary(
                optimizer=name,
                rho=str(runs[0][0]["rho"]) or "-",
                seeds=len(runs),
                final_acc_mean=float(final.mean()),
                final_acc_std=float(final.std(ddof=1)) if len(final) > 1 else math.nan,
                best_acc=float(mean_curve[best]),
                best_epoch=int(runs[0][best]["epoch"]),
                final_train_loss=float(_field(runs, "train_loss")[:, -1].mean()),
                seconds_per_epoch=float(_field(runs, "epoch_seconds").mean()),
                optimizer_share=float(
                    _field(runs, "optimizer_seconds").sum() / _field(runs, "step_seconds").sum()
                ),
                adv_ratio=_diagnosed_mean(runs, "adv_ratio"),
                adv_cosine=_diagnosed_mean(runs, "adv_cosine"),
            )
        )
    return rows


def format_table(rows: list[Summary]) -> str:
    """A fixed-width table (also valid Markdown) of the summaries; the
    diagnostic's columns only when some row has them."""
    diagnosed = any(not math.isnan(r.adv_ratio) for r in rows)
    header = (
        "optimizer",
        "rho",
        "test acc % (final)",
        "best % @ epoch",
        "train loss (noisy)",
        "s/epoch",
        "optimizer share",
    ) + (("adv ratio", "adv cosine") if diagnosed else ())
    lines = []
    for r in rows:
        acc = f"{100 * r.final_acc_mean:.2f}"
        if not math.isnan(r.final_acc_std):
            acc += f" ± {100 * r.final_acc_std:.2f}"
        line = (
            r.optimizer,
            r.rho,
            acc,
            f"{100 * r.best_acc:.2f} @ {r.best_epoch}",
            f"{r.final_train_loss:.3f}",
            f"{r.seconds_per_epoch:.3f}",
            f"{100 * r.optimizer_share:.1f}%",
        )
        if diagnosed:
            line += tuple("-" if math.isnan(v) else f"{v:.3f}" for v in (r.adv_ratio, r.adv_cosine))
        lines.append(line)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, x, mean, std, label):
    """``mean`` against ``x`` as a line, and a band of ``std`` around it
    where it is a number (one seed: none)."""
    (line,) = ax.plot(x, mean, label=label, linewidth=1.6, marker="o" if len(x) < 8 else None)
    if np.isfinite(std).any():
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def _mean_std(values) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``values`` (seeds x points): the mean, and the sample
    standard deviation over seeds (nan with one seed)."""
    values = np.asarray(values, dtype=float)
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.full(values.shape[1], np.nan)
    return values.mean(axis=0), std


def _label(runs) -> str:
    rho = runs[0][0]["rho"]
    return runs[0][0]["optimizer"] if rho == "" else f"{runs[0][0]['optimizer']} (rho {rho})"


def plot_accuracy(records, path, title: str) -> None:
    """Test accuracy against epoch: per optimizer the seed mean, and a band
    of one standard deviation over seeds when there are several; one panel
    per label-noise level."""
    plt = _pyplot()
    levels = noise_levels(records)
    fig, axes = plt.subplots(
        1, len(levels), figsize=(7 if len(levels) == 1 else 4.2 * len(levels), 4.5), sharey=True, squeeze=False
    )
    for ax, level in zip(axes[0], levels):
        for runs in _by_optimizer([r for r in records if r["label_noise"] == level]).values():
            _band(ax, _field(runs, "epoch")[0], *_mean_std(100 * _field(runs, "test_acc")), _label(runs))
        ax.set_xlabel("epoch")
        ax.set_title(f"{100 * level:g}% label noise")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def noise_sweep(records) -> dict[str, dict[str, list]]:
    """Per optimizer, over the label-noise levels it ran at: ``levels``,
    ``final`` (per level, an array over seeds of the last epoch's test
    accuracy) and ``best`` (per level, each seed's test accuracy at the epoch
    where the seed mean peaked: the "best" of the table)."""
    out: dict[str, dict[str, list]] = {}
    for level in noise_levels(records):
        for name, runs in _by_optimizer([r for r in records if r["label_noise"] == level]).items():
            acc = _field(runs, "test_acc")
            best = int(np.argmax(acc.mean(axis=0)))
            entry = out.setdefault(name, {"levels": [], "final": [], "best": []})
            entry["levels"].append(level)
            entry["final"].append(acc[:, -1])
            entry["best"].append(acc[:, best])
    return out


def plot_noise_sweep(records, path, title: str) -> None:
    """Final and best test accuracy against the label-noise level, one line
    per optimizer with a band of one standard deviation over seeds: the shape
    of the preSAM paper's Figure 2."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    rho = {r["optimizer"]: r["rho"] for r in records}
    for name, sweep in noise_sweep(records).items():
        label = name if rho[name] == "" else f"{name} (rho {rho[name]})"
        for ax, key in zip(axes, ("final", "best")):
            per_level = [_mean_std(100 * acc[:, None]) for acc in sweep[key]]
            mean, std = (np.array([m[i][0] for m in per_level]) for i in (0, 1))
            _band(ax, 100 * np.array(sweep["levels"]), mean, std, label)
    for ax, what in zip(axes, ("final epoch", "best epoch of the seed mean")):
        ax.set_xlabel("label noise (%)")
        ax.set_title(f"test accuracy, {what}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_diagnostic(records, path, title: str) -> None:
    """The adversarial-effectiveness ratio and cosine against epoch (rows),
    one panel per label-noise level (columns), one line per optimizer with a
    band of one standard deviation over seeds."""
    plt = _pyplot()
    levels = noise_levels(records)
    fig, axes = plt.subplots(2, len(levels), figsize=(4.2 * len(levels) + 1.5, 7), sharex=True, squeeze=False)
    for column, level in enumerate(levels):
        for runs in _by_optimizer([r for r in records if r["label_noise"] == level]).values():
            kept = [diagnosed for run in runs if (diagnosed := [r for r in run if r.get("adv_ratio", "") != ""])]
            if not kept:
                continue  # SGD takes no perturbation
            for row, key in enumerate(DIAGNOSTIC_COLUMNS):
                _band(axes[row][column], _field(kept, "epoch")[0], *_mean_std(_field(kept, key)), _label(runs))
        axes[0][column].set_title(f"{100 * level:g}% label noise")
        axes[0][column].axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axes[1][column].set_xlabel("epoch")
        for row in range(2):
            axes[row][column].grid(alpha=0.3)
    axes[0][0].set_ylabel("full-loss increase / full-batch SAM's")
    axes[1][0].set_ylabel("cosine(e, full-batch gradient)")
    with_lines = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]
    if with_lines:
        with_lines[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
