"""`graftcore verify`: a fresh merge passes (with chunks recomputed from the inputs), and each kind of damage
fails with exit 2 and one line naming the file: a flipped byte, a truncated or missing shard, an edited index,
a changed input's data or header."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import LLAMA, llama_tensors, load_folder, make_adapter, write_checkpoint

import graftcore


@pytest.fixture
def merged(tmp_path):
    base = llama_tensors(1)
    tuned = [llama_tensors(2, torch.float32, noise=2e-3), llama_tensors(3, noise=2e-3)]
    instruct = llama_tensors(4, noise=5e-3)
    instruct["lm_head.weight"] = llama_tensors(4, vocab=100, noise=5e-3)["lm_head.weight"]
    instruct["position_ids"] = torch.arange(7)  # copied byte for byte
    paths = {
        "base": write_checkpoint(tmp_path / "base", base),
        "instruct": write_checkpoint(tmp_path / "instruct", instruct, 2),
        "tuned": [write_checkpoint(tmp_path / "t1", tuned[0], 3), write_checkpoint(tmp_path / "t2", tuned[1])],
    }
    out = tmp_path / "out"
    graftcore.graft(
        base=paths["base"],
        tuned=paths["tuned"],
        alpha=[0.5, 1.5],
        instruct=paths["instruct"],
        output=out,
        quiet=True,
        chunk_size=700,
        exclude=["norm"],
    )
    return out, paths, tuned


def test_a_fresh_merge_verifies_with_recomputed_chunks(merged, cli):
    out, *_ = merged
    report = graftcore.verify(out, recompute=12, seed=3)
    assert report.shards == 2 and report.tensors == len(
        json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    )
    assert report.chunks_recomputed == 12 + 2 * 2 and report.within_ulp == 0
    code, stdout, err = cli("verify", out, "--recompute", "4")
    assert code == 0 and "verified" in stdout and "8 chunk(s) recomputed from the inputs: 8 bit-exact" in stdout, err


def test_verify_recomputes_lora_and_copies(tmp_path):
    """A PEFT adapter merged onto Instruct: its LoRA blocks recompute to the same bits on the CPU."""
    pytest.importorskip("peft")
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "instruct")
    adapter = make_adapter(
        tmp_path / "base", tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    graftcore.graft(tuned=adapter, instruct=tmp_path / "instruct", output=tmp_path / "out", quiet=True, chunk_size=64)
    report = graftcore.verify(tmp_path / "out", recompute=30, seed=1)
    assert report.chunks_recomputed == 32


def test_the_files_check_needs_no_torch(merged):
    """verify without --recompute reads headers and hashes files: torch never loads (it starts in a fraction of a
    second); --recompute loads it."""
    out, *_ = merged
    code = "import sys; from graftcore.cli import main; code = main(sys.argv[1:]); print(code, 'torch' in sys.modules)"
    for extra, loaded in (([], "False"), (["--recompute", "1"], "True")):
        run = subprocess.run(
            [sys.executable, "-c", code, "verify", str(out), *extra], capture_output=True, text=True, timeout=120
        )
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


@pytest.mark.parametrize("where", ["last", "first", "middle", "header"])
def test_flipped_byte(where, merged, cli):
    """A flipped byte anywhere in a shard: exit 2 naming the shard and the tensor whose bytes hold it (found with
    the reference library's reading of the header), or the header."""
    from safetensors import safe_open

    out, *_ = merged
    shard = out / "model-00002-of-00002.safetensors"
    with open(shard, "rb") as f:
        header_len = 8 + int.from_bytes(f.read(8), "little")
        raw = f.read(header_len - 8)
        doc = json.loads(raw)
    spans = sorted((v["data_offsets"], k) for k, v in doc.items() if k != "__metadata__" and v["data_offsets"][1])
    with safe_open(shard, "pt") as f:
        assert sorted(f.keys()) == sorted(k for _, k in spans)
    (lo, hi), name = {"last": spans[-1], "first": spans[0], "middle": spans[len(spans) // 2]}.get(where, ((0, 0), ""))
    # in the header: "pt" of the metadata's format becomes "pu", so the header stays valid JSON
    offset = 8 + raw.index(b'"pt"') + 2 if where == "header" else header_len + (lo + hi) // 2
    flip_byte(shard, offset)
    err = assert_fails(cli, out, "sha256 differs from graftcore.json")
    assert "model-00002-of-00002.safetensors" in err
    assert "its header" in err if where == "header" else f"tensor {name!r}" in err, err


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
    doc["weight_map"][name] = (
        "model-00002-of-00002.safetensors"
        if doc["weight_map"][name].startswith("model-00001")
        else "model-00001-of-00002.safetensors"
    )
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
    err = assert_fails(
        cli, out, "the bytes differ from what the recorded inputs give now", "--recompute", "1", "--seed", "0"
    )
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
    code, _, err = cli(
        "merge",
        "--base",
        "demo/base",
        "--tuned",
        "demo/tuned",
        "--instruct",
        "demo/instruct",
        "--output",
        "out",
        "--quiet",
    )
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli("verify", "work/out", "--recompute", "3")
    assert code == 0 and "bit-exact" in stdout, err


# ---- hostile folders: each one line and exit 2, never a hang, a traceback or a claim not checked ----------------


def edit_manifest(out, edit):
    doc = json.loads((out / "graftcore.json").read_text())
    edit(doc)
    (out / "graftcore.json").write_text(json.dumps(doc))


def first_shard(doc):
    return sorted(doc["shards"])[0]


MANIFEST_EDITS = {
    "shard record a string": lambda d: d["shards"].__setitem__(first_shard(d), "x"),
    "files a number": lambda d: d.__setitem__("files", 5),
    "plan a string": lambda d: d.__setitem__("plan", "x"),
    "plan a list": lambda d: d.__setitem__("plan", [1]),
    "options a string": lambda d: d.__setitem__("options", "x"),
    "options a list": lambda d: d.__setitem__("options", [1]),
    "inputs a list": lambda d: d.__setitem__("inputs", [1]),
    "instruct a string": lambda d: d["inputs"].__setitem__("instruct", "x"),
    "file_states a string": lambda d: d["inputs"]["base"].__setitem__("file_states", "abc"),
    "role renamed": lambda d: d["inputs"].__setitem__("tunedX", d["inputs"].pop("tuned2")),
    "chunk of 10**15": lambda d: d["options"].__setitem__("chunk_size", 10**15),
    "plan.tensors off by one": lambda d: d["plan"].__setitem__("tensors", d["plan"]["tensors"] + 1),
    "counts not counts": lambda d: d.__setitem__("counts", {"x": "1"}),
    "fingerprint removed": lambda d: d.pop("fingerprint"),
    "shard outside the folder": lambda d: d["shards"].__setitem__(
        "../base/model.safetensors", d["shards"].pop(first_shard(d))
    ),
}


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS))
def test_a_manifest_of_other_types_is_one_line(merged, cli, edit):
    out, *_ = merged
    edit_manifest(out, MANIFEST_EDITS[edit])
    err = assert_fails(cli, out, "graftcore.json", "--recompute", "3", "--seed", "0")
    assert "chunk-size" in err if edit == "chunk of 10**15" else True


def test_json_nested_deep_is_one_line(merged, cli):
    out, *_ = merged
    for depth in (1000, 200_000):
        (out / "graftcore.json").write_text("[" * depth + "]" * depth)
        assert_fails(cli, out, "graftcore.json: graftcore.json is not valid JSON")
    (out / "graftcore.json").write_text("{" + '"a":' * 1000 + "1" + "}" * 1000)
    assert_fails(cli, out, "not valid JSON")


def test_an_index_nested_deep_is_one_line(merged, cli):
    out, *_ = merged
    (out / "model.safetensors.index.json").write_text("[" * 200_000 + "]" * 200_000)
    assert_fails(cli, out, "model.safetensors.index.json: the index is not valid JSON")


def test_a_manifest_that_names_a_key_twice(merged, cli):
    out, *_ = merged
    text = (out / "graftcore.json").read_text()
    (out / "graftcore.json").write_text(text.replace('"shards": {', '"shards": {}, "shards": {', 1))
    assert_fails(cli, out, "graftcore.json names 'shards' twice")


def test_a_manifest_that_is_a_fifo_or_dev_zero(merged):
    """A FIFO would block a plain read forever; /dev/zero never ends. Run as the CLI, with a timeout."""
    out, *_ = merged
    manifest = out / "graftcore.json"
    for make in (lambda: os.mkfifo(manifest), lambda: os.symlink("/dev/zero", manifest)):
        manifest.unlink()
        make()
        run = subprocess.run(
            [sys.executable, "-m", "graftcore", "verify", str(out)], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 2 and "not a regular file" in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1


def test_a_shard_the_user_cannot_read(merged):
    """Mode 000 (as root, a forked child drops to nobody: root reads any file)."""
    import shutil
    import tempfile

    out, *_ = merged
    folder = Path(tempfile.mkdtemp(prefix="graftcore-unreadable-"))
    try:
        folder.chmod(0o755)
        shutil.copytree(out, folder / "out")
        (folder / "out").chmod(0o755)
        shard = folder / "out" / "model-00001-of-00002.safetensors"
        shard.chmod(0)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                try:
                    graftcore.verify(folder / "out")
                    message = "passed"
                except graftcore.GraftError as e:
                    message = f"GraftError: {e}"
                except BaseException as e:  # noqa: BLE001  reported to the parent
                    message = f"{type(e).__name__}: {e}"
                os.write(write, message.encode())
            finally:
                os._exit(0)
        os.close(write)
        message = os.read(read, 4096).decode()
        os.close(read)
        os.waitpid(pid, 0)
        assert message.startswith("GraftError: ") and str(shard) in message and "cannot read" in message, message
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_deleted_shard_and_plan_is_not_verified(merged, cli):
    """Delete the last shard, drop it from shards, files and the index, and delete the plan digest: the shards
    left hash right, but a manifest without its plan digest cannot say the output is whole."""
    out, *_ = merged
    last = "model-00002-of-00002.safetensors"
    (out / last).unlink()

    def edit(doc):
        del doc["shards"][last], doc["plan"]
        doc["files"].remove(last)

    edit_manifest(out, edit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != last}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_fails(cli, out, "no plan digest")


def count_chunks(out, chunk):
    """The chunks of the merged fixture, counted from the output plainly: a computed tensor in chunks of `chunk`
    elements, a copied one (norms: --exclude; position_ids: integers) in one read of at most 4 MiB."""
    total = 0
    for name, t in load_folder(out).items():
        copied = "norm" in name or name == "position_ids"
        total += 1 if copied else -(-t.numel() // chunk)
    return total


def test_recompute_is_capped_at_the_distinct_chunks(merged):
    out, *_ = merged
    total = count_chunks(out, 700)
    assert 20 < total < 100
    for k in (total - 5, 5000, 10**12):
        report = graftcore.verify(out, recompute=k, seed=1)
        assert report.chunks_recomputed == min(k + 2 * 2, total), k


@pytest.mark.parametrize(
    "args",
    [
        dict(recompute=-3),
        dict(recompute="3"),
        dict(recompute=True),
        dict(seed="x"),
        dict(output=b"/tmp/out"),
        dict(output=5),
        dict(tokn="x"),
    ],
)
def test_bad_arguments_to_verify(merged, args):
    out, *_ = merged
    kwargs = {"output": out, **args}
    with pytest.raises(graftcore.GraftError):
        graftcore.verify(**kwargs)


def test_an_edited_alpha_is_named_as_an_edit_of_graftcore_json(merged, cli):
    """The recorded options no longer give the recorded job fingerprint: graftcore.json was edited, which says
    more than blaming the shard whose bytes no longer match."""
    out, *_ = merged
    edit_manifest(out, lambda d: d["options"].__setitem__("alpha", [0.25, 1.5]))
    assert cli("verify", out)[0] == 0  # the files check does not read the options
    assert_fails(cli, out, "do not give the job fingerprint it records", "--recompute", "1", "--seed", "0")
