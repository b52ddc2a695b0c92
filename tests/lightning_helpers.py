"""Lightning test helpers shared by tests/test_lightning.py and the DDP child script."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class SimulatedCrash(RuntimeError):
    pass


class CrashAt(Callback):
    """Simulate a crash at the start of the given optimizer step (stopping with max_steps
    instead would change the schedule, whose length comes from the trainer's step estimate)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"crash at step {self.step}")
