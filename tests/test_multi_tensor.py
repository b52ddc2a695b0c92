"""The default multi-tensor path against `_single_tensor_ranger`, the readable ground truth:
the same operations on every element in the same order, so the results are bitwise equal.

The wave sizes are shrunk so that small test tensors exercise every code path of the fast
implementation: row-aligned chunks of large tensors, batched GC of small ones, waves holding
many pieces, and tensors that cannot be cut (channels_last, bf16 working copies).
"""

from __future__ import annotations

import pytest
import torch
from optim_helpers import make_params

from ranger_plugins import Ranger, _multi_tensor

SHAPES = [
    (12, 5, 3, 3),  # conv weight, cut into row-aligned chunks
    (12,),
    (40, 7),  # linear weight, cut into chunks
    (7,),
    (3, 4),  # small: batched GC (row length 4)
    (5, 4),  # small: batched GC with the one above
    (2, 3, 2),  # small, 3-D
    (1, 9),  # a single row
    (300,),  # 1-D, cut into chunks
    (),  # a scalar parameter
]


@pytest.fixture(autouse=True)
def _small_waves(monkeypatch):
    monkeypatch.setattr(_multi_tensor, "_WAVE_NUMEL", 64)
    monkeypatch.setattr(_multi_tensor, "_SMALL_GC_NUMEL", 32)
    monkeypatch.setattr(_multi_tensor, "_MIN_GATHERED_PIECES", 2)


def _make_params(dtype, seed=0):
    # The shapes above, then a channels_last conv weight (which the waves cannot cut).
    return make_params(dtype, SHAPES, seed) + make_params(
        dtype, [(6, 3, 2, 2)], seed + 1, channels_last=True
    )


def _grad_schedule(n_params, n_steps, seed=1):
    """Per step, the gradient of each param or None: some params skip steps, so the params'
    own step counts differ and buckets split by step."""
    generator = torch.Generator().manual_seed(seed)
    return [
        [
            None if (index % 4 == 1 and step % 3 == 0) or (index == 3 and step < 4) else generator
            for index in range(n_params)
        ]
        for step in range(n_steps)
    ]


def _run(foreach, dtype, steps=14, **kwargs):
    params = _make_params(dtype)
    optimizer = Ranger(params, lr=0.05, foreach=foreach, **kwargs)
    generator = torch.Generator().manual_seed(1)
    history = []
    for step_mask in _grad_schedule(len(params), steps):
        for param, has_grad in zip(params, step_mask):
            grad = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.grad = (
                None
                if has_grad is None
                else grad.to(dtype).contiguous(
                    memory_format=torch.channels_last
                    if param.dim() == 4 and not param.is_contiguous()
                    else torch.contiguous_format
                )
            )
        optimizer.step()
        history.append([None if p.grad is None else p.grad.clone() for p in params])
    return params, optimizer, history


@pytest.mark.parametrize("use_gc", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("gc_conv_only", [False, True])
def test_multi_tensor_equals_single_tensor_in_float64(use_gc, weight_decay, gc_conv_only):
    kwargs = dict(use_gc=use_gc, weight_decay=weight_decay, gc_conv_only=gc_conv_only)
    fast_params, fast_opt, fast_grads = _run(True, torch.float64, **kwargs)
    ref_params, ref_opt, ref_grads = _run(False, torch.float64, **kwargs)
    steps = [ref_opt.state[p]["step"] for p in ref_params]
    assert len(set(steps)) > 1  # the schedule really gives params different step counts
    for fast, ref in zip(fast_params, ref_params):
        torch.testing.assert_close(fast, ref, rtol=0, atol=0)
        fast_state, ref_state = fast_opt.state[fast], ref_opt.state[ref]
        assert fast_state["step"] == ref_state["step"]
        for key in ("exp_avg", "exp_avg_sq", "slow_param"):
            torch.testing.assert_close(fast_state[key], ref_state[key], rtol=0, atol=0)
    # GC is applied to the gradients in place on both paths.
    for fast_step, ref_step in zip(fast_grads, ref_grads):
        for fast, ref in zip(fast_step, ref_step):
            if ref is not None:
                torch.testing.assert_close(fast, ref, rtol=0, atol=0)


def test_multi_tensor_equals_single_tensor_with_bf16_and_fp32():
    for dtype in (torch.bfloat16, torch.float32):
        fast_params, fast_opt, _ = _run(True, dtype)
        ref_params, ref_opt, _ = _run(False, dtype)
        for fast, ref in zip(fast_params, ref_params):
            assert fast.dtype == dtype
            torch.testing.assert_close(fast, ref, rtol=0, atol=0)
            for key in ("exp_avg", "exp_avg_sq", "slow_param"):
                assert fast_opt.state[fast][key].dtype == torch.float32
                torch.testing.assert_close(
                    fast_opt.state[fast][key], ref_opt.state[ref][key], rtol=0, atol=0
                )


def test_waves_bound_the_temporary_and_cover_every_element(monkeypatch):
    """Each wave holds at most one chunk beyond the limit, and pieces tile the tensors."""
    params = [torch.randn(s, dtype=torch.float64) for s in SHAPES if s]
    grads = [p.clone() for p in params]
    states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    plan = _multi_tensor._Plan(params, grads, *states, use_gc=True, gc_conv_only=False)
    waves = [(wave.state[0], wave.grads(grads)) for wave in plan.waves]
    covered = sum(piece.numel() for wave in waves for piece in wave[0])
    assert covered == sum(p.numel() for p in params)
    for wave_params, wave_grads in waves:
        assert (
            len(wave_params) == 1
            or sum(p.numel() for p in wave_params) <= _multi_tensor._WAVE_NUMEL
        )
        for param_piece, grad_piece in zip(wave_params, wave_grads):
            # Each gradient holds its param's values: a piece cut from the same region of the
            # gradient as of the param has the same values.
            assert torch.equal(param_piece, grad_piece)


def test_default_path_runs_on_a_device_without_host_values():
    """Meta tensors have no values: any host sync (.item(), bool of a tensor) would raise.
    This also takes the accelerator branch (waves sized for kernel launches, no 0-d CPU
    scalars)."""
    shapes = [(64, 3, 3, 3), (64,), (10, 64), (10,)]
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
    optimizer = Ranger(params, weight_decay=0.1)
    for _ in range(7):
        for param in params:
            param.grad = torch.empty_like(param)
        optimizer.step()
    assert all(optimizer.state[p]["step"] == 7 for p in params)
    assert optimizer.state[params[0]]["exp_avg"].device.type == "meta"


@pytest.mark.parametrize("fused", [False, True])
def test_empty_params_step_like_the_reference(fused):
    shapes = [(0, 5), (3, 4), (0,)]
    reference = [torch.nn.Parameter(torch.ones(s, dtype=torch.float64)) for s in shapes]
    params = [torch.nn.Parameter(torch.ones(s, dtype=torch.float64)) for s in shapes]
    optimizer = Ranger(params, lr=0.1, fused=fused)
    reference_optimizer = Ranger(reference, lr=0.1, foreach=False)
    for _ in range(3):
        for param, ref in zip(params, reference):
            param.grad = torch.arange(param.numel(), dtype=torch.float64).view(param.shape)
            ref.grad = param.grad.clone()
        optimizer.step()
        reference_optimizer.step()
    tolerance = 1e-12 if fused else 0.0  # the compiled kernel may round differently
    for param, ref in zip(params, reference):
        torch.testing.assert_close(param, ref, rtol=tolerance, atol=tolerance)


def _many_small_params(seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (5,), (7,), (2, 2, 3), (), (1, 4), (9,), (6, 1)] * 6
    return [
        torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64)) for s in shapes
    ]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_kept_plans_stay_equal_to_single_tensor_across_reloads_and_regrads(weight_decay):
    """Steady state (the same gradient tensors every step: the plan is kept and its waves of
    small tensors hold the moments in flat buffers), then fresh gradient tensors, then a
    reloaded state (new state tensors: the plan is rebuilt): bitwise equal throughout."""
    fast_params, ref_params = _many_small_params(0), _many_small_params(0)
    fast = Ranger(fast_params, lr=0.05, weight_decay=weight_decay)
    ref = Ranger(ref_params, lr=0.05, weight_decay=weight_decay, foreach=False)
    generator = torch.Generator().manual_seed(2)
    grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in fast_params]
    for step in range(20):
        if step == 8:  # fresh gradient tensors from now on
            grads = [g * 1.5 for g in grads]
        if step == 13:  # reload both from a checkpoint
            fast.load_state_dict(_checkpoint_round_trip(fast.state_dict()))
            ref.load_state_dict(_checkpoint_round_trip(ref.state_dict()))
        for fast_param, ref_param, grad in zip(fast_params, ref_params, grads):
            fast_param.grad = grad if step < 8 else grad.clone()
            ref_param.grad = grad.clone()
        fast.step()
        ref.step()
        for fast_param, ref_param in zip(fast_params, ref_params):
            torch.testing.assert_close(fast_param, ref_param, rtol=0, atol=0)
    assert any(plan._gathered for cache in fast._plan_caches.values() for _, plan in cache.values())
    for fast_param, ref_param in zip(fast_params, ref_params):
        for key in ("exp_avg", "exp_avg_sq", "slow_param"):
            torch.testing.assert_close(
                fast.state[fast_param][key], ref.state[ref_param][key], rtol=0, atol=0
            )


def _checkpoint_round_trip(state_dict):
    """A checkpoint round trip, as `torch.save` / `torch.load(weights_only=True)`."""
    import io

    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", ["ranger_qh", "ranger_va"])
def test_variant_foreach_steps_in_waves_equal_their_single_tensor_steps(name, monkeypatch):
    """With tiny waves (the module's fixture) the variants' foreach steps cut tensors into
    chunks and run wave by wave: still bitwise equal to their single-tensor steps."""
    from ranger_plugins import OPTIMIZERS

    monkeypatch.setattr(_multi_tensor, "_WAVE_NUMEL", 16)
    params = _make_params(torch.float64)
    waves = _multi_tensor.foreach_waves([params])
    assert sum(len(wave[0]) for wave in waves) > len(params)  # large tensors were cut
    assert len(waves) > 1
    runs = []
    for foreach in (True, False):
        params = _make_params(torch.float64)
        optimizer = OPTIMIZERS[name](params, lr=0.05, weight_decay=0.01, foreach=foreach)
        generator = torch.Generator().manual_seed(3)
        for _ in range(13):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            optimizer.step()
        runs.append((params, optimizer))
    (fast, fast_opt), (ref, ref_opt) = runs
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)
        for key, value in fast_opt.state[a].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, ref_opt.state[b][key]), key
