"""The fused Triton graft kernel: `out = round(I + a1*(T1 - B) + ... + aN*(TN - B))` in one pass over flat ranges.

One program handles BLOCK_SIZE consecutive elements: it loads I, B and each Tk (any of bf16/fp16/fp32, each
independently), widens them to float32 (exact), computes in the CPU twin's order

    x = I                float32
    for each delta k:    (unrolled: the kernel is specialised on N = 1..4; more chain launches)
      d = Tk - B         float32
      d = d * ak         float32, skipped when ak == 1 (constexpr), never fused into an FMA
      x = x + d          float32
    out = round(x)       once, round-to-nearest-even, to bf16/fp16/fp32

and, in the same pass, counts NaN/Inf (NonFinite: in a delta, produced from finite inputs, carried from
Instruct) with one block reduction, and atomics only in blocks that have any. Every NaN result is stored as
the output dtype's canonical quiet NaN, as the CPU twin does. The kernel is memory bound (2 + N reads + 1
write per element).

bf16 goes through int16 views both ways and is converted with integer ops on the float32 bits, because
Triton's interpreter (3.8/3.9) gets both casts wrong: float32 -> bf16 truncates (1 ulp off in about half
the elements) and bf16 -> float32 turns bf16 subnormals into 0 or wrong values. The integer paths give
the same bits in the interpreter and on the GPU, where they cost nothing (the kernel is memory bound).
float32 -> fp16 uses `.to(tl.float16)`: numpy's cast in the interpreter and `cvt.rn.f16.f32` on the GPU
are both round-to-nearest-even, subnormals and overflow to inf included (the tests check this).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .cpu import Alphas, NonFinite, Tensors, as_terms
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
def _load_f32(ptr, offsets, mask, IS_BF16_BITS: tl.constexpr, AGAIN: tl.constexpr = False):
    """Load one input and widen it to float32, exactly. AGAIN: a second load of the same elements, volatile so
    that the compiler cannot reuse the first one (and so hoist the rare path's work into the common one)."""
    if IS_BF16_BITS:
        # ptr is an int16 view of bf16 data: a bf16 is the top half of a float32, so shift it into place.
        # (The interpreter's own bf16 -> float32 cast turns bf16 subnormals into 0 or wrong values.)
        bits = tl.load(ptr + offsets, mask=mask, other=0, volatile=AGAIN).to(tl.uint16, bitcast=True)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offsets, mask=mask, other=0.0, volatile=AGAIN).to(tl.float32)


@triton.jit
def _add_delta(x, t_ptr, b, offsets, mask, alpha, ALPHA_IS_ONE: tl.constexpr, T_BF16_BITS: tl.constexpr):
    """x + alpha * (T - B) in the CPU twin's order."""
    d = _load_f32(t_ptr, offsets, mask, T_BF16_BITS) - b
    if not ALPHA_IS_ONE:
        d = d * alpha  # the launcher compiles with enable_fp_fusion=False: no FMA with the add below
    return x + d


@triton.jit
def _not_finite(x):
    return (x != x) | (tl.abs(x) > FLT_MAX)


@triton.jit
def _bad_delta(bad, t_ptr, b, offsets, mask, T_BF16_BITS: tl.constexpr):
    d = _load_f32(t_ptr, offsets, mask, T_BF16_BITS, True) - b
    return bad | _not_finite(d)


@triton.jit
def triton_graft_kernel(
    out_ptr,  # [n] the bits of the output: int32 (float32 output) or int16 (float16, bfloat16)
    i_ptr,  # [n] Instruct: fp16 | fp32 | int16 (the bits of a bf16 input)
    b_ptr,  # [n] Base, likewise
    t1_ptr,  # [n] the first tuned model, likewise; t2..t4 the next ones (unused slots point at Base)
    t2_ptr,
    t3_ptr,
    t4_ptr,
    counts_ptr,  # [3] int64: NonFinite counts (deltas, overflow, instruct), added to
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
    OUT_KIND: tl.constexpr,  # 0 float32, 1 float16, 2 bfloat16
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
    x = _add_delta(x, t1_ptr, b, offsets, mask, alpha1, ALPHA1_IS_ONE, T1_BF16_BITS)
    if N_DELTAS > 1:
        x = _add_delta(x, t2_ptr, b, offsets, mask, alpha2, ALPHA2_IS_ONE, T2_BF16_BITS)
    if N_DELTAS > 2:
        x = _add_delta(x, t3_ptr, b, offsets, mask, alpha3, ALPHA3_IS_ONE, T3_BF16_BITS)
    if N_DELTAS > 3:
        x = _add_delta(x, t4_ptr, b, offsets, mask, alpha4, ALPHA4_IS_ONE, T4_BF16_BITS)

    # The one rounding, on the bits, with the NaN policy: any NaN is stored as the dtype's canonical quiet NaN.
    # `bad_out`: the stored value is NaN/Inf (all exponent bits set).
    if OUT_KIND == 2:
        # bf16, round-to-nearest-even: add 0x7FFF plus the lowest kept bit, drop 16 bits. Carries into the
        # exponent are correct (up to inf); a NaN is replaced (the carry could turn its payload into inf).
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.int32)
        bits = tl.where(x != x, 0x7FC0, r)
        bad_out = (bits & 0x7F80) == 0x7F80
        tl.store(out_ptr + offsets, bits.to(tl.int16), mask=mask)
    elif OUT_KIND == 1:
        # fp16: `cvt.rn.f16.f32` on the GPU and numpy's cast in the interpreter are both round-to-nearest-even,
        # subnormals and overflow to inf included; only their NaNs differ, and those are replaced.
        h = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        bits = tl.where(x != x, 0x7E00, h)
        bad_out = (bits & 0x7C00) == 0x7C00
        tl.store(out_ptr + offsets, bits.to(tl.int16), mask=mask)
    else:
        bits = tl.where(x != x, 0x7FC00000, x.to(tl.int32, bitcast=True))
        bad_out = (bits & 0x7F800000) == 0x7F800000
        tl.store(out_ptr + offsets, bits, mask=mask)

    # NaN/Inf anywhere in the inputs makes the result NaN/Inf, so counting non-finite results finds every
    # case: one int32 reduction per block. Only a block that has any (rare: an error, or NaN carried from
    # Instruct) reloads its inputs to tell the three NonFinite counts apart, with three atomics. Checking each
    # delta in the main path instead cost 1.5x the instructions (bench/bench_kernel.py counts them in the SASS).
    # tl.reduce with Triton's own sum combiner, not tl.sum: tl.sum is a @triton.jit function decorated in the
    # mode Triton was imported in, which an interpreted kernel cannot call; the interpreter recognises this
    # combiner and sums with numpy (a combiner of ours would run element by element in Python, 100x slower).
    bad_out = bad_out & mask
    if tl.reduce(bad_out.to(tl.int32), 0, tl.standard._sum_combine) != 0:
        b = _load_f32(b_ptr, offsets, mask, B_BF16_BITS, True)
        bad = _bad_delta(offsets < 0, t1_ptr, b, offsets, mask, T1_BF16_BITS)
        if N_DELTAS > 1:
            bad = _bad_delta(bad, t2_ptr, b, offsets, mask, T2_BF16_BITS)
        if N_DELTAS > 2:
            bad = _bad_delta(bad, t3_ptr, b, offsets, mask, T3_BF16_BITS)
        if N_DELTAS > 3:
            bad = _bad_delta(bad, t4_ptr, b, offsets, mask, T4_BF16_BITS)
        bad = bad & mask
        bad_i = _not_finite(_load_f32(i_ptr, offsets, mask, I_BF16_BITS, True))
        bad_out = bad_out & ~bad
        tl.atomic_add(counts_ptr, tl.reduce(bad.to(tl.int64), 0, tl.standard._sum_combine), sem="relaxed")
        overflow = (bad_out & ~bad_i).to(tl.int64)
        tl.atomic_add(counts_ptr + 1, tl.reduce(overflow, 0, tl.standard._sum_combine), sem="relaxed")
        carried = (bad_out & bad_i).to(tl.int64)
        tl.atomic_add(counts_ptr + 2, tl.reduce(carried, 0, tl.standard._sum_combine), sem="relaxed")


# Keyed on nothing by name: Triton appends every tensor argument's dtype to the key, which is what
# matters. Not keyed on n, so the choice is reused for every chunk size.
_autotuned_kernel = triton.autotune(configs=AUTOTUNE_CONFIGS, key=[], reset_to_zero=["counts_ptr"])(triton_graft_kernel)
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
    counter = torch.zeros(3, dtype=torch.int64, device=out.device)
    _launch(zeros(out), zeros(instruct), [zeros(t) for t in tuned], zeros(base), counter, [1.0] * len(tuned))
    _tuned.add(key)


def _bits(x: torch.Tensor) -> torch.Tensor:
    # bf16 travels as int16 so the kernel converts it with integer ops (exact on every backend).
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


OUT_KINDS = {torch.float32: (0, torch.int32), torch.float16: (1, torch.int16), torch.bfloat16: (2, torch.int16)}


def _launch(out: torch.Tensor, instruct, tuned: list, base, counts: torch.Tensor, alphas: list[float]) -> None:
    """One launch for up to MAX_DELTAS deltas; more go through a float32 partial sum (exact: each launch
    stores the float32 sum unrounded, so the bits equal one launch over all of them)."""
    if len(tuned) > MAX_DELTAS:
        # Each launch counts into its own row. A later launch sees the partial sum as its "Instruct", whose
        # NaN/Inf an earlier launch already classified: only the first launch's `instruct` count is kept.
        steps = range(0, len(tuned), MAX_DELTAS)
        rows = torch.zeros(len(steps), 3, dtype=torch.int64, device=out.device)
        partial = torch.empty(out.numel(), dtype=torch.float32, device=out.device)
        for row, k in enumerate(steps):
            last = k + MAX_DELTAS >= len(tuned)
            source = instruct if k == 0 else partial
            _launch(
                out if last else partial, source, tuned[k : k + MAX_DELTAS], base, rows[row], alphas[k : k + MAX_DELTAS]
            )
        counts += torch.stack([rows[:, 0].sum(), rows[:, 1].sum(), rows[0, 2]])
        return
    n, k = out.numel(), len(tuned)
    slots = [*tuned, *[base] * (MAX_DELTAS - k)]  # unused slots: any valid pointer, never read
    coefficients = [*alphas, *[1.0] * (MAX_DELTAS - k)]
    out_kind, out_bits = OUT_KINDS[out.dtype]
    args = (out.view(out_bits), _bits(instruct), _bits(base), *map(_bits, slots), counts, n, *coefficients)
    bf16 = lambda x: x.dtype == torch.bfloat16  # noqa: E731
    meta = dict(N_DELTAS=k, OUT_KIND=out_kind, I_BF16_BITS=bf16(instruct), B_BF16_BITS=bf16(base))
    for j in range(MAX_DELTAS):
        meta[f"ALPHA{j + 1}_IS_ONE"] = coefficients[j] == 1.0
        meta[f"T{j + 1}_BF16_BITS"] = bf16(slots[j])
    if INTERPRET:
        triton_graft_kernel[(triton.cdiv(n, INTERPRET_BLOCK),)](*args, **meta, BLOCK_SIZE=INTERPRET_BLOCK)
    else:
        grid = lambda cfg: (triton.cdiv(n, cfg["BLOCK_SIZE"]),)  # noqa: E731
        with torch.cuda.device(out.device):  # Triton launches on the current device, not the tensors'
            _autotuned_kernel[grid](*args, **meta, enable_fp_fusion=False)


def launch_graft(out, instruct, tuned: Tensors, base, counts: torch.Tensor, alpha: Alphas = 1.0) -> None:
    """Like `graft_triton`, but adds the NonFinite counts to `counts` (int64 [3]: deltas, overflow, instruct,
    on the output's device) without synchronizing, so a caller can queue many chunks and read them once."""
    tuned, alphas = as_terms(tuned, alpha)
    _check(out, instruct, tuned, base)
    if counts.dtype != torch.int64 or counts.shape != (3,) or counts.device != out.device or not counts.is_contiguous():
        raise ValueError("launch_graft: counts must be a contiguous int64 tensor of 3 elements on the output's device")
    if out.numel() == 0:
        return
    if not INTERPRET:
        _ensure_tuned(out, instruct, tuned[:MAX_DELTAS], base)
    _launch(out, instruct, tuned, base, counts, alphas)


def graft_triton(out, instruct, tuned: Tensors, base, alpha: Alphas = 1.0) -> NonFinite:
    """Write `round(I + a1*(T1 - B) + a2*(T2 - B) + ...)` into `out`; return the NonFinite counts.

    Args:
        out: contiguous bf16/fp16/fp32 tensor, any shape; may be `instruct` itself (in place).
        instruct, base: contiguous bf16/fp16/fp32 tensors (dtypes may differ) of out's numel.
        tuned: one such tensor, or a sequence of them (one delta each).
        alpha: one coefficient for every delta, or one per delta; 1.0 skips the multiply.

    Returns:
        NonFinite(deltas, overflow, instruct): NaN/Inf counts (synchronizes with the device).

    Example:
        >>> out = torch.empty(3, dtype=torch.bfloat16, device="cuda")
        >>> ones = torch.ones(3, device="cuda")
        >>> graft_triton(out, ones, ones * 3, ones * 2)
        NonFinite(deltas=0, overflow=0, instruct=0)
        >>> out
        tensor([2., 2., 2.], device='cuda:0', dtype=torch.bfloat16)
    """
    counts = torch.zeros(3, dtype=torch.int64, device=out.device)
    launch_graft(out, instruct, tuned, base, counts, alpha)
    return NonFinite(*counts.tolist())


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
