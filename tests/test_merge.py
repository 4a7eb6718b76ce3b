"""End-to-end merges on the CPU path, bit-exact against the float32 formula written in helpers.reference."""

import hashlib
import json

import pytest
import torch
from helpers import llama_tensors, load_folder, reference, reference64, same_bits, write_trio

import graftcore

CFG = {"model_type": "llama"}


def trio(tmp_path, base, tuned, instruct, shards=(1, 1, 1), extra=None):
    return write_trio(tmp_path, (base, tuned, instruct), shards, config=CFG, extra_files=extra)


def standard(dtype=torch.bfloat16, tuned_dtype=None, **kw):
    return (
        llama_tensors(1, dtype, **kw),
        llama_tensors(2, tuned_dtype or dtype, noise=2e-3, **kw),
        llama_tensors(3, dtype, noise=5e-3, **kw),
    )


def assert_grafted(out, base, tuned, instruct, alpha=1.0, names=None, dtype=None):
    got = load_folder(out)
    assert set(got) == set(instruct)
    for n in names or instruct:
        want = reference(instruct[n], tuned[n], base[n], alpha, dtype)
        assert same_bits(got[n], want), n
    return got


@pytest.mark.parametrize("shards", [(2, 2, 2), (1, 3, 2), (3, 1, 1)])
def test_shard_layouts(tmp_path, cli, shards):
    base, tuned, instruct = standard()
    b, t, i = trio(
        tmp_path, base, tuned, instruct, shards, extra={"tokenizer_config.json": "{}", "chat_template.jinja": "x"}
    )
    code, _, err = cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "out", "--quiet")
    assert code == 0, err
    assert_grafted(tmp_path / "out", base, tuned, instruct)
    out = tmp_path / "out"
    # Instruct's layout, index, non-weight files and a manifest whose checksums match the files
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in i.glob("*.safetensors"))
    for f in ("config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / f).read_bytes() == (i / f).read_bytes()
    assert (out / "model.safetensors.index.json").exists() == (shards[2] > 1)
    if shards[2] > 1:
        assert (
            json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
            == json.loads((i / "model.safetensors.index.json").read_text())["weight_map"]
        )
    manifest = json.loads((out / "graftcore.json").read_text())
    for f, rec in manifest["shards"].items():
        assert hashlib.sha256((out / f).read_bytes()).hexdigest() == rec["sha256"]
    assert manifest["counts"]["grafted"] == len(instruct)
    assert not list(out.glob("*.partial")) and not (out / "graftcore.progress.json").exists()


def test_single_file_inputs_and_tiny_chunks(tmp_path, cli):
    base, tuned, instruct = standard()
    b, t, i = trio(tmp_path, base, tuned, instruct)
    args = [
        "--base",
        b / "model.safetensors",
        "--tuned",
        t / "model.safetensors",
        "--instruct",
        i / "model.safetensors",
    ]
    code, _, err = cli("merge", *args, "--output", tmp_path / "out", "--quiet", "--chunk-size", "1000")
    assert code == 0, err
    assert_grafted(tmp_path / "out", base, tuned, instruct)


def test_tuned_float32_with_bf16_base_and_instruct(tmp_path, cli):
    base, tuned, instruct = standard(torch.bfloat16, tuned_dtype=torch.float32)
    b, t, i = trio(tmp_path, base, tuned, instruct)
    assert cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "o", "--quiet")[0] == 0
    got = assert_grafted(tmp_path / "o", base, tuned, instruct)
    assert all(v.dtype == torch.bfloat16 for v in got.values())


def test_fp16_models(tmp_path, cli):
    base, tuned, instruct = standard(torch.float16)
    b, t, i = trio(tmp_path, base, tuned, instruct, (1, 2, 1))
    assert cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "o", "--quiet")[0] == 0
    assert_grafted(tmp_path / "o", base, tuned, instruct)


def test_alpha_half_within_one_ulp_of_float64(tmp_path, cli):
    base, tuned, instruct = standard()
    b, t, i = trio(tmp_path, base, tuned, instruct)
    assert (
        cli(
            "merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "o", "--alpha", "0.5", "--quiet"
        )[0]
        == 0
    )
    got = assert_grafted(tmp_path / "o", base, tuned, instruct, alpha=0.5)  # same op order: same bits
    for n in instruct:
        want = reference64(instruct[n], tuned[n], base[n], 0.5)
        ulps = (got[n].view(torch.int16).int() - want.view(torch.int16).int()).abs()
        assert int(ulps.max()) <= 1, n


def test_output_dtype_float32(tmp_path, cli):
    base, tuned, instruct = standard()
    base["model.layers.0.step"] = tuned["model.layers.0.step"] = instruct["model.layers.0.step"] = torch.arange(5)
    b, t, i = trio(tmp_path, base, tuned, instruct)
    assert (
        cli(
            "merge",
            "--base",
            b,
            "--tuned",
            t,
            "--instruct",
            i,
            "--output",
            tmp_path / "o",
            "--dtype",
            "float32",
            "--quiet",
        )[0]
        == 0
    )
    got = load_folder(tmp_path / "o")
    floats = [n for n in instruct if instruct[n].is_floating_point()]
    for n in floats:
        assert same_bits(got[n], reference(instruct[n], tuned[n], base[n], dtype=torch.float32)), n
    assert torch.equal(got["model.layers.0.step"], instruct["model.layers.0.step"])  # integers: Instruct's, as is


def test_tied_embeddings(tmp_path, cli):
    base, tuned, instruct = standard(tied=True)
    b, t, i = trio(tmp_path, base, tuned, instruct)
    assert cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "o", "--quiet")[0] == 0
    got = assert_grafted(tmp_path / "o", base, tuned, instruct)
    assert "lm_head.weight" not in got


def test_instruct_grown_vocabulary_and_instruct_only_tensors(tmp_path, cli):
    base, tuned, instruct = standard()
    grown = llama_tensors(3, vocab=104, noise=5e-3)  # 8 extra rows (new chat tokens)
    instruct["model.embed_tokens.weight"] = grown["model.embed_tokens.weight"]
    instruct["lm_head.weight"] = grown["lm_head.weight"]
    instruct["vision_tower.proj.weight"] = torch.randn(8, 8).bfloat16()
    base["model.extra_head.weight"] = tuned["model.extra_head.weight"] = torch.randn(4, 4).bfloat16()
    b, t, i = trio(tmp_path, base, tuned, instruct)
    # base and tuned hold a tensor Instruct lacks: its update would be lost, so not without being asked
    code, out, err = cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "dry", "--dry-run")
    assert code == 2 and "'model.extra_head.weight'" in err and "would be dropped" in err and "--exclude" in err, err
    assert str(t) in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "dry").exists()
    code, out, _ = cli(
        "merge",
        "--base",
        b,
        "--tuned",
        t,
        "--instruct",
        i,
        "--output",
        tmp_path / "dry",
        "--dry-run",
        "--exclude",
        "extra_head",
    )
    assert code == 0 and not (tmp_path / "dry").exists()
    assert "graft rows" in out and "vision_tower.proj.weight" in out and "model.extra_head.weight" in out
    assert (
        cli(
            "merge",
            "--base",
            b,
            "--tuned",
            t,
            "--instruct",
            i,
            "--output",
            tmp_path / "o",
            "--quiet",
            "--chunk-size",
            "500",
            "--exclude",
            "extra_head",
        )[0]
        == 0
    )
    got = load_folder(tmp_path / "o")
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert same_bits(got[n][:96], reference(instruct[n][:96], tuned[n], base[n])), n
        assert same_bits(got[n][96:], instruct[n][96:]), n
    assert same_bits(got["vision_tower.proj.weight"], instruct["vision_tower.proj.weight"])
    assert "model.extra_head.weight" not in got
    manifest = json.loads((tmp_path / "o" / "graftcore.json").read_text())
    assert {"name": "model.extra_head.weight", "reason": "in base and tuned, not in Instruct"} in manifest["ignored"]


def test_targets_projections_and_include_exclude(tmp_path, cli):
    base, tuned, instruct = standard()
    b, t, i = trio(tmp_path, base, tuned, instruct)
    assert (
        cli(
            "merge",
            "--base",
            b,
            "--tuned",
            t,
            "--instruct",
            i,
            "--output",
            tmp_path / "p",
            "--targets",
            "projections",
            "--quiet",
        )[0]
        == 0
    )
    got = load_folder(tmp_path / "p")
    projections = [n for n in instruct if n.split(".")[-2].endswith("_proj")]
    assert len(projections) == 14
    for n in instruct:
        want = reference(instruct[n], tuned[n], base[n]) if n in projections else instruct[n]
        assert same_bits(got[n], want), n
    assert (
        cli(
            "merge",
            "--base",
            b,
            "--tuned",
            t,
            "--instruct",
            i,
            "--output",
            tmp_path / "ie",
            "--include",
            r"layers\.1\.",
            "--include",
            "embed",
            "--exclude",
            "mlp",
            "--quiet",
        )[0]
        == 0
    )
    got = load_folder(tmp_path / "ie")
    for n in instruct:
        chosen = ("layers.1." in n or "embed" in n) and "mlp" not in n
        want = reference(instruct[n], tuned[n], base[n]) if chosen else instruct[n]
        assert same_bits(got[n], want), n


def test_wrapper_prefixes_are_stripped(tmp_path, cli):
    base, tuned, instruct = standard()
    wrapped = {"_orig_mod.module." + n: v for n, v in tuned.items()}
    b, t, i = trio(tmp_path, base, wrapped, instruct)
    code, _, err = cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "o")
    assert code == 0, err
    assert "'_orig_mod.module.'" in err
    assert_grafted(tmp_path / "o", base, tuned, instruct)


def test_max_shard_size_reshards(tmp_path, cli):
    base, tuned, instruct = standard(tied=True)
    b, t, i = trio(tmp_path, base, tuned, instruct)
    assert (
        cli(
            "merge",
            "--base",
            b,
            "--tuned",
            t,
            "--instruct",
            i,
            "--output",
            tmp_path / "o",
            "--max-shard-size",
            "20KB",
            "--quiet",
        )[0]
        == 0
    )
    files = sorted((tmp_path / "o").glob("*.safetensors"))
    assert len(files) > 2 and all(f.stat().st_size < 20_000 + 4096 for f in files)
    assert_grafted(tmp_path / "o", base, tuned, instruct)


def test_python_api_report(tmp_path):
    base, tuned, instruct = standard()
    b, t, i = trio(tmp_path, base, tuned, instruct)
    report = graftcore.graft(base=b, tuned=t, instruct=i, output=tmp_path / "o", quiet=True, targets="projections")
    assert (report.grafted, report.copied) == (14, len(instruct) - 14)
    assert report.bytes_written == sum(f.stat().st_size for f in (tmp_path / "o").glob("*.safetensors"))
    assert "14 grafted" in report.summary()
