"""Side-by-side benchmark of one Ranger step: ``python -m ranger_plugins.bench``.

Every row steps its own copy of the same parameters with the same gradients, in one process,
and the rows are timed in interleaved rounds. On a shared machine other tenants' memory traffic
moves every time by tens of percent, in bursts shorter than a round, so every figure is a
median over the rounds, and the floor is measured just before each row in each round: a row's
multiple of the floor is the median of its times over the median of the floors measured next
to it, so both cover the same stretch of the run. A PNG bar chart is written beside it.

The floor is measured in the same run: a Ranger step must read p, grad, m and v and write p, m
and v, 28 bytes per fp32 parameter, and the floor is that traffic at the best bandwidth that
simple in-place streaming ops (``mul_``, ``add_``, ``addcmul_``) reach, at that moment, on
buffers of the workload's size.

Needs the peers (``pip install 'ranger-plugins[dev]'``): fastai, torch-optimizer,
pytorch-optimizer, timm, torchvision, matplotlib. A peer that cannot be imported is skipped with
a printed note.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .ranger import Ranger

E2E_EPOCHS = 5  # timed epochs per end-to-end row, after a warm-up epoch
FLOOR_BYTES_PER_PARAM = 28  # read p, grad, m, v; write p, m, v (fp32)
WORKLOAD_NAMES = ("resnet50", "bert", "small800")


# --------------------------------------------------------------------------- workloads
def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's ResNet-50 (25.6M params), built on 'meta'."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50()
    return [tuple(p.shape) for p in model.parameters()]


def bert_shapes(layers: int = 4, hidden: int = 768, ffn: int = 3072) -> list[tuple[int, ...]]:
    """Encoder layers of BERT-base's widths (16 tensors, 7.1M params per layer) plus the
    position/type embeddings and their LayerNorm. The 23M-param word embedding is left out
    to keep the nine rows' copies within memory; it would only add one more large tensor."""
    shapes: list[tuple[int, ...]] = [(512, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _ in range(4):  # query, key, value, attention output
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    return shapes


def small_shapes(blocks: int = 200, width: int = 64) -> list[tuple[int, ...]]:
    """``blocks`` x (Linear(width, width) + LayerNorm(width)): 4 tensors per block."""
    return [(width, width), (width,), (width,), (width,)] * blocks


def workload_shapes(name: str, quick: bool) -> list[tuple[int, ...]]:
    if quick:  # tiny versions with the same structure, for tests
        return {
            "resnet50": [(8, 4, 3, 3), (8,), (8,), (16, 8, 1, 1), (16,), (10, 16), (10,)],
            "bert": bert_shapes(layers=1, hidden=16, ffn=32),
            "small800": small_shapes(blocks=5, width=8),
        }[name]
    return {"resnet50": resnet50_shapes, "bert": bert_shapes, "small800": small_shapes}[name]()


# --------------------------------------------------------------------------- rows
@dataclass
class Row:
    name: str
    does_gc: bool
    kind: str  # "ours", "peer" or "yardstick"
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    fresh_grads: bool = False  # re-assign the shared grads before every step (untimed)
    times: list[float] = field(default_factory=list)
    floors: list[float] = field(default_factory=list)  # the floor measured just before each
    first_step: float = 0.0
    setup: float = 0.0
    note: str = ""


LR = 1e-3
EPS = 1e-5


def _fastai_ranger(params):
    from fastai.optimizer import ranger

    # fastai's defaults differ (sqr_mom 0.99, eps 1e-6, wd 0.01); pin them to Ranger's.
    return ranger(params, lr=LR, mom=0.95, sqr_mom=0.999, eps=EPS, wd=0.0, k=6, alpha=0.5)


def _torch_optimizer_ranger(params):
    import torch_optimizer

    return torch_optimizer.Ranger(params, lr=LR, betas=(0.95, 0.999), eps=EPS)


def _pytorch_optimizer_ranger(params):
    import pytorch_optimizer

    return pytorch_optimizer.Ranger(params, lr=LR, betas=(0.95, 0.999), eps=EPS, use_gc=True)


def _timm_lookahead_radam(params):
    from timm.optim.lookahead import Lookahead

    inner = torch.optim.RAdam(params, lr=LR, betas=(0.95, 0.999), eps=EPS, foreach=True)
    return Lookahead(inner, alpha=0.5, k=6)


def _torch_radam(params):
    return torch.optim.RAdam(params, lr=LR, betas=(0.95, 0.999), eps=EPS, foreach=True)


def build_rows(include_fused: bool) -> list[Row]:
    rows = [
        Row("ours default, GC on", True, "ours", lambda p: Ranger(p, lr=LR, eps=EPS)),
        Row(
            "ours default, GC off",
            False,
            "ours",
            lambda p: Ranger(p, lr=LR, eps=EPS, use_gc=False),
        ),
    ]
    if include_fused:
        rows += [
            Row(
                "ours fused, GC on (grads kept)",
                True,
                "ours",
                lambda p: Ranger(p, lr=LR, eps=EPS, fused=True),
            ),
            Row(
                "ours fused, GC on (fresh grads every step)",
                True,
                "ours",
                lambda p: Ranger(p, lr=LR, eps=EPS, fused=True),
                fresh_grads=True,
            ),
            # The fused kernel without GC: what GC adds to it.
            Row(
                "ours fused, GC off",
                False,
                "ours",
                lambda p: Ranger(p, lr=LR, eps=EPS, fused=True, use_gc=False),
            ),
        ]
    rows += [
        Row("fastai ranger (Lookahead(RAdam))", False, "peer", _fastai_ranger),
        Row("torch_optimizer.Ranger", False, "peer", _torch_optimizer_ranger),
        Row("pytorch_optimizer.Ranger (GC)", True, "peer", _pytorch_optimizer_ranger),
        Row("timm Lookahead(torch RAdam foreach)", False, "peer", _timm_lookahead_radam),
        Row("torch.optim.RAdam foreach (no Lookahead)", False, "yardstick", _torch_radam),
    ]
    return rows


def _fused_available() -> bool:
    try:
        Ranger([torch.zeros(1, requires_grad=True)], fused=True)
    except TypeError:
        return False
    return True


# --------------------------------------------------------------------------- measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_floor_ms(numel: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """(floor in ms for 28 bytes per param, best in-place streaming bandwidth in GB/s)."""
    a = torch.rand(numel, device=device)
    b = torch.rand(numel, device=device)
    c = torch.rand(numel, device=device)
    ops = [
        (lambda: a.mul_(1.0), 8),  # read a, write a
        (lambda: a.add_(b, alpha=0.0), 12),
        (lambda: a.addcmul_(b, c, value=0.0), 16),
    ]
    best = 0.0
    for _ in range(repeats):
        for op, bytes_per_elem in ops:
            op()
            _sync(device)
            start = time.perf_counter()
            op()
            _sync(device)
            best = max(best, bytes_per_elem * numel / (time.perf_counter() - start))
    return FLOOR_BYTES_PER_PARAM * numel / best * 1e3, best / 1e9


def _make_params(shapes, device, seed=0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=generator).mul_(0.02).to(device) for s in shapes]
    grads = [torch.randn(s, generator=generator).mul_(1e-3).to(device) for s in shapes]
    return values, grads


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                key = (value.untyped_storage().data_ptr(), value.storage_offset())
                if key not in seen:
                    seen.add(key)
                    total += value.numel() * value.element_size()
    return total


def peak_extra_bytes(step: Callable[[], None]) -> int:
    """Peak of (bytes allocated - bytes freed) during ``step``, from torch.profiler's
    allocator events (CPU and CUDA caching allocator alike)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@dataclass
class Instance:
    row: Row
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]


def _assign_grads(params, grads) -> None:
    for param, grad in zip(params, grads):
        param.grad = grad


def run_workload(
    name: str,
    shapes: list[tuple[int, ...]],
    rows: list[Row],
    device: torch.device,
    rounds: int,
    steps_per_round: int,
    warmup: int,
) -> dict:
    values, grads = _make_params(shapes, device)
    numel = sum(v.numel() for v in values)
    print(f"\n== {name}: {len(shapes)} tensors, {numel / 1e6:.2f}M params", flush=True)
    instances: list[Instance] = []
    for row in rows:
        row.times, row.floors, row.note = [], [], ""
        params = [torch.nn.Parameter(v.clone()) for v in values]
        _assign_grads(params, grads)
        try:
            optimizer = row.make(params)
        except ImportError as error:
            row.note = f"skipped: {error}"
            print(f"  {row.name}: {row.note}")
            continue
        _assign_grads(params, grads)
        start = time.perf_counter()
        optimizer.step()
        _sync(device)
        row.first_step = time.perf_counter() - start
        for _ in range(warmup - 1):
            if row.fresh_grads:
                _assign_grads(params, grads)
            optimizer.step()
        _sync(device)
        # Setup cost: the warm-up steps (state creation; the fused path's flat buffers and
        # compiles) less the same number of steps at the steady speed (subtracted below).
        row.setup = time.perf_counter() - start
        instances.append(Instance(row, optimizer, params))

    bandwidth = 0.0
    for round_index in range(rounds):
        order = (
            instances[round_index % len(instances) :] + instances[: round_index % len(instances)]
        )
        for instance in order:
            floor, round_bandwidth = measure_floor_ms(numel, device, repeats=1)
            bandwidth = max(bandwidth, round_bandwidth)
            total = 0.0
            for _ in range(steps_per_round):
                if instance.row.fresh_grads:
                    _assign_grads(instance.params, grads)
                _sync(device)
                start = time.perf_counter()
                instance.optimizer.step()
                _sync(device)
                total += time.perf_counter() - start
            instance.row.times.append(total / steps_per_round * 1e3)
            instance.row.floors.append(floor)

    # Memory: state bytes (unique storages) and the peak extra allocation of one more step.
    param_bytes_fp32 = numel * 4
    memory = {}
    for instance in instances:
        if instance.row.kind != "ours":
            continue
        if instance.row.fresh_grads:
            _assign_grads(instance.params, grads)
        peak = peak_extra_bytes(instance.optimizer.step)
        memory[instance.row.name] = (_state_bytes(instance.optimizer), peak)

    timed = [r for r in rows if r.times]
    peers = [r for r in timed if r.kind == "peer"]
    fastest_peer = min(statistics.median(r.times) for r in peers) if peers else None
    result = {
        "name": name,
        "tensors": len(shapes),
        "numel": numel,
        "floor_ms": statistics.median(f for r in timed for f in r.floors),
        "bandwidth": bandwidth,
        "rows": [
            {
                "name": r.name,
                "kind": r.kind,
                "does_gc": r.does_gc,
                "ms": statistics.median(r.times),
                "x_floor": statistics.median(r.times) / statistics.median(r.floors),
                "vs_fastest_peer": (
                    statistics.median(r.times) / fastest_peer if fastest_peer else float("nan")
                ),
                "setup": max(0.0, r.setup - warmup * statistics.median(r.times) / 1e3),
            }
            for r in timed
        ],
        # Speedups of our GC rows over each peer that also does GC.
        "gc_speedups": [
            (ours.name, peer.name, statistics.median(peer.times) / statistics.median(ours.times))
            for ours in timed
            if ours.kind == "ours" and ours.does_gc
            for peer in peers
            if peer.does_gc
        ],
        "skipped": [(r.name, r.note) for r in rows if r.note],
        "memory": memory,
        "param_bytes": param_bytes_fp32,
    }
    del instances
    gc.collect()
    print_workload(result)
    return result


def print_workload(result: dict) -> None:
    print(
        f"floor {result['floor_ms']:.2f} ms, median ({FLOOR_BYTES_PER_PARAM} B/param; best "
        f"in-place streaming bandwidth {result['bandwidth']:.1f} GB/s); times and ratios are "
        "medians over the rounds"
    )
    print(
        f"{'row':<52} {'GC':>3} {'ms/step':>9} {'x floor':>8} {'/fastest peer':>14} {'setup s':>8}"
    )
    for row in result["rows"]:
        print(
            f"{row['name']:<52} {'yes' if row['does_gc'] else 'no':>3} {row['ms']:9.2f} "
            f"{row['x_floor']:8.2f} {row['vs_fastest_peer']:14.2f} {row['setup']:8.2f}"
        )
    for ours, peer, speedup in result["gc_speedups"]:
        print(f"{ours} is {speedup:.2f}x as fast as {peer}")
    for name, note in result["skipped"]:
        print(f"{name:<52} {note}")
    for name, (state_bytes, peak) in result["memory"].items():
        print(
            f"memory, {name}: state {state_bytes / 2**20:.1f} MiB = "
            f"{state_bytes / result['param_bytes']:.3f} x fp32 param bytes; peak extra during a "
            f"step {peak / 2**20:.2f} MiB = {100 * peak / result['param_bytes']:.2f}% of param bytes"
        )
    sys.stdout.flush()


# --------------------------------------------------------------------------- end to end
E2E_WIDTH = 1024


def _e2e_model() -> torch.nn.Module:
    # Wide, shallow and with a small batch: the optimizer is about half of a step.
    layers: list[torch.nn.Module] = []
    for _ in range(6):
        layers += [
            torch.nn.Linear(E2E_WIDTH, E2E_WIDTH),
            torch.nn.LayerNorm(E2E_WIDTH),
            torch.nn.ReLU(),
        ]
    return torch.nn.Sequential(*layers, torch.nn.Linear(E2E_WIDTH, 10))


def _e2e_data(batches: int, batch_size: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, E2E_WIDTH, generator=generator)
    y = torch.randint(0, 10, (batches * batch_size,), generator=generator)
    return torch.utils.data.TensorDataset(x, y)


def end_to_end(batches: int) -> list[tuple[str, float | None, str]]:
    """Seconds for one epoch (the best of `E2E_EPOCHS`), each row on the same model and data."""
    results: list[tuple[str, float | None, str]] = []
    dataset = _e2e_data(batches, 16)
    base = _e2e_model()
    results += _fastai_epochs(base, dataset)
    results += _lightning_epochs(base, dataset)
    return results


def _fastai_epochs(base, dataset):
    try:
        import fastai.callback.progress  # noqa: F401  (adds Learner.no_bar)
        from fastai.data.core import DataLoaders
        from fastai.learner import Learner
        from fastai.optimizer import ranger as fastai_ranger

        from .fastai import ranger as our_ranger
    except ImportError as error:
        return [("fastai epoch", None, f"skipped: {error}")]

    our_fused_ranger = functools.partial(our_ranger, fused=True)

    rows = []
    for label, opt_func in [
        (
            "fastai Learner epoch, ranger_plugins.fastai.ranger (no GC, fastai's default)",
            our_ranger,
        ),
        ("fastai Learner epoch, ranger_plugins.fastai.ranger(fused=True)", our_fused_ranger),
        ("fastai Learner epoch, fastai.optimizer.ranger (no GC)", fastai_ranger),
    ]:
        loader = torch.utils.data.DataLoader(dataset, batch_size=16)
        # A token validation set: the epoch time is the training loop's.
        valid = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(32)), batch_size=16
        )
        dls = DataLoaders(loader, valid)
        learn = Learner(
            dls, copy.deepcopy(base), loss_func=torch.nn.functional.cross_entropy, opt_func=opt_func
        )
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-3)  # warm-up epoch (state creation, first-step costs)
        rows.append((label, learn, []))
    # Epochs interleaved across the rows (fit keeps the optimizer), as the step rows are.
    for _ in range(E2E_EPOCHS):
        for _, learn, seconds in rows:
            with learn.no_bar(), learn.no_logging():
                start = time.perf_counter()
                learn.fit(1, 1e-3)
                seconds.append(time.perf_counter() - start)
    return [(label, min(seconds), "") for label, _, seconds in rows]


def _lightning_epochs(base, dataset):
    try:
        import lightning as L
        import torch_optimizer

        from .lightning import ranger_optimizers
    except ImportError as error:
        return [("Lightning epoch", None, f"skipped: {error}")]

    class _EpochTimer(L.Callback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds.append(time.perf_counter() - self._start)

    class _ClosureCallingRanger(torch_optimizer.Ranger):
        # torch_optimizer.Ranger ignores the closure, and Lightning (rightly) refuses to
        # train with it; this is the least a user must add to run it at all.
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            super().step()
            return loss

    class Module(L.LightningModule):
        def __init__(self, ours: str | None):
            super().__init__()
            self.net = copy.deepcopy(base)
            self.ours = ours
            self.optimizers_config = None

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            # The same optimizer for every fit of this module: one epoch per fit, its state
            # carried on, like one long fit.
            if self.optimizers_config is None:
                if self.ours:
                    self.optimizers_config = ranger_optimizers(
                        self,
                        lr=1e-3,
                        schedule="constant",
                        weight_decay=0.0,
                        fused=self.ours == "fused",
                        use_gc=self.ours != "no_gc",
                    )
                else:
                    self.optimizers_config = _ClosureCallingRanger(self.parameters(), lr=1e-3)
            return self.optimizers_config

    trainer_args = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    # Not a "GPU available" banner and a "fit stopped" line for each of the 16 fits (the
    # messages go to the logger of whichever Lightning packaging was imported last).
    lightning_logs = [
        logging.getLogger(name) for name in ("lightning.pytorch", "pytorch_lightning")
    ]
    log_levels = [log.level for log in lightning_logs]
    for log in lightning_logs:
        log.setLevel(logging.WARNING)
    rows, failed = [], []
    try:
        for label, ours in [
            ("Lightning epoch, ranger_plugins.lightning.ranger_optimizers (GC on)", "default"),
            ("Lightning epoch, ranger_optimizers(use_gc=False) (like the peer)", "no_gc"),
            ("Lightning epoch, ranger_optimizers(fused=True) (GC on)", "fused"),
            ("Lightning epoch, torch_optimizer.Ranger (no GC; + closure call)", None),
        ]:
            module, timer = Module(ours), _EpochTimer()
            try:  # a warm-up epoch (state creation, first-step costs)
                L.Trainer(callbacks=[timer], **trainer_args).fit(module, loader)
            except Exception as error:  # an adapter still being written must not sink the run
                failed.append((label, None, f"failed: {type(error).__name__}: {error}"))
                continue
            rows.append((label, module, timer))
        # Epochs interleaved across the rows, each epoch one fit timed by the callback.
        for _ in range(E2E_EPOCHS):
            for _, module, timer in rows:
                L.Trainer(callbacks=[timer], **trainer_args).fit(module, loader)
    finally:
        for log, level in zip(lightning_logs, log_levels):
            log.setLevel(level)
    return [(label, min(timer.seconds[1:]), "") for label, _, timer in rows] + failed


# --------------------------------------------------------------------------- chart
def write_chart(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 6), squeeze=False)
    for ax, result in zip(axes[0], results):
        names = [row["name"] for row in result["rows"]]
        multiples = [row["x_floor"] for row in result["rows"]]
        colors = [
            {"ours": "tab:green", "peer": "tab:gray", "yardstick": "tab:blue"}[kind]
            for kind in (row["kind"] for row in result["rows"])
        ]
        ax.barh(range(len(names)), multiples, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel("time per step / memory floor (lower is better)")
        ax.set_title(
            f"{result['name']}: {result['tensors']} tensors, {result['numel'] / 1e6:.1f}M params\n"
            f"floor {result['floor_ms']:.2f} ms (median)"
        )
    fig.suptitle("One optimizer step, side by side (green: ranger_plugins)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m ranger_plugins.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny workloads, few steps (tests)")
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOAD_NAMES),
        help=f"comma-separated, of {', '.join(WORKLOAD_NAMES)}",
    )
    parser.add_argument("--output", default="ranger_bench.png", help="PNG bar chart path")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the params live (default: cuda if available)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per row")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's); 1 is steadier on a shared machine",
    )
    parser.add_argument(
        "--no-end-to-end", action="store_true", help="skip the fastai/Lightning epochs"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = set(names) - set(WORKLOAD_NAMES)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {WORKLOAD_NAMES}")
    rounds = args.rounds or (2 if args.quick else 7)
    steps_per_round = 2 if args.quick else 6  # 6 = one Lookahead period (k), sync included
    warmup = 7  # past the 5 momentum-SGD steps, and the fused path's compile
    include_fused = _fused_available()
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}; "
        f"lr {LR}, betas (0.95, 0.999), eps {EPS}, wd 0, k 6, alpha 0.5 for every row; "
        f"{rounds} rounds x {steps_per_round} steps, rows interleaved, floor paired with each"
    )
    if not include_fused:
        print("ours fused: skipped (this version of Ranger has no fused=True)")

    results = []
    for name in names:
        results.append(
            run_workload(
                name,
                workload_shapes(name, args.quick),
                build_rows(include_fused),
                device,
                rounds,
                steps_per_round,
                warmup,
            )
        )
    if not args.no_end_to_end:
        print(
            f"\n== end to end: one epoch, same model (6 x Linear({E2E_WIDTH}) + LayerNorm, "
            "batch 16) and data"
        )
        for label, seconds, note in end_to_end(batches=8 if args.quick else 50):
            print(f"{label:<64} {note}" if seconds is None else f"{label:<64} {seconds:8.2f} s")
    write_chart(results, args.output)
    print(f"\nchart: {args.output}")
    return results


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
