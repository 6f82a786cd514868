"""What a comparison leaves behind: results.csv, the summary table, the plot."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass

import numpy as np

from .train import TIMING_COLUMNS

CSV_COLUMNS = (
    "optimizer",
    "rho",
    "seed",
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
) + TIMING_COLUMNS


def write_csv(records, path) -> None:
    """One row per optimizer x seed x epoch; floats written in full (repr), so
    two runs with one seed can be compared for equality."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow({k: record[k] for k in CSV_COLUMNS})


def _by_optimizer(records):
    """{optimizer: array (seeds, epochs) of records' fields}, in run order."""
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
            )
        )
    return rows


def format_table(rows: list[Summary]) -> str:
    """A fixed-width table (also valid Markdown) of the summaries."""
    header = (
        "optimizer",
        "rho",
        "test acc % (final)",
        "best % @ epoch",
        "train loss (noisy)",
        "s/epoch",
        "optimizer share",
    )
    lines = []
    for r in rows:
        acc = f"{100 * r.final_acc_mean:.2f}"
        if not math.isnan(r.final_acc_std):
            acc += f" ± {100 * r.final_acc_std:.2f}"
        lines.append(
            (
                r.optimizer,
                r.rho,
                acc,
                f"{100 * r.best_acc:.2f} @ {r.best_epoch}",
                f"{r.final_train_loss:.3f}",
                f"{r.seconds_per_epoch:.3f}",
                f"{100 * r.optimizer_share:.1f}%",
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


def plot_accuracy(records, path, title: str) -> None:
    """Test accuracy against epoch: per optimizer the seed mean, and a band
    of one standard deviation over seeds when there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in _by_optimizer(records).items():
        acc = 100 * _field(runs, "test_acc")
        epochs = _field(runs, "epoch")[0]
        mean = acc.mean(axis=0)
        rho = runs[0][0]["rho"]
        label = name if rho == "" else f"{name} (rho {rho})"
        (line,) = ax.plot(epochs, mean, label=label, linewidth=1.6)
        if len(runs) > 1:
            std = acc.std(axis=0, ddof=1)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
