"""The Triton graft kernel, run for real: in Triton's CPU interpreter here, and on a GPU when there is one.

Every result is compared bit for bit with the formula written plainly in float32 and with the CPU twin
(`graft_cpu`), NaN included: every path writes a NaN result as the output dtype's canonical quiet NaN.

Interpreter mode is chosen when `@triton.jit` runs, i.e. when the kernel module is imported. Other test
modules may already have imported `graftcore.kernels.triton_graft` for the GPU, and setting
TRITON_INTERPRET for the whole session would silently turn later GPU tests into interpreter runs. So we
load a private, interpreted copy of the module here (env var set around its import, then restored) and
assert that it really is interpreted; the CUDA group uses the ordinary import.

Triton itself is imported first, without the env var: its own library functions (`tl.cdiv`, the
reduction combiners) are decorated at *their* import, and if that happens in interpreter mode a later
compiled kernel, or Triton's lazily imported gluon module, finds InterpretedFunctions and fails.
"""

from helpers import interpreted_kernel_module

tk = interpreted_kernel_module()

import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from graftcore.kernels import graft_cpu  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DTYPES = (BF16, FP16, FP32)
INT_VIEW = {BF16: torch.int16, FP16: torch.int16, FP32: torch.int32}

# Interpreter warnings from numpy (inf - inf, overflow in casts) are the expected behaviour of the inputs.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def plain(i, t, b, dtype, alpha=1.0):
    """The formula written plainly in float32, in the kernel's op order."""
    d = t.float() - b.float()
    if alpha != 1.0:
        d = d * alpha
    return (i.float() + d).to(dtype)


def make(n, dtypes, seed=0, scale=(2.0, 0.05, 0.05)):
    """I, T, B like real weights: T = B + a small delta, I near B."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * scale[0]
    tuned = base + torch.randn(n, generator=g) * scale[1]
    instruct = base + torch.randn(n, generator=g) * scale[2]
    return instruct.to(dtypes[0]), tuned.to(dtypes[1]), base.to(dtypes[2])


CANONICAL_NAN = {BF16: 0x7FC0, FP16: 0x7E00, FP32: 0x7FC00000}  # positive, quiet, no payload


def canonical(x):
    """x with every NaN replaced by the canonical quiet NaN of its dtype (the documented NaN policy)."""
    x = x.clone()
    x.view(INT_VIEW[x.dtype])[x.isnan()] = CANONICAL_NAN[x.dtype]
    return x


def assert_same_bits(got, want):
    """Equal bits everywhere, NaN included (`want`'s NaNs taken as the canonical NaN)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    want = canonical(want)
    ok = got.view(INT_VIEW[got.dtype]) == want.view(INT_VIEW[want.dtype])
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()
        raise AssertionError(
            f"{bad.numel()} of {got.numel()} differ, first at {bad[:4].tolist()}: "
            f"{got[bad[:4]].tolist()} vs {want[bad[:4]].tolist()}"
        )


def run_both(i, t, b, out_dtype, alpha=1.0):
    """Kernel and CPU twin on the same inputs; returns (kernel out, kernel count, twin out, twin count)."""
    out = torch.empty(i.numel(), dtype=out_dtype)
    count = tk.graft_triton(out, i, t, b, alpha)
    twin = torch.empty(i.numel(), dtype=out_dtype)
    twin_count = graft_cpu(twin, i, t, b, alpha)
    return out, count, twin, twin_count


def test_interpreter_is_in_effect():
    assert tk.INTERPRET
    assert isinstance(tk.triton_graft_kernel, InterpretedFunction)


# Each combination of input dtypes: I, T, B independently.
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtypes", list(itertools.product(DTYPES, repeat=3)), ids=str)
def test_every_dtype_mix_alpha_one_bit_exact(in_dtypes, out_dtype):
    i, t, b = make(4097, in_dtypes)
    out, count, twin, twin_count = run_both(i, t, b, out_dtype)
    assert count == twin_count == (0, 0, 0)
    assert_same_bits(out, plain(i, t, b, out_dtype))
    assert_same_bits(out, twin)


MIXES = [(BF16, BF16, BF16), (FP16, FP16, FP16), (FP32, FP32, FP32), (BF16, FP32, BF16), (FP32, BF16, FP16)]


# Odd sizes: a single element, less than a block, around block boundaries (16384 in the interpreter).
@pytest.mark.parametrize("n", [1, 7, 1023, 16383, 16385, 40000])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtypes", MIXES, ids=str)
def test_odd_sizes_bit_exact(in_dtypes, out_dtype, n):
    i, t, b = make(n, in_dtypes, seed=n)
    out, count, twin, _ = run_both(i, t, b, out_dtype)
    assert count == (0, 0, 0)
    assert_same_bits(out, plain(i, t, b, out_dtype))
    assert_same_bits(out, twin)


# One large size for the two mixes that matter most: all bf16, and a float32 fine-tune of a bf16 model.
@pytest.mark.parametrize("in_dtypes", [(BF16, BF16, BF16), (BF16, FP32, BF16)], ids=str)
def test_large_bit_exact(in_dtypes):
    n = (1 << 20) + 3
    i, t, b = make(n, in_dtypes, seed=7)
    out, count, twin, _ = run_both(i, t, b, BF16)
    assert count == (0, 0, 0)
    assert_same_bits(out, plain(i, t, b, BF16))
    assert_same_bits(out, twin)


@pytest.mark.parametrize("alpha", [0.5, 0.3, 2.0, -1.0])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtypes", [(BF16, BF16, BF16), (BF16, FP32, BF16), (FP32, FP32, FP32)], ids=str)
def test_alpha_same_op_order_bit_exact(in_dtypes, out_dtype, alpha):
    i, t, b = make(20011, in_dtypes, seed=3)
    out, _, twin, _ = run_both(i, t, b, out_dtype, alpha)
    assert_same_bits(out, plain(i, t, b, out_dtype, alpha))
    assert_same_bits(out, twin)


def neighbours(x):
    """The next representable values below and above each (finite) element of x, as float64."""
    width = 8 * x.element_size()
    v = x.view(INT_VIEW[x.dtype]).long() & ((1 << width) - 1)  # raw bits, unsigned
    sign, mag = v >> (width - 1), v & ((1 << (width - 1)) - 1)
    key = torch.where(sign == 1, -mag, mag)  # sign-magnitude -> ordered integers (-0 == +0)

    def value(k):
        bits = torch.where(k < 0, (-k) | (1 << (width - 1)), k)
        bits = torch.where(bits >= 1 << (width - 1), bits - (1 << width), bits)  # back to signed
        return bits.to(INT_VIEW[x.dtype]).view(x.dtype).double()

    return value(key - 1), value(key + 1)


# With half-precision inputs, T - B and the halving are exact in float32, so the kernel's result is the
# float64 one rounded twice (float32, then output): strictly between the output's two neighbours.
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtypes", [(BF16, BF16, BF16), (FP16, FP16, FP16), (FP32, BF16, BF16)], ids=str)
def test_alpha_half_within_one_ulp_of_float64(in_dtypes, out_dtype):
    i, t, b = make(30001, in_dtypes, seed=5)
    out = torch.empty(i.numel(), dtype=out_dtype)
    tk.graft_triton(out, i, t, b, 0.5)
    exact = i.double() + 0.5 * (t.double() - b.double())
    below, above = neighbours(out)
    assert bool(((below < exact) & (exact < above)).all())


# Every bf16 and fp16 value, subnormals, infinities and NaN included, must widen exactly (the
# interpreter's own bf16 -> float32 cast gets bf16 subnormals wrong; the kernel uses integer ops).
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize("slot", ["instruct", "tuned", "base"])
def test_every_half_value_widens_exactly(dtype, slot):
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    zero = torch.zeros_like(x)
    args = {"instruct": zero, "tuned": zero, "base": zero, slot: x}
    out = torch.empty(x.numel(), dtype=FP32)
    count = tk.graft_triton(out, args["instruct"], args["tuned"], args["base"])
    want = plain(args["instruct"], args["tuned"], args["base"], FP32)
    assert_same_bits(out, want)
    bad = int((~torch.isfinite(x.float())).sum())
    assert count == ((0, 0, bad) if slot == "instruct" else (bad, 0, 0))


def float32_edge_cases():
    """Float32 values whose rounding to bf16/fp16 is easy to get wrong."""
    g = torch.Generator().manual_seed(11)
    hi = torch.randint(0, 1 << 16, (4000,), generator=g, dtype=torch.int64)
    # low halves around bf16's and fp16's halfway points (bits 15 and 12), below, at and above a tie
    lows = torch.tensor([0, 1, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF])
    bits = ((hi[:, None] << 16) | lows[None, :]).flatten()
    # fp16 range: exponents 2^-27 .. 2^16, with fp16 ties (bit 12 set, lower bits clear) in a third
    e = torch.randint(100, 143, (30000,), generator=g)
    m = torch.randint(0, 1 << 23, (30000,), generator=g)
    m = torch.where(torch.arange(30000) % 3 == 0, (m & ~0x1FFF) | 0x1000, m)
    s = torch.randint(0, 2, (30000,), generator=g)
    fp16_bits = (s << 31) | (e << 23) | m
    values = torch.cat([bits, fp16_bits]).to(torch.int64)
    values = torch.where(values >= 1 << 31, values - (1 << 32), values).to(torch.int32).view(FP32)
    k = torch.arange(1, 1 << 12, 2, dtype=torch.float64)  # odd multiples of 2^-25: ties between fp16 subnormals
    special = torch.tensor(
        [
            65504.0,
            65519.99,
            65520.0,
            -65520.0,
            2**-24,
            2**-25,
            3 * 2**-26,
            3.3895314e38,
            3.4028235e38,
            -3.4028235e38,
            1e-45,
            -1e-45,
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
        ]
    )
    return torch.cat([values, (k * 2**-25).float(), (-k * 2**-25).float(), special.float()])


@pytest.mark.parametrize("out_dtype", [BF16, FP16], ids=str)
def test_rounding_edge_cases_match_torch(out_dtype):
    x = float32_edge_cases()
    zero = torch.zeros_like(x)
    out = torch.empty(x.numel(), dtype=out_dtype)
    tk.graft_triton(out, x, zero, zero)
    # x + (0 - 0) is x (except -0, which becomes +0), so this is torch's RNE cast of x itself
    assert_same_bits(out, plain(x, zero, zero, out_dtype))
    assert_same_bits(out[x != 0], x[x != 0].to(out_dtype))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtypes", [(BF16, BF16, BF16), (FP32, FP32, FP32), (FP16, FP32, BF16)], ids=str)
def test_nonfinite_counted_and_propagated(in_dtypes, out_dtype):
    n = 40007  # three interpreter blocks; the last one partial
    i, t, b = (x.clone() for x in make(n, in_dtypes, seed=9))
    inf = float("inf")
    t[[0, 5, 16384, n - 1]] = torch.tensor([float("nan"), inf, -inf, float("nan")], dtype=t.dtype)
    b[[7, 16390, 32770]] = torch.tensor([float("nan"), inf, -inf], dtype=b.dtype)
    t[100], b[100] = inf, inf  # inf - inf: NaN
    t[200], b[200] = -inf, inf  # -inf - inf: -inf
    i[300] = float("nan")  # in Instruct only: counted apart (a note, not an error), and propagates
    out, count, twin, twin_count = run_both(i, t, b, out_dtype)
    want = plain(i, t, b, out_dtype)
    assert count == twin_count == (9, 0, 1)
    assert_same_bits(out, want)
    assert_same_bits(out, twin)
    assert out[300].isnan() and out[100].isnan() and out[200] == -inf and out[5] == inf


def test_nonfinite_counter_accumulates_without_sync():
    i, t, b = make(1000, (BF16, BF16, BF16))
    t = t.clone()
    t[:3] = float("nan")
    counter = torch.zeros(3, dtype=torch.int64)
    out = torch.empty(1000, dtype=BF16)
    tk.launch_graft(out, i, t, b, counter)
    tk.launch_graft(out, i, t, b, counter, alpha=0.5)
    assert counter.tolist() == [6, 0, 0]


def test_tail_writes_nothing_past_the_end_and_honours_offsets():
    n = 16384 + 5
    i, t, b = make(n + 3, (BF16, FP32, BF16))
    i, t, b = i[3:], t[3:], b[3:]  # views with a storage offset
    buf = torch.full((n + 100,), 7.0, dtype=BF16)
    out = buf[:n]
    assert tk.graft_triton(out, i, t, b) == (0, 0, 0)
    assert_same_bits(out, plain(i, t, b, BF16))
    assert (buf[n:] == 7.0).all()


def test_in_place_and_shapes():
    i, t, b = make(6 * 1001, (BF16, BF16, BF16))
    want = plain(i, t, b, BF16)
    i2 = i.clone().view(6, 1001)
    assert tk.graft_triton(i2, i2, t.view(1001, 6), b) == (0, 0, 0)  # out is Instruct; shapes differ, numel same
    assert_same_bits(i2.view(-1), want)


def test_empty():
    e = torch.empty(0, dtype=BF16)
    assert tk.graft_triton(e, e, e, e) == (0, 0, 0)


def test_bad_arguments():
    x = torch.zeros(8, dtype=BF16)
    with pytest.raises(ValueError, match="element counts differ"):
        tk.graft_triton(x, x, x, torch.zeros(9, dtype=BF16))
    with pytest.raises(ValueError, match="float64"):
        tk.graft_triton(x, x, x.double(), x)
    with pytest.raises(ValueError, match="int8"):
        tk.graft_triton(torch.zeros(8, dtype=torch.int8), x, x, x)
    with pytest.raises(ValueError, match="not contiguous"):
        tk.graft_triton(x, x, torch.zeros(16, dtype=BF16)[::2], x)
    with pytest.raises(ValueError, match="int64"):
        tk.launch_graft(x, x, x, x, torch.zeros(1, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------------
# On a real device: the ordinary import (compiled kernel, autotuned), compared with the CPU twin.


def _gpu_module():
    from graftcore.kernels import triton_graft

    return triton_graft


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture
def gpu():
    mod = _gpu_module()
    if mod.INTERPRET:
        pytest.skip("TRITON_INTERPRET is set for the whole session: no compiled kernel to test")
    return mod


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.3])
@pytest.mark.parametrize("n", [1, 7, 1023, 4097, (1 << 20) + 3])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtypes", MIXES, ids=str)
def test_cuda_matches_cpu_twin(gpu, in_dtypes, out_dtype, n, alpha):
    # Bit-exact for every alpha: the kernel is compiled without FMA contraction, so it rounds as the twin does.
    i, t, b = make(n, in_dtypes, seed=n)
    out = torch.empty(n, dtype=out_dtype, device="cuda")
    count = gpu.graft_triton(out, i.cuda(), t.cuda(), b.cuda(), alpha)
    twin = torch.empty(n, dtype=out_dtype)
    assert count == graft_cpu(twin, i, t, b, alpha) == (0, 0, 0)
    assert_same_bits(out.cpu(), twin)


@pytest.mark.cuda
@cuda
def test_cuda_edge_values_and_nonfinite(gpu):
    from graftcore.kernels import graft_

    x = float32_edge_cases()
    x[::97] = float("nan")
    zero = torch.zeros_like(x)
    for out_dtype in DTYPES:
        out = torch.empty(x.numel(), dtype=out_dtype, device="cuda")
        count = graft_(out, zero.cuda(), x.cuda(), zero.cuda())  # the dispatcher picks Triton for CUDA
        twin = torch.empty(x.numel(), dtype=out_dtype)
        bad = int((~torch.isfinite(x)).sum())
        found = graft_cpu(twin, zero, x, zero)
        assert count == found and found.deltas == bad and found.instruct == 0
        assert_same_bits(out.cpu(), twin)
    for dtype in (BF16, FP16):
        h = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
        out = torch.empty(h.numel(), dtype=FP32, device="cuda")
        z = torch.zeros_like(h).cuda()
        gpu.graft_triton(out, h.cuda(), z, z)
        assert_same_bits(out.cpu(), plain(h, torch.zeros_like(h), torch.zeros_like(h), FP32))


@pytest.mark.cuda
@cuda
def test_cuda_int64_offsets(gpu):
    n = (1 << 31) + 4099  # past int32 indexing; bf16: 4 tensors x 4.3 GB
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * 2 * n + n + (2 << 30):  # 4 tensors, the isnan mask, slack
        pytest.skip(f"needs {9 * n / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    g = torch.Generator(device="cuda").manual_seed(0)
    b = torch.randn(n, generator=g, device="cuda", dtype=BF16)
    t = torch.randn(n, generator=g, device="cuda", dtype=BF16)
    i = torch.randn(n, generator=g, device="cuda", dtype=BF16)
    out = torch.full((n,), float("nan"), device="cuda", dtype=BF16)
    assert gpu.graft_triton(out, i, t, b) == (0, 0, 0)
    assert not bool(out.isnan().any())  # every element, past 2^31 included, was written
    for lo in (0, (1 << 31) - 70000, n - 70000):  # the start, across 2^31, the tail
        sl = slice(lo, lo + 70000)
        twin = torch.empty(70000, dtype=BF16)
        graft_cpu(twin, i[sl].cpu(), t[sl].cpu(), b[sl].cpu())
        assert_same_bits(out[sl].cpu(), twin)
