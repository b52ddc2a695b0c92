"""Ranger and LookaheadCallback beyond one process: DDP, FSDP2 (DTensor), unsupported shardings.

The multi-process runs happen in child processes (tests/dist_*.py) with a timeout, so a crash
or a hang fails the test instead of blocking the suite; each child ends its process group
cleanly (gc.collect, barrier, destroy_process_group).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

TESTS = Path(__file__).parent
TIMEOUT = 240  # seconds per child run; normally well under a minute


def _import_helper(name: str):
    spec = importlib.util.spec_from_file_location(name, TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_children(script: str, *args: str) -> str:
    """Run a helper script (it starts the ranks); kill its whole process group on timeout."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(TESTS / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{script} {args} timed out after {TIMEOUT}s:\n{output[-4000:]}")
    assert process.returncode == 0, f"{script} {args} failed:\n{output[-4000:]}"
    assert "terminate called" not in output, output[-4000:]
    return output


def _load_ranks(out_dir: Path) -> list[dict]:
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


@pytest.fixture(scope="module")
def reference():
    """Single-process runs on the same global batch of 8, with and without GC."""
    helper = _import_helper("dist_lightning_train")
    torch.manual_seed(0)
    with_gc = helper.train("auto", devices=1, per_rank_batch=helper.GLOBAL_BATCH)
    without_gc = helper.train("auto", devices=1, per_rank_batch=helper.GLOBAL_BATCH, use_gc=False)
    return with_gc, without_gc


def _check_against_reference(ranks, reference, expected_placement):
    with_gc, without_gc = reference
    first, second = ranks
    assert {first["rank"], second["rank"]} == {0, 1} and first["world_size"] == 2
    assert set(first["placements"].values()) == {expected_placement}
    for name in with_gc["fast"]:
        # All ranks hold identical fast and slow weights...
        assert torch.equal(first["fast"][name], second["fast"][name]), name
        assert torch.equal(first["slow"][name], second["slow"][name]), name
        # ...equal to the single-process run on the same global batches (up to the order of
        # the gradient sum), and the final Lookahead sync left fast == slow.
        torch.testing.assert_close(first["fast"][name], with_gc["fast"][name], rtol=0, atol=1e-6)
        torch.testing.assert_close(first["slow"][name], with_gc["slow"][name], rtol=0, atol=1e-6)
        assert torch.equal(first["fast"][name], first["slow"][name])
    # The tolerance is far below what GC changes, so the match shows GC ran as unsharded.
    gc_effect = max(
        (with_gc["fast"][n] - without_gc["fast"][n]).abs().max().item() for n in with_gc["fast"]
    )
    assert gc_effect > 1e-4
    for rank in ranks:
        assert rank["steps"] == with_gc["steps"] == [16] and rank["global_step"] == 16
        # Validation (after batches 3 and 6 of each epoch, 1 batch per rank) on slow weights.
        assert rank["validated_on_slow_weights"] == [True] * 8


def test_ddp_two_cpu_processes_match_single_process(tmp_path, reference):
    _run_children("dist_lightning_train.py", "ddp", str(tmp_path))
    _check_against_reference(_load_ranks(tmp_path), reference, "None")


def test_ddp_with_the_fused_step_matches_the_default_single_process_run(tmp_path, reference):
    # The fused step's C++ kernel reads the DDP-reduced gradients where DDP left them; it
    # equals the default path up to fp32 rounding.
    _run_children("dist_lightning_train.py", "ddp", str(tmp_path), "--fused")
    ranks = _load_ranks(tmp_path)
    _check_against_reference(ranks, reference, "None")
    # The C++ kernel ran on every step of both groups and stepped every param it was given.
    for rank in ranks:
        calls = rank["fused_kernel_calls"]
        assert len(calls) >= 2 * rank["global_step"]
        assert all(given == stepped for given, stepped in calls)


def _crash_and_resume(tmp_path: Path, strategy: str, *options: str) -> list[dict]:
    """A checkpoint at step 8 (syncs at 5, 10, 15, so fast and slow weights differ), the run
    stopped at step 10, resumed from the checkpoint in new processes from another init."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    first.mkdir()
    resumed.mkdir()
    script = "dist_lightning_train.py"
    _run_children(script, strategy, str(first), "--stop-and-save", str(tmp_path), *options)
    assert [rank["steps"] for rank in _load_ranks(first)] == [[10], [10]]
    checkpoint = tmp_path / "step=8.ckpt"
    _run_children(script, strategy, str(resumed), "--resume", str(checkpoint), *options)
    return _load_ranks(resumed)


def _check_resumed_run(ranks: list[dict], reference) -> None:
    # The end state equals the uninterrupted single-process run as closely as an
    # uninterrupted multi-process run does; a resume that lost the fast weights (training on
    # from the slow ones) misses by ~4e-4.
    with_gc, _ = reference
    for name in with_gc["fast"]:
        for kind in ("fast", "slow"):
            assert torch.equal(ranks[0][kind][name], ranks[1][kind][name]), name
            torch.testing.assert_close(ranks[0][kind][name], with_gc[kind][name], rtol=0, atol=1e-6)
    for rank in ranks:
        assert rank["steps"] == [16] and rank["global_step"] == 16
        assert rank["validated_on_slow_weights"] and all(rank["validated_on_slow_weights"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_checkpoints_written_after_fit_resume_like_one_run(tmp_path, reference, strategy):
    """last.ckpt written in on_train_end and a save_checkpoint after fit hold the training
    state from before the end-of-fit sync, so resuming either ends where one run does."""
    script = "dist_lightning_train.py"
    first = tmp_path / "first"
    first.mkdir()
    _run_children(script, strategy, str(first), "--save-after-fit", str(tmp_path))
    assert [rank["steps"] for rank in _load_ranks(first)] == [[8], [8]]
    for name in ("last.ckpt", "after_fit.ckpt"):
        resumed = tmp_path / f"resumed-{name}"
        resumed.mkdir()
        _run_children(script, strategy, str(resumed), "--resume", str(tmp_path / name))
        _check_resumed_run(_load_ranks(resumed), reference)


def test_ddp_resumed_from_a_checkpoint_between_syncs_matches_single_process(tmp_path, reference):
    ranks = _crash_and_resume(tmp_path, "ddp")
    assert torch.load(tmp_path / "step=8.ckpt", weights_only=True)["global_step"] == 8
    _check_resumed_run(ranks, reference)


def test_fsdp2_model_parallel_strategy_matches_unsharded_run(tmp_path, reference):
    # ModelParallelStrategy + fully_shard: Ranger steps DTensor params sharded Shard(0).
    _run_children("dist_lightning_train.py", "fsdp2", str(tmp_path))
    _check_against_reference(_load_ranks(tmp_path), reference, "(Shard(dim=0),)")


@pytest.mark.parametrize("checkpoint_kind", ["sharded", "full"])
def test_fsdp2_resumed_from_a_checkpoint_between_syncs_matches_single_process(
    tmp_path, reference, checkpoint_kind
):
    # Sharded: a directory the strategy writes shard by shard (only its state_dict and
    # optimizer_states are sharded; the rest is rank 0's file). Full: one file, every rank
    # loads it, and the strategy's load_model_state_dict does nothing.
    options = ("--full-checkpoint",) if checkpoint_kind == "full" else ()
    ranks = _crash_and_resume(tmp_path, "fsdp2", *options)
    checkpoint = tmp_path / "step=8.ckpt"
    assert checkpoint.is_dir() == (checkpoint_kind == "sharded")
    # Rank 0's part of a sharded checkpoint holds no shards (they would be rank 0's only).
    saved = torch.load(
        checkpoint / "meta.pt" if checkpoint.is_dir() else checkpoint, weights_only=True
    )
    assert saved["global_step"] == 8
    assert ("lookahead_fast_state_dict" in saved) == (checkpoint_kind == "full")
    assert set(ranks[0]["placements"].values()) == {"(Shard(dim=0),)"}
    _check_resumed_run(ranks, reference)


@pytest.fixture(scope="module")
def sharding_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gc_sharding")
    _run_children("dist_gc_sharding.py", str(out_dir))
    return _load_ranks(out_dir)


def test_dtensor_shard0_steps_equal_full_tensor_steps(sharding_results):
    for rank in sharding_results:
        # 13 float64 steps, GC and two Lookahead syncs, on both implementations: bitwise.
        for errors in (rank["shard0_errors_foreach"], rank["shard0_errors_single"]):
            assert errors == {0: 0.0, 1: 0.0, 2: 0.0}


def test_shard1_with_gc_raises_a_clear_error(sharding_results):
    for rank in sharding_results:
        message = rank["shard1_message"]
        assert "Gradient Centralization" in message and "Shard on dim 0" in message


def test_ranger_optimizers_refuses_fsdp1_flattened_params(sharding_results):
    for rank in sharding_results:
        for message in rank["fsdp1"]["adapter_messages"].values():
            assert "FSDP1" in message and "use_gc=False" in message
        assert set(rank["fsdp1"]["adapter_messages"]) == {False, True}


def test_core_ranger_refuses_fsdp1_flat_parameter(sharding_results):
    assert all(rank["fsdp1"]["core_refuses"] for rank in sharding_results)


# -- Ranger's low-memory state (state_precision) ------------------------------------------


def test_ddp_with_8bit_state_keeps_the_ranks_identical(tmp_path):
    _run_children("dist_lightning_train.py", "ddp", str(tmp_path), "--state-precision", "8bit")
    first, second = _load_ranks(tmp_path)
    assert {first["rank"], second["rank"]} == {0, 1}
    # 8-bit moments for the 32 x 128 weight, 16-bit ones for the small params, and the slow
    # weights as a bf16 difference from the fast ones.
    assert first["state_dtypes"]["layer.0.weight"] == {
        "exp_avg": "torch.int8",
        "exp_avg_sq": "torch.uint8",
        "slow_delta": "torch.bfloat16",
        "exp_avg_scale": "torch.float32",
        "exp_avg_sq_scale": "torch.float32",
    }
    assert first["state_dtypes"]["layer.2.bias"] == dict.fromkeys(
        ("exp_avg", "exp_avg_sq", "slow_delta"), "torch.bfloat16"
    )
    assert first["state_dtypes"] == second["state_dtypes"]
    for name in first["fast"]:
        # Bitwise the same on both ranks (the stochastic rounding hashes the step and the
        # element index, not a random stream), and the final sync left fast == slow.
        assert torch.equal(first["fast"][name], second["fast"][name]), name
        assert torch.equal(first["slow"][name], second["slow"][name]), name
        assert torch.equal(first["fast"][name], first["slow"][name]), name
        assert torch.isfinite(first["fast"][name]).all(), name
    for rank in (first, second):
        assert rank["steps"] == [16] and rank["global_step"] == 16
        assert rank["validated_on_slow_weights"] == [True] * 8


def test_fsdp2_with_a_low_memory_precision_tells_the_user_to_use_full(tmp_path):
    # FSDP2's params are DTensors, which the low-memory step does not take: the core's
    # error reaches the user on every rank (and the ranks end cleanly).
    _run_children("dist_lightning_train.py", "fsdp2", str(tmp_path), "--state-precision", "8bit")
    for rank in _load_ranks(tmp_path):
        message = rank["error"]
        assert "state_precision" in message and "'full'" in message, message
        assert "DTensor" in message, message
