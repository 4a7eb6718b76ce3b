"""Similarity's side of the one streaming pass: every measured tensor's float64 sums, chunk by chunk.

The inputs are streamed as a merge streams them (stream/driver.run_pass: the same readers, buffers and memory bound);
each step's chunk goes to one of a few compute threads (ComputePool) and its sums are added to its tensor's
accumulator in step order, so the result does not depend on which thread computed what.

Numerics: each chunk is widened to float32 (rows X, B and D = X - B); per row, the sum of |x| and of x^2 are
taken in float32 blocks of 256 elements (an abs pass then block sums; a fused L2 norm per block, squared in
float64), and the block results are reduced in float64 (one float64 reduction per accumulator and chunk) into
float64 sums per tensor (ChunkMath). A row whose float32 squares overflow or underflow is summed in float64.
An adapter's `T - B` is its low-rank update `s * (B @ A)`, computed for the rows each chunk covers
(lowrank_into).

This module imports torch; analysis/similarity.py imports it only once the inputs are resolved and planned.

Example:
    >>> sums, reads, timings = measure(plan, checkpoints, ["instruct", "tuned"], MergeOptions())   # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import deque
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from graftcore import interrupts
from graftcore.interrupts import POLL
from graftcore.io.safetensors_file import itemsize
from graftcore.kernels import CHUNK
from graftcore.lora.update import matrix_shape
from graftcore.options import MergeOptions
from graftcore.shapes import cdiv
from graftcore.sources.checkpoint import Checkpoint
from graftcore.stream.codec_steps import decode
from graftcore.stream.driver import StepConsumer, input_bytes, run_pass
from graftcore.stream.readers import DEPTH, IO_THREADS, read_elements
from graftcore.stream.steps import op_inputs

if TYPE_CHECKING:
    from graftcore.analysis.similarity import MeasurePlan

BLOCK = 256  # float32 terms summed into one partial sum before the float64 reduction
# a block norm below this may have lost squares of |x| < 1.1e-19 (under float32's smallest normal 1.2e-38) by
# more than float32's precision: 256 such squares are < 3.1e-36, under 2^-24 of TINY_NORM^2 = 8.1e-28
TINY_NORM = 2.0**-45


class ChunkMath:
    """The accumulators of one chunk in a few passes over preallocated float32 rows.

    Rows of `x`: X_0 .. X_m-1 (Instruct, then each tuned input), B, then D_k = X_k - B. Per row, in float32
    blocks of BLOCK elements: the sum of |x| (one abs pass over all rows, then block sums) and the L2 norm (one
    fused square-and-add pass over all rows, squared afterwards); the block results are reduced in float64:
    [sum|X_k|.., sum|B|, sum|D_k|.., sum X_k^2.., sum B^2, sum D_k^2..]. sum X_k*B follows (measure.Sums.dot).
    """

    def __init__(self, chunk: int, m: int):
        self.m = m
        cap = cdiv(chunk, BLOCK) * BLOCK
        width = 1 + 2 * m
        self.x = torch.empty(width, cap)
        self.blocks = torch.empty(2 * width, cap // BLOCK)

    def rows(self, n: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(B's row, the X rows, the X - B rows), `n` elements each, for the caller to fill."""
        m = self.m
        return self.x[m, :n], [self.x[k, :n] for k in range(m)], [self.x[m + 1 + k, :n] for k in range(m)]

    def sums(self, n: int, diffs: list[int]) -> torch.Tensor:
        """The float64 sums of the first `n` elements, once B and the X rows are filled; `diffs`: the k whose
        X_k - B is computed here (the others were filled by the caller)."""
        m, width = self.m, 1 + 2 * self.m
        pad = cdiv(n, BLOCK) * BLOCK
        if pad > n:  # zeros add nothing to any sum
            self.x[:, n:pad].zero_()
        x = self.x[:, :pad]
        if len(diffs) == m:
            torch.sub(x[:m], x[m : m + 1], out=x[m + 1 :])
        else:
            for k in diffs:
                torch.sub(x[k], x[m], out=x[m + 1 + k])
        nb = pad // BLOCK
        blocks = self.blocks[:, :nb]
        abs_sums, norms = blocks[:width], blocks[width:]
        torch.linalg.vector_norm(x.view(width, nb, BLOCK), 2, dim=2, out=norms)
        torch.sum(x.abs_().view(width, nb, BLOCK), dim=2, out=abs_sums)  # the rows are refilled next chunk
        sums = torch.empty(2 * width, dtype=torch.float64)
        torch.sum(abs_sums, dim=1, dtype=torch.float64, out=sums[:width])
        torch.sum(norms.double().square_(), dim=1, out=sums[width:])  # a norm up to 3.4e38 squares in float64
        # float32 cannot hold every square: |x| > 1.8e19 overflows, |x| < 1e-19 underflows. A row with a non-finite
        # block, or a non-zero block whose norm is under TINY_NORM (where lost squares could matter), is summed
        # again in float64 (rare: trained weights lie far inside both bounds).
        suspect = (~torch.isfinite(blocks)).any(dim=1)
        suspect[width:] |= ((norms < TINY_NORM) & (abs_sums > 0)).any(dim=1)
        if bool(suspect.any()):
            for r in suspect.view(2, width).any(dim=0).nonzero().flatten().tolist():
                row = x[r, :n].double()  # |x|, finite wherever the input was
                sums[r] = row.sum()
                sums[width + r] = row.square_().sum()
        return sums


def lowrank_into(out: torch.Tensor, f, lo: int, hi: int, cols: int) -> None:
    """out = scale * (left @ right) of the loaded update `f` over the flat elements [lo, hi) of its [rows, cols]
    matrix, one expert's rows at a time for a fused expert tensor (each with its own right factor)."""
    span = f.update.group * cols  # the elements of one expert's rows; 0: one right factor for every row
    start = lo
    while start < hi:
        stop = min(hi, (start // span + 1) * span) if span else hi
        right = f.right_for(start // cols, (stop - 1) // cols + 1)
        rows_into(out[start - lo : stop - lo], f.left, right, start, stop, cols)
        start = stop
    out.mul_(f.scale)


def rows_into(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, lo: int, hi: int, cols: int) -> None:
    """out = left @ right over the flat elements [lo, hi) of the [rows, cols] product: the end of a row begun in an
    earlier chunk, whole rows, the start of a row the next chunk ends (each a float32 GEMM)."""
    r0, c0 = divmod(lo, cols)
    n, pos = hi - lo, 0
    if c0:
        c1 = min(cols, c0 + n)
        torch.mm(left[r0 : r0 + 1], right[:, c0:c1], out=out[: c1 - c0].view(1, c1 - c0))
        pos, r0 = c1 - c0, r0 + 1
    whole = (n - pos) // cols
    if whole:
        torch.mm(left[r0 : r0 + whole], right, out=out[pos : pos + whole * cols].view(whole, cols))
        pos, r0 = pos + whole * cols, r0 + whole
    if pos < n:
        torch.mm(left[r0 : r0 + 1], right[:, : n - pos], out=out[pos:n].view(1, n - pos))


def measure(plan: MeasurePlan, checkpoints: dict[str, Checkpoint], roles: list[str], opts: MergeOptions):
    """Stream every op of `plan` (stream/driver.run_pass) into the compute threads; return (each tensor's float64
    sums in plan order, in the order ChunkMath.sums gives them; bytes read per input; seconds)."""
    ops = [m.op for m in plan.measured]
    chunk = opts.chunk_size or CHUNK
    total = input_bytes(ops)
    consumer = SimilarityConsumer(plan, checkpoints, chunk, len(roles), opts)
    t0 = time.perf_counter()
    try:
        with interrupts.deferred():
            stats = run_pass(
                [("", ops)],
                checkpoints,
                opts,
                consumer,
                chunk=chunk,
                total=total,
                label="similarity",
                scratch=Path(tempfile.gettempdir()) / "graftcore-downloads",  # --low-disk is not a similarity option
                extra_depth=1,  # the steps in flight in the ComputePool hold their read buffers
            )
    finally:
        consumer.close()
    timings = {
        "stream": time.perf_counter() - t0,
        "wait_input": stats.waited,
        "wait_compute": consumer.pool.waited,
        **stats.timings,
    }
    return [acc.tolist() for acc in consumer.accs], stats.reads, timings


class SimilarityConsumer(StepConsumer):
    """Similarity's side of the pass: the steps of each measured tensor handed to the ComputePool `per_task` at a
    time; each tensor's float64 accumulator is complete once the pool is drained (drain_group)."""

    def __init__(self, plan: MeasurePlan, checkpoints, chunk: int, m: int, opts: MergeOptions):
        self.checkpoints, self.chunk, self.opts = checkpoints, chunk, opts
        self.ops = [m.op for m in plan.measured]
        self.measured = iter(plan.measured)
        self.pool = ComputePool(COMPUTE_THREADS, chunk, m)
        self.accs: list[torch.Tensor] = []
        self.per_task = STEPS_PER_TASK

    def begin_pass(self, streamer) -> None:
        # The steps taken but not yet handed over pin their read buffers: they must span fewer buffers than a
        # reader's ring holds, or the next take() would wait for one only the pool can free.
        opts, chunk = self.opts, self.chunk
        depth = max(opts.read_depth or DEPTH + 1, (opts.read_workers or IO_THREADS) + 1)
        largest = max(min(info.numel, chunk) * itemsize(info.dtype) for op in self.ops for _, info in op_inputs(op))
        self.per_task = next(
            s
            for s in range(STEPS_PER_TASK, 0, -1)
            if s == 1 or min(s, cdiv(s * largest, streamer.raw_bytes) + 1) <= depth - 1
        )

    def begin_op(self, op) -> None:
        m = self.m = next(self.measured)
        assert m.op is op
        self.loaded = {}
        for role, how, u in m.sources:
            if how == "lowrank":
                ck = self.checkpoints[role]
                self.loaded[role] = u.load(
                    lambda info, ck=ck: read_elements(ck.shard_path(info.file), info), allow_nonfinite=True
                )
        self.acc = torch.zeros(2 + 4 * self.pool.m, dtype=torch.float64)  # ChunkMath.sums: 2 * (1 + 2m)
        self.accs.append(self.acc)
        self.cols = matrix_shape(op.shape)[1] or 1
        self.diffs = [0] + [k for k, (_, how, _) in enumerate(m.sources, start=1) if how == "full"]  # X - B to compute
        self.batch: list = []

    def step(self, op, step, held) -> int:
        self.batch.append((step, held))
        if len(self.batch) == self.per_task:
            self._submit()
        return sum(r.end_byte - r.start_byte for r in step.reads)

    def end_op(self, op) -> None:
        if self.batch:
            self._submit()

    def _submit(self) -> None:
        self.pool.submit(self.acc, measure_steps, self.m.sources, self.batch, self.loaded, self.cols, self.diffs)
        self.batch = []

    def drain_group(self) -> None:
        self.pool.drain()

    def close(self) -> None:
        self.pool.close()


COMPUTE_THREADS = min(4, os.cpu_count() or 1)  # torch releases the GIL inside each op: chunks compute in parallel


class ComputePool:
    """Chunks computed on a few threads, each with its own ChunkMath; each task's float64 sums (a few consecutive
    steps of one tensor, added in step order) are added to its tensor's accumulator by the main thread in
    submission order, so the sums do not depend on which thread computed what. At most `threads + 1` tasks are
    in flight (each holds its reads' buffers until computed)."""

    def __init__(self, threads: int, chunk: int, m: int):
        self.chunk, self.m = chunk, m
        self.local = threading.local()
        self.executor = futures.ThreadPoolExecutor(threads, thread_name_prefix="graftcore-similarity")
        self.pending: deque = deque()
        self.limit = threads + 1
        self.waited = 0.0  # seconds the main thread waited for a chunk to be computed

    def math(self) -> ChunkMath:
        """This thread's ChunkMath."""
        math_ = getattr(self.local, "math", None)
        if math_ is None:
            math_ = self.local.math = ChunkMath(self.chunk, self.m)
        return math_

    def submit(self, acc: torch.Tensor, fn, *args) -> None:
        """Compute `fn(self.math(), *args)` (float64 sums) on a thread; add it to `acc` in submission order."""
        self.pending.append((self.executor.submit(lambda: fn(self.math(), *args)), acc))
        while len(self.pending) > self.limit:
            self._collect()

    def _collect(self) -> None:
        done, acc = self.pending.popleft()
        t0 = time.perf_counter()
        while True:
            try:
                sums = done.result(timeout=POLL)
                break
            except futures.TimeoutError:
                interrupts.check()
        self.waited += time.perf_counter() - t0
        acc += sums

    def drain(self) -> None:
        while self.pending:
            self._collect()

    def close(self) -> None:
        """Wait for the chunks being computed (they release their buffers); drop the others."""
        self.executor.shutdown(wait=True, cancel_futures=True)


STEPS_PER_TASK = 4  # steps handed to a compute thread at once (at most): fewer thread hand-offs per byte


def measure_steps(math_: ChunkMath, sources, batch: list, loaded: dict, cols: int, diffs: list[int]) -> torch.Tensor:
    """The float64 sums of a few consecutive steps of one tensor (on a compute thread), added in step order;
    each step's read buffers are released once it is computed."""
    total = None
    for k, (step, held) in enumerate(batch):
        try:
            sums = measure_step(math_, sources, step, held, loaded, cols, diffs)
        except BaseException:
            for _, later in batch[k + 1 :]:
                for h in later:
                    h.release()
            raise
        total = sums if total is None else total.add_(sums)
    return total


def measure_step(math_: ChunkMath, sources, step, held, loaded: dict, cols: int, diffs: list[int]) -> torch.Tensor:
    """The float64 sums of one step; releases the step's read buffers."""
    try:
        views, _ = decode(step, held)  # quantized inputs decoded by their codecs
        n = step.hi - step.lo
        b, xs, ds = math_.rows(n)
        b.copy_(views["base"])
        xs[0].copy_(views["instruct"])
        for k, (role, how, _) in enumerate(sources, start=1):
            if how == "full":
                xs[k].copy_(views[role])
                continue
            if how == "lowrank":
                f = loaded[role]
                lowrank_into(ds[k], f, step.lo, step.hi, cols)
            else:
                ds[k].zero_()
            torch.add(b, ds[k], out=xs[k])
        return math_.sums(n, diffs)
    finally:
        for h in held:
            h.release()
