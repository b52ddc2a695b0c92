"""fastai adapter: `Learner(dls, model, opt_func=ranger)` and slow-weight evaluation.

Change one import to switch from fastai's built-in Ranger::

    from functools import partial
    from ranger_plugins.fastai import LookaheadCallback, ranger

    learn = Learner(dls, model, opt_func=ranger)                      # fastai's defaults
    learn = Learner(dls, model, opt_func=partial(ranger, gc=True))    # + Gradient Centralization
    learn = Learner(dls, model, opt_func=ranger, cbs=LookaheadCallback())  # validate on slow weights

`ranger` builds the core `ranger_plugins.Ranger` (a real `torch.optim.Optimizer`) and wraps
it in `RangerOptimWrapper`, a subclass of fastai's own `OptimWrapper`, so fastai's schedulers
(`fit_one_cycle`, `fit_flat_cos`, `lr_find`), discriminative learning rates, freezing,
`save`/`load` and `export` drive it through fastai's ordinary mechanisms.

Validation runs on the *fast* weights (as with fastai's own `ranger`) unless
`LookaheadCallback` is added to the Learner; it is not added automatically, because an
`opt_func` cannot add callbacks to the Learner that calls it. ``LookaheadEvalCallback`` is
its old name, kept as a deprecated alias.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

try:
    from fastai.callback.core import Callback
    from fastai.optimizer import OptimWrapper, detuplify_pg, set_item_pg
except ModuleNotFoundError as error:  # a core-only install
    raise ImportError(
        f"ranger_plugins.fastai needs fastai ({error}): pip install '.[fastai]' from a clone"
    ) from error

from .lookahead import LookaheadControls, check_weights_after_fit
from .ranger import Ranger, check_hyperparameters

__all__ = [
    "BEFORE_FINISH_KEY",
    "RANGER_HP_MAP",
    "LookaheadCallback",
    "RangerOptimWrapper",
    "ranger",
]

# torch param-group key -> fastai hyperparameter name. fastai's `pytorch_hp_map` also maps
# 'alpha' to 'sqr_mom' (RMSprop's alpha); the core stores Lookahead's alpha as
# `lookahead_alpha`, and here it is exposed to fastai as 'alpha', distinct from 'sqr_mom'
# (betas[1]), so scheduling one never touches the other.
RANGER_HP_MAP = {
    "betas__0": "mom",
    "betas__1": "sqr_mom",
    "weight_decay": "wd",
    "lookahead_k": "k",
    "lookahead_alpha": "alpha",
    "use_gc": "gc",
}

#: Key, in a `RangerOptimWrapper` state dict saved after ``fit``, of the training state that
#: the end-of-fit weights replaced (see `LookaheadCallback`).
BEFORE_FINISH_KEY = "lookahead_before_finish"

# The attribute of `learn.opt` that holds that state between fits.
_BEFORE_FINISH_ATTR = "_lookahead_before_finish"


def ranger(
    params: Iterable,
    lr: float | slice = 1e-3,
    mom: float = 0.95,
    sqr_mom: float = 0.99,
    eps: float = 1e-6,
    wd: float = 0.01,
    k: int = 6,
    alpha: float = 0.5,
    gc: bool = False,
    gc_conv_only: bool = False,
    rectify_threshold: float = 5.0,
    *,
    foreach: bool | None = None,
    fused: bool = False,
) -> RangerOptimWrapper:
    """Ranger as a fastai `opt_func`: ``Learner(dls, model, opt_func=ranger)``.

    Same names and defaults as ``fastai.optimizer.ranger`` (Lookahead over RAdam with true
    weight decay), computed by the core `ranger_plugins.Ranger` (multi-tensor, closure
    support, exact ``state_dict`` round trip).

    Args:
        params: what the Learner's splitter returns: a list of parameters, a list of
            parameter lists (one per layer group, for discriminative lrs and freezing), or
            a list of dicts with ``params``.
        lr: learning rate (a ``slice`` spreads it over the layer groups, as in fastai).
        mom: beta1, the gradient moving-average coefficient (fastai's ``mom``, scheduled by
            ``fit_one_cycle``).
        sqr_mom: beta2, the squared-gradient moving-average coefficient.
        eps: added to ``sqrt(v)`` in the denominator. fastai's Ranger adds it to
            ``sqrt(v / (1 - sqr_mom**t))`` instead, so the two match exactly only as
            eps -> 0. With the default 1e-6 the difference is small: on the test model,
            24 steps, per-batch losses agree to ~5e-7 relative and weights to ~2e-4.
        wd: true (decoupled) weight decay: ``p *= 1 - lr * wd`` before the update. Norm
            layers and biases get none when the Learner has ``wd_bn_bias=False`` (its
            default), as with fastai's own optimizers.
        k: Lookahead sync period, in steps of each parameter.
        alpha: Lookahead slow step (exposed to fastai as the hyperparameter ``alpha``,
            stored by the core as ``lookahead_alpha``; never confused with ``sqr_mom``).
        gc: Gradient Centralization. Off by default only so that training matches fastai's
            ``ranger``; ``opt_func=partial(ranger, gc=True)`` turns it on.
        gc_conv_only: restrict GC to conv weights (more than three dims).
        rectify_threshold: RAdam's rho_t threshold for the adaptive step.
        foreach: force (True) or forbid (False) the multi-tensor implementation.
        fused: the opt-in fused step (see ``ranger_plugins.Ranger``); same results as the
            default path.

    Returns:
        A `RangerOptimWrapper` (a fastai `OptimWrapper`); the core optimizer is its
        ``.opt``.

    Options are bound with `functools.partial`, the way fastai's own optimizers are
    customised (``opt_func=partial(ranger, gc=True, k=5)``); a partial of this module-level
    function pickles, so ``learn.export()`` / ``load_learner()`` work. ``ranger(gc=True)``
    without parameters is not supported.

    Validation uses the fast weights unless you pass ``cbs=LookaheadCallback()`` to the
    Learner, which evaluates on Lookahead's slow weights and leaves the model on the synced
    slow weights at the end of ``fit``.
    """
    groups = _layer_groups(params)
    core_groups = []
    for group in groups:
        # Every layer group becomes two core groups: the params that are decayed, and a
        # twin with weight_decay 0 for those the Learner flags `do_wd=False` (filled later,
        # by `RangerOptimWrapper._apply_wd_flags`, since the Learner sets the flags after
        # the optimizer is built). fastai only ever sees the layer groups.
        core_groups.append(group)
        core_groups.append({**group, "params": [], "weight_decay": 0.0})
    optimizer = Ranger(
        core_groups,
        lr=lr.stop if isinstance(lr, slice) else lr,
        betas=(mom, sqr_mom),
        eps=eps,
        weight_decay=wd,
        k=k,
        alpha=alpha,
        use_gc=gc,
        gc_conv_only=gc_conv_only,
        rectify_threshold=rectify_threshold,
        foreach=foreach,
        fused=fused,
    )
    wrapper = RangerOptimWrapper(optimizer)
    if isinstance(lr, slice):
        wrapper.set_hyper("lr", lr)
    return wrapper


def _layer_groups(params: Iterable) -> list[dict[str, Any]]:
    """Normalize a splitter's output to a list of param-group dicts."""
    params = list(params)
    if not params:
        raise ValueError("ranger got an empty parameter list")
    if isinstance(params[0], dict):
        return [{**group, "params": list(group["params"])} for group in params]
    if isinstance(params[0], torch.Tensor):
        return [{"params": params}]
    return [{"params": list(group)} for group in params]


def _params_of(core: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The core's params in its state dict's order (the indices of ``state_dict()["state"]``)."""
    return [param for group in core.param_groups for param in group["params"]]


class _TrainingStateBeforeFinish:
    """What ``finish_training`` overwrote, per param with slow weights: its fast weights and,
    for ``"synced"`` (which moves them too), its slow weights. `restore` puts them back."""

    def __init__(self, entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]):
        self.entries = entries  # (param, fast weights, slow weights or None)

    @classmethod
    @torch.no_grad()
    def take(cls, core: Any, weights_after_fit: str) -> _TrainingStateBeforeFinish | None:
        """The state that ``core.finish_training(weights_after_fit)`` is about to replace."""
        if weights_after_fit == "fast":
            return None  # finish_training changes nothing
        keep_slow = weights_after_fit == "synced"
        entries = []
        for param in _params_of(core):
            slow = core.state.get(param, {}).get("slow_param")
            if slow is not None:
                entries.append(
                    (param, param.detach().clone(), slow.detach().clone() if keep_slow else None)
                )
        return cls(entries) if entries else None

    def still_finished(self, core: Any) -> bool:
        """Whether every param still holds the slow weights the finish left it (nothing
        loaded, reset or trained since)."""
        for param, _, _ in self.entries:
            slow = core.state.get(param, {}).get("slow_param")
            if slow is None or not torch.equal(param, slow.to(param.dtype)):
                return False
        return True

    @torch.no_grad()
    def restore(self, core: Any) -> None:
        for param, fast, slow in self.entries:
            param.copy_(fast)
            if slow is not None:
                core.state[param]["slow_param"].copy_(slow)

    def to_state(self, params: list[torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
        """Tensors keyed by the params' indices in ``params`` (plain data for ``torch.save``)."""
        index = {id(param): i for i, param in enumerate(params)}
        return {
            "fast": {index[id(param)]: fast for param, fast, _ in self.entries},
            "slow_param": {index[id(p)]: slow for p, _, slow in self.entries if slow is not None},
        }

    @classmethod
    def from_state(cls, saved: Any, params: list[torch.Tensor]) -> _TrainingStateBeforeFinish:
        """The inverse of `to_state`; a ``ValueError`` unless ``saved`` fits ``params``."""
        fast = saved.get("fast") if isinstance(saved, dict) else None
        slow = saved.get("slow_param") if isinstance(saved, dict) else None
        if not (isinstance(fast, dict) and isinstance(slow, dict) and slow.keys() <= fast.keys()):
            raise ValueError(f"{BEFORE_FINISH_KEY!r} needs dicts 'fast' and 'slow_param'")
        entries = []
        for index, fast_weights in fast.items():
            param = _param_fitting(params, index, fast_weights, slow.get(index, fast_weights))
            slow_weights = slow.get(index)
            entries.append(
                (
                    param,
                    fast_weights.to(param.device, param.dtype),
                    None if slow_weights is None else slow_weights.to(param.device),
                )
            )
        return cls(entries)


def _param_fitting(params: list[torch.Tensor], index: Any, *saved: Any) -> torch.Tensor:
    """``params[index]``, if it exists and every saved tensor has its shape."""
    param = params[index] if isinstance(index, int) and 0 <= index < len(params) else None
    if param is None or not all(
        isinstance(tensor, torch.Tensor) and tensor.shape == param.shape for tensor in saved
    ):
        raise ValueError(
            f"{BEFORE_FINISH_KEY!r}: entry {index!r} does not fit a parameter of this optimizer"
        )
    return param


class RangerOptimWrapper(OptimWrapper):
    """fastai's `OptimWrapper` around the core `Ranger`, with per-parameter weight decay.

    fastai sees one group per layer group of the splitter (so ``slice`` lrs, ``freeze_to``
    and schedulers count them as usual) and the hyperparameter names of ``RANGER_HP_MAP``
    (lr, mom, sqr_mom, eps, wd, k, alpha, gc, ...). Underneath, each layer group is a pair
    of core groups: one decayed, one with ``weight_decay=0`` holding the params the Learner
    flagged ``do_wd=False`` in ``opt.state`` (norm layers and biases when
    ``wd_bn_bias=False``). fastai's plain `OptimWrapper` ignores those flags.

    ``clear_state()`` (called by ``Learner.freeze_to``) empties the core's state in place:
    moments, step counts and Lookahead slow weights restart, as with fastai's own Ranger.

    After a ``fit`` with `LookaheadCallback`, ``state_dict()`` also holds (under
    `BEFORE_FINISH_KEY`) the fast and slow weights from before the end-of-fit weights, so a
    Learner saved with ``save(with_opt=True)`` and loaded again trains on as the saved one
    would have.
    """

    def __init__(self, opt: Ranger) -> None:
        if not isinstance(opt, Ranger) or len(opt.param_groups) % 2:
            raise TypeError(
                "RangerOptimWrapper wraps a core Ranger built with paired groups (decayed, "
                "no decay) per layer group; build it with `ranger_plugins.fastai.ranger()`"
            )
        super().__init__(opt=opt, hp_map=RANGER_HP_MAP)
        self._lookahead_before_finish: _TrainingStateBeforeFinish | None = None
        # The layer groups in the splitter's order; the core pairs are derived from them.
        self._layer_params = [
            list(decayed["params"]) + list(exempt["params"]) for decayed, exempt in self._pairs()
        ]

    def _pairs(self) -> list[tuple[dict, dict]]:
        groups = self.opt.param_groups
        return [(groups[i], groups[i + 1]) for i in range(0, len(groups), 2)]

    def _apply_wd_flags(self) -> None:
        """Put each param in the decayed or the no-decay twin group, per its `do_wd` flag.

        Deterministic (splitter order, stable partition), so a state dict saved by one
        Learner loads into another with the same flags.
        """
        for params, (decayed, exempt) in zip(self._layer_params, self._pairs()):
            flags = [self.state[p].get("do_wd", True) if p in self.state else True for p in params]
            wanted_decayed = [p for p, flag in zip(params, flags) if flag]
            if len(wanted_decayed) == len(decayed["params"]) and all(
                a is b for a, b in zip(wanted_decayed, decayed["params"])
            ):
                continue
            decayed["params"] = wanted_decayed
            exempt["params"] = [p for p, flag in zip(params, flags) if not flag]

    @property
    def param_lists(self) -> list[list[torch.Tensor]]:
        """The parameters of each layer group, in the splitter's order."""
        return [list(params) for params in self._layer_params]

    @param_lists.setter
    def param_lists(self, value: Any) -> None:
        raise AttributeError("RangerOptimWrapper's layer groups are fixed at construction")

    @property
    def hypers(self) -> list[dict[str, Any]]:
        """fastai-named hyperparameters of each layer group (wd is the decayed group's)."""
        return [
            {self.fwd_map.get(key, key): value for key, value in detuplify_pg(decayed).items()}
            for decayed, _ in self._pairs()
        ]

    def _set_hyper(self, key: str, values: list) -> None:
        if key not in self.bwd_map:
            raise KeyError(f"unknown hyperparameter {key!r}; known: {sorted(self.bwd_map)}")
        torch_key = self.bwd_map[key]
        # Plain Python numbers, so checkpoints stay loadable with weights_only=True
        # (fastai's schedulers hand out numpy scalars).
        values = [value.item() if hasattr(value, "item") else value for value in values]
        name = torch_key.split("__")[0]  # "betas__1" sets an item of "betas"
        updated = []
        for (decayed, exempt), value in zip(self._pairs(), values):
            targets = [decayed] if torch_key == "weight_decay" else [decayed, exempt]
            for group in targets:
                new_group = set_item_pg(dict(group), torch_key, value)
                check_hyperparameters(new_group)  # all checked before anything changes
                updated.append((group, new_group))
        for group, new_group in updated:
            group[name] = new_group[name]

    def freeze_to(self, n: int) -> None:
        """Freeze the layer groups before `n` (fastai's semantics), and drop their gradients.

        fastai only flips ``requires_grad``; a gradient left over from a step that was
        cancelled before ``zero_grad`` would then be applied again at every step. Dropping
        it makes frozen params truly still (and, skipped by the core, free of Lookahead
        syncs).
        """
        super().freeze_to(n)
        for params in self._layer_params:
            for param in params:
                if not param.requires_grad:
                    param.grad = None

    def clear_state(self) -> None:
        """Forget moments, step counts and slow weights (in place; flags stay)."""
        self.opt.state.clear()
        self._lookahead_before_finish = None

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One core `Ranger` step (the closure, if given, is evaluated by the core)."""
        self._apply_wd_flags()
        return self.opt.step(closure)

    def state_dict(self) -> dict[str, Any]:
        """The core optimizer's state dict (tensors and plain Python values only), and the
        training state from before the end of the last ``fit`` if it is kept."""
        self._apply_wd_flags()
        state_dict = self.opt.state_dict()
        before_finish = self._lookahead_before_finish
        if before_finish is not None:
            state_dict[BEFORE_FINISH_KEY] = before_finish.to_state(_params_of(self.opt))
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from `state_dict()`; a mismatched one raises, changing nothing."""
        self._apply_wd_flags()
        saved = state_dict.get(BEFORE_FINISH_KEY)
        before_finish = (
            None
            if saved is None
            else _TrainingStateBeforeFinish.from_state(saved, _params_of(self.opt))
        )
        self.opt.load_state_dict({k: v for k, v in state_dict.items() if k != BEFORE_FINISH_KEY})
        self._lookahead_before_finish = before_finish

    def sync_lookahead(self) -> None:
        """Force a Lookahead sync now (see `Ranger.sync_lookahead`)."""
        self.opt.sync_lookahead()

    def slow_weights(self) -> contextlib.AbstractContextManager[None]:
        """Context manager with the slow weights in the model (see `Ranger.slow_weights`)."""
        return self.opt.slow_weights()


def _lookahead_optimizer(learn: Any) -> LookaheadControls | None:
    """The core optimizer behind `learn.opt` (an `OptimWrapper`), if it has Lookahead."""
    core = getattr(getattr(learn, "opt", None), "opt", None)
    return core if isinstance(core, LookaheadControls) else None


class LookaheadCallback(Callback):
    """Validate on Lookahead's slow weights; end ``fit`` on the synced slow weights.

    Add it to a Learner that uses `ranger` (or any `OptimWrapper` around a core `Ranger`
    or `Lookahead`; it reaches the core optimizer as ``learn.opt.opt``)::

        learn = Learner(dls, model, opt_func=ranger, cbs=LookaheadCallback())

    * ``before_validate``: the slow weights go into the model, so the validation loss and
      metrics, ``learn.validate()``, ``get_preds()`` and ``predict()`` all use them.
    * Inside ``fit`` the slow weights stay in the model until the next training phase
      starts (``before_train``) or the fit ends, so trackers acting at ``after_epoch``
      (``SaveModelCallback``, ``EarlyStopping``) save and judge the weights the metrics
      describe. Outside ``fit`` they leave at ``after_validate``. The fast weights are
      restored from an exact backup, so training is bitwise the same with or without
      validation.
    * ``after_fit``: if the optimizer stepped during this fit, the model is left holding
      ``weights_after_fit``: ``"synced"`` (default: `sync_lookahead()`, so the model holds
      ``slow + alpha * (fast - slow)``, the weights to export), ``"slow"`` (exactly what the
      last validation saw) or ``"fast"``. The same choice as the Lightning
      ``LookaheadCallback``. Skipped under ``lr_find`` (which restores the model anyway).
    * The end-of-fit weights are for evaluation and export, not a training step: the fast
      and slow weights they replaced are kept beside the optimizer (in its state dict with
      `ranger`, so ``save(with_opt=True)``/``load`` and ``export`` carry them), and the next
      ``fit`` (``before_fit``) trains on from them, so ``fit(1); fit(1)`` trains like
      ``fit(2)``. Unless the model or the optimizer state changed in between (``load`` of
      other weights, ``freeze``/``unfreeze``, which reset the state): then it trains on from
      what the model holds. The kept copy (the fast weights and, for ``"synced"``, the slow
      weights) lives until the next ``fit``; ``"fast"`` changes nothing and keeps nothing.

    Params that have not stepped yet have no slow weights and are evaluated as they are.
    The order (55) puts ``after_fit`` before the trackers' (60), so ``SaveModelCallback``
    reloading its best model comes after the sync and is not overwritten by it.
    """

    order = 55
    _stateattrs = ("_swap",)

    def __init__(self, weights_after_fit: Literal["synced", "slow", "fast"] = "synced") -> None:
        check_weights_after_fit(weights_after_fit)
        self.weights_after_fit = weights_after_fit
        self._stepped = False
        self._in_training_epoch = False
        self._swap: contextlib.ExitStack | None = None

    def before_fit(self) -> None:
        """Undo a swap left over from an interrupted run; train on from the state the last
        end of fit replaced."""
        self._restore_fast_weights()
        # A fit that goes on from the state before the last finish ends with a finish too.
        self._stepped = self._resume_training()

    def before_train(self) -> None:
        """Put the fast weights back for training."""
        self._restore_fast_weights()
        self._in_training_epoch = True

    def after_step(self) -> None:
        """Remember that this fit changed the weights."""
        self._stepped = True

    def before_validate(self) -> None:
        """Put the slow weights into the model."""
        core = _lookahead_optimizer(self.learn)
        if core is None or self._swap is not None or not core.has_slow_weights:
            return
        swap = contextlib.ExitStack()
        swap.enter_context(core.slow_weights())
        self._swap = swap

    def after_validate(self) -> None:
        """Outside a training epoch (``validate``, ``get_preds``), restore the fast weights."""
        if not self._in_training_epoch:
            self._restore_fast_weights()

    def after_epoch(self) -> None:
        """The epoch is over (the swap, if any, lasts until ``before_train``)."""
        self._in_training_epoch = False

    def after_fit(self) -> None:
        """Restore the fast weights, then sync (unless told otherwise), keeping what the sync
        replaces for the next ``fit``."""
        self._restore_fast_weights()
        self._in_training_epoch = False
        core = _lookahead_optimizer(self.learn)
        stepped, self._stepped = self._stepped, False
        if not stepped or core is None or hasattr(self.learn, "lr_finder"):
            return
        before_finish = _TrainingStateBeforeFinish.take(core, self.weights_after_fit)
        core.finish_training(self.weights_after_fit)
        setattr(self.learn.opt, _BEFORE_FINISH_ATTR, before_finish)

    def _resume_training(self) -> bool:
        """Put back the state the last end of fit replaced, if the model and the optimizer
        still hold what it left; whether it did."""
        core = _lookahead_optimizer(self.learn)
        if core is None or hasattr(self.learn, "lr_finder"):
            return False  # lr_find saves and restores the Learner, kept state included
        before_finish = getattr(self.learn.opt, _BEFORE_FINISH_ATTR, None)
        setattr(self.learn.opt, _BEFORE_FINISH_ATTR, None)
        if before_finish is None or not before_finish.still_finished(core):
            return False
        before_finish.restore(core)
        return True

    def _restore_fast_weights(self) -> None:
        swap, self._swap = self._swap, None
        if swap is not None:
            swap.close()

    def _init_state(self) -> None:
        # fastcore's `Stateful`: pickling (`learn.export()`) leaves out `_stateattrs`, and
        # unpickling calls this.
        self._swap = None


def __getattr__(name: str) -> Any:
    # The deprecated name of `LookaheadCallback`, which the Lightning callback shares.
    if name == "LookaheadEvalCallback":
        warnings.warn(
            "ranger_plugins.fastai.LookaheadEvalCallback is now LookaheadCallback (the name of "
            "the Lightning callback too); the old name will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return LookaheadCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
