"""The fused step's C++ CPU kernel: each row's GC mean and update in one pass over memory.

One call steps a whole list of params on their own tensors (``csrc/ranger_rows.cpp``): it
reads p, grad, m and v and writes p, m and v once per element, the memory floor of the step
with Gradient Centralization on. It covers CPU params of float32/float64 (state of the same
dtype) and bfloat16/float16 (float32 state); `fused_ranger` steps any other param with the
default path.

A second entry point steps params whose state is in the low-memory layouts of
`_low_memory` ("16bit", "8bit"; ``csrc/ranger_low_memory.cpp``), for `_fused`'s
`fused_low_memory_step`.

It is built on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja) for
the vector width torch itself dispatches to on this CPU, then loaded from torch's extension
cache. The first build says so on stderr; where no build is possible, one warning names the
cause and the fused step runs the default path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch

_SOURCES = [
    Path(__file__).with_name("csrc") / name for name in ("ranger_rows.cpp", "ranger_low_memory.cpp")
]
# Bumped whenever the extension gains or changes an entry point, so that a build cached by
# an older version (in torch's extension cache, keyed by name) is not loaded.
_BUILD_VERSION = 2
_PACKAGE_DIR = str(Path(__file__).parent)

_kernel: Any = None  # the loaded extension module
_unavailable = False  # the build failed once: do not retry every step
enabled = True  # tests switch it off to exercise the fallback


def _vector_flags() -> tuple[str, list[str]]:
    """A tag for the build and the compiler flags for torch's vector width on this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512") and platform.machine().lower() in ("x86_64", "amd64"):
        # 256-bit vectors on AVX-512 CPUs too: the loop is bound by memory, not by width.
        return "avx2", ["-mavx2", "-mfma"]
    return "default", []


@contextlib.contextmanager
def _quiet_torch_build_logs() -> Iterator[None]:
    # torch's extension builder logs "No CUDA runtime is found, using CUDA_HOME=..." on
    # CPU-only machines and a multi-line compiler banner; neither concerns a CPU kernel.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _build() -> Any:
    tag, flags = _vector_flags()
    name = f"ranger_plugins_step_v{_BUILD_VERSION}_{tag}"
    with _quiet_torch_build_logs():
        from torch.utils import cpp_extension

        build_dir = cpp_extension._get_build_directory(name, verbose=False)
        if not any(Path(build_dir).glob(f"{name}*.so")):
            print(
                "ranger_plugins: building the fused step's C++ CPU kernel (once per machine, "
                f"about a minute; cached in {build_dir})",
                file=sys.stderr,
                flush=True,
            )
        module = cpp_extension.load(
            name=name,
            sources=[str(source) for source in _SOURCES],
            # Vectorized sqrt needs no errno, and if-converted selects between arithmetic need
            # no FP-exception traps (torch builds so too; neither changes a value); no
            # contracted multiply-adds, so the arithmetic rounds like the default path's
            # separate operations (the low-memory step fuses with explicit std::fma exactly
            # where torch's own kernels do).
            extra_cflags=[
                "-O3",
                "-fopenmp-simd",
                "-fno-math-errno",
                "-fno-trapping-math",
                "-ffp-contract=off",
                *flags,
            ],
            build_directory=build_dir,
            verbose=False,
        )
    return module


def step_kernel() -> Callable[..., list[int]] | None:
    """``ranger_step_(params, grads, exp_avgs, exp_avg_sqs, slows, hyperparameters,
    gc_min_dim, adaptive, sync) -> positions not stepped``, or None where it cannot be
    built (or `enabled` is off)."""
    module = _module()
    return None if module is None else module.ranger_step_


def low_memory_step_kernel() -> Callable[..., list[int]] | None:
    """``ranger_step_low_memory_(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales,
    exp_avg_sq_scales, slow_deltas, hyperparameters, gc_min_dim, adaptive, sync, step) ->
    positions not stepped``, or None where it cannot be built (or `enabled` is off)."""
    module = _module()
    return getattr(module, "ranger_step_low_memory_", None)


def _module() -> Any:
    """The extension module, built and loaded on first use; None where it cannot be."""
    global _kernel, _unavailable
    if not enabled or _unavailable:
        return None
    if _kernel is None:
        if sys.platform == "win32":  # the flags are GCC/Clang's
            _unavailable = True
            return None
        try:
            _kernel = _build()
        except Exception as error:  # no compiler, no ninja, no headers
            _unavailable = True
            warnings.warn(
                f"Ranger(fused=True): could not build the C++ CPU kernel ({_cause(error)}); "
                "using the default multi-tensor step",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )
            return None
    return _kernel


def _cause(error: Exception) -> str:
    """One line that names why a build failed (the build log itself is long)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    line = (errors or lines or [type(error).__name__])[0]
    return f"{type(error).__name__}: {line[:200]}"


def _user_stacklevel() -> int:
    """The stacklevel of the first frame outside this package and torch, so a warning
    points at the user's ``optimizer.step()``."""
    internal = (_PACKAGE_DIR, os.path.dirname(torch.__file__))
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level
