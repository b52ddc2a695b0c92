"""The opt-in fused Ranger step (``Ranger(..., fused=True)``): flat buffers and one kernel
call per gradient row length (or per block of rows).

On CPU the kernel is the C++ row kernel of `_cpu_kernel` when params, grads and state share
one dtype (GC's row mean and the update in one pass over memory); otherwise, and on
accelerators, it is the compiled elementwise kernel below.

Why this shape (facts measured on torch 2.14):

* A compiled multi-tensor step unrolls per tensor, so its compile time and guard overhead grow
  with the tensor count (minutes for 800 tensors). Here the parameters, gradients and state of a
  param group live in flat buffers, one per device and dtype, and the kernel sees a few large
  2-D views: one per distinct row length of the centralized gradients (a ResNet-50 has about a
  dozen), plus one for everything else. The kernel is compiled with dynamic shapes and takes
  the hyperparameters as a tensor of values, so it compiles twice per dtype (with and without
  the Lookahead sync) whatever the model, and a schedule that changes lr every step never
  recompiles.
* Computing GC's row mean inside the compiled kernel crashes inductor's CPU outer-loop fusion
  (``KeyError: 'bufNN'``: its local-buffer check looks up a read of the new param value in
  the nodes that write m and v, which only wait for it). The means are computed just before,
  per block of a few MiB of rows, so the kernel reads the gradient block again from cache.
* The parameters become views into the flat buffer (``param.data`` is re-pointed once), and
  so do ``param.grad`` and ``state[param][...]``. So ``state_dict()``, loading, and the
  Lookahead controls see ordinary per-parameter tensors. A gradient that autograd allocated
  afresh (``zero_grad(set_to_none=True)``, fastai's and Lightning's default) is read where it
  is when its param has kernel calls of its own (large params, on CPU); otherwise it is copied
  into the flat buffer and ``param.grad`` is re-pointed there, so that with
  ``zero_grad(set_to_none=False)`` backward accumulates in place and no copy is needed.
* A step whose parameters do not all have gradients, or whose parameters' step counts differ,
  runs the default multi-tensor path on the same views (exact, just not fused).

Memory traffic per fp32 parameter and step: read p, grad, m, v; write p, m, v: 28 bytes (the
compiled kernel's GC mean is one more read of the gradient, which mostly hits cache on CPU),
plus 8 bytes on Lookahead sync steps for the slow weights.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _cpu_kernel
from ._math import _gc_applies, rectification, step_hyperparameters
from ._multi_tensor import _multi_tensor_ranger
from ._state import state_dtype

_ALIGN = 64  # elements; segment starts stay aligned for vector loads
# Gradient elements per kernel call on centralized segments: a few MiB, so the block the row
# means just read is still in cache; large enough that per-call overhead stays small.
_BLOCK_NUMEL = 1 << 20
# On CPU a centralized param this large gets kernel calls of its own, so that a fresh gradient
# of it is read in place: copying it into the flat buffer (8 bytes per element) costs more
# than the ~10-25 us of another call from about this size on.
_OWN_NUMEL = 1 << 17
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


# --------------------------------------------------------------------------- the kernel
def _ranger_kernel(
    param: torch.Tensor,
    grad: torch.Tensor,
    grad_mean: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    slow: torch.Tensor,
    hyperparameters: torch.Tensor,
    sync: bool,
) -> None:
    """One Ranger step on 2-D (rows, row length) views; ``grad_mean`` is (rows, 1).

    ``hyperparameters`` holds the eight values unpacked below, in the state dtype on the
    params' device: one tensor made once per step rather than eight numbers per call, since
    the compiled function wraps every number into a new tensor on every call (a few us each,
    and a step makes one call per block). adaptive is 1.0 or 0.0, and with 0.0 the
    denominator is exactly 1 (momentum SGD). The operations are the default path's, in its
    order (see `_single_tensor_ranger`).
    """
    (
        decay,
        beta1_weight,
        beta2,
        beta2_weight,
        eps,
        neg_step_size,
        lookahead_alpha,
        adaptive,
    ) = hyperparameters.unbind()  # decay = 1 - lr * wd, neg_step_size = -lr * multiplier
    work = exp_avg.dtype
    g = grad.to(work) - grad_mean
    fast = param.to(work) * decay
    m = torch.lerp(exp_avg, g, beta1_weight)
    v = exp_avg_sq * beta2 + beta2_weight * g * g
    denominator = (torch.sqrt(v) + eps) * adaptive + (1.0 - adaptive)
    fast = fast + neg_step_size * (m / denominator)
    if sync:
        fast = torch.lerp(slow, fast, lookahead_alpha)
        slow.copy_(fast)
    param.copy_(fast.to(param.dtype))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


# On Lookahead sync steps the new weights go to two places (param and slow weights). Inductor
# stores a value with several users to a temporary once it reads more than
# `realize_reads_threshold` (4) inputs, and copies it out in a second loop: a full-size
# allocation and an extra pass that made sync steps 2-4x slower than the others. Recomputing
# instead costs nothing here, since both stores sit in the same loop body (its CSE keeps one
# copy of the arithmetic). For the same reason a value is not stored once its expression has
# accumulated more than `realize_acc_reads_threshold` (12 on CPU) reads: each hyperparameter
# loaded from its tensor counts as one.
_INDUCTOR_OPTIONS = {"realize_reads_threshold": 64, "realize_acc_reads_threshold": 64}

_compiled_kernel: Any = None
_use_eager_kernel = False


def _kernel():
    """The compiled kernel, created on first use (importing the compiler is slow)."""
    global _compiled_kernel
    if _use_eager_kernel:
        return _ranger_kernel
    if _compiled_kernel is None:
        _compiled_kernel = torch.compile(
            _ranger_kernel, dynamic=True, fullgraph=True, options=_INDUCTOR_OPTIONS
        )
    return _compiled_kernel


# Kernel variants called at least once: (device type, param dtype, grad dtype, sync). Each
# is a graph of its own (the compiler guards on devices and dtypes).
_traced_variants: set[tuple] = set()


def _without_duck_shapes():
    """Compile with a distinct symbol per size. By default equal sizes in the first call (a
    square 1024 x 1024 block, say) share one symbol and the graph guards on that equality, so
    the first non-square block recompiles it. Only the first call of each variant needs this:
    a graph traced without such guards fits every later block."""
    try:
        from torch.fx.experimental import _config as fx_config

        return fx_config.patch(use_duck_shape=False)
    except (ImportError, AttributeError):  # another torch: recompiles at worst
        return contextlib.nullcontext()


def _run_kernel(*args: Any) -> None:
    global _use_eager_kernel
    param, grad = args[0], args[1]
    variant = (param.device.type, param.dtype, grad.dtype, args[-1])
    try:
        if variant in _traced_variants:
            _kernel()(*args)
        else:
            with _without_duck_shapes():
                _kernel()(*args)
            _traced_variants.add(variant)
    except Exception as error:  # no compiler toolchain, or an inductor bug: stay correct
        if _use_eager_kernel:
            raise
        _use_eager_kernel = True
        warnings.warn(
            f"Ranger(fused=True): torch.compile failed ({type(error).__name__}: {error}); "
            "running the same flat-buffer step without compiling",
            RuntimeWarning,
            stacklevel=4,
        )
        _ranger_kernel(*args)


# --------------------------------------------------------------------------- flat layout
@dataclass
class _Segment:
    """A contiguous range of the flat buffers, seen as (rows, row_length)."""

    start: int
    rows: int
    row_length: int
    centralize: bool
    # (position of the param in the flat group, its rows), in buffer order; a padding row
    # (see `_build`) belongs to no param.
    members: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Block:
    """The rows of a segment one kernel call steps."""

    centralize: bool
    views: tuple[torch.Tensor, ...]  # 2-D (param, grad, exp_avg, exp_avg_sq, slow) views
    owner: int | None  # the param whose rows these all are, if only one param's
    owner_offset: int  # the block's first element within the owner param


@dataclass
class _FlatGroup:
    """The params of one param group on one device and dtype, and their flat storage."""

    params: list[torch.Tensor]
    param_views: list[torch.Tensor]
    grad_views: list[torch.Tensor]
    flat_param: torch.Tensor
    flat_grad: torch.Tensor
    flat_exp_avg: torch.Tensor
    flat_exp_avg_sq: torch.Tensor
    flat_slow: torch.Tensor
    layout_key: tuple
    states: list[dict] = field(default_factory=list)
    zero_mean: torch.Tensor | None = None  # (2, 1) zeros: the segment that is not centralized
    # The kernel calls of a step (`_row_blocks`), their views made once.
    blocks: list[_Block] = field(default_factory=list)
    # Positions of the params whose blocks are all their own: a fresh gradient of theirs is
    # read where autograd put it, not copied into the flat buffer first.
    own_blocks: set[int] = field(default_factory=set)
    step: int | None = None  # the params' common step count, None if they differ
    # The C++ row kernel (`_cpu_kernel`) steps this group: CPU, one dtype for all buffers.
    rows_kernel: Callable[..., None] | None = None
    # Its calls when every gradient is in the flat buffer: one per segment.
    segment_blocks: list[_Block] = field(default_factory=list)


@dataclass
class _FusedCache:
    state: Any  # the optimizer.state object the flat groups were built for
    groups: dict[int, list[_FlatGroup]]


_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _eligible(param: torch.Tensor) -> bool:
    return (
        type(param) in _PLAIN_TYPES
        and param.layout == torch.strided
        and (
            param.is_contiguous()
            or (param.dim() == 4 and param.is_contiguous(memory_format=torch.channels_last))
            or (param.dim() == 5 and param.is_contiguous(memory_format=torch.channels_last_3d))
        )
        and not torch.is_complex(param)
        and _outermost_dim_first(param)  # GC rows must be contiguous blocks of the buffer
        # FSDP1's flattened params: the default path raises its GC error for them.
        and not getattr(param, "_fsdp_flattened", False)
    )


def _view(flat: torch.Tensor, start: int, like: torch.Tensor) -> torch.Tensor:
    # Same strides as `like` (channels_last stays channels_last); rows stay contiguous blocks
    # because dim 0 is the outermost dimension of a dense tensor with standard strides.
    return flat.as_strided(like.shape, like.stride(), flat.storage_offset() + start)


def _outermost_dim_first(param: torch.Tensor) -> bool:
    return param.dim() == 0 or param.stride(0) == max(param.stride())


def _build(optimizer, group, params: list[torch.Tensor], use_gc, gc_conv_only) -> _FlatGroup:
    """Move ``params`` (one device and dtype) and their state into new flat buffers."""
    param0 = params[0]
    work = state_dtype(param0)
    by_row_length: dict[int, list[torch.Tensor]] = defaultdict(list)
    for param in params:
        centralize = use_gc and param.numel() > 0 and _gc_applies(param, gc_conv_only)
        if centralize and _outermost_dim_first(param):
            by_row_length[param.numel() // param.shape[0]].append(param)
        else:
            by_row_length[0].append(param)  # 0: not centralized

    segments, order, offsets, cursor = [], [], [], 0
    for row_length in sorted(by_row_length, reverse=True):
        members = by_row_length[row_length]
        cursor = -(-cursor // _ALIGN) * _ALIGN
        start = cursor
        positions = []
        for param in members:
            positions.append(len(order))
            order.append(param)
            offsets.append(cursor)
            cursor += param.numel()
        numel = cursor - start
        if row_length:
            if numel == row_length:
                # A single row would make the compiler specialize (and recompile) for size 1:
                # pad with a zero row, which the kernel leaves at zero.
                cursor += row_length
                numel += row_length
            rows = [(position, p.numel() // row_length) for position, p in zip(positions, members)]
            segments.append(_Segment(start, numel // row_length, row_length, True, rows))
        else:
            # Seen as 2 rows so that every segment has the kernel's 2-D form; pad to even.
            cursor += numel % 2
            segments.append(_Segment(start, 2, (cursor - start) // 2, False))
    total = -(-cursor // _ALIGN) * _ALIGN

    device = param0.device
    flat_param = torch.zeros(total, dtype=param0.dtype, device=device)
    flat_grad = torch.zeros(total, dtype=param0.dtype, device=device)
    flat_exp_avg = torch.zeros(total, dtype=work, device=device)
    flat_exp_avg_sq = torch.zeros(total, dtype=work, device=device)
    flat_slow = torch.zeros(total, dtype=work, device=device)
    param_views, grad_views, states = [], [], []
    for param, start in zip(order, offsets):
        param_view = _view(flat_param, start, param)
        param_view.copy_(param.detach())
        grad_view = _view(flat_grad, start, param)
        if param.grad is not None:
            grad_view.copy_(param.grad)
        state = optimizer.state[param]
        for key, flat in (
            ("exp_avg", flat_exp_avg),
            ("exp_avg_sq", flat_exp_avg_sq),
            ("slow_param", flat_slow),
        ):
            view = _view(flat, start, param)
            if key in state:
                view.copy_(state[key])
                state[key] = view
        param.data = param_view
        if param.grad is not None:
            param.grad = grad_view
        param_views.append(param_view)
        grad_views.append(grad_view)
        states.append(state)
    flat_group = _FlatGroup(
        order,
        param_views,
        grad_views,
        flat_param,
        flat_grad,
        flat_exp_avg,
        flat_exp_avg_sq,
        flat_slow,
        _layout_key(group),
        states,
    )
    flat_group.step = _common_step(flat_group)
    flat_group.zero_mean = torch.zeros(2, 1, dtype=work, device=device)
    flats = (flat_param, flat_grad, flat_exp_avg, flat_exp_avg_sq, flat_slow)
    on_cpu = device.type == "cpu"
    if on_cpu and param0.dtype == work:
        flat_group.rows_kernel = _cpu_kernel.rows_kernel()
    block_numel = None if flat_group.rows_kernel else _BLOCK_NUMEL
    owners: dict[int, set] = defaultdict(set)  # param position -> owners of its blocks

    def row_views(segment: _Segment, first_row: int, end_row: int) -> tuple[torch.Tensor, ...]:
        start = segment.start + first_row * segment.row_length
        end = segment.start + end_row * segment.row_length
        shape = (end_row - first_row, segment.row_length)
        return tuple(flat[start:end].view(shape) for flat in flats)

    for segment in segments:
        if flat_group.rows_kernel is not None:
            views = row_views(segment, 0, segment.rows)
            flat_group.segment_blocks.append(_Block(segment.centralize, views, None, 0))
        first_rows = {}
        row = 0
        for position, rows in segment.members:
            first_rows[position] = row
            row += rows
        for first_row, end_row, owner in _row_blocks(segment, on_cpu, block_numel):
            views = row_views(segment, first_row, end_row)
            offset = 0 if owner is None else (first_row - first_rows[owner]) * segment.row_length
            flat_group.blocks.append(_Block(segment.centralize, views, owner, offset))
            for position, rows in segment.members:
                if first_rows[position] < end_row and first_rows[position] + rows > first_row:
                    owners[position].add(owner)
    flat_group.own_blocks = {
        position
        for position, block_owners in owners.items()
        if block_owners == {position} and param_views[position].is_contiguous()
    }
    return flat_group


def _row_blocks(
    segment: _Segment, on_cpu: bool, block_numel: int | None
) -> list[tuple[int, int, int | None]]:
    """(first row, end row, owner) of the kernel calls that step ``segment``.

    On CPU a param of at least `_OWN_NUMEL` elements in a centralized segment gets calls of
    its own (``owner`` is its position), so that a fresh gradient of it is read where autograd
    put it instead of being copied into the flat buffer; the params between such params share
    calls (owner None). With the compiled kernel calls hold about ``block_numel`` elements:
    the row means read each block of gradients just before the kernel does, so the kernel
    finds it in cache instead of reading it from memory a second time (5% of a ResNet-50 or
    BERT-like step on this CPU). The C++ kernel reads each row twice while it is in cache
    anyway, so its calls are not split (``block_numel`` None): fewer calls, less overhead.
    Every call has at least 2 rows: a size-1 dimension would make the compiler specialize and
    recompile.
    """
    if not segment.centralize or not on_cpu:
        # On a GPU each call costs host time (guards, launch) that dwarfs the few microseconds
        # of the device work, so fewer, larger calls win.
        return [(0, segment.rows, None)]
    rows_per_block = segment.rows if block_numel is None else block_numel // segment.row_length
    rows_per_block = max(2, rows_per_block)
    blocks: list[tuple[int, int, int | None]] = []
    shared_start = 0  # first row of the small params not yet in a block
    row = 0
    for position, rows in segment.members:
        own = rows >= 2 and rows * segment.row_length >= _OWN_NUMEL
        if own and row - shared_start != 1:  # a lone pending row cannot be a block
            if row > shared_start:
                blocks.append((shared_start, row, None))
            starts = list(range(row, row + rows, rows_per_block))
            if len(starts) > 1 and row + rows - starts[-1] < 2:
                starts.pop()  # a 1-row remainder joins the block before it
            blocks += [(a, b, position) for a, b in zip(starts, starts[1:] + [row + rows])]
            shared_start = row + rows
        elif row + rows - shared_start >= rows_per_block:
            blocks.append((shared_start, row + rows, None))
            shared_start = row + rows
        row += rows
    if segment.rows > shared_start:  # the last small params, and any padding row
        if segment.rows - shared_start < 2:
            first_row, _, _ = blocks.pop()
            blocks.append((first_row, segment.rows, None))
        else:
            blocks.append((shared_start, segment.rows, None))
    return blocks


def _layout_key(group: dict) -> tuple:
    # The params list object itself: torch's load_state_dict and add_param_group keep it.
    return (id(group["params"]), len(group["params"]), group["use_gc"], group["gc_conv_only"])


def _common_step(flat_group: _FlatGroup) -> int | None:
    steps = {state.get("step") for state in flat_group.states}
    if len(steps) == 1:
        (step,) = steps
        return step
    return None


def _flat_groups(optimizer, group_index: int, group: dict) -> list[_FlatGroup] | None:
    cache = _caches.get(optimizer)
    if cache is None or cache.state is not optimizer.state:
        # First fused step, or `load_state_dict` swapped in new state: (re)build everything.
        cache = _FusedCache(optimizer.state, {})
        _caches[optimizer] = cache
    flat_groups = cache.groups.get(group_index)
    if flat_groups and not all(_is_current(optimizer, group, f) for f in flat_groups):
        flat_groups = None
    if flat_groups is None:
        eligible = [p for p in group["params"] if _eligible(p)]
        if len(eligible) != len(group["params"]):
            return None  # DTensors, sparse or overlapping params: the default path
        by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for param in eligible:
            by_kind[(param.device, param.dtype)].append(param)
        flat_groups = [
            _build(optimizer, group, members, group["use_gc"], group["gc_conv_only"])
            for members in by_kind.values()
        ]
        cache.groups[group_index] = flat_groups
    return flat_groups


def _is_current(optimizer, group: dict, flat_group: _FlatGroup) -> bool:
    """Whether the flat buffers still back the group's params and state. They stop doing so
    when params move between groups (fastai's weight-decay twins), the state is cleared
    (fastai's ``freeze_to``), or a param's storage is replaced (``model.to(...)``): then the
    params' current values and state are copied into new flat buffers."""
    if flat_group.layout_key != _layout_key(group):
        return False
    state = optimizer.state
    return all(
        state.get(param) is param_state and param.data_ptr() == param_view.data_ptr()
        for param, param_view, param_state in zip(
            flat_group.params, flat_group.param_views, flat_group.states
        )
    )


# --------------------------------------------------------------------------- the step
def fused_step(optimizer, group_index: int, group: dict) -> bool:
    """One fused Ranger step of ``group``. Returns False, changing nothing, when the group
    cannot use flat buffers (DTensors or other tensor subclasses, sparse or complex params):
    the caller then runs the default path."""
    flat_groups = _flat_groups(optimizer, group_index, group)
    if flat_groups is None:
        return False
    for flat_group in flat_groups:
        _step_flat_group(optimizer, group, flat_group)
    return True


def _step_flat_group(optimizer, group: dict, flat_group: _FlatGroup) -> None:
    params, grad_views = flat_group.params, flat_group.grad_views
    own_blocks = flat_group.own_blocks
    stale_grads, stale_views, all_have_grads = [], [], True
    fresh: dict[int, torch.Tensor] = {}  # position -> a fresh gradient read where it is
    for position, (param, grad_view) in enumerate(zip(params, grad_views)):
        grad = param.grad
        if grad is grad_view:
            continue
        if grad is None:
            all_have_grads = False
        elif grad.is_sparse:
            raise RuntimeError("Ranger does not support sparse gradients")
        elif position in own_blocks and type(grad) in _PLAIN_TYPES and grad.is_contiguous():
            fresh[position] = _flat_alias(grad)
        else:
            stale_grads.append(grad)
            stale_views.append(grad_view)
    if stale_grads:
        # Freshly allocated gradients of small params: copy them in and point param.grad at
        # the flat buffer (with set_to_none=False the next backward then accumulates there).
        torch._foreach_copy_(stale_views, stale_grads)
        for position, (param, grad_view) in enumerate(zip(params, grad_views)):
            if param.grad is not None and param.grad is not grad_view and position not in fresh:
                param.grad = grad_view

    if not all_have_grads or flat_group.step is None:
        _step_per_param(optimizer, group, flat_group)
        return

    step = flat_group.step + 1
    for state in flat_group.states:
        state["step"] = step
    flat_group.step = step
    lr = group["lr"].item() if torch.is_tensor(group["lr"]) else group["lr"]
    beta1, beta2 = group["betas"]
    multiplier, adaptive = rectification(step, beta1, beta2, group["rectify_threshold"])
    sync = step % group["lookahead_k"] == 0
    work = flat_group.flat_exp_avg.dtype
    values = [
        1.0 - lr * group["weight_decay"],  # decay
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        group["eps"],
        -lr * multiplier,  # the step size, negated
        group["lookahead_alpha"],
    ]
    device = flat_group.flat_param.device
    rows_kernel = flat_group.rows_kernel if _cpu_kernel.enabled else None
    hyperparameters = None  # the compiled kernel's, made once per step if it is needed
    blocks = flat_group.blocks
    if rows_kernel is not None and not fresh:
        # No gradient to read where it is: the C++ kernel needs no more than one call per
        # segment (each call costs ~10 us: a ResNet-50 has 12 segments and 40-odd blocks).
        blocks = flat_group.segment_blocks
    for block in blocks:
        param, grad, exp_avg, exp_avg_sq, slow = block.views
        if block.owner in fresh:
            start = block.owner_offset
            grad = fresh[block.owner][start : start + grad.numel()].view(grad.shape)
        if rows_kernel is not None and grad.dtype == work:
            rows_kernel(
                param, grad, exp_avg, exp_avg_sq, slow, values, block.centralize, adaptive, sync
            )
            continue
        if hyperparameters is None:
            hyperparameters = _hyperparameter_tensor(values, adaptive, work, device)
        mean = (
            grad.mean(dim=1, keepdim=True, dtype=work) if block.centralize else flat_group.zero_mean
        )
        _run_kernel(param, grad, mean, exp_avg, exp_avg_sq, slow, hyperparameters, sync)


def _hyperparameter_tensor(values, adaptive, dtype, device) -> torch.Tensor:
    """The compiled kernel's hyperparameters (see `_ranger_kernel`), on ``device``."""
    hyperparameters = torch.tensor((*values, float(adaptive)), dtype=dtype)
    if device.type == "cuda":
        # From pageable memory the copy would wait for the GPU (a host sync every step);
        # from pinned memory it is queued like a kernel.
        return hyperparameters.pin_memory().to(device, non_blocking=True)
    return hyperparameters.to(device)


def _flat_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor on the memory of contiguous ``tensor`` that is not a view of it, so the
    kernel's inputs cut from it look to the compiler like those cut from the flat buffers (it
    guards on the base of a view: a 4-D conv gradient then a 2-D one would recompile)."""
    return tensor.new_empty(0).set_(
        tensor.untyped_storage(), tensor.storage_offset(), (tensor.numel(),), (1,)
    )


def _step_per_param(optimizer, group: dict, flat_group: _FlatGroup) -> None:
    """Some params lack gradients or their step counts differ: the default path, on the
    flat views (their new state is created in the flat buffers too)."""
    lists: tuple[list, ...] = ([], [], [], [], [], [])
    for param, state, start_view in zip(
        flat_group.params, flat_group.states, flat_group.param_views
    ):
        if param.grad is None:
            continue
        if "exp_avg" not in state:
            offset = start_view.storage_offset() - flat_group.flat_param.storage_offset()
            state["step"] = 0
            state["exp_avg"] = _view(flat_group.flat_exp_avg, offset, param).zero_()
            state["exp_avg_sq"] = _view(flat_group.flat_exp_avg_sq, offset, param).zero_()
            slow = _view(flat_group.flat_slow, offset, param)
            slow.copy_(param.detach())
            state["slow_param"] = slow
        state["step"] += 1
        for target, value in zip(
            lists,
            (
                param,
                param.grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                state["slow_param"],
                state["step"],
            ),
        ):
            target.append(value)
    params, grads, exp_avgs, exp_avg_sqs, slow_params, steps = lists
    if params:
        _multi_tensor_ranger(*lists, **step_hyperparameters(group))
    flat_group.step = _common_step(flat_group)
