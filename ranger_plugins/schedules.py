"""Learning-rate schedules that follow the optimizer steps actually taken (torch only).

Every scheduler here is a real `torch.optim.lr_scheduler.LRScheduler` whose position is the
number of completed ``optimizer.step()`` calls, counted by an optimizer step post-hook, not
the number of ``scheduler.step()`` calls. A step that `torch.amp.GradScaler` skips (inf/NaN
gradients) never reaches ``optimizer.step()``, so it does not move the schedule, even when a
training loop (Lightning's, for one) steps the scheduler after every batch regardless.

The cosine shapes are fastai's: `CombinedCosineLR` is ``combined_cos(pct_start, lr/div_start,
lr, lr/div_final)`` evaluated at ``position = steps_taken / total_steps``, so `FlatCosineLR`
is ``Learner.fit_flat_cos`` and `OneCycleCosineLR` is the learning rate of
``Learner.fit_one_cycle``.

Usable from plain PyTorch::

    optimizer = Ranger(model.parameters(), lr=4e-3)
    scheduler = FlatCosineLR(optimizer, total_steps=len(loader) * epochs)
    for batch in loader:
        ...
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
"""

from __future__ import annotations

import math
import weakref
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "CombinedCosineLR",
    "FlatCosineLR",
    "OneCycleCosineLR",
    "OptimizerStepLR",
    "cosine_anneal",
]

# Attributes that are live objects, not state: never saved in `state_dict()`.
_UNSAVED = ("optimizer", "_step_hook")


def cosine_anneal(start: float, end: float, position: float) -> float:
    """Cosine from ``start`` (position 0) to ``end`` (position 1), as fastai's ``sched_cos``."""
    return start + (1.0 + math.cos(math.pi * (1.0 - position))) * (end - start) / 2.0


class OptimizerStepLR(LRScheduler):
    """Base class: each group's lr is ``base_lr * lr_factor(optimizer_steps)``.

    ``optimizer_steps`` counts the optimizer's completed ``step()`` calls (through
    ``optimizer.register_step_post_hook``). ``scheduler.step()`` moves the schedule to that
    count: it does nothing when no optimizer step was taken since the last call (a step
    skipped by GradScaler), and catches up when several were. ``last_epoch`` always equals
    the number of optimizer steps the current learning rate is for.

    Subclasses implement `lr_factor`. The counter is part of ``state_dict()``, so a resumed
    run continues from the same position.

    Args:
        optimizer: the wrapped optimizer.
        last_epoch: the index of the last optimizer step taken when resuming without
            ``load_state_dict`` (as in torch's schedulers); -1 for a fresh start.
    """

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if not (isinstance(last_epoch, int) and last_epoch >= -1):
            raise ValueError(f"Invalid last_epoch: {last_epoch!r} (must be an int >= -1)")
        # torch's convention: constructing with last_epoch=L leaves the schedule at L + 1.
        self.optimizer_steps = last_epoch + 1
        # A weak reference, so the optimizer does not keep a discarded scheduler alive.
        scheduler_ref = weakref.ref(self)

        def count_optimizer_step(_optimizer: Optimizer, _args: Any, _kwargs: Any) -> None:
            scheduler = scheduler_ref()
            if scheduler is not None:
                scheduler.optimizer_steps += 1

        self._step_hook = optimizer.register_step_post_hook(count_optimizer_step)
        try:
            super().__init__(optimizer, last_epoch)
        except BaseException:
            self._step_hook.remove()  # a failed construction leaves the optimizer as it was
            raise

    def lr_factor(self, step: int) -> float:
        """The multiplier of each group's base lr after ``step`` optimizer steps."""
        raise NotImplementedError

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The learning rates for position ``last_epoch`` (closed form)."""
        factor = self.lr_factor(self.last_epoch)
        return [float(base_lr) * factor for base_lr in self.base_lrs]

    _get_closed_form_lr = get_lr

    def step(self, epoch: int | None = None) -> None:
        """Move the schedule to the number of optimizer steps taken so far."""
        if epoch is not None:
            raise TypeError(
                f"{type(self).__name__}.step() takes no epoch: its position is the number of "
                "optimizer steps taken"
            )
        if self._initialized() and self.last_epoch == self.optimizer_steps:
            return  # no optimizer step since the last call (for example, skipped by GradScaler)
        # The base class adds one and recomputes the learning rates.
        self.last_epoch = self.optimizer_steps - 1
        super().step()

    def _initialized(self) -> bool:
        return getattr(self, "_step_count", 0) > 0

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state (plain values only: loadable with ``weights_only=True``)."""
        return {key: value for key, value in self.__dict__.items() if key not in _UNSAVED}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from `state_dict`; the step hook stays attached to this optimizer."""
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in _UNSAVED})

    def remove_hook(self) -> None:
        """Detach from the optimizer (the schedule stops following its steps)."""
        self._step_hook.remove()


class CombinedCosineLR(OptimizerStepLR):
    """Cosine from ``lr / div_start`` to ``lr`` over the first ``pct_start`` of the steps,
    then cosine from ``lr`` to ``lr / div_final`` (fastai's ``combined_cos``).

    The learning rate for optimizer step ``s + 1`` (after ``s`` steps) is the schedule at
    position ``s / total_steps``, as fastai's ``ParamScheduler`` does; past ``total_steps``
    it stays at ``lr / div_final``. ``lr`` is each group's learning rate when the scheduler
    is created.

    Args:
        optimizer: the wrapped optimizer.
        total_steps: number of optimizer steps in the whole schedule (int >= 1).
        pct_start: fraction of the steps spent in the first phase, in [0, 1].
        div_start: the first phase starts at ``lr / div_start`` (> 0; 1 keeps it flat).
        div_final: the schedule ends at ``lr / div_final`` (> 0).
        last_epoch: see `OptimizerStepLR`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        pct_start: float,
        div_start: float,
        div_final: float,
        last_epoch: int = -1,
    ) -> None:
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"Invalid total_steps: {total_steps!r} (must be an int >= 1)")
        if not 0.0 <= pct_start <= 1.0:
            raise ValueError(f"Invalid pct_start: {pct_start!r} (must be in [0, 1])")
        if not div_start > 0.0:
            raise ValueError(f"Invalid div_start: {div_start!r} (must be > 0)")
        if not div_final > 0.0:
            raise ValueError(f"Invalid div_final: {div_final!r} (must be > 0)")
        self.total_steps = total_steps
        self.pct_start = pct_start
        self.div_start = div_start
        self.div_final = div_final
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, step: int) -> float:
        """``combined_cos(pct_start, 1/div_start, 1, 1/div_final)`` at ``step / total_steps``."""
        position = min(step / self.total_steps, 1.0)
        if position < self.pct_start:
            return cosine_anneal(1.0 / self.div_start, 1.0, position / self.pct_start)
        if self.pct_start == 1.0:
            return 1.0
        phase_position = (position - self.pct_start) / (1.0 - self.pct_start)
        return cosine_anneal(1.0, 1.0 / self.div_final, phase_position)


class FlatCosineLR(CombinedCosineLR):
    """fastai's ``fit_flat_cos``: flat at ``lr`` for ``pct_start`` of the steps, then cosine
    annealing to ``lr / div_final``.

    The Ranger + Mish records used ``pct_start=0.72`` (2019) and fastai's default 0.75 (2020).

    Args:
        optimizer: the wrapped optimizer.
        total_steps: number of optimizer steps in the whole schedule (int >= 1).
        pct_start: fraction of the steps at the flat lr, in [0, 1].
        div_final: the schedule ends at ``lr / div_final`` (> 0).
        last_epoch: see `OptimizerStepLR`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        pct_start: float = 0.75,
        div_final: float = 1e5,
        last_epoch: int = -1,
    ) -> None:
        super().__init__(optimizer, total_steps, pct_start, 1.0, div_final, last_epoch)


class OneCycleCosineLR(CombinedCosineLR):
    """The learning rate of fastai's ``fit_one_cycle``: cosine warm-up from
    ``lr / div_start`` to ``lr`` over ``pct_start`` of the steps, then cosine annealing to
    ``lr / div_final``. (Momentum is not cycled.)

    Args:
        optimizer: the wrapped optimizer.
        total_steps: number of optimizer steps in the whole schedule (int >= 1).
        pct_start: fraction of the steps spent warming up, in [0, 1].
        div_start: the warm-up starts at ``lr / div_start`` (> 0).
        div_final: the schedule ends at ``lr / div_final`` (> 0).
        last_epoch: see `OptimizerStepLR`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        pct_start: float = 0.25,
        div_start: float = 25.0,
        div_final: float = 1e5,
        last_epoch: int = -1,
    ) -> None:
        super().__init__(optimizer, total_steps, pct_start, div_start, div_final, last_epoch)
