"""`Lookahead(..., slow_precision="16bit")`: a wrapped optimizer's slow weights in bf16."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from ranger_plugins import Lookahead


def _model_and_optimizer(slow_precision: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model.to(dtype)
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, Lookahead(inner, k=3, alpha=0.5, slow_precision=slow_precision)


def _train(model, optimizer, steps: int, seed: int = 1) -> float:
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x = torch.randn(64, 16, generator=generator).to(next(model.parameters()).dtype)
        y = torch.randint(0, 4, (64,), generator=generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
    return loss.item()


def test_16bit_slow_weights_are_bf16_and_the_fast_weights_equal_them_after_a_sync():
    model, optimizer = _model_and_optimizer("16bit")
    _train(model, optimizer, steps=6)  # the second sync
    for param in model.parameters():
        slow = optimizer.state[param]["slow_param"]
        assert slow.dtype == torch.bfloat16, "2 bytes per slow weight"
        assert torch.equal(param, slow.float()), "fast = slow exactly after a sync"


def test_16bit_trains_like_full_slow_weights():
    full_loss = _train(*_model_and_optimizer("full"), steps=90)
    low_loss = _train(*_model_and_optimizer("16bit"), steps=90)
    assert abs(low_loss - full_loss) <= 0.02 * full_loss, (low_loss, full_loss)


def test_16bit_slow_weights_keep_bf16_params_in_their_own_dtype():
    model, optimizer = _model_and_optimizer("16bit", dtype=torch.bfloat16)
    _train(model, optimizer, steps=3)
    for param in model.parameters():
        assert optimizer.state[param]["slow_param"].dtype == torch.bfloat16


def test_16bit_state_dict_loads_weights_only_and_resumes_bitwise():
    model, optimizer = _model_and_optimizer("16bit")
    _train(model, optimizer, steps=4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict()}, buffer)
    twin_model, twin = _model_and_optimizer("16bit", seed=5)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin_model.load_state_dict(saved["model"])
    twin.load_state_dict(saved["opt"])
    _train(model, optimizer, steps=5, seed=2)
    _train(twin_model, twin, steps=5, seed=2)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b), "resume from a 16bit checkpoint is bitwise"


@pytest.mark.parametrize(("saved", "loaded"), [("full", "16bit"), ("16bit", "full")])
def test_a_checkpoint_of_one_slow_precision_loads_into_the_other(saved, loaded):
    model, optimizer = _model_and_optimizer(saved)
    _train(model, optimizer, steps=4)
    state = copy.deepcopy(optimizer.state_dict())
    twin_model, twin = _model_and_optimizer(loaded)
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(state)
    for param, twin_param in zip(model.parameters(), twin_model.parameters()):
        source = optimizer.state[param]["slow_param"].float()
        converted = twin.state[twin_param]["slow_param"]
        expected = torch.float32 if loaded == "full" else torch.bfloat16
        assert converted.dtype == expected
        # bf16 keeps 8 bits of mantissa: within one bf16 ulp of the saved value.
        ulp = source.abs().clamp_min(1e-30) * 2.0**-7
        assert ((converted.float() - source).abs() <= ulp).all()
    _train(twin_model, twin, steps=3)  # and it trains on


def test_bad_slow_precision_is_refused():
    model = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="slow_precision"):
        Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), slow_precision="8bit")
