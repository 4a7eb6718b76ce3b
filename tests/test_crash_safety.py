"""kill -9 and Ctrl-C midway: no incomplete file under a final name; a rerun resumes to the same bits."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import load_folder, reference, same_bits, write_trio
from safetensors import safe_open

from graftcore.io.safetensors_file import read_header


def big_trio(tmp_path):
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{k}.mlp.up_proj.weight" for k in range(8)]
    base = {n: (torch.randn(512, 1024, generator=g) * 0.02).bfloat16() for n in names}
    tuned = {n: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).bfloat16() for n, v in base.items()}
    instruct = {n: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).bfloat16() for n, v in base.items()}
    return (base, tuned, instruct), list(write_trio(tmp_path, (base, tuned, instruct), (2, 3, 4)))


def start(paths, out, chunk="256"):
    b, t, i = paths
    cmd = [
        sys.executable,
        "-m",
        "graftcore.cli",
        "merge",
        "--base",
        b,
        "--tuned",
        t,
        "--instruct",
        i,
        "--output",
        out,
        "--quiet",
        "--chunk-size",
        chunk,
    ]
    return subprocess.Popen([str(c) for c in cmd], stderr=subprocess.PIPE, text=True)


def wait_for_first_shard(out, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads((out / "graftcore.progress.json").read_text())["shards"]:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    pytest.fail("the merge finished or stalled before one shard was done; the test needs it midway")


def assert_final_names_complete(out):
    for f in out.glob("*.safetensors"):
        header = read_header(f)  # raises unless every byte the header promises is there
        with safe_open(f, "pt") as h:
            for n in h.keys():
                h.get_tensor(n)
        assert header.tensors
    assert not (out / "graftcore.json").exists() and not (out / "model.safetensors.index.json").exists()
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_interrupted_merge_leaves_no_incomplete_final_file_and_resumes(tmp_path, how):
    (base, tuned, instruct), paths = big_trio(tmp_path)
    out = tmp_path / "out"
    proc = start(paths, out)
    wait_for_first_shard(out, proc)
    proc.send_signal(getattr(signal, how))
    proc.wait(timeout=60)
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, proc.stderr.read()
        assert not list(out.glob("*.partial"))  # a clean interrupt removes its partial shard
    done = json.loads((out / "graftcore.progress.json").read_text())["shards"]
    assert 1 <= len(done) < 4
    assert_final_names_complete(out)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}

    b, t, i = paths
    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "graftcore.cli",
            "merge",
            "--base",
            str(b),
            "--tuned",
            str(t),
            "--instruct",
            str(i),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "already finished" in rerun.stderr
    for name in done:  # verified and kept, not rewritten
        assert (out / name).stat().st_mtime_ns == finished[name]
    got = load_folder(out)
    for n in instruct:
        assert same_bits(got[n], reference(instruct[n], tuned[n], base[n])), n
