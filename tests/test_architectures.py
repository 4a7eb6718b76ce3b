"""`--targets projections` on the architectures users bring, built by transformers from tiny configs and saved
with save_pretrained (Instruct and tuned: perturbed copies of Base, so the three share names and layout): the
selected tensors are the linear layers of attention and MLP/MoE blocks, decided here independently (every
tensor of a layer but norms, routers and the like), grafted bit-exact to the float32 formula; the rest are
Instruct's bytes; and the output loads with the model's Auto class."""

from __future__ import annotations

import pytest
import torch
from helpers import load_folder, perturbed, reference, same_bits

transformers = pytest.importorskip("transformers")
T = transformers

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
ARCHITECTURES = {
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**COMMON, num_local_experts=2, num_experts_per_tok=1)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**COMMON, pad_token_id=0)),
    "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(
        T.Qwen3MoeConfig(**COMMON, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16)
    ),
    "deepseek_v3": lambda: T.DeepseekV3ForCausalLM(
        T.DeepseekV3Config(
            **COMMON,
            n_routed_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=4,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
        )
    ),
    "gpt_oss": lambda: T.GptOssForCausalLM(
        T.GptOssConfig(**COMMON, num_local_experts=2, num_experts_per_tok=1, head_dim=8)
    ),
}
# what is not a linear layer of attention or MLP/MoE: embeddings, norms, the head, routers, GPT-OSS's attention
# sinks, DeepSeek-V3's router correction bias
NOT_PROJECTIONS = ("embed", "norm", "lm_head", ".gate.", ".router.", "sinks", "e_score_correction")


def expected_projections(names) -> set[str]:
    return {n for n in names if ".layers." in n and not any(x in n for x in NOT_PROJECTIONS)}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_projections_on_every_architecture(arch, tmp_path, cli):
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    perturbed(model, 1, 0.01).save_pretrained(tmp_path / "tuned")
    perturbed(model, 2, 0.01).save_pretrained(tmp_path / "instruct")
    code, _, err = cli(
        "merge",
        "--base",
        tmp_path / "base",
        "--tuned",
        tmp_path / "tuned",
        "--instruct",
        tmp_path / "instruct",
        "--output",
        tmp_path / "out",
        "--targets",
        "projections",
        "--quiet",
    )
    assert code == 0, err
    base, tuned, instruct = (load_folder(tmp_path / r) for r in ("base", "tuned", "instruct"))
    got = load_folder(tmp_path / "out")
    chosen = expected_projections(instruct)
    assert len(chosen) > 6, sorted(instruct)  # the check below is about something
    changed = set()
    for n, i in instruct.items():
        want = reference(i, tuned[n], base[n]) if n in chosen else i
        assert same_bits(got[n], want), n
        if not same_bits(got[n], i):
            changed.add(n)
    assert changed == {n for n in chosen if not same_bits(tuned[n], base[n])}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_reference_keeps_the_papers_selection(tmp_path):
    """--targets reference: only tensors of modules named q/k/v/o/gate/up/down_proj, as the paper's code chose;
    on Phi-3 that leaves the fused qkv_proj and gate_up_proj to Instruct."""
    import graftcore

    torch.manual_seed(0)
    model = ARCHITECTURES["phi3"]().to(torch.bfloat16)
    for role, seed in (("base", 0), ("tuned", 1), ("instruct", 2)):
        (perturbed(model, seed, 0.01) if seed else model).save_pretrained(tmp_path / role)
    roles = {r: tmp_path / r for r in ("base", "tuned", "instruct")}
    report = graftcore.graft(**roles, output=tmp_path / "o", dry_run=True, targets="reference")
    grafted = {op.name for op in report.plan.ops if op.action.name == "GRAFT"}
    assert grafted == {f"model.layers.{k}.{m}.weight" for k in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")}
