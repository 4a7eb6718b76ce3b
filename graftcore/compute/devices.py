"""Where the math runs: `--device auto|cpu|cuda[:N]` -> CpuCompute or the GPU StreamCompute, chosen so that a merge
never fails later for a reason a tiny launch could have shown first.

A CUDA device is taken only once a warm-up launch of the real kernel on it has run and given the CPU twin's
bits: that proves the device's capability (the counters' atomics need sm_70+), the driver, and the C compiler
Triton builds its launcher with at first launch. `auto` falls back to the CPU with one line saying why; an
explicit `--device cuda[:N]` that cannot run is a GraftError (exit 2) with the reason. A CUDA out-of-memory
during the merge is a GraftError too, saying how much memory the device has free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from graftcore.errors import GraftError


def select_compute(device: str, chunk: int | None, log: Callable[[str], None]):
    """CpuCompute or a warmed-up StreamCompute for `device` ("auto", "cpu", "cuda", "cuda:N")."""
    import torch

    from graftcore.compute.cpu import CpuCompute
    from graftcore.kernels import CHUNK

    if device == "auto":
        why = cuda_unavailable(None)
        if why is None:
            compute, why = warmed_up("cuda", chunk)
            if compute is not None:
                return compute
        if torch.version.cuda:  # a CUDA build of torch: the user expected the GPU, so say why not
            log(f"{why}: merging on the CPU (bit-identical, slower)")
        device = "cpu"
    if device == "cpu":
        return CpuCompute(chunk or CHUNK)
    why = cuda_unavailable(device)
    if why is None:
        compute, why = warmed_up(device, chunk)
        if compute is not None:
            return compute
    raise GraftError(f"--device {device}: {why}")


def local_cuda_device(local_rank: int) -> str | None:
    """`cuda:N` for a process of a distributed merge: the local ranks share a machine's GPUs round robin."""
    import torch

    return f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else None


def cuda_unavailable(device: str | None) -> str | None:
    """Why `device` (None: any CUDA device) cannot run the Triton kernel, as far as can be told without a
    launch, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    if device and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        return f"only {torch.cuda.device_count()} CUDA device(s)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}; the kernel needs sm_70 or newer"
    return None


def warmed_up(device: str, chunk: int | None, launch=None):
    """(StreamCompute, None) once a 4096-element graft on `device` gave the CPU twin's bits, else (None, why)."""
    from graftcore.compute.cuda import GPU_CHUNK, StreamCompute

    try:
        compute = StreamCompute(device, chunk or GPU_CHUNK, launch)
        why = warm_up(compute)
    except Exception as e:  # noqa: BLE001 (compiler, driver, ptxas: any failure means this device cannot be used)
        why = f"a test launch of the graft kernel failed ({first_line(e)})"
    return (compute, None) if why is None else (None, why)


def warm_up(compute) -> str | None:
    """Graft 4096 elements (bf16 I and B, a float32 delta, alpha 0.5) on the compute's device through its kernel
    and compare with the CPU twin; returns why not, or None when the bits agree."""
    import torch

    from graftcore.kernels import graft_cpu

    g = torch.Generator().manual_seed(0)
    i, b = torch.randn(4096, generator=g).bfloat16(), torch.randn(4096, generator=g).bfloat16()
    t = b.float() + 0.01 * torch.randn(4096, generator=g)
    want = torch.empty(4096, dtype=torch.bfloat16)
    graft_cpu(want, i, t, b, 0.5)
    out = torch.empty(4096, dtype=torch.bfloat16, device=compute.device)
    dev = [x.to(compute.device) for x in (i, t, b)]
    counts = torch.zeros(3, dtype=torch.int64, device=compute.device)
    compute.launch(out, dev[0], [dev[1]], dev[2], counts, [0.5])
    if not torch.equal(out.cpu().view(torch.int16), want.view(torch.int16)):
        return "a test launch of the graft kernel gave other bits than the CPU path"
    return None


@contextlib.contextmanager
def out_of_memory_is_an_error(compute):
    """A CUDA out-of-memory inside the block becomes a GraftError saying what the device has free."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        device = getattr(compute, "device", None)
        free, total = torch.cuda.mem_get_info(device) if device is not None else (0, 0)
        raise GraftError(
            f"{compute.name}: CUDA out of memory ({first_line(e)}); {free / 2**30:.2f} GiB of {total / 2**30:.2f} GiB "
            f"free now; free the GPU, pass a smaller --chunk-size (now {compute.chunk}) or --device cpu"
        ) from None


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
