"""Nothing dropped without being asked: an update that would not reach the output is an error (exit 2, one line
naming how many, the first few and what keeps them), unless --exclude names it; similarity says on stderr what it
did not measure and how much of the model its whole-model row covers."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import LLAMA, llama_tensors, load_folder, make_adapter, write_trio

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


def one_line_exit_2(code, err, *needles):
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def llama_and_adapter(tmp_path_factory):
    """A tiny random Llama (Base), a perturbed Instruct, and a real PEFT LoRA on q_proj, v_proj and gate_proj."""
    root = tmp_path_factory.mktemp("dropped")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(root / "instruct")
    adapter = make_adapter(
        root / "base", root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]
    )
    return root, adapter


def test_an_adapter_update_outside_the_selection(llama_and_adapter, tmp_path, cli):
    root, adapter = llama_and_adapter
    args = ("merge", "--tuned", adapter, "--instruct", root / "instruct", "--quiet")
    code, _, err = cli(*args, "--output", tmp_path / "a", "--include", "mlp")
    # 2 layers x (q_proj, v_proj): their updates would be copied away by --include mlp
    one_line_exit_2(code, err, "4 adapter update(s)", "self_attn.q_proj.weight", "--exclude")
    assert not (tmp_path / "a").exists()
    code, _, err = cli(*args, "--output", tmp_path / "b", "--include", "mlp", "--exclude", r"self_attn\.[qv]_proj")
    assert code == 0, err  # dropped on purpose
    got, instruct = load_folder(tmp_path / "b"), load_folder(root / "instruct")
    q, gate = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(got[q].view(torch.int16), instruct[q].view(torch.int16))  # copied as asked
    assert not torch.equal(got[gate], instruct[gate])  # grafted


def test_nothing_to_graft(tmp_path, cli):
    sds = llama_tensors(1), llama_tensors(2, noise=1e-3), llama_tensors(3, noise=1e-3)
    b, t, i = write_trio(tmp_path / "trio", sds)
    args = ("merge", "--base", b, "--tuned", t, "--instruct", i)
    for k, selection in enumerate((["--exclude", "."], ["--include", "no-such-tensor"])):
        code, _, err = cli(*args, "--output", tmp_path / f"o{k}", *selection)
        one_line_exit_2(code, err, "nothing to graft", "not selected", str(i))
        assert not (tmp_path / f"o{k}").exists()


def test_tensors_instruct_lacks_are_an_error_unless_excluded(tmp_path, cli):
    base, tuned, instruct = llama_tensors(1), llama_tensors(2, noise=1e-3), llama_tensors(3, noise=1e-3)
    extra = [f"model.layers.{k}.mlp.experts.0.up_proj.weight" for k in range(2)]  # as if Instruct were laid out
    for n in extra:  # otherwise: the update of these would silently be lost
        base[n] = tuned[n] = torch.randn(4, 4).bfloat16()
    b, t, i = write_trio(tmp_path, (base, tuned, instruct))
    code, _, err = cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "o")
    one_line_exit_2(code, err, "2 tensor(s) of tuned", repr(extra[0]), "would be dropped", str(t))
    code, _, err = cli(
        "merge",
        "--base",
        b,
        "--tuned",
        t,
        "--instruct",
        i,
        "--output",
        tmp_path / "o",
        "--exclude",
        "experts",
        "--quiet",
    )
    assert code == 0, err
    ignored = json.loads((tmp_path / "o" / "graftcore.json").read_text())["ignored"]
    assert sorted(x["name"] for x in ignored) == extra


def test_similarity_says_what_it_did_not_measure(tmp_path, cli):
    base, instruct = llama_tensors(1), llama_tensors(3, noise=5e-3)
    b, i = write_trio(tmp_path, (base, base, instruct))[0::2]
    code, out, err = cli(
        "similarity", "--base", b, "--instruct", i, "--targets", "projections", "--quiet", "--output", tmp_path / "sim"
    )
    assert code == 0, err
    measured = [n for n in instruct if n.endswith("_proj.weight")]
    skipped = [n for n in instruct if n not in measured]
    covered = sum(instruct[n].numel() for n in measured) / sum(t.numel() for t in instruct.values())
    line = next(line for line in err.splitlines() if "not measured" in line)
    assert f"{len(skipped)} tensor(s) not measured" in line and "not selected" in line
    assert f"{100 * covered:.1f}% of Instruct's parameters" in line
    model_row = out.splitlines()[1]
    assert model_row.split()[0] == "model" and model_row.split()[-1] == f"{100 * covered:.1f}%"
    doc = json.loads((tmp_path / "sim" / "similarity.json").read_text())
    assert doc["coverage"] == pytest.approx(covered, rel=1e-12)


def test_a_tied_base_and_tuned_over_an_untied_instruct(tmp_path, cli):
    """Base and tuned tie lm_head to the embedding (no head in their files), Instruct has its own: the head's
    update in the tied model is the embedding's, so Instruct's head gets it, and the run says so."""
    import transformers
    from helpers import load_folder, reference, same_bits

    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, tie_word_embeddings=True)).bfloat16()
    tied.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in tied.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tied.save_pretrained(tmp_path / "tuned")
    untied = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, tie_word_embeddings=False)).bfloat16()
    untied.save_pretrained(tmp_path / "instruct")
    roles = [x for r in ("base", "tuned", "instruct") for x in (f"--{r}", tmp_path / r)]
    code, _, err = cli("merge", *roles, "--output", tmp_path / "out", "--quiet")
    assert code == 0, err
    assert "Instruct's head gets the embedding's update" in err, err
    base, tuned, instruct, got = (load_folder(tmp_path / r) for r in ("base", "tuned", "instruct", "out"))
    assert "lm_head.weight" not in base and "lm_head.weight" not in tuned
    embed = "model.embed_tokens.weight"
    for n, i in instruct.items():
        source = embed if n == "lm_head.weight" else n
        assert same_bits(got[n], reference(i, tuned[source], base[source])), n
    code, _, err = cli("merge", *roles, "--output", tmp_path / "kept", "--quiet", "--exclude", "lm_head")
    assert code == 0 and "Instruct's head gets" not in err, err  # the head stays Instruct's: no such note
    assert same_bits(load_folder(tmp_path / "kept")["lm_head.weight"], instruct["lm_head.weight"])
