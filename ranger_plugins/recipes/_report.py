"""The printed table and the PNG of loss curves and learning-rate schedules."""

from __future__ import annotations

from pathlib import Path

from ._config import RunResult

__all__ = ["format_table", "plot_results"]

_OPTIMIZER_NAMES = {"ranger": "Ranger", "adamw": "AdamW"}
_SCHEDULE_NAMES = {"flat_cos": "flat + cosine", "one_cycle": "one-cycle"}


def format_table(results: list[RunResult], epochs: int) -> str:
    """A plain-text (and Markdown) table: one row per run."""
    header = (
        "| run | model | optimizer | schedule | epochs | valid accuracy | valid loss | train time |"
    )
    rule = "|---|---|---|---|---:|---:|---:|---:|"
    rows = [
        f"| {r.spec.name} | {r.model_name} | {_OPTIMIZER_NAMES[r.spec.optimizer]} "
        f"| {_SCHEDULE_NAMES[r.spec.schedule]} | {epochs} | {r.accuracy:.2%} "
        f"| {r.valid_loss:.4f} | {r.seconds:.1f} s |"
        for r in results
    ]
    return "\n".join([header, rule, *rows])


def _smooth(values: list[float], beta: float = 0.9) -> list[float]:
    # Debiased exponential moving average, as fastai's Recorder smooths its loss.
    smoothed, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        smoothed.append(average / (1 - beta**i))
    return smoothed


def plot_results(results: list[RunResult], path: Path, title: str) -> Path:
    """Write the loss curves (training per iteration, validation per epoch) and the
    learning-rate schedules of ``results`` to ``path`` (PNG) and return the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (loss_ax, lr_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange"]
    for result, color in zip(results, colors):
        label = (
            f"{result.spec.name}: {result.model_name}, {_OPTIMIZER_NAMES[result.spec.optimizer]}"
        )
        iterations = range(1, len(result.train_losses) + 1)
        loss_ax.plot(iterations, result.train_losses, color=color, alpha=0.15, linewidth=0.8)
        loss_ax.plot(
            iterations, _smooth(result.train_losses), color=color, label=f"{label} (train)"
        )
        loss_ax.plot(
            result.valid_iters,
            result.valid_losses,
            color=color,
            linestyle="--",
            marker="o",
            label=f"{label} (valid)",
        )
        lr_ax.plot(
            iterations,
            result.lrs,
            color=color,
            label=f"{result.spec.name}: {_SCHEDULE_NAMES[result.spec.schedule]}",
        )
    loss_ax.set(title=f"Loss: {title}", xlabel="iteration", ylabel="loss (label smoothing 0.1)")
    loss_ax.legend(fontsize=8)
    loss_ax.grid(alpha=0.3)
    lr_ax.set(title="Learning rate", xlabel="iteration", ylabel="lr")
    lr_ax.legend(fontsize=8)
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
