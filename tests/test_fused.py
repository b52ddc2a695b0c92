"""The opt-in fused step (``Ranger(..., fused=True)``) against the single-tensor reference.

On CPU the fused step runs the C++ kernel of `_cpu_kernel` on the params' own tensors; where
the kernel cannot be built (``kernel`` fixture: "fallback") it runs the default path. The
generic optimizer properties (loading, hooks, operations between steps) run on every path in
test_optimizer_contract.py; this file covers what is particular to the fused step.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from optim_helpers import make_params

from ranger_plugins import Ranger, _cpu_kernel

SHAPES = [
    (6, 3, 2, 2),  # conv weight: row length 12
    (6,),
    (5, 12),
    (5,),
    (1, 7),  # a single row
    (),  # a scalar
    (2, 33000),  # rows longer than one task of the kernel (32K elements)
    (33001,),  # a vector cut into two tasks, the second of one element
]


@pytest.fixture(params=["cpu_kernel", "fallback"])
def kernel(request, monkeypatch):
    """Which code the fused step runs on CPU: the C++ kernel, or the default path where the
    kernel cannot be built."""
    if request.param == "fallback":
        monkeypatch.setattr(_cpu_kernel, "enabled", False)
    else:
        assert _cpu_kernel.step_kernel() is not None, "the C++ kernel did not build"
    return request.param


def _params(dtype, seed=0, channels_last=False):
    return make_params(dtype, SHAPES, seed, channels_last=channels_last)


def _set_grads(params, generator, skip=()):
    for index, param in enumerate(params):
        grad = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype)
        param.grad = None if index in skip else grad.contiguous(memory_format=_format(param))


def _format(param):
    if param.dim() == 4 and param.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _train(fused, dtype=torch.float64, steps=13, skip=lambda step: (), **kwargs):
    params = _params(dtype, channels_last=kwargs.pop("channels_last", False))
    optimizer = Ranger(params, lr=0.05, fused=fused, foreach=None if fused else False, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        _set_grads(params, generator, skip(step))
        for group in optimizer.param_groups:  # a schedule changing lr every step
            group["lr"] = 0.05 * (1.0 + 0.1 * step)
        optimizer.step()
    return params, optimizer


def _assert_close(params_a, opt_a, params_b, opt_b, rtol=1e-12, atol=1e-14):
    for a, b in zip(params_a, params_b):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert state_a.keys() == state_b.keys()
        for key, value in state_a.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == state_b[key].dtype, key
                torch.testing.assert_close(value, state_b[key], rtol=rtol, atol=atol)
            else:
                assert value == state_b[key], key


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_gc": False},
        {"gc_conv_only": True},
        {"weight_decay": 0.1, "betas": (0.9, 0.99), "k": 5, "alpha": 0.8},
        {"channels_last": True},
    ],
)
def test_fused_matches_the_single_tensor_reference_in_float64(kwargs, kernel):
    fused_params, fused_opt = _train(True, **kwargs)
    ref_params, ref_opt = _train(False, **kwargs)
    _assert_close(fused_params, fused_opt, ref_params, ref_opt)


def test_gradient_centralization_changes_the_fused_step():
    # Guards the parity tests above: GC must really run in the kernel, not be skipped on
    # both sides.
    with_gc, _ = _train(True, steps=2)
    without_gc, _ = _train(True, steps=2, use_gc=False)
    assert not torch.allclose(with_gc[0], without_gc[0])
    assert torch.equal(with_gc[1], without_gc[1])  # 1-D: never centralized


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_with_low_precision_params_matches_the_reference(dtype, kernel):
    fused_params, fused_opt = _train(True, dtype=dtype)
    ref_params, ref_opt = _train(False, dtype=dtype)
    # The moments and slow weights are fp32 on both sides. float32 sqrt in eager torch is not
    # always correctly rounded on CPU (MKL), the kernel's is: the last bit may differ, and a
    # 16-bit param then rounds one way or the other.
    atol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    _assert_close(fused_params, fused_opt, ref_params, ref_opt, rtol=1e-5, atol=atol)
    for param in fused_params:
        assert fused_opt.state[param]["exp_avg"].dtype == torch.float32


def test_fused_steps_params_without_grads_and_different_step_counts(kernel):
    def skip(step):  # param 1 misses some steps, param 3 starts late: step counts differ
        return {1} if step % 3 == 0 else ({3} if step < 4 else set())

    fused_params, fused_opt = _train(True, skip=skip)
    ref_params, ref_opt = _train(False, skip=skip)
    assert len({fused_opt.state[p]["step"] for p in fused_params}) > 1
    _assert_close(fused_params, fused_opt, ref_params, ref_opt)


def test_params_the_kernel_cannot_step_take_the_default_path():
    """A transposed param (dim 0 is not its outermost dimension, so GC's rows are not
    contiguous) and a param whose gradient has other strides than the param."""
    generator = torch.Generator().manual_seed(2)
    values = [torch.randn(7, 5, generator=generator, dtype=torch.float64).t() for _ in range(2)]
    fused = [torch.nn.Parameter(v.clone()) for v in values]  # .clone() keeps the strides
    ref = [torch.nn.Parameter(v.clone()) for v in values]
    fused_opt, ref_opt = Ranger(fused, lr=0.1, fused=True), Ranger(ref, lr=0.1, foreach=False)
    assert not fused[0].is_contiguous()
    for _ in range(7):
        grads = [torch.randn(5, 7, generator=generator, dtype=torch.float64) for _ in fused]
        for params in (fused, ref):
            params[0].grad = grads[0].t().contiguous().t()  # the param's strides
            params[1].grad = grads[1].clone()  # contiguous: not the param's strides
        fused_opt.step()
        ref_opt.step()
    _assert_close(fused, fused_opt, ref, ref_opt)


def test_fused_state_dict_round_trip_continues_exactly():
    generator = torch.Generator().manual_seed(3)
    params = _params(torch.float64)
    optimizer = Ranger(params, lr=0.05, fused=True)
    for _ in range(4):
        _set_grads(params, generator)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(
        {"model": [p.detach().clone() for p in params], "opt": optimizer.state_dict()}, buffer
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = [torch.nn.Parameter(value) for value in checkpoint["model"]]
    resumed_opt = Ranger(resumed, lr=0.05, fused=True)
    resumed_opt.load_state_dict(checkpoint["opt"])
    continuation = [torch.Generator().manual_seed(4) for _ in range(2)]
    for _ in range(9):  # through the Lookahead syncs at steps 6 and 12
        _set_grads(params, continuation[0])
        optimizer.step()
        _set_grads(resumed, continuation[1])
        resumed_opt.step()
    _assert_close(resumed, resumed_opt, params, optimizer, rtol=0, atol=0)


def test_fused_step_leaves_every_tensor_its_own():
    """Nothing is moved into shared buffers: saving one layer writes that layer's bytes, and
    params, grads and state keep storages of their own size."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    optimizer = Ranger(model.parameters(), fused=True)
    for _ in range(3):
        model(torch.randn(8, 64)).sum().backward()
        optimizer.step()
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
    tensors += [value for state in optimizer.state.values() for value in state.values()]
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    buffer = io.BytesIO()
    torch.save(model[1].state_dict(), buffer)
    head_bytes = sum(p.numel() * 4 for p in model[1].parameters())
    assert buffer.tell() < head_bytes + 4096


def test_fused_step_bumps_version_counters_like_an_in_place_update():
    param = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = Ranger([param], fused=True)
    param.grad = torch.randn(4, 3)
    before = param._version
    optimizer.step()
    assert param._version > before


def test_fused_lookahead_controls_and_fresh_or_kept_grads():
    generator = torch.Generator().manual_seed(5)
    fused_params, ref_params = _params(torch.float64), _params(torch.float64)
    fused_opt = Ranger(fused_params, lr=0.05, fused=True)
    ref_opt = Ranger(ref_params, lr=0.05, foreach=False)
    for step in range(8):
        _set_grads(ref_params, generator)
        if step % 2 and step > 1:  # grads kept, zeroed in place, accumulated into
            fused_opt.zero_grad(set_to_none=False)
            for fused, ref in zip(fused_params, ref_params):
                fused.grad.add_(ref.grad)
        else:  # fresh grads, as after zero_grad(set_to_none=True)
            for fused, ref in zip(fused_params, ref_params):
                fused.grad = ref.grad.clone()
        fused_opt.step()
        ref_opt.step()
    _assert_close(fused_params, fused_opt, ref_params, ref_opt)
    with fused_opt.slow_weights(), ref_opt.slow_weights():
        for fused, ref in zip(fused_params, ref_params):
            torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-14)
    fused_opt.sync_lookahead()
    ref_opt.sync_lookahead()
    _assert_close(fused_params, fused_opt, ref_params, ref_opt)


def test_without_a_compiler_the_fused_step_warns_once_in_one_line_at_the_callers_line(
    monkeypatch,
):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'x'\nlong log line 1\nlong log line 2")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(_cpu_kernel, "_kernel", None)  # as if never built in this process
    monkeypatch.setattr(_cpu_kernel, "_unavailable", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused_params, fused_opt = _train(True)
    messages = [w for w in caught if "could not build the C++ CPU kernel" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert "\n" not in str(messages[0].message)
    assert "Error building extension" in str(messages[0].message)
    assert messages[0].filename == __file__  # points at the user's optimizer.step()
    ref_params, ref_opt = _train(False)
    _assert_close(fused_params, fused_opt, ref_params, ref_opt)


def test_the_first_build_says_so_once(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension as cpp_extension

    class FakeModule:
        @staticmethod
        def ranger_step_(*args):
            return []

    def fake_load(name, build_directory, **kwargs):
        (tmp_path / name / f"{name}.so").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name / f"{name}.so").touch()
        return FakeModule

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(_cpu_kernel, "_kernel", None)
    assert _cpu_kernel.step_kernel() is FakeModule.ranger_step_
    assert "building the fused step's C++ CPU kernel" in capsys.readouterr().err
    monkeypatch.setattr(_cpu_kernel, "_kernel", None)  # a new process: the build is cached
    assert _cpu_kernel.step_kernel() is FakeModule.ranger_step_
    assert capsys.readouterr().err == ""
