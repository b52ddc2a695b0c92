"""What a recipe run is: the resolved options, the runs compared, and what each returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ranger_plugins.family import OPTIMIZERS

__all__ = [
    "BASELINE",
    "DIGITS_DEFAULTS",
    "FOLDER_DEFAULTS",
    "RECIPE",
    "RecipeConfig",
    "RunResult",
    "STATE_PRECISIONS",
    "RunSpec",
    "recipe_spec",
]

#: The ``state_precision`` values the main job trains Ranger with (``--state-precision``):
#: fp32 state, and the two low-memory layouts of `ranger_plugins._low_memory`.
STATE_PRECISIONS = ("full", "16bit", "8bit")

# The leaderboard hyperparameters (fastai Imagenette/Imagewoof records, 2019): Ranger with
# mom 0.95, sqr_mom 0.99, eps 1e-6, true weight decay 1e-2 (none on norm/bias), flat lr then
# cosine annealing from 72% of the iterations, label smoothing 0.1.
RANGER_HYPERS: dict[str, Any] = {
    "mom": 0.95,
    "sqr_mom": 0.99,
    "eps": 1e-6,
    "wd": 1e-2,
    "k": 6,
    "alpha": 0.5,
}
LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 1e-2


@dataclass(frozen=True)
class RunSpec:
    """One side of the comparison: an activation, an optimizer and an LR schedule."""

    name: str
    activation: str  # "mish" | "relu"
    optimizer: str  # a name of ranger_plugins.family.OPTIMIZERS, or "adamw"
    schedule: str  # "flat_cos" | "one_cycle"
    #: How Ranger stores its state (one of `STATE_PRECISIONS`); "full" for every other run.
    state_precision: str = "full"


def recipe_spec(optimizer: str = "ranger", state_precision: str = "full") -> RunSpec:
    """The recipe (Mish, flat-then-cosine, label smoothing) with a Ranger-family optimizer.

    With Ranger the run is called ``recipe`` (``recipe_16bit``, ``recipe_8bit`` with
    low-memory state); with another variant, by the variant's name (``ranger_qh``), so that
    ``--optimizer all`` and ``--state-precision all`` give each run its own row."""
    name = "recipe" if optimizer == "ranger" else optimizer
    if state_precision != "full":
        name = f"{name}_{state_precision}"
    return RunSpec(
        name,
        activation="mish",
        optimizer=optimizer,
        schedule="flat_cos",
        state_precision=state_precision,
    )


RECIPE = recipe_spec("ranger")
BASELINE = RunSpec("baseline", activation="relu", optimizer="adamw", schedule="one_cycle")


@dataclass(frozen=True)
class Defaults:
    """Per-dataset defaults; any option given on the command line wins."""

    epochs: int
    size: int
    bs: int
    lr: float
    arch: str
    baseline: bool
    threads: int | None  # None: torch's default (one per core)


# Digits: small enough to train both runs in well under a minute each on 2 free CPU cores.
# lr 8e-3 is the 2020 leaderboard baseline's; both runs use the same peak lr.
# One CPU thread: the tiny model's ops take microseconds, so more threads only add
# synchronisation (20x slower on a busy 2-core machine), and the numbers are reproducible.
DIGITS_DEFAULTS = Defaults(
    epochs=5, size=32, bs=64, lr=8e-3, arch="xresnet_tiny", baseline=True, threads=1
)
# Real data: the record-setting settings (XResNet50 + Mish, 128 px, bs 64, lr 4e-3, 5 epochs).
FOLDER_DEFAULTS = Defaults(
    epochs=5, size=128, bs=64, lr=4e-3, arch="xresnet50", baseline=False, threads=None
)


@dataclass
class RecipeConfig:
    """Everything one invocation needs, with the per-dataset defaults filled in."""

    engine: str = "fastai"
    dataset: str = "digits"
    data: Path | None = None
    epochs: int = DIGITS_DEFAULTS.epochs
    seed: int = 42
    #: Train every run with seeds ``seed``, ``seed + 1``, ..., ``seed + seeds - 1``.
    seeds: int = 1
    size: int = DIGITS_DEFAULTS.size
    bs: int = DIGITS_DEFAULTS.bs
    lr: float = DIGITS_DEFAULTS.lr
    arch: str = DIGITS_DEFAULTS.arch
    self_attention: bool = False
    gc: bool = False
    #: The recipe's optimizer: a name of ``ranger_plugins.family.OPTIMIZERS``, or ``"all"``
    #: to train the recipe once with each of them.
    optimizer: str = "ranger"
    #: How Ranger stores its state: one of `STATE_PRECISIONS`, or ``"all"`` to train the
    #: Ranger recipe once with each (the other variants always keep full state).
    state_precision: str = "full"
    pct_start: float = 0.72
    baseline: bool = True
    workers: int = 0
    threads: int | None = DIGITS_DEFAULTS.threads
    output: Path = field(default_factory=lambda: Path("ranger-recipe-digits.png"))

    @property
    def uses_folder(self) -> bool:
        """True when the images come from an ImageNet-style folder rather than digits."""
        return self.dataset != "digits" or self.data is not None

    @property
    def state_precisions(self) -> list[str]:
        """Every state precision Ranger trains with, in order."""
        if self.state_precision == "all":
            return list(STATE_PRECISIONS)
        return [self.state_precision]

    @property
    def runs(self) -> list[RunSpec]:
        """The runs to train: the recipe with each optimizer asked for (in the family's
        order for ``"all"``; Ranger with each state precision asked for), then the
        baseline."""
        names = list(OPTIMIZERS) if self.optimizer == "all" else [self.optimizer]
        recipes = [
            recipe_spec(name, precision)
            for name in names
            for precision in (self.state_precisions if name == "ranger" else ["full"])
        ]
        return [*recipes, BASELINE] if self.baseline else recipes

    @property
    def seed_list(self) -> list[int]:
        """Every seed to train each run with, in order."""
        return [self.seed + i for i in range(self.seeds)]


@dataclass
class RunResult:
    """What one training run produced. Losses are per iteration (training) and per epoch
    (validation, placed at the iteration count where that epoch ended)."""

    spec: RunSpec
    accuracy: float
    valid_loss: float
    seconds: float  # the fit alone (data loading and model building are not included)
    train_losses: list[float]
    lrs: list[float]
    valid_iters: list[int]
    valid_losses: list[float]
    model_name: str = ""
    seed: int = 42
    #: The trained model (holding the Lookahead slow weights, synced at the end of fit, for
    #: Ranger) and the optimizer that trained it (the core ``torch.optim.Optimizer``).
    model: Any = field(default=None, repr=False)
    optimizer: Any = field(default=None, repr=False)
