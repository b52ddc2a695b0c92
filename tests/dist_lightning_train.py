"""Train a tiny model with Ranger + LookaheadCallback under a Lightning strategy, save weights.

Run by tests/test_distributed.py in a subprocess (Lightning's "ddp" and ModelParallelStrategy
launch the other rank by re-running this script), and imported by it for the single-process
reference run::

    python tests/dist_lightning_train.py {ddp,fsdp2} OUT_DIR [--no-gc] [--fused]
        [--stop-and-save CKPT_DIR | --save-after-fit CKPT_DIR | --resume CKPT]
        [--full-checkpoint] [--state-precision {full,delta,16bit,8bit}]

``--stop-and-save`` checkpoints at the end of epoch 0 (``step=8.ckpt``, between two Lookahead
syncs) and crashes at step 10; ``--save-after-fit`` fits epoch 0 alone (on the schedule of the
whole run) and checkpoints after the end-of-fit sync, as ``last.ckpt`` (written by
``ModelCheckpoint`` in ``on_train_end``) and ``after_fit.ckpt`` (``trainer.save_checkpoint``
after ``fit``); ``--resume`` starts from another initialisation and resumes from a
checkpoint. Under fsdp2 a checkpoint is a directory of shards (Lightning's
default), or one file with ``--full-checkpoint`` (``save_distributed_checkpoint=False``).

``--state-precision`` passes Ranger's ``state_precision`` on (with "8bit", the hidden layer
is wide enough for 8-bit moments); where the step refuses it (FSDP2's DTensor params), each
rank records the error's message instead.

Each rank writes OUT_DIR/rank{r}.pt with the full (gathered) fast and slow weights, the
Lookahead step counts, the state's dtypes, and the validation checks.
"""

from __future__ import annotations

import gc
import os
import sys

import lightning.pytorch as lp
import torch
import torch.distributed as dist
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning_helpers import CrashAt, SimulatedCrash
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ranger_plugins import _cpu_kernel
from ranger_plugins.lightning import LookaheadCallback, ranger_optimizers
from ranger_plugins.lookahead import slow_weights_key, slow_weights_of

TRAIN = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
VALID = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
GLOBAL_BATCH = 8
EPOCHS = 2  # 8 steps per epoch, k = 5: syncs at 5, 10, 15 and the final one


class DistModel(BoringModel):
    """Two linear layers (GC applies to both weights) and a LayerNorm; fixed data."""

    def __init__(
        self,
        per_rank_batch: int,
        use_gc: bool = True,
        fsdp2: bool = False,
        fused: bool = False,
        total_steps: int | None = None,
        state_precision: str = "full",
    ) -> None:
        super().__init__()
        self.total_steps = total_steps
        self.fused = fused
        self.state_precision = state_precision
        torch.manual_seed(0)
        hidden = 128 if state_precision == "8bit" else 16  # 32 x 128: 8-bit moments
        self.layer = nn.Sequential(
            nn.Linear(32, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 4)
        )
        self.per_rank_batch = per_rank_batch
        self.use_gc = use_gc
        self.fsdp2 = fsdp2
        self.validated_on_slow_weights: list[bool] = []

    def configure_model(self) -> None:
        if not self.fsdp2:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.layer:
            fully_shard(layer, mesh=mesh)  # Shard(0): every row of a weight stays on one rank
        fully_shard(self, mesh=mesh)

    def configure_optimizers(self):
        return ranger_optimizers(
            self,
            lr=1e-2,
            k=5,
            use_gc=self.use_gc,
            eps=1e-5,
            schedule="one_cycle",
            total_steps=self.total_steps,
            fused=self.fused,
            **({} if self.state_precision == "full" else {"state_precision": self.state_precision}),
        )

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # The slow weights after this step, for validation to compare with: in the
        # `slow_delta` form they are known only while the model holds the fast weights.
        optimizer = self.trainer.optimizers[0]
        self.slow_after_step = [
            _slow(p, optimizer.state[p]) if optimizer.state.get(p) else None
            for p in self.parameters()
        ]

    def validation_step(self, batch, batch_idx):
        slow = getattr(self, "slow_after_step", None)
        self.validated_on_slow_weights.append(
            slow is not None
            and all(s is not None and _full(p).equal(s) for p, s in zip(self.parameters(), slow))
        )
        return super().validation_step(batch, batch_idx)

    def _loader(self, data: torch.Tensor) -> DataLoader:
        # Lightning's own DistributedSampler shuffles; this one keeps the single-process order,
        # so that step s sees the same global batch (rows 8s..8s+7) on any number of ranks.
        sampler = DistributedSampler(
            data, self.trainer.world_size, self.trainer.global_rank, shuffle=False
        )
        return DataLoader(data, batch_size=self.per_rank_batch, sampler=sampler)

    def train_dataloader(self):
        return self._loader(TRAIN)

    def val_dataloader(self):
        return self._loader(VALID)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (gathers a DTensor)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _slow(param: torch.Tensor, state: dict) -> torch.Tensor:
    """The whole slow weights of a param (in either form of the state)."""
    return _full(slow_weights_of(param, state)).to(param.dtype)


def _state_dtypes(optimizer, params: dict) -> dict[str, dict[str, str]]:
    return {
        name: {
            key: str(value.dtype)
            for key, value in optimizer.state[param].items()
            if isinstance(value, torch.Tensor)
        }
        for name, param in params.items()
    }


def _checkpoint_callbacks(
    stop_at_step: int | None, checkpoint: str | None, save_after_fit: bool
) -> list[lp.Callback]:
    if save_after_fit:
        # save_top_k=0: last.ckpt is written once, in on_train_end, after the end-of-fit sync.
        return [lp.callbacks.ModelCheckpoint(dirpath=checkpoint, save_last=True, save_top_k=0)]
    if not stop_at_step:
        return []
    # Saved during training, at the end of each epoch, as a crashed run would have it.
    return [
        CrashAt(stop_at_step),
        lp.callbacks.ModelCheckpoint(
            dirpath=checkpoint,  # a directory: step=8.ckpt, step=10.ckpt
            filename="{step}",
            save_top_k=-1,
            save_on_train_epoch_end=True,  # not after each validation (steps 3 and 6)
        ),
    ]


def train(
    strategy: str,
    devices: int,
    per_rank_batch: int,
    use_gc: bool = True,
    fused: bool = False,
    stop_at_step: int | None = None,
    checkpoint: str | None = None,
    resume: bool = False,
    full_checkpoint: bool = False,
    save_after_fit: bool = False,
    state_precision: str = "full",
) -> dict:
    """Fit and return the full fast/slow weights and what validation saw."""
    fsdp2 = strategy == "fsdp2"
    if resume:
        torch.manual_seed(1)  # a different init: everything must come from the checkpoint
    # A run of epoch 0 alone follows the schedule of the whole run.
    total_steps = EPOCHS * len(TRAIN) // GLOBAL_BATCH if save_after_fit else None
    model = DistModel(per_rank_batch, use_gc, fsdp2, fused, total_steps, state_precision)
    extra_callbacks = _checkpoint_callbacks(stop_at_step, checkpoint, save_after_fit)
    if fsdp2:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(
            data_parallel_size=devices,
            tensor_parallel_size=1,
            save_distributed_checkpoint=not full_checkpoint,
        )
    trainer = lp.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1 if save_after_fit else EPOCHS,
        max_steps=int(os.environ.get("DIST_TEST_MAX_STEPS", -1)),
        val_check_interval=3,
        callbacks=[LookaheadCallback(), *extra_callbacks],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(extra_callbacks),
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    try:
        trainer.fit(model, ckpt_path=checkpoint if resume else None)
    except SimulatedCrash:
        pass  # every rank crashes at the same step; what it saved before is what counts
    except RuntimeError as error:
        if state_precision == "full":
            raise
        return {"rank": trainer.global_rank, "error": str(error)}  # what the user sees
    if save_after_fit:
        trainer.save_checkpoint(os.path.join(checkpoint, "after_fit.ckpt"))
    optimizer = trainer.optimizers[0]
    params = dict(model.named_parameters())
    return {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "placements": {n: str(getattr(p, "placements", None)) for n, p in params.items()},
        "fast": {n: _full(p).detach().clone() for n, p in params.items()},
        "slow": {
            n: _slow(p, optimizer.state[p]).clone()
            for n, p in params.items()
            if slow_weights_key(optimizer.state[p]) is not None
        },
        "state_dtypes": _state_dtypes(optimizer, params),
        "steps": sorted({optimizer.state[p]["step"] for p in params.values()}),
        "global_step": trainer.global_step,
        "validated_on_slow_weights": model.validated_on_slow_weights,
        # Fused runs: (params given, params stepped) of each call of the C++ kernel.
        "fused_kernel_calls": KERNEL_CALLS,
    }


KERNEL_CALLS: list[tuple[int, int]] = []  # (given, stepped) per call of the C++ kernel


def _count_kernel_calls() -> None:
    """Count the C++ kernel's calls, through `_cpu_kernel.step_kernel` (which `_fused` calls
    at each step), whatever the kernel's module keeps."""
    step_kernel = _cpu_kernel.step_kernel

    def counting_step_kernel():
        kernel = step_kernel()
        if kernel is None:
            return None

        def counting_kernel(params, *args):
            not_stepped = kernel(params, *args)
            KERNEL_CALLS.append((len(params), len(params) - len(not_stepped)))
            return not_stepped

        return counting_kernel

    _cpu_kernel.step_kernel = counting_step_kernel


def main() -> None:
    strategy, out_dir = sys.argv[1], sys.argv[2]
    use_gc = "--no-gc" not in sys.argv
    fused = "--fused" in sys.argv
    if fused:
        _count_kernel_calls()
    checkpoint, stop_at_step, resume = None, None, False
    save_after_fit = "--save-after-fit" in sys.argv
    if "--stop-and-save" in sys.argv:
        checkpoint, stop_at_step = sys.argv[sys.argv.index("--stop-and-save") + 1], 10
    elif save_after_fit:
        checkpoint = sys.argv[sys.argv.index("--save-after-fit") + 1]
    elif "--resume" in sys.argv:
        checkpoint, resume = sys.argv[sys.argv.index("--resume") + 1], True
    torch.set_num_threads(1)
    result = train(
        strategy,
        devices=2,
        per_rank_batch=GLOBAL_BATCH // 2,
        use_gc=use_gc,
        fused=fused,
        stop_at_step=stop_at_step,
        checkpoint=checkpoint,
        resume=resume,
        full_checkpoint="--full-checkpoint" in sys.argv,
        save_after_fit=save_after_fit,
        state_precision=(
            sys.argv[sys.argv.index("--state-precision") + 1]
            if "--state-precision" in sys.argv
            else "full"
        ),
    )
    torch.save(result, os.path.join(out_dir, f"rank{result['rank']}.pt"))
    # A clean gloo exit: without this, process teardown can abort with
    # "terminate called without an active exception".
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
