"""FP8 checkpoints (block-scaled, as DeepSeek-V3 and Qwen3-FP8 ship them): read anywhere a bf16 tensor is read,
written in Instruct's format by default, every byte against the rule written plainly in helpers.py."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    dequantize_fp8,
    e4m3_round,
    is_quantized,
    load_folder,
    perturbed,
    quantize_fp8,
    requantize_reference,
    same_bits,
    tiny_qwen3,
    write_checkpoint,
    write_fp8_checkpoint,
)

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

BLOCK = (32, 32)  # small blocks, so that tiny weights hold several, and partial edge ones (48 = 32 + 16)


def qwen3(seed: int = 0):
    return tiny_qwen3(seed)


def state(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def config_of(model) -> dict:
    return model.config.to_dict()


def fp8_trio(tmp_path, scale_dtype=torch.float32, shards=1, tuned_scale=0.002, block=BLOCK):
    """Base and Instruct in FP8 (Instruct = Base + a larger change, then quantized), tuned in bf16: a fine-tune of
    the dequantized Base, as users make it. Returns the three state dicts as written."""
    model = qwen3()
    base_sd = state(model)
    instruct_sd = state(perturbed(qwen3(), 2, 0.01))
    write_fp8_checkpoint(tmp_path / "base", base_sd, config_of(model), block, scale_dtype, shards)
    write_fp8_checkpoint(tmp_path / "instruct", instruct_sd, config_of(model), block, scale_dtype, shards)
    base, instruct = load_folder(tmp_path / "base"), load_folder(tmp_path / "instruct")
    g = torch.Generator().manual_seed(5)
    tuned = {}
    for n in base:
        if n.endswith("_scale_inv"):
            continue
        x = deq(base, n, block)
        tuned[n] = (x + tuned_scale * torch.randn(x.shape, generator=g)).to(torch.bfloat16)
    write_checkpoint(tmp_path / "tuned", tuned, 1, config_of(model))
    return base, tuned, instruct


def deq(sd: dict, name: str, block=BLOCK) -> torch.Tensor:
    """A weight's float32 values: decoded with its scales when it is FP8."""
    t = sd[name]
    if t.dtype == torch.float8_e4m3fn:
        return dequantize_fp8(t, sd[name[: -len("weight")] + "weight_scale_inv"], block)
    return t.float()


def merge(cli, tmp_path, *extra, out="out"):
    return cli(
        "merge",
        "--base",
        tmp_path / "base",
        "--tuned",
        tmp_path / "tuned",
        "--instruct",
        tmp_path / "instruct",
        "--output",
        tmp_path / out,
        "--quiet",
        *extra,
    )


@pytest.mark.parametrize("scale_dtype,shards", [(torch.float32, 1), (torch.bfloat16, 2)])
def test_fp8_base_and_instruct_with_a_bf16_fine_tune(scale_dtype, shards, tmp_path, cli):
    """The usual flow: FP8 Base and Instruct, tuned bf16. The output is FP8 with Instruct's names, grid, scale
    dtype and config; every weight byte and scale equal to the rule applied to x = deq(I) + (T - deq(B)) in
    float32; the unquantized tensors are the plain bf16 formula. Scales F32 (DeepSeek) or BF16 (Qwen3-FP8), also
    each in the other shard than its weight."""
    base, tuned, instruct = fp8_trio(tmp_path, scale_dtype, shards)
    code, _, err = merge(cli, tmp_path)
    assert code == 0, err
    got = load_folder(tmp_path / "out")
    assert set(got) == set(instruct)
    quantized = [n for n in instruct if instruct[n].dtype == torch.float8_e4m3fn]
    assert len(quantized) == 2 * 7
    for n, i in instruct.items():
        if n.endswith("_scale_inv"):
            continue
        x = deq(instruct, n) + (tuned[n].float() - deq(base, n))
        if n in quantized:
            scale_name = n[: -len("weight")] + "weight_scale_inv"
            q, s = requantize_reference(x, instruct[scale_name], BLOCK, scale_dtype)
            assert torch.equal(got[n].view(torch.uint8), q), n
            assert got[scale_name].dtype == scale_dtype and same_bits(got[scale_name], s), n
        else:
            assert same_bits(got[n], x.to(i.dtype)), n
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == list(BLOCK)
    manifest = json.loads((tmp_path / "out" / "graftcore.json").read_text())
    assert 0 < manifest["fp8"]["update_error"] and set(manifest["fp8"]["tensors"]) == set(quantized)
    code, out, err = cli("verify", tmp_path / "out")
    assert code == 0, err


def test_alpha_zero_gives_back_instruct(tmp_path, cli):
    """alpha = 0: every weight and scale byte of the FP8 output is Instruct's (a -0 may come back as +0)."""
    fp8_trio(tmp_path)
    code, _, err = merge(cli, tmp_path, "--alpha", "0")
    assert code == 0, err
    got, instruct = load_folder(tmp_path / "out"), load_folder(tmp_path / "instruct")
    for n, i in instruct.items():
        a, b = got[n], i
        if i.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8).clone(), b.view(torch.uint8).clone()
            b[b == 0x80] = 0  # -0 + 0 = +0
        assert same_bits(a, b), n


def test_tuned_equal_to_base_gives_back_instruct(tmp_path, cli):
    """All three FP8, tuned = Base: the update is zero and the output is Instruct's bytes."""
    model = qwen3()
    sd = state(model)
    write_fp8_checkpoint(tmp_path / "base", sd, config_of(model), BLOCK)
    write_fp8_checkpoint(tmp_path / "tuned", sd, config_of(model), BLOCK)
    write_fp8_checkpoint(tmp_path / "instruct", state(perturbed(qwen3(), 2, 0.01)), config_of(model), BLOCK)
    code, _, err = merge(cli, tmp_path)
    assert code == 0, err
    got, instruct = load_folder(tmp_path / "out"), load_folder(tmp_path / "instruct")
    for n, i in instruct.items():
        a, b = (x.view(torch.uint8).clone() if x.dtype == torch.float8_e4m3fn else x for x in (got[n], i))
        if i.dtype == torch.float8_e4m3fn:
            b[b == 0x80] = 0
        assert same_bits(a, b), n
    manifest = json.loads((tmp_path / "out" / "graftcore.json").read_text())
    assert manifest["fp8"]["update_error"] == 0 and manifest["fp8"]["rescaled_blocks"] == 0


@pytest.mark.parametrize("kind", ["all fp8", "bf16 base", "bf16 instruct"])
def test_any_mix_of_fp8_and_bf16(kind, tmp_path, cli):
    """All three FP8; a dequantized (bf16) Base with an FP8 Instruct; FP8 Base and tuned onto a bf16 Instruct
    (output bf16, one rounding of the float32 sum of decoded values)."""
    model = qwen3()
    config = config_of(model)
    sds = {
        "base": state(model),
        "tuned": state(perturbed(qwen3(), 1, 0.002)),
        "instruct": state(perturbed(qwen3(), 2, 0.01)),
    }
    plain = {"bf16 base": "base", "bf16 instruct": "instruct"}.get(kind)
    for role, sd in sds.items():
        if role == plain:
            write_checkpoint(tmp_path / role, sd, 1, config)
        else:
            write_fp8_checkpoint(tmp_path / role, sd, config, BLOCK)
    code, _, err = merge(cli, tmp_path)
    assert code == 0, err
    base, tuned, instruct = (load_folder(tmp_path / r) for r in ("base", "tuned", "instruct"))
    got = load_folder(tmp_path / "out")
    assert set(got) == set(instruct)
    for n, i in instruct.items():
        if n.endswith("_scale_inv"):
            continue
        x = deq(instruct, n) + (deq(tuned, n) - deq(base, n))
        if i.dtype == torch.float8_e4m3fn:
            scale_name = n[: -len("weight")] + "weight_scale_inv"
            q, s = requantize_reference(x, instruct[scale_name], BLOCK)
            assert torch.equal(got[n].view(torch.uint8), q) and same_bits(got[scale_name], s), n
        else:
            assert same_bits(got[n], x.to(i.dtype)), n


def test_dequantized_output(tmp_path, cli):
    """--dtype bfloat16: a bf16 model, scales dropped, quantization_config removed, torch_dtype set; each weight
    the one rounding of x; it loads with transformers and runs."""
    base, tuned, instruct = fp8_trio(tmp_path)
    code, _, err = merge(cli, tmp_path, "--dtype", "bfloat16")
    assert code == 0 and "quantization_config removed" in err, err
    got = load_folder(tmp_path / "out")
    assert set(got) == {n for n in instruct if not n.endswith("_scale_inv")}
    for n, t in got.items():
        x = deq(instruct, n) + (tuned[n].float() - deq(base, n))
        assert same_bits(t, x.to(torch.bfloat16)), n
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, got["model.layers.0.mlp.down_proj.weight"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_transformers_reads_the_fp8_output(tmp_path, cli):
    """transformers' own FP8 loader (FineGrainedFP8Config(dequantize=True): it needs block-divisible shapes, so
    16x16 blocks here) reads the output, and its weights are the output's bytes decoded as helpers.py does."""
    fp8_trio(tmp_path, block=(16, 16))
    code, _, err = merge(cli, tmp_path)
    assert code == 0, err
    got = load_folder(tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.float32
    )
    weights = dict(model.named_parameters())
    quantized = [n for n, t in got.items() if t.dtype == torch.float8_e4m3fn]
    assert quantized
    for n in quantized:
        want = dequantize_fp8(got[n], got[n[: -len("weight")] + "weight_scale_inv"], (16, 16))
        assert torch.equal(weights[n].float(), want), n


def test_lora_onto_an_fp8_instruct(tmp_path, cli):
    """A PEFT LoRA trained on the (dequantized) Base, grafted onto an FP8 Instruct: FP8 out, each block's scale
    the rule's for x = deq(I) + s * B @ A (float64 here, rounded to float32), weights within one FP8 step of the
    rule's bytes (the float32 GEMM's summation order is not the test's)."""
    from helpers import make_adapter

    model = qwen3()
    model.save_pretrained(tmp_path / "base")
    write_fp8_checkpoint(tmp_path / "instruct", state(perturbed(qwen3(), 2, 0.01)), config_of(model), BLOCK)
    adapter = make_adapter(
        tmp_path / "base", tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]
    )
    code, _, err = cli(
        "merge", "--tuned", adapter, "--instruct", tmp_path / "instruct", "--output", tmp_path / "out", "--quiet"
    )
    assert code == 0, err
    from safetensors.torch import load_file

    factors = load_file(adapter / "adapter_model.safetensors")
    instruct, got = load_folder(tmp_path / "instruct"), load_folder(tmp_path / "out")
    adapted = 0
    for n, i in instruct.items():
        if i.dtype != torch.float8_e4m3fn:
            continue
        key = "base_model.model." + n[: -len(".weight")]
        scale_name = n[: -len("weight")] + "weight_scale_inv"
        if key + ".lora_A.weight" not in factors:
            assert torch.equal(got[n].view(torch.uint8), i.view(torch.uint8)), n
            continue
        a, b = factors[key + ".lora_A.weight"].double(), factors[key + ".lora_B.weight"].double()
        x = (deq(instruct, n).double() + 2.0 * (b @ a)).float()
        q, s = requantize_reference(x, instruct[scale_name], BLOCK)
        mine = dequantize_fp8(got[n], got[scale_name], BLOCK)
        ref = dequantize_fp8(q.view(torch.float8_e4m3fn), s, BLOCK)
        assert (mine - ref).abs().le(ref.abs() / 8 + 1e-9).all(), n  # within one E4M3 step
        assert (got[n].view(torch.uint8) == q).float().mean() > 0.99, n
        adapted += 1
    assert adapted == 2 * 2


def test_similarity_measures_decoded_weights(tmp_path, cli):
    """similarity on FP8 inputs measures every weight decoded with its scales (sigma against float64 math over
    the decoded values) and never lists a scale tensor."""
    base, tuned, instruct = fp8_trio(tmp_path)
    code, _, err = cli(
        "similarity",
        "--base",
        tmp_path / "base",
        "--tuned",
        tmp_path / "tuned",
        "--instruct",
        tmp_path / "instruct",
        "--output",
        tmp_path / "sim",
    )
    assert code == 0 and "not measured" not in err, err
    doc = json.loads((tmp_path / "sim" / "similarity.json").read_text())
    text = json.dumps(doc)
    assert "scale_inv" not in text
    names = [n for n in instruct if not n.endswith("_scale_inv")]
    i = [deq(instruct, n).double() for n in names]
    b = [deq(base, n).double() for n in names]
    sigma = sum(float((x - y).abs().sum()) for x, y in zip(i, b)) / sum(
        float(x.abs().sum() + y.abs().sum()) for x, y in zip(i, b)
    )
    got = doc["model"]["pairs"]["instruct"]["sigma"]
    assert doc["coverage"] == 1.0 and abs(got - sigma) < 1e-9, (got, sigma)


def test_verify_recomputes_fp8_chunks(tmp_path, cli):
    """verify --recompute recomputes FP8 block rows and their scales bit-exact, and catches a scale changed in
    the shard (its sha256 fixed up in graftcore.json, so only the recomputation can see it)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    fp8_trio(tmp_path)
    code, _, err = merge(cli, tmp_path, "--chunk-size", "64")
    assert code == 0, err
    code, out, err = cli("verify", tmp_path / "out", "--recompute", "1000")
    assert code == 0 and "bit-exact" in out, err
    shard = tmp_path / "out" / "model.safetensors"
    tensors = load_file(shard)
    name = "model.layers.1.mlp.up_proj.weight_scale_inv"
    tensors[name][0, 0] *= 2
    save_file(tensors, shard, metadata={"format": "pt"})
    manifest_path = tmp_path / "out" / "graftcore.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"]["model.safetensors"].update(
        size=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest()
    )
    manifest_path.write_text(json.dumps(manifest))
    code, out, err = cli("verify", tmp_path / "out")
    assert code == 0, err  # sha256, headers and plan hold: only the values changed
    code, out, err = cli("verify", tmp_path / "out", "--recompute", "1000")
    assert code == 2 and name in err and "differ" in err, err


def mutate(folder, fn=None, config=None):
    """Rewrite the one-shard checkpoint `folder`: tensors through fn(dict) -> dict, config.json through config."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    if fn is not None:
        save_file(fn(load_file(path)), path, metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config(cfg)))


SCALE = "model.layers.1.mlp.down_proj.weight_scale_inv"
WEIGHT = "model.layers.1.mlp.down_proj.weight"


def set_value(value):
    def fn(t):
        t[SCALE][0, 0] = value
        return t

    return fn


HOSTILE = {
    "missing scale": (lambda t: {k: v for k, v in t.items() if k != SCALE}, None, WEIGHT),
    "scale of the wrong shape": (lambda t: {**t, SCALE: t[SCALE][:1]}, None, SCALE),
    "scale of the wrong dtype": (lambda t: {**t, SCALE: t[SCALE].to(torch.int32)}, None, SCALE),
    "NaN scale": (set_value(float("nan")), None, SCALE),
    "Inf scale": (set_value(float("inf")), None, SCALE),
    "zero scale": (set_value(0.0), None, SCALE),
    "negative scale": (set_value(-0.001), None, SCALE),
    "no quantization_config": (
        None,
        lambda c: {k: v for k, v in c.items() if k != "quantization_config"},
        "is F8_E4M3, but",  # names the first FP8 tensor it meets
    ),
    "block size other than the config's": (
        None,
        lambda c: {**c, "quantization_config": {**c["quantization_config"], "weight_block_size": [16, 16]}},
        "weight_scale_inv",
    ),
    "E5M2 where E4M3 is declared": (lambda t: {**t, WEIGHT: t[WEIGHT].float().to(torch.float8_e5m2)}, None, WEIGHT),
    "a scale without its weight": (
        lambda t: {**t, "model.layers.0.mlp.gate.weight_scale_inv": t[SCALE].clone()},
        None,
        "gate",
    ),
    "fp8 declared, none stored": (
        lambda t: {
            k: deq(t, k).to(torch.bfloat16) if v.dtype == torch.float8_e4m3fn else v
            for k, v in t.items()
            if not k.endswith("_scale_inv")
        },
        None,
        "quantization_config",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("role", ["instruct", "base"])
def test_hostile_fp8_input(case, role, tmp_path, cli):
    """Each broken FP8 input: exit 2, one line naming the file and the tensor (or the config), no traceback,
    nothing that looks like a finished output."""
    fp8_trio(tmp_path)
    fn, config, named = HOSTILE[case]
    mutate(tmp_path / role, fn, config)
    code, _, err = merge(cli, tmp_path)
    assert code == 2, (case, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert named in err and str(tmp_path / role) in err, err
    assert not (tmp_path / "out" / "graftcore.json").exists()
    assert not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True


def test_inputs_in_another_block_size_than_instruct(tmp_path, cli):
    """Base quantized in 16x16 blocks, Instruct in 32x32: each input decoded on its own grid, the output in
    Instruct's (this was exit 2 until each input could decode in its own format)."""
    model = qwen3()
    config = config_of(model)
    write_fp8_checkpoint(tmp_path / "base", state(model), config, (16, 16))
    write_checkpoint(tmp_path / "tuned", state(perturbed(qwen3(), 1, 0.002)), 1, config)
    write_fp8_checkpoint(tmp_path / "instruct", state(perturbed(qwen3(), 2, 0.01)), config, BLOCK)
    code, _, err = merge(cli, tmp_path)
    assert code == 0, err
    got = load_folder(tmp_path / "out")
    base, tuned, instruct = (load_folder(tmp_path / r) for r in ("base", "tuned", "instruct"))
    checked = 0
    for n, t in tuned.items():
        if not n.endswith("weight") or n[: -len("weight")] + "weight_scale_inv" not in instruct:
            continue
        x = deq(instruct, n) + (t.float() - deq(base, n, (16, 16)))
        q, s = requantize_reference(x, instruct[n[: -len("weight")] + "weight_scale_inv"], BLOCK)
        assert torch.equal(got[n].view(torch.uint8), q), n
        checked += 1
    assert checked > 0


def compressed_tensors_fp8(sd: dict, strategy: str) -> dict:
    """A compressed-tensors "float-quantized" state dict (the RedHatAI -FP8-dynamic layout): NAME.weight F8_E4M3
    and NAME.weight_scale in the weights' dtype, one per output channel [out, 1] or one per tensor [1]."""
    out = {}
    for n, t in sd.items():
        if not is_quantized(n, t):
            out[n] = t
            continue
        block = (1, t.shape[1]) if strategy == "channel" else tuple(t.shape)
        q, s = quantize_fp8(t, block, torch.bfloat16)
        out[n], out[n[: -len("weight")] + "weight_scale"] = q, s if strategy == "channel" else s.view(1)
    return out


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_fp8_instruct(strategy, tmp_path, cli):
    """A compressed-tensors FP8 Instruct (per-channel or per-tensor BF16 weight_scale) over bf16 Base and tuned:
    FP8 out in Instruct's format, every byte and scale the rule's with blocks of one row or the whole tensor."""
    model = qwen3()
    config = config_of(model)
    base, tuned = state(model), state(perturbed(qwen3(), 1, 0.002))
    instruct_sd = compressed_tensors_fp8(state(perturbed(qwen3(), 2, 0.01)), strategy)
    write_checkpoint(tmp_path / "base", base, 1, config)
    write_checkpoint(tmp_path / "tuned", tuned, 1, config)
    quant = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": strategy}}
        },
        "ignore": ["lm_head"],
    }
    write_checkpoint(tmp_path / "instruct", instruct_sd, 1, {**config, "quantization_config": quant})
    code, _, err = merge(cli, tmp_path)
    assert code == 0, err
    got = load_folder(tmp_path / "out")
    assert set(got) == set(instruct_sd)
    quantized = 0
    for n, i in instruct_sd.items():
        if n.endswith("weight_scale"):
            continue
        if i.dtype != torch.float8_e4m3fn:
            assert same_bits(got[n], (i.float() + tuned[n].float() - base[n].float()).to(i.dtype)), n
            continue
        scale_name = n[: -len("weight")] + "weight_scale"
        block = (1, i.shape[1]) if strategy == "channel" else tuple(i.shape)
        grid = instruct_sd[scale_name].view(-1, 1)
        x = dequantize_fp8(i, grid, block) + (tuned[n].float() - base[n].float())
        q, s = requantize_reference(x, grid, block, torch.bfloat16)
        assert torch.equal(got[n].view(torch.uint8), q), n
        assert same_bits(got[scale_name], s.view(instruct_sd[scale_name].shape)), n
        quantized += 1
    assert quantized == 14


def test_e4m3_cast_rounds_to_nearest_even():
    """The encoder's cast (torch's float32 -> float8_e4m3fn) against the table rounding of helpers.py, on every
    midpoint between two neighbouring codes (where the tie goes to the even code), just beside each, and on
    random values: the rule's "round-to-nearest-even" holds on the CPU twin's path."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = torch.unique(codes[torch.isfinite(codes)])
    mid = (values[1:] + values[:-1]) / 2  # exact in float32: E4M3 has 3 mantissa bits
    y = torch.cat([mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1), torch.randn(10000) * 50])
    y = y.clamp(-448, 448)
    assert torch.equal(y.to(torch.float8_e4m3fn).view(torch.uint8), e4m3_round(y).view(torch.uint8))


def test_nan_in_an_update_of_an_fp8_tensor(tmp_path, cli):
    """A NaN in tuned's weight of an FP8 tensor: exit 2 naming the tensor (nothing finished); with
    --allow-nonfinite the element is the canonical NaN code 0x7F and its block keeps Instruct's scale."""
    from safetensors.torch import load_file, save_file

    fp8_trio(tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors = load_file(tmp_path / "tuned" / "model.safetensors")
    tensors[name][3, 5] = float("nan")
    save_file(tensors, tmp_path / "tuned" / "model.safetensors", metadata={"format": "pt"})
    code, _, err = merge(cli, tmp_path)
    assert code == 2 and name in err and "NaN/Inf" in err, err
    assert not (tmp_path / "out" / "graftcore.json").exists()
    code, _, err = merge(cli, tmp_path, "--allow-nonfinite", out="kept")
    assert code == 0, err
    got, instruct = load_folder(tmp_path / "kept"), load_folder(tmp_path / "instruct")
    assert got[name].view(torch.uint8)[3, 5] == 0x7F
    scale = name[: -len("weight")] + "weight_scale_inv"
    assert got[scale][0, 0] == instruct[scale][0, 0]


def test_several_deltas_onto_fp8(tmp_path, cli):
    """Two bf16 fine-tunes of the dequantized Base with their alphas, in one pass onto FP8 Instruct: every byte and
    scale the rule's for x = deq(I) + 0.7 * (T1 - deq(B)) + 0.5 * (T2 - deq(B)), terms added left to right."""
    base, tuned, instruct = fp8_trio(tmp_path)
    g = torch.Generator().manual_seed(9)
    second = {n: (t.float() + 0.003 * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in tuned.items()}
    write_checkpoint(tmp_path / "tuned2", second, 1, config_of(qwen3()))
    code, _, err = merge(cli, tmp_path, "--tuned", tmp_path / "tuned2", "--alpha", "0.7", "--alpha", "0.5")
    assert code == 0, err
    got = load_folder(tmp_path / "out")
    for n, i in instruct.items():
        if n.endswith("_scale_inv"):
            continue
        b = deq(base, n)
        x = deq(instruct, n) + (tuned[n].float() - b) * 0.7
        x = x + (second[n].float() - b) * 0.5
        if i.dtype == torch.float8_e4m3fn:
            scale_name = n[: -len("weight")] + "weight_scale_inv"
            q, s = requantize_reference(x, instruct[scale_name], BLOCK)
            assert torch.equal(got[n].view(torch.uint8), q) and same_bits(got[scale_name], s), n
        else:
            assert same_bits(got[n], x.to(i.dtype)), n


def test_dora_with_an_fp8_base(tmp_path, cli):
    """A PEFT DoRA adapter trained on the dequantized Base, grafted onto FP8 Instruct with the FP8 Base: DoRA's
    weight norms are taken over Base decoded with its scales; the result is PEFT's DoRA merge written plainly in
    float64 (T = m / ||B + s B_l A_l|| * (B + s B_l A_l)), x = deq(I) + (T - deq(B)), within one FP8 step."""
    from helpers import make_adapter
    from safetensors.torch import load_file

    model = qwen3()
    write_fp8_checkpoint(tmp_path / "base", state(model), config_of(model), BLOCK)
    dequantized = {n: deq(load_folder(tmp_path / "base"), n).to(torch.bfloat16) for n in state(model)}
    write_checkpoint(tmp_path / "base-bf16", dequantized, 1, config_of(model))
    write_fp8_checkpoint(tmp_path / "instruct", state(perturbed(qwen3(), 2, 0.01)), config_of(model), BLOCK)
    adapter = make_adapter(
        tmp_path / "base-bf16", tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["o_proj"]
    )
    code, _, err = cli(
        "merge",
        "--tuned",
        adapter,
        "--base",
        tmp_path / "base",
        "--instruct",
        tmp_path / "instruct",
        "--output",
        tmp_path / "out",
        "--quiet",
    )
    assert code == 0, err
    ad = {
        k.removeprefix("base_model.model."): v.double()
        for k, v in load_file(adapter / "adapter_model.safetensors").items()
    }
    base, instruct, got = (load_folder(tmp_path / r) for r in ("base", "instruct", "out"))
    checked = 0
    for module in [k.rsplit(".", 1)[0] for k in ad if k.endswith(".lora_magnitude_vector")]:
        n = module + ".weight"
        w = deq(base, n).double()
        v = w + 2.0 * (ad[module + ".lora_B.weight"] @ ad[module + ".lora_A.weight"])
        t = ad[module + ".lora_magnitude_vector"].view(-1, 1) / v.norm(dim=1, keepdim=True) * v
        x = (deq(instruct, n).double() + (t - w)).float()
        scale_name = n[: -len("weight")] + "weight_scale_inv"
        q, s = requantize_reference(x, instruct[scale_name], BLOCK)
        mine = dequantize_fp8(got[n], got[scale_name], BLOCK)
        ref = dequantize_fp8(q.view(torch.float8_e4m3fn), s, BLOCK)
        assert (mine - ref).abs().le(ref.abs() / 8 + 1e-9).all(), n
        checked += 1
    assert checked == 2


def test_nan_carried_from_an_fp8_instruct(tmp_path, cli):
    """A NaN in Instruct's FP8 weight is carried (a note, exit 0); graftcore.json stays valid JSON (the update's
    measure over the finite elements), verify and a rerun accept the output; the NaN's block is encoded from its
    finite elements: with a large alpha it takes a new scale instead of keeping Instruct's and clipping."""
    from safetensors.torch import load_file, save_file

    base, tuned, instruct = fp8_trio(tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors = load_file(tmp_path / "instruct" / "model.safetensors")
    tensors[name].view(torch.uint8)[0, 0] = 0x7F  # E4M3's NaN
    save_file(tensors, tmp_path / "instruct" / "model.safetensors", metadata={"format": "pt"})
    instruct = load_folder(tmp_path / "instruct")
    code, _, err = merge(cli, tmp_path, "--alpha", "40")
    assert code == 0 and "carried" in err, err
    manifest = json.loads((tmp_path / "out" / "graftcore.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert manifest["fp8"]["tensors"][name]["update_error"] > 0
    got = load_folder(tmp_path / "out")
    x = deq(instruct, name) + (tuned[name].float() - deq(base, name)) * 40
    scale_name = name[: -len("weight")] + "weight_scale_inv"
    q, s = requantize_reference(x, instruct[scale_name], BLOCK)
    assert torch.equal(got[name].view(torch.uint8), q) and same_bits(got[scale_name], s)
    assert got[name].view(torch.uint8)[0, 0] == 0x7F and s[0, 0] != instruct[scale_name][0, 0]
    code, out, err = cli("verify", tmp_path / "out", "--recompute", "20")
    assert code == 0, err
    code, _, err = merge(cli, tmp_path, "--alpha", "40")
    assert code == 0, err  # the finished output is recognised, not "a folder another job wrote"


def test_compressed_tensors_block_structure_with_partial_edges(tmp_path, cli):
    """compressed-tensors block scales: the block is the config's block_structure (a [200, 200] weight in 32x32
    blocks has a [7, 7] grid, which alone would suggest 29x29 blocks); --alpha 0 gives back Instruct's bytes and
    --dtype bfloat16 its values decoded by the 32x32 grid."""
    from helpers import dequantize_fp8, quantize_fp8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 200, generator=g) * 0.02
    q, s = quantize_fp8(w, (32, 32), torch.bfloat16)
    name = "model.layers.0.mlp.down_proj.weight"
    quant = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [32, 32]},
            }
        },
    }
    write_checkpoint(tmp_path / "instruct", {name: q, name[:-6] + "weight_scale": s}, 1, {"quantization_config": quant})
    for role in ("base", "tuned"):
        write_checkpoint(tmp_path / role, {name: w.bfloat16()}, 1, {})
    code, _, err = merge(cli, tmp_path, "--alpha", "0")
    assert code == 0, err
    assert torch.equal(load_folder(tmp_path / "out")[name].view(torch.uint8), q.view(torch.uint8))
    code, _, err = merge(cli, tmp_path, "--dtype", "float32", out="f32")
    assert code == 0, err
    want = dequantize_fp8(q, s, (32, 32)) + (w.bfloat16().float() - w.bfloat16().float())
    assert same_bits(load_folder(tmp_path / "f32")[name], want)


def test_a_malformed_quantization_config_is_refused(tmp_path, cli):
    """quant_method of the wrong type, weight_block_size of booleans: exit 2 naming config.json, no traceback."""
    fp8_trio(tmp_path)
    for bad in ({"quant_method": ["fp8"]}, {"weight_block_size": [True, 32]}):
        mutate(
            tmp_path / "instruct",
            config=lambda c, bad=bad: {**c, "quantization_config": {**c["quantization_config"], **bad}},
        )
        code, _, err = merge(cli, tmp_path)
        assert code == 2 and "config.json" in err and "Traceback" not in err, (bad, err)


def test_a_bad_scale_of_a_copied_fp8_tensor_is_refused(tmp_path, cli):
    """An FP8 tensor copied as it is (--exclude) still has its scales checked: a zero scale is exit 2."""
    fp8_trio(tmp_path)
    mutate(tmp_path / "instruct", set_value(0.0))
    code, _, err = merge(cli, tmp_path, "--exclude", r"layers\.1\.mlp")
    assert code == 2 and SCALE in err, err
    assert not (tmp_path / "out" / "graftcore.json").exists()
