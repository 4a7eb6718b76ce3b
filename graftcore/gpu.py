"""The GPU streaming compute: the input streamer's pinned read buffers -> GPU (copy stream) -> Triton kernel
(compute stream) -> pinned output buffer (copy-back stream) -> the writer thread.

    chunk n:   pinned read buffers (or a copy into slot n%S) ── H2D ──► kernel ──► D2H into a pool buffer
    chunk n+1:                 (overlaps: the CPU fills the next slot while the GPU works on this one)

Each of the S staging slots owns pinned input buffers and device buffers; events order their reuse:
the engine hands read buffers back to the streamer with the H2D's event (the reader waits for it before
refilling them), the host waits for a slot's H2D before refilling its pinned staging buffers, the H2D waits for the kernel that
last read the slot's device inputs, and the kernel waits for the D2H that last read its output. The
writer thread waits for a chunk's D2H event before writing it. NaN/Inf counts stay on the device, one
counter per tensor, read once per shard, so the pipeline never drains per chunk.

With a CPU device (tests, under TRITON_INTERPRET=1) the same code runs with null streams and events.
"""

from __future__ import annotations

import contextlib

import torch

GPU_CHUNK = 1 << 22  # elements: 16 MiB of float32 per buffer; large transfers reach full PCIe bandwidth
SLOTS = 2  # double-buffered staging


class _NullStream:
    """Stands in for torch.cuda.Stream on a CPU device: everything is already synchronous."""

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Slot:
    def __init__(self, chunk: int, device: torch.device, pin: bool):
        def host():
            return torch.empty(chunk * 4, dtype=torch.uint8, pin_memory=pin)

        def dev():
            return torch.empty(chunk * 4, dtype=torch.uint8, device=device)

        self.pinned = [host() for _ in range(3)]  # I, T, B staging (bytes, viewed per dtype)
        self.inputs = [dev() for _ in range(3)]
        self.out = dev()
        self.h2d_done = self.kernel_done = self.d2h_done = None


class StreamCompute:
    """Grafts chunks on `device` through the Triton kernel, overlapping copies and compute."""

    deferred = True  # NaN/Inf counts are read once per shard, not per tensor (each read syncs the device)

    def __init__(self, device: str | torch.device, chunk: int = GPU_CHUNK, launch=None):
        """`launch` is `graftcore.kernels.triton_graft.launch_graft` (tests pass an interpreted copy)."""
        if launch is None:
            from .kernels.triton_graft import launch_graft as launch
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
        self.counters: dict[str, torch.Tensor] = {}  # tensor name -> int64 NaN/Inf count on the device
        self._lora_for = self._lora = self._lora_acc = None  # LoRA: the current tensor's factors, a float32 block

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

    def graft(self, out: torch.Tensor, i: torch.Tensor, t: torch.Tensor, b: torch.Tensor, alpha: float, name: str):
        """Queue `out = I + alpha * (T - B)` for one chunk; returns an event the writer waits on (or None)."""
        k = out.numel()
        slot = self.slots[self.n % SLOTS]
        self.n += 1
        if slot.h2d_done is not None:
            slot.h2d_done.synchronize()  # the pinned buffers of this slot are free again
        staged = []
        for src, pinned in zip((i, t, b), slot.pinned):
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
            counter = self.counters.get(name)
            if counter is None:
                counter = self.counters[name] = torch.zeros(1, dtype=torch.int64, device=self.device)
            self.launch(result, *on_device, counter, alpha)
            slot.kernel_done = self._record(self.kernels)
        with self._stream(self.d2h):
            if self.cuda:
                self.d2h.wait_event(slot.kernel_done)
            out.copy_(result, non_blocking=True)
            slot.d2h_done = self._record(self.d2h)
        return slot.d2h_done

    def lora(self, out, i, update, r0: int, r1: int, alpha: float, c0: int = 0, c1: int | None = None, base=None):
        """`out = I + alpha * s * (left @ right)[r0:r1, c0:c1]` (or DoRA, given Base's block) on the device.

        The same block kernels as the CPU path, on device buffers of its own and synchronously: a rank-128
        merge costs its GEMM (fast here), not its copies. Returns None (`out` is complete).
        """
        from types import SimpleNamespace

        from .kernels.lora import dora_cpu, lora_cpu

        if self._lora_for is not update:  # factors go up once per tensor
            up = lambda x: None if x is None else x.to(self.device)  # noqa: E731
            self._lora = SimpleNamespace(left=up(update.left), right=up(update.right), dora=up(update.dora_scale))
            self._lora_for = update
        if self._lora_acc is None:
            self._lora_acc = SimpleNamespace(delta=torch.empty(self.chunk, dtype=torch.float32, device=self.device))
        f = self._lora
        c1 = f.right.shape[1] if c1 is None else c1
        left, right = f.left[r0:r1], f.right[:, c0:c1]
        n = left.shape[0] * right.shape[1]  # at most self.chunk: the engine cuts blocks to chunk size
        dev_i = i.to(self.device)
        result = torch.empty(n, dtype=out.dtype, device=self.device)
        if f.dora is None:
            lora_cpu(result, dev_i, left, right, alpha * update.scale, self._lora_acc)
        else:
            axis = update.update.dora_axis
            scale = f.dora[r0:r1] if axis == "rows" else f.dora[c0:c1]
            dora_cpu(result, dev_i, base.to(self.device), left, right, update.scale, scale, axis, alpha, self._lora_acc)
        out.copy_(result)
        return None

    def convert(self, out: torch.Tensor, src: torch.Tensor):
        out.copy_(src)  # a copy (maybe a dtype change) needs no GPU
        return None

    def nonfinite(self) -> dict[str, int]:
        """NaN/Inf counts of T - B per tensor since the last call (synchronizes once)."""
        if self.cuda:
            self.kernels.synchronize()
        counts = {name: int(c.item()) for name, c in self.counters.items()}
        self.counters.clear()
        return {n: c for n, c in counts.items() if c}
