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
from operator import itemgetter

import torch

from ._math import _gc_applies, centralize_gradient, rectification
from .lookahead import _copy_into

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

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


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
    if steps and steps.count(steps[0]) == len(steps) and _one_device_and_dtype(params):
        buckets = {(params[0].device, params[0].dtype, steps[0]): None}  # None: all of them
    else:
        buckets = defaultdict(list)
        for index, (param, step) in enumerate(zip(params, steps)):
            buckets[(param.device, param.dtype, step)].append(index)

    for (device, param_dtype, step), indices in buckets.items():
        if indices is None:
            bucket_params, bucket_grads = params, grads
            bucket_exp_avgs, bucket_exp_avg_sqs, bucket_slow = exp_avgs, exp_avg_sqs, slow_params
        else:
            bucket_params = [params[i] for i in indices]
            bucket_grads = [grads[i] for i in indices]
            bucket_exp_avgs = [exp_avgs[i] for i in indices]
            bucket_exp_avg_sqs = [exp_avg_sqs[i] for i in indices]
            bucket_slow = [slow_params[i] for i in indices]
        work_dtype = bucket_exp_avgs[0].dtype
        if param_dtype == work_dtype:
            fast = bucket_params
            plan = _cached_plan(
                plan_cache,
                (device, param_dtype, use_gc, gc_conv_only),
                fast,
                bucket_grads,
                bucket_exp_avgs,
                bucket_exp_avg_sqs,
                bucket_slow,
            )
        else:  # bf16/fp16: work on fp32 copies (new every step: no plan to keep)
            bucket_grads = [g.to(work_dtype) for g in bucket_grads]
            fast = [p.to(work_dtype) for p in bucket_params]
            plan = None
        if plan is None:
            plan = _Plan(
                fast,
                bucket_grads,
                bucket_exp_avgs,
                bucket_exp_avg_sqs,
                bucket_slow,
                use_gc,
                gc_conv_only,
            )

        multiplier, adaptive = rectification(step, beta1, beta2, rectify_threshold)
        sync = step % lookahead_k == 0
        beta2_scalar = _scalar(beta2, work_dtype, device)
        eps_scalar = _scalar(eps, work_dtype, device)
        decay = _scalar(1.0 - lr * weight_decay, work_dtype, device)
        plan.centralize(bucket_grads)
        scratch = None  # one wave's sqrt(v) + eps, reused across the single-chunk waves
        for wave in plan.waves:
            wave_params, wave_exp_avgs, wave_exp_avg_sqs, wave_slow = wave.state
            wave_grads = wave.grads(bucket_grads)
            for position, row_length in wave.gc_rows:
                rows = wave_grads[position].view(-1, row_length)
                rows.sub_(rows.mean(dim=1, keepdim=True))
            if weight_decay != 0:
                torch._foreach_mul_(wave_params, decay)
            # Flat moments: one operation each, not one per tensor.
            if wave.flat is not None:
                exp_avg_flat, exp_avg_sq_flat, scratch_flat, scratch_views = wave.flat
                torch._foreach_copy_(scratch_views, wave_grads)  # the gradients, flat
                exp_avg_flat.lerp_(scratch_flat, 1.0 - beta1)
                exp_avg_sq_flat.mul_(beta2)
                exp_avg_sq_flat.addcmul_(scratch_flat, scratch_flat, value=1.0 - beta2)
                if adaptive:  # the gradients are used up: the scratch takes sqrt(v) + eps
                    torch.sqrt(exp_avg_sq_flat, out=scratch_flat)
                    scratch_flat.add_(eps)
                    torch._foreach_addcdiv_(
                        wave_params, wave_exp_avgs, scratch_views, -lr * multiplier
                    )
                else:
                    torch._foreach_add_(wave_params, wave_exp_avgs, alpha=-lr * multiplier)
                if sync:
                    torch._foreach_lerp_(wave_slow, wave_params, lookahead_alpha)
                    _copy_into(wave_params, wave_slow)
                continue
            torch._foreach_lerp_(wave_exp_avgs, wave_grads, 1.0 - beta1)
            torch._foreach_mul_(wave_exp_avg_sqs, beta2_scalar)
            torch._foreach_addcmul_(wave_exp_avg_sqs, wave_grads, wave_grads, 1.0 - beta2)
            if adaptive:
                if len(wave_exp_avg_sqs) == 1 and wave_exp_avg_sqs[0].numel() <= _WAVE_NUMEL:
                    # A chunk of a large tensor: a fresh buffer this size would be mapped anew
                    # (page faults) on every wave.
                    (exp_avg_sq,) = wave_exp_avg_sqs
                    if scratch is None or scratch.numel() < exp_avg_sq.numel():
                        scratch = torch.empty(exp_avg_sq.numel(), dtype=work_dtype, device=device)
                    view = scratch[: exp_avg_sq.numel()].view(exp_avg_sq.shape)
                    denominators = [torch.sqrt(exp_avg_sq, out=view)]
                else:
                    denominators = torch._foreach_sqrt(wave_exp_avg_sqs)
                torch._foreach_add_(denominators, eps_scalar)
                torch._foreach_addcdiv_(wave_params, wave_exp_avgs, denominators, -lr * multiplier)
                del denominators
            else:
                torch._foreach_add_(wave_params, wave_exp_avgs, alpha=-lr * multiplier)
            if sync:
                torch._foreach_lerp_(wave_slow, wave_params, lookahead_alpha)
                _copy_into(wave_params, wave_slow)
        if fast is not bucket_params:
            _copy_into(bucket_params, fast)


def _one_device_and_dtype(params: list[torch.Tensor]) -> bool:
    first = params[0]
    device, dtype = first.device, first.dtype
    return all(p.dtype == dtype and p.device == device for p in params)


def _cached_plan(cache, settings, params, grads, exp_avgs, exp_avg_sqs, slow_params):
    """The plan of this bucket from ``cache`` if it still fits, else a new one (stored)."""
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
        if type(tensor) not in _PLAIN_TYPES or not tensor.is_contiguous():
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


class _Wave:
    """One wave: its param and state pieces (fixed), and how to cut its gradient pieces."""

    def __init__(self, pieces: list[tuple]) -> None:
        # piece: (numel, index, span or None, p, m, v, slow, gc row length or None)
        _, indices, spans, wave_params, wave_exp_avgs, wave_exp_avg_sqs, wave_slow, rows = map(
            list, zip(*pieces)
        )
        self.state = (wave_params, wave_exp_avgs, wave_exp_avg_sqs, wave_slow)
        self.numel = sum(piece[0] for piece in pieces)
        self._indices = indices
        self._spans = spans if any(span is not None for span in spans) else None
        self._pick = itemgetter(*indices)
        self.gc_rows = [(pos, length) for pos, length in enumerate(rows) if length is not None]
        self.flat: tuple | None = None  # set by `gather`

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
        numel = self.numel
        flat = buffer[:numel]
        self.flat = (
            _relocate(exp_avgs, numel),
            _relocate(exp_avg_sqs, numel),
            flat,
            _views_like(flat, exp_avgs),
        )

    def gathered_in_place(self) -> bool:
        """Whether the moments still live in the flat buffers `gather` made."""
        exp_avg_flat, exp_avg_sq_flat = self.flat[:2]
        _, exp_avgs, exp_avg_sqs, _ = self.state
        return (
            exp_avgs[0].data_ptr() == exp_avg_flat.data_ptr()
            and exp_avg_sqs[0].data_ptr() == exp_avg_sq_flat.data_ptr()
        )

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
        total = sum(p.numel() for p in params)
        if params and params[0].device.type == "cpu":
            wave_numel = min(_WAVE_NUMEL, max(_MIN_WAVE_NUMEL, total // 12))
        else:
            # On a GPU each wave costs a kernel launch per operation and the foreach kernels
            # already stream well: a dozen waves at most, just to bound the sqrt temporary
            # (~8% of params).
            wave_numel = max(_ACCELERATOR_MIN_WAVE_NUMEL, total // 12)
        self.wave_numel = wave_numel
        self._gc_conv_only = gc_conv_only
        self._single_gc: list[int] = []  # gradients centralized one by one
        self._contiguous_grads: list[int] = []  # gradients the plan views as flat or rows
        self._chunked: list[tuple] = []  # (param, state, their data_ptrs) of cut tensors
        pieces: list[tuple] = []
        small_gc: dict[int, list[int]] = defaultdict(list)
        for index, (param, grad, exp_avg, exp_avg_sq, slow) in enumerate(
            zip(params, grads, exp_avgs, exp_avg_sqs, slow_params)
        ):
            numel = param.numel()
            gc = use_gc and numel > 0 and _gc_applies(grad, gc_conv_only)
            tensors = (param, grad, exp_avg, exp_avg_sq, slow)
            chunkable = numel > wave_numel and _chunkable(*tensors)
            if not chunkable:
                rows = None
                if gc:
                    if not _chunkable(grad):
                        self._single_gc.append(index)
                    elif numel < _SMALL_GC_NUMEL:
                        small_gc[numel // grad.shape[0]].append(index)
                        self._contiguous_grads.append(index)
                    else:  # centralized in its wave, while it is in cache
                        rows = numel // grad.shape[0]
                        self._contiguous_grads.append(index)
                pieces.append((numel, index, None, param, exp_avg, exp_avg_sq, slow, rows))
                continue
            self._contiguous_grads.append(index)
            owned = (param, exp_avg, exp_avg_sq, slow)
            self._chunked.append((owned, tuple(t.data_ptr() for t in owned)))
            row_length = numel // grad.shape[0] if gc else 1
            chunk = max(1, wave_numel // row_length) * row_length
            flats = [t.view(-1) for t in owned]
            for start in range(0, numel, chunk):
                views = [flat[start : start + chunk] for flat in flats]
                span = (start, start + views[0].numel())
                pieces.append((views[0].numel(), index, span, *views, row_length if gc else None))
        # Batches of same-row-length gradients whose concatenated copy stays within a wave.
        self._gc_batches: list[tuple] = []
        for same_length in small_gc.values():
            batch: list[int] = []
            batch_numel = 0
            for index in same_length:
                numel = grads[index].numel()
                if batch and batch_numel + numel > wave_numel:
                    self._add_gc_batch(batch, grads)
                    batch, batch_numel = [], 0
                batch.append(index)
                batch_numel += numel
            self._add_gc_batch(batch, grads)

        self.waves: list[_Wave] = []
        current: list[tuple] = []
        current_numel = 0
        # Chunks of large tensors first (a wave each), then whole tensors from the largest to
        # the smallest: in parameter order a convnet's norm weights and biases would sit in
        # waves of conv chunks, and those waves could neither use the one-chunk fast path nor
        # be gathered into flat moments.
        chunks = [piece for piece in pieces if piece[2] is not None]
        whole = sorted((piece for piece in pieces if piece[2] is None), key=lambda piece: -piece[0])
        for piece in chunks + whole:
            if current and current_numel + piece[0] > wave_numel:
                self.waves.append(_Wave(current))
                current, current_numel = [], 0
            current.append(piece)
            current_numel += piece[0]
        if current:
            self.waves.append(_Wave(current))
        self._gathered: list[_Wave] | None = None  # None: `gather` not tried yet

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
            if type(grad) not in _PLAIN_TYPES or not grad.is_contiguous():
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
