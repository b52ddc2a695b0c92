"""The opt-in fused step (``Ranger(..., fused=True)``) against the default path.

On CPU the fused step runs the C++ row kernel (`_cpu_kernel`) for params, grads and state of
one dtype, and the compiled kernel otherwise (and on accelerators); the parity tests run both
(``kernel`` fixture). The kernels run on tiny flat buffers here; the compiler and the C++
build cache their code on disk, so later runs skip most of the build time.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch._dynamo.utils import counters

from ranger_plugins import Ranger, _cpu_kernel, _fused

SHAPES = [
    (6, 3, 2, 2),  # conv weight: row length 12
    (6,),
    (5, 12),  # linear weight sharing row length 12 with the conv
    (5,),
    (4, 4),
    (3,),
    (1, 7),  # a single row (padded in the flat buffer)
    (),  # a scalar
]


@pytest.fixture(params=["cpu_rows", "compiled"])
def kernel(request, monkeypatch):
    """Which kernel the fused step runs on CPU: the C++ row kernel or the compiled one."""
    if request.param == "compiled":
        monkeypatch.setattr(_cpu_kernel, "enabled", False)
    else:
        assert _cpu_kernel.rows_kernel() is not None, "the C++ kernel did not build"
    return request.param


def _expected_graphs(kernel: str) -> int:
    # Compiled: two graphs whatever the number of tensors, without and with the Lookahead
    # sync. The C++ kernel compiles nothing.
    return 2 if kernel == "compiled" else 0


def _params(dtype, seed=0, channels_last=False):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES:
        value = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        if channels_last and value.dim() == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        params.append(torch.nn.Parameter(value))
    return params


def _grads(params, generator, skip=()):
    for index, param in enumerate(params):
        grad = torch.randn(param.shape, generator=generator, dtype=torch.float64)
        param.grad = None if index in skip else grad.to(param.dtype)


def _train(fused, dtype=torch.float64, steps=13, skip=lambda step: (), **kwargs):
    params = _params(dtype, channels_last=kwargs.pop("channels_last", False))
    optimizer = Ranger(params, lr=0.05, fused=fused, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        _grads(params, generator, skip(step))
        for group in optimizer.param_groups:  # a schedule changing lr every step
            group["lr"] = 0.05 * (1.0 + 0.1 * step)
        optimizer.step()
    return params, optimizer


def _assert_same(params_a, opt_a, params_b, opt_b, rtol, atol):
    for a, b in zip(params_a, params_b):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert state_a.keys() == state_b.keys()
        if state_a:
            assert state_a["step"] == state_b["step"]
            for key in ("exp_avg", "exp_avg_sq", "slow_param"):
                torch.testing.assert_close(state_a[key], state_b[key], rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "kwargs",
    [dict(weight_decay=0.1), dict(use_gc=False), dict(gc_conv_only=True, channels_last=True)],
)
def test_fused_matches_default_path_in_float64_without_recompiling(kwargs, kernel):
    torch._dynamo.reset()
    _fused._traced_variants.clear()
    counters.clear()
    fused_params, fused_opt = _train(True, **dict(kwargs))
    ref_params, ref_opt = _train(False, **dict(kwargs))
    _assert_same(fused_params, fused_opt, ref_params, ref_opt, rtol=1e-12, atol=1e-14)
    # The lr changed at every step and caused no recompile.
    assert counters["stats"]["unique_graphs"] == _expected_graphs(kernel)


def test_square_first_block_does_not_make_later_blocks_recompile(monkeypatch):
    # The first kernel call steps the 12 x 12 weight alone (the longest rows come first), then
    # a 5 x 7 block and the 2-row block of the bias: one graph per Lookahead variant.
    monkeypatch.setattr(_cpu_kernel, "enabled", False)
    torch._dynamo.reset()
    _fused._traced_variants.clear()  # the reset dropped the graphs traced without duck shapes
    counters.clear()
    generator = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(shape, generator=generator))
        for shape in [(12, 12), (5, 7), (5,)]
    ]
    optimizer = Ranger(params, fused=True)
    for _ in range(7):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
    assert counters["stats"]["unique_graphs"] == 2


def test_fused_in_row_blocks_matches_default_path_without_recompiling(monkeypatch, kernel):
    # Compiled kernel: blocks of 2 rows (row length 12) and 4 rows (row length 4); the linear
    # weight's 5 rows end in a 3-row block, since a 1-row remainder joins the block before it.
    # C++ kernel: calls are not split, one per param that owns its calls.
    monkeypatch.setattr(_fused, "_BLOCK_NUMEL", 24)
    monkeypatch.setattr(_fused, "_OWN_NUMEL", 12)
    torch._dynamo.reset()
    _fused._traced_variants.clear()
    counters.clear()
    fused_params, fused_opt = _train(True)
    (flat_group,) = _fused._caches[fused_opt].groups[0]
    block_rows = [block.views[1].shape[0] for block in flat_group.blocks]
    if kernel == "compiled":
        assert block_rows.count(2) >= 5 and 3 in block_rows and 1 not in block_rows
    else:
        owned_rows = [
            block.views[1].shape[0] for block in flat_group.blocks if block.owner is not None
        ]
        assert sorted(owned_rows) == [4, 5, 6] and 1 not in block_rows
    # The conv, linear and 4x4 weights have blocks of their own, so their fresh gradients
    # (new tensors every step here) are read where they are; the others are copied into the
    # flat buffer, and their .grad points there.
    flat_storage = flat_group.flat_grad.untyped_storage().data_ptr()
    in_flat = [p.grad.untyped_storage().data_ptr() == flat_storage for p in flat_group.params]
    owned = [p.shape in {(6, 3, 2, 2), (5, 12), (4, 4)} for p in flat_group.params]
    assert len(flat_group.own_blocks) == 3
    assert in_flat == [not own for own in owned]
    ref_params, ref_opt = _train(False)
    _assert_same(fused_params, fused_opt, ref_params, ref_opt, rtol=1e-12, atol=1e-14)
    assert counters["stats"]["unique_graphs"] == _expected_graphs(kernel)


def test_row_blocks_cover_every_row_once_in_blocks_of_two_rows_or_more(monkeypatch):
    import random

    monkeypatch.setattr(_fused, "_OWN_NUMEL", 32)
    rng = random.Random(0)
    for _ in range(500):
        row_length = rng.choice([1, 3, 8, 40])
        members = [
            (position, rng.choice([1, 1, 2, 3, 7, 30])) for position in range(rng.randint(1, 6))
        ]
        rows = sum(r for _, r in members)
        rows += rows == 1  # the padding row of a single-row segment
        segment = _fused._Segment(0, rows, row_length, True, members)
        block_numel = rng.choice([64, None])  # the compiled kernel's blocks, or the C++ one's
        blocks = _fused._row_blocks(segment, on_cpu=True, block_numel=block_numel)
        assert blocks[0][0] == 0 and blocks[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert all(end - first >= 2 for first, end, _ in blocks)
        first_row = 0
        for position, member_rows in members:  # an owned block lies inside its owner
            for first, end, owner in blocks:
                if owner == position:
                    assert first_row <= first and end <= first_row + member_rows
            first_row += member_rows
    gpu_segment = _fused._Segment(0, 40, 8, True, [(0, 40)])
    assert _fused._row_blocks(gpu_segment, on_cpu=False, block_numel=None) == [(0, 40, None)]


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_is_one_loop_without_temporaries(param_dtype):
    """Bandwidth is the whole game: the kernel must read and write each buffer once. With
    inductor's default heuristics the sync step's result (stored to both param and slow
    weights) went to a full-size temporary and was copied out in a second loop."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    rows, row_length = 256, 256  # big enough for a parallel loop
    param = torch.randn(rows, row_length).to(param_dtype)
    grad = torch.randn(rows, row_length).to(param_dtype)
    exp_avg, exp_avg_sq, slow = (torch.rand(rows, row_length) for _ in range(3))
    mean = grad.float().mean(dim=1, keepdim=True)
    for sync in (False, True):
        hyperparameters = torch.tensor((0.99, 0.05, 0.999, 0.001, 1e-5, -1e-3, 0.5, 1.0))
        _, code = run_and_get_code(
            _fused._kernel(), param, grad, mean, exp_avg, exp_avg_sq, slow, hyperparameters, sync
        )
        source = "\n".join(code)
        assert source.count("#pragma omp for") == 1, f"sync={sync}: more than one loop"
        assert not re.search(r"buf\d+ = empty", source), f"sync={sync}: a temporary buffer"


def test_fused_state_lives_in_flat_buffers_of_exactly_three_param_sizes():
    params, optimizer = _train(True, steps=2)
    storages = {}
    for param in params:
        state = optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq", "slow_param"):
            storages.setdefault(key, set()).add(state[key].untyped_storage().data_ptr())
        assert param.grad.untyped_storage().data_ptr() != param.untyped_storage().data_ptr()
    assert all(len(pointers) == 1 for pointers in storages.values())
    state_bytes = sum(
        optimizer.state[p][key].numel() * optimizer.state[p][key].element_size()
        for p in params
        for key in ("exp_avg", "exp_avg_sq", "slow_param")
    )
    assert state_bytes == 3 * sum(p.numel() * p.element_size() for p in params)


def test_fused_with_low_precision_params_matches_default_path(kernel):
    # On CPU fp32 params take the kernel under test; bf16 params (fp32 state) always the
    # compiled one.
    for dtype in (torch.float32, torch.bfloat16):
        fused_params, fused_opt = _train(True, dtype=dtype)
        ref_params, ref_opt = _train(False, dtype=dtype)
        for param in fused_params:
            assert fused_opt.state[param]["exp_avg"].dtype == torch.float32
        # fp32: rounding of the fused arithmetic; bf16: one bf16 ulp of the rounded result.
        tolerance = (
            dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        )
        _assert_same(fused_params, fused_opt, ref_params, ref_opt, **tolerance)


def test_fused_steps_params_without_grads_like_the_default_path():
    def skip(step):  # param 1 misses some steps, param 3 starts late: step counts differ
        return {1} if step % 3 == 0 else ({3} if step < 4 else set())

    fused_params, fused_opt = _train(True, skip=skip)
    ref_params, ref_opt = _train(False, skip=skip)
    steps = {fused_opt.state[p]["step"] for p in fused_params}
    assert len(steps) > 1
    _assert_same(fused_params, fused_opt, ref_params, ref_opt, rtol=1e-12, atol=1e-14)


def test_fused_state_dict_round_trip_continues_exactly():
    generator = torch.Generator().manual_seed(3)
    params = _params(torch.float64)
    optimizer = Ranger(params, lr=0.05, fused=True)
    for _ in range(4):
        _grads(params, generator)
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
    for _ in range(9):  # through the Lookahead sync at step 6 and 12
        _grads(params, continuation[0])
        optimizer.step()
        _grads(resumed, continuation[1])
        resumed_opt.step()
    _assert_same(resumed, resumed_opt, params, optimizer, rtol=0, atol=0)
    # After loading, the state was moved back into flat buffers.
    pointers = {resumed_opt.state[p]["exp_avg"].untyped_storage().data_ptr() for p in resumed}
    assert len(pointers) == 1


def test_fused_lookahead_controls_and_fresh_or_kept_grads():
    generator = torch.Generator().manual_seed(5)
    fused_params = _params(torch.float64)
    ref_params = _params(torch.float64)
    fused_opt = Ranger(fused_params, lr=0.05, fused=True)
    ref_opt = Ranger(ref_params, lr=0.05)
    for step in range(8):
        _grads(ref_params, generator)
        if step % 2:  # grads kept in the flat buffer, zeroed in place, accumulated into
            fused_opt.zero_grad(set_to_none=False)
            for fused, ref in zip(fused_params, ref_params):
                fused.grad.add_(ref.grad)
        else:  # fresh grads, as after zero_grad(set_to_none=True)
            for fused, ref in zip(fused_params, ref_params):
                fused.grad = ref.grad.clone()
        fused_opt.step()
        ref_opt.step()
    _assert_same(fused_params, fused_opt, ref_params, ref_opt, rtol=1e-12, atol=1e-14)
    with fused_opt.slow_weights(), ref_opt.slow_weights():
        for fused, ref in zip(fused_params, ref_params):
            torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-14)
    fused_opt.sync_lookahead()
    ref_opt.sync_lookahead()
    _assert_same(fused_params, fused_opt, ref_params, ref_opt, rtol=1e-12, atol=1e-14)


def test_fused_follows_cleared_state_and_replaced_storage():
    """fastai's freeze_to clears the state in place, model.to() replaces param storage:
    the flat buffers are rebuilt from the params' current values, like the default path."""
    generator = torch.Generator().manual_seed(6)
    fused_params, ref_params = _params(torch.float64), _params(torch.float64)
    fused_opt = Ranger(fused_params, lr=0.05, fused=True)
    ref_opt = Ranger(ref_params, lr=0.05)

    def step_both():
        _grads(ref_params, generator)
        for fused, ref in zip(fused_params, ref_params):
            fused.grad = ref.grad.clone()
        fused_opt.step()
        ref_opt.step()

    for _ in range(3):
        step_both()
    fused_opt.state.clear()
    ref_opt.state.clear()
    step_both()
    fused_params[0].data = fused_params[0].data.clone()  # as model.to(other device) does
    for _ in range(7):
        step_both()
    assert fused_opt.state[fused_params[0]]["step"] == 8
    _assert_same(fused_params, fused_opt, ref_params, ref_opt, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_benchmark_quick_run_prints_every_row(tmp_path, capsys):
    from ranger_plugins import bench

    chart = tmp_path / "bench.png"
    threads = torch.get_num_threads()
    try:
        results = bench.main(
            ["--quick", "--workloads", "small800", "--rounds", "1", "--threads", "1"]
            + ["--output", str(chart)]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert [r["name"] for r in results] == ["small800"]
    for result in results:
        names = [row["name"] for row in result["rows"]]
        assert names == [row.name for row in bench.build_rows(include_fused=True)]
        assert result["floor_ms"] > 0
        assert {peer for _, peer, speedup in result["gc_speedups"] if speedup > 0} == {
            "pytorch_optimizer.Ranger (GC)"
        }
        for _, (state_bytes, peak) in result["memory"].items():
            assert state_bytes == 3 * result["param_bytes"]
            assert peak >= 0
    for label in (
        "fastai Learner epoch, ranger_plugins.fastai.ranger (no GC, fastai's default)",
        "fastai Learner epoch, ranger_plugins.fastai.ranger(fused=True)",
        "fastai Learner epoch, fastai.optimizer.ranger (no GC)",
        "Lightning epoch, ranger_plugins.lightning.ranger_optimizers (GC on)",
        "Lightning epoch, ranger_optimizers(use_gc=False) (like the peer)",
        "Lightning epoch, ranger_optimizers(fused=True) (GC on)",
        "Lightning epoch, torch_optimizer.Ranger (no GC; + closure call)",
    ):
        line = next(line for line in out.splitlines() if line.startswith(label + " "))
        assert line.rstrip().endswith(" s"), line  # timed, not skipped or failed
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fused_falls_back_to_the_compiled_kernel_where_the_cpu_kernel_cannot_be_built(
    monkeypatch,
):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(_cpu_kernel, "_kernel", None)  # as if never built in this process
    monkeypatch.setattr(_cpu_kernel, "_unavailable", False)
    with pytest.warns(RuntimeWarning, match="could not build the CPU kernel"):
        fused_params, fused_opt = _train(True)
    (flat_group,) = _fused._caches[fused_opt].groups[0]
    assert flat_group.rows_kernel is None and _cpu_kernel.rows_kernel() is None
    ref_params, ref_opt = _train(False)
    _assert_same(fused_params, fused_opt, ref_params, ref_opt, rtol=1e-12, atol=1e-14)
