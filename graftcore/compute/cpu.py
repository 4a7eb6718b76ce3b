"""The CPU compute: the kernels' CPU twin on chunks, into pooled output buffers.

Example:
    >>> with CpuCompute(1 << 18) as compute:                          # doctest: +SKIP
    ...     compute.graft(out, i, [t], b, [1.0], "w")
"""

from __future__ import annotations

import torch


class CpuCompute:
    """Chunked float32 math on the CPU into pooled output buffers (no allocation per chunk). It runs on the
    pass's thread, which keeps torch single-threaded (stream/driver.run_pass)."""

    name = "cpu"
    pin_output = False
    deferred = False  # NaN/Inf counts are known as soon as a chunk is computed
    input_event = None  # nothing reads the input buffers after a call returns

    def __init__(self, chunk: int):
        from graftcore.kernels import CpuScratch

        self.chunk = chunk
        self.scratch = CpuScratch(chunk)
        self.counts: dict = {}  # tensor name -> kernels.NonFinite

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def graft(self, out: torch.Tensor, i: torch.Tensor, tuned: list, b: torch.Tensor, alphas: list[float], name: str):
        """`out = I + a1 * (T1 - B) + ...` now; returns None (nothing to wait for)."""
        from graftcore.kernels import graft_cpu

        self.count(name, graft_cpu(out, i, tuned, b, alphas, self.scratch))
        return None

    def block(self, out: torch.Tensor, i: torch.Tensor, b, terms: list, name: str):
        """A block with LoRA terms (kernels.lora.block_cpu); returns None (nothing to wait for)."""
        from graftcore.kernels import CpuScratch
        from graftcore.kernels.lora import block_cpu

        if self.scratch.chunk < out.numel():  # a block of quantized rows: whole block rows, beyond the chunk
            self.scratch = CpuScratch(out.numel())
        self.count(name, block_cpu(out, i, b, terms, self.scratch))
        return None

    def place(self, loaded):
        """A LoRA term's factors where the math runs: here, as they are."""
        return loaded

    def count(self, name: str, found) -> None:
        """Add NonFinite counts found for tensor `name` outside graft/block (a codec's fused encode)."""
        if found:
            self.counts[name] = found.plus(self.counts[name]) if name in self.counts else found

    def convert(self, out: torch.Tensor, src: torch.Tensor):
        out.copy_(src)
        return None

    def nonfinite(self) -> dict:
        """NonFinite counts per tensor since the last call."""
        counts, self.counts = self.counts, {}
        return counts
