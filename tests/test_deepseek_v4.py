"""DeepSeek-V4's files as published: block FP8 with E8M0 scales under a `.scale` suffix (transformers'
FineGrainedFP8 quantizer renames `^(.+)\\.scale` to `.weight_scale_inv` on load), `scale_fmt: "ue8m0"`. Decoding
equals transformers' own `Fp8Dequantize`; encoding is the FP8 rule with power-of-two scales written plainly here."""

from __future__ import annotations

import json
import math

import torch
from helpers import E4M3_MAX, e4m3_round, write_checkpoint
from safetensors.torch import load_file

BLOCK = (32, 32)
CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "scale_fmt": "ue8m0",
    "weight_block_size": list(BLOCK),
}
DENSE = {  # DeepSeek-V4's own names, cut to small shapes (48 = one whole and one partial 32-block)
    "layers.0.attn.wq_a.weight": (64, 48),
    "layers.0.attn.wkv.weight": (48, 64),
    "layers.0.ffn.shared_experts.w1.weight": (96, 64),
}


def e8m0_block_quantize(w: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8, E8M0 scale) of a weight, block by block: s = 2 ** ceil(log2(amax / 448)) (1 for a zero block)."""
    rows, cols = w.shape
    bh, bw = block
    grid = (math.ceil(rows / bh), math.ceil(cols / bw))
    scale = torch.empty(grid)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            x = w[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw].float()
            amax = float(x.abs().max())
            s = 2.0 ** math.ceil(math.log2(amax / E4M3_MAX)) if amax > 0 else 1.0
            scale[i, j] = s
            q[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw] = e4m3_round((x / s).clamp(-E4M3_MAX, E4M3_MAX))
    return q, scale.to(torch.float8_e8m0fnu)


def v4_checkpoint(folder, weights: dict[str, torch.Tensor], extra: dict | None = None):
    tensors = dict(extra or {})
    for name, w in weights.items():
        tensors[name], tensors[name[: -len("weight")] + "scale"] = e8m0_block_quantize(w)
    config = {"model_type": "deepseek_v4", "quantization_config": CONFIG}
    return write_checkpoint(folder, tensors, 1, config)


def decoded(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 of every element, by index: q * the E8M0 scale of its block."""
    r = torch.arange(q.shape[0]).view(-1, 1) // BLOCK[0]
    c = torch.arange(q.shape[1]).view(1, -1) // BLOCK[1]
    return q.float() * scale.float()[r, c]


def requantize_e8m0(x: torch.Tensor, kept: torch.Tensor):
    """The FP8 rule with power-of-two scales, block by block: keep Instruct's s while every |x| / s <= 464, else
    the smallest power of two s with amax / s <= 448; q = x / s round-to-nearest-even, saturating."""
    bh, bw = BLOCK
    scale = kept.float().clone()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = x[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw]
            s = float(scale[i, j])
            amax = float(blk.abs().max())
            if amax / s > 464:
                s = 2.0 ** math.ceil(math.log2(amax / E4M3_MAX))
            scale[i, j] = s
            q[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw] = e4m3_round((blk / s).clamp(-E4M3_MAX, E4M3_MAX))
    return q.view(torch.uint8), scale.to(torch.float8_e8m0fnu)


def trio(tmp_path, update=0.01):
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=g) * 0.05 for n, s in DENSE.items()}
    inst = {n: w + torch.randn(w.shape, generator=g) * 0.01 for n, w in base.items()}
    tuned = {n: (w + torch.randn(w.shape, generator=g) * update).to(torch.bfloat16) for n, w in base.items()}
    tuned["embed.weight"] = torch.randn(16, 8, generator=g).to(torch.bfloat16)
    bf16 = {"embed.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16)}
    refs = {
        "base": v4_checkpoint(tmp_path / "base", base, {"embed.weight": tuned["embed.weight"]}),
        "tuned": write_checkpoint(tmp_path / "tuned", tuned),
        "instruct": v4_checkpoint(tmp_path / "instruct", inst, bf16),
    }
    return refs, tuned


def args(refs, out, *extra):
    return ["merge", *[x for r in ("base", "tuned", "instruct") for x in (f"--{r}", refs[r])], "--output", out, *extra]


def test_decoding_equals_transformers_fp8_dequantize(tmp_path, cli):
    """`--alpha 0 --dtype float32` writes deq(Instruct) exactly; transformers' Fp8Dequantize gives the same."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    refs, _ = trio(tmp_path)
    code, _, err = cli(*args(refs, tmp_path / "out", "--alpha", "0", "--dtype", "float32"))
    assert code == 0, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    stored = load_file(refs["instruct"] / "model.safetensors")
    for name in DENSE:
        q, s = stored[name], stored[name[: -len("weight")] + "scale"]
        assert s.dtype == torch.float8_e8m0fnu
        assert torch.equal(got[name], decoded(q, s)), name
        if all(d % b == 0 for d, b in zip(q.shape, BLOCK)):  # transformers' dequant takes whole blocks only
            assert torch.equal(got[name], Fp8Dequantize(None)._dequantize_one(q, s, torch.float32)), name
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_the_merge_keeps_e8m0_scales_under_their_names(tmp_path, cli):
    refs, tuned = trio(tmp_path, update=0.05)
    code, _, err = cli(*args(refs, tmp_path / "out"))
    assert code == 0, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    b = load_file(refs["base"] / "model.safetensors")
    i = load_file(refs["instruct"] / "model.safetensors")
    rescaled = 0
    for name in DENSE:
        scale_name = name[: -len("weight")] + "scale"
        x = decoded(i[name], i[scale_name]) + (tuned[name].float() - decoded(b[name], b[scale_name]))
        q, s = requantize_e8m0(x, i[scale_name])
        assert got[scale_name].dtype == torch.float8_e8m0fnu and torch.equal(
            got[scale_name].view(torch.uint8), s.view(torch.uint8)
        )
        assert torch.equal(got[name].view(torch.uint8), q), name
        rescaled += int((s.view(torch.uint8) != i[scale_name].view(torch.uint8)).sum())
    assert rescaled > 0  # the update is large enough that some blocks took a new scale
    assert "layers.0.attn.wq_a.weight_scale_inv" not in got
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == CONFIG
    code, _, err = cli("verify", tmp_path / "out", "--recompute", 50)
    assert code == 0, err


def test_an_e8m0_nan_scale_is_refused(tmp_path, cli):
    refs, _ = trio(tmp_path)
    path = refs["instruct"] / "model.safetensors"
    sd = load_file(path)
    s = sd["layers.0.attn.wkv.scale"].view(torch.uint8).clone()
    s.view(-1)[1] = 0xFF  # E8M0's NaN
    sd["layers.0.attn.wkv.scale"] = s.view(torch.float8_e8m0fnu)
    from safetensors.torch import save_file

    save_file(sd, path)
    code, _, err = cli(*args(refs, tmp_path / "out"))
    assert code == 2 and "'layers.0.attn.wkv.scale'" in err and str(path) in err and "NaN" in err, err
    assert not (tmp_path / "out" / "graftcore.json").exists()


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
EXPERTS = {
    f"layers.1.ffn.experts.{e}.{w}.weight": (64, 96) if w != "w2" else (96, 64)
    for e in range(2)
    for w in ("w1", "w2", "w3")
}


def fp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(I8 [out, in / 2] two E2M1 codes a byte low nibble first, E8M0 [out, in / 32]) of a weight, as DeepSeek-V4
    stores its routed experts: s = 2 ** ceil(log2(amax / 6)) per 32 inputs, codes the nearest value (ties even)."""
    rows, cols = w.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scale = torch.empty(rows, cols // 32)
    mags = torch.tensor(E2M1[:8])
    for r in range(rows):
        for k in range(cols // 32):
            x = w[r, k * 32 : (k + 1) * 32].float()
            amax = float(x.abs().max())
            s = 2.0 ** math.ceil(math.log2(amax / 6)) if amax > 0 else 1.0
            scale[r, k] = s
            for j, v in enumerate((x / s).tolist()):
                d = (mags - min(abs(v), 6.0)).abs()
                best = min(range(8), key=lambda c: (float(d[c]), c % 2))
                codes[r, k * 32 + j] = best | (8 if v < 0 else 0)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), scale.to(torch.float8_e8m0fnu)


def fp4_decoded(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    u8 = packed.view(torch.uint8)
    codes = torch.stack((u8 & 0xF, u8 >> 4), dim=-1).view(u8.shape[0], -1).long()
    return torch.tensor(E2M1)[codes] * scale.float().repeat_interleave(32, dim=1)


def test_fp8_base_experts_beside_fp4_instruct_experts(tmp_path, cli):
    """The DeepSeek-V4 pair: V4-Flash-Base stores routed experts in block FP8 (`expert_dtype: fp8`), V4-Flash in
    FP4 (`expert_dtype: fp4`); tuned bf16. Each input decodes in its own format; the output's experts are FP4 by
    the rule; Instruct's FP4 decodes as transformers' Fp8Dequantize decodes it."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    g = torch.Generator().manual_seed(3)
    base_w = {n: torch.randn(s, generator=g) * 0.05 for n, s in {**DENSE, **EXPERTS}.items()}
    inst_w = {n: w + torch.randn(w.shape, generator=g) * 0.01 for n, w in base_w.items()}
    tuned = {n: (w + torch.randn(w.shape, generator=g) * 0.02).to(torch.bfloat16) for n, w in base_w.items()}
    base_t, inst_t = {}, {}
    for n, w in base_w.items():
        base_t[n], base_t[n[: -len("weight")] + "scale"] = e8m0_block_quantize(w)
    for n, w in inst_w.items():
        quantize = fp4_quantize if n in EXPERTS else e8m0_block_quantize
        inst_t[n], inst_t[n[: -len("weight")] + "scale"] = quantize(w)
    v4 = {"model_type": "deepseek_v4"}
    refs = {
        "base": write_checkpoint(tmp_path / "base", base_t, 1, {**v4, "quantization_config": CONFIG}),
        "tuned": write_checkpoint(tmp_path / "tuned", tuned),
        "instruct": write_checkpoint(
            tmp_path / "instruct", inst_t, 1, {**v4, "quantization_config": {**CONFIG, "expert_dtype": "fp4"}}
        ),
    }
    code, _, err = cli(*args(refs, tmp_path / "deq", "--alpha", "0", "--dtype", "float32"))
    assert code == 0, err
    deq = load_file(tmp_path / "deq" / "model.safetensors")
    for n in EXPERTS:
        q, s = inst_t[n], inst_t[n[: -len("weight")] + "scale"]
        assert torch.equal(deq[n], fp4_decoded(q, s)), n
        assert torch.equal(deq[n], Fp8Dequantize(None)._dequantize_one(q, s, torch.float32)), n

    code, _, err = cli(*args(refs, tmp_path / "out"))
    assert code == 0, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    for n in EXPERTS:
        scale_name = n[: -len("weight")] + "scale"
        x = fp4_decoded(inst_t[n], inst_t[scale_name]) + (tuned[n].float() - decoded(base_t[n], base_t[scale_name]))
        assert got[n].dtype == torch.int8 and got[scale_name].dtype == torch.float8_e8m0fnu
        out = fp4_decoded(got[n], got[scale_name])
        s = got[scale_name].float().repeat_interleave(32, dim=1)
        kept = inst_t[scale_name].float().repeat_interleave(32, dim=1)
        amax_ratio = (x.abs() / kept).view(x.shape[0], -1, 32).amax(dim=2).repeat_interleave(32, dim=1)
        assert torch.equal(s == kept, amax_ratio <= 7), n  # Instruct's scale kept exactly where it holds
        # every code the nearest grid value of x / s (ties even): |out - x| / s at most half a grid step
        step = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0])[
            (out.abs() / s * 2).clamp(max=7).long().clamp(max=7)
        ]
        assert bool(((out - x).abs() / s <= step / 2 + 1e-6).all() | ((x / s).abs() > 6).any()), n
    for n in DENSE:
        assert got[n].dtype == torch.float8_e4m3fn, n
    manifest = json.loads((tmp_path / "out" / "graftcore.json").read_text())
    assert set(EXPERTS) <= set(manifest["fp8"]["tensors"])
    code, _, err = cli("verify", tmp_path / "out", "--recompute", 40)
    assert code == 0, err


def test_fp4_experts_the_config_does_not_declare_are_refused(tmp_path, cli):
    """I8 expert weights with `.scale` beside them, but a config without `expert_dtype: fp4` (or an expert that lost
    its scale): exit 2 naming the tensor, never a copy of Instruct's experts with the update dropped."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 96, generator=g) * 0.05
    q, s = fp4_quantize(w)
    name = "layers.1.ffn.experts.0.w1.weight"
    base = v4_checkpoint(tmp_path / "base", {n: torch.randn(sh, generator=g) * 0.05 for n, sh in DENSE.items()})
    dq, ds = e8m0_block_quantize(torch.randn(64, 48, generator=g) * 0.05)
    dense = {"layers.0.attn.wq_a.weight": dq, "layers.0.attn.wq_a.scale": ds}
    for case, tensors, cfg in (
        ("undeclared", {**dense, name: q, name[: -len("weight")] + "scale": s}, CONFIG),
        ("no scale", {**dense, name: q}, {**CONFIG, "expert_dtype": "fp4"}),
    ):
        inst = write_checkpoint(tmp_path / case, tensors, 1, {"model_type": "deepseek_v4", "quantization_config": cfg})
        tuned = write_checkpoint(tmp_path / f"tuned-{case}", {name: w.bfloat16()})
        code, _, err = cli("merge", "--base", base, "--tuned", tuned, "--instruct", inst, "--output", tmp_path / "o")
        assert code == 2 and repr(name) in err and str(inst) in err, (case, err)


def test_an_integer_instruct_tensor_with_a_float_counterpart_is_refused(tmp_path, cli):
    w = torch.randn(4, 8)
    norm = {"n.weight": torch.ones(4, dtype=torch.bfloat16)}
    base = write_checkpoint(tmp_path / "base", {"a.weight": w.bfloat16(), **norm})
    tuned = write_checkpoint(tmp_path / "tuned", {"a.weight": (w + 0.1).bfloat16(), **norm})
    inst = write_checkpoint(tmp_path / "inst", {"a.weight": torch.zeros(4, 4, dtype=torch.int8), **norm})
    code, _, err = cli("merge", "--base", base, "--tuned", tuned, "--instruct", inst, "--output", tmp_path / "o")
    assert code == 2 and "'a.weight'" in err and "I8[4, 4]" in err and "BF16[4, 8]" in err, err


def test_an_odd_dtype_in_base_and_instruct_only_is_refused(tmp_path, cli):
    odd = {"extra.e8m0": torch.tensor([0.5, 1.0]).to(torch.float8_e8m0fnu)}
    norm = {"n.weight": torch.ones(4, dtype=torch.bfloat16)}
    base = write_checkpoint(tmp_path / "base", {**norm, **odd})
    tuned = write_checkpoint(tmp_path / "tuned", norm)
    inst = write_checkpoint(tmp_path / "inst", {**norm, **odd})
    code, _, err = cli("merge", "--base", base, "--tuned", tuned, "--instruct", inst, "--output", tmp_path / "o")
    assert code == 2 and "'extra.e8m0'" in err and "base" in err, err
