"""One NaN policy and one overflow guard on every path, checked on raw bits; and the kernel as a GPU would run
it, compiled ahead of time for sm_80 and sm_90 on this CPU-only machine (PTX assertions).

NaN policy: a NaN result is stored as the output dtype's canonical quiet NaN (positive, top mantissa bit
only), whatever NaN the arithmetic made (sign, payload). NonFinite counts: NaN/Inf in a delta; NaN/Inf
produced from finite inputs (overflow: an error); NaN/Inf carried from Instruct (a note).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import interpreted_kernel_module, llama_tensors, load_folder, write_checkpoint, write_trio

import graftcore
from graftcore.api import run_plan
from graftcore.compute.cuda import StreamCompute
from graftcore.kernels import CpuScratch, graft_cpu
from graftcore.kernels.lora import FullDelta, LowRankDelta, block_cpu
from graftcore.options import MergeOptions
from graftcore.plan import DeltaInput, build_plan
from graftcore.sources.local import open_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the interpreter: inf - inf
KERNEL = interpreted_kernel_module()
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
BITS = {BF16: torch.int16, FP16: torch.int16, FP32: torch.int32}
CANONICAL = {BF16: 0x7FC0, FP16: 0x7E00, FP32: 0x7FC00000}


def f32(*bits: int) -> torch.Tensor:
    """float32 values from their bit patterns (NaNs with a sign and a payload can be written no other way)."""
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(FP32)


def nan_inputs():
    """Eight elements whose result is NaN, each made differently; then two finite ones."""
    inf = float("inf")
    i = torch.cat([f32(0xFFC01234, 0x7F800001, 0x7FC00000), torch.tensor([0.0, 0.0, 1.0, inf, -inf, 1.0, 2.0])])
    t = torch.tensor([0.0, 0.0, 0.0, inf, -inf, 0.0, -inf, inf, 1.0, 2.0])
    b = torch.cat([torch.tensor([0.0, 0.0, 0.0, inf, -inf]), f32(0xFFFFFFFF), torch.tensor([0.0, 0.0, 0.0, 0.0])])
    return (
        i,
        t,
        b,
    )  # I NaN (negative, payload), I signalling NaN, I NaN; inf - inf; -inf - -inf; B NaN; I + delta = inf - inf


@pytest.mark.parametrize("out_dtype", [BF16, FP16, FP32], ids=str)
def test_every_nan_is_the_canonical_nan_on_every_path(out_dtype):
    i, t, b = nan_inputs()
    results = {}
    for path in ("twin", "kernel", "block"):
        out = torch.empty(10, dtype=out_dtype)
        if path == "twin":
            found = graft_cpu(out, i, t, b, 0.5)
        elif path == "kernel":
            found = KERNEL.graft_triton(out, i, t, b, 0.5)
        else:  # a LoRA block with a full delta beside a (zero) low-rank term
            lora = LowRankDelta(torch.zeros(1, 1), torch.zeros(1, 10), 2.0)
            found = block_cpu(out, i, b, [FullDelta(t, 0.5), lora], CpuScratch(16))
        raw = out.view(BITS[out_dtype])
        assert raw[:8].tolist() == [CANONICAL[out_dtype]] * 8, (path, [hex(x & 0xFFFFFFFF) for x in raw[:8].tolist()])
        assert out[8:].tolist() == [1.0 + 0.5, 2.0 + 1.0]
        # deltas: inf - inf, -inf - -inf, B NaN (2 more: -inf - 0 = -inf and inf - 0 = inf are deltas too)
        assert found == (5, 0, 3), (path, found)
        results[path] = raw
    assert torch.equal(results["twin"], results["kernel"]) and torch.equal(results["twin"], results["block"])


@pytest.mark.parametrize("out_dtype, big", [(FP16, 65504.0), (BF16, 3.3895314e38), (FP32, 3.4028235e38)], ids=str)
def test_overflow_from_finite_inputs_is_counted_on_every_path(out_dtype, big):
    """I at the top of the output's range plus a positive delta: the rounding (or the float32 sum) overflows."""
    i = torch.tensor([big, -big, big, 1.0]).to(out_dtype)
    t = torch.tensor([big, -big, 0.0, 1.0])
    b = torch.tensor([0.0, 0.0, 0.0, 0.5])
    for found in (
        graft_cpu(torch.empty(4, dtype=out_dtype), i, t, b),
        KERNEL.graft_triton(torch.empty(4, dtype=out_dtype), i, t, b),
    ):
        assert found == (0, 2, 0)


def test_the_rounding_threshold_is_exact():
    """bf16: 0x7F7F8000 (largest finite + half an ulp) rounds to inf; the float32 just below stays finite. fp16:
    65520 rounds to inf, 65519.996 does not. Both paths agree on the count and the bits."""
    cases = [(BF16, f32(0x7F7F8000, 0x7F7F7FFF)), (FP16, torch.tensor([65520.0, 65519.996]))]
    for dtype, x in cases:
        zero = torch.zeros(2)
        twin, kernel = torch.empty(2, dtype=dtype), torch.empty(2, dtype=dtype)
        assert graft_cpu(twin, zero, x, zero) == KERNEL.graft_triton(kernel, zero, x, zero) == (0, 1, 0)
        assert twin[0].isinf() and twin[1].isfinite() and torch.equal(twin.view(torch.int16), kernel.view(torch.int16))


def test_alpha_times_delta_overflow_is_counted():
    t, zero = torch.tensor([3e38, 1.0]), torch.zeros(2)
    for found in (
        graft_cpu(torch.empty(2), zero, t, zero, 10.0),
        KERNEL.graft_triton(torch.empty(2), zero, t, zero, 10.0),
    ):
        assert found == (0, 1, 0)


@pytest.fixture
def trio(tmp_path):
    base, tuned, instruct = (
        llama_tensors(1, FP16),
        llama_tensors(2, FP16, noise=2e-3),
        llama_tensors(3, FP16, noise=5e-3),
    )
    paths = dict(zip(("base", "tuned", "instruct"), write_trio(tmp_path, (base, tuned, instruct), (1, 2, 1))))
    return paths, base, tuned, instruct


def rewrite(folder, tensors, name, index, value):
    tensors = {n: t.clone() for n, t in tensors.items()}
    tensors[name].view(-1)[index] = value
    write_checkpoint(folder, tensors, 1 if "instruct" in str(folder) else 2)
    return tensors


def test_fp16_overflow_fails_the_merge_naming_the_tensor(trio, tmp_path, cli):
    paths, base, tuned, instruct = trio
    name = "model.layers.1.self_attn.o_proj.weight"
    rewrite(paths["instruct"], instruct, name, 5, 65504.0)
    rewrite(paths["tuned"], tuned, name, 5, float(base[name].view(-1)[5]) + 100.0)
    args = ["merge", "--base", paths["base"], "--tuned", paths["tuned"], "--instruct", paths["instruct"]]
    code, _, err = cli(*args, "--output", tmp_path / "out")
    assert (
        code == 2
        and name in err
        and "1 element(s) of the result are NaN/Inf in F16 although every input is finite" in err
    )
    assert "Traceback" not in err and not (tmp_path / "out" / "graftcore.json").exists()
    code, _, err = cli(*args, "--output", tmp_path / "kept", "--allow-nonfinite", "--quiet")
    assert code == 0, err
    assert load_folder(tmp_path / "kept")[name].view(-1)[5].isinf()
    code, _, err = cli(*args, "--output", tmp_path / "wide", "--dtype", "float32", "--quiet")
    assert code == 0, err  # float32 has the range: no overflow
    assert float(load_folder(tmp_path / "wide")[name].view(-1)[5]) > 65504.0


def test_nan_carried_from_instruct_is_a_note_not_an_error(trio, tmp_path):
    paths, base, tuned, instruct = trio
    name = "model.layers.0.mlp.up_proj.weight"
    rewrite(paths["instruct"], instruct, name, 3, float("nan"))
    report = graftcore.graft(
        base=paths["base"], tuned=paths["tuned"], instruct=paths["instruct"], output=tmp_path / "out", quiet=True
    )
    assert any(name in n and "1 NaN/Inf value(s) of Instruct carried" in n for n in report.notes)
    manifest = json.loads((tmp_path / "out" / "graftcore.json").read_text())
    assert any("carried" in n for n in manifest["notes"])
    assert load_folder(tmp_path / "out")[name].view(-1)[3].view(torch.int16) == CANONICAL[FP16]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cpu_and_kernel_paths_write_the_same_bytes_with_nan(trio, tmp_path, dtype):
    """With --allow-nonfinite, NaN from a delta, from Instruct and from overflow reach the shards: the CPU path
    and the GPU path's code (interpreted kernel) must record the same sha256 for every shard."""
    paths, base, tuned, instruct = trio
    name = "model.layers.0.self_attn.q_proj.weight"
    bad_tuned = rewrite(paths["tuned"], tuned, name, 0, float("nan"))
    rewrite(paths["tuned"], bad_tuned, name, 1, float("-inf"))
    rewrite(paths["instruct"], instruct, "model.norm.weight", 2, float("nan"))
    opts = MergeOptions(quiet=True, allow_nonfinite=True, dtype=dtype)
    cks = {r: open_checkpoint(p) for r, p in paths.items()}
    plan = build_plan(cks["instruct"], [DeltaInput("tuned", 1.0, cks["tuned"])], cks["base"], opts)
    run_plan(plan, cks, tmp_path / "gpu", opts, print, compute=StreamCompute("cpu", 3000, KERNEL.launch_graft))
    graftcore.graft(
        base=paths["base"],
        tuned=paths["tuned"],
        instruct=paths["instruct"],
        output=tmp_path / "cpu",
        quiet=True,
        allow_nonfinite=True,
        dtype=dtype,
        device="cpu",
    )
    shards = {p: json.loads((tmp_path / p / "graftcore.json").read_text())["shards"] for p in ("gpu", "cpu")}
    assert shards["gpu"] == shards["cpu"]
    assert load_folder(tmp_path / "cpu")[name].view(-1)[0].isnan()


def test_graft_tensor_refuses_overflow():
    i = torch.tensor([65504.0, 1.0], dtype=FP16)
    with pytest.raises(graftcore.NonFiniteError, match="although every input is finite"):
        graftcore.graft_tensor(i, torch.tensor([100.0, 0.0]), torch.zeros(2))
    assert graftcore.graft_tensor(i, torch.tensor([100.0, 0.0]), torch.zeros(2), dtype="float32")[0] == 65604.0


def test_graft_tensor_refuses_meta_tensors():
    """Tensors on the meta device (a model built without weights) have no data: a GraftError, not torch's
    NotImplementedError from inside the kernel."""
    meta = torch.empty(4, 4, dtype=torch.bfloat16, device="meta")
    with pytest.raises(graftcore.GraftError, match="instruct is on the meta device"):
        graftcore.graft_tensor(meta, meta, meta)
    with pytest.raises(graftcore.GraftError, match="on the meta device|is on meta"):
        graftcore.graft_state_dict({"w": meta}, {"w": meta}, {"w": meta})


# ---- the compiled kernel, ahead of time ---------------------------------------------------------------------


def compiled(capability, out, ins, alphas=(0.5,)):
    aot = pytest.importorskip("graftcore.kernels.aot")
    try:
        return aot, aot.compile_graft(capability, out, ins, alphas)
    except (ImportError, RuntimeError) as e:  # a Triton without its NVIDIA backend
        pytest.skip(f"Triton cannot compile for CUDA here: {e}")


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize(
    "out, ins, alphas",
    [
        ("bfloat16", ("bfloat16",) * 3, (0.5,)),
        ("float16", ("float16", "float16", "float32"), (1.0,)),
        ("float32", ("bfloat16", "float32", "bfloat16", "float16"), (0.3, 2.0)),
    ],
    ids=["bf16", "fp16", "fp32-2-deltas"],
)
def test_ptx_rounds_as_the_twin_and_streams_wide(capability, out, ins, alphas):
    """No FMA (the multiply and the add round separately, as on the CPU), no flush-to-zero (subnormals kept),
    128-bit loads for every input and 128-bit stores, and the element offset computed in 64 bits."""
    _, kernel = compiled(capability, out, ins, alphas)
    ptx = kernel.asm["ptx"]
    assert f".target sm_{capability}" in ptx
    assert "fma" not in ptx and ".ftz" not in ptx
    assert ptx.count("ld.global.v4") >= len(ins) and "st.global.v4" in ptx
    assert "ld.global.b16" not in ptx and "st.global.b16" not in ptx  # no scalar element accesses
    assert "mul.wide.u32" in ptx  # program_id * BLOCK_SIZE widened to 64 bits before any pointer arithmetic
    assert "red.global" in ptx or "atom.global" in ptx  # the NonFinite counts


def test_counting_keeps_off_the_common_path():
    """Per element, the common path (no NaN/Inf in the block) costs fewer SASS instructions than the kernel
    with a per-element atomic did (45.5 at sm_90 for bf16, alpha 0.5; bench/RESULTS.md), and a second delta
    costs less than a second kernel would."""
    aot, one = compiled(90, "bfloat16", ("bfloat16",) * 3)
    _, two = compiled(90, "bfloat16", ("bfloat16",) * 4, (0.5, 0.5))
    per_one, per_two = aot.sass_per_element(one), aot.sass_per_element(two)
    assert per_one < 30
    assert per_one < per_two < 2 * per_one


# ---- device selection -------------------------------------------------------------------------------------


def test_explicit_cuda_without_a_device_is_exit_2(trio, tmp_path, cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    paths, *_ = trio
    code, _, err = cli(
        "merge",
        "--base",
        paths["base"],
        "--tuned",
        paths["tuned"],
        "--instruct",
        paths["instruct"],
        "--output",
        tmp_path / "out",
        "--device",
        "cuda:0",
    )
    assert code == 2 and "--device cuda:0: no CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_warm_up_launches_the_real_kernel_and_compares_bits():
    """The check `auto` runs before taking a GPU, here through the interpreted kernel on a CPU device."""
    from graftcore.compute.devices import warm_up

    assert warm_up(StreamCompute("cpu", 4096, KERNEL.launch_graft)) is None


def test_lora_gemm_leaves_the_callers_tf32_setting_as_it_was():
    from graftcore.compute.cuda import full_float32_matmul

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with full_float32_matmul():
            assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
