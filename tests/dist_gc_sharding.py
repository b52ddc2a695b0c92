"""Ranger on DTensor parameters in 2 spawned gloo processes (no Lightning).

Run by tests/test_distributed.py::

    python tests/dist_gc_sharding.py OUT_DIR

Each rank checks, and records in OUT_DIR/rank{r}.pt:

* Shard(0) (FSDP2's placement): 13 Ranger steps (two Lookahead syncs, GC on) on DTensors equal
  the same steps on the full tensors, also for a dim 0 that does not split evenly;
  ``slow_weights()`` and ``sync_lookahead()`` work on DTensors.
* Shard(1) splits the rows GC averages over: ``step()`` raises and changes nothing.
* FSDP1's flattened parameters: `ranger_optimizers` raises instead of skipping GC (and
  whether the core `Ranger` does is recorded).

A failed check raises, which makes the process (and the test) fail.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ranger_plugins import Ranger

WORLD_SIZE = 2
STEPS = 13


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def check_shard0_matches_full(mesh, foreach):
    from torch.distributed.tensor import Shard, distribute_tensor

    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 6), (4, 3, 2, 2), (7,)]  # 5 rows split 3 + 2; a conv weight; a bias
    fulls = [torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes]
    grads = [
        [torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes]
        for _ in range(STEPS)
    ]
    plain = [torch.nn.Parameter(t.clone()) for t in fulls]
    no_gc = [torch.nn.Parameter(t.clone()) for t in fulls]
    sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in fulls]
    kwargs = dict(lr=1e-2, weight_decay=1e-2, k=6, use_gc=True, foreach=foreach)
    plain_opt, sharded_opt = Ranger(plain, **kwargs), Ranger(sharded, **kwargs)
    no_gc_opt = Ranger(no_gc, **{**kwargs, "use_gc": False})
    for step_grads in grads:
        for p, q, r, g in zip(plain, sharded, no_gc, step_grads):
            p.grad = g.clone()
            r.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        plain_opt.step()
        sharded_opt.step()
        no_gc_opt.step()
    # GC made a difference to the multi-dim weights, so the comparison below can see it.
    for index in (0, 1):
        assert (no_gc[index] - plain[index]).abs().max() > 1e-4
    errors = {}
    for index, (p, q) in enumerate(zip(plain, sharded)):
        assert q.placements == (Shard(0),)
        errors[index] = (_full(q) - p).abs().max().item()
        torch.testing.assert_close(_full(q), p.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            _full(sharded_opt.state[q]["slow_param"]), plain_opt.state[p]["slow_param"]
        )
    # Evaluation on the slow weights and a forced sync work on DTensors too.
    before = [_full(q).clone() for q in sharded]
    with sharded_opt.slow_weights():
        for p, q in zip(plain, sharded):
            torch.testing.assert_close(_full(q), plain_opt.state[p]["slow_param"])
    for q, value in zip(sharded, before):
        assert torch.equal(_full(q), value)
    sharded_opt.sync_lookahead()
    plain_opt.sync_lookahead()
    for p, q in zip(plain, sharded):
        torch.testing.assert_close(_full(q), p.detach())
    return errors


def check_shard1_refused(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    full = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    param = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(1)]))
    param.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])
    optimizer = Ranger([param], use_gc=True)
    try:
        optimizer.step()
    except RuntimeError as error:
        message = str(error)
    else:
        raise AssertionError("Ranger stepped a Shard(1) parameter with GC on")
    assert "sharded on dim 1" in message and "use_gc=False" in message, message
    assert not optimizer.state and torch.equal(_full(param), full)  # nothing changed
    Ranger([param], use_gc=False).step()  # without GC it is fine
    assert not torch.equal(_full(param), full)
    return message


def check_fsdp1_refused():
    """FSDP1 flattens parameters; GC must be refused, never silently skipped.

    Returns whether the core `Ranger` itself refuses (it does not in torch 2.14: see the
    xfail test) and the message of `ranger_optimizers`' own guard.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._flat_param import FlatParameter

    from ranger_plugins.lightning import ranger_optimizers

    messages = {}
    for use_orig_params in (False, True):
        torch.manual_seed(0)
        model = FullyShardedDataParallel(
            torch.nn.Linear(6, 4), device_id=torch.device("cpu"), use_orig_params=use_orig_params
        )
        params = list(model.parameters())
        assert all(p.dim() == 1 for p in params)  # flattened shards: rows are gone
        if not use_orig_params:
            assert isinstance(params[0], FlatParameter)
        try:
            ranger_optimizers(model, total_steps=3)
        except RuntimeError as error:
            messages[use_orig_params] = str(error)
        else:
            raise AssertionError("ranger_optimizers accepted FSDP1 flattened params with GC")
        assert "FSDP1" in messages[use_orig_params] and "use_gc=False" in messages[use_orig_params]
        ranger_optimizers(model, total_steps=3, use_gc=False)  # fine without GC

    # The core Ranger on FSDP1's FlatParameter: does it refuse (as it is meant to)?
    model = FullyShardedDataParallel(
        torch.nn.Linear(6, 4), device_id=torch.device("cpu"), use_orig_params=False
    )
    model(torch.randn(3, 6)).sum().backward()
    try:
        Ranger(model.parameters(), use_gc=True).step()
        core_refuses = False
    except RuntimeError as error:
        core_refuses = "FSDP1" in str(error)
    return {"adapter_messages": messages, "core_refuses": core_refuses}


def run(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out_dir, 'store')}",
        rank=rank,
        world_size=WORLD_SIZE,
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        result = {
            "shard0_errors_foreach": check_shard0_matches_full(mesh, foreach=None),
            "shard0_errors_single": check_shard0_matches_full(mesh, foreach=False),
            "shard1_message": check_shard1_refused(mesh),
            "fsdp1": check_fsdp1_refused(),
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        # A clean gloo exit, or the process may abort with
        # "terminate called without an active exception".
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=WORLD_SIZE, join=True)
