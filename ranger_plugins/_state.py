"""Helpers shared by `Ranger` and `Lookahead`: validation, fp32 state and safe loading.

Private: the public surface is `ranger_plugins/__init__.py`.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


# torch's `Optimizer.load_state_dict` casts every floating state tensor to its param's dtype.
# For bf16/fp16 params that would round the fp32 moments and slow weights we keep; we put the
# saved fp32 tensors back after loading. State the inner optimizer keeps in the param's own
# dtype (AdamW's moments) is saved in that dtype and is left as torch loads it. "step" is
# left alone too: torch decides its device (CPU unless capturable/fused).
def state_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype the optimizer keeps state in and does its arithmetic in for `param`."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def check_lookahead_args(k: Any, alpha: Any) -> None:
    """Raise a `ValueError` naming the argument when Lookahead's k or alpha is out of range."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(
            f"Invalid k (group key 'lookahead_k'): {k!r} (Lookahead's sync period must be an "
            "int >= 1)"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < alpha <= 1.0:
        raise ValueError(
            f"Invalid alpha (group key 'lookahead_alpha'): {alpha!r} (Lookahead's slow step "
            "must be in (0, 1])"
        )


# State entries that have their param's shape: ours, and those of the torch optimizers a
# generic `Lookahead` commonly wraps. Others (Adafactor's row/col factors, 0-dim steps) have
# shapes of their own and are not checked.
PARAM_SHAPED_STATE_KEYS = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "slow_param", "momentum_buffer", "square_avg"}
)


def check_state_dict_matches(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Check a state dict against the optimizer *before* anything is changed.

    torch checks group and param counts but not tensor sizes; a size mismatch would only
    surface at the next step, after the optimizer had been overwritten.
    """
    if not isinstance(state_dict, dict) or {"state", "param_groups"} - state_dict.keys():
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups' entries")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, "
            f"the optimizer has {len(optimizer.param_groups)}"
        )
    for index, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(
                f"parameter group {index} has {len(group['params'])} params, "
                f"the loaded state dict has {len(saved['params'])}"
            )
        for param, param_id in zip(group["params"], saved["params"]):
            for key, value in state_dict["state"].get(param_id, {}).items():
                if (
                    key in PARAM_SHAPED_STATE_KEYS
                    and isinstance(value, torch.Tensor)
                    and value.shape != param.shape
                ):
                    raise ValueError(
                        f"state '{key}' of a param in group {index} has shape "
                        f"{tuple(value.shape)}, but the param has shape {tuple(param.shape)}"
                    )


def saved_fp32_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> list[tuple]:
    """(param, key, saved tensor) for every fp32 state tensor of a low-precision param."""
    saved = []
    for group, saved_group in zip(optimizer.param_groups, state_dict["param_groups"]):
        for param, param_id in zip(group["params"], saved_group["params"]):
            if param.dtype not in LOW_PRECISION:
                continue
            for key, value in state_dict["state"].get(param_id, {}).items():
                if (
                    key != "step"
                    and isinstance(value, torch.Tensor)
                    and value.dtype == torch.float32
                ):
                    saved.append((param, key, value))
    return saved


def restore_fp32_state(optimizer: torch.optim.Optimizer, saved: Iterable[tuple]) -> None:
    """Put the saved fp32 state tensors back (on the param's device) after torch's load."""
    for param, key, value in saved:
        optimizer.state[param][key] = value.detach().to(device=param.device, dtype=torch.float32)


def load_state_dict_safely(optimizer: torch.optim.Optimizer, state_dict: dict, load) -> None:
    """Validate, then `load(state_dict)`; keep fp32 state fp32; on failure leave all as it was."""
    check_state_dict_matches(optimizer, state_dict)
    fp32_state = saved_fp32_state(optimizer, state_dict)
    # torch's load swaps in new `state` and `param_groups` objects; keep the old ones (and
    # the groups' contents, in case a loader edits them in place) so a failure can be undone.
    old_state, old_groups = optimizer.state, optimizer.param_groups
    old_contents = [dict(group) for group in old_groups]
    try:
        load(state_dict)
    except Exception:
        optimizer.state, optimizer.param_groups = old_state, old_groups
        for group, contents in zip(old_groups, old_contents):
            group.clear()
            group.update(contents)
        raise
    restore_fp32_state(optimizer, fp32_state)
