"""Ranger21: AdamW with positive-negative momentum, adaptive gradient clipping, Gradient
Centralization, gradient normalization, norm loss, stable weight decay, its own linear warmup
and linear warmdown, and Lookahead, as a `torch.optim.Optimizer`.

The original is Less Wright and Nestor Demeure's lessw2020/Ranger21, ``ranger21/ranger21.py``
(the maths and defaults here are those of commit 1be857f; commit f5422d1 has the same step),
described in Wright and Demeure, "Ranger21: a synergistic deep learning optimizer" (2021).
Its parts: positive-negative momentum (Xie et al. 2021, AdaPNM), adaptive gradient clipping
(Brock et al. 2021), Gradient Centralization (Yong et al. 2020), stable weight decay (Xie et
al., "On the overlooked pitfalls of weight decay", 2020), norm loss (Georgiou et al. 2021),
a softplus on the denominator (Tong et al. 2019), linear warmup (Ma and Yarats 2019) and
Lookahead (Zhang et al. 2019).

Layout follows torch.optim, in two phases because stable weight decay divides by a quantity
taken over every parameter of every group (the original's "phase 1" and "phase 2" loops):

* `Ranger21` (the class: hyperparameters, state keys, checks, and the two-phase `step`; the
  optimizer contract lives in `_base.LookaheadOptimizer`);
* phase 1, `_single_tensor_ranger21_variance` (readable ground truth) and
  `_multi_tensor_ranger21_variance` (``torch._foreach_*``), dispatched by the functional
  `ranger21_variance`: clip, centralize and normalize the gradients, update the second moment
  and return each param's sum of its bias-corrected second moment;
* `stable_decay_normalizer`: the global normalizer from those sums;
* phase 2, `_single_tensor_ranger21` (readable ground truth) and `_multi_tensor_ranger21`
  (``torch._foreach_*``, grouped by device, dtype and step), dispatched by the functional
  `ranger21`: stable weight decay, norm loss, the positive-negative momentum step, Lookahead.

The foreach forms give the same bits as the single-tensor forms: every element goes through
the same operations in the same order, the per-row norms (clipping, norm loss) and the
gradient normalization use the same per-tensor helpers in both, and the global normalizer is
one function of the per-param sums (an exactly rounded sum, so their order does not matter).
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ._base import GroupLists, LookaheadOptimizer, ParamsT
from ._math import centralize_gradient, centralize_gradients
from ._multi_tensor import bucket_indices
from ._state import check_gradients, check_lookahead_args, check_real, step_arguments
from .lookahead import copy_into, lookahead_sync_

__all__ = [
    "Ranger21",
    "Ranger21Schedule",
    "ranger21",
    "ranger21_variance",
    "stable_decay_normalizer",
]

#: Gradient normalization divides by ``std(g) + GRADIENT_NORM_EPS`` (the original's constant).
GRADIENT_NORM_EPS = 1e-8
#: Adaptive gradient clipping divides by the gradient's row norm clamped to at least this.
AGC_GRAD_NORM_MIN = 1e-6
#: The automatic warmup of ceil(2 / (1 - beta2)) steps is used unless it is longer than this
#: fraction of the run; then it is ``warmup_pct_default`` of the run.
MAX_BETA_WARMUP_FRACTION = 0.45

# The group keys `step()` reads, and the flags that groups of older versions may lack
# (`__setstate__` fills those in).
REQUIRED_GROUP_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "lookahead_k",
    "lookahead_alpha",
    "use_gc",
    "gc_conv_only",
    "normalize_gradients",
    "use_agc",
    "agc_clipping_value",
    "agc_eps",
    "pnm_momentum_factor",
    "norm_loss_factor",
    "use_softplus",
    "beta_softplus",
    "num_iterations",
    "use_warmup",
    "num_warmup_iterations",
    "warmup_pct_default",
    "warmdown_active",
    "warmdown_start_pct",
    "warmdown_min_lr",
)
OPTIONAL_GROUP_DEFAULTS: dict[str, Any] = {"foreach": None}

# Real hyperparameters and their ranges (keyword arguments of `check_real`).
_REAL_RANGES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("eps", dict(low=0.0, low_open=True)),
    ("weight_decay", dict(low=0.0)),
    ("pnm_momentum_factor", dict(low=0.0)),
    ("norm_loss_factor", dict(low=0.0)),
    ("agc_clipping_value", dict(low=0.0, low_open=True)),
    ("agc_eps", dict(low=0.0)),
    ("beta_softplus", dict(low=0.0, low_open=True)),
    ("warmup_pct_default", dict(low=0.0, high=1.0)),
    ("warmdown_start_pct", dict(low=0.0, high=1.0)),
    ("warmdown_min_lr", dict(low=0.0)),
)
_FLAGS = (
    "use_gc",
    "gc_conv_only",
    "normalize_gradients",
    "use_agc",
    "use_softplus",
    "use_warmup",
    "warmdown_active",
)


class Ranger21(LookaheadOptimizer):
    r"""Ranger21 (AdamW core): Ranger's successor by the same author.

    Each step has two phases. Phase 1, for every parameter with a gradient in every group,
    with its own step count :math:`t` (from 1):

    .. math::
        g &\leftarrow g \cdot \min\!\Big(1,\ \tfrac{c \,\max(u(\theta), \epsilon_c)}
            {\max(u(g),\, 10^{-6})}\Big)
            \quad\text{(adaptive gradient clipping, per row)} \\
        g &\leftarrow g - \operatorname{mean}_{\dim \ge 1}(g)
            \quad\text{(GC, if } g \text{ has more than one dim)} \\
        g &\leftarrow g / (\operatorname{std}(g) + 10^{-8})
            \quad\text{(gradient normalization, if } g \text{ has more than 2 elements)} \\
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2

    then, over all of them, :math:`\bar\sigma = \sqrt{\sum_i \sum v_i/(1-\beta_2^{t_i})
    \,/\, \sum_i n_i}` (:math:`n_i` elements in parameter :math:`i`). Phase 2, for each of
    them, with the scheduled learning rate :math:`\gamma_t` (see `Ranger21Schedule`):

    .. math::
        \theta &\leftarrow \theta\,(1 - \gamma_t \lambda / \bar\sigma)
            \quad\text{(stable weight decay; skipped if } \bar\sigma = 0) \\
        \theta &\leftarrow \theta\,\big(1 - 2\gamma_t\eta\,(1 - 1/(u(\theta) + \epsilon))\big)
            \quad\text{(norm loss, per row)} \\
        \hat v &\leftarrow \max(\hat v, v), \qquad
        d = \operatorname{softplus}_{\beta_s}\!\big(\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon\big) \\
        (m, n) &= (m_{\text{odd}}, m_{\text{even}}) \text{ if } t \text{ odd, else }
            (m_{\text{even}}, m_{\text{odd}}), \qquad
        m \leftarrow \beta_1^2 m + (1-\beta_1^2)\, g \\
        \theta &\leftarrow \theta - \tfrac{\gamma_t}{1-\beta_1^t}\,
            \tfrac{(1+\beta_0)\, m - \beta_0 n}{\sqrt{(1+\beta_0)^2 + \beta_0^2}} \,/\, d
            \quad\text{(positive-negative momentum)} \\
        \text{if } t \bmod k = 0:&\quad \phi \leftarrow \phi + \alpha(\theta - \phi),
            \quad \theta \leftarrow \phi \quad\text{(Lookahead; } \phi = \theta_0 \text{ at the first step)}

    :math:`u(x)` is the original's "unit norm": the L2 norm of the whole tensor for 0-D and 1-D
    tensors, of each row along dim 1 for 2-D and 3-D tensors, and over dims 1.. for 4-D and
    larger ones. :math:`c` is ``agc_clipping_value``, :math:`\epsilon_c` ``agc_eps``,
    :math:`\eta` ``norm_loss_factor``, :math:`\beta_0` ``pnm_momentum_factor``, :math:`\beta_s`
    ``beta_softplus``. The two momentum buffers alternate: each step updates one of them and
    pushes away from the other.

    Where we differ from the original's code (each a bug there; the peer
    `pytorch_optimizer.Ranger21` fixes the first four the same way):

    * Stable weight decay and norm loss apply to every parameter; the original applies them,
      once per group, to whichever parameter its phase-1 loop ended on.
    * The maximum of the second moments is kept in ``max_variance_ma`` and used in the
      denominator, as the original's comments and AdaPNM say; the original's
      ``torch.max(max_variance_ma, variance_ma, out=variance_ma)`` writes it into
      ``variance_ma`` instead, which leaves both unchanged.
    * The noise norm is :math:`\sqrt{(1+\beta_0)^2+\beta_0^2}` as in AdaPNM; the original uses
      :math:`\beta_2` there (:math:`\sqrt{(1+\beta_2)^2+\beta_2^2}`, 0.06% smaller with the
      default betas).
    * :math:`\beta_0` is ``pnm_momentum_factor``; the original takes ``True`` (its
      ``momentum_type == "pnm"`` flag) for it, which equals the default 1.0.
    * Clipping, GC and normalization are applied once; the original applies GC and
      normalization again, in phase 2, to the already processed gradient (GC of a centered
      gradient does nothing; the second normalization scales it by about
      :math:`1 + 10^{-8}/\operatorname{std}(g)`).
    * Each parameter counts its own steps, which drive its bias corrections, momentum
      alternation, schedule and Lookahead (the original counts Lookahead steps per optimizer
      and reads its schedule's step from one parameter's state). With every parameter
      stepping every time, these are the same.
    * The warmup and warmdown start from the group's ``lr`` at each step (so an external
      scheduler composes with them, see `Ranger21Schedule`); the original starts its warmdown
      from the ``lr`` given to the constructor.
    * :math:`\bar\sigma` is summed exactly in float64 (the original sums in the params'
      dtype); the peer starts the sum at 1 instead of 0.

    Not implemented: the madgrad core (``use_madgrad``), AdaBelief (``use_adabelief``), the
    Chebyshev schedule (``use_cheb``), loading the slow weights for validation at each epoch
    (``lookahead_load_at_validation``: use `slow_weights()`), and the logging and plotting.

    Args:
        params: parameters or param groups. Every hyperparameter below can be set per group
            and is read from the group at each step.
        num_iterations: the run's total number of optimizer steps (int >= 1), which the
            warmdown (and the automatic warmup length) need; may be ``None`` when neither is
            used. The original takes ``num_epochs * num_batches_per_epoch``.
        lr: learning rate (>= 0), before the schedule.
        betas: (beta1, beta2), each in [0, 1). The first moment decays by beta1 ** 2.
        eps: added to the denominator and to the norms in norm loss (> 0).
        weight_decay: stable weight decay (>= 0).
        k: Lookahead sync period in steps (int >= 1), the original's ``lookahead_mergetime``.
            Stored in groups as ``lookahead_k``.
        alpha: Lookahead slow step in (0, 1], the original's ``lookahead_blending_alpha``.
            Stored in groups as ``lookahead_alpha``.
        use_gc: Gradient Centralization (the original's ``using_gc``).
        gc_conv_only: restrict GC to gradients with more than three dimensions.
        normalize_gradients: divide each gradient by its standard deviation (the original's
            ``using_normgc``).
        use_agc: adaptive gradient clipping (``use_adaptive_gradient_clipping``).
        agc_clipping_value: largest ratio of a gradient row's norm to its weight row's (> 0).
        agc_eps: weight row norms are clamped to at least this in clipping (>= 0).
        pnm_momentum_factor: beta0 of positive-negative momentum (>= 0; 0 is plain momentum).
        norm_loss_factor: strength of norm loss, which pulls each weight row's norm toward 1
            (>= 0; 0 turns it off; the original's ``normloss_factor``).
        use_softplus: the softplus on the denominator (the original's ``softplus``).
        beta_softplus: the softplus's beta (> 0).
        use_warmup: Ranger21's linear warmup.
        num_warmup_iterations: warmup length (int >= 0), or ``None`` for the automatic one.
        warmup_pct_default: the automatic warmup's length as a fraction of the run when
            ceil(2 / (1 - beta2)) steps are more than 45% of it, in [0, 1].
        warmdown_active: Ranger21's linear warmdown to ``warmdown_min_lr``.
        warmdown_start_pct: where the warmdown starts, as a fraction of the run, in [0, 1].
        warmdown_min_lr: the lr the warmdown ends on (>= 0).
        foreach: use the multi-tensor implementation (default: yes, unless a param is not a
            strided tensor).

    Notes:
        * State per parameter: ``step`` (int), ``grad_ma`` and ``neg_grad_ma`` (the two
          alternating momentum buffers), ``variance_ma``, ``max_variance_ma`` and
          ``slow_param`` (the Lookahead slow weights): five times the parameter's memory in
          fp32, all in ``state_dict()`` (tensors and plain values only).
        * With the fastai or Lightning schedulers, turn Ranger21's own schedule off
          (``use_warmup=False, warmdown_active=False``): the effective lr is then exactly the
          group's lr that the scheduler sets. See `Ranger21Schedule` for how they combine
          when both are on.
        * Clipping, GC and normalization are applied to ``p.grad`` in place (as in the
          original), so after ``step()`` an fp32/fp64 gradient holds its processed value.
        * bf16/fp16 parameters: the arithmetic is done in fp32 and the state kept in fp32.
        * With ``weight_decay > 0`` in any group a step synchronizes with the device once, to
          read the normalizer (as the original does); otherwise it does not.
        * Parameters without a gradient are skipped: neither they nor their step count
          change, and they are not counted in the normalizer.
    """

    def __init__(
        self,
        params: ParamsT,
        num_iterations: int | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-4,
        *,
        k: int = 5,
        alpha: float = 0.5,
        use_gc: bool = True,
        gc_conv_only: bool = False,
        normalize_gradients: bool = True,
        use_agc: bool = True,
        agc_clipping_value: float = 1e-2,
        agc_eps: float = 1e-3,
        pnm_momentum_factor: float = 1.0,
        norm_loss_factor: float = 1e-4,
        use_softplus: bool = True,
        beta_softplus: float = 50.0,
        use_warmup: bool = True,
        num_warmup_iterations: int | None = None,
        warmup_pct_default: float = 0.22,
        warmdown_active: bool = True,
        warmdown_start_pct: float = 0.72,
        warmdown_min_lr: float = 3e-5,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            lookahead_k=k,
            lookahead_alpha=alpha,
            use_gc=use_gc,
            gc_conv_only=gc_conv_only,
            normalize_gradients=normalize_gradients,
            use_agc=use_agc,
            agc_clipping_value=agc_clipping_value,
            agc_eps=agc_eps,
            pnm_momentum_factor=pnm_momentum_factor,
            norm_loss_factor=norm_loss_factor,
            use_softplus=use_softplus,
            beta_softplus=beta_softplus,
            num_iterations=num_iterations,
            use_warmup=use_warmup,
            num_warmup_iterations=num_warmup_iterations,
            warmup_pct_default=warmup_pct_default,
            warmdown_active=warmdown_active,
            warmdown_start_pct=warmdown_start_pct,
            warmdown_min_lr=warmdown_min_lr,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    state_keys = ("grad_ma", "neg_grad_ma", "variance_ma", "max_variance_ma", "slow_param")
    required_group_keys = REQUIRED_GROUP_KEYS
    optional_group_defaults = OPTIONAL_GROUP_DEFAULTS
    foreign_group_keys = {
        "weight_decouple": "pytorch_optimizer.Ranger21",
        "momentum": "the original lessw2020/Ranger21",
        "n_sma_threshold": "pytorch_optimizer.Ranger",
        "rectify_threshold": "ranger_plugins.Ranger",
    }

    @classmethod
    def check_group(cls, group: dict[str, Any], where: str = "") -> None:
        check_hyperparameters(group, where)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; evaluate ``closure`` first if given.

        Two phases over all groups (see the class docstring): the normalizer of stable weight
        decay is taken over every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups_before_step()
        self._check_all_gradients()
        work = [
            (group, lists)
            for group in self.param_groups
            if (lists := self._init_group(group)).params
        ]
        with_decay = any(group["weight_decay"] != 0 for group, _ in work)
        sums: list[torch.Tensor] = []
        for group, lists in work:
            variance_mas = lists.states[self.state_keys.index("variance_ma")]
            lists.grads, group_sums = ranger21_variance(
                lists.params,
                lists.grads,
                variance_mas,
                lists.steps,
                foreach=group["foreach"],
                with_sums=with_decay,
                **variance_hyperparameters(group),
            )
            sums += group_sums
        numel = sum(p.numel() for _, lists in work for p in lists.params)
        normalizer = stable_decay_normalizer(sums, numel) if with_decay else 0.0
        for group, lists in work:
            self._step_group(group, lists, normalizer)
        return loss

    def _step_group(self, group: dict[str, Any], lists: GroupLists, normalizer: float) -> None:
        """Phase 2 for one group, after phase 1 of every group gave the ``normalizer``."""
        grad_mas, neg_grad_mas, variance_mas, max_variance_mas, slow_params = lists.states
        ranger21(
            lists.params,
            lists.grads,
            grad_mas,
            neg_grad_mas,
            variance_mas,
            max_variance_mas,
            slow_params,
            lists.steps,
            variance_normalizer=normalizer,
            foreach=group["foreach"],
            **step_hyperparameters(group),
        )

    def _check_all_gradients(self) -> None:
        # Every group is checked before any state changes (`_init_group` checks one group).
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            check_gradients(with_grad, [p.grad for p in with_grad])
            if group.get("use_gc") and with_grad:
                self._check_gc_supported(with_grad)


# ------------------------------------------------------------------------------ schedule
@dataclass(frozen=True)
class Ranger21Schedule:
    """Ranger21's own lr schedule: linear warmup, then a constant lr, then a linear warmdown.

    ``lr(lr, step, beta2)`` is the lr that step ``step`` (from 1) uses, given the group's
    ``lr`` at that step. With W the warmup length and S = int(warmdown_start_pct * T) the
    warmdown's first step (T = ``num_iterations``):

    * warmdown (``warmdown_active`` and ``step >= S``): ``max(lr - (lr - warmdown_min_lr) *
      p, warmdown_min_lr)`` with ``p = min((step + 1 - S) / (T - S + 1), 1)``: a straight
      line from the group's lr to ``warmdown_min_lr``, reached at step T;
    * else warmup (``use_warmup`` and ``step <= W``): ``lr * step / W``;
    * else ``lr``.

    W is ``num_warmup_iterations`` if given, else ceil(2 / (1 - beta2)) (2000 for beta2 =
    0.999; Ma and Yarats' rule), or ``int(warmup_pct_default * T)`` when that is more than
    45% of the run. This is the original's schedule, except that the original's warmdown
    starts from the constructor's lr whatever the group's lr is.

    How it combines with an external scheduler (fastai's ``fit_one_cycle``/``fit_flat_cos``,
    a torch LR scheduler in Lightning), which sets the group's ``lr`` before each step:

    * both flags off: the step uses exactly the group's lr (this is what the external
      schedulers want, and what to do when one is used);
    * warmup on: the step uses the group's lr times ``step / W`` during the warmup (the two
      warmups multiply);
    * warmdown on: from step S, the step uses the straight line from the group's lr at that
      step to ``warmdown_min_lr`` (an external decay then ends on ``warmdown_min_lr``, not on
      its own end value, and an external lr below ``warmdown_min_lr`` is raised to it).
    """

    num_iterations: int | None
    use_warmup: bool
    num_warmup_iterations: int | None
    warmup_pct_default: float
    warmdown_active: bool
    warmdown_start_pct: float
    warmdown_min_lr: float

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> Ranger21Schedule:
        return cls(**{name: group[name] for name in cls.__dataclass_fields__})

    def warmup_iterations(self, beta2: float) -> int:
        """The warmup's length W in steps (the warmup ends at step W)."""
        if self.num_warmup_iterations is not None:
            return self.num_warmup_iterations
        assert self.num_iterations is not None  # `check_hyperparameters` asks for it
        beta_iterations = math.ceil(2.0 / (1.0 - beta2))
        if beta_iterations / self.num_iterations > MAX_BETA_WARMUP_FRACTION:
            return int(self.warmup_pct_default * self.num_iterations)
        return beta_iterations

    def warmdown_start(self) -> int:
        """The warmdown's first step S."""
        assert self.num_iterations is not None  # `check_hyperparameters` asks for it
        return int(self.warmdown_start_pct * self.num_iterations)

    def lr(self, lr: float, step: int, beta2: float) -> float:
        """The lr of step ``step`` (from 1), given the group's ``lr`` at that step."""
        if self.warmdown_active and step >= (start := self.warmdown_start()):
            assert self.num_iterations is not None
            fraction = min((step + 1 - start) / (self.num_iterations - start + 1), 1.0)
            return max(lr - (lr - self.warmdown_min_lr) * fraction, self.warmdown_min_lr)
        if self.use_warmup and step <= (warmup := self.warmup_iterations(beta2)):
            return lr * min(1.0, step / warmup)
        return lr


# ------------------------------------------------------------------------------ checks
def check_hyperparameters(group: dict[str, Any], where: str = "") -> None:
    """Raise a `ValueError` naming the first missing or out-of-range hyperparameter.

    ``where`` says which group, for messages about a loaded state dict."""
    missing = [key for key in REQUIRED_GROUP_KEYS if key not in group]
    if missing:
        raise ValueError(f"{where}missing hyperparameter {missing[0]!r}")
    check_real("lr", group["lr"], low=0.0, where=where, tensor_ok=True)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{where}Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    for index, beta in enumerate(betas):
        check_real(f"betas[{index}]", beta, low=0.0, high=1.0, high_open=True, where=where)
    for name, allowed in _REAL_RANGES:
        check_real(name, group[name], where=where, **allowed)
    check_lookahead_args(group["lookahead_k"], group["lookahead_alpha"], where=where)
    for flag in _FLAGS:
        if not isinstance(group[flag], bool):
            raise ValueError(f"{where}Invalid {flag}: {group[flag]!r} (must be True or False)")
    if group.get("foreach") not in (None, True, False):
        raise ValueError(f"{where}Invalid foreach: {group['foreach']!r} (must be None or a bool)")
    _check_schedule(group, where)


def _check_count(name: str, value: Any, low: int, where: str) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low
    ):
        raise ValueError(f"{where}Invalid {name}: {value!r} (must be None or an int >= {low})")


def _check_schedule(group: dict[str, Any], where: str) -> None:
    _check_count("num_iterations", group["num_iterations"], 1, where)
    _check_count("num_warmup_iterations", group["num_warmup_iterations"], 0, where)
    needs_total = group["warmdown_active"] or (
        group["use_warmup"] and group["num_warmup_iterations"] is None
    )
    if needs_total and group["num_iterations"] is None:
        raise ValueError(
            f"{where}Invalid num_iterations: None (must be an int >= 1: Ranger21's warmdown "
            "and automatic warmup length need the run's total number of steps; or turn them "
            "off with warmdown_active=False and use_warmup=False, or give "
            "num_warmup_iterations)"
        )


def variance_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's phase-1 hyperparameters, as `ranger21_variance` takes them."""
    return dict(
        beta2=group["betas"][1],
        use_agc=group["use_agc"],
        agc_clipping_value=group["agc_clipping_value"],
        agc_eps=group["agc_eps"],
        use_gc=group["use_gc"],
        gc_conv_only=group["gc_conv_only"],
        normalize_gradients=group["normalize_gradients"],
    )


def step_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's phase-2 hyperparameters, as `ranger21` takes them."""
    return {**step_arguments(group, _STEP_KEYS), "schedule": Ranger21Schedule.from_group(group)}


_STEP_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "pnm_momentum_factor",
    "norm_loss_factor",
    "use_softplus",
    "beta_softplus",
    "lookahead_k",
    "lookahead_alpha",
)


# ------------------------------------------------------------------------------ shared maths
def unit_norm(x: torch.Tensor) -> torch.Tensor:
    """The original's "unit norm": the L2 norm of the whole tensor for 0-D and 1-D tensors,
    of each row along dim 1 (kept) for 2-D and 3-D ones, over dims 1.. (kept) for larger."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    dims = (1,) if x.dim() <= 3 else tuple(range(1, x.dim()))
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True)


def clip_gradient_(
    param: torch.Tensor, grad: torch.Tensor, clipping_value: float, eps: float
) -> None:
    """Adaptive gradient clipping in place: rows of ``grad`` whose norm exceeds
    ``clipping_value`` times their weight row's norm (clamped to at least ``eps``) are scaled
    down to that norm."""
    max_norm = unit_norm(param.to(grad.dtype)).clamp_(min=eps).mul_(clipping_value)
    grad_norm = unit_norm(grad)
    clipped = grad * (max_norm / grad_norm.clamp(min=AGC_GRAD_NORM_MIN))
    grad.copy_(torch.where(grad_norm > max_norm, clipped, grad))


def normalize_gradient_(grad: torch.Tensor) -> None:
    """Divide ``grad`` in place by its (unbiased) standard deviation plus 1e-8, if it has
    more than two elements."""
    if grad.numel() > 2:
        grad.div_(grad.std().add_(GRADIENT_NORM_EPS))


def norm_loss_(fast: torch.Tensor, lr: float, factor: float, eps: float) -> None:
    """Norm loss in place: each row is scaled by ``1 - 2 lr factor (1 - 1 / (|row| + eps))``,
    a step of gradient descent on ``factor * (|row| - 1)^2``."""
    correction = (1.0 - 1.0 / (unit_norm(fast) + eps)) * (2.0 * factor)
    fast.mul_(1.0 - lr * correction)


def stable_decay_normalizer(sums: list[torch.Tensor], numel: int) -> float:
    """sqrt(sum(sums) / numel): the root mean bias-corrected second moment over every
    parameter, that stable weight decay divides by. The sums are read with one host sync per
    device and dtype and added exactly (`math.fsum`), so their order does not matter."""
    by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for value in sums:
        by_kind[(value.device, value.dtype)].append(value)
    values = [number for same in by_kind.values() for number in torch.stack(same).tolist()]
    return math.sqrt(math.fsum(values) / numel) if numel else 0.0


class _StepScalars(NamedTuple):
    """The scalars of one step of one param (or bucket of params with the same step)."""

    lr: float
    decay: float | None  # multiplier of stable weight decay, None when there is none
    sqrt_bias_correction2: float
    neg_step_size: float
    odd: bool


def _step_scalars(
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    pnm_momentum_factor: float,
    schedule: Ranger21Schedule | None,
    variance_normalizer: float,
) -> _StepScalars:
    scheduled = schedule.lr(lr, step, beta2) if schedule is not None else lr
    decay = None
    if weight_decay != 0 and variance_normalizer > 0:
        decay = 1.0 - weight_decay * scheduled / variance_normalizer
    beta0 = pnm_momentum_factor
    noise_norm = math.sqrt((1.0 + beta0) ** 2 + beta0**2)
    return _StepScalars(
        lr=scheduled,
        decay=decay,
        sqrt_bias_correction2=math.sqrt(1.0 - beta2**step),
        neg_step_size=-scheduled / ((1.0 - beta1**step) * noise_norm),
        odd=step % 2 == 1,
    )


# ------------------------------------------------------------------------------ phase 1
def _single_tensor_ranger21_variance(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    variance_mas: list[torch.Tensor],
    steps: list[int],
    *,
    with_sums: bool,
    beta2: float,
    use_agc: bool,
    agc_clipping_value: float,
    agc_eps: float,
    use_gc: bool,
    gc_conv_only: bool,
    normalize_gradients: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    work_grads, sums = [], []
    for param, grad, variance_ma, step in zip(params, grads, variance_mas, steps):
        grad = grad.to(variance_ma.dtype)  # fp32 for bf16/fp16 params, else p.grad itself
        if use_agc:
            clip_gradient_(param, grad, agc_clipping_value, agc_eps)
        if use_gc:
            centralize_gradient(grad, gc_conv_only)
        if normalize_gradients:
            normalize_gradient_(grad)
        variance_ma.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if with_sums:
            sums.append((variance_ma / (1.0 - beta2**step)).sum())
        work_grads.append(grad)
    return work_grads, sums


def _multi_tensor_ranger21_variance(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    variance_mas: list[torch.Tensor],
    steps: list[int],
    *,
    with_sums: bool,
    beta2: float,
    use_agc: bool,
    agc_clipping_value: float,
    agc_eps: float,
    use_gc: bool,
    gc_conv_only: bool,
    normalize_gradients: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    work_grads = [grad.to(v.dtype) for grad, v in zip(grads, variance_mas)]
    if use_agc:
        for param, grad in zip(params, work_grads):
            clip_gradient_(param, grad, agc_clipping_value, agc_eps)
    if use_gc:
        centralize_gradients(work_grads, gc_conv_only)
    if normalize_gradients:
        for grad in work_grads:
            normalize_gradient_(grad)
    sums: list[torch.Tensor | None] = [None] * len(params)
    for step, indices in _buckets(params, steps):
        bucket_grads = [work_grads[i] for i in indices]
        variances = [variance_mas[i] for i in indices]
        torch._foreach_mul_(variances, beta2)
        torch._foreach_addcmul_(variances, bucket_grads, bucket_grads, value=1.0 - beta2)
        if with_sums:
            debiased = torch._foreach_div(variances, 1.0 - beta2**step)
            for index, value in zip(indices, debiased):
                sums[index] = value.sum()
    return work_grads, [value for value in sums if value is not None]


def ranger21_variance(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    variance_mas: list[torch.Tensor],
    steps: list[int],
    *,
    foreach: bool | None = None,
    with_sums: bool = True,
    **hyperparameters: Any,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Functional phase 1 of Ranger21: clip, centralize and normalize the gradients (in
    place), and update the second moments ``variance_mas``.

    Returns the processed gradients (``p.grad`` itself for fp32/fp64 params; fp32 copies for
    bf16/fp16 ones), which phase 2 (`ranger21`) takes, and, if ``with_sums``, each param's sum
    of its bias-corrected second moment (0-dim tensors), for `stable_decay_normalizer`.
    ``steps`` are the step counts *after* this step's increment; the multi-tensor form is used
    unless ``foreach=False``."""
    if _use_foreach(params, foreach):
        return _multi_tensor_ranger21_variance(
            params, grads, variance_mas, steps, with_sums=with_sums, **hyperparameters
        )
    return _single_tensor_ranger21_variance(
        params, grads, variance_mas, steps, with_sums=with_sums, **hyperparameters
    )


# ------------------------------------------------------------------------------ phase 2
def _single_tensor_ranger21(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    grad_mas: list[torch.Tensor],
    neg_grad_mas: list[torch.Tensor],
    variance_mas: list[torch.Tensor],
    max_variance_mas: list[torch.Tensor],
    slow_params: list[torch.Tensor],
    steps: list[int],
    *,
    variance_normalizer: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    pnm_momentum_factor: float,
    norm_loss_factor: float,
    use_softplus: bool,
    beta_softplus: float,
    lookahead_k: int,
    lookahead_alpha: float,
    schedule: Ranger21Schedule | None,
) -> None:
    beta0 = pnm_momentum_factor
    for param, grad, first, second, variance_ma, max_variance_ma, step in zip(
        params, grads, grad_mas, neg_grad_mas, variance_mas, max_variance_mas, steps
    ):
        s = _step_scalars(
            step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            pnm_momentum_factor=beta0,
            schedule=schedule,
            variance_normalizer=variance_normalizer,
        )
        fast = param if param.dtype == variance_ma.dtype else param.to(variance_ma.dtype)
        if s.decay is not None:
            fast.mul_(s.decay)  # stable weight decay
        if norm_loss_factor != 0:
            norm_loss_(fast, s.lr, norm_loss_factor, eps)

        torch.maximum(max_variance_ma, variance_ma, out=max_variance_ma)
        denom = max_variance_ma.sqrt().div_(s.sqrt_bias_correction2).add_(eps)
        if use_softplus:
            denom = F.softplus(denom, beta=beta_softplus)

        grad_ma, neg_grad_ma = (first, second) if s.odd else (second, first)
        grad_ma.lerp_(grad, 1.0 - beta1**2)
        pn_momentum = grad_ma.mul(1.0 + beta0).add_(neg_grad_ma, alpha=-beta0)
        fast.addcdiv_(pn_momentum, denom, value=s.neg_step_size)
        if fast is not param:
            param.copy_(fast)
    lookahead_sync_(params, slow_params, steps, lookahead_k, lookahead_alpha, foreach=False)


def _multi_tensor_ranger21(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    grad_mas: list[torch.Tensor],
    neg_grad_mas: list[torch.Tensor],
    variance_mas: list[torch.Tensor],
    max_variance_mas: list[torch.Tensor],
    slow_params: list[torch.Tensor],
    steps: list[int],
    *,
    variance_normalizer: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    pnm_momentum_factor: float,
    norm_loss_factor: float,
    use_softplus: bool,
    beta_softplus: float,
    lookahead_k: int,
    lookahead_alpha: float,
    schedule: Ranger21Schedule | None,
) -> None:
    lists = (params, grads, grad_mas, neg_grad_mas, variance_mas, max_variance_mas, slow_params)
    for step, indices in _buckets(params, steps):
        bucket = _Bucket(*([values[i] for i in indices] for values in lists))
        s = _step_scalars(
            step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            pnm_momentum_factor=pnm_momentum_factor,
            schedule=schedule,
            variance_normalizer=variance_normalizer,
        )
        fast = bucket.params
        if fast[0].dtype != bucket.variance_mas[0].dtype:  # bf16/fp16: fp32 copies
            fast = [p.to(v.dtype) for p, v in zip(fast, bucket.variance_mas)]
        if s.decay is not None:
            torch._foreach_mul_(fast, s.decay)
        if norm_loss_factor != 0:
            for tensor in fast:
                norm_loss_(tensor, s.lr, norm_loss_factor, eps)
        denoms = _denominators(bucket, s, eps, use_softplus, beta_softplus)
        _pn_momentum_step(bucket, fast, denoms, s, beta1, pnm_momentum_factor)
        if fast is not bucket.params:
            copy_into(bucket.params, fast)
        lookahead_sync_(
            bucket.params,
            bucket.slow_params,
            [step] * len(indices),
            lookahead_k,
            lookahead_alpha,
            foreach=True,
        )


class _Bucket(NamedTuple):
    """Params of one device, dtype and step count, with their gradients and state."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    grad_mas: list[torch.Tensor]
    neg_grad_mas: list[torch.Tensor]
    variance_mas: list[torch.Tensor]
    max_variance_mas: list[torch.Tensor]
    slow_params: list[torch.Tensor]


def _buckets(params: list[torch.Tensor], steps: list[int]) -> list[tuple[int, list[int]]]:
    """(step, positions) of the params of each `bucket_indices` bucket."""
    return [
        (kind[2], list(range(len(params))) if positions is None else positions)
        for kind, positions in bucket_indices(params, steps)
    ]


def _denominators(
    bucket: _Bucket, s: _StepScalars, eps: float, use_softplus: bool, beta_softplus: float
) -> list[torch.Tensor]:
    torch._foreach_maximum_(bucket.max_variance_mas, bucket.variance_mas)
    denoms = list(torch._foreach_sqrt(bucket.max_variance_mas))
    torch._foreach_div_(denoms, s.sqrt_bias_correction2)
    torch._foreach_add_(denoms, eps)
    if use_softplus:
        denoms = [F.softplus(denom, beta=beta_softplus) for denom in denoms]
    return denoms


def _pn_momentum_step(
    bucket: _Bucket,
    fast: list[torch.Tensor],
    denoms: list[torch.Tensor],
    s: _StepScalars,
    beta1: float,
    beta0: float,
) -> None:
    first, second = bucket.grad_mas, bucket.neg_grad_mas
    grad_mas, neg_grad_mas = (first, second) if s.odd else (second, first)
    torch._foreach_lerp_(grad_mas, bucket.grads, 1.0 - beta1**2)
    pn_momenta = torch._foreach_mul(grad_mas, 1.0 + beta0)
    torch._foreach_add_(pn_momenta, neg_grad_mas, alpha=-beta0)
    torch._foreach_addcdiv_(fast, pn_momenta, denoms, value=s.neg_step_size)


def _use_foreach(params: list[torch.Tensor], foreach: bool | None) -> bool:
    if foreach is None:
        # foreach kernels want plain strided tensors; DTensors dispatch them per shard.
        return all(p.layout == torch.strided for p in params)
    return foreach


def ranger21(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    grad_mas: list[torch.Tensor],
    neg_grad_mas: list[torch.Tensor],
    variance_mas: list[torch.Tensor],
    max_variance_mas: list[torch.Tensor],
    slow_params: list[torch.Tensor],
    steps: list[int],
    *,
    variance_normalizer: float,
    foreach: bool | None = None,
    **hyperparameters: Any,
) -> None:
    """Functional phase 2 of Ranger21: stable weight decay, norm loss, the
    positive-negative momentum step and Lookahead, on gradients from `ranger21_variance`
    (whose second moments it reads) and the normalizer from `stable_decay_normalizer`.

    ``steps`` are the step counts *after* this step's increment; ``schedule`` (a
    `Ranger21Schedule`, or ``None`` for a constant lr) gives each step's lr. The multi-tensor
    form is used unless ``foreach=False``."""
    lists = (params, grads, grad_mas, neg_grad_mas, variance_mas, max_variance_mas, slow_params)
    implementation = (
        _multi_tensor_ranger21 if _use_foreach(params, foreach) else _single_tensor_ranger21
    )
    implementation(*lists, steps, variance_normalizer=variance_normalizer, **hyperparameters)
