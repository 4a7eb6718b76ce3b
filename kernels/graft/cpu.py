"""The CPU twin of the Triton graft kernel: `out = round(I + a1*(T1 - B) + a2*(T2 - B) + ...)`, float32 math,
one rounding.

Whole-tensor float32 eager code makes four full-size temporaries and runs at about 1 GB/s on a 2-core
machine; the same math on cache-sized chunks in three preallocated float32 buffers runs 10x faster. The
operation order is the Triton kernel's: the sum starts as I, then for each delta in turn `d = Tk - B`,
`d = d * ak` (skipped when ak == 1, which is exact), `sum = sum + d`, each rounded to float32; so the bits
agree on every path, and one delta gives `I + a*(T - B)` exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

CHUNK = 1 << 18  # elements; 256K float32 = 1 MiB per scratch buffer: in L2, measured fastest here

# The NaN policy, the same on every path: a NaN result is written as the canonical quiet NaN of the output
# dtype (positive, top mantissa bit only), whatever NaN the arithmetic produced, so shard bytes and their
# sha256 never depend on the device.
CANONICAL_NAN = {torch.bfloat16: 0x7FC0, torch.float16: 0x7E00, torch.float32: 0x7FC00000}
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
# The smallest float32 magnitude that rounds to inf in each output dtype (round-to-nearest-even: the largest
# finite value plus half an ulp, a tie that rounds up since the largest finite value has an odd mantissa).
OVERFLOW = {torch.bfloat16: 3.3961775292304957e38, torch.float16: 65520.0, torch.float32: math.inf}


Tensors = torch.Tensor | Sequence[torch.Tensor]  # one tuned tensor, or one per delta
Alphas = float | Sequence[float]  # one alpha for every delta, or one each


class NonFinite(NamedTuple):
    """What the kernels count while grafting (per call; the engine adds them up per tensor):

    deltas: elements where some delta Tk - B is NaN/Inf;
    overflow: results that are NaN/Inf although every input was finite (a scaled delta, the sum, or its
        rounding to the output dtype overflowed);
    instruct: NaN/Inf results where Instruct's own value is NaN/Inf (carried through, deltas finite).
    """

    deltas: int = 0
    overflow: int = 0
    instruct: int = 0

    def __bool__(self) -> bool:
        return any(self)

    def plus(self, other: NonFinite) -> NonFinite:
        return NonFinite(*(a + b for a, b in zip(self, other)))


class CpuScratch:
    """Three float32 buffers of `chunk` elements (the sum, a delta, Base), allocated once and reused."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self.delta = torch.empty(chunk, dtype=torch.float32)
        self.other = torch.empty(chunk, dtype=torch.float32)
        self.acc = torch.empty(chunk, dtype=torch.float32)


def as_terms(tuned: Tensors, alpha: Alphas) -> tuple[list, list[float]]:
    """([T1, T2, ...], [a1, a2, ...]) from one tensor or a sequence, and one alpha for all or one per tensor."""
    tuned = [tuned] if isinstance(tuned, torch.Tensor) else list(tuned)
    alphas = [float(alpha)] * len(tuned) if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    if not tuned:
        raise ValueError("graft: no tuned tensor given")
    if len(alphas) != len(tuned):
        raise ValueError(f"graft: {len(alphas)} alphas for {len(tuned)} tuned tensors")
    return tuned, alphas


def graft_cpu(out, instruct, tuned: Tensors, base, alpha: Alphas = 1.0, scratch: CpuScratch | None = None) -> NonFinite:
    """Write `I + a1*(T1 - B) + ...` into `out` (same number of elements); return the NonFinite counts.

    Example:
        >>> o = torch.empty(4, dtype=torch.bfloat16)
        >>> graft_cpu(o, torch.ones(4), torch.full((4,), 3.0), torch.full((4,), 2.0))
        NonFinite(deltas=0, overflow=0, instruct=0)
        >>> o
        tensor([2., 2., 2., 2.], dtype=torch.bfloat16)
        >>> tuned = [torch.full((4,), 3.0), torch.full((4,), 4.0)]
        >>> bool(graft_cpu(o, torch.ones(4), tuned, torch.full((4,), 2.0), [1.0, 0.5]))
        False
        >>> o
        tensor([3., 3., 3., 3.], dtype=torch.bfloat16)
    """
    tuned, alphas = as_terms(tuned, alpha)
    n = out.numel()
    if not out.is_contiguous():  # reshape would copy it: the result would go nowhere
        raise ValueError("graft_cpu: out is not contiguous")
    if any(x.numel() != n for x in (instruct, base, *tuned)):
        sizes = ", ".join(f"{x.numel()}" for x in tuned)
        raise ValueError(f"graft_cpu: lengths differ: out {n}, I {instruct.numel()}, T {sizes}, B {base.numel()}")
    out, instruct, base = (x.reshape(-1) for x in (out, instruct, base))
    tuned = [t.reshape(-1) for t in tuned]
    scratch = scratch or CpuScratch(min(CHUNK, max(n, 1)))
    counts = NonFinite()
    for lo in range(0, n, scratch.chunk):
        hi = min(n, lo + scratch.chunk)
        acc, d, b = scratch.acc[: hi - lo], scratch.delta[: hi - lo], scratch.other[: hi - lo]
        # Widen each input into float32 first: an in-place op with a bf16 operand (d.sub_(b)) gives the same
        # bits but ran 8% slower end to end here, as torch converts through a temporary.
        acc.copy_(instruct[lo:hi])
        b.copy_(base[lo:hi])
        bad_delta = None
        for t, a in zip(tuned, alphas):
            d.copy_(t[lo:hi])
            d.sub_(b)
            bad_delta = flag_nonfinite(d, bad_delta)
            if a != 1.0:
                d.mul_(a)
            acc.add_(d)
        counts = counts.plus(round_into(out[lo:hi], acc, instruct[lo:hi], bad_delta))
    return counts


def round_into(
    out: torch.Tensor, acc: torch.Tensor, instruct: torch.Tensor, bad_delta: torch.Tensor | None
) -> NonFinite:
    """The one rounding, float32 `acc` -> `out`'s dtype (round-to-nearest-even), with the NaN policy and the
    NonFinite counts of this chunk (`bad_delta`: where some delta was NaN/Inf, or None). One min/max reduction
    flags the rare chunk whose result is not finite in the output dtype; only that one is looked at closely."""
    out.copy_(acc.view(out.shape))
    low, high = torch.aminmax(acc)
    limit = OVERFLOW[out.dtype]
    if bad_delta is None and -limit < low.item() and high.item() < limit:  # NaN compares False: flagged
        return NonFinite()
    flat = out.reshape(-1)
    bad_out = ~torch.isfinite(flat)
    nan = torch.isnan(flat)
    if nan.any():
        flat.view(BITS[out.dtype])[nan] = CANONICAL_NAN[out.dtype]
    return classify(bad_out, bad_delta, instruct)


def flag_nonfinite(delta: torch.Tensor, flagged: torch.Tensor | None) -> torch.Tensor | None:
    """`flagged` (a bool mask, or None for none yet) with the NaN/Inf elements of `delta` added. A sum is NaN/Inf
    whenever any element is, so one reduction clears the common chunk; only a rare one is looked at exactly."""
    if math.isfinite(delta.sum().item()):
        return flagged
    bad = ~torch.isfinite(delta)
    return bad if flagged is None else flagged | bad


def classify(bad_out: torch.Tensor, bad_delta: torch.Tensor | None, instruct: torch.Tensor) -> NonFinite:
    """The NonFinite counts of a chunk from its non-finite results `bad_out` (flat): elements with a NaN/Inf
    delta (`bad_delta`, or None), then the others produced from finite inputs (overflow) or carried from
    Instruct."""
    bad_delta = torch.zeros_like(bad_out) if bad_delta is None else bad_delta.reshape(-1)
    bad_i = ~torch.isfinite(instruct.reshape(-1))
    return NonFinite(
        int(bad_delta.sum()), int((bad_out & ~bad_i & ~bad_delta).sum()), int((bad_out & bad_i & ~bad_delta).sum())
    )


def torch_graft(
    instruct: torch.Tensor,
    tuned: torch.Tensor | Sequence[torch.Tensor],
    base: torch.Tensor,
    alpha: float | Sequence[float],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The formula written plainly (whole tensors, float32): the reference the kernels are checked against."""
    tuned, alphas = as_terms(tuned, alpha)
    x = instruct.float()
    for t, a in zip(tuned, alphas):
        delta = t.float() - base.float()
        if a != 1.0:
            delta = delta * a
        x = x + delta
    return x.to(dtype)
