"""Execute a Plan: stream every output shard step by step from the input streamer into a ShardWriter.

    for each output shard:                 ShardWriter(NAME.partial), header planned up front
        for each TensorOp, each step:       input streamer (readers.py): I, B, T1.. bytes in reusable buffers
                                            -> compute into a pooled output buffer
                                            -> writer thread: append (pwrite) + sha256
        finish: fsync, rename to NAME, record in graftcore.progress.json

Peak anonymous memory is a few buffers per input plus a few chunks (scratch + the output pool), whatever
the tensor or model size. The inputs are read at once by their own threads, because three concurrent
streams read 2-3x faster than one on the disks we measured (docs/architecture.md).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import interrupts
from .checkpoint import Checkpoint
from .errors import NonFiniteError
from .interrupts import POLL
from .options import parse_size
from .plan import Plan, TensorOp
from .readers import BUFFER_BYTES, DEPTH, WORKERS, Held, InputStreamer, read_elements
from .report import Progress, Report
from .safetensors_io import ShardWriter, itemsize, torch_dtype
from .steps import Step, files_depended_on, op_inputs, op_steps

POOL = 4  # output buffers in flight between the compute thread and the writer thread
SMALL_RAW = 256 << 10  # bytes: a tensor copied unchanged below this is packed with its neighbours into one write
DROP_BEHIND_FRACTION = 0.5  # drop consumed pages from the page cache when a pass moves more than this of RAM


class WriterThread:
    """Appends buffers to ShardWriters in order, off the compute thread (pwrite and sha256 release the GIL).

    Every wait on it polls (interrupts.POLL) and checks for Ctrl-C, so an interrupt never leaves the engine
    blocked on it; `close()` abandons what is queued and waits only for the write in hand.
    """

    def __init__(self, depth: int):
        self.jobs: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.busy = 0.0  # seconds spent writing and hashing
        self.abandoned = False
        self._pending = 0  # jobs queued and not yet done
        self._idle = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="graftcore-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while (job := self.jobs.get()) is not None:
            writer, data, ready, done = job
            try:
                if self.error is None and not self.abandoned:
                    t0 = time.perf_counter()
                    if ready is not None:
                        ready.synchronize()  # a GPU chunk: its copy back to the host has finished
                    writer.append(data)
                    self.busy += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - reported to the compute thread at its next put/drain
                self.error = e
            finally:
                done()
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def put(self, writer: ShardWriter, data, done: Callable[[], None], ready=None) -> None:
        """Queue `data` for `writer`; `done()` runs after it is written; `ready` is an event to wait for first."""
        self._check()
        with self._idle:
            self._pending += 1
        while True:
            try:
                self.jobs.put((writer, data, ready, done), timeout=POLL)
                return
            except queue.Full:
                try:
                    interrupts.check()
                    self._check()
                except BaseException:
                    with self._idle:
                        self._pending -= 1
                    raise

    def drain(self) -> None:
        """Wait until everything queued is written (raising the writer's error, or KeyboardInterrupt)."""
        with self._idle:
            while self._pending:
                self._idle.wait(POLL)
                interrupts.check()
                self._check()
        self._check()

    def _check(self):
        if self.error is not None:
            raise self.error

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the thread: what is still queued is skipped (after an error or an interrupt; after a drain
        nothing is). Waits at most `timeout` s for the write in hand; returns whether the thread is gone."""
        self.abandoned = True
        deadline = time.monotonic() + timeout
        sent = False
        while self.thread.is_alive() and time.monotonic() < deadline:
            if not sent:
                try:
                    self.jobs.put_nowait(None)
                    sent = True
                except queue.Full:  # the thread empties the queue quickly: it skips the writes now
                    pass
            self.thread.join(POLL)
        return not self.thread.is_alive()


class ChunkSink:
    """Where one output shard's bytes go: consecutive steps are computed into one pooled buffer until it is full,
    then the buffer is queued, in order, for the writer thread (so a shard of many small tensors costs a few
    large writes, not a write per tensor); the progress bar and the time breakdown are kept on the way."""

    def __init__(
        self, writer: ShardWriter, wt: WriterThread, pool: queue.Queue, capacity: int, bar, clock: dict[str, float]
    ):
        self.writer, self.wt, self.pool, self.bar, self.clock = writer, wt, pool, bar, clock
        self.capacity = capacity  # bytes of each pooled buffer
        self.buf: torch.Tensor | None = None  # the pooled buffer being filled
        self.used = 0  # bytes of it filled
        self.ready = None  # the last GPU event among its chunks (copies back run in order on one stream)

    def raw(self, held: Held) -> None:
        """Queue input bytes as they are (a tensor copied unchanged). A small piece is copied into the buffer being
        filled; a large one goes to the writer as it is, its read buffer released once written."""
        n = held.data.numel()
        if n <= min(SMALL_RAW, self.capacity):
            self._space(n, 1).copy_(held.data)
            held.release()
            self.used += n
        else:
            self.flush()
            self.wt.put(self.writer, held.data, held.release)
        self.bar.update(n)

    def chunk(self, n: int, dtype: str, fill: Callable[[torch.Tensor], object]) -> None:
        """Add `n` elements of `dtype` that `fill(out)` computes in place; `fill` returns the event the writer must
        wait for (GPU) or None."""
        size = itemsize(dtype)
        space = self._space(n * size, size)
        t1 = time.perf_counter()
        ready = fill(space.view(torch_dtype(dtype)))
        self.clock["compute"] += time.perf_counter() - t1
        self.ready = ready if ready is not None else self.ready
        self.used += n * size
        self.bar.update(n * size)

    def _space(self, nbytes: int, align: int) -> torch.Tensor:
        """`nbytes` of room in the buffer being filled (queuing it and taking a fresh one when it is full)."""
        if self.buf is not None and (self.used + nbytes > self.buf.numel() or self.used % align):
            self.flush()
        if self.buf is None:
            t0 = time.perf_counter()
            while True:
                try:
                    self.buf = self.pool.get(timeout=POLL)
                    break
                except queue.Empty:
                    interrupts.check()
                    self.wt._check()
            self.clock["wait_writer"] += time.perf_counter() - t0
        return self.buf[self.used : self.used + nbytes]

    def flush(self) -> None:
        """Queue the buffer being filled for the writer."""
        buf, used, ready = self.buf, self.used, self.ready
        self.buf, self.used, self.ready = None, 0, None
        if buf is not None and used:
            self.wt.put(self.writer, buf[:used], lambda: self.pool.put(buf), ready)
        elif buf is not None:
            self.pool.put(buf)


class ProgressBar:
    """The progress bar (tqdm, unless quiet) and the caller's progress callback, fed by the ChunkSink."""

    def __init__(self, total: int, quiet: bool, callback: Callable[[Progress], None] | None):
        self.bar = tqdm(
            total=total, unit="B", unit_scale=True, desc="graft", disable=True if quiet else None, leave=False
        )
        self.total, self.done, self.callback = total, 0, callback
        self.shard = self.tensor = ""

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        if self.callback is not None:
            self.callback(Progress(self.done, self.total, self.shard, self.tensor))

    def close(self) -> None:
        self.bar.close()


def execute(
    plan: Plan,
    checkpoints: dict[str, Checkpoint],
    output,
    folder,
    opts,
    compute,
    skip: set[str],
    progress: Callable[[Progress], None] | None = None,
) -> Report:
    """Write every shard of `plan` not in `skip` into the OutputFolder `folder`; returns the Report."""
    report = Report(Path(output), compute.name)
    t0 = time.perf_counter()
    shards = [s for s in plan.shards if s.file not in skip]
    report.shards_kept = len(plan.shards) - len(shards)
    ops = [op for s in shards for op in s.ops]
    todo = sum(op.out_nbytes for op in ops)
    drop = drop_behind(todo + sum(info.nbytes for op in ops for _, info in op_inputs(op)))
    buffer_bytes = parse_size(opts.read_buffer, "--read-buffer") if opts.read_buffer else BUFFER_BYTES
    streamer = InputStreamer(
        checkpoints,
        ops,
        compute.chunk,
        compute.pin_output,
        drop,
        buffer_bytes,
        opts.read_depth or DEPTH,
        opts.read_workers or WORKERS,
    )
    writer_thread = WriterThread(POOL)
    pool: queue.Queue = queue.Queue()
    for _ in range(POOL):
        pool.put(torch.empty(compute.chunk * 4, dtype=torch.uint8, pin_memory=compute.pin_output))
    bar = ProgressBar(todo, opts.quiet, progress)
    nonfinite_notes: list[str] = []
    clock = report.timings = {"compute": 0.0, "wait_input": 0.0, "wait_writer": 0.0, "write": 0.0, "fsync": 0.0}
    with compute:
        try:
            for shard in shards:
                writer = ShardWriter(folder.path / shard.file, shard.entries, shard.metadata, drop_behind=drop)
                sink = ChunkSink(writer, writer_thread, pool, compute.chunk * 4, bar, clock)
                try:
                    bar.shard = shard.file
                    for op in shard.ops:
                        bar.tensor = op.name
                        stream_op(op, streamer, sink, compute, opts, checkpoints)
                        if not compute.deferred:
                            check_finite(compute, shard, checkpoints, opts, nonfinite_notes)
                    check_finite(compute, shard, checkpoints, opts, nonfinite_notes)  # one device sync per shard
                    sink.flush()
                    t_drain = time.perf_counter()
                    writer_thread.drain()
                    check_inputs_unchanged(shard, checkpoints)  # before the shard takes its final name
                    t_fsync = time.perf_counter()
                    sha = writer.finish()
                    clock["wait_writer"] += t_fsync - t_drain
                    clock["fsync"] += time.perf_counter() - t_fsync
                except BaseException:
                    # the writer may still hold this file's descriptor: close it only once the thread is gone
                    writer.abort(close=writer_thread.close())
                    raise
                folder.shard_done(shard.file, writer.size, sha)
                report.shards_written += 1
                report.bytes_written += writer.size
        finally:
            writer_thread.close()
            streamer.close()
            bar.close()
            clock["write"] = writer_thread.busy
            clock["wait_input"] = streamer.waited()
            clock.update(streamer.timings())
            report.reads = streamer.bytes_read()
    report.count(plan)
    report.notes += nonfinite_notes
    report.seconds = time.perf_counter() - t0
    return report


def drop_behind(pass_bytes: int) -> bool:
    """Whether to drop consumed input and written output pages from the page cache: only when the pass moves
    more than DROP_BEHIND_FRACTION of the memory available, so a merge that fits leaves its inputs cached
    (a rerun reads them at memory speed) and one that does not never pushes the machine into reclaim."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return False
    return pass_bytes > DROP_BEHIND_FRACTION * available


def stream_op(op: TensorOp, streamer: InputStreamer, sink: ChunkSink, compute, opts, checkpoints) -> None:
    """Append the output bytes of one tensor to the shard, step by step (steps.py)."""
    loaded = load_lora(op, compute, checkpoints, opts) if op.low_rank else None
    for step in op_steps(op, compute.chunk, streamer.raw_bytes):
        interrupts.check()
        held = [streamer.take(r) for r in step.reads]
        if step.raw:
            sink.raw(held[0])
            continue
        try:
            sink.chunk(step.hi - step.lo, op.out_dtype, lambda out: compute_step(op, step, held, out, compute, loaded))
        finally:
            event = getattr(compute, "input_event", None)  # the GPU path may still be copying from the buffers
            for h in held:
                h.release(event)


def compute_step(op: TensorOp, step: Step, held: list[Held], out: torch.Tensor, compute, loaded):
    """Compute one step into `out`; returns the event the writer waits on (GPU) or None."""
    by_role = {read.role: h for read, h in zip(step.reads, held)}
    i = by_role["instruct"].tensor(op.instruct)
    g = step.grafted - step.lo  # elements computed from the update; the rest are Instruct's, copied
    if g == 0:
        return compute.convert(out, i)
    b = by_role["base"].tensor(op.base) if "base" in by_role else None
    if loaded is not None:
        return compute.block(out, i, b, block_terms(op, step.block, by_role, loaded), op.name)
    tuned = [by_role[t.role].tensor(t.tuned) for t in op.terms]
    ready = compute.graft(out[:g], i[:g], tuned, b, [t.alpha for t in op.terms], op.name)
    if g < step.hi - step.lo:  # Instruct's extra vocabulary rows begin inside this step
        compute.convert(out[g:], i[g:])
    return ready


def block_terms(op: TensorOp, block: tuple[int, int, int, int], by_role: dict[str, Held], loaded: dict) -> list:
    """The terms of one block of an op with LoRA terms: FullDelta / LowRankDelta over rows [r0, r1), columns
    [c0, c1)."""
    from .kernels.lora import FullDelta, LowRankDelta

    r0, r1, c0, c1 = block
    terms = []
    for term in op.terms:
        if term.update is None:
            terms.append(FullDelta(by_role[term.role].tensor(term.tuned), term.alpha))
            continue
        f = loaded[term.role]
        axis = term.update.dora_axis
        dora = None if f.dora_scale is None else f.dora_scale[r0:r1] if axis == "rows" else f.dora_scale[c0:c1]
        terms.append(LowRankDelta(f.left[r0:r1], f.right[:, c0:c1], f.scale, term.alpha, dora, axis))
    return terms


def check_inputs_unchanged(shard, checkpoints: dict[str, Checkpoint]) -> None:
    """CheckpointError if an input file this shard was computed from changed since its header was read."""
    for role, file in sorted({rf for op in shard.ops for rf in files_depended_on(op)}):
        checkpoints[role].verify_unchanged(file)


def check_finite(compute, shard, checkpoints: dict[str, Checkpoint], opts, notes: list[str]) -> None:
    """Raise NonFiniteError for the first tensor of `shard` with NaN/Inf in a delta or produced from finite inputs
    (unless allowed); NaN/Inf that Instruct itself holds and the merge carried through become notes."""
    counts = compute.nonfinite()
    for op in shard.ops:
        found = counts.get(op.name)
        if not found:
            continue
        if found.instruct:
            notes.append(
                f"{checkpoints['instruct'].locate(op.instruct.file)}: tensor {op.name!r}: {found.instruct} NaN/Inf "
                f"value(s) of Instruct carried into the output"
            )
        if opts.allow_nonfinite:
            continue
        if found.deltas:
            files = "; ".join(
                f"{t.role}: {checkpoints[t.role].locate(t.tuned.file)}" for t in op.terms if t.tuned is not None
            )
            raise NonFiniteError(
                f"{files or checkpoints['instruct'].locate(op.instruct.file)}: tensor {op.name!r}: {found.deltas} "
                "element(s) of tuned - base are NaN/Inf (base: "
                f"{checkpoints['base'].locate(op.base.file) if op.base else '-'}; "
                f"pass --allow-nonfinite to keep them)"
            )
        if found.overflow:
            raise NonFiniteError(
                f"{checkpoints['instruct'].locate(op.instruct.file)}: tensor {op.name!r}: {found.overflow} "
                "element(s) of "
                f"the result are NaN/Inf in {op.out_dtype} although every input is finite (a large alpha or delta "
                f"overflowed; --dtype float32 has more range; pass --allow-nonfinite to keep them)"
            )


def load_lora(op: TensorOp, compute, checkpoints: dict[str, Checkpoint], opts) -> dict:
    """The factors of each LoRA term of `op` in float32, by role, where the math runs (read whole: rank r is
    small); for DoRA, also magnitude / norm, from one pass over Base's rows read directly (the streamer then
    reads Base again for the merge)."""
    from .lora import dora_scale

    loaded = {}
    for term in op.terms:
        u = term.update
        if u is None:
            continue
        adapter = checkpoints[term.role]
        f = u.load(lambda info: read_elements(adapter.shard_path(info.file), info), opts.allow_nonfinite)
        if u.magnitude is not None:
            i, b = op.instruct, op.base
            cols = i.numel // max(1, i.shape[0])
            path = checkpoints["base"].shard_path(b.file)
            rows = lambda r0, r1: read_elements(path, b, r0 * cols, r1 * cols).view(r1 - r0, cols)  # noqa: E731
            f.dora_scale = dora_scale(f, rows, max(1, compute.chunk // cols), opts.allow_nonfinite)
        loaded[term.role] = compute.place(f)
    return loaded
