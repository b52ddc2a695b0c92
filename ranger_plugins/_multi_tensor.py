"""The multi-tensor (`torch._foreach_*`) Ranger step: the default implementation.

It must agree with `ranger._single_tensor_ranger`, the readable ground truth, on every param
and state tensor: every element goes through the same operations in the same order.

What makes it fast (a step is bandwidth-bound on large tensors, overhead-bound on small ones):

* Waves. The tensors are cut into pieces (whole small tensors; row-aligned chunks of large
  contiguous ones) and packed into waves of about `_WAVE_NUMEL` elements. All the operations of
  a step run on one wave before the next, so p, grad, m and v are read from memory about once
  and the later operations find them in cache (a plain foreach step streams the whole model
  through memory once per operation). It also bounds the one temporary, sqrt(v) + eps, to one
  wave instead of the whole model.
* Gradient Centralization in place, inside the wave (the mean is read from cache): per chunk of
  whole rows for large tensors, per tensor for mid-sized ones. Small ones are batched per row
  length (one `cat`, one `mean` and one foreach subtraction for all of them), since one mean per
  tensor costs more in dispatch than in arithmetic.
* Plans kept between steps: the layout of each bucket (waves, chunks, GC batches) is built once
  and reused while the bucket holds the same params and state tensors. A kept plan also moves
  the moments of its waves of many small tensors into flat buffers (the state tensors become
  views of them), so the moment updates, sqrt and eps run as one operation per wave instead of
  one per tensor; the gradients are gathered by one `_foreach_copy_`, and the param update
  stays one foreach `addcdiv` on the state tensors.
* One bucket per (device, dtype, step): foreach kernels need one device and dtype, and the step
  decides the scalar step size and whether Lookahead syncs.
"""

from __future__ import annotations

from collections import defaultdict
from operator import attrgetter, itemgetter
from typing import NamedTuple

import torch

from ._math import _gc_applies, centralize_gradient, rectification
from ._state import PLAIN_TENSOR_TYPES
from .lookahead import copy_into

# Elements per wave: 2 MiB per fp32 operand, so the five operands of a wave (p, grad, m, v and
# the denominator) stay in the last-level cache between the operations of the wave.
_WAVE_NUMEL = 1 << 19
# Waves of small models are smaller: the temporaries of a wave stay under ~8% of the params.
_MIN_WAVE_NUMEL = 1 << 16
_ACCELERATOR_MIN_WAVE_NUMEL = 1 << 24
# GC of gradients smaller than this is batched by row length.
_SMALL_GC_NUMEL = 1 << 15
# Waves of at least this many whole tensors update their moments as flat buffers.
_MIN_GATHERED_PIECES = 4


class _Bucket(NamedTuple):
    """Params of one device, dtype and step count, with their gradients and state."""

    step: int
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    slow_params: list[torch.Tensor]


class _StepValues(NamedTuple):
    """What one bucket's step applies, computed once per bucket."""

    beta1_weight: float  # 1 - beta1
    beta2: float | torch.Tensor
    beta2_weight: float  # 1 - beta2
    eps: float | torch.Tensor
    decay: float | torch.Tensor | None  # 1 - lr * weight_decay; None without weight decay
    neg_step_size: float  # -lr * the rectification multiplier
    adaptive: bool
    sync: bool
    lookahead_alpha: float


def _multi_tensor_ranger(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    slow_params: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    lookahead_k: int,
    lookahead_alpha: float,
    use_gc: bool,
    gc_conv_only: bool,
    rectify_threshold: float,
    plan_cache: dict | None = None,
) -> None:
    """``plan_cache``: a dict the caller keeps between steps (one per param group); the wave
    layout of each bucket is stored there and reused while the bucket holds the same params
    and state tensors, so a steady-state step does no per-tensor planning in Python."""
    for bucket in _buckets(params, grads, exp_avgs, exp_avg_sqs, slow_params, steps):
        multiplier, adaptive = rectification(bucket.step, beta1, beta2, rectify_threshold)
        work_dtype, device = bucket.exp_avgs[0].dtype, bucket.params[0].device
        values = _StepValues(
            beta1_weight=1.0 - beta1,
            beta2=_scalar(beta2, work_dtype, device),
            beta2_weight=1.0 - beta2,
            eps=_scalar(eps, work_dtype, device),
            decay=_scalar(1.0 - lr * weight_decay, work_dtype, device) if weight_decay else None,
            neg_step_size=-lr * multiplier,
            adaptive=adaptive,
            sync=bucket.step % lookahead_k == 0,
            lookahead_alpha=lookahead_alpha,
        )
        _step_bucket(bucket, values, use_gc, gc_conv_only, plan_cache)


def bucket_indices(
    params: list[torch.Tensor], steps: list[int], *per_param_keys: list
) -> list[tuple[tuple, list[int] | None]]:
    """The positions of the params of each (device, dtype, step, *per-param keys), as
    (key, positions), every foreach step's buckets: foreach kernels need one device and
    dtype, and the step decides the step size and whether Lookahead syncs. Positions None:
    the only bucket holds every param, in order (the common case, found without a loop)."""
    if (
        not per_param_keys
        and steps
        and steps.count(steps[0]) == len(steps)
        and _one_device_and_dtype(params)
    ):
        return [((params[0].device, params[0].dtype, steps[0]), None)]
    by_kind: dict[tuple, list[int]] = defaultdict(list)
    for index, kind in enumerate(
        zip(map(_DEVICE, params), map(_DTYPE, params), steps, *per_param_keys)
    ):
        by_kind[kind].append(index)
    return list(by_kind.items())


def pick(values: list, positions: list[int] | None) -> list:
    """``values`` at ``positions`` (all of them for None, as `bucket_indices` gives)."""
    return values if positions is None else [values[i] for i in positions]


def _buckets(params, grads, exp_avgs, exp_avg_sqs, slow_params, steps) -> list[_Bucket]:
    lists = (params, grads, exp_avgs, exp_avg_sqs, slow_params)
    return [
        _Bucket(kind[2], *(pick(values, positions) for values in lists))
        for kind, positions in bucket_indices(params, steps)
    ]


def _step_bucket(
    bucket: _Bucket, values: _StepValues, use_gc: bool, gc_conv_only: bool, plan_cache
) -> None:
    """Plan the bucket's waves (or reuse the plan), step wave by wave, write back."""
    param_dtype, work_dtype = bucket.params[0].dtype, bucket.exp_avgs[0].dtype
    grads = bucket.grads
    state = (bucket.exp_avgs, bucket.exp_avg_sqs, bucket.slow_params)
    if param_dtype == work_dtype:
        fast = bucket.params
        settings = (fast[0].device, param_dtype, use_gc, gc_conv_only)
        plan = _cached_plan(plan_cache, settings, fast, grads, *state)
    else:  # bf16/fp16: work on fp32 copies (new every step: no plan to keep)
        grads = [g.to(work_dtype) for g in grads]
        fast = [p.to(work_dtype) for p in bucket.params]
        plan = None
    if plan is None:
        plan = _Plan(fast, grads, *state, use_gc, gc_conv_only)
    plan.centralize(grads)
    scratch = _Scratch()
    for wave in plan.waves:
        _step_wave(wave, wave.grads(grads), values, scratch)
    if fast is not bucket.params:
        copy_into(bucket.params, fast)


def _step_wave(wave: _Wave, grads: list[torch.Tensor], values: _StepValues, scratch) -> None:
    """All of a step's operations on one wave, in `_single_tensor_ranger`'s order."""
    params, exp_avgs, exp_avg_sqs, slow_params = wave.state
    for position, row_length in wave.gc_rows:
        rows = grads[position].view(-1, row_length)
        rows.sub_(rows.mean(dim=1, keepdim=True))
    if values.decay is not None:
        torch._foreach_mul_(params, values.decay)
    if wave.flat is not None:
        _step_gathered_wave(wave.flat, params, exp_avgs, grads, values)
    else:
        torch._foreach_lerp_(exp_avgs, grads, values.beta1_weight)
        torch._foreach_mul_(exp_avg_sqs, values.beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, values.beta2_weight)
        if values.adaptive:
            denominators = scratch.sqrt(exp_avg_sqs)
            torch._foreach_add_(denominators, values.eps)
            torch._foreach_addcdiv_(params, exp_avgs, denominators, values.neg_step_size)
            del denominators
        else:
            torch._foreach_add_(params, exp_avgs, alpha=values.neg_step_size)
    if values.sync:
        torch._foreach_lerp_(slow_params, params, values.lookahead_alpha)
        copy_into(params, slow_params)


def _step_gathered_wave(flat: _Gathered, params, exp_avgs, grads, values: _StepValues) -> None:
    """The moments of a gathered wave as one operation each, not one per tensor."""
    torch._foreach_copy_(flat.scratch_views, grads)  # the gradients, flat
    flat.exp_avg.lerp_(flat.scratch, values.beta1_weight)
    flat.exp_avg_sq.mul_(values.beta2)
    flat.exp_avg_sq.addcmul_(flat.scratch, flat.scratch, value=values.beta2_weight)
    if values.adaptive:  # the gradients are used up: the scratch takes sqrt(v) + eps
        torch.sqrt(flat.exp_avg_sq, out=flat.scratch)
        flat.scratch.add_(values.eps)
        torch._foreach_addcdiv_(params, exp_avgs, flat.scratch_views, values.neg_step_size)
    else:
        torch._foreach_add_(params, exp_avgs, alpha=values.neg_step_size)


class _Scratch:
    """sqrt(v) + eps of a wave. A wave that is one chunk of a large tensor reuses one buffer
    across the bucket's waves: a fresh buffer this size would be mapped anew (page faults) on
    every wave."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def sqrt(self, exp_avg_sqs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(exp_avg_sqs) != 1 or exp_avg_sqs[0].numel() > _WAVE_NUMEL:
            return list(torch._foreach_sqrt(exp_avg_sqs))
        (exp_avg_sq,) = exp_avg_sqs
        numel = exp_avg_sq.numel()
        if self._buffer is None or self._buffer.numel() < numel:
            self._buffer = exp_avg_sq.new_empty(numel)
        return [torch.sqrt(exp_avg_sq, out=self._buffer[:numel].view(exp_avg_sq.shape))]


def foreach_waves(
    lists: list[list[torch.Tensor]], wave_numel: int | None = None
) -> list[list[list[torch.Tensor]]]:
    """``lists`` (same-shaped tensors position by position: params, grads, moments) cut into
    waves of about ``wave_numel`` elements, so that a variant's foreach step runs all its
    operations on one wave while it is in cache instead of streaming the whole model through
    memory once per operation. A contiguous tensor larger than a wave is cut into flat
    chunks. For elementwise steps only: every element goes through the same operations, so
    the results are unchanged, bit for bit."""
    wave_numel = wave_numel or _WAVE_NUMEL
    waves: list[list[list[torch.Tensor]]] = []
    current: list[list[torch.Tensor]] = [[] for _ in lists]
    current_numel = 0
    for tensors in zip(*lists):
        for pieces in _wave_pieces(tensors, wave_numel):
            numel = pieces[0].numel()
            if current_numel and current_numel + numel > wave_numel:
                waves.append(current)
                current, current_numel = [[] for _ in lists], 0
            for target, piece in zip(current, pieces):
                target.append(piece)
            current_numel += numel
    if current_numel or current[0]:
        waves.append(current)
    return waves


def _wave_pieces(tensors: tuple[torch.Tensor, ...], wave_numel: int) -> list[tuple]:
    numel = tensors[0].numel()
    if numel <= wave_numel or not _chunkable(*tensors):
        return [tensors]
    flats = [tensor.view(-1) for tensor in tensors]
    return [
        tuple(flat[start : start + wave_numel] for flat in flats)
        for start in range(0, numel, wave_numel)
    ]


_DEVICE = attrgetter("device")
_DTYPE = attrgetter("dtype")


def _one_device_and_dtype(params: list[torch.Tensor]) -> bool:
    first = params[0]
    device, dtype = first.device, first.dtype
    return all(p.dtype == dtype and p.device == device for p in params)


def _cached_plan(cache, settings, params, grads, exp_avgs, exp_avg_sqs, slow_params):
    """The plan of this bucket from ``cache`` if it still fits, else a new one (stored).

    The one invalidation rule: a plan is reused only for the same params and state tensors
    (the key, by identity; the plan holds them, so no id is reused while it lives), whose
    storage has not moved (`_Plan.fits`), with gradients of the same layout."""
    if cache is None:
        return None
    key = (
        settings,
        _WAVE_NUMEL,
        _SMALL_GC_NUMEL,
        tuple(map(id, params)),
        tuple(map(id, exp_avgs)),
        tuple(map(id, exp_avg_sqs)),
        tuple(map(id, slow_params)),
    )
    # One slot per (settings, size): a bucket that changes (state reloaded, params skipping
    # steps) replaces its old plan, so no stale plan keeps old state tensors alive for long.
    slot = (settings, len(params), id(params[0]))
    entry = cache.get(slot)
    if entry is not None and entry[0] == key and entry[1].fits(grads):
        plan = entry[1]
        # Reused at least once: worth moving the moments of its small-tensor waves (a state
        # copy). A bucket that changes every step never pays it.
        plan.gather()
        return plan
    plan = _Plan(params, grads, exp_avgs, exp_avg_sqs, slow_params, *settings[2:])
    if len(cache) > 8:
        cache.clear()
    cache[slot] = (key, plan)
    return plan


def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> float | torch.Tensor:
    # On CPU a foreach op given a Python number wraps it into a new tensor for every tensor of
    # the list (a few microseconds each); a 0-d tensor of the list's dtype gives the same
    # values and is made once. On accelerators the number stays a number: a device tensor
    # would cost a host-to-device copy.
    if device.type == "cpu":
        return torch.tensor(value, dtype=dtype)
    return value


def _chunkable(*tensors: torch.Tensor) -> bool:
    # Flat views need plain contiguous tensors (not DTensors or other subclasses).
    for tensor in tensors:
        if type(tensor) not in PLAIN_TENSOR_TYPES or not tensor.is_contiguous():
            return False
    return True


def _relocate(tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
    """Copy contiguous ``tensors`` into one new flat buffer and make each a view of it."""
    flat = torch.empty(numel, dtype=tensors[0].dtype, device=tensors[0].device)
    storage = flat.untyped_storage()
    offset = 0
    for tensor in tensors:
        size = tensor.numel()
        flat[offset : offset + size].copy_(tensor.reshape(-1))
        tensor.set_(storage, offset, tensor.shape, tensor.stride())
        offset += size
    return flat


def _views_like(flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of ``flat`` shaped like ``tensors``."""
    views, offset = [], 0
    for tensor in tensors:
        views.append(flat[offset : offset + tensor.numel()].view(tensor.shape))
        offset += tensor.numel()
    return views


class _Piece(NamedTuple):
    """A whole tensor of a bucket, or a row-aligned chunk of a large one, in a wave."""

    numel: int
    position: int  # the tensor's position in the bucket
    span: tuple[int, int] | None  # (start, end) elements of a chunk; None: the whole tensor
    param: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    slow: torch.Tensor
    gc_row_length: int | None  # centralized in its wave, in rows of this length


class _Gathered(NamedTuple):
    """A gathered wave's flat moments (the state tensors are views of them) and scratch."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    scratch: torch.Tensor  # the gradients, then sqrt(v) + eps
    scratch_views: list[torch.Tensor]  # shaped like the wave's tensors


class _Wave:
    """One wave: its param and state pieces (fixed), and how to cut its gradient pieces."""

    def __init__(self, pieces: list[_Piece]) -> None:
        self.state = tuple(
            [getattr(piece, name) for piece in pieces]
            for name in ("param", "exp_avg", "exp_avg_sq", "slow")
        )
        self.numel = sum(piece.numel for piece in pieces)
        self._indices = [piece.position for piece in pieces]
        spans = [piece.span for piece in pieces]
        self._spans = spans if any(span is not None for span in spans) else None
        self._pick = itemgetter(*self._indices)
        self.gc_rows = [
            (position, piece.gc_row_length)
            for position, piece in enumerate(pieces)
            if piece.gc_row_length is not None
        ]
        self.flat: _Gathered | None = None  # set by `gather`

    def can_gather(self) -> bool:
        """Whether `gather` applies: many whole small tensors with plain contiguous state."""
        if self._spans is not None or len(self._indices) < _MIN_GATHERED_PIECES:
            return False
        _, exp_avgs, exp_avg_sqs, _ = self.state
        return exp_avgs[0].device.type == "cpu" and _chunkable(*exp_avgs, *exp_avg_sqs)

    def gather(self, buffer: torch.Tensor) -> None:
        """Move the wave's moments into one flat buffer each (the state tensors stay the same
        objects, now views of it), so their updates run as one operation each instead of one
        per tensor. The step gathers the gradients into ``buffer`` (one `_foreach_copy_`) and,
        once the moments no longer need them, puts sqrt(v) + eps there."""
        _, exp_avgs, exp_avg_sqs, _ = self.state
        scratch = buffer[: self.numel]
        self.flat = _Gathered(
            _relocate(exp_avgs, self.numel),
            _relocate(exp_avg_sqs, self.numel),
            scratch,
            _views_like(scratch, exp_avgs),
        )
        self._gathered_pointers = [t.data_ptr() for t in exp_avgs + exp_avg_sqs]

    def gathered_in_place(self) -> bool:
        """Whether every moment still lives where `gather` put it."""
        _, exp_avgs, exp_avg_sqs, _ = self.state
        return list(map(torch.Tensor.data_ptr, exp_avgs + exp_avg_sqs)) == self._gathered_pointers

    def grads(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """This wave's gradient pieces, cut from the step's gradients."""
        if self._spans is None:
            picked = self._pick(grads)
            return list(picked) if len(self._indices) > 1 else [picked]
        return [
            grads[index] if span is None else grads[index].view(-1)[span[0] : span[1]]
            for index, span in zip(self._indices, self._spans)
        ]


class _Plan:
    """How one bucket's step runs: its waves, and how its gradients are centralized.

    Built from the params, state and gradients of a step; it depends on the gradients only
    through their layout (`fits` checks that the next step's gradients have it), so it can be
    reused for the next steps of the same params.
    """

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, slow_params, use_gc, gc_conv_only):
        self.wave_numel = _wave_numel(params)
        self._gc_conv_only = gc_conv_only
        self._single_gc: list[int] = []  # gradients centralized one by one
        self._contiguous_grads: list[int] = []  # gradients the plan views as flat or rows
        self._chunked: list[tuple] = []  # (param, state, their data_ptrs) of cut tensors
        self._small_gc: dict[int, list[int]] = defaultdict(list)  # row length -> indices
        pieces: list[_Piece] = []
        for index, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, slow_params)):
            gc = use_gc and tensors[0].numel() > 0 and _gc_applies(tensors[1], gc_conv_only)
            pieces += self._pieces(index, tensors, gc)
        self._gc_batches: list[tuple] = []
        for same_length in self._small_gc.values():
            self._batch_small_gc(same_length, grads)
        self.waves = _pack_waves(pieces, self.wave_numel)
        self._gathered: list[_Wave] | None = None  # None: `gather` not tried yet

    def _pieces(self, index: int, tensors: tuple, gc: bool) -> list[_Piece]:
        """The pieces of one tensor, and how its gradient is centralized."""
        param, grad, exp_avg, exp_avg_sq, slow = tensors
        numel = param.numel()
        if numel > self.wave_numel and _chunkable(*tensors):
            return self._chunks(index, tensors, gc)
        rows = None
        if gc and not _chunkable(grad):
            self._single_gc.append(index)
        elif gc and numel < _SMALL_GC_NUMEL:
            self._small_gc[numel // grad.shape[0]].append(index)
            self._contiguous_grads.append(index)
        elif gc:  # centralized in its wave, while it is in cache
            rows = numel // grad.shape[0]
            self._contiguous_grads.append(index)
        return [_Piece(numel, index, None, param, exp_avg, exp_avg_sq, slow, rows)]

    def _chunks(self, index: int, tensors: tuple, gc: bool) -> list[_Piece]:
        """Row-aligned chunks of a large contiguous tensor, a wave each."""
        param, grad, exp_avg, exp_avg_sq, slow = tensors
        numel = param.numel()
        self._contiguous_grads.append(index)
        owned = (param, exp_avg, exp_avg_sq, slow)
        self._chunked.append((owned, tuple(t.data_ptr() for t in owned)))
        row_length = numel // grad.shape[0] if gc else 1
        chunk = max(1, self.wave_numel // row_length) * row_length
        flats = [t.view(-1) for t in owned]
        pieces = []
        for start in range(0, numel, chunk):
            param_chunk, exp_avg_chunk, exp_avg_sq_chunk, slow_chunk = (
                flat[start : start + chunk] for flat in flats
            )
            numel_chunk = param_chunk.numel()
            span = (start, start + numel_chunk)
            rows = row_length if gc else None
            pieces.append(
                _Piece(
                    numel_chunk,
                    index,
                    span,
                    param_chunk,
                    exp_avg_chunk,
                    exp_avg_sq_chunk,
                    slow_chunk,
                    rows,
                )
            )
        return pieces

    def _batch_small_gc(self, same_length: list[int], grads: list[torch.Tensor]) -> None:
        """Batches of same-row-length gradients whose concatenated copy stays within a wave."""
        batch: list[int] = []
        batch_numel = 0
        for index in same_length:
            numel = grads[index].numel()
            if batch and batch_numel + numel > self.wave_numel:
                self._add_gc_batch(batch, grads)
                batch, batch_numel = [], 0
            batch.append(index)
            batch_numel += numel
        self._add_gc_batch(batch, grads)

    def gather(self) -> None:
        """Gather the waves of many small tensors (`_Wave.gather`), once."""
        if self._gathered is not None:
            return
        gathered = [wave for wave in self.waves if wave.can_gather()]
        if gathered:
            work = gathered[0].state[1][0]
            size = max(wave.numel for wave in gathered)
            # One buffer for all of them: the waves run one after another.
            buffer = torch.empty(size, dtype=work.dtype, device=work.device)
            for wave in gathered:
                wave.gather(buffer)
        self._gathered = gathered

    def _add_gc_batch(self, batch: list[int], grads: list[torch.Tensor]) -> None:
        if len(batch) == 1:
            self._single_gc.append(batch[0])
            return
        rows = [grads[index].shape[0] for index in batch]
        as_matrices = all(grads[index].dim() == 2 for index in batch)
        self._gc_batches.append((itemgetter(*batch), rows, as_matrices))

    def fits(self, grads: list[torch.Tensor]) -> bool:
        """Whether this plan still holds for these gradients (and the params' storage)."""
        for index in self._contiguous_grads:
            grad = grads[index]
            if type(grad) not in PLAIN_TENSOR_TYPES or not grad.is_contiguous():
                return False
        for owned, pointers in self._chunked:
            if tuple(t.data_ptr() for t in owned) != pointers:
                return False
        return all(wave.gathered_in_place() for wave in self._gathered or ())

    def centralize(self, grads: list[torch.Tensor]) -> None:
        """GC, in place, of the gradients that are not centralized per wave."""
        for index in self._single_gc:
            centralize_gradient(grads[index], self._gc_conv_only)
        for pick, rows, as_matrices in self._gc_batches:
            batch = pick(grads)
            matrices = list(batch) if as_matrices else [g.view(g.shape[0], -1) for g in batch]
            # One mean over all their rows: one mean per tensor costs more in dispatch than
            # in arithmetic.
            means = torch.cat(matrices).mean(dim=1, keepdim=True)
            torch._foreach_sub_(matrices, list(means.split(rows)))


def _wave_numel(params: list[torch.Tensor]) -> int:
    total = sum(p.numel() for p in params)
    if params and params[0].device.type == "cpu":
        return min(_WAVE_NUMEL, max(_MIN_WAVE_NUMEL, total // 12))
    # On a GPU each wave costs a kernel launch per operation and the foreach kernels already
    # stream well: a dozen waves at most, just to bound the sqrt temporary (~8% of params).
    return max(_ACCELERATOR_MIN_WAVE_NUMEL, total // 12)


def _pack_waves(pieces: list[_Piece], wave_numel: int) -> list[_Wave]:
    """Chunks of large tensors first (a wave each), then whole tensors from the largest to
    the smallest: in parameter order a convnet's norm weights and biases would sit in waves
    of conv chunks, and those waves could neither use the one-chunk scratch nor be gathered
    into flat moments."""
    chunks = [piece for piece in pieces if piece.span is not None]
    whole = sorted((piece for piece in pieces if piece.span is None), key=lambda p: -p.numel)
    waves: list[_Wave] = []
    current: list[_Piece] = []
    current_numel = 0
    for piece in chunks + whole:
        if current and current_numel + piece.numel > wave_numel:
            waves.append(_Wave(current))
            current, current_numel = [], 0
        current.append(piece)
        current_numel += piece.numel
    if current:
        waves.append(_Wave(current))
    return waves
