"""Execute a Plan: stream every output shard chunk by chunk from memory-mapped inputs into a ShardWriter.

    for each output shard:                 ShardWriter(NAME.partial), header planned up front
        for each TensorOp, each chunk:      mmap views of I, T, B  ->  compute into a pooled buffer
                                            -> writer thread: append (pwrite) + sha256
        finish: fsync, rename to NAME, record in graftcore.progress.json

Peak anonymous memory is a few chunks (scratch + the buffer pool), whatever the tensor or model size.
The inputs are read ahead with posix_fadvise(WILLNEED) on all three files at once, because three
concurrent streams read 3x faster than one on the disks we measured (DESIGN.md §4).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .errors import NonFiniteError
from .plan import Action, Plan, TensorOp
from .safetensors_io import ShardReader, ShardWriter, TensorInfo, itemsize, torch_dtype
from .sources import Checkpoint

READ_AHEAD = 256 << 20  # bytes advised ahead of the current position in each input file
COPY_BLOCK = 8 << 20  # bytes per write when a tensor is copied unchanged
POOL = 4  # output buffers in flight between the compute thread and the writer thread


@dataclass
class Report:
    """What a merge did: returned by `graftcore.graft`."""

    output: Path
    device: str
    grafted: int = 0
    grafted_rows: int = 0
    lora: int = 0
    copied: int = 0
    shards_written: int = 0
    shards_kept: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plan: object = None  # the Plan that was executed (or only described, for a dry run)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: compute, wait_writer, write, fsync

    def summary(self) -> str:
        rate = self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else 0.0
        parts = [f"{self.grafted} grafted"]
        if self.grafted_rows:
            parts.append(f"{self.grafted_rows} grafted on shared rows")
        if self.lora:
            parts.append(f"{self.lora} LoRA-merged")
        parts.append(f"{self.copied} copied")
        kept = f" ({self.shards_kept} kept from an earlier run)" if self.shards_kept else ""
        return (
            f"{self.output}: {', '.join(parts)} tensors; {self.shards_written + self.shards_kept} shard(s){kept}, "
            f"{self.bytes_written / 1e9:.2f} GB written in {self.seconds:.1f} s ({rate:.2f} GB/s, {self.device})"
        )


class ReadAheadThread:
    """Issues posix_fadvise(WILLNEED) for one input, off the compute thread.

    The call can block while the kernel queues the reads; on the compute thread that serialized the three
    inputs (cold merges ran at half the speed of three concurrent `cat`s). One thread per input keeps the
    three files reading at once and the compute thread never waits for a submission.
    """

    def __init__(self, role: str):
        self.requests: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name=f"graftcore-readahead-{role}", daemon=True).start()

    def _run(self):
        while (job := self.requests.get()) is not None:
            reader, start, length = job
            try:
                reader.will_need(start, length)
            except (OSError, ValueError):  # the file was closed meanwhile: nothing left to read ahead
                pass

    def advise(self, reader: ShardReader, start: int, length: int) -> None:
        self.requests.put((reader, start, length))

    def stop(self) -> None:
        self.requests.put(None)


class Readers:
    """Open memory maps of the input shards, opened on first use and closed after their last use."""

    def __init__(self, checkpoints: dict[str, Checkpoint], plan: Plan):
        self.checkpoints = checkpoints
        self.ahead = {role: ReadAheadThread(role) for role in checkpoints}
        self.open: dict[tuple[str, str], ShardReader] = {}
        self.advised: dict[tuple[str, str], int] = {}
        self.last_use: dict[tuple[str, str], int] = {}
        for k, op in enumerate(plan.ops):
            for key in self.keys(op):
                self.last_use[key] = k

    @staticmethod
    def keys(op: TensorOp):
        for role, info in (("instruct", op.instruct), ("tuned", op.tuned), ("base", op.base)):
            if role == "instruct" or (info is not None and op.action is not Action.COPY):
                yield role, info.file

    def get(self, role: str, info: TensorInfo) -> ShardReader:
        key = (role, info.file)
        if key not in self.open:
            self.open[key] = ShardReader(self.checkpoints[role].shard_path(info.file))
            self.advised[key] = 0
        return self.open[key]

    def read_ahead(self, role: str, info: TensorInfo, byte_pos: int) -> None:
        """Keep about READ_AHEAD bytes of the file ahead of `byte_pos` under way."""
        key = (role, info.file)
        reader = self.get(role, info)
        end = self.advised[key]
        if byte_pos > end or byte_pos < end - 2 * READ_AHEAD:  # first read, or a jump: start afresh
            end = byte_pos
        if byte_pos + READ_AHEAD // 2 > end:
            self.ahead[role].advise(reader, end, byte_pos + READ_AHEAD - end)
            self.advised[key] = byte_pos + READ_AHEAD

    def done_with(self, k: int, op: TensorOp) -> None:
        for key in self.keys(op):
            if self.last_use.get(key) == k and key in self.open:
                self.open.pop(key).close()
                self.checkpoints[key[0]].release(key[1])

    def close(self) -> None:
        for thread in self.ahead.values():
            thread.stop()
        for r in self.open.values():
            r.close()
        self.open.clear()


class WriterThread:
    """Appends buffers to ShardWriters in order, off the compute thread (pwrite and sha256 release the GIL)."""

    def __init__(self, depth: int):
        self.jobs: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.busy = 0.0  # seconds spent writing and hashing
        self.thread = threading.Thread(target=self._run, name="graftcore-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while (job := self.jobs.get()) is not None:
            writer, data, ready, done = job
            try:
                if self.error is None:
                    t0 = time.perf_counter()
                    if ready is not None:
                        ready.synchronize()  # a GPU chunk: its copy back to the host has finished
                    writer.append(data)
                    self.busy += time.perf_counter() - t0
            except BaseException as e:  # reported to the compute thread at its next put/drain
                self.error = e
            finally:
                done()
                self.jobs.task_done()
        self.jobs.task_done()

    def put(self, writer: ShardWriter, data, done: Callable[[], None], ready=None) -> None:
        """Queue `data` for `writer`; `done()` runs after it is written; `ready` is an event to wait for first."""
        self._check()
        self.jobs.put((writer, data, ready, done))

    def drain(self) -> None:
        self.jobs.join()
        self._check()

    def _check(self):
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()


class ChunkSink:
    """Where one output shard's bytes go: chunks are computed into pooled buffers and queued, in order, for
    the writer thread; the progress bar and the time breakdown are kept on the way."""

    def __init__(self, writer: ShardWriter, wt: WriterThread, pool: queue.Queue, bar, clock: dict[str, float]):
        self.writer, self.wt, self.pool, self.bar, self.clock = writer, wt, pool, bar, clock

    def raw(self, data: memoryview) -> None:
        """Queue bytes as they are (a tensor copied unchanged from a memory map)."""
        self.wt.put(self.writer, data, data.release)  # releasing lets the map go after the last use
        self.bar.update(data.nbytes)

    def chunk(self, n: int, dtype: str, fill: Callable[[torch.Tensor], object]) -> None:
        """Queue `n` elements of `dtype` that `fill(out)` computes into a pooled buffer; `fill` returns the
        event the writer waits on (GPU) or None."""
        size = itemsize(dtype)
        t0 = time.perf_counter()
        buf = self.pool.get()
        t1 = time.perf_counter()
        ready = fill(buf[: n * size].view(torch_dtype(dtype)))
        self.clock["wait_writer"] += t1 - t0
        self.clock["compute"] += time.perf_counter() - t1
        self.wt.put(self.writer, buf[: n * size], lambda: self.pool.put(buf), ready)
        self.bar.update(n * size)


class CpuCompute:
    """Chunked float32 math on the CPU into pooled output buffers (no allocation per chunk).

    Torch runs single-threaded while merging: the writer thread (pwrite + sha256) needs a core, and with
    OpenMP threads spin-waiting beside it a 2-core machine ran 2x slower than with one compute thread.
    """

    name = "cpu"
    pin_output = False
    deferred = False  # NaN/Inf counts are known as soon as a chunk is computed

    def __init__(self, chunk: int):
        from .kernels import CpuScratch

        self.chunk = chunk
        self.scratch = CpuScratch(chunk)
        self.counts: dict[str, int] = {}

    def __enter__(self):
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self._threads)

    def graft(self, out: torch.Tensor, i: torch.Tensor, t: torch.Tensor, b: torch.Tensor, alpha: float, name: str):
        """`out = I + alpha * (T - B)` now; returns None (nothing to wait for)."""
        from .kernels import graft_cpu

        bad = graft_cpu(out, i, t, b, alpha, self.scratch)
        if bad:
            self.counts[name] = self.counts.get(name, 0) + bad
        return None

    def convert(self, out: torch.Tensor, src: torch.Tensor):
        out.copy_(src)
        return None

    def nonfinite(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts

    def lora(self, out, i, update, r0: int, r1: int, alpha: float, c0: int = 0, c1: int | None = None, base=None):
        """`out = I + alpha * s * (left @ right)[r0:r1, c0:c1]` (or its DoRA form, given Base's block); `update`
        is a lora.LoadedUpdate; out, i and base hold the block's elements."""
        from .kernels.lora import dora_cpu, lora_cpu

        c1 = update.right.shape[1] if c1 is None else c1
        left, right = update.left[r0:r1], update.right[:, c0:c1]
        if update.dora_scale is None:
            lora_cpu(out, i, left, right, alpha * update.scale, self.scratch)
        else:
            axis = update.update.dora_axis
            scale = update.dora_scale[r0:r1] if axis == "rows" else update.dora_scale[c0:c1]
            dora_cpu(out, i, base, left, right, update.scale, scale, axis, alpha, self.scratch)
        return None  # nothing to wait for


def execute(
    plan: Plan,
    checkpoints: dict[str, Checkpoint],
    output,
    folder,
    opts,
    compute,
    skip: set[str],
) -> Report:
    """Write every shard of `plan` not in `skip` into the OutputFolder `folder`; returns the Report."""
    report = Report(Path(output), compute.name)
    t0 = time.perf_counter()
    readers = Readers(checkpoints, plan)
    writer_thread = WriterThread(POOL)
    pool: queue.Queue = queue.Queue()
    for _ in range(POOL):
        pool.put(torch.empty(compute.chunk * 4, dtype=torch.uint8, pin_memory=compute.pin_output))
    todo = sum(sum(op.out_nbytes for op in s.ops) for s in plan.shards if s.file not in skip)
    bar = tqdm(total=todo, unit="B", unit_scale=True, desc="graft", disable=True if opts.quiet else None, leave=False)
    clock = report.timings = {"compute": 0.0, "wait_writer": 0.0, "write": 0.0, "fsync": 0.0}
    with compute:
        k = -1
        try:
            for shard in plan.shards:
                if shard.file in skip:
                    report.shards_kept += 1
                    for op in shard.ops:
                        k += 1
                        readers.done_with(k, op)
                    continue
                writer = ShardWriter(folder.path / shard.file, shard.entries, shard.metadata)
                sink = ChunkSink(writer, writer_thread, pool, bar, clock)
                try:
                    for op in shard.ops:
                        k += 1
                        stream_op(op, readers, sink, compute, opts)
                        if not compute.deferred:
                            check_finite(compute, shard, readers.checkpoints, opts)
                        readers.done_with(k, op)
                    check_finite(compute, shard, readers.checkpoints, opts)  # one device sync per shard
                    t_drain = time.perf_counter()
                    writer_thread.drain()
                    t_fsync = time.perf_counter()
                    sha = writer.finish()
                    clock["wait_writer"] += t_fsync - t_drain
                    clock["fsync"] += time.perf_counter() - t_fsync
                except BaseException:
                    writer_thread.jobs.join()  # let in-flight buffers go before the partial file is deleted
                    writer.abort()
                    raise
                folder.shard_done(shard.file, writer.size, sha)
                report.shards_written += 1
                report.bytes_written += writer.size
        finally:
            writer_thread.stop()
            readers.close()
            bar.close()
            clock["write"] = writer_thread.busy
    for op in plan.ops:
        report.grafted += op.action is Action.GRAFT
        report.grafted_rows += op.action is Action.GRAFT_ROWS
        report.lora += op.action is Action.LORA
        report.copied += op.action is Action.COPY
    report.ignored = list(plan.ignored)
    report.notes = list(plan.notes)
    report.seconds = time.perf_counter() - t0
    return report


def stream_op(op: TensorOp, readers: Readers, sink: ChunkSink, compute, opts) -> None:
    """Append the output bytes of one tensor to the shard, chunk by chunk."""
    if op.action is Action.LORA:
        return stream_lora(op, readers, sink, compute, opts)
    i = op.instruct
    ireader = readers.get("instruct", i)
    if op.action is Action.COPY and op.out_dtype == i.dtype:
        for lo in range(i.start, i.end, COPY_BLOCK):
            readers.read_ahead("instruct", i, lo)
            sink.raw(ireader.bytes(lo, min(i.end, lo + COPY_BLOCK)))
        return
    grafted = op.grafted_numel
    iview = ireader.view(i)
    if grafted:
        tview, bview = readers.get("tuned", op.tuned).view(op.tuned), readers.get("base", op.base).view(op.base)

    def fill(out: torch.Tensor, lo: int, hi: int):
        readers.read_ahead("instruct", i, i.start + lo * itemsize(i.dtype))
        if lo >= grafted:
            return compute.convert(out, iview[lo:hi])
        g = min(hi, grafted)
        readers.read_ahead("tuned", op.tuned, op.tuned.start + lo * itemsize(op.tuned.dtype))
        readers.read_ahead("base", op.base, op.base.start + lo * itemsize(op.base.dtype))
        ready = compute.graft(out[: g - lo], iview[lo:g], tview[lo:g], bview[lo:g], opts.alpha, op.name)
        if g < hi:  # Instruct's extra vocabulary rows begin inside this chunk
            compute.convert(out[g - lo :], iview[g:hi])
        return ready

    for lo in range(0, op.numel, compute.chunk):
        hi = min(op.numel, lo + compute.chunk)
        sink.chunk(hi - lo, op.out_dtype, lambda out: fill(out, lo, hi))


def check_finite(compute, shard, checkpoints: dict[str, Checkpoint], opts) -> None:
    """Raise NonFiniteError for the first tensor of `shard` whose T - B held NaN/Inf (unless allowed)."""
    counts = compute.nonfinite()
    if not counts or opts.allow_nonfinite:
        return
    op = next(op for op in shard.ops if op.name in counts)
    raise NonFiniteError(
        f"{checkpoints['tuned'].locate(op.tuned.file)}: tensor {op.name!r}: {counts[op.name]} element(s) of "
        f"tuned - base are NaN/Inf (base: {checkpoints['base'].locate(op.base.file)}; pass --allow-nonfinite to keep them)"
    )


def stream_lora(op: TensorOp, readers: Readers, sink: ChunkSink, compute, opts) -> None:
    """Append `I + alpha * s * left @ right` for one tensor, over blocks of whole output rows (see lora.py).

    A block holds about `compute.chunk` elements: rows_per_block = chunk // cols, or one row cut into column
    ranges when a row alone is longer. The factors are read whole in float32 (rank r is small); for DoRA,
    Base is read twice: once for the weight norms, once for the merge.
    """
    from .lora import dora_scale

    i, u = op.instruct, op.update
    loaded = u.load(lambda info: readers.get("tuned", info).view(info), opts.allow_nonfinite)
    rows, cols = i.shape[0], i.numel // max(1, i.shape[0])
    per_block, col_step = max(1, compute.chunk // cols), min(cols, compute.chunk)
    iview = readers.get("instruct", i).view(i)
    bview = readers.get("base", op.base).view(op.base) if op.base is not None else None
    if u.magnitude is not None:
        loaded.dora_scale = dora_scale(loaded, lambda r0, r1: bview[r0 * cols : r1 * cols].view(r1 - r0, cols), per_block, opts.allow_nonfinite)

    def fill(out: torch.Tensor, r0: int, r1: int, c0: int, c1: int, lo: int, hi: int):
        readers.read_ahead("instruct", i, i.start + lo * itemsize(i.dtype))
        if r0 >= u.rows:  # Instruct's extra vocabulary rows: copied
            return compute.convert(out, iview[lo:hi])
        if bview is None:
            return compute.lora(out, iview[lo:hi], loaded, r0, r1, opts.alpha, c0, c1)
        readers.read_ahead("base", op.base, op.base.start + lo * itemsize(op.base.dtype))
        return compute.lora(out, iview[lo:hi], loaded, r0, r1, opts.alpha, c0, c1, base=bview[lo:hi])

    r0 = 0
    while r0 < rows:
        r1 = min(rows, r0 + per_block, u.rows if r0 < u.rows else rows)  # a block never straddles u.rows
        for c0 in range(0, cols, col_step):
            c1 = min(cols, c0 + col_step)
            lo, hi = r0 * cols + c0, (r1 - 1) * cols + c1  # whole rows, or columns [c0, c1) of one row
            sink.chunk(hi - lo, op.out_dtype, lambda out: fill(out, r0, r1, c0, c1, lo, hi))
        r0 = r1
