"""The low-memory default step packs small params into one chunk: packing must not change a
bit (same per-element operations, and stochastic rounding seeded by each element's index
within its own param), whatever the pack boundaries."""

from __future__ import annotations

import pytest
import torch

from ranger_plugins import Ranger, _low_memory

SHAPES = [(64, 32), (64,), (7, 3, 3, 3), (7,), (300,), (5000,), (3, 4)]


def _train(precision: str, dtype: torch.dtype, pack: bool, steps: int = 14):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in SHAPES]
    optimizer = Ranger(params, lr=0.01, weight_decay=0.1, use_gc=True, state_precision=precision)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(dtype)
        if pack:
            optimizer.step()
        else:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(
                    _low_memory,
                    "_packs_and_singles",
                    lambda params, *_: ([], list(range(len(params)))),
                )
                optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("precision", ["delta", "16bit", "8bit"])
def test_packing_small_params_changes_nothing(precision):
    packed, packed_optimizer = _train(precision, torch.float32, pack=True)
    alone, alone_optimizer = _train(precision, torch.float32, pack=False)
    for index, (a, b) in enumerate(zip(packed, alone)):
        assert torch.equal(a, b), f"{precision}: param {index} differs when packed"
        for key, value in packed_optimizer.state[a].items():
            other = alone_optimizer.state[b][key]
            same = value == other if key == "step" else torch.equal(value, other)
            assert same, f"{precision}: state {key!r} of param {index} differs when packed"


def test_packs_hold_small_params_of_one_step_and_layout():
    params = [torch.zeros(shape) for shape in [(10,), (20,), (3000,), (5000,), (30,)]]
    states = [
        {"exp_avg": torch.zeros(p.shape, dtype=torch.bfloat16), "slow_delta": None} for p in params
    ]
    packs, singles = _low_memory._packs_and_singles(params, states, [3, 3, 3, 3, 4], chunk=1024)
    assert packs == [[0, 1], [4]], "small params of one step share a pack; other steps apart"
    assert singles == [2, 3], "params of a chunk or more are stepped alone"
