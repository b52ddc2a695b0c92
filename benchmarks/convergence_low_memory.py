"""Convergence of Ranger's low-memory state (issue 14).

    python benchmarks/convergence_low_memory.py          # about 15 minutes

Trains one small classifier for thousands of steps with ``Ranger(state_precision=...)``
in ``full`` (fp32) state, ``16bit`` and ``8bit`` state, each with fp32 params and with bf16
params (``model.to(torch.bfloat16)``; the loss in fp32), and prints the final losses and their
ratio to the full-state run of the same param dtype. The issue asks for a final loss within 2%
of full state.

The task is one where Adam's second moment matters: different gradient scales across params.
A student MLP (64 -> 96 -> 96 -> 32, GELU, no normalization layer; 18,656 params, three
weight matrices large enough for the 8-bit layout) learns a teacher's 32-class softmax from
64 raw features whose scales span four decades (``x_j = s_j z_j``, ``s_j`` from 0.01 to 100,
in a random order); the teacher (a random ``tanh`` MLP) sees the standardized ``z``, and the
labels are drawn from its softmax. Each column of the student's first layer must learn a
weight near ``1 / s_j``, with gradients near ``s_j``: their second moments span eight
decades, inside every 8-bit block of 256 elements. A single learning rate cannot fit them
all: plain SGD with momentum (printed beside the Ranger rows, at three learning rates) ends
10.5% above Ranger at its best learning rate, five times the criterion's margin.

Every run draws the same data (fresh samples every step, from ``--seed``), starts from the
same weights and runs on ``--threads`` CPU threads (default 1), so the whole table is
deterministic on a machine. ``final loss`` is the mean training loss of the last ``--tail``
steps (on fresh samples, so a generalization loss as well); ``held-out loss`` is the loss of
Lookahead's slow weights (``opt.slow_weights()``) on 8,192 samples drawn apart; ``floor`` is
the labels' entropy (a perfect student's loss). ``state bytes/param`` is what the optimizer
keeps, summed over its state tensors, per param.

The schedule is flat, then cosine to ``lr / 1e5`` from 50% of the steps (`FlatCosineLR`);
Ranger has lr 1e-2, betas (0.95, 0.999), eps 1e-8, GC on, k 6, alpha 0.5.

The low-memory runs use the default (torch) step, whose cost grows with the param count
(about 1.5 us per param for 16-bit state and 3 us for 8-bit on this machine's CPU, against
0.03 us for full state), so the model is small; ``--fused`` runs ``fused=True`` (the same
bits, from the C++ kernel where it runs). Defaults: 3,000 steps of 128 samples; the whole
table took 15.5 minutes on a 2-core machine shared with other jobs (load average about 7),
most of it the fp32 low-memory runs; the full-state and SGD rows take about a minute each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ranger_plugins import Ranger
from ranger_plugins.schedules import FlatCosineLR

PRECISIONS = ("full", "16bit", "8bit")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: The issue's criterion: a final loss within 2% of the full-state run's.
TOLERANCE = 0.02
SGD_LRS = (1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class Task:
    """The synthetic task and the student's shape."""

    features: int = 64
    decades: float = 4.0  # the feature scales span this many powers of ten
    classes: int = 32
    teacher_hidden: int = 32
    sharpness: float = 6.0  # the teacher's logit scale: higher, less label noise
    hidden: int = 96
    held_out: int = 8192


class Teacher:
    """Labels drawn from a random MLP's softmax on the standardized features ``x / scale``."""

    def __init__(self, task: Task, generator: torch.Generator) -> None:
        exponents = torch.rand(task.features, generator=generator) - 0.5
        self.scales = 10.0 ** (task.decades * exponents)
        self.first = torch.randn(task.features, task.teacher_hidden, generator=generator)
        self.second = torch.randn(task.teacher_hidden, task.classes, generator=generator)
        self.first /= task.features**0.5
        self.second *= task.sharpness / task.teacher_hidden**0.5

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh((x / self.scales) @ self.first) @ self.second

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(count, self.scales.numel(), generator=generator) * self.scales
        labels = torch.multinomial(self.logits(x).softmax(1), 1, generator=generator)[:, 0]
        return x, labels

    def entropy(self, x: torch.Tensor) -> float:
        """The mean entropy of the labels of ``x``: the loss of a perfect student."""
        log_p = self.logits(x).log_softmax(1)
        return float(-(log_p.exp() * log_p).sum(1).mean())


@dataclass
class Data:
    teacher: Teacher
    held_out_x: torch.Tensor
    held_out_y: torch.Tensor
    floor: float


def make_data(task: Task, seed: int) -> Data:
    """The teacher and the held-out set, from ``seed`` alone."""
    generator = torch.Generator().manual_seed(seed)
    teacher = Teacher(task, generator)
    x, y = teacher.sample(task.held_out, generator)
    return Data(teacher, x, y, teacher.entropy(x))


class Student(nn.Module):
    """An MLP on the raw features: its first layer must learn each feature's scale."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(task.features, task.hidden),
            nn.GELU(),
            nn.Linear(task.hidden, task.hidden),
            nn.GELU(),
            nn.Linear(task.hidden, task.classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass
class Run:
    label: str
    dtype: str
    final_loss: float
    held_out_loss: float
    state_bytes: int
    seconds: float


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).float(), y)  # the loss in fp32, whatever the params


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.nbytes
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def train(
    task: Task,
    data: Data,
    args: argparse.Namespace,
    dtype: str,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
) -> tuple[list[float], float, torch.optim.Optimizer, nn.Module]:
    """One run: the same initial weights and batches for every optimizer; returns the
    training losses, the seconds the steps took, the optimizer and the model."""
    torch.manual_seed(args.seed)
    model = Student(task).to(DTYPES[dtype])
    optimizer = make_optimizer(model)
    schedule = FlatCosineLR(optimizer, total_steps=args.steps, pct_start=0.5)
    batches = torch.Generator().manual_seed(args.seed + 1)
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        x, y = data.teacher.sample(args.batch, batches)
        loss = _loss(model, x.to(DTYPES[dtype]), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses, time.perf_counter() - start, optimizer, model


@torch.no_grad()
def _held_out_loss(model: nn.Module, data: Data) -> float:
    x = data.held_out_x.to(next(model.parameters()).dtype)
    return _loss(model, x, data.held_out_y).item()


def run_ranger(task: Task, data: Data, args: argparse.Namespace, precision: str, dtype: str):
    def make(model: nn.Module) -> Ranger:
        return Ranger(
            model.parameters(),
            lr=args.lr,
            betas=(0.95, 0.999),
            eps=1e-8,
            state_precision=precision,
            fused=args.fused,
        )

    losses, seconds, optimizer, model = train(task, data, args, dtype, make)
    with optimizer.slow_weights():
        held_out = _held_out_loss(model, data)
    return Run(
        precision,
        dtype,
        statistics.fmean(losses[-args.tail :]),
        held_out,
        _state_bytes(optimizer),
        seconds,
    )


def run_sgd(task: Task, data: Data, args: argparse.Namespace, lr: float) -> Run:
    """SGD with momentum 0.9, no second moment: how much the task needs Adam's."""

    def make(model: nn.Module) -> torch.optim.SGD:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    losses, seconds, optimizer, model = train(task, data, args, "fp32", make)
    tail = statistics.fmean(losses[-args.tail :])
    return Run(f"SGD lr {lr:g}", "fp32", tail, _held_out_loss(model, data), 0, seconds)


def format_table(runs: list[Run], params: int) -> str:
    full = {run.dtype: run for run in runs if run.label == "full"}
    lines = [
        "| params | optimizer state | final loss | ratio to full | held-out loss (slow weights) "
        "| ratio to full | state bytes/param | time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        reference = full.get(run.dtype)
        ranger = run.label in PRECISIONS
        label = f"Ranger, {run.label}" if ranger else run.label
        ratio = f"{run.final_loss / reference.final_loss:.4f}" if reference else "-"
        held = f"{run.held_out_loss / reference.held_out_loss:.4f}" if reference else "-"
        state = f"{run.state_bytes / params:.2f}" if ranger else "-"
        lines.append(
            f"| {run.dtype} | {label} | {run.final_loss:.4f} | {ratio} | {run.held_out_loss:.4f} "
            f"| {held} | {state} | {run.seconds:.0f} s |"
        )
    return "\n".join(lines)


def verdict(runs: list[Run]) -> list[str]:
    """One line per low-memory run: its final loss within `TOLERANCE` of full state's?"""
    full = {run.dtype: run for run in runs if run.label == "full"}
    lines = []
    for run in runs:
        if run.label in PRECISIONS[1:] and run.dtype in full:
            change = run.final_loss / full[run.dtype].final_loss - 1.0
            ok = abs(change) <= TOLERANCE
            lines.append(
                f"{run.dtype} params, {run.label} state: final loss {change:+.2%} from full "
                f"state: {'within' if ok else 'NOT within'} {TOLERANCE:.0%}"
            )
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/convergence_low_memory.py",
        description="Final losses of Ranger with full, 16-bit and 8-bit state on a small "
        "badly scaled classification task, fp32 and bf16 params (issue 14: within 2% of full state).",
    )
    parser.add_argument("--steps", type=int, default=3000, help="default: 3000")
    parser.add_argument("--batch", type=int, default=128, help="samples per step (default 128)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Ranger's peak lr (default 1e-2)")
    parser.add_argument("--tail", type=int, default=100, help="final loss: the mean of the last N")
    parser.add_argument("--seed", type=int, default=0, help="data, weights and batches")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--fused", action="store_true", help="Ranger(fused=True): the same bits")
    parser.add_argument(
        "--no-sgd", dest="sgd", action="store_false", help="skip the SGD reference rows"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or not 1 <= args.tail <= args.steps or args.batch < 1 or args.threads < 1:
        print("error: need --steps >= 1, 1 <= --tail <= --steps, --batch >= 1, --threads >= 1")
        return 2
    torch.set_num_threads(args.threads)
    task = Task()
    data = make_data(task, args.seed)
    params = sum(p.numel() for p in Student(task).parameters())
    print(
        f"{params} params, {args.steps} steps of {args.batch} samples, {args.threads} "
        f"thread(s); floor (the labels' entropy on the held-out set) {data.floor:.4f}"
    )
    runs = []
    for dtype in args.dtypes:
        for precision in args.precisions:
            runs.append(run_ranger(task, data, args, precision, dtype))
            print(f"  {dtype} {precision}: final loss {runs[-1].final_loss:.4f}", flush=True)
    if args.sgd:
        for lr in SGD_LRS:
            runs.append(run_sgd(task, data, args, lr))
            print(f"  SGD lr {lr:g}: final loss {runs[-1].final_loss:.4f}", flush=True)
    print()
    print(format_table(runs, params))
    print()
    print("\n".join(verdict(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
