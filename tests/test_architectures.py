"""`--targets projections` on the architectures users bring, built by transformers from tiny configs and saved
with save_pretrained (Instruct and tuned: perturbed copies of Base, so the three share names and layout): the
selected tensors are what PEFT's all-linear LoRA changes plus the MoE experts (helpers.projection_modules), which
hold every linear layer of attention and MLP/MoE blocks decided here by name (every tensor of a layer but norms,
routers and the like), grafted bit-exact to the float32 formula; the rest are Instruct's bytes; and the output
loads with the model's Auto class."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from helpers import load_folder, module_of, perturbed, projection_modules, reference, same_bits
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar would share stderr with graftcore's
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
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**COMMON)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**COMMON, head_dim=8)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**COMMON, head_dim=8)),
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
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
        )
    ),
    "phimoe": lambda: T.PhimoeForCausalLM(T.PhimoeConfig(**COMMON, num_local_experts=2, num_experts_per_tok=1)),
    "gpt_oss": lambda: T.GptOssForCausalLM(
        T.GptOssConfig(**COMMON, num_local_experts=2, num_experts_per_tok=1, head_dim=8)
    ),
}
# what is not a linear layer of attention or MLP/MoE: embeddings, norms, the head, routers, GPT-OSS's attention
# sinks, DeepSeek-V3's router correction bias
NOT_PROJECTIONS = ("embed", "norm", "lm_head", ".gate.", ".router.", "sinks", "e_score_correction")


def merge_trio(cli, folder, *extra, out="out"):
    """`graftcore merge` of folder/base, /tuned and /instruct into folder/OUT; (exit code, stdout, stderr)."""
    roles = [x for r in ("base", "tuned", "instruct") for x in (f"--{r}", folder / r)]
    return cli("merge", *roles, "--output", folder / out, "--quiet", *extra)


def expected_projections(names) -> set[str]:
    return {n for n in names if ".layers." in n and not any(x in n for x in NOT_PROJECTIONS)}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_projections_on_every_architecture(arch, tmp_path, cli):
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    perturbed(model, 1, 0.01).save_pretrained(tmp_path / "tuned")
    perturbed(model, 2, 0.01).save_pretrained(tmp_path / "instruct")
    code, _, err = merge_trio(cli, tmp_path, "--targets", "projections")
    assert code == 0, err
    base, tuned, instruct = (load_folder(tmp_path / r) for r in ("base", "tuned", "instruct"))
    got = load_folder(tmp_path / "out")
    modules = projection_modules(type(model), tmp_path)  # PEFT's all-linear and the experts
    chosen = {n for n in instruct if module_of(n) in modules}
    assert chosen >= expected_projections(instruct)  # every linear layer of the blocks, and maybe routers
    assert len(chosen) > 6, sorted(instruct)  # the check below is about something
    changed, formula = set(), {}
    for n, i in instruct.items():
        formula[n] = want = reference(i, tuned[n], base[n]) if n in chosen else i
        assert same_bits(got[n], want), n
        if not same_bits(got[n], i):
            changed.add(n)
    assert changed == {n for n in chosen if not same_bits(tuned[n], base[n])}
    # a forward pass of the output equals one of a model built here from the formula (Instruct's folder with
    # the formula's weights), and differs from Instruct's own
    shutil.copytree(tmp_path / "instruct", tmp_path / "formula")
    save_file(formula, tmp_path / "formula" / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, COMMON["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name in ("out", "formula", "instruct"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.bfloat16).eval()
        assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            logits[name] = loaded(ids).logits
    assert torch.equal(logits["out"], logits["formula"]) and not torch.equal(logits["out"], logits["instruct"])


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


def vl_pair(kind: str):
    """(text model, VL model) whose language weights are equal: a text Base and a VL Instruct built around it."""
    if kind == "llava":
        text_config = T.LlamaConfig(**COMMON)
        vision = T.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
        )
        vl = T.LlavaForConditionalGeneration(
            T.LlavaConfig(text_config=text_config, vision_config=vision, image_token_index=95)
        )
        text = T.LlamaForCausalLM(text_config)
    elif kind == "qwen2_5_vl":  # saved as model.layers.* and visual.*, in memory model.language_model.* / visual
        text_config = dict(COMMON, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
        vision = dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            patch_size=2,
            spatial_merge_size=1,
            temporal_patch_size=1,
            window_size=4,
            fullatt_block_indexes=[0],
        )
        vl = T.Qwen2_5_VLForConditionalGeneration(
            T.Qwen2_5_VLConfig(
                text_config=text_config,
                vision_config=vision,
                image_token_id=95,
                video_token_id=94,
                vision_start_token_id=93,
            )
        )
        text = T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON))
    elif kind == "internvl":  # 2 vision layers: the language and vision rewrites map equally many modules
        vision = T.InternVLVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4
        )
        vl = T.InternVLForConditionalGeneration(
            T.InternVLConfig(text_config=T.Qwen2Config(**COMMON), vision_config=vision, downsample_ratio=0.5)
        )
        text = T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON))
    else:
        text_config = T.Gemma3TextConfig(**COMMON, head_dim=8)
        vision = T.SiglipVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
        )
        vl = T.Gemma3ForConditionalGeneration(
            T.Gemma3Config(text_config=text_config, vision_config=vision, mm_tokens_per_image=4)
        )
        text = T.Gemma3ForCausalLM(text_config)
    text.model.load_state_dict(vl.model.language_model.state_dict())
    text.lm_head.load_state_dict(vl.lm_head.state_dict())
    return text.to(torch.bfloat16), vl.to(torch.bfloat16)


@pytest.mark.parametrize("kind", ["llava", "gemma3", "qwen2_5_vl"])
def test_a_vl_instruct_over_a_text_base(kind, tmp_path, cli):
    """transformers saves the VL model's language layers as language_model.model.* (and language_model.lm_head),
    the text model's as model.*: the prefix rewrite is found from the headers, shown, and every language tensor
    grafted; the vision tower and projector are Instruct's. Before: exit 0 with nothing grafted. Qwen2.5-VL saves
    its language layers under the text model's names (model.layers.*, visual.* beside them): nothing to rewrite."""
    torch.manual_seed(0)
    text, vl = vl_pair(kind)
    text.save_pretrained(tmp_path / "base")
    perturbed(text, 1, 0.01).save_pretrained(tmp_path / "tuned")
    perturbed(vl, 2, 0.01).save_pretrained(tmp_path / "instruct")
    code, _, err = merge_trio(cli, tmp_path)
    assert code == 0, err
    rewritten = kind != "qwen2_5_vl"
    assert ("prefix '' -> 'language_model.' (inferred from the headers)" in err) == rewritten, err
    base, tuned, instruct = (load_folder(tmp_path / r) for r in ("base", "tuned", "instruct"))
    got = load_folder(tmp_path / "out")
    grafted = 0
    for n, i in instruct.items():
        m = n.removeprefix("language_model.")
        if m in base:
            assert same_bits(got[n], reference(i, tuned[m], base[m])), n
            grafted += 1
        else:
            assert same_bits(got[n], i), n  # the vision tower, the projector: Instruct's
    assert grafted == len(base) and grafted > 10
    import json

    renamed = json.loads((tmp_path / "out" / "graftcore.json").read_text())["renamed"]
    assert {(r["role"], r["from"], r["to"], r["inferred"]) for r in renamed} == (
        {("base", "", "language_model.", True), ("tuned", "", "language_model.", True)} if rewritten else set()
    )
    assert type(vl).from_pretrained(tmp_path / "out").config.model_type == vl.config.model_type


def test_an_explicit_rename(tmp_path, cli):
    """A text Base saved under other names altogether (decoder.*): the rewrite is still inferred from the headers,
    and --rename OLD=NEW states it explicitly (for what cannot be inferred), with the same result."""
    torch.manual_seed(0)
    text, vl = vl_pair("llava")
    sd = {("decoder." + k.removeprefix("model.")): v for k, v in text.state_dict().items() if k.startswith("model.")}
    from safetensors.torch import save_file

    for role in ("base", "tuned"):
        (tmp_path / role).mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / role / "model.safetensors")
    perturbed(vl, 2, 0.01).save_pretrained(tmp_path / "instruct")
    args = ("merge", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--instruct", tmp_path / "instruct")
    code, out, err = cli(*args, "--output", tmp_path / "o1", "--dry-run")
    assert code == 0 and "prefix 'decoder.' -> 'language_model.model.' (inferred from the headers)" in out, out
    code, _, err = cli(*args, "--output", tmp_path / "o2", "--quiet", "--rename", "decoder.=language_model.model.")
    assert code == 0 and "--rename" in err, err


def qwen3_moe():
    torch.manual_seed(0)
    return T.Qwen3MoeForCausalLM(
        T.Qwen3MoeConfig(**COMMON, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16)
    ).to(torch.bfloat16)


def test_fused_experts_into_a_per_expert_instruct(tmp_path, cli):
    """Base saved fused, tuned fused, then tuned per expert (save_original_format=False / True), Instruct per expert:
    each expert's gate, up and down are read as ranges of the fused tensors and grafted bit-exact; the expected
    values are sliced here from the fused tensors plainly (gate rows, then up rows, per expert)."""
    model = qwen3_moe()
    model.save_pretrained(tmp_path / "base", save_original_format=False)
    perturbed(model, 1, 0.01).save_pretrained(tmp_path / "tuned", save_original_format=False)
    model.save_pretrained(tmp_path / "tuned_per_expert")
    perturbed(model, 2, 0.01).save_pretrained(tmp_path / "instruct")
    base, tuned, instruct = (load_folder(tmp_path / r) for r in ("base", "tuned", "instruct"))

    def expert(sd, name):  # Instruct's per-expert name -> that expert's slice of the fused tensor
        prefix, e, kind = re.match(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name).groups()
        if kind == "down_proj":
            return sd[f"{prefix}.down_proj"][int(e)]
        rows = sd[f"{prefix}.gate_up_proj"][int(e)]
        half = rows.shape[0] // 2
        return rows[:half] if kind == "gate_proj" else rows[half:]

    for tuned_dir in ("tuned", "tuned_per_expert"):
        out = tmp_path / f"out-{tuned_dir}"
        code, _, err = cli(
            "merge",
            "--base",
            tmp_path / "base",
            "--tuned",
            tmp_path / tuned_dir,
            "--instruct",
            tmp_path / "instruct",
            "--output",
            out,
            "--quiet",
        )
        assert code == 0 and "read in Instruct's expert layout" in err, err
        got = load_folder(out)
        t_sd = tuned if tuned_dir == "tuned" else load_folder(tmp_path / tuned_dir)
        experts = [n for n in instruct if ".experts." in n]
        assert len(experts) == 2 * 2 * 3
        for n, i in instruct.items():
            if n in experts:
                t = expert(t_sd, n) if tuned_dir == "tuned" else t_sd[n]
                want = reference(i, t, expert(base, n))
            else:
                want = reference(i, t_sd[n], base[n])
            assert same_bits(got[n], want), (tuned_dir, n)
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.model_type == "qwen3_moe"


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_per_expert_inputs_into_a_fused_instruct(arch, tmp_path, cli):
    """Base and tuned saved per expert (transformers' default), Instruct fused (save_original_format=False): each
    fused output tensor is read from its 2E (or E) per-expert input tensors, a step never spanning two, and is
    bit-exact against the fused tensors assembled here plainly (before: exit 0, the experts' update dropped).
    Mixtral's per-expert files name the block `block_sparse_moe` and the parts w1 (gate), w3 (up), w2 (down);
    its fused files name it `mlp`, as transformers' conversion_mapping.py renames it."""
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    perturbed(model, 1, 0.01).save_pretrained(tmp_path / "tuned")
    perturbed(model, 2, 0.01).save_pretrained(tmp_path / "instruct", save_original_format=False)
    code, _, err = merge_trio(cli, tmp_path, "--chunk-size", "100")
    assert code == 0 and "read in Instruct's expert layout" in err, err
    base, tuned, instruct = (load_folder(tmp_path / r) for r in ("base", "tuned", "instruct"))
    gate, up, down = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    stored = (lambda n: n.replace(".mlp.", ".block_sparse_moe.")) if arch == "mixtral" else (lambda n: n)

    def fused(sd, name):  # Instruct's fused name -> the per-expert tensors stacked as transformers fuses them
        prefix, kind = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)$", stored(name)).groups()
        experts = sorted({int(n.split(".experts.")[1].split(".")[0]) for n in sd if n.startswith(prefix + ".")})
        if kind == "down_proj":
            return torch.stack([sd[f"{prefix}.{e}.{down}.weight"] for e in experts])
        return torch.stack(
            [torch.cat([sd[f"{prefix}.{e}.{gate}.weight"], sd[f"{prefix}.{e}.{up}.weight"]]) for e in experts]
        )

    got = load_folder(tmp_path / "out")
    fused_names = [n for n in instruct if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(fused_names) == 4
    for n, i in instruct.items():
        t, b = (fused(sd, n) if n in fused_names else sd[stored(n)] for sd in (tuned, base))
        assert same_bits(got[n], reference(i, t, b)), n
    code, stdout, err = cli("verify", tmp_path / "out", "--recompute", "50")
    assert code == 0 and "bit-exact" in stdout, err
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.model_type == arch


def merge_random_lora(cli, cls, folder, config):
    """A PEFT adapter of `config` on the model of class `cls` in folder/base, its factors random (seed 7), saved
    as folder/adapter and merged onto folder/instruct into folder/out: (exit code, stdout, stderr)."""
    import peft

    model = peft.get_peft_model(cls.from_pretrained(folder / "base", dtype=torch.float32), config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder / "adapter")
    args = ("--tuned", folder / "adapter", "--instruct", folder / "instruct", "--output", folder / "out", "--quiet")
    return cli("merge", *args)


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between the bfloat16 values of `a` and `b`, in units in the last place."""
    x, y = (t.to(torch.bfloat16).contiguous().view(torch.int16).long() for t in (a, b))
    order = lambda v: torch.where(v < 0, -(v & 0x7FFF), v)  # noqa: E731  sign-magnitude -> ordered integers
    return int((order(x) - order(y)).abs().max()) if x.numel() else 0


@pytest.mark.parametrize("kind", ["gemma3", "qwen2_5_vl", "internvl"])
def test_a_peft_lora_on_a_vl_model(kind, tmp_path, cli):
    """PEFT names the adapter's modules as the VL model holds them in memory (model.language_model.layers.N...,
    model.vision_tower...), the files hold language_model.model.* and vision_tower.*: both rewrites are inferred
    and the merge equals PEFT's own merge_and_unload within one bf16 ulp (before: exit 2, 'Instruct does not
    have')."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    _, vl = vl_pair(kind)
    targets = ["q_proj", "v_proj"] + (["qkv"] if kind == "qwen2_5_vl" else [])  # Qwen2.5-VL's vision attention
    vl.save_pretrained(tmp_path / "base")
    perturbed(vl, 2, 0.01).save_pretrained(tmp_path / "instruct")
    cls = type(vl)
    code, _, err = merge_random_lora(cli, cls, tmp_path, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert code == 0, err
    merged = (
        peft.PeftModel.from_pretrained(
            cls.from_pretrained(tmp_path / "instruct", dtype=torch.float32), str(tmp_path / "adapter")
        )
        .merge_and_unload()
        .state_dict()
    )
    got = cls.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    adapted = [k for k in merged if k.endswith(tuple(f"{t}.weight" for t in targets))]
    assert any("vision" in k or "visual" in k for k in adapted) and any("language_model" in k for k in adapted)
    for k, want in merged.items():
        assert bf16_ulps(got[k], want) <= 1, k


def test_rename_applies_to_an_adapter_too(tmp_path, cli):
    """A PEFT LoRA trained on the text model, grafted onto its VL Instruct with --rename: the adapter's module
    names (model.layers.N...) are read as the files' (language_model.model.layers.N...)."""
    from helpers import make_adapter

    torch.manual_seed(0)
    text, vl = vl_pair("llava")
    text.save_pretrained(tmp_path / "text")
    perturbed(vl, 2, 0.01).save_pretrained(tmp_path / "instruct")
    adapter = make_adapter(tmp_path / "text", tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    code, _, err = cli(
        "merge",
        "--tuned",
        adapter,
        "--instruct",
        tmp_path / "instruct",
        "--output",
        tmp_path / "o",
        "--quiet",
        "--rename",
        "model.=language_model.model.",
    )
    assert code == 0 and "'model.' read as 'language_model.model.'" in err, err
    got, instruct = load_folder(tmp_path / "o"), load_folder(tmp_path / "instruct")
    changed = {n for n in instruct if not same_bits(got[n], instruct[n])}
    assert changed == {f"language_model.model.layers.{k}.self_attn.q_proj.weight" for k in range(2)}


# (architecture, Instruct saved fused?, LoraConfig options): PEFT 0.21 turns "all-linear" on a transformers-5 MoE
# model into target_parameters over the experts' 3-D gate_up_proj / down_proj (and the router's weight)
MOE_LORAS = [
    ("qwen3_moe", False, dict(target_modules="all-linear")),
    ("qwen3_moe", True, dict(target_modules="all-linear")),
    ("mixtral", False, dict(target_modules="all-linear")),
    ("deepseek_v3", False, dict(target_modules="all-linear")),
    # the router: `mlp.router` in memory, `block_sparse_moe.gate` in the per-expert files
    ("phimoe", False, dict(target_modules=["q_proj", "router"], target_parameters=["gate_up_proj", "down_proj"])),
    ("gpt_oss", True, dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"])),
]


@pytest.mark.parametrize(
    "arch,fused,options", MOE_LORAS, ids=[f"{a}-{'fused' if f else 'per-expert'}" for a, f, _ in MOE_LORAS]
)
def test_a_peft_lora_on_moe_experts(arch, fused, options, tmp_path, cli):
    """PEFT LoRA on the experts' parameters (target_parameters, nested ParamWrappers, factors [r * E, in] and
    [out, r * E]), grafted onto Instruct saved per expert (transformers' default) or fused: equal to PEFT's own
    merge_and_unload within one bf16 ulp, every expert changed (before: exit 2, 'target_parameters is set')."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    perturbed(model, 2, 0.01).save_pretrained(tmp_path / "instruct", save_original_format=not fused)
    cls = type(model)
    code, _, err = merge_random_lora(cli, cls, tmp_path, peft.LoraConfig(r=4, lora_alpha=8, **options))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"], config  # the case under test: LoRA on parameters
    assert code == 0, err
    instruct = cls.from_pretrained(tmp_path / "instruct", dtype=torch.float32)
    before = {k: v.clone() for k, v in instruct.state_dict().items()}
    merged = peft.PeftModel.from_pretrained(instruct, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    got = cls.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    experts = [k for k in merged if ".experts." in k and "bias" not in k]
    assert experts and all(not torch.equal(merged[k], before[k]) for k in experts), experts
    for k, want in merged.items():
        assert bf16_ulps(got[k], want) <= 1, k
    code, stdout, err = cli("verify", tmp_path / "out", "--recompute", "20")
    assert code == 0 and "bit-exact" in stdout, err
