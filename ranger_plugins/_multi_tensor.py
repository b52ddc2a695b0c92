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
* Gradient Centralization in place: on large tensors per chunk of whole rows inside the wave
  (the mean is read from cache); on small tensors batched per row length (one `cat`, one `mean`
  and one foreach subtraction for all of them), since one mean per tensor costs more in
  dispatch than in arithmetic.
* One bucket per (device, dtype, step): foreach kernels need one device and dtype, and the step
  decides the scalar step size and whether Lookahead syncs.
"""

from __future__ import annotations

from collections import defaultdict

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
) -> None:
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for index, (param, step) in enumerate(zip(params, steps)):
        buckets[(param.device, param.dtype, step)].append(index)

    for (_, param_dtype, step), indices in buckets.items():
        bucket_params = [params[i] for i in indices]
        bucket_exp_avgs = [exp_avgs[i] for i in indices]
        bucket_exp_avg_sqs = [exp_avg_sqs[i] for i in indices]
        bucket_slow = [slow_params[i] for i in indices]
        work_dtype = bucket_exp_avgs[0].dtype
        if param_dtype == work_dtype:
            bucket_grads = [grads[i] for i in indices]
            fast = bucket_params
        else:  # bf16/fp16: work on fp32 copies
            bucket_grads = [grads[i].to(work_dtype) for i in indices]
            fast = [p.to(work_dtype) for p in bucket_params]

        multiplier, adaptive = rectification(step, beta1, beta2, rectify_threshold)
        sync = step % lookahead_k == 0
        device = bucket_exp_avgs[0].device
        beta2_scalar = _scalar(beta2, work_dtype, device)
        eps_scalar = _scalar(eps, work_dtype, device)
        decay = _scalar(1.0 - lr * weight_decay, work_dtype, device)
        waves = _plan_waves(
            fast,
            bucket_grads,
            bucket_exp_avgs,
            bucket_exp_avg_sqs,
            bucket_slow,
            use_gc,
            gc_conv_only,
        )
        scratch = None  # one wave's sqrt(v) + eps, reused across the single-chunk waves
        for wave in waves:
            wave_params, wave_grads, wave_exp_avgs, wave_exp_avg_sqs, wave_slow, gc_rows = wave
            for rows in gc_rows:
                rows.sub_(rows.mean(dim=1, keepdim=True))
            if weight_decay != 0:
                torch._foreach_mul_(wave_params, decay)
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


def _plan_waves(params, grads, exp_avgs, exp_avg_sqs, slow_params, use_gc, gc_conv_only):
    """Cut the tensors into pieces and pack them into waves of about `_WAVE_NUMEL` elements.

    Returns a list of (params, grads, exp_avgs, exp_avg_sqs, slow_params, gc_rows) per wave, the
    first five being lists of same-shaped pieces, and gc_rows the 2-D (rows, row length) views of
    the wave's gradient pieces still to be centralized. Gradients that are centralized here
    (small ones, batched; and any that cannot be cut into rows) are done before returning.
    """
    total = sum(p.numel() for p in params)
    if params and params[0].device.type == "cpu":
        wave_numel = min(_WAVE_NUMEL, max(_MIN_WAVE_NUMEL, total // 12))
    else:
        # On a GPU each wave costs a kernel launch per operation and the foreach kernels already
        # stream well: a dozen waves at most, just to bound the sqrt temporary (~8% of params).
        wave_numel = max(_ACCELERATOR_MIN_WAVE_NUMEL, total // 12)
    pieces: list[tuple] = []  # (numel, p, g, m, v, slow, gc_rows or None)
    small_gc: dict[int, list[torch.Tensor]] = defaultdict(list)
    for param, grad, exp_avg, exp_avg_sq, slow in zip(
        params, grads, exp_avgs, exp_avg_sqs, slow_params
    ):
        numel = param.numel()
        gc = use_gc and numel > 0 and _gc_applies(grad, gc_conv_only)
        chunkable = numel > wave_numel and _chunkable(param, grad, exp_avg, exp_avg_sq, slow)
        if not chunkable:
            if gc:
                if numel < _SMALL_GC_NUMEL and _chunkable(grad):
                    small_gc[numel // grad.shape[0]].append(grad)
                else:
                    centralize_gradient(grad, gc_conv_only)
            pieces.append((numel, param, grad, exp_avg, exp_avg_sq, slow, None))
            continue
        row_length = numel // grad.shape[0] if gc else 1
        chunk = max(1, wave_numel // row_length) * row_length
        flats = [t.view(-1) for t in (param, grad, exp_avg, exp_avg_sq, slow)]
        for start in range(0, numel, chunk):
            views = [flat[start : start + chunk] for flat in flats]
            rows = views[1].view(-1, row_length) if gc else None
            pieces.append((views[0].numel(), *views, rows))
    for same_length in small_gc.values():
        batch: list[torch.Tensor] = []
        batch_numel = 0
        for grad in same_length:  # the concatenated copy stays within one wave's size
            if batch and batch_numel + grad.numel() > wave_numel:
                _centralize_batched(batch)
                batch, batch_numel = [], 0
            batch.append(grad)
            batch_numel += grad.numel()
        _centralize_batched(batch)

    waves = []
    current: list[tuple] = []
    current_numel = 0
    for piece in pieces:
        if current and current_numel + piece[0] > wave_numel:
            waves.append(_wave(current))
            current, current_numel = [], 0
        current.append(piece)
        current_numel += piece[0]
    if current:
        waves.append(_wave(current))
    return waves


def _wave(pieces: list[tuple]) -> tuple:
    _, wave_params, wave_grads, wave_exp_avgs, wave_exp_avg_sqs, wave_slow, rows = map(
        list, zip(*pieces)
    )
    return (
        wave_params,
        wave_grads,
        wave_exp_avgs,
        wave_exp_avg_sqs,
        wave_slow,
        [r for r in rows if r is not None],
    )


def _centralize_batched(grads: list[torch.Tensor]) -> None:
    """GC of contiguous gradients that share a row length: one mean over all their rows."""
    if len(grads) == 1:
        centralize_gradient(grads[0])
        return
    matrices = [g.view(g.shape[0], -1) for g in grads]
    means = torch.cat(matrices).mean(dim=1, keepdim=True)
    torch._foreach_sub_(matrices, list(means.split([m.shape[0] for m in matrices])))
