"""The Ranger family for Lightning: a ``configure_optimizers`` helper and a Lookahead callback.

Works with both packagings of Lightning, ``lightning.pytorch`` and ``pytorch_lightning``:
`LookaheadCallback` subclasses the ``Callback`` class of each one installed, so both trainers
accept it (each checks ``isinstance`` against its own ``Callback``).

Example::

    from ranger_plugins.lightning import LookaheadCallback, ranger_optimizers

    class Model(LightningModule):
        def configure_optimizers(self):
            return ranger_optimizers(self, lr=4e-3, schedule="flat_cos")

    Trainer(callbacks=[LookaheadCallback()]).fit(Model())

A variant is picked by name, its own options passed on: ``ranger_optimizers(self,
optimizer="ranger_qh", nus=(0.7, 1.0))``. With ``LightningCLI``, ``--optimizer
ranger_plugins.RangerQH`` (or ``Ranger``, ``RangerVA``, ``Ranger21``, ``RangerLars``) picks
the class itself.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from ._base import LookaheadOptimizer
from ._math import check_gc_supported
from .family import optimizer_class
from .lookahead import LookaheadControls, check_weights_after_fit, slow_weights_key
from .param_groups import no_decay_param_groups
from .ranger import Ranger
from .ranger21 import Ranger21
from .schedules import FlatCosineLR, OneCycleCosineLR, OptimizerStepLR

__all__ = ["LookaheadCallback", "no_decay_param_groups", "ranger_optimizers"]

#: Checkpoint key holding the fast (training) weights beside the slow ``state_dict``.
FAST_STATE_KEY = "lookahead_fast_state_dict"


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            found = importlib.util.find_spec(package) is not None
        except ModuleNotFoundError:  # the parent package `lightning` is missing
            found = False
        if found:
            bases.append(importlib.import_module(package).Callback)
    if not bases:
        raise ImportError(
            "ranger_plugins.lightning needs Lightning: pip install '.[lightning]' from a clone"
        )
    return tuple(bases)


def _check_gc_supported(groups: list[dict[str, Any]]) -> None:
    """The core optimizers refuse GC where it cannot run (FSDP1's flattened params) at their
    first step; checking here, when ``configure_optimizers`` builds the optimizer, stops the
    run before any training."""
    for group in groups:
        if group["use_gc"]:
            for param in group["params"]:
                check_gc_supported(param)


def _estimated_total_steps(module: nn.Module) -> int:
    try:
        trainer: Any = module.trainer  # LightningModule raises RuntimeError when not attached
    except (AttributeError, RuntimeError):
        trainer = None
    if trainer is None:
        raise ValueError(
            "total_steps is required when the module is not attached to a Trainer "
            "(it defaults to trainer.estimated_stepping_batches)"
        )
    total = trainer.estimated_stepping_batches
    if not (isinstance(total, (int, float)) and 1 <= total < float("inf")):
        raise ValueError(
            f"trainer.estimated_stepping_batches is {total!r}; pass total_steps (an int >= 1) "
            "or set max_steps/max_epochs"
        )
    return int(total)


#: ``ranger_optimizers``' weight decay when none is given: the Ranger + Mish recipe's 1e-2 for
#: Ranger, each variant's own default otherwise.
_RANGER_WEIGHT_DECAY = 1e-2

# Ranger21's own schedule flags (see `ranger_plugins.ranger21.Ranger21Schedule`).
_RANGER21_SCHEDULE_FLAGS = ("use_warmup", "warmdown_active")


def ranger_optimizers(
    module: nn.Module,
    lr: float = 4e-3,
    *,
    optimizer: str | type[LookaheadOptimizer] = "ranger",
    schedule: Literal["flat_cos", "one_cycle", "constant"] = "flat_cos",
    total_steps: int | None = None,
    pct_start: float | None = None,
    div_start: float = 25.0,
    div_final: float = 1e5,
    weight_decay: float | None = None,
    exclude_bias_and_norm: bool = True,
    **optimizer_kwargs: Any,
) -> dict[str, Any]:
    """An optimizer of the Ranger family and its learning-rate schedule, in the form
    ``configure_optimizers`` returns.

    Args:
        module: the model (normally ``self`` in ``configure_optimizers``).
        lr: the peak learning rate (the flat part of ``flat_cos``).
        optimizer: which optimizer, by its name in `ranger_plugins.family.OPTIMIZERS`
            (``"ranger"``, ``"ranger_qh"``, ``"ranger_va"``, ``"ranger21"``,
            ``"ranger_lars"``) or its class.
        schedule: ``"flat_cos"`` (fastai's ``fit_flat_cos``: flat for ``pct_start``, then
            cosine to ``lr / div_final``), ``"one_cycle"`` (fastai's ``fit_one_cycle`` lr:
            cosine warm-up from ``lr / div_start`` over ``pct_start``, then cosine to
            ``lr / div_final``) or ``"constant"`` (no scheduler).
        total_steps: optimizer steps in the whole schedule; default
            ``trainer.estimated_stepping_batches``.
        pct_start: the first phase's share of the steps (default 0.75 for ``flat_cos``,
            0.25 for ``one_cycle``).
        div_start: ``one_cycle`` starts at ``lr / div_start``.
        div_final: the schedule ends at ``lr / div_final``.
        weight_decay: the optimizer's weight decay; default: 1e-2 for Ranger (the Ranger +
            Mish recipe's), the variant's own default for the others (RangerQH, RangerVA
            and RangerLars 0, Ranger21 1e-4).
        exclude_bias_and_norm: give biases and normalisation layers no weight decay.
        **optimizer_kwargs: passed on to the optimizer's class, under its own names
            (``betas``, ``eps``, ``k``, ``alpha``, ``use_gc``; Ranger's ``state_precision``
            (``"full"``, ``"delta"``, ``"16bit"``, ``"8bit"``: the low-memory optimizer
            state), RangerQH's ``nus`` and ``decouple_weight_decay``, RangerVA's
            ``amsgrad``, Ranger21's ``norm_loss_factor``, ...).

    Ranger21 brings its own warmup and warmdown (``use_warmup``, ``warmdown_active``).
    With ``schedule="flat_cos"`` or ``"one_cycle"`` they are turned off, so the step uses
    exactly the lr of the attached scheduler (asking for either then raises a
    ``ValueError``). With ``schedule="constant"`` Ranger21 schedules itself when it is given
    ``num_iterations`` (the run's optimizer steps; its defaults then turn both on);
    without it they are off, unless turned on explicitly (a warmup of
    ``num_warmup_iterations`` steps needs no run length).

    Returns:
        ``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., "interval": "step"}}``.
        The scheduler is an `OptimizerStepLR`: its position is the number of optimizer steps
        actually taken, so a step that GradScaler skips does not advance it, although
        Lightning calls ``scheduler.step()`` after every optimizer step either way.
    """
    schedules = ("flat_cos", "one_cycle", "constant")
    if schedule not in schedules:
        raise ValueError(f"Invalid schedule: {schedule!r} (must be one of {schedules})")
    if total_steps is not None and not (isinstance(total_steps, int) and total_steps >= 1):
        raise ValueError(f"Invalid total_steps: {total_steps!r} (must be an int >= 1)")
    cls = optimizer_class(optimizer)
    if weight_decay is None:
        weight_decay = _default_weight_decay(cls)
    groups = no_decay_param_groups(
        module, weight_decay, exclude_bias_and_norm=exclude_bias_and_norm
    )
    kwargs = _with_schedule_flags(cls, schedule, optimizer_kwargs)
    built = cls(groups, lr=lr, weight_decay=weight_decay, **kwargs)  # type: ignore[call-arg]
    _check_gc_supported(built.param_groups)
    if schedule == "constant":
        return {"optimizer": built}
    if total_steps is None:
        total_steps = _estimated_total_steps(module)
    return {
        "optimizer": built,
        "lr_scheduler": {
            "scheduler": _scheduler(built, schedule, total_steps, pct_start, div_start, div_final),
            "interval": "step",
            "frequency": 1,
        },
    }


def _default_weight_decay(cls: type[LookaheadOptimizer]) -> float:
    if issubclass(cls, Ranger):
        return _RANGER_WEIGHT_DECAY
    default = inspect.signature(cls).parameters["weight_decay"].default
    return float(default)


def _with_schedule_flags(
    cls: type[LookaheadOptimizer], schedule: str, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """``kwargs`` with Ranger21's own schedule off unless it is wanted (see
    `ranger_optimizers`); other optimizers' as they are."""
    if not issubclass(cls, Ranger21):
        return kwargs
    if schedule != "constant":
        asked = [flag for flag in _RANGER21_SCHEDULE_FLAGS if kwargs.get(flag)]
        if asked:
            raise ValueError(
                f"Ranger21's {asked[0]}=True with schedule={schedule!r}: the two schedules "
                "would compose (see ranger_plugins.ranger21.Ranger21Schedule). Use "
                "schedule='constant' with num_iterations for Ranger21's own schedule, or "
                "leave its flags off (the default here) to use the attached one."
            )
    own = schedule == "constant" and kwargs.get("num_iterations") is not None
    return {**dict.fromkeys(_RANGER21_SCHEDULE_FLAGS, own), **kwargs}


def _scheduler(
    optimizer: Optimizer,
    schedule: str,
    total_steps: int,
    pct_start: float | None,
    div_start: float,
    div_final: float,
) -> OptimizerStepLR:
    if schedule == "flat_cos":
        return FlatCosineLR(
            optimizer,
            total_steps,
            pct_start=0.75 if pct_start is None else pct_start,
            div_final=div_final,
        )
    return OneCycleCosineLR(
        optimizer,
        total_steps,
        pct_start=0.25 if pct_start is None else pct_start,
        div_start=div_start,
        div_final=div_final,
    )


def _lookahead_optimizers(optimizers: Iterable[Optimizer]) -> list[LookaheadControls]:
    return [opt for opt in optimizers if isinstance(opt, LookaheadControls)]


def _enter_slow_weights(stack: contextlib.ExitStack, optimizers: list[LookaheadControls]) -> None:
    for optimizer in optimizers:
        # Before the first step there are no slow weights: nothing to swap (and early core
        # versions raised on the empty copy).
        if optimizer.has_slow_weights:
            stack.enter_context(optimizer.slow_weights())


@torch.no_grad()
def _detached_copy(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: value.detach().clone() if isinstance(value, torch.Tensor) else value
        for key, value in state_dict.items()
    }


@torch.no_grad()
def _cloned(value: Any) -> Any:
    """``value`` with every tensor in its dicts, lists and tuples replaced by a copy."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _cloned(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(item) for item in value)
    return value


@torch.no_grad()
def _copy_each(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for destination, source in zip(destinations, sources):
        destination.copy_(source)


class _TrainingStateBeforeFinish:
    """The tensors ``finish_training`` overwrites, as they were: the fast weights (unless
    ``weights_after_fit="fast"``, which changes nothing) and the state tensor of the slow
    weights where it changes too: ``slow_param`` for ``"synced"``, and ``slow_delta`` (fast -
    slow, in `Ranger`'s low-memory ``state_precision``), which ``"synced"`` and ``"slow"``
    both zero. `restored` puts them back for a while."""

    def __init__(self, optimizers: list[LookaheadControls], weights_after_fit: str) -> None:
        self.optimizers = optimizers
        self.targets: list[torch.Tensor] = []
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    state = optimizer.state.get(param, {})
                    key = slow_weights_key(state)
                    if key is None or weights_after_fit == "fast":
                        continue
                    self.targets.append(param)
                    if weights_after_fit == "synced" or key == "slow_delta":
                        self.targets.append(state[key])
        with torch.no_grad():
            self.saved = [target.detach().clone() for target in self.targets]

    def belongs_to(self, optimizers: Iterable[Optimizer]) -> bool:
        """Whether ``optimizers`` are the ones this state was taken from."""
        mine = self.optimizers
        theirs = _lookahead_optimizers(optimizers)
        return len(mine) == len(theirs) and all(a is b for a, b in zip(mine, theirs))

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """The state from before the finish in the model and the optimizers, then back."""
        with torch.no_grad():
            finished = [target.detach().clone() for target in self.targets]
            _copy_each(self.targets, self.saved)
        try:
            yield
        finally:
            _copy_each(self.targets, finished)


def _is_fitting(trainer: Any) -> bool:
    return trainer.state.fn == "fit"


def _holds_dtensors(tensors: Mapping[str, Any]) -> bool:
    """True for FSDP2's sharded parameters or state dicts."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(value, DTensor) for value in tensors.values())


def _saved_fast_state(trainer: Any, checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The fast weights `LookaheadCallback.on_save_checkpoint` saved, wherever they are."""
    if FAST_STATE_KEY in checkpoint:
        return checkpoint[FAST_STATE_KEY]
    path = trainer.ckpt_path
    model = trainer.strategy.model
    if path is None or not os.path.isdir(path) or not _holds_dtensors(model.state_dict()):
        return None
    # A distributed checkpoint directory: read the shards of this rank into the layout of
    # the model's own (sharded) state dict.
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    prefix = f"optimizer_0.{FAST_STATE_KEY}."
    saved_keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    if not any(key.startswith(prefix) for key in saved_keys):
        return None
    fast_state = get_model_state_dict(model, options=StateDictOptions(cpu_offload=True))
    fast_state = _detached_copy(fast_state)  # buffers to read into, not the parameters
    dcp.load({"optimizer_0": {FAST_STATE_KEY: fast_state}}, checkpoint_id=path)
    return fast_state


class LookaheadCallback(*_callback_bases()):  # type: ignore[misc]
    """Evaluate and checkpoint the Lookahead slow weights of the Ranger family (`Ranger`,
    `RangerQH`, `RangerVA`, `Ranger21`, `RangerLars`) or `Lookahead`.

    * Validation during ``fit`` runs on the slow weights: they are put into the model at
      the start of each validation epoch and the fast weights are restored exactly at its
      end (as Lightning's ``WeightAveraging`` does), so training is bitwise the same with or
      without validation, and ``ModelCheckpoint``/``EarlyStopping`` see slow-weight metrics.
    * A checkpoint's ``state_dict`` holds the slow weights (what validation saw), so
      ``Model.load_from_checkpoint`` gives the evaluated model; the fast weights are saved
      beside them under ``"lookahead_fast_state_dict"`` (in FSDP2's sharded checkpoints, in
      the first optimizer's entry, so that they are sharded too) and put back when ``fit``
      resumes from the checkpoint, so training continues exactly.
    * At the end of ``fit`` the model is left with the weights chosen by
      ``weights_after_fit`` (by default the synced slow weights), which a later
      ``trainer.test``/``predict`` uses and a later checkpoint's ``state_dict`` holds.
    * The end-of-fit weights are for evaluation, not a training step: a checkpoint written
      after them (``ModelCheckpoint(save_last=True)``'s ``last.ckpt`` in ``on_train_end``,
      ``trainer.save_checkpoint`` after ``fit``) keeps the training state from before them
      (the fast weights and the optimizer state), so ``fit(ckpt_path=...)`` with a larger
      ``max_epochs`` continues exactly like one longer run. For this the callback keeps a
      copy of what the end of ``fit`` overwrites (the fast weights and, for ``"synced"``, the
      slow weights; in Ranger's low-memory ``state_precision``, their bf16 difference
      ``slow_delta`` for ``"synced"`` and ``"slow"``) until the next training starts. A
      checkpoint resumes in any ``state_precision`` (the optimizer converts its state).

    The optimizer does the Lookahead itself (its state holds the slow weights and the step
    counts); this callback only decides which weights the model holds when. Automatic and
    manual optimization, gradient accumulation and clipping, mixed precision and GradScaler
    (a skipped step changes nothing in the optimizer) need nothing special.

    Args:
        weights_after_fit: what the model holds when ``fit`` ends:

            * ``"synced"`` (default): a final Lookahead sync, so the slow weights also take
              the fast steps since the last sync into account; the model holds them and
              fast = slow.
            * ``"slow"``: the slow weights as they are, exactly what the last validation
              evaluated (fast = slow; the steps since the last sync are dropped).
            * ``"fast"``: the fast weights, as without this callback.
    """

    def __init__(self, weights_after_fit: Literal["synced", "slow", "fast"] = "synced") -> None:
        check_weights_after_fit(weights_after_fit)
        self.weights_after_fit = weights_after_fit
        # The open `slow_weights()` contexts while validation runs on the slow weights.
        self._slow_weights_stack: contextlib.ExitStack | None = None
        # What the end-of-fit `finish_training` overwrote, for checkpoints written after it.
        self._before_finish: _TrainingStateBeforeFinish | None = None

    @property
    @override
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint's ``"callbacks"``."""
        return "LookaheadCallback"

    # -- swapping --------------------------------------------------------------------------

    def _swap_in_slow_weights(self, trainer: Any) -> None:
        if self._slow_weights_stack is not None:
            return
        stack = contextlib.ExitStack()
        _enter_slow_weights(stack, _lookahead_optimizers(trainer.optimizers))
        self._slow_weights_stack = stack

    def _restore_fast_weights(self) -> None:
        stack, self._slow_weights_stack = self._slow_weights_stack, None
        if stack is not None:
            stack.close()

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Called when fit begins.

        Warns when no optimizer has Lookahead slow weights (the callback then does nothing).
        """
        if not _lookahead_optimizers(trainer.optimizers) and trainer.is_global_zero:
            warnings.warn(
                "LookaheadCallback found no optimizer with Lookahead slow weights (one of the "
                "Ranger family or ranger_plugins.Lookahead) in configure_optimizers; it will "
                "do nothing.",
                stacklevel=2,
            )

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Called when training begins.

        Forgets the training state kept from the end of an earlier ``fit``.
        """
        self._before_finish = None

    @override
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Called when a validation epoch begins.

        Inside ``fit``, puts the slow weights into the model (a standalone ``validate`` or
        ``test`` evaluates the weights it was given).
        """
        if _is_fitting(trainer):
            self._swap_in_slow_weights(trainer)

    @override
    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Called when a validation epoch ends.

        Restores the fast weights, exactly.
        """
        self._restore_fast_weights()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Called when any trainer execution is interrupted by an exception.

        Leaves the model with its training weights, as if validation had ended.
        """
        self._restore_fast_weights()

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Called when training ends.

        Leaves the model holding ``weights_after_fit``, keeping the tensors this overwrites
        for the checkpoints written afterwards.
        """
        optimizers = _lookahead_optimizers(trainer.optimizers)
        self._before_finish = _TrainingStateBeforeFinish(optimizers, self.weights_after_fit)
        for optimizer in optimizers:
            optimizer.finish_training(self.weights_after_fit)

    # -- checkpoints -----------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """Called when saving a checkpoint.

        Its presence in a checkpoint makes Lightning warn when a run resumes without this
        callback (the model would then train on from the slow weights).
        """
        return {"weights_after_fit": self.weights_after_fit, "fast_state_key": FAST_STATE_KEY}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called when loading a checkpoint.

        Nothing to load: the configuration comes from the constructor.
        """

    def _fast_state(self, trainer: Any, checkpoint: dict[str, Any]) -> Mapping[str, Any]:
        """The fast weights for ``checkpoint``; after the end-of-fit finish, the optimizer
        states too are replaced by those from before it."""
        strategy = trainer.strategy
        before_finish = self._before_finish
        if before_finish is not None and before_finish.belongs_to(trainer.optimizers):
            with before_finish.restored():
                if "optimizer_states" in checkpoint:
                    checkpoint["optimizer_states"] = [
                        _cloned(strategy.optimizer_state(optimizer))
                        for optimizer in trainer.optimizers
                    ]
                return _detached_copy(strategy.lightning_module_state_dict())
        if self._slow_weights_stack is None:
            # These tensors may share storage with the parameters; they are read only after
            # the fast weights are back.
            return checkpoint["state_dict"]
        # Saved from inside validation: the model holds the slow weights.
        self._restore_fast_weights()
        fast_state = _detached_copy(strategy.lightning_module_state_dict())
        self._swap_in_slow_weights(trainer)
        return fast_state

    @override
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Called when saving a checkpoint.

        Puts the slow weights in ``state_dict`` and the fast weights beside them.
        """
        optimizers = _lookahead_optimizers(trainer.optimizers)
        if not optimizers:
            return
        fast_state = self._fast_state(trainer, checkpoint)
        with contextlib.ExitStack() as stack:
            _enter_slow_weights(stack, optimizers)
            checkpoint["state_dict"] = _detached_copy(
                trainer.strategy.lightning_module_state_dict()
            )
        if _holds_dtensors(fast_state):
            # A distributed checkpoint (FSDP2 under ModelParallelStrategy): the strategy writes
            # "state_dict" and "optimizer_states" shard by shard, but the rest of the dict to
            # one file from rank 0, which would keep only rank 0's shards. So the fast weights
            # go in the first optimizer's entry; the strategy loads only the keys an optimizer
            # has, and `on_load_checkpoint` reads them back. A checkpoint without optimizer
            # states cannot resume training and needs no fast weights.
            optimizer_states = checkpoint.get("optimizer_states")
            if optimizer_states:
                optimizer_states[0][FAST_STATE_KEY] = fast_state
        else:
            checkpoint[FAST_STATE_KEY] = fast_state

    @override
    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Called when loading a checkpoint.

        When ``fit`` resumes, loads the fast weights into the model (``state_dict`` has the
        slow ones); ``validate``, ``test`` and ``predict`` keep the slow weights.
        """
        if not _is_fitting(trainer):
            return
        fast_state = _saved_fast_state(trainer, checkpoint)
        if fast_state is None:
            if trainer.is_global_zero:
                warnings.warn(
                    "LookaheadCallback: the checkpoint has no Lookahead fast weights (it was "
                    "not saved with LookaheadCallback), so training resumes from its "
                    "state_dict as the fast weights.",
                    stacklevel=2,
                )
            return
        strategy = trainer.strategy
        if _holds_dtensors(dict(strategy.model.named_parameters())):
            # FSDP2: ModelParallelStrategy loads the model in `load_checkpoint`, and its
            # `load_model_state_dict` does nothing.
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            full = not _holds_dtensors(fast_state)  # from a single-file checkpoint
            options = StateDictOptions(full_state_dict=full, strict=True)
            set_model_state_dict(strategy.model, dict(fast_state), options=options)
        else:
            strategy.load_model_state_dict({"state_dict": fast_state})
