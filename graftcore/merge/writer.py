"""The merge's writer side: the writer thread that appends pooled output buffers to ShardWriters off the compute
thread, and the ChunkSink that packs consecutive steps of one shard into those buffers.

Example:
    >>> wt = WriterThread(depth=4)                                        # doctest: +SKIP
    >>> sink = ChunkSink(ShardWriter(path, entries, None), wt, pool, capacity, clock)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch

from graftcore import interrupts
from graftcore.interrupts import POLL
from graftcore.io.safetensors_file import ShardWriter, itemsize, torch_dtype
from graftcore.stream.readers import Held

SMALL_RAW = 256 << 10  # bytes: a tensor copied unchanged below this is packed with its neighbours into one write


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
    large writes, not a write per tensor); the time breakdown is kept on the way."""

    def __init__(
        self, writer: ShardWriter, wt: WriterThread, pool: queue.Queue, capacity: int, clock: dict[str, float]
    ):
        self.writer, self.wt, self.pool, self.clock = writer, wt, pool, clock
        self.capacity = capacity  # bytes of each pooled buffer
        self.buf: torch.Tensor | None = None  # the pooled buffer being filled
        self.used = 0  # bytes of it filled
        self.ready = None  # the last GPU event among its chunks (copies back run in order on one stream)

    def raw(self, held: Held) -> int:
        """Queue input bytes as they are (a tensor copied unchanged); returns their count. A small piece is copied
        into the buffer being filled; a large one goes to the writer as it is, its read buffer released once
        written."""
        n = held.data.numel()
        if n <= min(SMALL_RAW, self.capacity):
            self._space(n, 1).copy_(held.data)
            held.release()
            self.used += n
        else:
            self.flush()
            self.wt.put(self.writer, held.data, held.release)
        return n

    def chunk(self, n: int, dtype: str, fill: Callable[[torch.Tensor], object]) -> int:
        """Add `n` elements of `dtype` that `fill(out)` computes in place (`fill` returns the event the writer
        must wait for, on a GPU, or None); returns their bytes."""
        size = itemsize(dtype)
        space = self._space(n * size, size)
        t1 = time.perf_counter()
        ready = fill(space.view(torch_dtype(dtype)))
        self.clock["compute"] += time.perf_counter() - t1
        self.ready = ready if ready is not None else self.ready
        self.used += n * size
        return n * size

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
