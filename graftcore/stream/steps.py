"""How each TensorOp is cut into steps, and which input bytes each step reads.

A step computes output elements [lo, hi) of one tensor from a few element ranges of the inputs. The
engine executes the steps in plan order; the input streamer (stream/readers.py) walks the same generator, ahead
of it, to read exactly those bytes in exactly that order. Both sides generate the steps lazily, so the
bookkeeping stays a few objects whatever the model size.

    GRAFT         chunks of `chunk` elements: I, B and every tuned input T1, T2, ... read over [lo, hi)
    GRAFT_ROWS    the same over the shared rows; Instruct's extra rows read from I alone
    COPY          same dtype: the bytes as they are, `raw_bytes` at a time; else chunks of I, converted
    LORA          blocks of whole output rows (or one row cut into column ranges); I, and B and the full
                  tuned inputs where a term needs them (a LoRA term's factors are read whole)

A quantized input is read as its codec lists the stored parts that rows read (graftcore/codecs/: for FP8, the
weight's elements, then the rows of its scale grid that cover them, a Read with `part` 1), so an op with one is
cut into whole rows; when the output is quantized too, into whole bands of the codec's rows (a block's new scale
needs the whole block), and a last step per entry the encoder adds (the new scales) writes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from graftcore.codecs import codec_of
from graftcore.io.safetensors_file import Pieces, Quantized, TensorInfo, byte_view, itemsize
from graftcore.lora.update import matrix_shape
from graftcore.plan.ops import Action, TensorOp
from graftcore.shapes import cdiv, numel


@dataclass(frozen=True, slots=True)
class Read:
    """Elements [first, stop) of input tensor `info` of the checkpoint `role`; `part` k > 0: the k-th companion
    (the scale grid) of the quantized weight read just before it, as its codec lists them."""

    role: str
    info: TensorInfo
    first: int
    stop: int
    part: int = 0

    @property
    def start_byte(self) -> int:
        return self.info.start + self.first * itemsize(self.info.dtype)

    @property
    def end_byte(self) -> int:
        return self.info.start + self.stop * itemsize(self.info.dtype)


@dataclass(frozen=True, slots=True)
class Step:
    """Output elements [lo, hi) of one tensor.

    `reads` holds Instruct's range first, then Base's and each full tuned input's where the step grafts; elements
    [lo, grafted) are computed from the update, [grafted, hi) copied from Instruct. `raw`: copied byte for
    byte. `block` (LoRA): output rows [r0, r1) and columns [c0, c1). `entry` k > 0: elements [lo, hi) of the
    op's k-th output entry (op.entries[k], added by the codec's encoder: the new scales), written after the weight.
    """

    lo: int
    hi: int
    reads: tuple[Read, ...]
    grafted: int = 0
    raw: bool = False
    block: tuple[int, int, int, int] | None = None
    entry: int = 0


def op_steps(op: TensorOp, chunk: int, raw_bytes: int) -> Iterator[Step]:
    """The steps of `op` in execution order (`chunk` elements per computed step, `raw_bytes` per copied one)."""
    i = op.instruct
    if op.action is Action.COPY and op.out_dtype == i.dtype:
        parts = codec_of(i).parts(i) if isinstance(i, Quantized) else (i,)
        for k, part in enumerate(parts):
            yield from raw_steps(part, raw_bytes, k)
        return
    if op.low_rank:
        yield from block_steps(op, chunk)
    elif op.quantized:
        yield from row_steps(op, chunk)
    else:
        grafted = op.grafted_numel
        for lo, hi in ranges(op.numel, chunk, piece_bounds(op)):
            g = min(hi, max(lo, grafted))
            reads = (Read("instruct", i, lo, hi),)
            if g > lo:
                reads += delta_reads(op, lo, g)
            yield Step(lo, hi, reads, grafted=g)
    if op.quantized_out:
        for k, (_, _, shape) in enumerate(op.entries[1:], 1):
            yield Step(0, numel(shape), (), entry=k)


def raw_steps(info: TensorInfo, raw_bytes: int, part: int = 0) -> Iterator[Step]:
    """Instruct's tensor `info` copied as it is, `raw_bytes` at a time (`part` k > 0: a quantized weight's k-th
    companion, which the merge checks on the way). A dtype below a byte (F4) is copied as its bytes."""
    info = byte_view(info)
    per = max(1, raw_bytes // itemsize(info.dtype))
    for lo in range(0, info.numel, per):
        hi = min(info.numel, lo + per)
        yield Step(lo, hi, (Read("instruct", info, lo, hi, part),), raw=True)


def rows_per_step(op: TensorOp, chunk: int) -> int:
    """Whole rows per step of an op with a quantized input or output: about `chunk` elements, at least one row, a
    multiple of the codec's band of rows (a scale block's) when the output is encoded."""
    cols = op.numel // op.shape[0]
    band = codec_of(op.instruct).row_band(op.instruct) if op.quantized_out else 1
    per = max(1, chunk // max(1, cols))
    return max(band, per // band * band)


def step_elements(op: TensorOp, chunk: int) -> int:
    """The most elements of one input tensor a computed step of `op` reads."""
    if op.quantized:
        return rows_per_step(op, chunk) * (op.numel // op.shape[0])
    return chunk


def row_steps(op: TensorOp, chunk: int) -> Iterator[Step]:
    """An op with a quantized input or output in steps of whole rows (rows_per_step)."""
    i = op.instruct
    rows = i.shape[0]
    cols = op.numel // rows
    per = rows_per_step(op, chunk)
    for r0 in range(0, rows, per):
        lo, hi = r0 * cols, min(rows, r0 + per) * cols
        reads = reads_of("instruct", i, lo, hi)
        if op.grafted_numel:
            reads += delta_reads(op, lo, hi)
        yield Step(lo, hi, reads, grafted=hi if op.grafted_numel else lo)


def delta_reads(op: TensorOp, lo: int, hi: int) -> tuple[Read, ...]:
    """The reads a grafted range needs besides Instruct's: Base's (full deltas, DoRA), then each full delta's."""
    reads = reads_of("base", op.base, lo, hi) if op.reads_base else ()
    for t in op.terms:
        if t.tuned is not None:
            reads += reads_of(t.role, t.tuned, lo, hi)
    return reads


def reads_of(role: str, info, lo: int, hi: int) -> tuple[Read, ...]:
    """The reads of elements [lo, hi) of an input tensor: one, or for a quantized one (whole rows) those its codec
    lists for the rows (its weight's, then its companions': the scale grid's rows that cover them)."""
    if not isinstance(info, Quantized):
        return (read(role, info, lo, hi),)
    ranges = codec_of(info).row_reads(info, lo // info.cols, cdiv(hi, info.cols))
    return tuple(Read(role, part, first, stop, k) for k, (part, first, stop) in enumerate(ranges))


def read(role: str, info: TensorInfo | Pieces, lo: int, hi: int) -> Read:
    """The Read of elements [lo, hi) of `info`; of one of its parts for a tensor stored in pieces (the steps are
    cut at the parts' boundaries, so a range never spans two)."""
    if isinstance(info, Pieces):
        first, part = info.part(lo, hi)
        return Read(role, part, lo - first, hi - first)
    return Read(role, info, lo, hi)


def piece_bounds(op: TensorOp) -> list[int]:
    """Where the steps of `op` must be cut (its delta inputs' part boundaries), ascending; [] for most ops."""
    bounds = {
        first
        for info in (op.base, *(t.tuned for t in op.terms))
        if isinstance(info, Pieces)
        for first, _, _ in info.parts
    }
    return sorted(bounds - {0})


def ranges(numel: int, chunk: int, bounds: list[int]) -> Iterator[tuple[int, int]]:
    """[lo, hi) of at most `chunk` elements covering [0, numel), never across one of `bounds`."""
    edges = [0, *[b for b in bounds if 0 < b < numel], numel]
    for start, end in zip(edges, edges[1:]):
        for lo in range(start, end, chunk):
            yield lo, min(end, lo + chunk)


def block_steps(op: TensorOp, chunk: int) -> Iterator[Step]:
    """An op with a LoRA term, in blocks of about `chunk` elements of its [rows, cols] matrix (lora_update.
    matrix_shape): rows_per_block = chunk // cols, or one row cut into column ranges when a row alone is longer.
    A block never straddles `op.rows` (Instruct's extra vocabulary rows are copied), nor two experts of a fused
    expert tensor (each takes its own factor)."""
    i = op.instruct
    rows, cols = matrix_shape(i.shape)
    if cols == 0:
        return
    covered = op.rows * (rows // i.shape[0])  # op.rows counts rows of dim 0
    group = max((t.update.group for t in op.terms if t.update is not None), default=0) or rows
    per_block, col_step = max(1, chunk // cols), min(cols, chunk)
    if op.quantized:  # whole rows (whole block rows for an encoded output)
        per_block, col_step = rows_per_step(op, chunk), cols
    r0 = 0
    while r0 < rows:
        r1 = min(rows, r0 + per_block, covered if r0 < covered else rows, (r0 // group + 1) * group)
        for c0 in range(0, cols, col_step):
            c1 = min(cols, c0 + col_step)
            lo, hi = r0 * cols + c0, (r1 - 1) * cols + c1  # whole rows, or columns [c0, c1) of one row
            reads = reads_of("instruct", i, lo, hi)
            grafted = lo
            if r0 < covered:
                grafted = hi
                reads += delta_reads(op, lo, hi)
            yield Step(lo, hi, reads, grafted=grafted, block=(r0, r1, c0, c1))
        r0 = r1


def plan_reads(ops: list[TensorOp], role: str, steps, raw_bytes: int) -> Iterator[tuple[int, Read]]:
    """(index of the op in `ops`, Read) for every read of `role`, in the order the pass takes them; `steps(k, op,
    raw_bytes)` gives the steps of the k-th op."""
    for k, op in enumerate(ops):
        for step in steps(k, op, raw_bytes):
            for read in step.reads:
                if read.role == role:
                    yield k, read


def op_inputs(op: TensorOp) -> Iterator[tuple[str, TensorInfo]]:
    """(role, input tensor) of every tensor the steps of `op` read from (each part of one stored in pieces, the
    companions of a quantized one)."""
    inputs = [("instruct", op.instruct)]
    if op.grafted_numel:
        inputs += [("base", op.base)] if op.reads_base else []
        inputs += [(t.role, t.tuned) for t in op.terms if t.tuned is not None]
    for role, info in inputs:
        if isinstance(info, Pieces):
            yield from ((role, part) for _, _, part in info.parts)
        else:
            yield role, byte_view(info)
            if isinstance(info, Quantized):
                yield from ((role, part) for part in codec_of(info).parts(info)[1:])


def files_read(op: TensorOp) -> Iterator[tuple[str, str]]:
    """(role, shard file) of every input file the steps of `op` read from."""
    for role, info in op_inputs(op):
        yield role, info.file


def files_depended_on(op: TensorOp) -> Iterator[tuple[str, str]]:
    """(role, shard file) of every input file the output of `op` depends on: those its steps read, and the
    adapter files of its LoRA terms (their factors are read whole, not streamed)."""
    yield from files_read(op)
    for term in op.terms:
        u = term.update
        if u is not None:
            for info in (u.a, u.b, u.magnitude):
                if info is not None:
                    yield term.role, info.file
