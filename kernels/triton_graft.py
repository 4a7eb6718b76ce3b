"""The fused Triton graft kernel: `out = round(I + alpha * (T - B))` in one pass over flat ranges.

One program handles BLOCK_SIZE consecutive elements: it loads I, T, B (any of bf16/fp16/fp32, each
independently), widens them to float32 (exact), computes in the CPU twin's order

    d = T - B            float32
    d = d * alpha        float32, skipped when alpha == 1 (constexpr), never fused into an FMA
    x = I + d            float32
    out = round(x)       once, round-to-nearest-even, to bf16/fp16/fp32

and, in the same pass, counts elements where d is NaN/Inf into an int64 counter. The kernel is memory
bound (3 reads + 1 write per element), so the extra integer work below costs nothing measurable.

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
def triton_graft_kernel(
    out_ptr,  # [n] float32 | float16 | int16 (the bits of a bfloat16 output)
    i_ptr,  # [n] Instruct: fp16 | fp32 | int16 (the bits of a bf16 input)
    t_ptr,  # [n] tuned, likewise
    b_ptr,  # [n] Base, likewise
    nonfinite_ptr,  # [1] int64, incremented by the number of NaN/Inf in T - B
    n_elements,
    alpha,  # float32
    ALPHA_IS_ONE: tl.constexpr,
    OUT_BF16_BITS: tl.constexpr,  # out_ptr is an int16 view of a bf16 output
    I_BF16_BITS: tl.constexpr,  # i_ptr is an int16 view of a bf16 input; T_, B_ likewise
    T_BF16_BITS: tl.constexpr,
    B_BF16_BITS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # int64 before the multiply: a tensor may hold more than 2**31 elements (a 405B model's embedding).
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    t = _load_f32(t_ptr, offsets, mask, T_BF16_BITS)
    b = _load_f32(b_ptr, offsets, mask, B_BF16_BITS)
    i = _load_f32(i_ptr, offsets, mask, I_BF16_BITS)

    d = t - b
    # One atomic per NaN/Inf element, none in the common all-finite case. Not a block sum: `tl.sum` is
    # itself a @triton.jit function of Triton's library, decorated in whichever mode Triton was first
    # imported; the interpreter cannot call it in compiled mode. Atomics are builtins: fine in both.
    # The price is a slow kernel on a tensor that is mostly NaN/Inf, an error case anyway. Masked
    # lanes load 0 - 0 and never count. Relaxed: nothing is ordered against the counter.
    bad = (d != d) | (tl.abs(d) > FLT_MAX)
    ones = tl.full([BLOCK_SIZE], 1, tl.int64)
    tl.atomic_add(nonfinite_ptr + tl.full([BLOCK_SIZE], 0, tl.int32), ones, mask=bad & mask, sem="relaxed")

    if not ALPHA_IS_ONE:
        d = d * alpha  # the launcher compiles with enable_fp_fusion=False: no FMA with the add below
    x = i + d

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


def _ensure_tuned(out: torch.Tensor, instruct: torch.Tensor, tuned: torch.Tensor, base: torch.Tensor) -> None:
    """Autotune once per dtype combination and device, on zero-filled scratch buffers of TUNE_NUMEL.

    Tuning on the caller's tensors would time whatever chunk comes first (often a 4K-element norm
    weight, where every config ties) and would run the kernel several times on them: wrong if `out`
    aliases `instruct`. Scratch buffers give a representative size and leave the caller's data alone.
    """
    key = (out.device, out.dtype, instruct.dtype, tuned.dtype, base.dtype)
    if key in _tuned:
        return
    # (Triton's own tuning cache is keyed by dtypes only, so a second GPU of another kind reuses this.)
    scratch = [torch.zeros(TUNE_NUMEL, dtype=x.dtype, device=out.device) for x in (out, instruct, tuned, base)]
    counter = torch.zeros(1, dtype=torch.int64, device=out.device)
    _launch(*scratch, counter, 1.0)
    del scratch
    _tuned.add(key)


def _bits(x: torch.Tensor) -> torch.Tensor:
    # bf16 travels as int16 so the kernel converts it with integer ops (exact on every backend).
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def _launch(out: torch.Tensor, instruct, tuned, base, nonfinite: torch.Tensor, alpha: float) -> None:
    n = out.numel()
    args = (_bits(out), _bits(instruct), _bits(tuned), _bits(base), nonfinite, n, alpha)
    bf16 = [x.dtype == torch.bfloat16 for x in (out, instruct, tuned, base)]
    meta = dict(
        ALPHA_IS_ONE=alpha == 1.0, OUT_BF16_BITS=bf16[0], I_BF16_BITS=bf16[1], T_BF16_BITS=bf16[2], B_BF16_BITS=bf16[3]
    )
    if INTERPRET:
        triton_graft_kernel[(triton.cdiv(n, INTERPRET_BLOCK),)](*args, **meta, BLOCK_SIZE=INTERPRET_BLOCK)
    else:
        grid = lambda cfg: (triton.cdiv(n, cfg["BLOCK_SIZE"]),)  # noqa: E731
        with torch.cuda.device(out.device):  # Triton launches on the current device, not the tensors'
            _autotuned_kernel[grid](*args, **meta, enable_fp_fusion=False)


def launch_graft(
    out: torch.Tensor,
    instruct: torch.Tensor,
    tuned: torch.Tensor,
    base: torch.Tensor,
    nonfinite: torch.Tensor,
    alpha: float = 1.0,
) -> None:
    """Like `graft_triton`, but adds the NaN/Inf count to `nonfinite` (int64, one element, same device)
    without synchronizing, so a caller can queue many chunks and read the count once per tensor."""
    _check(out, instruct, tuned, base)
    if nonfinite.dtype != torch.int64 or nonfinite.numel() != 1 or nonfinite.device != out.device:
        raise ValueError("launch_graft: nonfinite must be a one-element int64 tensor on the output's device")
    if out.numel() == 0:
        return
    if not INTERPRET:
        _ensure_tuned(out, instruct, tuned, base)
    _launch(out, instruct, tuned, base, nonfinite, float(alpha))


def graft_triton(
    out: torch.Tensor,
    instruct: torch.Tensor,
    tuned: torch.Tensor,
    base: torch.Tensor,
    alpha: float = 1.0,
) -> int:
    """Write `round(I + alpha * (T - B))` into `out`; return how many elements of T - B were NaN/Inf.

    Args:
        out: contiguous bf16/fp16/fp32 tensor, any shape; may be `instruct` itself (in place).
        instruct, tuned, base: contiguous bf16/fp16/fp32 tensors (dtypes may differ) of out's numel.
        alpha: scale of the fine-tune delta; 1.0 skips the multiply and is bit-exact with the float32
            formula, other values are within 1 ulp of a float64 reference.

    Returns:
        The number of NaN/Inf elements in T - B (synchronizes with the device).

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


def _check(out: torch.Tensor, instruct: torch.Tensor, tuned: torch.Tensor, base: torch.Tensor) -> None:
    named = {"out": out, "instruct": instruct, "tuned": tuned, "base": base}
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


def torch_graft(instruct: torch.Tensor, tuned: torch.Tensor, base: torch.Tensor, alpha: float, dtype: torch.dtype):
    """The plain reference (whole tensors, float32, same op order); see graftcore.kernels.cpu."""
    from .cpu import torch_graft as reference

    return reference(instruct, tuned, base, alpha, dtype)
