"""FP8 E4M3 with block scales, the CPU twin: decode to float32, and encode a grafted float32 block back.

Layout (DeepSeek-V3 inference/kernel.py, weight_dequant): a weight [rows, cols] of float8_e4m3fn and a scale grid
[ceil(rows / bh), ceil(cols / bw)]; element (r, c) is float32(q) * scale[r // bh, c // bw]. A per-channel scale is
the grid of (bh, bw) = (1, cols), a per-tensor one of (rows, cols). The functions here take whole rows
[row0, row0 + n) and the scale rows that cover them.

Encoding, per block, the same on every path (the rule of the project's FP8 contract):
  x = the grafted float32 values, s = Instruct's scale;
  keep s if every |x| / s <= 464 (the midpoint above E4M3's largest value 448: such an x rounds, saturating, to
  within +-448; dequantizing and dividing again can give 448.00003 for an element stored as 448, and a bound of
  448 would rescale blocks that did not change); else s = amax / 448 rounded up in the scale's dtype (to a power
  of two for `ue8m0` scales) so that no |x| / s exceeds 448;
  q = x / s, round-to-nearest-even to E4M3, saturating at +-448; NaN as the canonical 0x7F.
NaN and +-Inf (kept with --allow-nonfinite, or carried from Instruct) do not count toward a block's max: the
block's other elements are encoded as if they were not there; Inf saturates to +-448.
Then a zero update gives back Instruct's bytes (a -0 may come back as +0, as IEEE addition gives).

Example:
    >>> import torch
    >>> q = torch.tensor([[1.0, -2.0]]).to(torch.float8_e4m3fn)
    >>> dequantize(q.view(-1), torch.tensor([0.5]), 0, 2, (1, 2))
    tensor([[ 0.5000, -1.0000]])
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from graftcore.shapes import cdiv

E4M3_MAX = 448.0
KEEP_BOUND = 464.0
CANONICAL_NAN = 0x7F  # positive, every exponent and mantissa bit set: E4M3FN's only NaN encoding, sign cleared


class Scratch:
    """Reusable buffers for FP8 steps, by name, grown on demand: a step allocates nothing (allocating a block
    row's float32 copies afresh each step cost page faults beside the math)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype=torch.float32) -> torch.Tensor:
        b = self.buffers.get(name)
        if b is None or b.numel() < n or b.dtype != dtype:
            b = self.buffers[name] = torch.empty(n, dtype=dtype)
        return b[:n]


def e4m3_table() -> torch.Tensor:
    """float32 of each of the 256 E4M3FN codes (decoding by table lookup is 5x faster than torch's cast here)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


TABLE = e4m3_table()


def scale_per_element(scale: torch.Tensor, row0: int, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """[rows, cols] float32: each element's scale, from `scale`, the float32 grid rows covering rows
    [row0, row0 + rows) (its first row is the block row holding row0)."""
    bh, bw = block
    grid = scale.reshape(-1, cdiv(cols, bw)).to(torch.float32)
    index = torch.arange(row0, row0 + rows) // bh - row0 // bh
    return grid[index].repeat_interleave(bw, dim=1)[:, :cols]


def tiles(x: torch.Tensor, block: tuple[int, int], row0: int) -> torch.Tensor | None:
    """`x` [rows, cols] viewed as [grid rows, bh, grid cols, bw] when its rows start and end on block rows and its
    columns fill whole blocks (the common case, where a scale is applied by broadcasting); None otherwise."""
    rows, cols = x.shape
    bh, bw = block
    if row0 % bh or rows % bh or cols % bw:
        return None
    return x.view(rows // bh, bh, cols // bw, bw)


def apply_scale(x: torch.Tensor, scale: torch.Tensor, row0: int, block: tuple[int, int], divide: bool = False):
    """In place: x [rows, cols] multiplied (or divided) by each element's block scale from the float32 grid rows
    `scale` that cover it."""
    rows, cols = x.shape
    if scale.numel() == 1:  # one block (a per-tensor scale, or a small tensor): a scalar
        s = scale.reshape(())
        return x.div_(s) if divide else x.mul_(s)
    t = tiles(x, block, row0)
    if t is not None:
        s = scale.reshape(t.shape[0], 1, t.shape[2], 1)
        return t.div_(s) if divide else t.mul_(s)
    s = scale_per_element(scale, row0, rows, cols, block)
    return x.div_(s) if divide else x.mul_(s)


def decode_into(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, row0: int, block, index=None) -> torch.Tensor:
    """out [rows, cols] float32 = float32(q) * its block's scale; `q` the elements (uint8 or float8_e4m3fn view),
    `index` an int32 buffer of at least their count (None: allocated)."""
    codes = q.reshape(-1).view(torch.uint8)
    index = torch.empty(codes.numel(), dtype=torch.int32) if index is None else index[: codes.numel()]
    index.copy_(codes)
    torch.index_select(TABLE, 0, index, out=out.view(-1))
    apply_scale(out, scale.to(torch.float32), row0, block)
    return out


def dequantize(q: torch.Tensor, scale: torch.Tensor, row0: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """float32 [rows, cols]: the whole rows [row0, row0 + rows) of a quantized weight, `q` their elements (flat, a
    float8_e4m3fn or uint8 view), `scale` the scale grid rows covering them (any float dtype)."""
    rows = q.numel() // cols
    return decode_into(torch.empty(rows, cols), q, scale, row0, block)


def sq_norm64(t: torch.Tensor, scratch: Scratch | None = None) -> float:
    """sum(t ** 2) in float64 of the float32 `t` (flat): each square exact, the sum in float64, so it neither
    overflows (an element of 2e19 squares past float32's range) nor depends on a float32 summation order."""
    flat = t.reshape(-1)
    wide = flat.double() if scratch is None else scratch.get("f64", flat.numel(), torch.float64).copy_(flat)
    return float(torch.dot(wide, wide))


class EncodedRows(NamedTuple):
    """What `quantize_into` did: the block scales it wrote (float32 values of the scale dtype), how many blocks
    took a new scale, and the squared norms (sq_norm64) of the encoding error deq(out) - x and of the update
    x - Instruct, over the rows given."""

    scale: torch.Tensor
    rescaled: int
    error_sq: float
    update_sq: float
    finite: bool = True  # every x was finite


def round_up_scale(amax: torch.Tensor, dtype: torch.dtype, power_of_two: bool) -> torch.Tensor:
    """float32 tensor of scales representable in `dtype`: the smallest with amax / s <= 448 in float32 (a power of
    two with `power_of_two`), for blocks of positive finite `amax`."""
    wanted = amax / E4M3_MAX
    if power_of_two:  # 2 ** ceil(log2(wanted)), exactly: frexp gives wanted = m * 2**e with m in [0.5, 1)
        m, e = torch.frexp(wanted)
        s = torch.where(m == 0.5, wanted, torch.ldexp(torch.ones_like(wanted), e))
        return s.to(dtype).to(torch.float32)
    s = wanted.to(dtype)
    for _ in range(3):  # rounding to the dtype may have gone down, then amax / s may round above 448: step up
        s32 = s.to(torch.float32)
        low = (s32 < wanted) | (amax / s32 > E4M3_MAX)
        if not bool(low.any()):
            break
        s = torch.where(low, next_up(s), s)
    return s.to(torch.float32)


def next_up(s: torch.Tensor) -> torch.Tensor:
    """The next representable value above each positive finite `s`, in its own dtype."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[s.dtype]
    return (s.view(bits) + 1).view(s.dtype)


def block_amax(a: torch.Tensor, block: tuple[int, int], row0: int) -> torch.Tensor:
    """float32 [grid rows, grid cols]: the max of each block of the non-negative rows `a` [rows, cols] (whole
    block rows from row0, which starts a block row; NaN where a block holds NaN)."""
    rows, cols = a.shape
    bh, bw = block
    assert row0 % bh == 0, "a step starts a block row"
    t = tiles(a, block, row0)
    if t is not None:
        return t.amax(dim=(1, 3))
    grid_rows, grid_cols = cdiv(rows, bh), cdiv(cols, bw)  # edge blocks are partial: zeros never raise a max
    if grid_rows * grid_cols == 1:
        return a.amax().view(1, 1)
    padded = torch.nn.functional.pad(a, (0, grid_cols * bw - cols, 0, grid_rows * bh - rows))
    return padded.view(grid_rows, bh, grid_cols, bw).amax(dim=(1, 3))


def quantize_into(
    out: torch.Tensor,
    x: torch.Tensor,
    kept: torch.Tensor,
    row0: int,
    block: tuple[int, int],
    scale_dtype: torch.dtype,
    power_of_two: bool = False,
    instruct: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> EncodedRows:
    """Encode float32 rows `x` [rows, cols] (whole block rows from `row0`) into `out` (float8_e4m3fn or uint8:
    rows * cols elements, or a [rows, cols] view, strided or not) by the module's rule; `kept`: Instruct's scales
    for these block rows (any float dtype); `instruct`: Instruct's decoded rows, for the update's norm (None: not
    measured)."""
    rows, cols = x.shape
    n = rows * cols
    sc = scratch or Scratch()
    kept32 = kept.reshape(-1, cdiv(cols, block[1])).to(torch.float32)
    y = sc.get("y", n).view(rows, cols)
    torch.abs(x, out=y)
    amax = block_amax(y, block, row0)
    finite = bool(torch.isfinite(amax).all())
    if not finite:  # NaN/Inf (allowed, or Instruct's) do not count toward a block's max: the others are encoded
        amax = block_amax(torch.where(torch.isfinite(y), y, 0.0), block, row0)
    ratio = amax / kept32
    rescale = ratio > KEEP_BOUND
    scale = kept32
    if bool(rescale.any()):
        new = round_up_scale(torch.where(rescale, amax, kept32), scale_dtype, power_of_two)
        scale = torch.where(rescale, new, kept32)
    t = tiles(x, block, row0)
    if t is not None:
        torch.div(t, scale.view(t.shape[0], 1, t.shape[2], 1), out=y.view(t.shape))
    elif scale.numel() == 1:
        torch.div(x, scale.reshape(()), out=y)
    else:
        torch.div(x, scale_per_element(scale, row0, rows, cols, block), out=y)
    y.clamp_(-E4M3_MAX, E4M3_MAX)  # NaN stays NaN
    q = out.view(torch.float8_e4m3fn) if out.dtype == torch.uint8 else out
    q = q.view(rows, cols) if q.dim() == 1 else q
    q.copy_(y)
    if not finite:  # every NaN as the canonical code
        q.view(torch.uint8)[torch.isnan(y)] = CANONICAL_NAN
    # the encoding error deq(q) - x: q decoded by table, times its block's scale
    back = sc.get("back", n).view(rows, cols)
    index = sc.get("index", n, torch.int32)
    index.view(rows, cols).copy_(q.view(torch.uint8))
    torch.index_select(TABLE, 0, index, out=back.view(-1))
    apply_scale(back, scale, row0, block)
    back.sub_(x)
    if not finite:  # measured over the finite elements
        back.masked_fill_(~torch.isfinite(x), 0.0)
    error = sq_norm64(back, sc)
    update = 0.0
    if instruct is not None:
        torch.sub(x, instruct, out=back)
        if not finite or not bool(torch.isfinite(instruct).all()):
            back.masked_fill_(~torch.isfinite(back), 0.0)
        update = sq_norm64(back, sc)
    return EncodedRows(scale, int(rescale.sum()), error, update, finite)


def graft_into(
    x: torch.Tensor,
    instruct: torch.Tensor,
    tuned: list[torch.Tensor],
    base: torch.Tensor,
    alphas: list[float],
    delta,
    check: bool = True,
):
    """x = I + a1 * (T1 - B) + ... in float32 (the CPU twin's order, graft_cpu's bits before its rounding): the
    inputs flat, of any float dtype; `delta` a float32 buffer of x's size. Returns the NonFinite counts, with
    "overflow" meaning a NaN/Inf sum of finite inputs (there is no rounding here); with check=False none are
    counted (a caller that finds every x finite knows there are none: a NaN/Inf delta makes x NaN/Inf)."""
    from .cpu import NonFinite, classify, flag_nonfinite

    bad_delta = None
    for k, (t, a) in enumerate(zip(tuned, alphas)):
        if torch.float32 in (t.dtype, base.dtype):
            torch.sub(t, base, out=delta)  # the other operand widens to float32 first: exact, then one subtraction
        else:  # two 16-bit operands would be subtracted in their own dtype: widen one first
            delta.copy_(t)
            delta.sub_(base)
        if check:
            bad_delta = flag_nonfinite(delta, bad_delta)
        if a != 1.0:
            delta.mul_(a)
        if k == 0:
            torch.add(instruct, delta, out=x)
        else:
            x.add_(delta)
    if not check:
        return NonFinite()
    low, high = torch.aminmax(x)
    if bad_delta is None and math.isfinite(low.item()) and math.isfinite(high.item()):
        return NonFinite()
    return classify(~torch.isfinite(x), bad_delta, instruct)


TILE_ELEMENTS = 1 << 18  # a column tile of a step: 256K elements, so each float32 buffer is 1 MiB


class EncodeThreads:
    """Threads that encode a step's column tiles at once, each thread with its own Scratch (torch releases the
    GIL inside each op; the pass keeps torch's own threads at one, so these are the parallelism). Tiles are
    taken in turn by whichever thread is free.

    Example:
        >>> with EncodeThreads(2) as threads:                                  # doctest: +SKIP
        ...     graft_encode(out, instruct, base, [tuned], [1.0], 0, cols, (128, 128), torch.float32, threads)
    """

    def __init__(self, n: int = 1):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.n = max(1, n)
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(self.n, thread_name_prefix="graftcore-fp8") if self.n > 1 else None

    def scratch(self) -> Scratch:
        sc = getattr(self.local, "scratch", None)
        if sc is None:
            sc = self.local.scratch = Scratch()
        return sc

    def map(self, fn, items: list) -> list:
        """[fn(item, scratch) for item in items], on the threads (each call with its thread's Scratch)."""
        if self.pool is None or len(items) < 2:
            return [fn(item, self.scratch()) for item in items]
        return [f.result() for f in [self.pool.submit(lambda it=it: fn(it, self.scratch())) for it in items]]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TileJob(NamedTuple):
    """What every column tile of one graft_encode step shares: the inputs ((flat elements, scale grid rows as
    float32 [grid rows, grid cols], or None for a float tensor), the step's rows, the encoding's parameters."""

    out: torch.Tensor
    instruct: tuple
    base: tuple
    tuned: list
    alphas: list[float]
    row0: int
    rows: int
    cols: int
    block: tuple[int, int]
    scale_dtype: torch.dtype
    power_of_two: bool


def graft_encode(
    out: torch.Tensor,
    instruct: tuple[torch.Tensor, torch.Tensor],
    base: tuple[torch.Tensor, torch.Tensor | None],
    tuned: list[tuple[torch.Tensor, torch.Tensor | None]],
    alphas: list[float],
    row0: int,
    cols: int,
    block: tuple[int, int],
    scale_dtype: torch.dtype,
    power_of_two: bool = False,
    threads: EncodeThreads | None = None,
):
    """One step of an FP8 output grafted from full deltas, in column tiles of whole blocks: decode, the CPU
    twin's float32 sum, encode (quantize_into). Inputs are (flat elements of rows [row0, ..), scale grid rows or
    None for a float tensor); `out` the step's FP8 bytes (flat). Returns (EncodedRows of the step's block rows,
    NonFinite). The bits do not depend on the tiling: every value is computed element by element, and each
    block's scale from its own elements."""
    from .cpu import NonFinite

    threads = threads or EncodeThreads(1)
    rows = instruct[0].numel() // cols
    bw = block[1]
    blocks = cdiv(cols, bw)
    per = max(1, min(TILE_ELEMENTS // max(1, rows * bw), cdiv(blocks, 2 * threads.n)))  # several tiles per thread
    width = per * bw
    spans = [(c0, min(cols, c0 + width)) for c0 in range(0, cols, width)]

    def grid(x):  # (elements, a scale's grid rows for this step as [grid rows, grid cols] float32, or None)
        t, s = x
        return (t, None if s is None else s.reshape(-1, blocks).to(torch.float32))

    job = TileJob(
        out,
        grid(instruct),
        grid(base),
        [grid(t) for t in tuned],
        alphas,
        row0,
        rows,
        cols,
        block,
        scale_dtype,
        power_of_two,
    )
    done = threads.map(lambda span, sc: encode_tile(job, span, sc), spans)
    scale = torch.cat([enc.scale for enc, _ in done], dim=1)
    counts = NonFinite()
    for _, c in done:
        counts = counts.plus(c)
    encoded = EncodedRows(
        scale,
        sum(e.rescaled for e, _ in done),
        sum(e.error_sq for e, _ in done),
        sum(e.update_sq for e, _ in done),
    )
    return encoded, counts


def load_tile(job: TileJob, name: str, x: tuple, c0: int, c1: int, sc: Scratch) -> torch.Tensor:
    """Columns [c0, c1) of the step's rows of input `x` as float32 [rows, c1 - c0] in `sc`'s buffer `name`:
    copied from a float tensor, or decoded by table and scaled from an FP8 one."""
    t, s = x
    rows, w = job.rows, c1 - c0
    buf = sc.get(name, rows * w).view(rows, w)
    view = t.view(rows, job.cols)[:, c0:c1]
    if s is None:
        return buf.copy_(view)
    bw = job.block[1]
    index = sc.get("index", rows * w, torch.int32).view(rows, w)
    index.copy_(view.view(torch.uint8))
    torch.index_select(TABLE, 0, index.view(-1), out=buf.view(-1))
    apply_scale(buf, s[:, c0 // bw : cdiv(c1, bw)].contiguous(), job.row0, job.block)
    return buf


def encode_tile(job: TileJob, span: tuple[int, int], sc: Scratch):
    """(EncodedRows, NonFinite) of the columns `span` of one graft_encode step: the inputs loaded, grafted in
    float32 and encoded into `job.out`'s columns."""
    c0, c1 = span
    rows, w, bw = job.rows, c1 - c0, job.block[1]
    xi = load_tile(job, "i", job.instruct, c0, c1, sc)
    b = load_tile(job, "b", job.base, c0, c1, sc)
    ts = [load_tile(job, f"t{k}", t, c0, c1, sc) for k, t in enumerate(job.tuned)]
    x = sc.get("x", rows * w).view(rows, w)
    delta = sc.get("d", rows * w)
    flat = [t.view(-1) for t in ts]
    counts = graft_into(x.view(-1), xi.view(-1), flat, b.view(-1), job.alphas, delta, False)
    one = len(ts) == 1  # the update is then the one delta: its norm needs no subtraction
    enc = quantize_into(
        job.out.view(rows, job.cols)[:, c0:c1],
        x,
        job.instruct[1][:, c0 // bw : cdiv(c1, bw)],
        job.row0,
        job.block,
        job.scale_dtype,
        job.power_of_two,
        None if one else xi,
        sc,
    )
    if not enc.finite:  # rare: count the NaN/Inf as the CPU twin does (the same sum again, checked)
        counts = graft_into(sc.get("x2", rows * w), xi.view(-1), flat, b.view(-1), job.alphas, delta)
    if one:
        if not enc.finite:
            delta.masked_fill_(~torch.isfinite(delta), 0.0)
        enc = enc._replace(update_sq=sq_norm64(delta, sc))
    return enc, counts
