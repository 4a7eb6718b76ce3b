"""Where the math runs: the CPU twin (`cpu.CpuCompute`) or the CUDA streams and Triton kernel
(`cuda.StreamCompute`), behind the one `Compute` protocol the streaming pass calls; `devices.select_compute`
chooses one for `--device`. This module imports no torch: the implementations load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class Compute(Protocol):
    """What the streaming pass asks of a compute. Every call may return an event to wait for before the output
    buffer is read (None: done now); NaN/Inf counts accumulate per tensor until `nonfinite()` takes them."""

    name: str  # "cpu" or the CUDA device, for the report
    chunk: int  # elements per computed step
    pin_output: bool  # output buffers in pinned memory (for device-to-host copies)
    deferred: bool  # NaN/Inf counts known only when nonfinite() is called (once per shard), not per chunk
    input_event: object  # what the read buffers' release waits for (a CUDA event after the copy to the device)

    def __enter__(self) -> Compute: ...

    def __exit__(self, *exc) -> None: ...

    def graft(self, out: torch.Tensor, i: torch.Tensor, tuned: list, b: torch.Tensor, alphas: list[float], name: str):
        """`out = I + a1 * (T1 - B) + ...` in float32 with one rounding."""

    def block(self, out: torch.Tensor, i: torch.Tensor, b, terms: list, name: str):
        """A block of rows with LoRA terms (kernels.lora)."""

    def place(self, loaded):
        """A LoRA term's factors where the math runs."""

    def convert(self, out: torch.Tensor, src: torch.Tensor):
        """A copied tensor in another dtype."""

    def count(self, name: str, found) -> None:
        """Add NonFinite counts that a step computed elsewhere (a codec's fused encode or device kernel) found."""

    def nonfinite(self) -> dict:
        """NonFinite counts per tensor since the last call."""
