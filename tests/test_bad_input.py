"""Bad input: exit 2, one line on stderr naming the file (and tensor), no traceback, no finished-looking output."""

import json
import struct
import subprocess
import sys

import pytest
import torch
from helpers import llama_tensors, write_checkpoint, write_trio


def good_trio(tmp_path, instruct_shards=1):
    sds = llama_tensors(1), llama_tensors(2, noise=1e-3), llama_tensors(3, noise=1e-3)
    return write_trio(tmp_path, sds, (1, 1, instruct_shards), config={})


def raw_file(path, header: bytes | dict, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def corrupt_header(tmp_path, header, data=b"", length=None):
    """A base checkpoint that is one hand-made file."""
    return raw_file(tmp_path / "bad" / "model.safetensors", header, data, length).parent


W = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
CASES = {
    "truncated shard": lambda p: truncate(p),
    "header length past the file": lambda p: corrupt_header(p, {"w": W}, b"\0" * 16, length=10_000),
    "header length 2^60": lambda p: corrupt_header(p, b"{}", length=2**60),
    "non-JSON header": lambda p: corrupt_header(p, b"{not json", b""),
    "overlapping offsets": lambda p: corrupt_header(p, {"a": W, "b": {**W, "data_offsets": [8, 24]}}, b"\0" * 24),
    "out-of-range offsets": lambda p: corrupt_header(p, {"w": {**W, "data_offsets": [0, 16]}}, b"\0" * 8),
    "unknown dtype": lambda p: corrupt_header(p, {"w": {**W, "dtype": "F128"}}, b"\0" * 16),
    "shape and length disagree": lambda p: corrupt_header(p, {"w": {**W, "shape": [3, 2]}}, b"\0" * 16),
    "index naming a missing file": lambda p: missing_index_file(p),
}


def truncate(tmp_path):
    folder = write_checkpoint(tmp_path / "bad", llama_tensors(1))
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return folder


def missing_index_file(tmp_path):
    folder = write_checkpoint(tmp_path / "bad", llama_tensors(1), shard_count=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    return folder


def assert_refused(code, err, out_dir, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("graftcore: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out_dir.exists() or not any(
        (out_dir / f).exists()
        for f in ("graftcore.json", "config.json", "model.safetensors", "model.safetensors.index.json")
    )


@pytest.mark.parametrize("case", CASES)
def test_corrupt_base_is_refused_before_output(tmp_path, cli, case):
    _, t, i = good_trio(tmp_path)
    bad = CASES[case](tmp_path)
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", bad, "--tuned", t, "--instruct", i, "--output", out)
    assert_refused(code, err, out, str(bad))
    assert not out.exists()


def test_tensor_in_base_but_not_tuned(tmp_path, cli):
    b, _, i = good_trio(tmp_path)
    tuned = llama_tensors(2, noise=1e-3)
    del tuned["model.layers.1.mlp.up_proj.weight"]
    t = write_checkpoint(tmp_path / "t2", tuned)
    code, _, err = cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "model.layers.1.mlp.up_proj.weight", str(b), "not in tuned")
    assert not (tmp_path / "out").exists()


def test_base_tuned_shape_mismatch(tmp_path, cli):
    b, _, i = good_trio(tmp_path)
    tuned = llama_tensors(2, noise=1e-3)
    tuned["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 65, dtype=torch.bfloat16)
    t = write_checkpoint(tmp_path / "t2", tuned)
    code, _, err = cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "model.layers.0.mlp.down_proj.weight", "[32, 65]", "[32, 64]")


def test_instruct_shape_mismatch(tmp_path, cli):
    b, t, _ = good_trio(tmp_path)
    instruct = llama_tensors(3)
    instruct["model.norm.weight"] = torch.ones(31, dtype=torch.bfloat16)  # fewer rows: not a vocabulary growth
    i = write_checkpoint(tmp_path / "i2", instruct)
    code, _, err = cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "model.norm.weight", "[31]")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_in_tuned(tmp_path, cli, bad):
    b, _, i = good_trio(tmp_path)
    tuned = llama_tensors(2, noise=1e-3)
    tuned["model.layers.1.self_attn.o_proj.weight"][3, 5] = bad
    t = write_checkpoint(tmp_path / "t2", tuned)
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", out, "--quiet")
    assert_refused(code, err, out, "model.layers.1.self_attn.o_proj.weight", str(t), "--allow-nonfinite")
    assert not list(out.glob("*.partial"))
    code, _, err = cli(
        "merge", "--base", b, "--tuned", t, "--instruct", i, "--output", out, "--quiet", "--allow-nonfinite"
    )
    assert code == 0, err


def test_pickle_only_folder(tmp_path, cli):
    _, t, i = good_trio(tmp_path)
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    code, _, err = cli("merge", "--base", folder, "--tuned", t, "--instruct", i, "--output", tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", str(folder), "pytorch_model.bin", "never unpickles")


def test_occupied_output_folder(tmp_path, cli):
    b, t, i = good_trio(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(out) in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    code, _, err = cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", out, "--overwrite", "--quiet")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()


def test_output_cannot_be_an_input(tmp_path, cli):
    b, t, i = good_trio(tmp_path)
    before = (i / "model.safetensors").read_bytes()
    code, _, err = cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", i, "--overwrite")
    assert code == 2 and "instruct" in err
    assert (i / "model.safetensors").read_bytes() == before


def test_usage_errors_are_one_line(tmp_path, capsys):
    from graftcore.cli import main

    b, t, i = good_trio(tmp_path)
    common = ["merge", "--base", str(b), "--tuned", str(t), "--instruct", str(i)]
    for args in (
        common,
        [*common, "--output", "o", "--alpha", "x"],
        [*common, "--output", "o", "--include", "("],
        [*common, "--output", "o", "--max-shard-size", "lots"],
    ):
        try:
            code = main(args)
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "o").exists()


def test_subprocess_has_no_traceback(tmp_path):
    _, t, i = good_trio(tmp_path)
    bad = corrupt_header(tmp_path, b"{not json")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "graftcore.cli",
            "merge",
            "--base",
            str(bad),
            "--tuned",
            str(t),
            "--instruct",
            str(i),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr and "not valid JSON" in run.stderr
