"""4-bit formats: compressed-tensors' MXFP4, NVFP4 and INT4 (pack-quantized) and DeepSeek-V4's FP4 experts. Files
are laid out as those libraries write them; decoding equals compressed-tensors' own decompression and transformers'
Fp8Dequantize; encoding is the rule of kernels/graft/packed4.py written plainly here, group by group."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import preset_name_to_scheme
from helpers import write_checkpoint
from safetensors.torch import load_file

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
# format -> (preset, compressor, group, grid)
FORMATS = {
    "mxfp4-pack-quantized": ("MXFP4", MXFP4PackedCompressor, 32, "e2m1"),
    "nvfp4-pack-quantized": ("NVFP4", NVFP4PackedCompressor, 16, "e2m1"),
    "pack-quantized": ("W4A16", PackedQuantizationCompressor, 128, "int4"),
}
SHAPES = {"model.layers.0.mlp.down_proj": (8, 256), "model.layers.0.self_attn.q_proj": (16, 128)}


def value(code: int, grid: str) -> float:
    return E2M1[code] if grid == "e2m1" else float(code - 8)


def nearest_code(y: float, grid: str) -> int:
    """The rule's rounding, plainly: the nearest grid value, ties to the even code, saturating; -0 keeps its sign."""
    import math

    if grid == "int4":
        return int(min(7, max(-8, round(y)))) + 8  # Python's round is half to even
    mag = min(abs(y), 6.0)
    mags = E2M1[:8]
    best = min(range(8), key=lambda k: (abs(mags[k] - mag), k % 2))  # on a tie the even code
    return best | (8 if math.copysign(1.0, y) < 0 else 0)


def pack(codes: torch.Tensor, dtype) -> torch.Tensor:
    """codes [rows, cols] (0..15), two a byte low nibble first, rows padded to whole words of `dtype`."""
    rows, cols = codes.shape
    per = {torch.uint8: 2, torch.int32: 8}[dtype]
    padded = torch.zeros(rows, -(-cols // per) * per, dtype=torch.uint8)
    padded[:, :cols] = codes
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).contiguous().view(dtype)


def make_weight(fmt: str, rows: int, cols: int, g: torch.Generator) -> dict:
    """One module's tensors in `fmt`, random codes and scales (what compressed-tensors writes: names and dtypes)."""
    _, _, group, grid = FORMATS[fmt]
    codes = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    groups = -(-cols // group)
    if fmt == "mxfp4-pack-quantized":
        return {
            "weight_packed": pack(codes, torch.uint8),
            "weight_scale": torch.randint(118, 124, (rows, groups), generator=g).to(torch.uint8),
        }
    if fmt == "nvfp4-pack-quantized":
        scale = (torch.rand(rows, groups, generator=g) * 2 + 1).to(torch.float8_e4m3fn)
        return {
            "weight_packed": pack(codes, torch.uint8),
            "weight_scale": scale,
            "weight_global_scale": torch.tensor([2048.0]),
        }
    scale = (torch.rand(rows, groups, generator=g) * 0.01 + 0.001).to(torch.bfloat16)
    return {
        "weight_packed": pack(codes, torch.int32),
        "weight_scale": scale,
        "weight_shape": torch.tensor([rows, cols]),
    }


def config(fmt: str) -> dict:
    preset, _, group, grid = FORMATS[fmt]
    weights = {"num_bits": 4, "type": "float" if grid == "e2m1" else "int", "symmetric": True, "group_size": group,
               "strategy": "tensor_group" if fmt.startswith("nv") else "group"}  # fmt: skip
    return {
        "model_type": "llama",
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": fmt,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
            "ignore": ["lm_head"],
        },
    }


def checkpoint(folder, fmt: str, seed: int, extra=None):
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.norm.weight": torch.ones(16, dtype=torch.bfloat16), **(extra or {})}
    for module, (rows, cols) in SHAPES.items():
        for k, t in make_weight(fmt, rows, cols, g).items():
            tensors[f"{module}.{k}"] = t
    return write_checkpoint(folder, tensors, 1, config(fmt))


def decompressed(folder, fmt: str, module: str) -> torch.Tensor:
    """compressed-tensors' own decompression of `module`'s weight, float32."""
    preset, compressor, _, _ = FORMATS[fmt]
    sd = load_file(folder / "model.safetensors")
    local = {k[len(module) + 1 :]: v for k, v in sd.items() if k.startswith(module + ".")}
    scheme = preset_name_to_scheme(preset, ["Linear"])
    return compressor.decompress(local, scheme)["weight"].float()


def ours(folder, module: str, fmt: str) -> torch.Tensor:
    """The rule's decode written plainly: value(code) * scale (/ global), element by element."""
    _, _, group, grid = FORMATS[fmt]
    sd = load_file(folder / "model.safetensors")
    rows, cols = SHAPES[module]
    packed = sd[f"{module}.weight_packed"].contiguous().view(torch.uint8).view(rows, -1)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(rows, -1)[:, :cols]
    scale = sd[f"{module}.weight_scale"]
    s = (
        torch.ldexp(torch.ones(scale.shape), scale.to(torch.int32) - 127)
        if scale.dtype == torch.uint8
        else scale.float()
    )
    if f"{module}.weight_global_scale" in sd:
        s = s / sd[f"{module}.weight_global_scale"].float()
    table = torch.tensor([value(c, grid) for c in range(16)])
    return table[codes.long()] * s.repeat_interleave(group, dim=1)[:, :cols]


def trio(tmp_path, fmt):
    refs = {r: checkpoint(tmp_path / r, fmt, k) for k, r in enumerate(("base", "instruct"))}
    base = {m: ours(refs["base"], m, fmt) for m in SHAPES}
    g = torch.Generator().manual_seed(9)
    tuned = {f"{m}.weight": (w + 0.002 * torch.randn(w.shape, generator=g)).to(torch.bfloat16) for m, w in base.items()}
    tuned["model.norm.weight"] = torch.ones(16, dtype=torch.bfloat16)
    refs["tuned"] = write_checkpoint(tmp_path / "tuned", tuned)
    return refs, tuned


def plus_zero(packed: torch.Tensor) -> torch.Tensor:
    """E2M1 codes with every -0 (code 8) as +0."""
    low, high = packed & 0x0F, packed >> 4
    low, high = torch.where(low == 8, 0, low), torch.where(high == 8, 0, high)
    return (low | (high << 4)).to(torch.uint8)


def merge_args(refs, out, *extra):
    return ["merge", *[x for r in ("base", "tuned", "instruct") for x in (f"--{r}", refs[r])], "--output", out, *extra]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_decoding_equals_compressed_tensors(fmt, tmp_path, cli):
    refs, _ = trio(tmp_path, fmt)
    code, _, err = cli(*merge_args(refs, tmp_path / "out", "--alpha", "0", "--dtype", "float32"))
    assert code == 0, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    for module in SHAPES:
        mine = got[f"{module}.weight"]
        assert torch.equal(mine, ours(refs["instruct"], module, fmt)), module
        theirs = decompressed(refs["instruct"], fmt, module)
        # compressed-tensors decodes in the scale's dtype (bf16 for INT4 and MXFP4): ours, rounded once to it
        assert torch.equal(
            mine.to(theirs.dtype if theirs.dtype != torch.float32 else torch.float32), theirs
        ) or torch.equal(mine.to(torch.bfloat16).float(), theirs), module
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_alpha_zero_gives_back_instruct(fmt, tmp_path, cli):
    refs, _ = trio(tmp_path, fmt)
    code, _, err = cli(*merge_args(refs, tmp_path / "out", "--alpha", "0"))
    assert code == 0, err
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(refs["instruct"] / "model.safetensors")
    assert got.keys() == want.keys()
    for name, t in want.items():
        a, b = got[name].contiguous().view(torch.uint8), t.contiguous().view(torch.uint8)
        if name.endswith("weight_packed") and fmt != "pack-quantized":  # E2M1's -0 may come back as +0 (code 8
            a, b = plus_zero(a), plus_zero(b)  # as 0), as the FP8 contract allows; INT4 has one zero
        assert torch.equal(a, b), name


def assert_rule(out_folder, inst_folder, xs: dict, fmt: str) -> int:
    """Every group of the output against the rule written plainly, for float32 x per module; returns how many
    groups took a new scale."""
    _, _, group, grid = FORMATS[fmt]
    got = load_file(out_folder / "model.safetensors")
    inst = load_file(inst_folder / "model.safetensors")
    keep, top, neg_keep, neg_top = (7.0, 6.0, 7.0, 6.0) if grid == "e2m1" else (7.5, 7.0, 8.5, 8.0)
    rescaled = 0
    for module, x in xs.items():
        rows, cols = SHAPES[module]
        out_codes = got[f"{module}.weight_packed"].contiguous().view(torch.uint8).view(rows, -1)
        out_codes = torch.stack((out_codes & 0xF, out_codes >> 4), dim=-1).view(rows, -1)[:, :cols]
        scale_in, scale_out = inst[f"{module}.weight_scale"], got[f"{module}.weight_scale"]
        g = inst.get(f"{module}.weight_global_scale")

        def eff(s):
            v = 2.0 ** (int(s) - 127) if s.dtype == torch.uint8 else float(s.float())
            return v / float(g) if g is not None else v

        for r in range(rows):
            for k in range(-(-cols // group)):
                blk = x[r, k * group : (k + 1) * group]
                s_in, s_out = eff(scale_in[r, k]), eff(scale_out[r, k])
                high, low = max(0.0, float(blk.max())), max(0.0, -float(blk.min()))
                if high / s_in <= keep and low / s_in <= neg_keep:
                    assert s_out == s_in, (module, r, k)
                else:
                    rescaled += 1
                    assert high / s_out <= top and low / s_out <= neg_top, (module, r, k)
                    if fmt == "mxfp4-pack-quantized":  # the smallest power of two that fits
                        assert high / (s_out / 2) > top or low / (s_out / 2) > neg_top, (module, r, k)
                want = [nearest_code(float(v) / s_out, grid) for v in blk]
                assert out_codes[r, k * group : (k + 1) * group].tolist() == want, (module, r, k)
    return rescaled


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_merge_is_the_rule(fmt, tmp_path, cli):
    refs, tuned = trio(tmp_path, fmt)
    code, _, err = cli(*merge_args(refs, tmp_path / "out"))
    assert code == 0, err
    xs = {
        m: ours(refs["instruct"], m, fmt) + (tuned[f"{m}.weight"].float() - ours(refs["base"], m, fmt)) for m in SHAPES
    }
    assert assert_rule(tmp_path / "out", refs["instruct"], xs, fmt) > 0
    manifest = json.loads((tmp_path / "out" / "graftcore.json").read_text())
    assert 0 < manifest["fp8"]["update_error"]
    code, _, err = cli("verify", tmp_path / "out", "--recompute", 40)
    assert code == 0, err


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_two_deltas_onto_a_packed_instruct(fmt, tmp_path, cli):
    refs, tuned = trio(tmp_path, fmt)
    g = torch.Generator().manual_seed(11)
    tuned2 = {n: (t.float() + 0.003 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for n, t in tuned.items()}
    write_checkpoint(tmp_path / "tuned2", tuned2)
    code, _, err = cli(
        *merge_args(refs, tmp_path / "out", "--tuned", tmp_path / "tuned2", "--alpha", "0.5", "--alpha", "1.5")
    )
    assert code == 0, err
    xs = {}
    for m in SHAPES:
        b = ours(refs["base"], m, fmt)
        d1 = (tuned[f"{m}.weight"].float() - b) * 0.5
        d2 = (tuned2[f"{m}.weight"].float() - b) * 1.5
        xs[m] = ours(refs["instruct"], m, fmt) + d1 + d2  # added left to right, in float32
    assert_rule(tmp_path / "out", refs["instruct"], xs, fmt)


@pytest.mark.parametrize("fmt", ["mxfp4-pack-quantized", "pack-quantized"])
def test_a_lora_adapter_onto_a_packed_instruct(fmt, tmp_path, cli):
    """A PEFT LoRA adapter (as PEFT saves one: adapter_config.json, base_model.model.<module>.lora_A/B.weight) onto
    a 4-bit Instruct: x = deq(I) + (lora_alpha / r) * B @ A, float32, then the rule."""
    from safetensors.torch import save_file

    refs, _ = trio(tmp_path, fmt)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    r, alpha = 4, 8
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "down_proj"],
           "base_model_name_or_path": str(refs["base"]), "task_type": "CAUSAL_LM"}  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(5)
    factors = {}
    for m, (rows, cols) in SHAPES.items():
        factors[m] = (torch.randn(r, cols, generator=g) * 0.05, torch.randn(rows, r, generator=g) * 0.05)
    save_file(
        {f"base_model.model.{m}.lora_{k}.weight": t for m, (a, b) in factors.items() for k, t in (("A", a), ("B", b))},
        adapter / "adapter_model.safetensors",
    )
    code, _, err = cli("merge", "--tuned", adapter, "--instruct", refs["instruct"], "--output", tmp_path / "out")
    assert code == 0, err
    xs = {m: ours(refs["instruct"], m, fmt) + (alpha / r) * (b @ a) for m, (a, b) in factors.items()}
    assert assert_rule(tmp_path / "out", refs["instruct"], xs, fmt) >= 0


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_similarity_measures_decoded_weights(fmt, tmp_path):
    import graftcore

    refs, tuned = trio(tmp_path, fmt)
    report = graftcore.similarity(base=str(refs["base"]), instruct=str(refs["instruct"]), tuned=str(refs["tuned"]),
                                  quiet=True)  # fmt: skip
    for m in SHAPES:
        row = next(t for t in report.tensors if t.name == f"{m}.weight")
        i, b = ours(refs["instruct"], m, fmt).double(), ours(refs["base"], m, fmt).double()
        t = tuned[f"{m}.weight"].double()
        assert row.metrics("instruct")["rel_l2"] == pytest.approx(float((i - b).norm() / b.norm()), rel=1e-6)
        assert row.metrics("tuned")["rel_l2"] == pytest.approx(float((t - b).norm() / b.norm()), rel=1e-6)


def edited(folder, fmt, change):
    """`folder`'s model.safetensors with `change(tensors)` applied (a hostile edit), saved in place."""
    from safetensors.torch import save_file

    sd = load_file(folder / "model.safetensors")
    change(sd)
    save_file(sd, folder / "model.safetensors")


M = "model.layers.0.self_attn.q_proj"
HOSTILE = {
    "missing scale": ("mxfp4-pack-quantized", lambda sd: sd.pop(f"{M}.weight_scale"), f"{M}.weight_packed"),
    "misshapen scale": ("mxfp4-pack-quantized", lambda sd: sd.update({f"{M}.weight_scale": sd[f"{M}.weight_scale"][:, :2].contiguous()}), f"{M}.weight_scale"),  # noqa: E501
    "missing global scale": ("nvfp4-pack-quantized", lambda sd: sd.pop(f"{M}.weight_global_scale"), f"{M}.weight_packed"),  # noqa: E501
    "zero global scale": ("nvfp4-pack-quantized", lambda sd: sd.update({f"{M}.weight_global_scale": torch.tensor([0.0])}), f"{M}.weight_global_scale"),  # noqa: E501
    "zero e4m3 scale": ("nvfp4-pack-quantized", lambda sd: sd[f"{M}.weight_scale"].view(torch.uint8).view(-1).__setitem__(3, 0), f"{M}.weight_scale"),  # noqa: E501
    "nan e4m3 scale": ("nvfp4-pack-quantized", lambda sd: sd[f"{M}.weight_scale"].view(torch.uint8).view(-1).__setitem__(3, 0x7F), f"{M}.weight_scale"),  # noqa: E501
    "e8m0 nan scale": ("mxfp4-pack-quantized", lambda sd: sd[f"{M}.weight_scale"].view(-1).__setitem__(0, 0xFF), f"{M}.weight_scale"),  # noqa: E501
    "weight_shape disagrees": ("pack-quantized", lambda sd: sd.update({f"{M}.weight_shape": torch.tensor([16, 120])}), f"{M}.weight_shape"),  # noqa: E501
    "scale in another dtype": ("nvfp4-pack-quantized", lambda sd: sd.update({f"{M}.weight_scale": sd[f"{M}.weight_scale"].view(torch.uint8)}), f"{M}.weight_scale"),  # noqa: E501
    "stray scale": ("mxfp4-pack-quantized", lambda sd: sd.update({"model.extra.weight_scale": torch.ones(2, 1, dtype=torch.uint8)}), "model.extra.weight_scale"),  # noqa: E501
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_packed_input(case, tmp_path, cli):
    fmt, change, named = HOSTILE[case]
    refs, _ = trio(tmp_path, fmt)
    edited(refs["instruct"], fmt, change)
    code, _, err = cli(*merge_args(refs, tmp_path / "out"))
    assert code == 2 and repr(named) in err and str(refs["instruct"]) in err, (case, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "graftcore.json").exists()


def test_a_packed_module_the_config_ignores_is_refused(tmp_path, cli):
    fmt = "mxfp4-pack-quantized"
    refs, _ = trio(tmp_path, fmt)
    path = refs["instruct"] / "config.json"
    doc = json.loads(path.read_text())
    doc["quantization_config"]["ignore"] = ["lm_head", "re:.*q_proj$"]
    path.write_text(json.dumps(doc))
    code, _, err = cli(*merge_args(refs, tmp_path / "out"))
    assert code == 2 and f"'{M}.weight_packed'" in err and "ignore" in err, err


def test_verify_finds_a_flipped_byte_in_a_packed_weight_and_in_a_scale(tmp_path, cli):
    fmt = "nvfp4-pack-quantized"
    refs, _ = trio(tmp_path, fmt)
    code, _, err = cli(*merge_args(refs, tmp_path / "out"))
    assert code == 0, err
    shard = tmp_path / "out" / "model.safetensors"
    from graftcore.io.safetensors_file import read_header

    for tensor in (f"{M}.weight_packed", f"{M}.weight_scale"):
        info = read_header(shard).tensors[tensor]
        raw = bytearray(shard.read_bytes())
        raw[info.start + 1] ^= 0x10
        shard.write_bytes(bytes(raw))
        code, _, err = cli("verify", tmp_path / "out")
        assert code == 2 and repr(tensor) in err, err
        raw[info.start + 1] ^= 0x10
        shard.write_bytes(bytes(raw))
    code, _, err = cli("verify", tmp_path / "out", "--recompute", 100)
    assert code == 0, err


def test_a_gpu_merge_says_which_formats_ran_on_the_cpu_twin(tmp_path, monkeypatch):
    """No device kernel encodes a 4-bit format: a merge on another compute (here a CpuCompute under another name,
    as the GPU path's routing sees it) computes those tensors on the CPU twin, gives the same bits, and says so."""
    import graftcore
    import graftcore.api as api
    from graftcore.compute.cpu import CpuCompute

    class Elsewhere(CpuCompute):
        name = "elsewhere"

    fmt = "nvfp4-pack-quantized"
    refs, _ = trio(tmp_path, fmt)
    kw = {r: str(p) for r, p in refs.items()}
    graftcore.graft(**kw, output=str(tmp_path / "cpu"), quiet=True)
    monkeypatch.setattr(api, "select_compute", lambda device, chunk, log: Elsewhere(1 << 12))
    report = graftcore.graft(**kw, output=str(tmp_path / "gpu"), quiet=True)
    assert any(f"({fmt}) computed on the CPU twin, not on elsewhere" in n for n in report.notes), report.notes
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "gpu"))
    assert all(torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)) for k in a)
