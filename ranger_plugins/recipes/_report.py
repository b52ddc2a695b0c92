"""The printed table and the plot: loss curves, accuracy over seeds, learning-rate schedules."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from ._config import RunResult, RunSpec
from ._optimizers import optimizer_label

__all__ = [
    "RunSummary",
    "Spread",
    "final_train_loss",
    "format_per_seed",
    "format_table",
    "group_runs",
    "plot_results",
    "spread",
    "summarize",
]

_SCHEDULE_NAMES = {"flat_cos": "flat + cosine", "one_cycle": "one-cycle"}
# One colour per run (matplotlib's tab10 colours; red and blue first, as before): enough for
# the six runs of `--optimizer all`.
_COLORS = [
    "tab:red",
    "tab:blue",
    "tab:green",
    "tab:orange",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
]


@dataclass(frozen=True)
class Spread:
    """The mean of some values and their standard deviation (n - 1; None for one value)."""

    mean: float
    std: float | None

    def format(self, fmt: str) -> str:
        """``mean`` for one value, ``mean ± std`` for several, each formatted with ``fmt``."""
        mean = fmt.format(self.mean)
        return mean if self.std is None else f"{mean} ± {fmt.format(self.std)}"


def spread(values: list[float]) -> Spread:
    """Mean and sample standard deviation (n - 1) of ``values`` (at least one)."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return Spread(statistics.fmean(values), std)


@dataclass(frozen=True)
class RunSummary:
    """One run over its seeds: what the table prints for it."""

    spec: RunSpec
    model_name: str
    seeds: list[int]
    accuracy: Spread  # validation accuracy, in percent
    valid_loss: Spread
    train_loss: Spread  # the last epoch's mean training loss (`final_train_loss`)
    epoch_seconds: Spread  # the fit's time divided by its epochs, seed by seed
    train_seconds: float  # the fits' times summed over the seeds


def group_runs(results: list[RunResult]) -> dict[str, list[RunResult]]:
    """The results of each run (recipe, baseline), one per seed, in the order they came."""
    groups: dict[str, list[RunResult]] = {}
    for result in results:
        groups.setdefault(result.spec.name, []).append(result)
    return groups


def final_train_loss(result: RunResult, epochs: int) -> float:
    """The mean training loss over the last epoch's iterations (the raw per-iteration
    losses: less noisy than the last batch's, and free of a smoothing's lag)."""
    per_epoch = max(len(result.train_losses) // max(epochs, 1), 1)
    last = result.train_losses[-per_epoch:]
    return statistics.fmean(last) if last else float("nan")


def summarize(results: list[RunResult], epochs: int) -> list[RunSummary]:
    """Each run's metrics over its seeds, in the order the runs first came."""
    return [
        RunSummary(
            spec=runs[0].spec,
            model_name=runs[0].model_name,
            seeds=[r.seed for r in runs],
            accuracy=spread([100 * r.accuracy for r in runs]),
            valid_loss=spread([r.valid_loss for r in runs]),
            train_loss=spread([final_train_loss(r, epochs) for r in runs]),
            epoch_seconds=spread([r.seconds / epochs for r in runs]),
            train_seconds=sum(r.seconds for r in runs),
        )
        for runs in group_runs(results).values()
    ]


def _seeds(seeds: list[int]) -> str:
    contiguous = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    if len(seeds) > 1 and contiguous:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def shows_train_loss(results: list[RunResult]) -> bool:
    """Whether the table has a training-loss column: when a run has low-memory state, whose
    criterion (the same final training loss as full state) needs it."""
    return any(r.spec.state_precision != "full" for r in results)


def format_table(results: list[RunResult], epochs: int) -> str:
    """A plain-text (and Markdown) table: one row per run, its metrics over every seed (mean
    ± standard deviation when there are several), its time per epoch (the fit's time over
    its epochs, training and validation; mean ± std over the seeds) and its training time
    summed over seeds. With low-memory state (``--state-precision``) the table also has the
    last epoch's mean training loss (`final_train_loss`), after the validation loss."""
    train = shows_train_loss(results)
    header = (
        "| run | model | optimizer | schedule | epochs | seeds | valid accuracy | valid loss "
        + ("| train loss " if train else "")
        + "| time per epoch | train time |"
    )
    rule = "|---|---|---|---|---:|---:|---:|---:|" + ("---:|" if train else "") + "---:|---:|"
    rows = [
        f"| {s.spec.name} | {s.model_name} | {optimizer_label(s.spec)} "
        f"| {_SCHEDULE_NAMES[s.spec.schedule]} | {epochs} | {_seeds(s.seeds)} "
        f"| {s.accuracy.format('{:.2f}')}% | {s.valid_loss.format('{:.4f}')} "
        + (f"| {s.train_loss.format('{:.4f}')} " if train else "")
        + f"| {s.epoch_seconds.format('{:.2f}')} s | {s.train_seconds:.1f} s |"
        for s in summarize(results, epochs)
    ]
    return "\n".join([header, rule, *rows])


def format_per_seed(results: list[RunResult], epochs: int = 1) -> str:
    """Each run's validation accuracy and loss seed by seed, one line per run (and the last
    epoch's training loss, of ``epochs``, where the table shows it)."""
    train = shows_train_loss(results)
    lines = []
    for name, runs in group_runs(results).items():
        each = ", ".join(
            f"{r.seed}: {r.accuracy:.2%} / {r.valid_loss:.4f}"
            + (f" / {final_train_loss(r, epochs):.4f}" if train else "")
            for r in runs
        )
        what = "accuracy / loss / train loss" if train else "accuracy / loss"
        lines.append(f"{name} (seed: {what}): {each}")
    return "\n".join(lines)


def _smooth(values: list[float], beta: float = 0.9) -> list[float]:
    # Debiased exponential moving average, as fastai's Recorder smooths its loss.
    smoothed, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        smoothed.append(average / (1 - beta**i))
    return smoothed


def _label(run: RunResult) -> str:
    return f"{run.spec.name}: {run.model_name}, {optimizer_label(run.spec)}"


def _plot_losses(ax, runs: list[RunResult], color: str) -> None:
    """Training loss (smoothed; the band spans the seeds) and validation loss per epoch
    (mean, with the seeds' standard deviation as error bars)."""
    import numpy as np

    length = min(len(r.train_losses) for r in runs)
    curves = np.array([_smooth(r.train_losses[:length]) for r in runs])
    iterations = np.arange(1, length + 1)
    if len(runs) == 1:  # the raw loss behind the smoothed one
        ax.plot(iterations, runs[0].train_losses[:length], color=color, alpha=0.15, lw=0.8)
    else:
        ax.fill_between(iterations, curves.min(0), curves.max(0), color=color, alpha=0.25)
    several = len(runs) > 1
    train_note = "train, band: range over seeds" if several else "train"
    ax.plot(iterations, curves.mean(0), color=color, label=f"{_label(runs[0])} ({train_note})")
    valid = np.array([r.valid_losses for r in runs])
    ax.errorbar(
        runs[0].valid_iters,
        valid.mean(0),
        yerr=valid.std(0, ddof=1) if several else None,
        color=color,
        linestyle="--",
        marker="o",
        capsize=3,
        label=f"{_label(runs[0])} ({'valid, mean ± std' if several else 'valid'})",
    )


def _plot_accuracies(ax, groups: dict[str, list[RunResult]]) -> None:
    """Every seed's final validation accuracy as a dot, the mean as a bar."""
    for x, (runs, color) in enumerate(zip(groups.values(), _COLORS)):
        accuracies = [100 * r.accuracy for r in runs]
        offsets = (
            [0.0]
            if len(runs) == 1
            else [(i / (len(runs) - 1) - 0.5) * 0.3 for i in range(len(runs))]
        )
        ax.scatter([x + o for o in offsets], accuracies, color=color, alpha=0.7, zorder=3)
        ax.hlines(statistics.fmean(accuracies), x - 0.25, x + 0.25, color=color, linewidth=2)
    # Several variants' names side by side need tilting to fit under their dots.
    ax.set_xticks(range(len(groups)), list(groups), rotation=30 if len(groups) > 3 else 0)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set(title="Validation accuracy (dots: seeds, bar: mean)", ylabel="accuracy (%)")


def plot_results(results: list[RunResult], path: Path, title: str) -> Path:
    """Write the loss curves (training per iteration, validation per epoch), the final
    accuracy of every seed and the learning-rate schedules of ``results`` to ``path`` (any
    format matplotlib writes, from its suffix) and return the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = group_runs(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [3, 1.2, 2]})
    try:
        _draw(axes, groups, title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)  # also when writing fails: a long-lived caller keeps no open figure
    return path


def _draw(axes, groups: dict[str, list[RunResult]], title: str) -> None:
    loss_ax, acc_ax, lr_ax = axes
    for runs, color in zip(groups.values(), _COLORS):
        _plot_losses(loss_ax, runs, color)
        # Every seed follows the same schedule: the first seed's stands for all.
        spec = runs[0].spec
        lr_ax.plot(
            range(1, len(runs[0].lrs) + 1),
            runs[0].lrs,
            color=color,
            label=f"{spec.name}: {_SCHEDULE_NAMES[spec.schedule]}",
        )
    _plot_accuracies(acc_ax, groups)
    loss_ax.set(title=f"Loss: {title}", xlabel="iteration", ylabel="loss (label smoothing 0.1)")
    lr_ax.set(title="Learning rate", xlabel="iteration", ylabel="lr")
    for ax in axes:
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    lr_ax.legend(fontsize=8)
