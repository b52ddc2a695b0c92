"""The multi-tensor (`torch._foreach_*`) Ranger step: the default implementation.

It must agree with `ranger._single_tensor_ranger`, the readable ground truth, on every param
and state tensor.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ._math import centralize_gradient, rectification
from .lookahead import _copy_into


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
    # One bucket per (device, dtype, step): foreach kernels need one device and dtype, and
    # the step decides the scalar step size and whether Lookahead syncs.
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

        if use_gc:
            for grad in bucket_grads:
                centralize_gradient(grad, gc_conv_only)

        if weight_decay != 0:
            torch._foreach_mul_(fast, 1.0 - lr * weight_decay)
        torch._foreach_lerp_(bucket_exp_avgs, bucket_grads, 1.0 - beta1)
        torch._foreach_mul_(bucket_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(bucket_exp_avg_sqs, bucket_grads, bucket_grads, 1.0 - beta2)

        multiplier, adaptive = rectification(step, beta1, beta2, rectify_threshold)
        if adaptive:
            denominators = torch._foreach_sqrt(bucket_exp_avg_sqs)
            torch._foreach_add_(denominators, eps)
            torch._foreach_addcdiv_(fast, bucket_exp_avgs, denominators, -lr * multiplier)
            del denominators
        else:
            torch._foreach_add_(fast, bucket_exp_avgs, alpha=-lr * multiplier)

        if step % lookahead_k == 0:
            torch._foreach_lerp_(bucket_slow, fast, lookahead_alpha)
            _copy_into(fast, bucket_slow)
        if fast is not bucket_params:
            _copy_into(bucket_params, fast)
