"""The fused CPU step on low-memory states (``16bit``, ``8bit``) against the torch reference.

`_fused.fused_low_memory_step` runs the C++ kernel (``csrc/ranger_low_memory.cpp``) on the
params' own tensors; `_low_memory.low_memory_ranger` is the reference. Both run on clones of
the same params, gradients and state, and must agree bit for bit, with one caveat, the
``ieee_sqrt`` fixture: torch's float32 ``sqrt`` runs MKL's VML on x86 builds, which is not
correctly rounded on every CPU (on an AMD EPYC, about a fifth of its results are one ulp off
the IEEE square root), while the kernel uses the IEEE square root instruction. The fixture makes
the reference's float32 ``Tensor.sqrt`` and ``sqrt_`` correctly rounded (through float64,
exact for float32 inputs); `test_close_to_the_reference_with_torch_sqrt` compares against the
reference as it is, with tolerances.

GC's row means are sums in a different order in the two (torch's cascade, the kernel's
vector lanes), so the bitwise tests draw gradients whose row sums are exact in float32
(multiples of 1/64 of magnitude at most 1): every order then gives the same mean.
`test_gc_on_random_gradients_is_close` covers arbitrary gradients with tolerances.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ranger_plugins import _cpu_kernel, _fused, _low_memory

SHAPES = [
    (30, 17, 3, 3),  # conv weight (channels_last in the tests): 8-bit, a partial last block,
    # rows of 153 (blocks and rows do not align: rows cross the kernel's task ends)
    (300, 70),  # 8-bit, partial last block, rows of 70
    (5000,),  # 8-bit without GC (1-D), partial last block
    (33, 130),  # 8-bit, just above the 4096-element threshold
    (2, 33000),  # rows longer than a task of the kernel
    (20, 16, 3, 3),  # conv weight below 4096 elements: 16bit even in an 8bit group
    (7,),  # a bias: 16bit layout
    (),  # a scalar
    (0, 5),  # no elements
]
HYPERPARAMETERS = {
    "lr": 0.05,
    "beta1": 0.95,
    "beta2": 0.999,
    "eps": 1e-5,
    "weight_decay": 0.01,
    "lookahead_k": 3,  # syncs at steps 3 and 6
    "lookahead_alpha": 0.5,
    "use_gc": True,
    "gc_conv_only": False,
    "rectify_threshold": 5.0,  # momentum SGD until step 5, adaptive from step 6
}
STEPS = 8


@pytest.fixture(autouse=True)
def kernel():
    assert _cpu_kernel.low_memory_step_kernel() is not None, "the C++ kernel did not build"


@pytest.fixture
def ieee_sqrt(monkeypatch):
    """The reference's float32 square roots correctly rounded (see the module docstring)."""
    sqrt, sqrt_ = torch.Tensor.sqrt, torch.Tensor.sqrt_

    def exact_sqrt(self):
        return sqrt(self.double()).float() if self.dtype == torch.float32 else sqrt(self)

    def exact_sqrt_(self):
        return self.copy_(exact_sqrt(self)) if self.dtype == torch.float32 else sqrt_(self)

    monkeypatch.setattr(torch.Tensor, "sqrt", exact_sqrt)
    monkeypatch.setattr(torch.Tensor, "sqrt_", exact_sqrt_)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def _memory_format(shape):
    return torch.channels_last if len(shape) == 4 else torch.contiguous_format


def _params(dtype, generator):
    return [
        torch.randn(shape, generator=generator, dtype=torch.float64)
        .to(dtype)
        .contiguous(memory_format=_memory_format(shape))
        for shape in SHAPES
    ]


def _grads(params, generator, exact_sums):
    grads = []
    for param in params:
        if exact_sums:
            values = torch.randint(-64, 65, param.shape, generator=generator) / 64.0
        else:
            values = torch.randn(param.shape, generator=generator, dtype=torch.float64)
        grads.append(values.to(param.dtype).contiguous(memory_format=_memory_format(param.shape)))
    return grads


class Run:
    """The same params and states stepped by the kernel and by the reference."""

    def __init__(self, precision, dtype, seed=0):
        self.generator = torch.Generator().manual_seed(seed)
        self.params = _params(dtype, self.generator)
        self.states = [
            _low_memory.new_state(param, _low_memory.layout_for(precision, param))
            for param in self.params
        ]
        self.ref_params = [
            param.clone(memory_format=torch.preserve_format) for param in self.params
        ]
        self.ref_states = copy.deepcopy(self.states)

    def step(self, exact_sums=True, **overrides):
        hyperparameters = {**HYPERPARAMETERS, **overrides}
        grads = _grads(self.params, self.generator, exact_sums)
        for state, ref_state in zip(self.states, self.ref_states):
            state["step"] += 1
            ref_state["step"] += 1
        steps = [state["step"] for state in self.states]
        not_stepped = _fused.fused_low_memory_step(
            self.params, grads, self.states, steps, **hyperparameters
        )
        assert not_stepped == []
        ref_grads = [grad.clone(memory_format=torch.preserve_format) for grad in grads]
        _low_memory.low_memory_ranger(
            self.ref_params, ref_grads, self.ref_states, steps, **hyperparameters
        )

    def pairs(self):
        """(name, kernel's tensor, reference's tensor) for every param and state tensor."""
        for index, (param, ref_param) in enumerate(zip(self.params, self.ref_params)):
            yield f"param {index}", param, ref_param
            for key, value in self.states[index].items():
                if isinstance(value, torch.Tensor):
                    yield f"{key} {index}", value, self.ref_states[index][key]

    def assert_identical(self, when):
        for name, value, expected in self.pairs():
            assert value.dtype == expected.dtype and value.stride() == expected.stride(), name
            assert torch.equal(value, expected), f"{name} differs {when}"


@pytest.mark.parametrize("precision", ["16bit", "8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("use_gc", [True, False], ids=["gc", "no_gc"])
def test_bitwise_equal_to_the_reference(precision, dtype, use_gc, threads, ieee_sqrt):
    run = Run(precision, dtype)
    for step in range(1, STEPS + 1):  # momentum SGD, adaptive, syncs at 3 and 6
        run.step(use_gc=use_gc)
        run.assert_identical(f"after step {step}")


@pytest.mark.parametrize("precision", ["16bit", "8bit"])
def test_bitwise_with_conv_only_gc_and_no_weight_decay(precision, ieee_sqrt):
    run = Run(precision, torch.float32, seed=3)
    for step in range(1, 5):
        run.step(gc_conv_only=True, weight_decay=0.0, lookahead_k=2)
        run.assert_identical(f"after step {step}")


@pytest.mark.parametrize("precision", ["16bit", "8bit"])
def test_gc_on_random_gradients_is_close(precision):
    # Arbitrary gradients: the row means differ in their last bits (summation order), which
    # may move a value on a rounding boundary by one unit of its storage: an 8-bit code by
    # one, a bf16 value (slow_delta, 16bit moments) by one bf16 ulp (2^-7 relative at most).
    run = Run(precision, torch.float32, seed=1)
    run.step(exact_sums=False)
    for name, value, expected in run.pairs():
        if value.dtype in (torch.int8, torch.uint8):
            difference = (value.int() - expected.int()).abs()
            assert difference.max() <= 1 and difference.sum() <= 3, name
        else:
            rtol = 2**-7 if value.dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(value.float(), expected.float(), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("precision", ["16bit", "8bit"])
def test_close_to_the_reference_with_torch_sqrt(precision):
    # The reference as it is: where torch's sqrt is not correctly rounded (see the module
    # docstring), an 8-bit code on a rounding boundary can move by one, and that moment is then
    # decoded one level (at most ~2/c of its value) apart.
    run = Run(precision, torch.float32, seed=2)
    for _ in range(STEPS):
        run.step()
    for name, value, expected in run.pairs():
        if value.dtype in (torch.int8, torch.uint8):
            difference = (value.int() - expected.int()).abs()
            assert difference.max() <= 1, name
            assert difference.bool().float().mean() < 0.01, name
        elif name.startswith(("param", "slow_delta")):
            torch.testing.assert_close(value.float(), expected.float(), rtol=0, atol=1e-3)


def test_the_rest_falls_back_to_the_reference(ieee_sqrt):
    # fp64 params, the "delta" layout and mismatched gradient strides are not the kernel's:
    # fused_low_memory_ranger steps them with the reference, the others with the kernel.
    generator = torch.Generator().manual_seed(4)
    params = [
        torch.randn(5000, generator=generator),  # 8bit: the kernel
        torch.randn(64, 80, generator=generator, dtype=torch.float64),  # fp64
        torch.randn(40, 50, generator=generator),  # delta layout
        torch.randn(70, 60, generator=generator),  # 8bit, gradient transposed
    ]
    layouts = ["8bit", "8bit", "delta", "8bit"]
    states = [_low_memory.new_state(p, layout) for p, layout in zip(params, layouts)]
    grads = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    grads[3] = grads[3].t().contiguous().t()
    for state in states:
        state["step"] = 1
    assert _fused.fused_low_memory_step(
        [p.clone() for p in params], grads, copy.deepcopy(states), [1] * 4, **HYPERPARAMETERS
    ) == [1, 2, 3]

    ref_params, ref_states = [p.clone() for p in params], copy.deepcopy(states)
    _fused.fused_low_memory_ranger(params, grads, states, [1] * 4, **HYPERPARAMETERS)
    _low_memory.low_memory_ranger(
        ref_params, [g.clone() for g in grads], ref_states, [1] * 4, **HYPERPARAMETERS
    )
    for param, ref_param, state, ref_state in zip(params, ref_params, states, ref_states):
        assert torch.equal(param, ref_param)
        for key in state:
            if isinstance(state[key], torch.Tensor):
                assert torch.equal(state[key], ref_state[key]), key


def test_mixed_step_counts_are_stepped_in_groups(ieee_sqrt):
    # A param added to the optimizer later has a smaller step count: its own kernel call.
    run = Run("8bit", torch.float32, seed=5)
    run.states[1]["step"] = run.ref_states[1]["step"] = 4  # steps 5 (others 1): no sync
    run.states[2]["step"] = run.ref_states[2]["step"] = 2  # step 3: a sync
    for step in range(1, 4):
        run.step()
        run.assert_identical(f"after step {step}")


def test_version_counters_are_bumped():
    run = Run("8bit", torch.float32)
    tensors = [run.params[0], *(t for t in run.states[0].values() if isinstance(t, torch.Tensor))]
    versions = [tensor._version for tensor in tensors]
    run.step()
    assert all(tensor._version > version for tensor, version in zip(tensors, versions))


def test_without_the_kernel_nothing_is_stepped(monkeypatch):
    monkeypatch.setattr(_cpu_kernel, "enabled", False)
    param = torch.randn(5000)
    state = _low_memory.new_state(param, "8bit")
    state["step"] = 1
    before = param.clone()
    not_stepped = _fused.fused_low_memory_step(
        [param], [torch.randn(5000)], [state], [1], **HYPERPARAMETERS
    )
    assert not_stepped == [0] and torch.equal(param, before)
