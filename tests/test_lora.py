"""LoRA adapters made by the real `peft` library, grafted onto Instruct by graftcore.

Every merge is checked twice: (a) against the formula written plainly here in float64,
I + alpha * s * (B @ A), within one output ulp; (b) against PEFT itself (`merge_and_unload`), on the
state dict and on the logits. Base and Instruct are tiny random Llama / GPT-2 models saved in bfloat16.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import LLAMA, load_folder, load_model, make_adapter, peft_merge, perturbed
from safetensors.torch import load_file, save_file

import graftcore

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.utils.logging.disable_progress_bar()

GPT2 = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0)
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = torch.tensor([[1, 5, 17, 42, 3, 88, 7, 60]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(base, instruct) folders: a random tiny Llama and a perturbed copy, both bfloat16 safetensors."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    perturbed(model, 1, 0.01).save_pretrained(root / "instruct")
    return root / "base", root / "instruct"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    perturbed(model, 1, 0.01).save_pretrained(root / "instruct")
    return root / "base", root / "instruct"


def ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers around each |x| (float64)."""
    _, e = torch.frexp(x.abs().clamp_min(2.0**-126))
    return torch.ldexp(torch.ones_like(x), e - 8)


def assert_within_ulp(got: torch.Tensor, want: torch.Tensor, what: str):
    """One bf16 ulp of the exact value, plus the float32 rounding of the sum where I and the update cancel
    (the f32 matmul's absolute error is ~2^-24 of the terms, not of the tiny result): 2^-20 of the largest."""
    want = want.double()
    err = (got.double() - want).abs()
    allowed = ulp_bf16(want) + 2.0**-20 * want.abs().max()
    bad = err > allowed
    if bad.any():
        k = int((err / allowed).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} element(s) off by more than one bf16 ulp; worst: got "
            f"{got.flatten()[k].item()!r}, "
            f"want {want.flatten()[k].item()!r}, ulp {ulp_bf16(want).flatten()[k].item()!r}"
        )


def lora_reference(instruct: dict, adapter: Path, alpha_of, alpha: float = 1.0, rs: bool = False, fan_in_fan_out=False):
    """The formula written plainly in float64, from the adapter's tensors: {target name: expected}."""
    tensors = {
        k.removeprefix("base_model.model."): v.double()
        for k, v in load_file(adapter / "adapter_model.safetensors").items()
    }
    want = {}
    for key, a in tensors.items():
        for suffix, emb in ((".lora_A.weight", False), (".lora_embedding_A", True)):
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                b = tensors[module + suffix.replace("A", "B")]
                r = a.shape[0]
                s = alpha_of(module) / (math.sqrt(r) if rs else r)
                delta = b @ a
                if emb or fan_in_fan_out:
                    delta = delta.T
                want[module + ".weight"] = instruct[module + ".weight"].double() + alpha * s * delta
                if module + ".lora_B.bias" in tensors:
                    want[module + ".bias"] = (
                        instruct[module + ".bias"].double() + alpha * s * tensors[module + ".lora_B.bias"]
                    )
    return want


def check_merge(
    out: Path,
    instruct_dir: Path,
    adapter: Path,
    want64: dict,
    peft_onto: Path,
    base_dir: Path | None = None,
    alpha: float = 1.0,
    logits: bool = True,
    cls=None,
):
    """(a) the float64 formula within one ulp; untouched tensors bit-identical to Instruct's;
    (b) PEFT: I + alpha * (merged(peft_onto) - peft_onto) within one ulp, and the logits."""
    got, instruct = load_folder(out), load_folder(instruct_dir)
    assert set(got) == set(instruct)
    for name, t in got.items():
        assert t.dtype == instruct[name].dtype, name
        if name in want64:
            assert_within_ulp(t, want64[name], f"formula {name}")
        else:
            assert torch.equal(t, instruct[name]), f"{name} should be Instruct's, unchanged"
    merged_model, merged = peft_merge(peft_onto, adapter)
    onto = instruct if peft_onto == instruct_dir else load_folder(base_dir)
    changed = 0
    for name, t in got.items():
        if name not in merged:
            continue  # e.g. GPT-2's tied lm_head
        expected = instruct[name].double() + alpha * (merged[name].double() - onto[name].double())
        assert_within_ulp(t, expected, f"PEFT {name}")
        changed += not torch.equal(t, instruct[name])
    assert changed >= len(want64) > 0
    if logits:
        # ours is rounded once to bf16; round PEFT's float32 merge the same way and the models must agree
        ours, theirs = load_model(out, cls), merged_model.to(torch.bfloat16).to(torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(ours(TOKENS).logits, theirs(TOKENS).logits, atol=1e-4, rtol=1e-3)
    manifest = json.loads((out / "graftcore.json").read_text())
    assert manifest["counts"]["lora"] > 0 and "lora_alpha/r" in manifest["formula"]
    return got


@pytest.mark.parametrize("chunk", [1 << 18, 40])
def test_plain_lora(llama, tmp_path, chunk):
    base, instruct = llama
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=PROJ)
    report = graftcore.graft(tuned=adapter, instruct=instruct, output=tmp_path / "out", chunk_size=chunk, quiet=True)
    assert report.lora == 2 * len(PROJ) and report.grafted == 0
    want = lora_reference(load_folder(instruct), adapter, lambda m: 16)
    check_merge(tmp_path / "out", instruct, adapter, want, peft_onto=instruct)


def test_alpha_half_through_cli(llama, tmp_path, cli):
    base, instruct = llama
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    code, _, err = cli(
        "merge", "--tuned", adapter, "--instruct", instruct, "--output", tmp_path / "out", "--alpha", "0.5", "--quiet"
    )
    assert code == 0, err
    want = lora_reference(load_folder(instruct), adapter, lambda m: 8, alpha=0.5)
    check_merge(tmp_path / "out", instruct, adapter, want, peft_onto=instruct, alpha=0.5, logits=False)


def test_rslora_and_lora_bias(llama, tmp_path):
    base, instruct = llama
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        r=16,
        lora_alpha=4,
        use_rslora=True,
        lora_bias=True,
        target_modules=["v_proj", "o_proj"],
    )  # attention_bias: both have a bias
    assert "base_model.model.model.layers.0.self_attn.v_proj.lora_B.bias" in load_file(
        adapter / "adapter_model.safetensors"
    )
    graftcore.graft(tuned=adapter, instruct=instruct, output=tmp_path / "out", quiet=True)
    want = lora_reference(load_folder(instruct), adapter, lambda m: 4, rs=True)
    check_merge(tmp_path / "out", instruct, adapter, want, peft_onto=instruct)


def test_rank_and_alpha_patterns(llama, tmp_path):
    base, instruct = llama
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        target_modules=PROJ,
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"up_proj": 3, r"layers\.0\.self_attn\.v_proj": 20},
    )
    a = load_file(adapter / "adapter_model.safetensors")
    assert a["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape[0] == 6
    assert a["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape[0] == 4

    def alpha_of(module):
        return 3 if module.endswith("up_proj") else 20 if module == "model.layers.0.self_attn.v_proj" else 8

    graftcore.graft(tuned=adapter, instruct=instruct, output=tmp_path / "out", quiet=True)
    want = lora_reference(load_folder(instruct), adapter, alpha_of)
    check_merge(tmp_path / "out", instruct, adapter, want, peft_onto=instruct)


def test_embedding_lora_and_layers_to_transform(llama, tmp_path):
    """An Embedding LoRA (delta = (B @ A).T) saved without the frozen embedding copy, and layers_to_transform."""
    base, instruct = llama
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "o_proj", "gate_proj"],
        layers_to_transform=[1],
        save_embedding_layers=False,
    )
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert (
        not any("layers.0." in k for k in keys) and "base_model.model.model.embed_tokens.lora_embedding_A" not in keys
    )
    # layers_to_transform also filters embed_tokens (no layer index): PEFT targets only layer 1's modules
    adapter2 = make_adapter(
        base,
        tmp_path / "adapter2",
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "lm_head"],
        save_embedding_layers=False,
    )
    graftcore.graft(tuned=adapter, instruct=instruct, output=tmp_path / "out", quiet=True)
    check_merge(
        tmp_path / "out",
        instruct,
        adapter,
        lora_reference(load_folder(instruct), adapter, lambda m: 8),
        peft_onto=instruct,
    )
    graftcore.graft(tuned=adapter2, instruct=instruct, output=tmp_path / "out2", quiet=True, chunk_size=50)
    want = lora_reference(load_folder(instruct), adapter2, lambda m: 8)
    assert set(want) == {"model.embed_tokens.weight", "lm_head.weight"}
    check_merge(tmp_path / "out2", instruct, adapter2, want, peft_onto=instruct)


def test_embedding_with_saved_base_layer(llama, tmp_path):
    """PEFT's default save of an embedding LoRA also writes the frozen Base embedding; it is not used."""
    base, instruct = llama
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(adapter / "adapter_model.safetensors")
    report = graftcore.graft(tuned=adapter, instruct=instruct, output=tmp_path / "out", quiet=True)
    assert any("frozen base weight" in n for n in report.notes)
    want = lora_reference(load_folder(instruct), adapter, lambda m: 8)
    # PEFT loads the saved Base embedding over Instruct's, so compare with its merge onto Base instead
    check_merge(tmp_path / "out", instruct, adapter, want, peft_onto=base, base_dir=base, logits=False)


def test_modules_to_save_and_trained_biases_need_base(llama, tmp_path, cli):
    base, instruct = llama
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
        bias="lora_only",
    )
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert "base_model.model.lm_head.weight" in keys  # peft 0.21 writes modules_to_save under the plain name
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys  # bias="lora_only"
    out = tmp_path / "out"
    code, _, err = cli("merge", "--tuned", adapter, "--instruct", instruct, "--output", out)
    assert code == 2 and err.count("\n") == 1 and "--base" in err and "lm_head.weight" in err
    assert not out.exists()
    code, _, err = cli(
        "merge",
        "--tuned",
        adapter,
        "--instruct",
        instruct,
        "--base",
        base,
        "--output",
        out,
        "--quiet",
        "--alpha",
        "0.75",
    )
    assert code == 0, err
    inst, b, full = load_folder(instruct), load_folder(base), load_file(adapter / "adapter_model.safetensors")
    want = lora_reference(inst, adapter, lambda m: 8, alpha=0.75)
    for key in [k for k in full if k == "base_model.model.lm_head.weight" or k.endswith("base_layer.bias")]:
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        full_delta = 0.75 * (full[key].double() - b[name].double())
        want[name] = inst[name].double() + full_delta
    check_merge(out, instruct, adapter, want, peft_onto=base, base_dir=base, alpha=0.75, logits=False)


@pytest.mark.parametrize("chunk", [1 << 18, 40])
def test_dora_with_base(llama, tmp_path, chunk):
    """DoRA on Linear (norm per row) and Embedding (norm per column): T from Base, grafted as I + (T - B)."""
    base, instruct = llama
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=["q_proj", "down_proj", "embed_tokens"],
        save_embedding_layers=False,
    )
    graftcore.graft(tuned=adapter, instruct=instruct, base=base, output=tmp_path / "out", quiet=True, chunk_size=chunk)
    # the float64 formula: PEFT's DoRA merge of Base, written plainly
    inst, b = load_folder(instruct), load_folder(base)
    ad = {
        k.removeprefix("base_model.model."): v.double()
        for k, v in load_file(adapter / "adapter_model.safetensors").items()
    }
    want = {}
    for module in [k.rsplit(".", 1)[0] for k in ad if k.endswith(".lora_magnitude_vector")]:
        emb = module + ".lora_embedding_A" in ad
        a, bb = (
            (ad[module + ".lora_embedding_A"], ad[module + ".lora_embedding_B"])
            if emb
            else (ad[module + ".lora_A.weight"], ad[module + ".lora_B.weight"])
        )
        w = b[module + ".weight"].double()
        v = w + (8 / 4) * ((bb @ a).T if emb else bb @ a)
        norm = v.norm(dim=0, keepdim=True) if emb else v.norm(dim=1, keepdim=True)
        m = ad[module + ".lora_magnitude_vector"].view(norm.shape)
        want[module + ".weight"] = inst[module + ".weight"].double() + (m / norm * v - w)
    assert len(want) == 2 * 2 + 1
    check_merge(tmp_path / "out", instruct, adapter, want, peft_onto=base, base_dir=base, logits=False)


def test_gpt2_fan_in_fan_out(gpt2, tmp_path):
    """Conv1D weights are stored [in, out]: delta = (B @ A).T; with DoRA the norm is per stored column."""
    base, instruct = gpt2
    cls = transformers.GPT2LMHeadModel
    adapter = make_adapter(
        base, tmp_path / "adapter", r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"]
    )
    graftcore.graft(tuned=adapter, instruct=instruct, output=tmp_path / "out", quiet=True, chunk_size=64)
    want = lora_reference(load_folder(instruct), adapter, lambda m: 8, fan_in_fan_out=True)
    check_merge(tmp_path / "out", instruct, adapter, want, peft_onto=instruct, cls=cls)

    dora = make_adapter(
        base, tmp_path / "dora", r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True, target_modules=["c_proj"]
    )
    graftcore.graft(tuned=dora, instruct=instruct, base=base, output=tmp_path / "out2", quiet=True, chunk_size=64)
    inst, b = load_folder(instruct), load_folder(base)
    ad = {
        k.removeprefix("base_model.model."): v.double()
        for k, v in load_file(dora / "adapter_model.safetensors").items()
    }
    want = {}
    for module in [k[: -len(".lora_A.weight")] for k in ad if k.endswith(".lora_A.weight")]:
        w = b[module + ".weight"].double()  # [in, out]
        v = w + 2.0 * (ad[module + ".lora_B.weight"] @ ad[module + ".lora_A.weight"]).T
        norm = v.norm(dim=0, keepdim=True)
        want[module + ".weight"] = inst[module + ".weight"].double() + (
            ad[module + ".lora_magnitude_vector"].view(1, -1) / norm * v - w
        )
    assert len(want) == 4  # attn.c_proj and mlp.c_proj in both layers
    check_merge(tmp_path / "out2", instruct, dora, want, peft_onto=base, base_dir=base, logits=False, cls=cls)


def test_bench_adapter_generator(llama, tmp_path):
    """bench/make_lora_adapter.py writes an adapter PEFT loads and graftcore merges identically."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_lora_adapter", Path(__file__).parents[1] / "bench" / "make_lora_adapter.py"
    )
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    base, instruct = llama
    assert gen.main([str(instruct), "--out", str(tmp_path / "adapter"), "--rank", "8", "--seed", "3"]) == 0
    first = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    gen.main([str(instruct), "--out", str(tmp_path / "again"), "--rank", "8", "--seed", "3"])
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == first  # deterministic
    report = graftcore.graft(tuned=tmp_path / "adapter", instruct=instruct, output=tmp_path / "out", quiet=True)
    assert report.lora == 2 * len(PROJ)
    want = lora_reference(load_folder(instruct), tmp_path / "adapter", lambda m: 16)
    check_merge(tmp_path / "out", instruct, tmp_path / "adapter", want, peft_onto=instruct)


# ---------------------------------------------------------------- bad adapters: exit 2, one line, nothing finished


@pytest.fixture
def good_adapter(llama, tmp_path):
    return make_adapter(llama[0], tmp_path / "good", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture
def refused(cli, capsys, tmp_path):
    """`refused(adapter, instruct, *needles)`: the CLI exits 2 with one line naming them, writing nothing finished."""

    def check(adapter, instruct, *needles, base=None):
        out = tmp_path / "out"
        args = ["merge", "--tuned", adapter, "--instruct", instruct, "--output", out] + (
            ["--base", base] if base else []
        )
        capsys.readouterr()  # drop what building the adapter printed
        code, _, err = cli(*args)
        assert code == 2, err
        assert err.count("\n") == 1 and err.startswith("graftcore: error: "), err
        for needle in needles:
            assert needle in err, (needle, err)
        assert not out.exists() or not any(out.glob("*.safetensors")) and not (out / "graftcore.json").exists()

    return check


def test_missing_config(refused, tmp_path, llama, good_adapter):
    bad = tmp_path / "bad"
    shutil.copytree(good_adapter, bad)
    (bad / "adapter_config.json").unlink()
    refused(bad, llama[1], "adapter_model.safetensors", "adapter_config.json")


def test_unknown_module(refused, tmp_path, llama, good_adapter):
    key = "base_model.model.model.layers.1.self_attn.q_proj."

    def edit(t):
        for part in ("lora_A.weight", "lora_B.weight"):
            t[key.replace("layers.1", "layers.7") + part] = t.pop(key + part)

    bad = edited(good_adapter, tmp_path / "bad", edit)
    refused(bad, llama[1], str(bad / "adapter_model.safetensors"), "layers.7.self_attn.q_proj", "does not have")


def test_module_not_in_config(refused, tmp_path, llama, good_adapter):
    def edit(t):
        for part in ("lora_A.weight", "lora_B.weight"):
            t["base_model.model.model.layers.0.self_attn.k_proj." + part] = t[
                "base_model.model.model.layers.0.self_attn.v_proj." + part
            ].clone()

    bad = edited(good_adapter, tmp_path / "bad", edit)
    refused(bad, llama[1], "k_proj.lora_A.weight", "target_modules")


def test_shape_mismatch(refused, tmp_path, llama, good_adapter):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    bad = edited(good_adapter, tmp_path / "bad", lambda t: t.update({key: torch.randn(4, 48)}))
    refused(bad, llama[1], key, "[32, 48]", "[32, 32]")


def test_rank_mismatch(refused, tmp_path, llama, good_adapter):
    bad = tmp_path / "bad"
    shutil.copytree(good_adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"v_proj": 2}}))
    refused(bad, llama[1], "v_proj.lora_A.weight", "rank 4", "rank 2")


def test_dora_without_base(refused, tmp_path, llama):
    adapter = make_adapter(llama[0], tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    refused(adapter, llama[1], "DoRA", "lora_magnitude_vector", "--base")


def test_pickled_adapter(refused, tmp_path, llama, good_adapter):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(good_adapter / "adapter_config.json", bad)
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")  # must never be unpickled
    refused(bad, llama[1], "adapter_model.bin", "never unpickles")


def test_full_checkpoint_without_base_fails_before_opening(refused, tmp_path, llama):
    """A tuned model that is not an adapter still needs --base, and says so before touching Instruct."""
    refused(llama[1], tmp_path / "no-such-instruct", "--base is required")


def test_dry_run(llama, tmp_path, cli, good_adapter):
    code, out, err = cli(
        "merge", "--tuned", good_adapter, "--instruct", llama[1], "--output", tmp_path / "out", "--dry-run"
    )
    assert code == 0, err
    assert "lora" in out and "4 tensors" in out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("dora", [False, True])
def test_lora_through_the_gpu_stream_compute(llama, tmp_path, dora):
    """The GPU path's lora() (here on a CPU device, null streams: the same code a CUDA device runs)."""
    from graftcore.api import run_plan
    from graftcore.compute.cuda import StreamCompute
    from graftcore.lora.adapter import open_adapter
    from graftcore.options import MergeOptions
    from graftcore.plan import DeltaInput, build_plan
    from graftcore.sources.local import open_checkpoint

    base, instruct = llama
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=PROJ, use_dora=dora)
    ad, opts = open_adapter(adapter), MergeOptions(quiet=True)
    cks = {"instruct": open_checkpoint(instruct), "tuned": ad.checkpoint, "base": open_checkpoint(base)}
    plan = build_plan(
        cks["instruct"], [DeltaInput("tuned", 1.0, ad.checkpoint, ad)], cks["base"] if dora else None, opts
    )
    run_plan(plan, cks, tmp_path / "gpu", opts, print, compute=StreamCompute("cpu", 1000, launch=lambda *a: None))
    graftcore.graft(tuned=adapter, instruct=instruct, base=base if dora else None, output=tmp_path / "cpu", quiet=True)
    got, cpu = load_folder(tmp_path / "gpu"), load_folder(tmp_path / "cpu")
    inst = load_folder(instruct)
    changed = 0
    for name, t in got.items():
        assert_within_ulp(t, cpu[name].double(), f"stream vs cpu {name}")
        changed += not torch.equal(t, inst[name])
    assert changed == 2 * len(PROJ)


@pytest.mark.parametrize("order", ["full first", "adapter first"])
def test_adapter_and_full_checkpoint_in_one_pass(llama, tmp_path, order):
    """I + a1 * (T - B) + a2 * s * (B @ A): a full fine-tune and a LoRA adapter merged in one pass. Tensors the
    adapter does not touch are bit-exact with the float32 formula; LoRA targets within one ulp of float64."""
    base, instruct = llama
    torch.manual_seed(0)
    full = perturbed(load_model(base).to(torch.bfloat16), 5, 0.004)
    full.save_pretrained(tmp_path / "full")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    tuned, alphas = [tmp_path / "full", adapter], [0.5, 1.5]
    if order == "adapter first":
        tuned, alphas = tuned[::-1], alphas[::-1]
    report = graftcore.graft(
        base=base, tuned=tuned, alpha=alphas, instruct=instruct, output=tmp_path / "out", quiet=True
    )
    assert report.lora == 4 and report.grafted == len(load_folder(instruct)) - 4
    got, inst, b, t = (load_folder(p) for p in (tmp_path / "out", instruct, base, tmp_path / "full"))
    a_full, a_lora = (0.5, 1.5)
    lora = lora_reference({n: torch.zeros_like(x) for n, x in inst.items()}, adapter, lambda m: 8)  # s * B @ A alone
    for name, x in inst.items():
        if name in lora:
            want = x.double() + a_full * (t[name].double() - b[name].double()) + a_lora * lora[name]
            assert_within_ulp(got[name], want, name)
        else:
            want = (x.float() + a_full * (t[name].float() - b[name].float())).to(x.dtype)
            assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), name
    manifest = json.loads((tmp_path / "out" / "graftcore.json").read_text())
    assert manifest["options"]["alpha"] == alphas and "tuned2" in manifest["inputs"]


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_nan_in_a_factor_names_that_factor(llama, tmp_path, cli, factor):
    """The factor that holds the NaN is the one named (lora_B is the left factor of a Linear's update)."""
    base, instruct = llama
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    weights = load_file(adapter / "adapter_model.safetensors")
    name = next(n for n in weights if "layers.0.self_attn.q_proj" in n and factor in n)
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, adapter / "adapter_model.safetensors")
    code, _, err = cli("merge", "--tuned", adapter, "--instruct", instruct, "--output", tmp_path / "out", "--quiet")
    assert code == 2 and f"tensor {name!r} holds NaN/Inf" in err and len(err.strip().splitlines()) == 1, err
