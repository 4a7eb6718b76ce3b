"""LoRA on MoE expert parameters (PEFT target_parameters): the factor layout against PEFT's formula written
plainly, and the adapters graftcore must refuse with a message naming the file and tensor."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import perturbed

from graftcore.analysis.similarity_sums import lowrank_into
from graftcore.io.safetensors_file import TensorInfo
from graftcore.lora.update import LowRankUpdate

E, R, OUT, IN = 3, 2, 5, 7


def plain_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PEFT's ParamWrapper.get_delta_weight ("o r e, e r i -> e o i") as loops, float64: lora_A [R * E, IN] is
    reshaped to [E, R, IN], lora_B [OUT, R * E] to [OUT, R, E]."""
    delta = torch.zeros(E, OUT, IN, dtype=torch.float64)
    for e in range(E):
        for o in range(OUT):
            for i in range(IN):
                delta[e, o, i] = sum(float(b[o, k * E + e]) * float(a[e * R + k, i]) for k in range(R))
    return delta


def update(kind: str, rows: int, cols: int, expert: int = -1, first_row: int = 0) -> LowRankUpdate:
    a = TensorInfo("lora_A.weight", "F32", (R * E, IN), "f", 0, 4 * R * E * IN)
    b = TensorInfo("lora_B.weight", "F32", (OUT, R * E), "f", 0, 4 * OUT * R * E)
    return LowRankUpdate("m.experts.p", kind, 0.5, a, b, rows, cols, None, "adapter", E, expert, first_row)


@pytest.mark.parametrize("kind", ["expert", "expert_t"])
def test_expert_factors_match_pefts_formula(kind):
    """Fused ([E * d1, d2], a right factor per expert) over random flat ranges, and per expert (rows of one
    expert's delta), both against the plain formula; expert_t is the transposed layout ([E, in, out])."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(R * E, IN, generator=g), torch.randn(OUT, R * E, generator=g)
    want = 0.5 * plain_delta(a, b)
    if kind == "expert_t":
        want = want.transpose(1, 2).contiguous()
    d1, d2 = want.shape[1:]
    factors = {"lora_A.weight": a, "lora_B.weight": b}
    fused = update(kind, E * d1, d2).load(lambda info: factors[info.name])
    flat = want.reshape(-1)
    rng = random.Random(1)
    for _ in range(50):
        lo = rng.randrange(flat.numel())
        hi = rng.randrange(lo + 1, flat.numel() + 1)
        out = torch.empty(hi - lo)
        lowrank_into(out, fused, lo, hi, d2)
        assert torch.allclose(out.double(), flat[lo:hi], atol=1e-5), (lo, hi)
    for e in range(E):
        for first, rows in ((0, d1), (1, d1 - 2)):
            one = update(kind, rows, d2, e, first).load(lambda info: factors[info.name])
            got = (0.5 * one.left @ one.right).double()
            assert torch.allclose(got, want[e, first : first + rows], atol=1e-5), (e, first)


def qwen3_moe_lora(tmp_path, **options):
    """A tiny Qwen3-MoE Base saved per expert, its Instruct, and a PEFT LoRA with target_parameters."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=16,
    )
    model = transformers.Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    perturbed(model, 2, 0.01).save_pretrained(tmp_path / "instruct")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **options))
    lora.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", tmp_path / "instruct"


def merge(cli, adapter, instruct, out):
    return cli("merge", "--tuned", adapter, "--instruct", instruct, "--output", out, "--quiet")


def test_a_wrapper_with_no_parameter_left_is_refused(tmp_path, cli):
    """The adapter's config selects fewer parameters of the experts than it holds wrappers for: exit 2 naming the
    adapter file and the tensor, nothing written."""
    adapter, instruct = qwen3_moe_lora(tmp_path, target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_parameters"] = ["down_proj"]
    path.write_text(json.dumps(config))
    code, _, err = merge(cli, adapter, instruct, tmp_path / "out")
    assert code == 2 and "adapter_model.safetensors" in err and "experts.base_layer.lora_A.weight" in err, err
    assert "wrapper 1 deep" in err and not (tmp_path / "out" / "graftcore.json").exists()


def test_square_experts_need_the_model_type(tmp_path, cli):
    """Experts [E, 2I, H] with 2I == H fit the factors in both layouts; Instruct's model_type decides, and without
    a config.json the merge is refused rather than guessed."""
    adapter, instruct = qwen3_moe_lora(tmp_path, target_modules=[], target_parameters=["gate_up_proj"])
    (instruct / "config.json").unlink()
    code, _, err = merge(cli, adapter, instruct, tmp_path / "out")
    assert code == 2 and "gate_up_proj" in err and "model_type" in err, err


def test_a_wrapper_without_its_lora_b_is_named(tmp_path, cli):
    """A LoRA on a parameter whose lora_B is missing from the file: exit 2 saying which partner is missing."""
    from safetensors.torch import load_file, save_file

    adapter, instruct = qwen3_moe_lora(tmp_path, target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    gone = next(k for k in tensors if k.endswith("experts.lora_B.weight"))
    save_file({k: v for k, v in tensors.items() if k != gone}, path)
    code, _, err = merge(cli, adapter, instruct, tmp_path / "out")
    assert code == 2 and "no lora_B partner" in err and "adapter_model.safetensors" in err, err
