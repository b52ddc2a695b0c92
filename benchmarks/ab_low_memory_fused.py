"""A/B of the fused CPU step by state layout: ``python benchmarks/ab_low_memory_fused.py``.

Times, in one process, the fused step (`_fused`'s C++ kernel calls) on fp32 state (``full``:
m, v and the slow weights in fp32) against the low-memory layouts ``16bit`` and ``8bit``, on
ResNet-50 and BERT-base shapes, with 1 and 2 threads. Every variant steps its own copy of
the params with the same gradients, drawn afresh before each round (untimed); the variants run
in a rotating order within a round, and each figure is the median over the rounds, so that a
burst of another tenant's load hits all of them alike. The low-memory steps must move fewer
bytes (24 and 20 bytes per param against 28, GC on), so they should be no slower.

This calls the step functions directly (not `Ranger`), to time exactly the kernel calls.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ranger_plugins import _cpu_kernel, _fused, _low_memory

HYPERPARAMETERS = {
    "lr": 1e-3,
    "beta1": 0.95,
    "beta2": 0.999,
    "eps": 1e-5,
    "weight_decay": 1e-4,
    "lookahead_k": 6,
    "lookahead_alpha": 0.5,
    "use_gc": True,
    "gc_conv_only": False,
    "rectify_threshold": 5.0,
}
FIRST_STEP = 10  # past RAdam's non-adaptive first steps; every 6th step syncs


def resnet50_shapes() -> list[tuple[int, ...]]:
    """torchvision's ResNet-50 param shapes (built without torchvision where it is missing)."""
    try:
        import torchvision
    except ImportError:
        return _resnet50_shapes_by_hand()
    model = torchvision.models.resnet50()
    return [tuple(param.shape) for param in model.parameters()]


def _resnet50_shapes_by_hand() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            for conv in ((width, channels, 1, 1), (width, width, 3, 3), (width * 4, width, 1, 1)):
                shapes += [conv, conv[:1], conv[:1]]
            if block == 0:
                shapes += [(width * 4, channels, 1, 1), (width * 4,), (width * 4,)]
            channels = width * 4
    return [*shapes, (1000, 2048), (1000,)]


def bert_base_shapes() -> list[tuple[int, ...]]:
    hidden, ffn = 768, 3072
    shapes: list[tuple[int, ...]] = [
        (30522, hidden),
        (512, hidden),
        (2, hidden),
        (hidden,),
        (hidden,),
    ]
    for _ in range(12):
        shapes += [(hidden, hidden), (hidden,)] * 4  # q, k, v, output
        shapes += [(hidden,), (hidden,), (ffn, hidden), (ffn,), (hidden, ffn), (hidden,)]
        shapes += [(hidden,), (hidden,)]
    return [*shapes, (hidden, hidden), (hidden,)]


def channels_last(shape: tuple[int, ...]) -> torch.memory_format:
    return torch.channels_last if len(shape) == 4 else torch.contiguous_format


def make_params(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=generator).contiguous(memory_format=channels_last(shape))
        for shape in shapes
    ]


def full_stepper(shapes: list[tuple[int, ...]]) -> Callable[[list[torch.Tensor], int], None]:
    """Today's fused step on fp32 state."""
    params = make_params(shapes, 0)
    exp_avgs = [torch.zeros_like(param) for param in params]
    exp_avg_sqs = [torch.zeros_like(param) for param in params]
    slows = [param.clone() for param in params]

    def step(grads: list[torch.Tensor], count: int) -> None:
        steps = [count] * len(params)
        _fused.fused_ranger(params, grads, exp_avgs, exp_avg_sqs, slows, steps, **HYPERPARAMETERS)

    return step


def low_memory_stepper(
    shapes: list[tuple[int, ...]], precision: str
) -> Callable[[list[torch.Tensor], int], None]:
    """The fused step on ``16bit`` or ``8bit`` state (small params of 8bit take 16bit)."""
    params = make_params(shapes, 0)
    states = [
        _low_memory.new_state(param, _low_memory.layout_for(precision, param)) for param in params
    ]

    def step(grads: list[torch.Tensor], count: int) -> None:
        steps = [count] * len(params)
        rest = _fused.fused_low_memory_step(params, grads, states, steps, **HYPERPARAMETERS)
        assert not rest, f"the kernel did not step params {rest}"

    return step


def time_workload(name: str, shapes: list[tuple[int, ...]], threads: int, rounds: int) -> None:
    torch.set_num_threads(threads)
    steppers = {
        "fp32": full_stepper(shapes),
        "16bit": low_memory_stepper(shapes, "16bit"),
        "8bit": low_memory_stepper(shapes, "8bit"),
    }
    grads = make_params(shapes, 1)
    generator = torch.Generator().manual_seed(2)
    times: dict[str, list[float]] = {variant: [] for variant in steppers}
    order = list(steppers)
    for index in range(rounds + 2):  # the first two rounds warm up, untimed
        for grad in grads:
            grad.normal_(generator=generator)
        order = order[1:] + order[:1]  # a rotating order: each variant goes first in turn
        for variant in order:
            start = time.perf_counter()
            steppers[variant](grads, FIRST_STEP + index)
            elapsed = time.perf_counter() - start
            if index >= 2:
                times[variant].append(elapsed)
    medians = {variant: statistics.median(values) * 1e3 for variant, values in times.items()}
    numel = sum(grad.numel() for grad in grads)
    print(
        f"{name:9s} {numel / 1e6:6.1f}M params, {threads} thread(s): "
        + "  ".join(f"{variant} {ms:7.2f} ms" for variant, ms in medians.items())
        + f"  | 16bit/fp32 {medians['16bit'] / medians['fp32']:.3f}"
        + f"  8bit/fp32 {medians['8bit'] / medians['fp32']:.3f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workloads", nargs="+", default=["resnet50", "bert"])
    args = parser.parse_args()
    assert _cpu_kernel.low_memory_step_kernel() is not None, "the C++ kernel did not build"
    workloads = {"resnet50": resnet50_shapes, "bert": bert_base_shapes}
    print(
        f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}; medians of "
        f"{args.rounds} steps (ratios below 1: the low-memory step is faster)"
    )
    for name in args.workloads:
        shapes = workloads[name]()
        for threads in args.threads:
            time_workload(name, shapes, threads, args.rounds)


if __name__ == "__main__":
    main()
