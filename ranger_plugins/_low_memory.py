"""Low-memory optimizer state for Ranger (``Ranger(..., state_precision=...)``).

Two ideas, each checked by the tests against the standard step:

* The Lookahead slow weights are never stored. Between two syncs they do not move, and at a
  sync the fast weights are reset to them, so ``slow = fast - d`` where ``d`` (``slow_delta``)
  is the sum of this param's changes since the last sync. The sync
  ``slow + alpha * (fast - slow)`` is then ``fast - (1 - alpha) * d``, after which ``d = 0``.
  ``d`` is a small quantity (a few steps' updates), so 16 bits keep it far better than they
  would keep the weights.
* The moments are stored in 16 or 8 bits and decoded to the param's working precision
  (fp32, or fp64 for fp64 params) for the update, a chunk at a time, so the step never holds
  more than one chunk of decoded state.

Layouts of one param's state (besides ``step``), by ``state_precision``:

=========  =====================================================================  ==========
 layout     tensors                                                                bytes/param
=========  =====================================================================  ==========
 full       exp_avg, exp_avg_sq, slow_param: fp32 (fp64 for fp64 params)           12
 delta      exp_avg, exp_avg_sq, slow_delta: fp32 (fp64 for fp64 params)           12
 16bit      exp_avg, exp_avg_sq, slow_delta: bf16                                  6
 8bit       exp_avg int8, exp_avg_sq uint8, slow_delta bf16, and one fp32 scale    4 + 8/256
            per block of 256 elements for each moment (exp_avg_scale,
            exp_avg_sq_scale)
=========  =====================================================================  ==========

``delta`` is the reformulation alone, in full precision (it exists so that the reformulation
can be checked against the standard step, and costs what ``full`` costs). In an ``8bit`` group,
params with fewer than `MIN_8BIT_NUMEL` elements (biases, norms) keep the ``16bit`` layout, as
bitsandbytes and torchao keep small tensors unquantized: their state is a negligible share of
the memory, and they are the most sensitive.

Encodings (the fused C++ step, ``csrc/``, does the same float32 operations in the same order):

* bf16 values are rounded to nearest, except ``exp_avg_sq`` in the ``16bit`` layout, which is
  rounded stochastically: with beta2 = 0.999 a step changes v by 0.1%, less than half a bf16
  ulp (0.2-0.4%), so rounding to nearest would freeze v (it could never decrease).
* 8-bit moments are quantized per block of 256 consecutive elements in the param's memory
  order, relative to the block's largest magnitude S (stored as fp32). ``exp_avg`` uses a
  square-root code, ``c = round(127 * sqrt(|m| / S))``, decoded as ``S * c * |c| / 127**2``
  (relative resolution near 2/c, down to 1/32258 of S); ``exp_avg_sq`` a fourth-root code
  ``c = floor(255 * (v / S) ** 0.25 + u)``, decoded as ``S * (c / 255) ** 4``, with ``u`` the
  stochastic-rounding offset, and never 0 for a v > 0 (a zero v would turn m / sqrt(v) into
  m / eps). Like bitsandbytes' dynamic map, both codes spend more of their levels near zero
  than a linear code would, so small moments keep a few significant bits.
* The stochastic-rounding offsets come from a hash of (step, element index), not from torch's
  random generator: the same run gives the same bits (bitwise resume, identical DDP ranks),
  and the user's random stream is untouched.
* Square roots are correctly rounded (`exact_sqrt`) and GC's row means are summed in float64
  and rounded once, so the result does not depend on the CPU's math library or on the order
  of a sum: the fused C++ step gives the same bits as this one.

The state tensors of a param's shape have the param's strides, so that memory order (the order
of the 8-bit blocks) is the same in all of them. A state in any other layout, dtype, device or
memory order is converted before a step reads it (`state_fits`, `convert_state`): loading a
checkpoint saved in another mode, changing a group's ``state_precision``, ``model.to()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._math import StepValues
from ._state import PLAIN_TENSOR_TYPES, state_dtype

__all__ = ["STATE_PRECISIONS", "check_saved_state", "convert_state", "layout_for"]

STATE_PRECISIONS = ("full", "delta", "16bit", "8bit")
BLOCK = 256
MIN_8BIT_NUMEL = 4096
# Chunks of a param's memory order the step decodes at a time (multiples of BLOCK; see
# `chunk_numel`).
MAX_CHUNK = 1 << 17
MIN_CHUNK = 1 << 14

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_SIGNED_LEVELS = 127.0
_UNSIGNED_LEVELS = 255.0

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
SCALE_KEYS = ("exp_avg_scale", "exp_avg_sq_scale")


# ----------------------------------------------------------------------------- layouts


def layout_for(precision: str, param: torch.Tensor) -> str:
    """The layout of a param's state in a group of this ``state_precision``."""
    if precision == "8bit" and param.numel() < MIN_8BIT_NUMEL:
        return "16bit"
    return precision


def layout_of(state: dict[str, Any]) -> str:
    """The layout a (checked) state is in, from its keys and dtypes."""
    if "slow_param" in state:
        return "full"
    if "exp_avg_scale" in state:
        return "8bit"
    return "16bit" if state["exp_avg"].dtype == torch.bfloat16 else "delta"


def _dtypes(layout: str, param: torch.Tensor) -> dict[str, torch.dtype]:
    """The dtype of each state tensor of the param's shape, in a layout."""
    work = state_dtype(param)
    if layout == "full":
        return dict.fromkeys(("exp_avg", "exp_avg_sq", "slow_param"), work)
    if layout == "delta":
        return dict.fromkeys(("exp_avg", "exp_avg_sq", "slow_delta"), work)
    if layout == "16bit":
        return dict.fromkeys(("exp_avg", "exp_avg_sq", "slow_delta"), torch.bfloat16)
    return {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8, "slow_delta": torch.bfloat16}


def blocks_of(numel: int) -> int:
    return -(-numel // BLOCK)


def state_fits(param: torch.Tensor, state: dict[str, Any], layout: str) -> bool:
    """Whether a state is exactly what the step of ``layout`` reads: its keys, dtypes, device,
    and the param's strides (the memory order of the blocks)."""
    dtypes = _dtypes(layout, param)
    keys = set(dtypes) | (set(SCALE_KEYS) if layout == "8bit" else set())
    if keys | {"step"} != state.keys():
        return False
    strides = state_strides(param)
    for key, dtype in dtypes.items():
        tensor = state[key]
        if (
            tensor.dtype != dtype
            or tensor.device != param.device
            or tensor.shape != param.shape
            or tensor.stride() != strides
        ):
            return False
    if layout == "8bit":
        blocks = (blocks_of(param.numel()),)
        return all(
            state[key].shape == blocks
            and state[key].dtype == torch.float32
            and state[key].device == param.device
            for key in SCALE_KEYS
        )
    return True


def check_low_memory_supported(params: list[torch.Tensor]) -> None:
    """Raise a `RuntimeError` for params the low-memory step cannot address element by
    element in memory order: tensor subclasses (FSDP2's DTensors) and non-strided layouts."""
    for param in params:
        if type(param) not in PLAIN_TENSOR_TYPES or param.layout != torch.strided:
            raise RuntimeError(
                "Ranger's low-memory state (state_precision='16bit', '8bit' or 'delta') "
                f"needs plain strided tensors; got a {type(param).__name__} param "
                "(FSDP2 shards params as DTensors): use state_precision='full'"
            )


def state_strides(param: torch.Tensor) -> tuple[int, ...]:
    """The strides of a param's state tensors: the param's own where it is dense (so that all
    share one memory order), else contiguous (what ``empty_like`` gives)."""
    if _is_dense(param):
        return param.stride()
    strides, size = [], 1
    for extent in reversed(param.shape):
        strides.append(size)
        size *= max(extent, 1)
    return tuple(reversed(strides))


def new_state(param: torch.Tensor, layout: str) -> dict[str, Any]:
    """A param's state at its first step, in ``layout``: zero moments, and slow weights equal
    to the param (``slow_delta`` zero)."""
    state: dict[str, Any] = {"step": 0}
    for key, dtype in _dtypes(layout, param).items():
        if key == "slow_param":
            state[key] = param.detach().to(dtype, copy=True)
        else:
            state[key] = torch.zeros_like(param, dtype=dtype, memory_format=_FORMAT)
    if layout == "8bit":
        for key in SCALE_KEYS:
            state[key] = torch.zeros(
                blocks_of(param.numel()), dtype=torch.float32, device=param.device
            )
    return state


_FORMAT = torch.preserve_format


# ----------------------------------------------------------------------------- conversion


def decoded_state(
    param: torch.Tensor, state: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq, slow_delta) of a state in any layout, as tensors of the param's
    shape in its working dtype, on the param's device."""
    layout = layout_of(state)
    work = state_dtype(param)
    if layout == "8bit":
        moments = [
            _decode_whole(state[key], state[scale], decode).to(param.device, work)
            for key, scale, decode in zip(
                MOMENT_KEYS, SCALE_KEYS, (_decode_signed, _decode_unsigned)
            )
        ]
    else:
        moments = [state[key].to(param.device, work) for key in MOMENT_KEYS]
    if layout == "full":
        delta = param.detach().to(work) - state["slow_param"].to(param.device, work)
    else:
        delta = state["slow_delta"].to(param.device, work)
    return moments[0], moments[1], delta


def convert_state(param: torch.Tensor, state: dict[str, Any], layout: str) -> None:
    """Rewrite ``state`` in place into ``layout`` (keeping ``step`` and the values it holds,
    up to the target's precision): the one path by which a state changes layout, dtype,
    device or memory order."""
    exp_avg, exp_avg_sq, delta = decoded_state(param, state)
    converted = new_state(param, layout)
    converted["step"] = state["step"]
    if layout == "full":
        converted["exp_avg"].copy_(exp_avg)
        converted["exp_avg_sq"].copy_(exp_avg_sq)
        converted["slow_param"].copy_(param.detach().to(delta.dtype) - delta)
    else:
        flat = _FlatState.of(converted, state_dtype(param))
        whole = slice(0, param.numel())
        flat.store_moments(
            whole, _memory_order(exp_avg, param), _memory_order(exp_avg_sq, param), state["step"]
        )
        flat.store_delta(whole, _memory_order(delta, param))
    state.clear()  # only now: an error above leaves the state as it was
    state.update(converted)


def _memory_order(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` (of the param's shape) flattened in the param's memory order."""
    arranged = torch.empty_like(param, dtype=tensor.dtype, memory_format=_FORMAT)
    arranged.copy_(tensor)
    return _flat(arranged)


def _decode_whole(codes: torch.Tensor, scales: torch.Tensor, decode: Callable) -> torch.Tensor:
    """A quantized moment decoded to fp32, with the codes' shape and strides."""
    codes = codes if _is_dense(codes) else codes.contiguous()
    out = torch.empty_like(codes, dtype=torch.float32, memory_format=_FORMAT)
    _flat(out).copy_(decode(_flat(codes), scales))
    return out


# ----------------------------------------------------------------------------- checking loads


def check_saved_state(entry: dict[str, Any], param: torch.Tensor, where: str) -> None:
    """Raise a `ValueError` unless a loaded (non-empty) state entry is a complete state in
    one of the layouts, with tensors that fit the param."""
    if "slow_param" in entry:
        layout = "full"
    elif "exp_avg_scale" in entry or "exp_avg_sq_scale" in entry:
        layout = "8bit"
    else:
        layout = "delta"  # or 16bit: the same keys
    keys: tuple[str, ...] = (
        "exp_avg",
        "exp_avg_sq",
        "slow_param" if layout == "full" else "slow_delta",
    )
    keys += SCALE_KEYS if layout == "8bit" else ()
    missing = [key for key in ("step", *keys) if key not in entry]
    if missing:
        name = repr(missing[0])
        if missing[0] == "slow_delta":  # neither form of the slow weights
            name = "'slow_param' (or 'slow_delta', in the low-memory precisions)"
        raise ValueError(f"{where}: missing state {name} (it has {sorted(entry)})")
    for key in keys:
        value = entry[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{where}: state {key!r} is a {type(value).__name__} (must be a tensor)"
            )
        expected = _saved_shape(key, param)
        if value.shape != expected:
            raise ValueError(
                f"{where}: state {key!r} has shape {tuple(value.shape)} (must be {tuple(expected)})"
            )
        allowed = _saved_dtypes(key, layout)
        if (value.dtype not in allowed) if allowed else not value.dtype.is_floating_point:
            must = ", ".join(map(str, allowed)) if allowed else "a floating dtype"
            raise ValueError(f"{where}: state {key!r} has dtype {value.dtype} (must be {must})")


def _saved_shape(key: str, param: torch.Tensor) -> torch.Size:
    return torch.Size([blocks_of(param.numel())]) if key in SCALE_KEYS else param.shape


def _saved_dtypes(key: str, layout: str) -> tuple[torch.dtype, ...]:
    """The dtypes a saved state tensor may have; () for any floating dtype."""
    if layout != "8bit" or key == "slow_delta":
        return ()
    return {"exp_avg": (torch.int8,), "exp_avg_sq": (torch.uint8,)}.get(key, ())


# ----------------------------------------------------------------------------- encodings


def random16(index: torch.Tensor, step: int) -> torch.Tensor:
    """16 pseudo-random bits (int64 in [0, 65536)) per element index, for a step: a
    multiply-xorshift hash of ``index + step * golden``, all modulo 2**32. The multipliers are
    below 2**31, so the int64 products of 32-bit values never overflow."""
    x = (index + ((step * _GOLDEN) & _M32)).bitwise_and_(_M32)
    x ^= x >> 16
    x.mul_(0x7FEB352D).bitwise_and_(_M32)
    x ^= x >> 15
    x.mul_(0x5BD1E995).bitwise_and_(_M32)
    x ^= x >> 16
    return x.bitwise_right_shift_(16)


def bf16_stochastic(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Finite fp32 ``values`` rounded to bf16 stochastically: adding 16 random bits below the
    kept ones and truncating rounds the magnitude up with probability equal to the dropped
    fraction (floats are sign-magnitude, so this holds for either sign)."""
    bits = values.contiguous().view(torch.int32) + offsets.to(torch.int32)
    return bits.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)


@torch.no_grad()
def copy_stochastic_(destination: torch.Tensor, source: torch.Tensor, step: int) -> None:
    """``destination`` (bf16) = ``source`` rounded stochastically, a chunk of memory order at a
    time (so the random offsets never take more than a chunk); offsets from (step, index)."""
    if not (_is_dense(destination) and destination.stride() == source.stride()):
        source = torch.empty_like(destination, dtype=source.dtype).copy_(source)
    if not _is_dense(destination):
        dense = destination.contiguous()
        copy_stochastic_(dense, source.contiguous(), step)
        destination.copy_(dense)
        return
    flat_destination, flat_source = _flat(destination), _flat(source)
    for start in range(0, destination.numel(), MAX_CHUNK):
        part = slice(start, min(start + MAX_CHUNK, destination.numel()))
        offsets = random16(_indices(part, destination.device), step)
        flat_destination[part].copy_(bf16_stochastic(flat_source[part].float(), offsets))


def exact_sqrt(values: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root (a new tensor). torch's fp32 ``sqrt`` on x86 CPUs goes
    through MKL, which is one ulp off for some inputs on some CPUs: the same state would then
    step differently on two machines, and differently from the C++ kernel. The square root of
    an fp32 value taken in fp64 and rounded back is correctly rounded."""
    if values.dtype != torch.float32:
        return values.sqrt()
    return values.double().sqrt_().float()


def _blocks(values: torch.Tensor) -> torch.Tensor:
    """1-D fp32 ``values`` as (blocks, BLOCK): a view where they fill whole blocks, else a
    copy with the last block padded with zeros."""
    if values.numel() % BLOCK == 0:
        return values.view(-1, BLOCK)
    blocks = values.new_zeros(blocks_of(values.numel()), BLOCK)
    blocks.view(-1)[: values.numel()].copy_(values)
    return blocks


def _inverse(scales: torch.Tensor) -> torch.Tensor:
    return torch.where(scales > 0, scales.reciprocal(), torch.zeros_like(scales))


def _encode_signed(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values -> (int8 codes, fp32 block scales): ``c = round(127 * sqrt(|x| / S))``."""
    blocks = _blocks(values)
    magnitudes = blocks.abs()
    scales = magnitudes.amax(dim=1)
    levels = exact_sqrt(magnitudes.mul_(_inverse(scales)[:, None])).mul_(_SIGNED_LEVELS).round_()
    codes = levels.copysign_(blocks).view(-1)[: values.numel()]  # -0.0 becomes code 0
    return codes.to(torch.int8), scales


def _decode_signed(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    levels = _blocks(codes.to(torch.float32))
    values = (levels * levels.abs()).mul_((scales / (_SIGNED_LEVELS * _SIGNED_LEVELS))[:, None])
    return values.view(-1)[: codes.numel()]


def _encode_unsigned(
    values: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative fp32 values -> (uint8 codes, fp32 block scales):
    ``c = floor(255 * (x / S) ** 0.25 + u)``, at least 1 where x > 0."""
    blocks = _blocks(values)
    scales = blocks.amax(dim=1)
    levels = exact_sqrt(exact_sqrt(blocks.mul(_inverse(scales)[:, None]))).mul_(_UNSIGNED_LEVELS)
    levels = levels.view(-1)[: values.numel()]
    levels.add_(offsets.to(torch.float32).mul_(1.0 / 65536.0)).floor_().clamp_(max=_UNSIGNED_LEVELS)
    levels = torch.maximum(levels, values.sign())  # code 1 at least where v > 0
    return levels.to(torch.uint8), scales


def _decode_unsigned(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # float32(1/255), as the C++ kernel spells it: the double rounded once to float.
    fraction = _blocks(codes.to(torch.float32)).mul_(1.0 / _UNSIGNED_LEVELS)
    squared = fraction.mul_(fraction)
    values = squared.mul_(squared).mul_(scales[:, None])
    return values.view(-1)[: codes.numel()]


# ----------------------------------------------------------------------------- flat chunks


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements in memory order, as a 1-D view."""
    assert _is_dense(tensor), "only dense tensors have a memory order"
    return tensor.as_strided((tensor.numel(),), (1,))


class _FlatState:
    """A state's tensors as 1-D buffers in memory order, read and written a chunk (a slice of
    whole blocks, but for the last) at a time: one param's own tensors (`of`), or the
    concatenated tensors of a pack of small params (then ``local_indices`` gives each
    element's index within its own param, which seeds the stochastic rounding)."""

    def __init__(
        self,
        layout: str,
        work: torch.dtype,
        buffers: list[torch.Tensor],
        scales: list[torch.Tensor] | None = None,
        local_indices: torch.Tensor | None = None,
    ) -> None:
        self.layout = layout
        self.work = work
        self.exp_avg, self.exp_avg_sq, self.delta = buffers
        self.scales = scales or []
        self.local_indices = local_indices

    @classmethod
    def of(cls, state: dict[str, Any], work: torch.dtype) -> _FlatState:
        layout = layout_of(state)
        buffers = [_flat(state[key]) for key in (*MOMENT_KEYS, "slow_delta")]
        scales = [state[key] for key in SCALE_KEYS] if layout == "8bit" else None
        return cls(layout, work, buffers, scales)

    def indices(self, part: slice, device: torch.device) -> torch.Tensor:
        if self.local_indices is not None:
            return self.local_indices[part]
        return _indices(part, device)

    def load(self, part: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(m, v, d) of the elements ``part``, decoded to the working dtype (new tensors)."""
        delta = self.delta[part].to(self.work, copy=True)
        if self.layout != "8bit":
            return (
                self.exp_avg[part].to(self.work, copy=True),
                self.exp_avg_sq[part].to(self.work, copy=True),
                delta,
            )
        blocks = slice(part.start // BLOCK, blocks_of(part.stop))
        exp_avg = _decode_signed(self.exp_avg[part], self.scales[0][blocks])
        exp_avg_sq = _decode_unsigned(self.exp_avg_sq[part], self.scales[1][blocks])
        return exp_avg.to(self.work), exp_avg_sq.to(self.work), delta

    def store_moments(
        self, part: slice, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int = 0
    ) -> None:
        if self.layout in ("full", "delta"):
            self.exp_avg[part].copy_(exp_avg)
            self.exp_avg_sq[part].copy_(exp_avg_sq)
            return
        offsets = random16(self.indices(part, exp_avg.device), step)
        exp_avg_sq = exp_avg_sq.float()
        if self.layout == "16bit":
            self.exp_avg[part].copy_(exp_avg)
            self.exp_avg_sq[part].copy_(bf16_stochastic(exp_avg_sq, offsets))
            return
        blocks = slice(part.start // BLOCK, blocks_of(part.stop))
        codes, scales = _encode_signed(exp_avg.float())
        self.exp_avg[part].copy_(codes)
        self.scales[0][blocks].copy_(scales)
        codes, scales = _encode_unsigned(exp_avg_sq, offsets)
        self.exp_avg_sq[part].copy_(codes)
        self.scales[1][blocks].copy_(scales)

    def store_delta(self, part: slice, delta: torch.Tensor) -> None:
        self.delta[part].copy_(delta)


def _indices(part: slice, device: torch.device) -> torch.Tensor:
    return torch.arange(part.start, part.stop, device=device, dtype=torch.int64)


def chunk_numel(total_numel: int) -> int:
    """Elements per chunk for a group of ``total_numel`` elements: a power of two between
    `MIN_CHUNK` and `MAX_CHUNK`, at most 1/256 of the group where it can be. A chunk's
    temporaries take about 80 bytes per element, so the step's extra memory stays under a
    tenth of the param bytes from about 3M params up (1.3 MB below that): each chunk costs
    some fifty small operations, which would dominate a small model's step if chunks
    shrank with it."""
    wanted = max(MIN_CHUNK, total_numel // 256)
    return min(MAX_CHUNK, 1 << (wanted.bit_length() - 1))


# ----------------------------------------------------------------------------- the step


def low_memory_ranger(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    steps: list[int],
    **hyperparameters: Any,
) -> None:
    """The Ranger step on states in the ``delta``, ``16bit`` or ``8bit`` layouts (see the
    module docstring); the same maths as `ranger._single_tensor_ranger`, with the slow
    weights kept as ``slow_delta``. ``hyperparameters``: those of `StepValues.at_step`."""

    chunk = chunk_numel(sum(param.numel() for param in params))
    values = {step: StepValues.at_step(step, **hyperparameters) for step in set(steps)}
    packs, singles = _packs_and_singles(params, states, steps, chunk)
    for pack in packs:
        pack_values = values[steps[pack[0]]]
        centralize = [params[i].dim() > pack_values.gc_min_dim for i in pack]
        pack_params = [params[i] for i in pack]
        pack_grads = [grads[i] for i in pack]
        pack_states = [states[i] for i in pack]
        _step_pack(pack_params, pack_grads, pack_states, pack_values, centralize)
    for i in singles:
        one = values[steps[i]]
        _step_param(params[i], grads[i], states[i], one, params[i].dim() > one.gc_min_dim, chunk)


def _packs_and_singles(
    params: list[torch.Tensor], states: list[dict[str, Any]], steps: list[int], chunk: int
) -> tuple[list[list[int]], list[int]]:
    """Positions of the small params to step together (packs of one step, dtype, device and
    layout, up to a chunk of elements each), and of the params to step one by one."""
    open_packs: dict[tuple, list[int]] = {}
    packs: list[list[int]] = []
    singles: list[int] = []
    sizes: dict[tuple, int] = {}
    for index, (param, state) in enumerate(zip(params, states)):
        layout = layout_of(state)
        if layout == "8bit" or param.numel() >= chunk or not param.is_contiguous():
            singles.append(index)
            continue
        key = (steps[index], param.dtype, param.device, layout)
        if key not in open_packs or sizes[key] + param.numel() > chunk:
            open_packs[key], sizes[key] = [], 0
            packs.append(open_packs[key])
        open_packs[key].append(index)
        sizes[key] += param.numel()
    return packs, singles


def _step_pack(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    values: StepValues,
    centralize: list[bool],
) -> None:
    """Small params stepped as one chunk: their tensors concatenated, stepped, and copied
    back, a few operations for the pack where each param alone would take some thirty."""
    work = state_dtype(params[0])
    numels = [param.numel() for param in params]
    flat_param = torch.cat([param.reshape(-1) for param in params])
    gradient = torch.cat([grad.reshape(-1) for grad in grads]).to(work)
    for rows, param, wanted in zip(gradient.split(numels), params, centralize):
        if wanted and param.numel():
            rows = rows.view(param.shape[0], -1)
            rows.sub_(_row_means(rows, work)[:, None])
    keys = (*MOMENT_KEYS, "slow_delta")
    buffers = [torch.cat([state[key].reshape(-1) for state in states]) for key in keys]
    layout = layout_of(states[0])
    local = _local_indices(numels, params[0].device) if layout == "16bit" else None
    flat_state = _FlatState(layout, work, buffers, local_indices=local)
    _step_chunk(flat_param, gradient, flat_state, slice(0, flat_param.numel()), values)
    for key, buffer in zip(keys, buffers):
        torch._foreach_copy_([state[key].view(-1) for state in states], buffer.split(numels))
    torch._foreach_copy_([param.view(-1) for param in params], flat_param.split(numels))


def _local_indices(numels: list[int], device: torch.device) -> torch.Tensor:
    """Each element's index within its own param, for params laid end to end (built on the
    device: copying a host list to an accelerator would wait for it)."""
    return torch.cat([torch.arange(numel, device=device) for numel in numels])


def _step_param(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    values: StepValues,
    centralize: bool,
    chunk: int,
) -> None:
    """One param's step, chunk by chunk of its memory order."""
    work = state_dtype(param)
    target = param if _is_dense(param) else param.contiguous()
    grad, row_means, row_length = _prepared_gradient(grad, target, work, centralize)
    flat_param, flat_grad = _flat(target), _flat(grad)
    flat_state = _FlatState.of(state, work)
    for start in range(0, param.numel(), chunk):
        part = slice(start, min(start + chunk, param.numel()))
        gradient = flat_grad[part].to(work, copy=True)
        if row_means is not None:
            _subtract_row_means(gradient, row_means, start, row_length)
        _step_chunk(flat_param, gradient, flat_state, part, values)
    if target is not param:
        param.copy_(target)


def _subtract_row_means(
    gradient: torch.Tensor, row_means: torch.Tensor, start: int, row_length: int
) -> None:
    """GC on a chunk of memory order that starts at element ``start``: its rows are the
    rest of one row, whole rows, and the start of another."""
    row, position = divmod(start, row_length)
    if position:
        head = min(row_length - position, gradient.numel())
        gradient[:head].sub_(row_means[row])
        gradient, row = gradient[head:], row + 1
    whole = gradient.numel() // row_length
    if whole:
        rows = gradient[: whole * row_length].view(whole, row_length)
        rows.sub_(row_means[row : row + whole, None])
    if gradient.numel() > whole * row_length:
        gradient[whole * row_length :].sub_(row_means[row + whole])


def _is_dense(tensor: torch.Tensor) -> bool:
    """Whether the elements fill one block of memory without gaps or overlaps (any order)."""
    if tensor.is_contiguous() or tensor.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(tensor.shape, tensor.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _prepared_gradient(
    grad: torch.Tensor, target: torch.Tensor, work: torch.dtype, centralize: bool
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The gradient with the param's strides (a copy only where they differ), and GC's row
    means with the row length, where GC applies. Rows are contiguous in memory when dim 0 is
    outermost (the usual layouts, channels_last included); otherwise the gradient is
    centralized whole, in a copy."""
    if grad.stride() != target.stride():
        grad = torch.empty_like(target).copy_(grad)
    if not centralize or target.numel() == 0:
        return grad, None, 1
    rows = target.shape[0]
    if _dim0_outermost(target):
        means = _row_means(_flat(grad).view(rows, -1), work)
        return grad, means, target.numel() // rows
    dims = tuple(range(1, grad.dim()))
    centered = torch.empty_like(target, dtype=work).copy_(grad)
    centered.sub_(centered.mean(dim=dims, keepdim=True))
    return centered, None, 1


def _row_means(rows: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """GC's row means, summed in float64 and rounded once to the working dtype: the result
    does not depend on the order of the additions, so the C++ step (which sums in its own
    order) gets the same bits."""
    return torch.mean(rows, dim=1, dtype=torch.float64).to(work)


def _dim0_outermost(tensor: torch.Tensor) -> bool:
    return tensor.shape[0] <= 1 or tensor.stride(0) == max(tensor.stride())


def _step_chunk(
    flat_param: torch.Tensor,
    gradient: torch.Tensor,
    flat_state: _FlatState,
    part: slice,
    values: StepValues,
) -> None:
    exp_avg, exp_avg_sq, delta = flat_state.load(part)
    old = flat_param[part].to(flat_state.work, copy=True)
    fast = old.mul(values.decay)
    exp_avg.lerp_(gradient, values.beta1_weight)
    exp_avg_sq.mul_(values.beta2).addcmul_(gradient, gradient, value=values.beta2_weight)
    if values.adaptive:
        denominator = exact_sqrt(exp_avg_sq).add_(values.eps)
        fast.addcdiv_(exp_avg, denominator, value=values.step_size)
    else:
        fast.add_(exp_avg, alpha=values.step_size)
    new = fast.to(flat_param.dtype)  # the param's rounding, which d must see
    delta.add_(new.to(flat_state.work) - old)
    if values.sync:  # slow + alpha * (fast - slow) = fast - (1 - alpha) * d
        new = torch.sub(new.to(flat_state.work), delta, alpha=values.keep).to(flat_param.dtype)
        delta.zero_()
    flat_param[part].copy_(new)
    flat_state.store_moments(part, exp_avg, exp_avg_sq, values.step)
    flat_state.store_delta(part, delta)
