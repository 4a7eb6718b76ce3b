"""FP8 checkpoints (block-scaled, as DeepSeek-V3 and Qwen3-FP8 ship them): read anywhere a bf16 tensor is read,
written in Instruct's format by default, every byte against the rule written plainly in helpers.py."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    dequantize_fp8,
    e4m3_round,
    fp8_state_dict,
    is_quantized,
    load_folder,
    perturbed,
    quantize_fp8,
    requantize_reference,
    same_bits,
    write_checkpoint,
    write_fp8_checkpoint,
)

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

BLOCK = (32, 32)  # small blocks, so that tiny weights hold several, and partial edge ones (48 = 32 + 16)
CONFIG = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def qwen3(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**CONFIG)).to(torch.bfloat16)


def state(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"} | {
        "lm_head.weight": model.lm_head.weight.detach().clone()
    }


def config_of(model) -> dict:
    return model.config.to_dict()


def fp8_trio(tmp_path, scale_dtype=torch.float32, shards=1, tuned_scale=0.002):
    """Base and Instruct in FP8 (Instruct = Base + a larger change, then quantized), tuned in bf16: a fine-tune of
    the dequantized Base, as users make it. Returns the three state dicts as written."""
    model = qwen3()
    base_sd = state(model)
    instruct_sd = state(perturbed(qwen3(), 2, 0.01))
    write_fp8_checkpoint(tmp_path / "base", base_sd, config_of(model), BLOCK, scale_dtype, shards)
    write_fp8_checkpoint(tmp_path / "instruct", instruct_sd, config_of(model), BLOCK, scale_dtype, shards)
    base, instruct = load_folder(tmp_path / "base"), load_folder(tmp_path / "instruct")
    g = torch.Generator().manual_seed(5)
    tuned = {}
    for n, t in base.items():
        if n.endswith("_scale_inv"):
            continue
        x = (
            dequantize_fp8(t, base[n[: -len("weight")] + "weight_scale_inv"], BLOCK)
            if t.dtype.is_floating_point and t.element_size() == 1
            else t.float()
        )
        tuned[n] = (x + tuned_scale * torch.randn(x.shape, generator=g)).to(torch.bfloat16)
    write_checkpoint(tmp_path / "tuned", tuned, 1, config_of(model))
    return base, tuned, instruct


def deq(sd: dict, name: str) -> torch.Tensor:
    t = sd[name]
    if t.dtype == torch.float8_e4m3fn:
        return dequantize_fp8(t, sd[name[: -len("weight")] + "weight_scale_inv"], BLOCK)
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
