"""The GPU streaming compute: the input streamer's pinned read buffers -> GPU (copy stream) -> Triton kernel
(compute stream) -> pinned output buffer (copy-back stream) -> the writer thread.

    chunk n:   pinned read buffers (or a copy into slot n%S) ── H2D ──► kernel ──► D2H into a pool buffer
    chunk n+1:                 (overlaps: the CPU fills the next slot while the GPU works on this one)

Each of the S staging slots owns pinned input buffers and device buffers; events order their reuse:
the engine hands read buffers back to the streamer with the H2D's event (the reader waits for it before
refilling them), the host waits for a slot's H2D before refilling its pinned staging buffers, the H2D waits for
the kernel that last read the slot's device inputs, and the kernel waits for the D2H that last read its output. The
writer thread waits for a chunk's D2H event before writing it. NaN/Inf counts stay on the device, one
counter per tensor, read once per shard, so the pipeline never drains per chunk.

With a CPU device (tests, under TRITON_INTERPRET=1) the same code runs with null streams and events.
"""

from __future__ import annotations

import contextlib

import torch

GPU_CHUNK = 1 << 22  # elements: 16 MiB of float32 per buffer; large transfers reach full PCIe bandwidth
SLOTS = 2  # double-buffered staging


@contextlib.contextmanager
def full_float32_matmul():
    """The LoRA GEMM in full float32 on CUDA whatever the calling program chose: TF32 (on by torch's
    `set_float32_matmul_precision("high")`) would round the factors to 10 mantissa bits."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


class _NullStream:
    """Stands in for torch.cuda.Stream on a CPU device: everything is already synchronous."""

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Slot:
    def __init__(self, chunk: int, device: torch.device, pin: bool):
        self.chunk, self.device, self.pin = chunk, device, pin
        self.pinned: list[torch.Tensor] = []  # I, B, T1, T2, ... staging (bytes, viewed per dtype)
        self.inputs: list[torch.Tensor] = []
        self.out = torch.empty(chunk * 4, dtype=torch.uint8, device=device)
        self.h2d_done = self.kernel_done = self.d2h_done = None

    def reserve(self, n: int) -> None:
        """Staging and device buffers for `n` inputs (allocated on first need: 2 + the number of deltas)."""
        while len(self.inputs) < n:
            self.pinned.append(torch.empty(self.chunk * 4, dtype=torch.uint8, pin_memory=self.pin))
            self.inputs.append(torch.empty(self.chunk * 4, dtype=torch.uint8, device=self.device))


class StreamCompute:
    """Grafts chunks on `device` through the Triton kernel, overlapping copies and compute."""

    deferred = True  # NaN/Inf counts are read once per shard, not per tensor (each read syncs the device)

    def __init__(self, device: str | torch.device, chunk: int = GPU_CHUNK, launch=None):
        """`launch` is `graftcore.kernels.triton_graft.launch_graft` (tests pass an interpreted copy)."""
        if launch is None:
            from graftcore.kernels.triton_graft import launch_graft as launch
        self.launch = launch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.name = str(self.device)
        self.chunk = chunk
        self.pin_output = self.cuda  # the engine allocates its output pool pinned when this is set
        if self.cuda:
            with torch.cuda.device(self.device):
                self.h2d, self.kernels, self.d2h = (torch.cuda.Stream(self.device) for _ in range(3))
        else:
            self.h2d = self.kernels = self.d2h = _NullStream()
        self.slots = [_Slot(chunk, self.device, self.cuda) for _ in range(SLOTS)]
        self.n = 0
        self.input_event = None  # recorded after the last chunk's host-to-device copies (None on a CPU device)
        self.counters: dict[str, torch.Tensor] = {}  # tensor name -> int64 [3] NonFinite counts on the device
        self._block_scratch = None  # LoRA blocks: float32 `acc` and `delta` buffers on the device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _stream(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def _record(self, stream):
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def graft(self, out: torch.Tensor, i: torch.Tensor, tuned: list, b: torch.Tensor, alphas: list[float], name: str):
        """Queue `out = I + a1 * (T1 - B) + ...` for one chunk; returns an event the writer waits on (or None)."""
        k = out.numel()
        slot = self.slots[self.n % SLOTS]
        self.n += 1
        if slot.h2d_done is not None:
            slot.h2d_done.synchronize()  # the pinned buffers of this slot are free again
        sources = (i, b, *tuned)
        slot.reserve(len(sources))
        staged = []
        for src, pinned in zip(sources, slot.pinned):
            if self.cuda and src.is_pinned():  # a read buffer of the input streamer: copied to the GPU as it is
                staged.append(src)
                continue
            view = pinned[: k * src.element_size()].view(src.dtype)
            view.copy_(src)  # host memcpy into pinned staging (an unaligned tensor, or CPU tests)
            staged.append(view)
        with self._stream(self.h2d):
            if slot.kernel_done is not None:
                self.h2d.wait_event(slot.kernel_done)
            on_device = [
                dev[: k * src.element_size()].view(src.dtype).copy_(src, non_blocking=True)
                for src, dev in zip(staged, slot.inputs)
            ]
            slot.h2d_done = self.input_event = self._record(self.h2d)  # the engine's read buffers are free after it
        with self._stream(self.kernels):
            if self.cuda:
                self.kernels.wait_event(slot.h2d_done)
                if slot.d2h_done is not None:
                    self.kernels.wait_event(slot.d2h_done)
            result = slot.out[: k * out.element_size()].view(out.dtype)
            counter = self._counter(name)
            dev_i, dev_b, *dev_tuned = on_device
            self.launch(result, dev_i, dev_tuned, dev_b, counter, alphas)
            slot.kernel_done = self._record(self.kernels)
        with self._stream(self.d2h):
            if self.cuda:
                self.d2h.wait_event(slot.kernel_done)
            out.copy_(result, non_blocking=True)
            slot.d2h_done = self._record(self.d2h)
        return slot.d2h_done

    def place(self, loaded):
        """A LoRA term's factors (a lora/update.LoadedUpdate) copied to the device, once per tensor."""
        from dataclasses import replace

        up = self._on_device
        return replace(loaded, left=up(loaded.left), right=up(loaded.right), dora_scale=up(loaded.dora_scale))

    def _on_device(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(self.device)

    def block(self, out: torch.Tensor, i: torch.Tensor, b, terms: list, name: str):
        """A block with LoRA terms (kernels.lora.block_cpu) on the device: the same block code as the CPU path, on
        device buffers of its own and synchronously (a rank-128 merge costs its GEMM, fast here, not its copies).
        Returns None (`out` is complete)."""
        from dataclasses import replace
        from types import SimpleNamespace

        from graftcore.kernels.lora import FullDelta, block_cpu

        if self._block_scratch is None:
            new = lambda: torch.empty(self.chunk, dtype=torch.float32, device=self.device)  # noqa: E731
            self._block_scratch = SimpleNamespace(acc=new(), delta=new())
        up = self._on_device
        terms = [replace(t, tuned=up(t.tuned)) if isinstance(t, FullDelta) else t for t in terms]
        result = torch.empty(out.numel(), dtype=out.dtype, device=self.device)
        with full_float32_matmul():
            found = block_cpu(result, up(i), up(b), terms, self._block_scratch)
        if found:
            self._counter(name).add_(torch.tensor(found, device=self.device))
        out.copy_(result)
        return None

    def _counter(self, name: str) -> torch.Tensor:
        """The device's NonFinite counts (int64 [3]) of tensor `name`."""
        counter = self.counters.get(name)
        if counter is None:
            counter = self.counters[name] = torch.zeros(3, dtype=torch.int64, device=self.device)
        return counter

    def count(self, name: str, found) -> None:
        """Add NonFinite counts found outside this compute's kernels (taken with the device's at nonfinite())."""
        if found:
            self._counter(name).add_(torch.tensor(list(found), dtype=torch.int64, device=self.device))

    def convert(self, out: torch.Tensor, src: torch.Tensor):
        out.copy_(src)  # a copy (maybe a dtype change) needs no GPU
        return None

    def nonfinite(self) -> dict:
        """NonFinite counts per tensor since the last call (synchronizes once)."""
        from graftcore.kernels import NonFinite

        if self.cuda:
            self.kernels.synchronize()
        counts = {name: NonFinite(*c.tolist()) for name, c in self.counters.items()}
        self.counters.clear()
        return {n: c for n, c in counts.items() if c}
