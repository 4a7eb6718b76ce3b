"""The Triton FP8 graft kernel against its CPU twin (kernels/graft/fp8.py), bit for bit, run in Triton's
interpreter on CPU tensors; and what the GPU would run, compiled ahead of time: IEEE division, no FMA."""

from __future__ import annotations

import pytest
import torch
from helpers import interpreted_kernel_module, quantize_fp8

from graftcore.kernels.fp8 import dequantize, quantize_into

ROWS, COLS, BLOCK = 70, 50, (32, 16)  # partial edge blocks both ways


@pytest.fixture(scope="module")
def kernel():
    return interpreted_kernel_module("triton_fp8")


def inputs(kind: str, w: torch.Tensor, scale_dtype):
    """(elements, float32 scale grid or None) of a weight given to the kernel as `kind`."""
    if kind == "fp8":
        q, s = quantize_fp8(w, BLOCK, scale_dtype)
        return q.view(-1), s.float().view(-1), dequantize(q.view(-1), s, 0, COLS, BLOCK)
    t = w.to({"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[kind])
    return t.view(-1), None, t.float()


CASES = [
    # scale dtype, Base, tuned, alpha, power of two, special values
    (torch.float32, "fp8", "bf16", 1.0, False, None),
    (torch.bfloat16, "fp8", "bf16", 1.0, False, None),
    (torch.float16, "bf16", "f32", 0.5, False, None),
    (torch.float32, "fp8", "fp8", 2.0, False, None),
    (torch.float32, "f16", "bf16", 1.0, True, None),
    (torch.bfloat16, "fp8", "bf16", 1.0, False, "nan"),
    (torch.float32, "fp8", "bf16", 1.0, False, "inf"),
    (torch.float32, "fp8", "bf16", 1.0, False, "zero block"),
    (torch.float32, "fp8", "bf16", 40.0, False, "subnormals"),
]


@pytest.mark.parametrize("scale_dtype,base_kind,tuned_kind,alpha,power_of_two,special", CASES)
def test_kernel_gives_the_twins_bits(kernel, scale_dtype, base_kind, tuned_kind, alpha, power_of_two, special):
    g = torch.Generator().manual_seed(0)
    w_i = torch.randn(ROWS, COLS, generator=g) * 0.02
    w_b = w_i + 0.01 * torch.randn(ROWS, COLS, generator=g)
    w_t = w_b + 0.02 * torch.randn(ROWS, COLS, generator=g)
    if special == "zero block":
        w_i[:32, :16] = 0
        w_b[:32, :16] = 0
        w_t[:32, :16] = 0
    if special == "subnormals":  # values whose encoding falls in E4M3's subnormal range
        w_t = w_b + 1e-7 * torch.randn(ROWS, COLS, generator=g)
    iq, i_s = quantize_fp8(w_i, BLOCK, scale_dtype)
    b, b_s, xb = inputs(base_kind, w_b, scale_dtype)
    t, t_s, xt = inputs(tuned_kind, w_t, scale_dtype)
    if special in ("nan", "inf"):
        t = t.clone()
        t[7] = float(special)
        xt = xt.clone().view(-1)
        xt[7] = float(special)
        xt = xt.view(ROWS, COLS)
    xi = dequantize(iq.view(-1), i_s, 0, COLS, BLOCK)
    d = xt - xb
    if alpha != 1.0:
        d = d * alpha
    x = xi + d
    want_q = torch.empty(ROWS * COLS, dtype=torch.uint8)
    want = quantize_into(want_q, x, i_s, 0, BLOCK, scale_dtype, power_of_two, xi)

    grid = i_s.shape
    q = torch.empty(ROWS * COLS, dtype=torch.uint8)
    s = torch.empty(grid.numel())
    norms = torch.empty(grid.numel(), 2, dtype=torch.float64)
    counts = torch.zeros(3, dtype=torch.int64)
    kernel.graft_fp8_triton(
        q,
        s,
        norms,
        counts,
        (iq.view(-1), i_s.float().view(-1)),
        (b, b_s),
        (t, t_s),
        COLS,
        BLOCK,
        alpha,
        scale_dtype,
        power_of_two,
    )
    assert torch.equal(q, want_q)
    assert torch.equal(s.view(grid), want.scale)
    assert int((s.view(grid) != i_s.float()).sum()) == want.rescaled
    if special in ("nan", "inf"):
        assert counts.tolist() == [1, 0, 0]
        assert q[7] == (0x7F if special == "nan" else q[7])
    else:
        assert counts.tolist() == [0, 0, 0]
        # the same float32 differences squared in float64 on both paths: only the summation order differs
        assert float(norms[:, 0].sum()) == pytest.approx(want.error_sq, rel=1e-9, abs=1e-30)
        assert float(norms[:, 1].sum()) == pytest.approx(want.update_sq, rel=1e-9)
    if power_of_two:
        rescaled = s.view(grid) != i_s.float()
        assert rescaled.any() and (torch.frexp(s.view(grid)[rescaled])[0] == 0.5).all()


def test_the_gpu_code_divides_exactly_and_never_fuses():
    """Compiled for sm_90 as the launcher would: the division is div.rn.f32 (IEEE), no FMA anywhere, no Triton
    fp8 or bf16 conversion instructions (the integer paths are what the interpreter test checked)."""
    aot = pytest.importorskip("graftcore.kernels.aot")
    kernel = aot.compile_fp8(90)
    ptx = kernel.asm["ptx"]
    assert "div.rn.f32" in ptx
    assert "fma" not in ptx and "div.full" not in ptx and "div.approx" not in ptx
    assert "cvt.rn.satfinite.e4m3x2" not in ptx and "e4m3" not in ptx


ENGINE_WITH_THE_KERNEL = r"""
import sys
import graftcore.api as api
from graftcore.compute.cpu import CpuCompute

class KernelOnCpu(CpuCompute):
    # the merge's GPU route for FP8 ops (stream/codec_steps.encode_on_device), the interpreted kernel on CPU tensors
    name = "interpreted"
    device = "cpu"

import graftcore.merge.engine as engine

calls = []
through_kernel = engine.encode_on_device
engine.encode_on_device = lambda *args: calls.append(1) or through_kernel(*args)
api.select_compute = lambda device, chunk, log: KernelOnCpu(1 << 12)
base, tuned, instruct, out = sys.argv[1:5]
api.graft(base=base, tuned=tuned, instruct=instruct, output=out, quiet=True, chunk_size=1 << 12)
print("steps through the kernel:", len(calls))
"""


def test_the_merge_through_the_kernel_equals_the_cpu_merge(tmp_path, cli):
    """The merge's route for FP8 ops on a GPU (inputs to the device, the Triton kernel, bytes and scales back),
    run with the interpreted kernel on CPU tensors: the output shard is byte for byte the CPU twin's, and
    graftcore.json records the same rescaled blocks."""
    import json
    import os
    import subprocess
    import sys

    from helpers import load_folder, perturbed, tiny_qwen3, write_checkpoint, write_fp8_checkpoint

    model = tiny_qwen3()
    config = model.config.to_dict()
    write_fp8_checkpoint(tmp_path / "base", model.state_dict(), config, (32, 32))
    write_checkpoint(tmp_path / "tuned", perturbed(tiny_qwen3(), 1, 0.004).state_dict(), 1, config)
    write_fp8_checkpoint(tmp_path / "instruct", perturbed(tiny_qwen3(), 2, 0.01).state_dict(), config, (32, 32))
    roles = [tmp_path / r for r in ("base", "tuned", "instruct")]
    code, _, err = cli(
        "merge",
        "--base",
        roles[0],
        "--tuned",
        roles[1],
        "--instruct",
        roles[2],
        "--output",
        tmp_path / "cpu",
        "--quiet",
        "--chunk-size",
        str(1 << 12),
    )
    assert code == 0, err
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", ENGINE_WITH_THE_KERNEL, *map(str, roles), str(tmp_path / "kernel")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split("steps through the kernel:")[1]) >= 14, run.stdout  # every FP8 weight's steps
    assert (tmp_path / "kernel" / "model.safetensors").read_bytes() == (
        tmp_path / "cpu" / "model.safetensors"
    ).read_bytes()
    records = [json.loads((tmp_path / d / "graftcore.json").read_text())["fp8"] for d in ("cpu", "kernel")]
    assert records[0]["rescaled_blocks"] == records[1]["rescaled_blocks"] > 0
    assert records[1]["update_error"] == pytest.approx(records[0]["update_error"], rel=1e-3)
    assert load_folder(tmp_path / "kernel").keys() == load_folder(tmp_path / "cpu").keys()


def test_a_scale_the_dtype_cannot_hold_is_refused_on_both_paths(kernel):
    """An F16 scale that one grafted value of 3e7 would need (67k > 65504): the twin and the kernel both give a
    non-finite scale for that block, and the FP8 codec's encoder refuses it, naming the tensor (the merge's one
    check, whichever path encoded the step)."""
    from graftcore.codecs.fp8 import ScaleGridEncoder
    from graftcore.errors import NonFiniteError
    from graftcore.io.safetensors_file import Quantized, TensorInfo

    g = torch.Generator().manual_seed(0)
    w_i = torch.randn(ROWS, COLS, generator=g) * 0.02
    iq, i_s = quantize_fp8(w_i, BLOCK, torch.float16)
    w_t = w_i.clone()
    w_t[3, 5] = 3e7
    xi = dequantize(iq.view(-1), i_s, 0, COLS, BLOCK)
    x = xi + (w_t - w_i)
    twin = quantize_into(torch.empty(ROWS * COLS, dtype=torch.uint8), x, i_s, 0, BLOCK, torch.float16, False, xi)
    scale = torch.empty(i_s.numel())
    kernel.graft_fp8_triton(
        torch.empty(ROWS * COLS, dtype=torch.uint8),
        scale,
        torch.empty(i_s.numel(), 2, dtype=torch.float64),
        torch.zeros(3, dtype=torch.int64),
        (iq.view(-1), i_s.float().view(-1)),
        (w_i.view(-1), None),
        (w_t.view(-1), None),
        COLS,
        BLOCK,
        1.0,
        torch.float16,
        False,
    )
    for grid in (twin.scale.view(-1), scale):
        assert int((~torch.isfinite(grid)).sum()) == 1 and not torch.isfinite(grid[0])
        sc = TensorInfo("w.weight_scale_inv", "F16", tuple(i_s.shape), "m.safetensors", 0, 2 * i_s.numel())
        info = Quantized("w.weight", "F8_E4M3", (ROWS, COLS), "m.safetensors", 0, ROWS * COLS, sc, BLOCK)
        encoded = ScaleGridEncoder(info, where="inst/m.safetensors")
        with pytest.raises(NonFiniteError, match=r"inst/m.safetensors: tensor 'w.weight'.*'w.weight_scale_inv'"):
            encoded.add(0, grid, 1, 0.0, 1.0)
