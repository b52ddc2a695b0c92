"""Helpers shared by `Ranger` and `Lookahead`: validation, fp32 state and safe loading.

Private: the public surface is `ranger_plugins/__init__.py`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


# torch's `Optimizer.load_state_dict` casts every state tensor of a floating param to the
# param's dtype. That would round the fp32 moments and slow weights of bf16/fp16 params and
# turn quantized codes into floats, so `load_state_dict_safely` puts those back in their saved
# dtype. Other floating state (fp32 state loaded into fp64 params) is cast as torch casts it.
# "step" is left alone: torch decides its device (CPU unless capturable/fused).
_STATE_DTYPES = dict.fromkeys(LOW_PRECISION, torch.float32)

_DTYPE = operator.attrgetter("dtype")

#: Tensors whose storage the fast paths may view and point kernels at: not DTensors or other
#: subclasses (`nn.Parameter` of a DTensor has the DTensor's type).
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype the optimizer keeps state in and does its arithmetic in for `param`."""
    return _STATE_DTYPES.get(param.dtype, param.dtype)


def check_real(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    where: str = "",
    tensor_ok: bool = False,
    why: str = "",
) -> None:
    """Raise a `ValueError` naming ``name`` unless ``value`` is a real number in the range.

    ``tensor_ok``: a one-element real tensor counts as its value (torch allows a tensor lr,
    which schedulers fill in place)."""
    number = value
    if tensor_ok and isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(
                f"{where}Invalid {name}: a tensor of shape {tuple(value.shape)} and dtype "
                f"{value.dtype} (must be a number or a one-element real tensor)"
            )
        number = value.item()
    if isinstance(number, numbers.Real) and not isinstance(number, bool):
        number = float(number)
    if high == math.inf:
        allowed = f"{'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    in_range = (
        isinstance(number, float)
        and (low < number if low_open else low <= number)
        and (number < high if high_open else number <= high)
    )
    if not in_range:
        reason = f"; {why}" if why else ""
        raise ValueError(f"{where}Invalid {name}: {value!r} (must be a number {allowed}{reason})")


def as_float(value: Any) -> float:
    """A hyperparameter as a Python float (a tensor lr included): step sizes are computed on
    the host."""
    return value.item() if isinstance(value, torch.Tensor) else value


def step_arguments(group: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """A param group's hyperparameters ``keys`` as the step functions take them: ``lr`` as a
    float (torch allows a tensor lr, which schedulers fill in place; step sizes are computed on
    the host), a pair ``betas`` (or ``nus``) as ``beta1``/``beta2`` (``nu1``/``nu2``), the
    others as stored."""
    arguments = {key: group[key] for key in keys}
    arguments["lr"] = as_float(group["lr"])
    for pair, names in (("betas", ("beta1", "beta2")), ("nus", ("nu1", "nu2"))):
        if pair in arguments:
            arguments.update(zip(names, arguments.pop(pair)))
    return arguments


def check_lookahead_args(k: Any, alpha: Any, where: str = "") -> None:
    """Raise a `ValueError` naming the argument when Lookahead's k or alpha is out of range."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(
            f"{where}Invalid k (group key 'lookahead_k'): {k!r} (Lookahead's sync period must "
            "be an int >= 1)"
        )
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not 0.0 < float(alpha) <= 1.0
    ):
        raise ValueError(
            f"{where}Invalid alpha (group key 'lookahead_alpha'): {alpha!r} (Lookahead's slow "
            "step must be in (0, 1])"
        )


def check_pair(name: str, value: Any, where: str, *, high: float, high_open: bool = False) -> None:
    """Raise a `ValueError` unless ``value`` is a pair of reals in [0, high] (or [0, high))."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{where}Invalid {name}: {value!r} (must be a pair of numbers)")
    for index, item in enumerate(value):
        check_real(f"{name}[{index}]", item, low=0.0, high=high, high_open=high_open, where=where)


def check_flags(group: dict[str, Any], flags: tuple[str, ...], where: str) -> None:
    """Raise a `ValueError` unless each of ``flags`` is a bool and ``foreach`` is None or a
    bool."""
    for flag in flags:
        if not isinstance(group.get(flag, False), bool):
            raise ValueError(f"{where}Invalid {flag}: {group[flag]!r} (must be True or False)")
    if group.get("foreach") not in (None, True, False):
        raise ValueError(f"{where}Invalid foreach: {group['foreach']!r} (must be None or a bool)")


def check_scalar_states(
    optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], keys: tuple[str, ...]
) -> None:
    """Raise a `ValueError` naming the param and key unless every saved per-param state that
    has a ``step`` also holds each of ``keys`` as a finite real number >= 0."""
    for index, (group, saved) in enumerate(zip(optimizer.param_groups, state_dict["param_groups"])):
        for position, (_, entry) in enumerate(saved_entries(state_dict, group, saved)):
            for key in keys if "step" in entry else ():
                where = state_location(index, position)
                if key not in entry:
                    raise ValueError(f"{where}: missing state {key!r} (it has {sorted(entry)})")
                if not _finite_non_negative(entry[key]):
                    raise ValueError(
                        f"{where}: state {key!r} is {entry[key]!r} (must be a finite number >= 0)"
                    )


def _finite_non_negative(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(value) and float(value) >= 0.0


def check_gradients(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """The errors every implementation gives for gradients it cannot use."""
    if any(grad.is_sparse for grad in grads):
        raise RuntimeError("Ranger does not support sparse gradients")
    if any(dtype.is_complex for dtype in {p.dtype for p in params}):
        raise RuntimeError(
            "Ranger does not support complex parameters; optimize torch.view_as_real(param) instead"
        )


def params_whose_state_moved(
    params: list[torch.Tensor], states: list[dict]
) -> list[tuple[torch.Tensor, dict]]:
    """(param, state) where the state tensors no longer have the dtype and device the param
    needs (after ``model.to(dtype)`` or a move to another device between steps). The slow
    weights, which every optimizer of the family keeps, stand for all of them."""
    slows = [state["slow_param"] for state in states]
    # The usual case in C-level passes: one dtype and one device on each side, matching.
    param_dtypes = set(map(_DTYPE, params))
    if (
        len(param_dtypes) == 1
        and set(map(_DTYPE, slows)) == {state_dtype(params[0])}
        and len(devices := set(map(torch.Tensor.get_device, params))) == 1
        and set(map(torch.Tensor.get_device, slows)) == devices
    ):
        return []
    return [
        (param, state)
        for param, state, slow in zip(params, states, slows)
        if slow.dtype != _STATE_DTYPES.get(param.dtype, param.dtype)
        or slow.get_device() != param.get_device()
    ]


def move_state_to_param(state: dict, param: torch.Tensor, keys: Iterable[str]) -> None:
    """Cast and move the state tensors ``keys`` to the param's state dtype and device, as
    torch's `load_state_dict` does when it loads a state."""
    dtype = state_dtype(param)
    for key in keys:
        state[key] = state[key].to(device=param.device, dtype=dtype)


# State entries that have their param's shape: ours, and those of the torch optimizers a
# generic `Lookahead` commonly wraps. Others (Adafactor's row/col factors, 0-dim steps) have
# shapes of their own and are not checked.
PARAM_SHAPED_STATE_KEYS = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "slow_param", "momentum_buffer", "square_avg"}
)


def check_state_dict_matches(optimizer: torch.optim.Optimizer, state_dict: Any) -> None:
    """Check a state dict's structure against the optimizer *before* anything is changed.

    torch checks group and param counts but not tensor sizes; a size mismatch would only
    surface at the next step, after the optimizer had been overwritten.
    """
    if not isinstance(state_dict, dict) or {"state", "param_groups"} - state_dict.keys():
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups' entries")
    saved_groups = state_dict["param_groups"]
    if not isinstance(state_dict["state"], dict) or not isinstance(saved_groups, list):
        raise ValueError("state_dict['state'] must be a dict and ['param_groups'] a list")
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, "
            f"the optimizer has {len(optimizer.param_groups)}"
        )
    for index, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise ValueError(f"group {index} of the loaded state dict has no 'params' list")
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(
                f"parameter group {index} has {len(group['params'])} params, "
                f"the loaded state dict has {len(saved['params'])}"
            )
        for position, (param, entry) in enumerate(saved_entries(state_dict, group, saved)):
            for key, value in entry.items():
                if (
                    key in PARAM_SHAPED_STATE_KEYS
                    and isinstance(value, torch.Tensor)
                    and value.shape != param.shape
                ):
                    raise ValueError(
                        f"{state_location(index, position)}: state {key!r} has shape "
                        f"{tuple(value.shape)}, but the param has shape {tuple(param.shape)}"
                    )


def state_location(group_index: int, position: int) -> str:
    return f"param {position} of group {group_index} in the loaded state dict"


def saved_entries(state_dict: dict, group: dict, saved_group: dict) -> list[tuple]:
    """(param, its saved state entry) for each param of a group, {} where none was saved."""
    state = state_dict["state"]
    return [
        (param, state.get(param_id) or {})
        for param, param_id in zip(group["params"], saved_group["params"])
    ]


def check_param_states(
    optimizer: torch.optim.Optimizer,
    state_dict: dict,
    step_key: str,
    tensor_keys: tuple[str, ...],
    required: bool = True,
) -> None:
    """Check that each saved per-param state holds what `step()` reads: ``step_key`` (an
    integer >= 0, or a one-element tensor of one, as torch.optim saves it) and a floating
    tensor of the param's shape for each of ``tensor_keys``. ``required=False``: only entries
    that hold any of these keys must hold all of them."""
    for index, (group, saved) in enumerate(zip(optimizer.param_groups, state_dict["param_groups"])):
        for position, (param, entry) in enumerate(saved_entries(state_dict, group, saved)):
            keys = (step_key, *tensor_keys)
            if not entry or (not required and not any(key in entry for key in keys)):
                continue
            where = state_location(index, position)
            missing = [key for key in keys if key not in entry]
            if missing:
                raise ValueError(f"{where}: missing state {missing[0]!r} (it has {sorted(entry)})")
            check_step(entry[step_key], f"{where}: state {step_key!r}")
            for key in tensor_keys:
                _check_state_tensor(entry[key], param, f"{where}: state {key!r}")


def check_step(step: Any, what: str) -> None:
    value = step
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dtype.is_complex:
            raise ValueError(
                f"{what} is a tensor of shape {tuple(step.shape)} (must be one number)"
            )
        value = step.item()
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, float) and value.is_integer()
    )
    if isinstance(value, bool) or not integral or value < 0:
        raise ValueError(f"{what} is {step!r} (must be an integer >= 0)")


def _check_state_tensor(value: Any, param: torch.Tensor, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what} is a {type(value).__name__} (must be a tensor)")
    if not value.dtype.is_floating_point:
        raise ValueError(f"{what} has dtype {value.dtype} (must be a floating dtype)")
    if value.shape != param.shape:
        raise ValueError(
            f"{what} has shape {tuple(value.shape)}, but the param has shape {tuple(param.shape)}"
        )


def steps_to_int(optimizer: torch.optim.Optimizer, step_key: str) -> None:
    """Loaded step counts as Python ints (torch.optim saves them as tensors): the step size
    is computed on the host from them."""
    for state in optimizer.state.values():
        step = state.get(step_key)
        if isinstance(step, torch.Tensor):
            state[step_key] = int(step.item())


def saved_state_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> list[tuple]:
    """(param, key, saved tensor) for every saved state tensor that torch's load would cast
    but that keeps its dtype: fp32 state of bf16/fp16 params, quantized codes, and every
    tensor of a low-memory state (one that holds ``slow_delta``)."""
    saved = []
    for group, saved_group in zip(optimizer.param_groups, state_dict["param_groups"]):
        for param, param_id in zip(group["params"], saved_group["params"]):
            entry = state_dict["state"].get(param_id, {})
            for key, value in entry.items():
                if key != "step" and isinstance(value, torch.Tensor):
                    if _keeps_dtype(param, value, low_memory="slow_delta" in entry):
                        saved.append((param, key, value))
    return saved


def _keeps_dtype(param: torch.Tensor, value: torch.Tensor, low_memory: bool) -> bool:
    if value.dtype == param.dtype:
        return False
    fp32_of_low_precision = param.dtype in LOW_PRECISION and value.dtype == torch.float32
    return fp32_of_low_precision or low_memory or not value.is_floating_point()


def restore_saved_dtypes(optimizer: torch.optim.Optimizer, saved: Iterable[tuple]) -> None:
    """Put the saved tensors back in their own dtype (on the param's device) after torch's
    load, which cast them to the param's dtype."""
    for param, key, value in saved:
        optimizer.state[param][key] = value.detach().to(device=param.device, copy=True)


def load_state_dict_safely(
    optimizer: torch.optim.Optimizer,
    state_dict: dict,
    load: Callable[[dict], None],
    validate: Callable[[dict], None],
) -> None:
    """`Optimizer.load_state_dict` for our optimizers: the optimizer's load_state_dict pre
    hooks, then ``validate(state_dict)``, then ``load(state_dict)`` (torch's loading, with
    the optimizer's own hooks held back so that each runs once), then the post hooks. State
    tensors keep their saved dtype; on any failure the optimizer is left as it was."""
    state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
    for pre_hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    validate(state_dict)
    saved_dtypes = saved_state_dtypes(optimizer, state_dict)
    # torch's load swaps in new `state` and `param_groups` objects; keep the old ones (and
    # the groups' contents, in case a loader edits them in place) so a failure can be undone.
    old_state, old_groups = optimizer.state, optimizer.param_groups
    old_contents = [dict(group) for group in old_groups]
    try:
        with _own_load_hooks_held_back(optimizer):
            load(state_dict)
    except Exception:
        optimizer.state, optimizer.param_groups = old_state, old_groups
        for group, contents in zip(old_groups, old_contents):
            group.clear()
            group.update(contents)
        raise
    restore_saved_dtypes(optimizer, saved_dtypes)
    for post_hook in optimizer._optimizer_load_state_dict_post_hooks.values():
        post_hook(optimizer)


@contextlib.contextmanager
def _own_load_hooks_held_back(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    pre, post = (
        optimizer._optimizer_load_state_dict_pre_hooks,
        optimizer._optimizer_load_state_dict_post_hooks,
    )
    optimizer._optimizer_load_state_dict_pre_hooks = OrderedDict()
    optimizer._optimizer_load_state_dict_post_hooks = OrderedDict()
    try:
        yield
    finally:
        optimizer._optimizer_load_state_dict_pre_hooks = pre
        optimizer._optimizer_load_state_dict_post_hooks = post
