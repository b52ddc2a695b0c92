"""Parameters, gradients and comparisons shared by the core optimizer tests."""

from __future__ import annotations

import torch

SHAPES = [(4, 3, 3, 3), (5, 7), (6,), ()]


def make_params(dtypes=(torch.float64,), shapes=SHAPES, seed=0, channels_last=False):
    """Parameters of mixed shapes (by default a 4-D conv weight, a matrix, a vector, a
    scalar), drawn in float64 and cast, for each of ``dtypes`` (one dtype or several); 4-D
    ones channels_last if asked. The one parameter factory of the optimizer tests."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for dtype in dtypes if isinstance(dtypes, (tuple, list)) else (dtypes,):
        for shape in shapes:
            value = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
            if channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
            params.append(torch.nn.Parameter(value))
    return params


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, step, seed=1, skip=()):
    """Deterministic gradients for `step`; params whose index is in `skip` get none."""
    generator = torch.Generator().manual_seed(seed * 10_000 + step)
    for index, param in enumerate(params):
        grad = torch.randn(param.shape, generator=generator, dtype=torch.float64)
        param.grad = None if index in skip else grad.to(param.dtype)


def run(optimizer, params, steps, start=0, skip=()):
    """`steps` optimizer steps on `set_grads` gradients. `skip`: indices of params without a
    gradient, or a function of the step giving them."""
    for step in range(start, start + steps):
        set_grads(params, step, skip=skip(step) if callable(skip) else skip)
        optimizer.step()


def assert_same(params_a, params_b):
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b), (a - b).abs().max()


def assert_same_state(opt_a, params_a, opt_b, params_b, exact=True):
    """Every param and every state entry equal (bitwise, and of the same dtype, when
    `exact`)."""
    compare = torch.equal if exact else torch.allclose
    for a, b in zip(params_a, params_b):
        assert compare(a, b), (a - b).abs().max()
        state_a, state_b = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert state_a.keys() == state_b.keys()
        for key, value in state_a.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == state_b[key].dtype, key
                assert compare(value, state_b[key]), key
            else:
                assert value == state_b[key], key
