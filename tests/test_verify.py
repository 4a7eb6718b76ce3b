"""`graftcore verify`: a fresh merge passes (with chunks recomputed from the inputs), and each kind of damage
fails with exit 2 and one line naming the file: a flipped byte, a truncated or missing shard, an edited index,
a changed input's data or header."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import llama_tensors, write_checkpoint

import graftcore


@pytest.fixture
def merged(tmp_path):
    base = llama_tensors(1)
    tuned = [llama_tensors(2, torch.float32, noise=2e-3), llama_tensors(3, noise=2e-3)]
    instruct = llama_tensors(4, noise=5e-3)
    instruct["lm_head.weight"] = llama_tensors(4, vocab=100, noise=5e-3)["lm_head.weight"]
    instruct["position_ids"] = torch.arange(7)  # copied byte for byte
    paths = {"base": write_checkpoint(tmp_path / "base", base), "instruct": write_checkpoint(tmp_path / "instruct", instruct, 2),
             "tuned": [write_checkpoint(tmp_path / "t1", tuned[0], 3), write_checkpoint(tmp_path / "t2", tuned[1])]}
    out = tmp_path / "out"
    graftcore.graft(base=paths["base"], tuned=paths["tuned"], alpha=[0.5, 1.5], instruct=paths["instruct"], output=out,
                    quiet=True, chunk_size=700, exclude=["norm"])
    return out, paths, tuned


def test_a_fresh_merge_verifies_with_recomputed_chunks(merged, cli):
    out, *_ = merged
    report = graftcore.verify(out, recompute=12, seed=3)
    assert report.shards == 2 and report.tensors == len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert report.chunks_recomputed == 12 + 2 * 2 and report.within_ulp == 0
    code, stdout, err = cli("verify", out, "--recompute", "4")
    assert code == 0 and "verified" in stdout and "8 chunk(s) recomputed from the inputs: 8 bit-exact" in stdout, err


def test_verify_recomputes_lora_and_copies(tmp_path):
    """A PEFT adapter merged onto Instruct: its LoRA blocks recompute to the same bits on the CPU."""
    pytest.importorskip("peft")
    import transformers
    from test_lora import LLAMA, make_adapter  # the real PEFT adapter maker

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "instruct")
    adapter = make_adapter(tmp_path / "base", tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    graftcore.graft(tuned=adapter, instruct=tmp_path / "instruct", output=tmp_path / "out", quiet=True, chunk_size=64)
    report = graftcore.verify(tmp_path / "out", recompute=30, seed=1)
    assert report.chunks_recomputed == 32


def test_the_files_check_needs_no_torch(merged):
    """verify without --recompute reads headers and hashes files: torch never loads (it starts in a fraction of a
    second); --recompute loads it."""
    out, *_ = merged
    code = "import sys; from graftcore.cli import main; code = main(sys.argv[1:]); print(code, 'torch' in sys.modules)"
    for extra, loaded in (([], "False"), (["--recompute", "1"], "True")):
        run = subprocess.run([sys.executable, "-c", code, "verify", str(out), *extra], capture_output=True, text=True, timeout=120)
        assert run.stdout.split()[-2:] == ["0", loaded], run.stdout + run.stderr


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def assert_fails(cli, out, message, *extra):
    code, stdout, err = cli("verify", out, *extra)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_flipped_byte(merged, cli):
    out, *_ = merged
    shard = out / "model-00002-of-00002.safetensors"
    flip_byte(shard, shard.stat().st_size - 10)
    err = assert_fails(cli, out, "sha256 differs from graftcore.json")
    assert "model-00002-of-00002.safetensors" in err


def test_truncated_and_missing_shard(merged, cli):
    out, *_ = merged
    shard = out / "model-00001-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 1)
    assert_fails(cli, out, "bytes, graftcore.json records")
    shard.unlink()
    assert_fails(cli, out, "model-00001-of-00002.safetensors: missing")


def test_edited_index(merged, cli):
    out, *_ = merged
    index = out / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    doc["weight_map"][name] = "model-00002-of-00002.safetensors" if doc["weight_map"][name].startswith("model-00001") else "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(doc))
    assert_fails(cli, out, f"maps tensor {name!r}")
    del doc["weight_map"][name]
    index.write_text(json.dumps(doc))
    assert_fails(cli, out, f"does not list tensor {name!r}")


def test_missing_manifest_is_not_a_finished_output(merged, cli):
    out, *_ = merged
    (out / "graftcore.json").unlink()
    assert_fails(cli, out, "not a finished graftcore output")


def test_recompute_refuses_an_input_rewritten_with_the_same_header(merged, cli):
    """One element of one tuned input changed, header identical: the files check passes (the output is what was
    written); --recompute refuses the input file whatever chunks it would have drawn."""
    out, paths, tuned = merged
    changed = dict(tuned[1])
    name = "model.layers.1.mlp.up_proj.weight"
    changed[name] = changed[name].clone()
    changed[name].view(-1)[5] += 1
    shard = paths["tuned"][1] / "model.safetensors"
    header = shard.read_bytes()[:64]
    write_checkpoint(paths["tuned"][1], changed)
    assert shard.read_bytes()[:64] == header
    code, _, err = cli("verify", out)
    assert code == 0, err
    err = assert_fails(cli, out, "the tuned2 input's file changed since the merge", "--recompute", "1", "--seed", "0")
    assert str(shard) in err


def test_recompute_compares_bits(merged, cli):
    """A shard whose bytes are wrong but recorded as right (its sha256 in graftcore.json updated to match): the
    files check passes, and the recomputed chunks name the tensor."""
    out, *_ = merged
    doc = json.loads((out / "graftcore.json").read_text())
    shard = out / "model-00001-of-00002.safetensors"
    header_end = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
    flip_byte(shard, header_end + 3)  # the first tensor's first chunk, always recomputed
    doc["shards"][shard.name]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (out / "graftcore.json").write_text(json.dumps(doc))
    code, _, err = cli("verify", out)
    assert code == 0, err
    err = assert_fails(cli, out, "the bytes differ from what the recorded inputs give now", "--recompute", "1", "--seed", "0")
    assert str(shard) in err and "tensor" in err


def test_recompute_finds_an_input_whose_header_changed(merged, cli):
    out, paths, tuned = merged
    changed = dict(tuned[0])
    changed["model.norm.weight"] = changed["model.norm.weight"].to(torch.bfloat16)  # same values, another dtype
    write_checkpoint(paths["tuned"][0], changed, 3)
    assert_fails(cli, out, "the tuned input is not the one the merge read", "--recompute", "1")


def test_verify_from_another_folder_finds_relative_inputs(tmp_path, cli, monkeypatch):
    """REFs typed relative to where the merge ran are recorded with their absolute paths."""
    base, tuned = llama_tensors(1), llama_tensors(2, noise=2e-3)
    write_checkpoint(tmp_path / "work" / "demo" / "base", base)
    write_checkpoint(tmp_path / "work" / "demo" / "tuned", tuned)
    write_checkpoint(tmp_path / "work" / "demo" / "instruct", llama_tensors(3, noise=5e-3))
    monkeypatch.chdir(tmp_path / "work")
    code, _, err = cli("merge", "--base", "demo/base", "--tuned", "demo/tuned", "--instruct", "demo/instruct", "--output", "out", "--quiet")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli("verify", "work/out", "--recompute", "3")
    assert code == 0 and "bit-exact" in stdout, err
