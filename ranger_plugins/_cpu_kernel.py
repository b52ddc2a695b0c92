"""The fused step's CPU kernel: each row's GC mean and update in one pass, in C++.

Why a hand-written kernel next to the compiled one (facts measured on torch 2.14, 2 cores):
inductor crashes when GC's row mean is computed inside the compiled kernel (see `_fused`), so
there the mean is a separate read of the gradient, and the GC-on step took 1.55-1.86x the
memory floor against 1.13-1.34x without GC. This loop sums a row, then updates it while it is
still in L1 cache: 1.24x and 1.18x the floor with GC on, on ResNet-50 and BERT-like shapes, in
the README's benchmark run (1.22-1.45x in one-process A/B runs as the machine's load moved,
against 1.61-1.81x for the compiled kernel in the same runs).

It is built on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; about
25 s once, then loaded from torch's extension cache), for the vector width torch itself
dispatches to on this CPU. Where it cannot be built, the fused step keeps the compiled kernel
(with one warning). It covers params, gradients and state of one dtype (float32 or float64);
other combinations (bfloat16 params with float32 state) and accelerators use the compiled
kernel.
"""

from __future__ import annotations

import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("csrc") / "ranger_rows.cpp"

_kernel: Callable[..., None] | None = None
_unavailable = False  # the build failed once: do not retry every step
enabled = True  # tests switch it off to exercise the compiled kernel on CPU


def _vector_flags() -> tuple[str, list[str]]:
    """A tag for the build and the compiler flags for torch's vector width on this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512") and platform.machine().lower() in ("x86_64", "amd64"):
        # 256-bit vectors on AVX-512 CPUs too: the loop is bound by memory, not by width.
        return "avx2", ["-mavx2", "-mfma"]
    return "default", []


def rows_kernel() -> Callable[..., None] | None:
    """``ranger_rows_(param, grad, exp_avg, exp_avg_sq, slow, hyperparameters, centralize,
    adaptive, sync)`` on 2-D contiguous CPU views, or None where it cannot be built."""
    global _kernel, _unavailable
    if not enabled or _unavailable:
        return None
    if _kernel is None:
        if sys.platform == "win32":  # the flags below are GCC/Clang's
            _unavailable = True
            return None
        tag, flags = _vector_flags()
        try:
            from torch.utils.cpp_extension import load

            module = load(
                name=f"ranger_plugins_rows_{tag}",
                sources=[str(_SOURCE)],
                # Vectorized sqrt needs no errno; no contracted multiply-adds, so the
                # arithmetic rounds like the default path's separate operations.
                extra_cflags=["-O3", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=off"]
                + flags,
                verbose=False,
            )
        except Exception as error:  # no compiler, no ninja, no headers
            _unavailable = True
            warnings.warn(
                f"Ranger(fused=True): could not build the CPU kernel ({type(error).__name__}: "
                f"{error}); using the compiled kernel, with GC's row means read separately",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        _kernel = module.ranger_rows_
    return _kernel
