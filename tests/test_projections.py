"""`--targets projections` is what PEFT's `target_modules="all-linear"` adapts, plus the MoE experts, on every
architecture users bring (tiny models built by transformers from configs): the reference is PEFT itself, run here
on the real model (an all-linear LoRA with random factors, merge_and_unload, saved by save_pretrained), whose
changed tensors name the modules (helpers.projection_modules); graftcore must graft exactly every tensor of those
modules, bit-exact to the float32 formula, and copy every other one from Instruct. Without PEFT the name rules
decide, and say so."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import load_folder, module_of, perturbed, projection_modules, reference, same_bits

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.utils.logging.disable_progress_bar()
T = transformers

C = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
C.update(num_key_value_heads=2)
MROPE = {"rope_type": "default", "mrope_section": [1, 1, 2]}
QWEN2_VISION = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2)
QWEN2_VISION.update(temporal_patch_size=1, spatial_merge_size=1, in_chans=3)
QWEN3_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, temporal_patch_size=1)
QWEN3_VISION.update(spatial_merge_size=1, out_hidden_size=32, deepstack_visual_indexes=[0])
GPT = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=64)

# the architectures whose linear layers the name rules left out (or on which they matched nothing), and the VL
# models whose Conv patch embeddings they grafted
ARCHITECTURES = {
    "dbrx": lambda: T.DbrxForCausalLM(
        T.DbrxConfig(
            vocab_size=96,
            d_model=32,
            n_heads=4,
            n_layers=2,
            max_seq_len=64,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
            ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 2, "moe_top_k": 1},
        )
    ),
    "qwen3_next": lambda: T.Qwen3NextForCausalLM(
        T.Qwen3NextConfig(
            **C,
            head_dim=8,
            num_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"],
        )
    ),
    "granitemoe": lambda: T.GraniteMoeForCausalLM(T.GraniteMoeConfig(**C, num_local_experts=2, num_experts_per_tok=1)),
    "granitemoehybrid": lambda: T.GraniteMoeHybridForCausalLM(
        T.GraniteMoeHybridConfig(
            **C,
            num_local_experts=2,
            num_experts_per_tok=1,
            shared_intermediate_size=16,
            layer_types=["mamba", "attention"],
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_n_groups=1,
            mamba_d_state=8,
            mamba_chunk_size=8,
        )
    ),
    "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**C)),
    "starcoder2": lambda: T.Starcoder2ForCausalLM(T.Starcoder2Config(**C)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(**GPT)),
    "gpt_bigcode": lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(**GPT)),
    "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(**GPT, rotary_dim=4)),
    "codegen": lambda: T.CodeGenForCausalLM(T.CodeGenConfig(**GPT, rotary_dim=4)),
    "mpt": lambda: T.MptForCausalLM(T.MptConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=96, max_seq_len=64)),
    "minimax": lambda: T.MiniMaxForCausalLM(
        T.MiniMaxConfig(
            **C,
            head_dim=8,
            num_local_experts=2,
            num_experts_per_tok=1,
            layer_types=["linear_attention", "full_attention"],
        )
    ),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**C)),
    "falcon": lambda: T.FalconForCausalLM(
        T.FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    ),
    "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4)),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**C, num_local_experts=2, num_experts_per_tok=1)),
    "qwen2_vl": lambda: T.Qwen2VLForConditionalGeneration(
        T.Qwen2VLConfig(
            text_config=dict(C, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}), vision_config=QWEN2_VISION
        )
    ),
    "qwen3_vl": lambda: T.Qwen3VLForConditionalGeneration(
        T.Qwen3VLConfig(text_config=dict(C, head_dim=8, rope_scaling=MROPE), vision_config=QWEN3_VISION)
    ),
    "qwen3_vl_moe": lambda: T.Qwen3VLMoeForConditionalGeneration(
        T.Qwen3VLMoeConfig(
            text_config=dict(
                C, head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, rope_scaling=MROPE
            ),
            vision_config=QWEN3_VISION,
        )
    ),
    "glm4v": lambda: T.Glm4vForConditionalGeneration(
        T.Glm4vConfig(
            text_config=dict(C, rope_scaling=MROPE),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=32,
                num_heads=2,
                patch_size=2,
                temporal_patch_size=1,
                spatial_merge_size=1,
                out_hidden_size=32,
            ),
        )
    ),
    "mistral3": lambda: T.Mistral3ForConditionalGeneration(
        T.Mistral3Config(
            text_config=T.MistralConfig(**C, head_dim=8),
            vision_config=T.PixtralVisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=8,
                patch_size=4,
                head_dim=8,
            ),
            spatial_merge_size=1,
        )
    ),
    "internvl": lambda: T.InternVLForConditionalGeneration(
        T.InternVLConfig(
            text_config=T.Qwen2Config(**C),
            vision_config=T.InternVLVisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=8,
                patch_size=4,
            ),
            downsample_ratio=0.5,
        )
    ),
}


def trio(arch: str, tmp_path):
    """Base, tuned and Instruct of `arch` saved by save_pretrained (tuned and Instruct: perturbed Base)."""
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    perturbed(model, 1, 0.01).save_pretrained(tmp_path / "tuned")
    perturbed(model, 2, 0.01).save_pretrained(tmp_path / "instruct")
    return type(model)


def merge(cli, tmp_path, *extra, out="out"):
    roles = [x for r in ("base", "tuned", "instruct") for x in (f"--{r}", tmp_path / r)]
    return cli("merge", *roles, "--output", tmp_path / out, "--quiet", "--targets", "projections", *extra)


def assert_grafted_exactly(tmp_path, modules: set[str], out="out"):
    """Every tensor of `modules` is the float32 formula's bits, every other tensor Instruct's bytes."""
    base, tuned, instruct = (load_folder(tmp_path / r) for r in ("base", "tuned", "instruct"))
    got = load_folder(tmp_path / out)
    assert set(got) == set(instruct)
    chosen = {n for n in instruct if module_of(n) in modules}
    assert {module_of(n) for n in chosen} == modules  # every module PEFT adapts is in Instruct's files
    for n, i in instruct.items():
        want = reference(i, tuned[n], base[n]) if n in chosen else i
        assert same_bits(got[n], want), (n, n in chosen)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_projections_are_what_peft_all_linear_adapts(arch, tmp_path, cli):
    cls = trio(arch, tmp_path)
    modules = projection_modules(cls, tmp_path)
    assert len(modules) >= 4, modules  # the comparison is about something
    code, _, err = merge(cli, tmp_path)
    assert code == 0, err
    assert_grafted_exactly(tmp_path, modules)
    assert "copied from Instruct as not selected" in err, err  # the summary names what stayed Instruct's


BLOCK_PEFT = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):  # peft not installed: its import fails as it would
    def find_spec(self, name, path, target=None):
        if name == "peft" or name.startswith("peft."):
            raise ModuleNotFoundError("No module named 'peft'", name="peft")
sys.meta_path.insert(0, Absent())
from graftcore.cli import entry
sys.argv = ["graftcore", *sys.argv[1:]]
entry()
"""


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "falcon", "bloom", "phi", "gptj", "mpt", "qwen2_vl"])
def test_without_peft_the_name_rules_decide_and_say_so(arch, tmp_path):
    """With peft absent, the name rules select the same modules on these architectures (convolutions left out
    by shape), and the run says that the name rules decided."""
    cls = trio(arch, tmp_path)
    modules = projection_modules(cls, tmp_path)
    roles = [x for r in ("base", "tuned", "instruct") for x in (f"--{r}", str(tmp_path / r))]
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK_PEFT,
            "merge",
            *roles,
            "--output",
            str(tmp_path / "out"),
            "--quiet",
            "--targets",
            "projections",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "name rules" in run.stdout + run.stderr and "peft" in run.stdout + run.stderr
    assert_grafted_exactly(tmp_path, modules)
