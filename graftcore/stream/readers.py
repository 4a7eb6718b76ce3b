"""The input streamer: ordered, bounded, concurrent reads of the input files into reusable buffers.

One thread per input (Base, tuned, Instruct) walks the plan's reads of that input (steps.plan_reads) in the
order the engine will take them, packs them into a small ring of buffers allocated once (pinned when the
compute is on CUDA, so host-to-device copies start straight from them), and hands each buffer to one of
IO_THREADS I/O threads:

    reader thread (per input):  the next reads that fit one buffer; adjacent ranges become one run
    I/O threads (per input):    each run read with O_DIRECT, or copied from the page cache where it is
                                already there (input_file.py); DONTNEED behind when the pass is out of core
    compute thread:             take(read) -> a view of those bytes in a buffer; release() when done with it

Why not mmap: a cold pass through memory maps stalls the compute thread in page faults (inputs read at a
third of the disk's rate on a 27 GB trio), and a file truncated under a map kills the process with SIGBUS.
Explicit reads keep several requests per input in flight, and a file that shrinks is an EOF naming it.

Memory is `depth` buffers per input, whatever the model size. Every input file is checked against the
identity recorded when its header was read, when it is opened and when it is closed, so a file replaced
or rewritten during the merge stops it instead of mixing two versions into one output.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent import futures

import torch

from graftcore import interrupts
from graftcore.interrupts import POLL
from graftcore.io.input_file import BLOCK, InputFile, read_exactly
from graftcore.io.safetensors_file import TensorInfo, itemsize, torch_dtype_or_none
from graftcore.shapes import cdiv
from graftcore.stream.steps import Read

BUFFER_BYTES = 4 << 20  # per buffer: large sequential reads, few syscalls
DEPTH = 3  # buffers per input: IO_THREADS being read, one being consumed (4 bought no time we could measure)
IO_THREADS = 2  # concurrent preadv calls per input: O_DIRECT has no kernel read-ahead, so the depth is ours
READ_AHEAD = 64 << 20  # bytes advised ahead (WILLNEED) where reads are buffered (no O_DIRECT on that filesystem)


class Stopped(Exception):
    """The merge is being abandoned (an error elsewhere, or an interrupt): readers exit quietly."""


class Held:
    """One read's bytes in a ring buffer; `release()` gives the space back (after `event`, a GPU copy, if any)."""

    __slots__ = ("data", "_buffer")

    def __init__(self, data: torch.Tensor, buffer: _Buffer):
        self.data = data  # uint8
        self._buffer = buffer

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        """The bytes as a flat tensor of `info`'s dtype (uint8 for dtypes torch lacks)."""
        dtype = torch_dtype_or_none(info.dtype)
        if dtype is None or not self.data.numel():
            return self.data
        if self.data.data_ptr() % dtype.itemsize:  # the tensor is misaligned in its file: copy it aligned
            return self.data.clone().view(dtype)
        return self.data.view(dtype)

    def release(self, event=None) -> None:
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            buffer.release(event)


class _Buffer:
    """A reusable buffer and the count of its reads not yet released."""

    def __init__(self, nbytes: int, pin: bool, free: queue.Queue):
        # BLOCK-aligned (for O_DIRECT), with two blocks of room for the aligned range around a run
        raw = torch.empty(nbytes + 3 * BLOCK, dtype=torch.uint8, pin_memory=pin)
        skip = -raw.data_ptr() % BLOCK
        self.data = raw[skip : skip + nbytes + 2 * BLOCK]
        self.view = memoryview(self.data.numpy())
        self.free = free
        self.lock = threading.Lock()
        self.pending = 0
        self.events: list = []

    def release(self, event) -> None:
        with self.lock:
            if event is not None:
                self.events.append(event)
            self.pending -= 1
            if self.pending == 0:
                self.free.put(self)

    def wait_events(self) -> None:
        """Before the buffer is refilled: GPU copies that read from it have finished."""
        for e in self.events:
            e.synchronize()
        self.events.clear()


class RoleReader:
    """Reads one input's ranges in plan order on a thread of its own; the engine takes them in the same order."""

    def __init__(
        self,
        role: str,
        checkpoint,
        reads: Iterator[tuple[int, Read]],
        last_use: dict[str, int],
        buffer_bytes: int,
        depth: int,
        pin: bool,
        drop_behind: bool,
        io_threads: int = IO_THREADS,
    ):
        self.role, self.checkpoint, self.reads = role, checkpoint, reads
        self.last_use = last_use  # shard file -> index of the last op reading it
        self.buffer_bytes, self.drop_behind = buffer_bytes, drop_behind
        self.free: queue.Queue = queue.Queue()
        self.ready: queue.Queue = queue.Queue()
        self.buffers = [_Buffer(buffer_bytes, pin, self.free) for _ in range(depth)]
        for b in self.buffers:
            self.free.put(b)
        self.stop = threading.Event()
        self.disk_seconds = 0.0  # in preadv (all I/O threads together): waiting on the disk, or copying from the cache
        self.bytes_direct = self.bytes_cached = 0  # read with O_DIRECT / copied from the page cache
        self._stats = threading.Lock()
        self.waited = 0.0  # seconds the engine waited in take() for this input
        self._files: dict[str, InputFile] = {}
        self._advised: dict[str, tuple[int, int]] = {}  # file -> advised byte range [start, end)
        self._ahead: deque[tuple[int, Read]] = deque()  # reads looked at for read-ahead, not yet read
        self._current: tuple[_Buffer, list[tuple[Read, int]]] | None = None
        self._in_flight: list[futures.Future] = []
        self.io = futures.ThreadPoolExecutor(io_threads, thread_name_prefix=f"graftcore-read-{role}")
        self._taken = 0
        self.thread = threading.Thread(target=self._run, name=f"graftcore-read-{role}", daemon=True)
        self.thread.start()

    # ---- the reader thread ----
    def _next(self) -> tuple[int, Read] | None:
        return self._ahead.popleft() if self._ahead else next(self.reads, None)

    def _run(self) -> None:
        try:
            pending = self._next()
            while pending is not None:
                buffer = self._get_free()
                batch: list[tuple[Read, int]] = []
                fill, last_op, prev = 0, -1, None
                while pending is not None:
                    op, read = pending
                    n = read.end_byte - read.start_byte
                    # A run of adjacent ranges stays contiguous (one preadv). A new run starts in a block of its
                    # own, at the offset its file offset has in its block: O_DIRECT reads the aligned blocks around
                    # it, and every tensor is as aligned in the buffer as in its file.
                    adjacent = (
                        prev is not None and prev.info.file == read.info.file and prev.end_byte == read.start_byte
                    )
                    at = fill if adjacent else cdiv(fill, BLOCK) * BLOCK + read.start_byte % BLOCK
                    if batch and (at + n > self.buffer_bytes or not self._can_open(read.info.file)):
                        break  # full, or the next file is still downloading: hand over what is here first
                    if at + n > len(buffer.view) - BLOCK:
                        raise RuntimeError(f"a read of {n} bytes exceeds the {self.buffer_bytes}-byte buffer")
                    batch.append((read, at))
                    fill, prev, last_op = at + n, read, op
                    pending = self._next()
                self._read_ahead()
                buffer.pending = len(batch)
                for read, _ in batch:
                    self._file(read.info.file)  # opened here, in order (a hub input may wait for its download)
                done = self.io.submit(self._fill, buffer, batch)  # up to `io_threads` batches in flight at once
                self._in_flight.append(done)
                self.ready.put((buffer, batch, done))
                self._close_finished(last_op, pending[0] if pending is not None else None)
            self.ready.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the engine at its next take()
            self.ready.put(None if isinstance(e, Stopped) else e)
        finally:
            futures.wait(self._in_flight)  # never cancelled: the engine may still take those batches, then the error
            for f in self._files.values():
                f.close()
            self._files.clear()
            self.io.shutdown(wait=False)

    def _get_free(self) -> _Buffer:
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                buffer = self.free.get(timeout=POLL)
            except queue.Empty:
                continue
            buffer.wait_events()
            return buffer

    def _can_open(self, file: str) -> bool:
        return file in self._files or self.checkpoint.ready(file)

    def _file(self, file: str) -> InputFile:
        f = self._files.get(file)
        if f is None:
            path = self.checkpoint.shard_path(file)  # a hub input waits here for its download
            f = self._files[file] = InputFile(path, self.checkpoint.locate(file))
            self.checkpoint.check_unchanged(file, os.fstat(f.fd), "when opened for reading")
        return f

    def _fill(self, buffer: _Buffer, batch: list[tuple[Read, int]]) -> None:
        """preadv every read of `batch` into `buffer`, one call per run of adjacent ranges of one file (on an I/O
        worker; the files were opened by the reader thread)."""
        j = 0
        while j < len(batch):
            read, offset = batch[j]
            start, end, last = read.start_byte, read.end_byte, j
            while last + 1 < len(batch):
                nxt, at = batch[last + 1]
                if nxt.info.file != read.info.file or nxt.start_byte != end or at != offset + end - start:
                    break
                end = nxt.end_byte
                last += 1
            t0 = time.perf_counter()
            direct = self._files[read.info.file].read_run(
                buffer.view, offset, start, end, batch[last][0].info.name, self.drop_behind
            )
            with self._stats:  # the I/O threads run this concurrently
                self.disk_seconds += time.perf_counter() - t0
                if direct:
                    self.bytes_direct += end - start
                else:
                    self.bytes_cached += end - start
            j = last + 1

    def _read_ahead(self) -> None:
        """Advise the kernel to read the next READ_AHEAD bytes of this input's reads (WILLNEED is asynchronous,
        so the disk queue stays full while this thread copies and the engine computes)."""
        budget, j = READ_AHEAD, 0
        while budget > 0:
            if j == len(self._ahead):
                nxt = next(self.reads, None)
                if nxt is None:
                    break
                self._ahead.append(nxt)
            read = self._ahead[j][1]
            j += 1
            budget -= read.end_byte - read.start_byte
            if not self._can_open(read.info.file):
                continue  # a hub shard still downloading: advising it would wait for the download
            lo, hi = self._advised.get(read.info.file, (0, 0))
            if lo <= read.start_byte and read.end_byte <= hi:
                continue
            start = max(read.start_byte, hi) if lo <= read.start_byte <= hi else read.start_byte
            end = max(read.end_byte, start + READ_AHEAD // 4)  # advise in large runs, not read by read
            self._file(read.info.file).will_need(start, end - start)
            self._advised[read.info.file] = (start if not lo <= start <= hi else lo, end)

    def _close_finished(self, op_done: int, next_op: int | None) -> None:
        """Close (and release, for --low-disk hub inputs) the files whose last reading op is behind us."""
        self._in_flight = [d for d in self._in_flight if not d.done()]
        for file, last in list(self.last_use.items()):
            if file in self._files and last <= op_done and (next_op is None or last < next_op):
                futures.wait(self._in_flight)  # its last reads may still be under way (rare: once per file)
                f = self._files.pop(file)
                self.checkpoint.check_unchanged(file, f.close(), "while it was being read")
                self.checkpoint.release(file)

    # ---- the engine's side ----
    def take(self, read: Read) -> Held:
        """The bytes of `read` (the next read of this input in plan order)."""
        while self._current is None or self._taken == len(self._current[1]):
            t0 = time.perf_counter()
            try:
                item = self.ready.get(timeout=POLL)
            except queue.Empty:
                interrupts.check()
                continue
            finally:
                self.waited += time.perf_counter() - t0
            if isinstance(item, BaseException):
                raise item
            if item is None:
                raise RuntimeError(f"{self.role}: the reader ended before the engine's read of {read.info.name!r}")
            self._wait_for(item[2])
            self._current, self._taken = item[:2], 0
        buffer, batch = self._current
        got, offset = batch[self._taken]
        self._taken += 1
        if got != read:
            raise RuntimeError(f"{self.role}: reader and engine disagree on the order of reads: {got} != {read}")
        return Held(buffer.data[offset : offset + read.end_byte - read.start_byte], buffer)

    def _wait_for(self, done: futures.Future) -> None:
        """Wait for a batch's reads (raising their error), measured as the engine waiting for input."""
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    done.result(timeout=POLL)
                    return
                except futures.TimeoutError:
                    interrupts.check()
        finally:
            self.waited += time.perf_counter() - t0

    def close(self) -> None:
        """Stop the thread. It finishes its current preadv; one waiting for a hub download is left behind (a
        daemon; the download is cancelled at exit)."""
        self.stop.set()
        self.thread.join(timeout=5)


class InputStreamer:
    """One RoleReader per input that the plan reads; `take(read)` in plan order, `close()` at the end."""

    def __init__(
        self,
        checkpoints: dict,
        ops: list,
        chunk: int,
        pin: bool,
        drop_behind: bool,
        buffer_bytes: int = BUFFER_BYTES,
        depth: int = DEPTH,
        io_threads: int = IO_THREADS,
        steps=None,
    ):
        """Start reading the inputs of `ops` (in execution order) for steps of `chunk` elements; `pin` the
        buffers for CUDA copies; `drop_behind` consumed pages from the page cache. `steps(k, op, raw_bytes)`:
        the steps of the k-th op that are taken (default: all, steps.op_steps)."""
        from graftcore.stream.steps import op_inputs, op_steps, plan_reads

        last_use: dict[str, dict[str, int]] = {}
        for k, op in enumerate(ops):
            for role, info in op_inputs(op):
                last_use.setdefault(role, {})[info.file] = k
        self.drop_behind = drop_behind  # the pass's decision: its consumers' writers follow it
        self.raw_bytes = buffer_bytes = raw_step_bytes(ops, chunk, buffer_bytes)
        steps = steps or (lambda k, op, raw: op_steps(op, chunk, raw))
        self.readers: dict[str, RoleReader] = {}
        try:
            for role, files in last_use.items():
                self.readers[role] = RoleReader(
                    role,
                    checkpoints[role],
                    plan_reads(ops, role, steps, buffer_bytes),
                    files,
                    buffer_bytes,
                    max(depth, io_threads + 1),
                    pin,
                    drop_behind,
                    io_threads,
                )
        except BaseException:  # e.g. no memory for the next reader's buffers: stop the ones already reading
            self.close()
            raise

    def take(self, read: Read) -> Held:
        return self.readers[read.role].take(read)

    def waited(self) -> float:
        """Seconds the engine waited for input, all inputs together."""
        return sum(r.waited for r in self.readers.values())

    def bytes_read(self) -> dict[str, dict[str, int]]:
        """Per input: bytes read from the disk with O_DIRECT, and bytes copied from the page cache."""
        return {role: {"direct": r.bytes_direct, "page_cache": r.bytes_cached} for role, r in self.readers.items()}

    def timings(self) -> dict[str, float]:
        """Seconds each reader spent in preadv (waiting on the disk, or copying from the page cache)."""
        return {f"read_{role}": r.disk_seconds for role, r in self.readers.items()}

    def close(self) -> None:
        """Stop every reader (each finishes the read in hand; at most a few seconds in all)."""
        for r in self.readers.values():
            r.stop.set()
        for r in self.readers.values():
            r.close()


def raw_step_bytes(ops: list, chunk: int, buffer_bytes: int) -> int:
    """The bytes of a read buffer, and of a step that copies a tensor as it is: `buffer_bytes`, or more if a
    computed step (at most `chunk` elements of one input tensor) needs more."""
    from graftcore.stream.steps import op_inputs, step_elements

    largest = max(
        (min(info.numel, step_elements(op, chunk)) * itemsize(info.dtype) for op in ops for _, info in op_inputs(op)),
        default=0,
    )
    return max(buffer_bytes, largest)


def read_elements(path, info: TensorInfo, first: int = 0, stop: int | None = None) -> torch.Tensor:
    """Elements [first, stop) of tensor `info` of the file at `path`, read into a new tensor (small reads:
    LoRA factors, DoRA's pass over Base)."""
    stop = info.numel if stop is None else stop
    size = itemsize(info.dtype)
    out = torch.empty((stop - first) * size, dtype=torch.uint8)
    if out.numel():
        with open(path, "rb", buffering=0) as f:
            read_exactly(
                f.fileno(), memoryview(out.numpy()), info.start + first * size, out.numel(), str(path), info.name
            )
    dtype = torch_dtype_or_none(info.dtype)
    return out.view(dtype) if dtype is not None and out.numel() else out
