"""fastai adapter: the Ranger family as fastai `opt_func`s, and slow-weight evaluation.

Change one import to switch from fastai's built-in Ranger::

    from functools import partial
    from ranger_plugins.fastai import LookaheadCallback, ranger

    learn = Learner(dls, model, opt_func=ranger)                      # fastai's defaults
    learn = Learner(dls, model, opt_func=partial(ranger, gc=True))    # + Gradient Centralization
    learn = Learner(dls, model, opt_func=ranger, cbs=LookaheadCallback())  # validate on slow weights

Each variant has its own `opt_func`, named after it as fastai names its own (``Adam``,
``QHAdam``, ``ranger``): `ranger`, `ranger_qh`, `ranger_va`, `ranger21` and `ranger_lars`,
each with fastai's hyperparameter names where the variant has the hyperparameter (``mom``,
``sqr_mom``, ``eps``, ``wd``, ``k``, ``alpha``, ``gc``; ``nu_1``/``nu_2`` and
``decouple_wd`` as in fastai's ``QHAdam``) and the variant's other options as keyword
arguments. `opt_func_for` (or `OPT_FUNCS`) gives the one registered under a name of
`ranger_plugins.family.OPTIMIZERS`::

    learn = Learner(dls, model, opt_func=partial(ranger_qh, nu_1=0.8))
    learn = Learner(dls, model, opt_func=opt_func_for("ranger_lars"))

Each builds the core optimizer (a real `torch.optim.Optimizer`) and wraps it in
`RangerOptimWrapper`, a subclass of fastai's own `OptimWrapper`, so fastai's schedulers
(`fit_one_cycle`, `fit_flat_cos`, `lr_find`), discriminative learning rates, freezing,
`save`/`load` and `export` drive it through fastai's ordinary mechanisms. `ranger21` turns
Ranger21's own warmup and warmdown off, so that fastai's schedulers alone set the lr.

Validation runs on the *fast* weights (as with fastai's own `ranger`) unless
`LookaheadCallback` is added to the Learner; it is not added automatically, because an
`opt_func` cannot add callbacks to the Learner that calls it. ``LookaheadEvalCallback`` is
its old name, kept as a deprecated alias.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

try:
    from fastai.callback.core import Callback
    from fastai.optimizer import OptimWrapper, detuplify_pg, set_item_pg
except ModuleNotFoundError as error:  # a core-only install
    raise ImportError(
        f"ranger_plugins.fastai needs fastai ({error}): pip install '.[fastai]' from a clone"
    ) from error

from ._base import LookaheadOptimizer
from .family import OPTIMIZERS, optimizer_class
from .lookahead import (
    LookaheadControls,
    check_weights_after_fit,
    slow_weights_key,
    slow_weights_of,
    sync_one_,
)
from .ranger import Ranger
from .ranger21 import Ranger21
from .ranger_lars import RangerLars
from .ranger_qh import RangerQH
from .ranger_va import RangerVA

__all__ = [
    "BEFORE_FINISH_KEY",
    "OPT_FUNCS",
    "RANGER_HP_MAP",
    "LookaheadCallback",
    "RangerOptimWrapper",
    "opt_func_for",
    "ranger",
    "ranger21",
    "ranger_lars",
    "ranger_qh",
    "ranger_va",
]

# torch param-group key -> fastai hyperparameter name, for every optimizer of the family (a
# key that a variant's groups lack is not used for it; the variant's other group keys keep
# their own names). fastai's `pytorch_hp_map` also maps 'alpha' to 'sqr_mom' (RMSprop's
# alpha); the core stores Lookahead's alpha as `lookahead_alpha`, and here it is exposed to
# fastai as 'alpha', distinct from 'sqr_mom' (betas[1]), so scheduling one never touches the
# other. RangerQH's nus and weight decay mode get fastai's `QHAdam` names.
RANGER_HP_MAP = {
    "betas__0": "mom",
    "betas__1": "sqr_mom",
    "weight_decay": "wd",
    "lookahead_k": "k",
    "lookahead_alpha": "alpha",
    "use_gc": "gc",
    "nus__0": "nu_1",
    "nus__1": "nu_2",
    "decouple_weight_decay": "decouple_wd",
}

# The core's keyword arguments that the opt_funcs take under fastai's names.
_FASTAI_NAMES = {
    "betas": "mom and sqr_mom",
    "weight_decay": "wd",
    "use_gc": "gc",
    "nus": "nu_1 and nu_2",
    "decouple_weight_decay": "decouple_wd",
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
    state_precision: str = "full",
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
            ``sqrt(v / (1 - sqr_mom**t))`` instead (eps scaled by ``sqrt(1 - sqr_mom**t)``),
            so the two match exactly only as eps -> 0 (README, Caveats).
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
        state_precision: how the optimizer state is stored: ``"full"`` (default),
            ``"delta"``, ``"16bit"`` or ``"8bit"`` (``opt_func=partial(ranger,
            state_precision="8bit")``: about 4 bytes of state per param instead of 12; see
            ``ranger_plugins._low_memory``). Ranger's own option: the variants' opt_funcs do
            not take it.

    Returns:
        A `RangerOptimWrapper` (a fastai `OptimWrapper`); the core optimizer is its
        ``.opt``.

    Options are bound with `functools.partial`, the way fastai's own optimizers are
    customised (``opt_func=partial(ranger, gc=True, k=5)``); a partial of this module-level
    function pickles, so ``learn.export()`` / ``load_learner()`` work. ``ranger(gc=True)``
    without parameters is not supported.

    The variants have opt_funcs of the same shape (`ranger_qh`, `ranger_va`, `ranger21`,
    `ranger_lars`; `opt_func_for` picks one by name), each with its own defaults.

    Validation uses the fast weights unless you pass ``cbs=LookaheadCallback()`` to the
    Learner, which evaluates on Lookahead's slow weights and leaves the model on the synced
    slow weights at the end of ``fit``.
    """
    return _opt_func(
        Ranger,
        params,
        lr,
        _fastai_hypers(mom, sqr_mom, eps, wd, k, alpha, gc),
        dict(
            gc_conv_only=gc_conv_only,
            rectify_threshold=rectify_threshold,
            foreach=foreach,
            fused=fused,
            state_precision=state_precision,
        ),
    )


def ranger_qh(
    params: Iterable,
    lr: float | slice = 1e-3,
    mom: float = 0.9,
    sqr_mom: float = 0.999,
    nu_1: float = 0.7,
    nu_2: float = 1.0,
    eps: float = 1e-8,
    wd: float = 0.0,
    k: int = 6,
    alpha: float = 0.5,
    gc: bool = False,
    decouple_wd: bool = True,
    **options: Any,
) -> RangerOptimWrapper:
    """`ranger_plugins.RangerQH` (QHAdam + Lookahead) as a fastai `opt_func`.

    The variant's defaults, under fastai's names (``mom``/``sqr_mom`` = betas, ``nu_1``/
    ``nu_2`` = nus, as in fastai's ``QHAdam``; ``k``, ``alpha``, ``gc`` as in `ranger`),
    except ``decouple_wd=True``: fastai's ``wd`` is true weight decay (its ``QHAdam``
    defaults to it too), where the class and the original default to L2
    (``decouple_wd=False`` gives that). ``options`` go to the class (``gc_conv_only``,
    ``foreach``). See `ranger` for ``params``, ``lr`` and the result.
    """
    hypers = _fastai_hypers(mom, sqr_mom, eps, wd, k, alpha, gc)
    hypers.update(nus=(nu_1, nu_2), decouple_weight_decay=decouple_wd)
    return _opt_func(RangerQH, params, lr, hypers, options)


def ranger_va(
    params: Iterable,
    lr: float | slice = 1e-3,
    mom: float = 0.95,
    sqr_mom: float = 0.999,
    eps: float = 1e-5,
    wd: float = 0.0,
    k: int = 6,
    alpha: float = 0.5,
    gc: bool = False,
    **options: Any,
) -> RangerOptimWrapper:
    """`ranger_plugins.RangerVA` (softplus-calibrated Adam + Lookahead) as a fastai
    `opt_func`, with the variant's defaults under fastai's names (``wd`` is its decoupled
    weight decay). ``options`` go to the class (``amsgrad``, ``transformer``, ``smooth``,
    ``grad_transformer``, ``gc_conv_only``, ``foreach``). See `ranger` for ``params``,
    ``lr`` and the result.
    """
    hypers = _fastai_hypers(mom, sqr_mom, eps, wd, k, alpha, gc)
    return _opt_func(RangerVA, params, lr, hypers, options)


def ranger21(
    params: Iterable,
    lr: float | slice = 1e-3,
    mom: float = 0.9,
    sqr_mom: float = 0.999,
    eps: float = 1e-8,
    wd: float = 1e-4,
    k: int = 5,
    alpha: float = 0.5,
    gc: bool = True,
    use_warmup: bool = False,
    warmdown_active: bool = False,
    **options: Any,
) -> RangerOptimWrapper:
    """`ranger_plugins.Ranger21` as a fastai `opt_func`, with the variant's defaults under
    fastai's names (``wd`` is its stable, decoupled weight decay; ``mom`` is beta1, whose
    square decays the momentum), except for its schedule.

    Ranger21's own linear warmup and warmdown are **off** (``use_warmup=False,
    warmdown_active=False``): fastai's schedulers (``fit_one_cycle``, ``fit_flat_cos``)
    already warm up and anneal, and with both off every step uses exactly the lr the
    scheduler set. To combine them anyway, pass them on with the run's length, e.g.
    ``partial(ranger21, use_warmup=True, warmdown_active=True, num_iterations=n_steps)``;
    the two then compose as `ranger_plugins.ranger21.Ranger21Schedule` describes (the
    warmups multiply, and the warmdown goes from fastai's lr to ``warmdown_min_lr``).

    ``options`` go to the class (``num_iterations``, ``num_warmup_iterations``,
    ``normalize_gradients``, ``use_agc``, ``norm_loss_factor``, ``pnm_momentum_factor``,
    ``use_softplus``, ``gc_conv_only``, ``foreach``, ...). See `ranger` for ``params``,
    ``lr`` and the result.
    """
    hypers = _fastai_hypers(mom, sqr_mom, eps, wd, k, alpha, gc)
    hypers.update(use_warmup=use_warmup, warmdown_active=warmdown_active)
    return _opt_func(Ranger21, params, lr, hypers, options)


def ranger_lars(
    params: Iterable,
    lr: float | slice = 1e-3,
    mom: float = 0.9,
    sqr_mom: float = 0.999,
    eps: float = 1e-8,
    wd: float = 0.0,
    k: int = 6,
    alpha: float = 0.5,
    gc: bool = False,
    **options: Any,
) -> RangerOptimWrapper:
    """`ranger_plugins.RangerLars` ("Over9000": RAdam + LARS trust ratio + Lookahead) as a
    fastai `opt_func`, with the variant's defaults under fastai's names (``wd`` is its
    decoupled weight decay). ``options`` go to the class (``gc_conv_only``, ``foreach``).
    See `ranger` for ``params``, ``lr`` and the result.
    """
    hypers = _fastai_hypers(mom, sqr_mom, eps, wd, k, alpha, gc)
    return _opt_func(RangerLars, params, lr, hypers, options)


#: The opt_func of each optimizer of `ranger_plugins.family.OPTIMIZERS`, by the same name.
OPT_FUNCS: dict[str, Callable[..., RangerOptimWrapper]] = {
    "ranger": ranger,
    "ranger_qh": ranger_qh,
    "ranger_va": ranger_va,
    "ranger21": ranger21,
    "ranger_lars": ranger_lars,
}


def opt_func_for(name: str | type[LookaheadOptimizer]) -> Callable[..., RangerOptimWrapper]:
    """The opt_func of the optimizer registered as ``name`` (or of that class):
    ``Learner(dls, model, opt_func=opt_func_for("ranger_qh"))``. Bind options with
    ``functools.partial`` as usual; a ``ValueError`` names the known optimizers."""
    cls = optimizer_class(name)
    for key, registered in OPTIMIZERS.items():
        if registered is cls:
            return OPT_FUNCS[key]
    raise ValueError(f"no fastai opt_func for {cls.__name__} (known: {', '.join(OPT_FUNCS)})")


def _fastai_hypers(
    mom: float, sqr_mom: float, eps: float, wd: float, k: int, alpha: float, gc: bool
) -> dict[str, Any]:
    """The core's keyword arguments for fastai's hyperparameter names."""
    return dict(betas=(mom, sqr_mom), eps=eps, weight_decay=wd, k=k, alpha=alpha, use_gc=gc)


def _opt_func(
    cls: Callable[..., LookaheadOptimizer],
    params: Iterable,
    lr: float | slice,
    hypers: dict[str, Any],
    options: dict[str, Any],
) -> RangerOptimWrapper:
    """What every opt_func does: ``cls`` over the layer groups, wrapped for fastai."""
    taken = [name for name in options if name in _FASTAI_NAMES]
    if taken:
        raise TypeError(
            f"{taken[0]!r} is set through fastai's name here: pass {_FASTAI_NAMES[taken[0]]}"
        )
    core_groups = []
    for group in _layer_groups(params):
        # Every layer group becomes two core groups: the params that are decayed, and a
        # twin with weight_decay 0 for those the Learner flags `do_wd=False` (filled later,
        # by `RangerOptimWrapper._apply_wd_flags`, since the Learner sets the flags after
        # the optimizer is built). fastai only ever sees the layer groups.
        core_groups.append(group)
        core_groups.append({**group, "params": [], "weight_decay": 0.0})
    optimizer = cls(core_groups, lr=lr.stop if isinstance(lr, slice) else lr, **hypers, **options)
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


@dataclass
class _Kept:
    """One param's training state from before the finish."""

    param: torch.Tensor
    fast: torch.Tensor  # its fast weights
    key: str  # the form its slow weights had (`slow_weights_key`)
    slow: torch.Tensor | None  # the tensor under `key`, where the finish changed it
    alpha: float | None  # the alpha a "synced" finish of a "slow_delta" used

    def finished_weights(self) -> torch.Tensor | None:
        """In the ``slow_delta`` form, what the finish left in the param, done again from
        what it was given (the slow weights no longer tell: after a finish they are the
        fast weights, whatever the model holds); None in the ``slow_param`` form."""
        if self.key != "slow_delta" or self.slow is None:
            return None
        weights = self.fast.clone()
        if self.alpha is None:  # "slow": `load_slow_weights`
            weights.copy_(slow_weights_of(weights, {"slow_delta": self.slow}))
        else:  # "synced": `sync_lookahead`
            sync_one_(weights, {"slow_delta": self.slow.clone()}, self.alpha)
        return weights

    def slow_weights(self, state: dict) -> torch.Tensor:
        """The slow weights to restore, as values (for a state now in the other form);
        before the param is restored."""
        if self.key == "slow_delta":
            return slow_weights_of(self.fast, {"slow_delta": self.slow})
        if self.slow is not None:
            return self.slow
        return slow_weights_of(self.param, state).clone()  # a "slow" finish left them


def _store_slow_weights(param: torch.Tensor, state: dict, slow: torch.Tensor) -> None:
    """Write the slow weights ``slow`` into ``state`` in its own form (after the param
    holds its fast weights)."""
    key = slow_weights_key(state)
    if key == "slow_param":
        state[key].copy_(slow)
    else:
        state[key].copy_(param.detach().to(slow.dtype) - slow)  # d = fast - slow


def _still_finished(entry: _Kept, state: dict) -> bool:
    param = entry.param
    if slow_weights_key(state) is None:
        return False
    if not torch.equal(param, slow_weights_of(param, state).to(param.dtype)):
        return False
    finished = entry.finished_weights()
    return finished is None or torch.equal(param, finished)


class _TrainingStateBeforeFinish:
    """What ``finish_training`` overwrote, per param with slow weights: its fast weights and
    the state tensor of its slow weights where the finish changed it (``slow_param`` for
    ``"synced"``; ``slow_delta``, which both ``"synced"`` and ``"slow"`` zero). `restore`
    puts them back."""

    def __init__(self, entries: list[_Kept]):
        self.entries = entries

    @classmethod
    @torch.no_grad()
    def take(cls, core: Any, weights_after_fit: str) -> _TrainingStateBeforeFinish | None:
        """The state that ``core.finish_training(weights_after_fit)`` is about to replace."""
        if weights_after_fit == "fast":
            return None  # finish_training changes nothing
        synced = weights_after_fit == "synced"
        entries = []
        for group in core.param_groups:
            for param in group["params"]:
                state = core.state.get(param, {})
                key = slow_weights_key(state)
                if key is None:
                    continue
                delta = key == "slow_delta"
                slow = state[key].detach().clone() if delta or synced else None
                alpha = float(group["lookahead_alpha"]) if delta and synced else None
                entries.append(_Kept(param, param.detach().clone(), key, slow, alpha))
        return cls(entries) if entries else None

    @torch.no_grad()
    def still_finished(self, core: Any) -> bool:
        """Whether every param still holds the weights the finish left it, and they are its
        slow weights (nothing loaded, reset or trained since)."""
        return all(
            _still_finished(entry, core.state.get(entry.param, {})) for entry in self.entries
        )

    @torch.no_grad()
    def restore(self, core: Any) -> None:
        for entry in self.entries:
            state = core.state[entry.param]
            if slow_weights_key(state) == entry.key:
                entry.param.copy_(entry.fast)
                if entry.slow is not None:
                    state[entry.key].copy_(entry.slow)
                continue
            # The state was converted to the other form since (a checkpoint loaded into
            # another `state_precision`): through the slow weights' values.
            slow = entry.slow_weights(state)
            entry.param.copy_(entry.fast)
            _store_slow_weights(entry.param, state, slow)

    def to_state(self, params: list[torch.Tensor]) -> dict[str, dict[int, Any]]:
        """Tensors (and floats) keyed by the params' indices in ``params`` (plain data for
        ``torch.save``, loadable with ``weights_only=True``)."""
        index = {id(param): i for i, param in enumerate(params)}
        saved: dict[str, dict[int, Any]] = {key: {} for key in _SAVED_KEYS}
        for entry in self.entries:
            i = index[id(entry.param)]
            saved["fast"][i] = entry.fast
            if entry.slow is not None:
                saved[entry.key][i] = entry.slow
            if entry.alpha is not None:
                saved["alpha"][i] = entry.alpha
        return saved

    @classmethod
    def from_state(cls, saved: Any, params: list[torch.Tensor]) -> _TrainingStateBeforeFinish:
        """The inverse of `to_state` (also of what versions without ``slow_delta`` wrote); a
        ``ValueError`` unless ``saved`` fits ``params``."""
        fast, slow_param, slow_delta, alpha = _checked_saved_dicts(saved)
        slows = {**slow_param, **slow_delta}
        entries = []
        for index, fast_weights in fast.items():
            key = "slow_delta" if index in slow_delta else "slow_param"
            slow = slows.get(index)
            param = _param_fitting(
                params, index, fast_weights, fast_weights if slow is None else slow
            )
            entries.append(
                _Kept(
                    param,
                    fast_weights.to(param.device, param.dtype),
                    key,
                    None if slow is None else slow.to(param.device),
                    None if index not in alpha else float(alpha[index]),
                )
            )
        return cls(entries)


# The dicts of a saved `_TrainingStateBeforeFinish`: the fast weights, the saved slow-weights
# tensors of each form, the alphas of "synced" finishes in the "slow_delta" form.
_SAVED_KEYS = ("fast", "slow_param", "slow_delta", "alpha")


def _checked_saved_dicts(saved: Any) -> tuple[dict, dict, dict, dict]:
    """The dicts of a saved `_TrainingStateBeforeFinish`, or a ``ValueError``."""
    if not isinstance(saved, dict):
        saved = {}
    fast, slow_param = saved.get("fast"), saved.get("slow_param")
    slow_delta, alpha = saved.get("slow_delta", {}), saved.get("alpha", {})
    dicts = (fast, slow_param, slow_delta, alpha)
    if not (
        all(isinstance(value, dict) for value in dicts)
        and slow_param.keys() <= fast.keys()
        and slow_delta.keys() <= fast.keys()
        and not slow_param.keys() & slow_delta.keys()
        and alpha.keys() <= slow_delta.keys()
        and all(isinstance(value, (int, float)) for value in alpha.values())
    ):
        raise ValueError(
            f"{BEFORE_FINISH_KEY!r} needs dicts 'fast' and 'slow_param' (and optionally "
            "'slow_delta' and 'alpha') of the kept tensors by param index"
        )
    return fast, slow_param, slow_delta, alpha


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
    """fastai's `OptimWrapper` around a core optimizer of the Ranger family (`Ranger` or a
    variant), with per-parameter weight decay.

    fastai sees one group per layer group of the splitter (so ``slice`` lrs, ``freeze_to``
    and schedulers count them as usual) and the hyperparameter names of ``RANGER_HP_MAP``
    for the group keys the core has (lr, mom, sqr_mom, eps, wd, k, alpha, gc; nu_1, nu_2
    and decouple_wd for RangerQH), the core's other group keys under their own names
    (``rectify_threshold``, ``amsgrad``, ``norm_loss_factor``, ...). Every value set is
    checked by the core's own checks before any group changes. Underneath, each layer group is a pair
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

    def __init__(self, opt: LookaheadOptimizer) -> None:
        if not isinstance(opt, LookaheadOptimizer) or len(opt.param_groups) % 2:
            raise TypeError(
                "RangerOptimWrapper wraps a core optimizer of the Ranger family built with "
                "paired groups (decayed, no decay) per layer group; build it with an opt_func "
                "of `ranger_plugins.fastai` (`ranger`, `ranger_qh`, ...)"
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
        check = type(self.opt).check_group
        updated = []
        for (decayed, exempt), value in zip(self._pairs(), values):
            targets = [decayed] if torch_key == "weight_decay" else [decayed, exempt]
            for group in targets:
                new_group = set_item_pg(dict(group), torch_key, value)
                check(new_group)  # all checked before anything changes
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
        """One step of the core optimizer (the closure, if given, is evaluated by it)."""
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
        """Force a Lookahead sync now (see `LookaheadControls.sync_lookahead`)."""
        self.opt.sync_lookahead()

    def slow_weights(self) -> contextlib.AbstractContextManager[None]:
        """Context manager with the slow weights in the model (see
        `LookaheadControls.slow_weights`)."""
        return self.opt.slow_weights()


def _lookahead_optimizer(learn: Any) -> LookaheadControls | None:
    """The core optimizer behind `learn.opt` (an `OptimWrapper`), if it has Lookahead."""
    core = getattr(getattr(learn, "opt", None), "opt", None)
    return core if isinstance(core, LookaheadControls) else None


class LookaheadCallback(Callback):
    """Validate on Lookahead's slow weights; end ``fit`` on the synced slow weights.

    Add it to a Learner that uses `ranger` or a variant's opt_func (`ranger_qh`,
    `ranger_va`, `ranger21`, `ranger_lars`), or any `OptimWrapper` around a core optimizer
    of the family or `Lookahead`; it reaches the core optimizer as ``learn.opt.opt`` and uses
    only the Lookahead controls they all share::

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
      the opt_funcs of this module, so ``save(with_opt=True)``/``load`` and ``export`` carry them), and the next
      ``fit`` (``before_fit``) trains on from them, so ``fit(1); fit(1)`` trains like
      ``fit(2)``. Unless the model or the optimizer state changed in between (``load`` of
      other weights, ``freeze``/``unfreeze``, which reset the state): then it trains on from
      what the model holds. The kept copy (the fast weights and, for ``"synced"``, the slow
      weights; in Ranger's low-memory ``state_precision``, their bf16 difference
      ``slow_delta`` for ``"synced"`` and ``"slow"``) lives until the next ``fit``;
      ``"fast"`` changes nothing and keeps nothing. A Learner saved in one
      ``state_precision`` and loaded into another trains on from the same weights.

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
