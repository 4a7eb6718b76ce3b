"""The fused Triton graft kernel: `out = round(I + a1*(T1 - B) + ... + aN*(TN - B))` in one pass over flat ranges.

One program handles BLOCK_SIZE consecutive elements: it loads I, B and each Tk (any of bf16/fp16/fp32, each
independently), widens them to float32 (exact), computes in the CPU twin's order

    x = I                float32
    for each delta k:    (unrolled: the kernel is specialised on N = 1..4; more chain launches)
      d = Tk - B         float32
      d = d * ak         float32, skipped when ak == 1 (constexpr), never fused into an FMA
      x = x + d          float32
    out = round(x)       once, round-to-nearest-even, to bf16/fp16/fp32

and, in the same pass, counts elements where a d is NaN/Inf into an int64 counter. The kernel is memory
bound (2 + N reads + 1 write per element).

bf16 goes through int16 views both ways and is converted with integer ops on the float32 bits, because
Triton's interpreter (3.8/3.9) gets both casts wrong: float32 -> bf16 truncates (1 ulp off in about half
the elements) and bf16 -> float32 turns bf16 subnormals into 0 or wrong values. The integer paths give
the same bits in the interpreter and on the GPU, where they cost nothing (the kernel is memory bound).
float32 -> fp16 uses `.to(tl.float16)`: numpy's cast in the interpreter and `cvt.rn.f16.f32` on the GPU
are both round-to-nearest-even, subnormals and overflow to inf included (the tests check this).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from .cpu import as_terms
from .cpu import torch_graft as reference_graft

# Read once, at import: the interpreter swaps `@triton.jit` for a numpy emulation when the function is
# decorated, so setting TRITON_INTERPRET later has no effect on this module.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)

# The interpreter runs each program in numpy at ~1 ms overhead and copies every argument's storage per
# launch, so use one large block there; timing is meaningless, so nothing to tune.
INTERPRET_BLOCK = 16384

# A small set: the kernel is a stream, any block of 1K-4K elements with 4-8 warps saturates HBM; the
# tuner only has to pick the one that pipelines best on the device at hand.
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_SIZE": block}, num_warps=warps) for block in (1024, 2048, 4096) for warps in (4, 8)
]
# Tuned once per dtype combination on scratch buffers of this many elements (see _ensure_tuned).
TUNE_NUMEL = 1 << 24

FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite float32; |d| above it is inf


@triton.jit
def _load_f32(ptr, offsets, mask, IS_BF16_BITS: tl.constexpr):
    """Load one input and widen it to float32, exactly."""
    if IS_BF16_BITS:
        # ptr is an int16 view of bf16 data: a bf16 is the top half of a float32, so shift it into place.
        # (The interpreter's own bf16 -> float32 cast turns bf16 subnormals into 0 or wrong values.)
        bits = tl.load(ptr + offsets, mask=mask, other=0).to(tl.uint16, bitcast=True)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _add_delta(x, bad, t_ptr, b, offsets, mask, alpha, ALPHA_IS_ONE: tl.constexpr, T_BF16_BITS: tl.constexpr):
    """x + alpha * (T - B) in the CPU twin's order; `bad` marks lanes where T - B is NaN/Inf."""
    d = _load_f32(t_ptr, offsets, mask, T_BF16_BITS) - b
    bad = bad | (d != d) | (tl.abs(d) > FLT_MAX)
    if not ALPHA_IS_ONE:
        d = d * alpha  # the launcher compiles with enable_fp_fusion=False: no FMA with the add below
    return x + d, bad


@triton.jit
def triton_graft_kernel(
    out_ptr,  # [n] float32 | float16 | int16 (the bits of a bfloat16 output)
    i_ptr,  # [n] Instruct: fp16 | fp32 | int16 (the bits of a bf16 input)
    b_ptr,  # [n] Base, likewise
    t1_ptr,  # [n] the first tuned model, likewise; t2..t4 the next ones (unused slots point at Base)
    t2_ptr,
    t3_ptr,
    t4_ptr,
    nonfinite_ptr,  # [1] int64, incremented by the number of NaN/Inf elements of the deltas
    n_elements,
    alpha1,  # float32, one per delta
    alpha2,
    alpha3,
    alpha4,
    N_DELTAS: tl.constexpr,  # 1..4: the kernel is specialised on the number of deltas
    ALPHA1_IS_ONE: tl.constexpr,
    ALPHA2_IS_ONE: tl.constexpr,
    ALPHA3_IS_ONE: tl.constexpr,
    ALPHA4_IS_ONE: tl.constexpr,
    OUT_BF16_BITS: tl.constexpr,  # out_ptr is an int16 view of a bf16 output
    I_BF16_BITS: tl.constexpr,  # i_ptr is an int16 view of a bf16 input; B_, T1_.. likewise
    B_BF16_BITS: tl.constexpr,
    T1_BF16_BITS: tl.constexpr,
    T2_BF16_BITS: tl.constexpr,
    T3_BF16_BITS: tl.constexpr,
    T4_BF16_BITS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # int64 before the multiply: a tensor may hold more than 2**31 elements (a 405B model's embedding).
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    b = _load_f32(b_ptr, offsets, mask, B_BF16_BITS)
    x = _load_f32(i_ptr, offsets, mask, I_BF16_BITS)
    bad = offsets < 0  # all False
    x, bad = _add_delta(x, bad, t1_ptr, b, offsets, mask, alpha1, ALPHA1_IS_ONE, T1_BF16_BITS)
    if N_DELTAS > 1:
        x, bad = _add_delta(x, bad, t2_ptr, b, offsets, mask, alpha2, ALPHA2_IS_ONE, T2_BF16_BITS)
    if N_DELTAS > 2:
        x, bad = _add_delta(x, bad, t3_ptr, b, offsets, mask, alpha3, ALPHA3_IS_ONE, T3_BF16_BITS)
    if N_DELTAS > 3:
        x, bad = _add_delta(x, bad, t4_ptr, b, offsets, mask, alpha4, ALPHA4_IS_ONE, T4_BF16_BITS)

    # One atomic per NaN/Inf element, none in the common all-finite case. Not a block sum: `tl.sum` is
    # itself a @triton.jit function of Triton's library, decorated in whichever mode Triton was first
    # imported; the interpreter cannot call it in compiled mode. Atomics are builtins: fine in both.
    # Masked lanes load 0 - 0 and never count. Relaxed: nothing is ordered against the counter.
    ones = tl.full([BLOCK_SIZE], 1, tl.int64)
    tl.atomic_add(nonfinite_ptr + tl.full([BLOCK_SIZE], 0, tl.int32), ones, mask=bad & mask, sem="relaxed")

    if OUT_BF16_BITS:
        # Round-to-nearest-even on the bits: add 0x7FFF plus the lowest kept bit, drop 16 bits. Carries
        # into the exponent are correct (up to inf); NaN needs its own case since the carry could turn
        # a NaN payload into inf or flip the sign.
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        tl.store(out_ptr + offsets, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offsets, x.to(out_ptr.dtype.element_ty), mask=mask)


# Keyed on nothing by name: Triton appends every tensor argument's dtype to the key, which is what
# matters. Not keyed on n, so the choice is reused for every chunk size.
_autotuned_kernel = triton.autotune(configs=AUTOTUNE_CONFIGS, key=[], reset_to_zero=["nonfinite_ptr"])(
    triton_graft_kernel
)
_tuned: set[tuple] = set()

MAX_DELTAS = 4  # per launch; more deltas chain launches through an exact float32 partial sum


def _ensure_tuned(out: torch.Tensor, instruct: torch.Tensor, tuned: list[torch.Tensor], base: torch.Tensor) -> None:
    """Autotune once per dtype combination and device, on zero-filled scratch buffers of TUNE_NUMEL.

    Tuning on the caller's tensors would time whatever chunk comes first (often a 4K-element norm
    weight, where every config ties) and would run the kernel several times on them: wrong if `out`
    aliases `instruct`. Scratch buffers give a representative size and leave the caller's data alone.
    """
    key = (out.device, out.dtype, instruct.dtype, base.dtype, *(t.dtype for t in tuned))
    if key in _tuned:
        return
    # (Triton's own tuning cache is keyed by dtypes only, so a second GPU of another kind reuses this.)
    zeros = lambda x: torch.zeros(TUNE_NUMEL, dtype=x.dtype, device=out.device)  # noqa: E731
    counter = torch.zeros(1, dtype=torch.int64, device=out.device)
    _launch(zeros(out), zeros(instruct), [zeros(t) for t in tuned], zeros(base), counter, [1.0] * len(tuned))
    _tuned.add(key)


def _bits(x: torch.Tensor) -> torch.Tensor:
    # bf16 travels as int16 so the kernel converts it with integer ops (exact on every backend).
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def _launch(out: torch.Tensor, instruct, tuned: list, base, nonfinite: torch.Tensor, alphas: list[float]) -> None:
    """One launch for up to MAX_DELTAS deltas; more go through a float32 partial sum (exact: each launch
    stores the float32 sum unrounded, so the bits equal one launch over all of them)."""
    if len(tuned) > MAX_DELTAS:
        partial = torch.empty(out.numel(), dtype=torch.float32, device=out.device)
        _launch(partial, instruct, tuned[:MAX_DELTAS], base, nonfinite, alphas[:MAX_DELTAS])
        for k in range(MAX_DELTAS, len(tuned), MAX_DELTAS):
            last = k + MAX_DELTAS >= len(tuned)
            _launch(out if last else partial, partial, tuned[k : k + MAX_DELTAS], base, nonfinite, alphas[k : k + MAX_DELTAS])
        return
    n, k = out.numel(), len(tuned)
    slots = [*tuned, *[base] * (MAX_DELTAS - k)]  # unused slots: any valid pointer, never read
    coefficients = [*alphas, *[1.0] * (MAX_DELTAS - k)]
    args = (_bits(out), _bits(instruct), _bits(base), *map(_bits, slots), nonfinite, n, *coefficients)
    bf16 = lambda x: x.dtype == torch.bfloat16  # noqa: E731
    meta = dict(N_DELTAS=k, OUT_BF16_BITS=bf16(out), I_BF16_BITS=bf16(instruct), B_BF16_BITS=bf16(base))
    for j in range(MAX_DELTAS):
        meta[f"ALPHA{j + 1}_IS_ONE"] = coefficients[j] == 1.0
        meta[f"T{j + 1}_BF16_BITS"] = bf16(slots[j])
    if INTERPRET:
        triton_graft_kernel[(triton.cdiv(n, INTERPRET_BLOCK),)](*args, **meta, BLOCK_SIZE=INTERPRET_BLOCK)
    else:
        grid = lambda cfg: (triton.cdiv(n, cfg["BLOCK_SIZE"]),)  # noqa: E731
        with torch.cuda.device(out.device):  # Triton launches on the current device, not the tensors'
            _autotuned_kernel[grid](*args, **meta, enable_fp_fusion=False)


def launch_graft(
    out: torch.Tensor,
    instruct: torch.Tensor,
    tuned: torch.Tensor | Sequence[torch.Tensor],
    base: torch.Tensor,
    nonfinite: torch.Tensor,
    alpha: float | Sequence[float] = 1.0,
) -> None:
    """Like `graft_triton`, but adds the NaN/Inf count to `nonfinite` (int64, one element, same device)
    without synchronizing, so a caller can queue many chunks and read the count once per tensor."""
    tuned, alphas = as_terms(tuned, alpha)
    _check(out, instruct, tuned, base)
    if nonfinite.dtype != torch.int64 or nonfinite.numel() != 1 or nonfinite.device != out.device:
        raise ValueError("launch_graft: nonfinite must be a one-element int64 tensor on the output's device")
    if out.numel() == 0:
        return
    if not INTERPRET:
        _ensure_tuned(out, instruct, tuned[:MAX_DELTAS], base)
    _launch(out, instruct, tuned, base, nonfinite, alphas)


def graft_triton(
    out: torch.Tensor,
    instruct: torch.Tensor,
    tuned: torch.Tensor | Sequence[torch.Tensor],
    base: torch.Tensor,
    alpha: float | Sequence[float] = 1.0,
) -> int:
    """Write `round(I + a1*(T1 - B) + a2*(T2 - B) + ...)` into `out`; return how many elements of the deltas
    were NaN/Inf.

    Args:
        out: contiguous bf16/fp16/fp32 tensor, any shape; may be `instruct` itself (in place).
        instruct, base: contiguous bf16/fp16/fp32 tensors (dtypes may differ) of out's numel.
        tuned: one such tensor, or a sequence of them (one delta each).
        alpha: one coefficient for every delta, or one per delta; 1.0 skips the multiply.

    Returns:
        The number of NaN/Inf elements in the deltas Tk - B (synchronizes with the device).

    Example:
        >>> out = torch.empty(3, dtype=torch.bfloat16, device="cuda")
        >>> ones = torch.ones(3, device="cuda")
        >>> graft_triton(out, ones, ones * 3, ones * 2)
        0
        >>> out
        tensor([2., 2., 2.], device='cuda:0', dtype=torch.bfloat16)
    """
    nonfinite = torch.zeros(1, dtype=torch.int64, device=out.device)
    launch_graft(out, instruct, tuned, base, nonfinite, alpha)
    return int(nonfinite.item())


def _check(out: torch.Tensor, instruct: torch.Tensor, tuned: list[torch.Tensor], base: torch.Tensor) -> None:
    named = {"out": out, "instruct": instruct, "base": base, **{f"tuned[{k}]": t for k, t in enumerate(tuned)}}
    n = out.numel()
    if any(x.numel() != n for x in named.values()):
        sizes = ", ".join(f"{k} {x.numel()}" for k, x in named.items())
        raise ValueError(f"graft_triton: element counts differ: {sizes}")
    for k, x in named.items():
        if x.dtype not in SUPPORTED:
            raise ValueError(f"graft_triton: {k} has dtype {x.dtype}; supported: bfloat16, float16, float32")
        if not x.is_contiguous():
            raise ValueError(f"graft_triton: {k} is not contiguous")
        if x.device != out.device:
            raise ValueError(f"graft_triton: {k} is on {x.device}, out on {out.device}")
    if out.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"graft_triton: tensors are on {out.device}; needs CUDA (or TRITON_INTERPRET=1 on CPU)")


torch_graft = reference_graft  # the plain reference (whole tensors, float32, same op order)
