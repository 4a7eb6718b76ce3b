"""The GPU streaming path (staging slots, streams, events, per-tensor NaN counters).

Without CUDA it runs on CPU tensors with null streams and the real Triton kernel under TRITON_INTERPRET=1,
which exercises every buffer and ordering decision of graftcore.compute.cuda except the asynchrony itself. With
CUDA the same merges run on the device and must equal the CPU path bit for bit.
"""

import pytest
import torch
from helpers import interpreted_kernel_module, llama_tensors, load_folder, reference, same_bits, write_checkpoint

import graftcore
from graftcore.api import run_plan
from graftcore.compute.cuda import StreamCompute
from graftcore.errors import NonFiniteError
from graftcore.options import MergeOptions
from graftcore.plan import DeltaInput, build_plan
from graftcore.sources.local import open_checkpoint

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


LAUNCH = None if CUDA else interpreted_kernel_module().launch_graft


def merge_with_stream_compute(tmp_path, base, tuned, instruct, chunk, **options):
    paths = {
        r: write_checkpoint(tmp_path / r, sd, k)
        for r, sd, k in (("base", base, 1), ("tuned", tuned, 2), ("instruct", instruct, 2))
    }
    cks = {r: open_checkpoint(p) for r, p in paths.items()}
    opts = MergeOptions(quiet=True, **options)
    plan = build_plan(cks["instruct"], [DeltaInput("tuned", opts.alpha[0], cks["tuned"])], cks["base"], opts)
    report = run_plan(plan, cks, tmp_path / "out", opts, print, compute=StreamCompute(DEVICE, chunk, LAUNCH))
    return report, load_folder(tmp_path / "out")


@pytest.mark.parametrize("chunk", [4096, 20000])
def test_stream_compute_merge_is_bit_exact(tmp_path, chunk):
    base, tuned, instruct = llama_tensors(1), llama_tensors(2, torch.float32, noise=2e-3), llama_tensors(3, noise=5e-3)
    grown = llama_tensors(3, vocab=100, noise=5e-3)
    instruct["lm_head.weight"] = grown["lm_head.weight"]  # 4 extra rows: a chunk straddles grafted and copied rows
    report, got = merge_with_stream_compute(tmp_path, base, tuned, instruct, chunk)
    assert report.device == DEVICE or report.device.startswith("cuda")
    for n in instruct:
        rows = base[n].shape[0]
        assert same_bits(got[n][:rows], reference(instruct[n][:rows], tuned[n], base[n])), n
        assert same_bits(got[n][rows:], instruct[n][rows:]), n


def test_stream_compute_alpha_and_dtype(tmp_path):
    base, tuned, instruct = (
        llama_tensors(1, torch.float16),
        llama_tensors(2, torch.float16, noise=2e-3),
        llama_tensors(3, torch.float16, noise=5e-3),
    )
    _, got = merge_with_stream_compute(tmp_path, base, tuned, instruct, 8192, alpha=0.5, dtype="bfloat16")
    for n in instruct:
        assert same_bits(got[n], reference(instruct[n], tuned[n], base[n], 0.5, torch.bfloat16)), n


def test_stream_compute_reports_nonfinite_by_tensor(tmp_path):
    base, tuned, instruct = llama_tensors(1), llama_tensors(2, noise=2e-3), llama_tensors(3, noise=5e-3)
    tuned["model.layers.0.mlp.gate_proj.weight"][7, 3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*1 element"):
        merge_with_stream_compute(tmp_path, base, tuned, instruct, 8192)
    assert not list((tmp_path / "out").glob("*.partial"))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_merge_equals_cpu_merge(tmp_path):
    base, tuned, instruct = (
        llama_tensors(1, hidden=256, inter=512, vocab=1000),
        llama_tensors(2, hidden=256, inter=512, vocab=1000, noise=2e-3),
        llama_tensors(3, hidden=256, inter=512, vocab=1000, noise=5e-3),
    )
    paths = {
        r: write_checkpoint(tmp_path / r, sd, 2) for r, sd in (("base", base), ("tuned", tuned), ("instruct", instruct))
    }
    for device in ("cpu", "cuda"):
        graftcore.graft(**paths, output=tmp_path / device, device=device, quiet=True)
    cpu, gpu = load_folder(tmp_path / "cpu"), load_folder(tmp_path / "cuda")
    for n in instruct:
        assert same_bits(gpu[n], cpu[n]), n


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_fp8_merge_equals_cpu_merge(tmp_path, cli):
    """FP8 Base and Instruct, tuned bf16, on the GPU (the Triton FP8 kernel) and on the CPU twin: the same bytes."""
    from helpers import perturbed, tiny_qwen3, write_fp8_checkpoint

    model = tiny_qwen3()
    config = model.config.to_dict()
    write_fp8_checkpoint(tmp_path / "base", model.state_dict(), config, (32, 32))
    write_checkpoint(tmp_path / "tuned", perturbed(tiny_qwen3(), 1, 0.004).state_dict(), 1, config)
    write_fp8_checkpoint(tmp_path / "instruct", perturbed(tiny_qwen3(), 2, 0.01).state_dict(), config, (32, 32))
    roles = [x for r in ("base", "tuned", "instruct") for x in (f"--{r}", tmp_path / r)]
    for device in ("cpu", "cuda"):
        code, _, err = cli("merge", *roles, "--output", tmp_path / device, "--device", device, "--quiet")
        assert code == 0, err
    assert (tmp_path / "cuda" / "model.safetensors").read_bytes() == (
        tmp_path / "cpu" / "model.safetensors"
    ).read_bytes()
