"""Merges spread over processes: torchrun (2 and 3 ranks on this 2-core machine) and --workers, bit-identical to
one process, shard hashes included; a failing rank stops every rank; a bad input fails every rank before any
write; a rerun of any world size keeps the shards already finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import llama_tensors, load_folder, reference, same_bits, write_checkpoint, write_trio

import graftcore

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available():
    pytest.skip("torch without distributed support", allow_module_level=True)


@pytest.fixture
def trio(tmp_path):
    base, tuned = llama_tensors(1, layers=4), llama_tensors(2, torch.float32, noise=2e-3, layers=4)
    instruct = llama_tensors(3, noise=5e-3, layers=4)
    written = write_trio(tmp_path, (base, tuned, instruct), (1, 2, 5), config={"torch_dtype": "bfloat16"})
    paths = dict(zip(("base", "tuned", "instruct"), written))
    return paths, base, tuned, instruct


def torchrun(nproc: int, paths: dict, out, *extra, tuned=None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "graftcore",
        "merge",
        "--base",
        paths["base"],
        "--tuned",
        tuned or paths["tuned"],
        "--instruct",
        paths["instruct"],
        "--output",
        out,
        "--quiet",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300)


def ours_without_traceback(stderr: str) -> bool:
    """No stack frame of graftcore's own (torchrun prints its own ChildFailedError traceback when a rank exits
    non-zero: that is the launcher's report, not ours)."""
    return not any('File "' in line and "/graftcore/" in line for line in stderr.splitlines())


def shards(out) -> dict:
    return json.loads((out / "graftcore.json").read_text())["shards"]


def hashes(out) -> dict:
    return {f: (r["size"], r["sha256"]) for f, r in shards(out).items()}


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_is_bit_identical_to_one_process(trio, tmp_path, nproc):
    paths, base, tuned, instruct = trio
    graftcore.graft(**paths, output=tmp_path / "one", quiet=True)
    run = torchrun(nproc, paths, tmp_path / "many")
    assert run.returncode == 0, run.stderr
    assert hashes(tmp_path / "many") == hashes(tmp_path / "one") and len(shards(tmp_path / "one")) == 5
    got = load_folder(tmp_path / "many")
    assert all(same_bits(got[n], reference(instruct[n], tuned[n], base[n])) for n in instruct)
    for f in ("model.safetensors.index.json", "config.json"):
        assert (tmp_path / "many" / f).read_bytes() == (tmp_path / "one" / f).read_bytes()
    leftovers = [
        p.name
        for p in (tmp_path / "many").iterdir()
        if "progress" in p.name or p.name.endswith(".partial") or p.name.startswith(".")
    ]
    assert leftovers == []
    assert graftcore.verify(tmp_path / "many", recompute=4, seed=0).shards == 5


def test_workers_through_the_api(trio, tmp_path):
    paths, *_ = trio
    graftcore.graft(**paths, output=tmp_path / "one", quiet=True)
    report = graftcore.graft(**paths, output=tmp_path / "two", quiet=True, workers=2)
    assert report.shards_written == 5 and hashes(tmp_path / "two") == hashes(tmp_path / "one")


def test_bad_input_fails_every_rank_before_any_write(trio, tmp_path):
    paths, base, tuned, instruct = trio
    broken = dict(tuned)
    broken["model.layers.2.mlp.up_proj.weight"] = torch.zeros(3, 3)
    write_checkpoint(tmp_path / "broken", broken, 2)
    run = torchrun(2, paths, tmp_path / "out", tuned=tmp_path / "broken")
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("graftcore: error:")]
    assert len(lines) == 2 and all("up_proj" in line for line in lines), run.stderr
    assert {line.split(":")[2].strip() for line in lines} == {"rank 0 of 2", "rank 1 of 2"}
    assert ours_without_traceback(run.stderr) and not (tmp_path / "out").exists()


def test_a_failing_rank_stops_every_rank_and_a_rerun_resumes(trio, tmp_path):
    """NaN in one tensor: the rank that grafts it fails, the other stops, both exit 2 naming the failing rank.
    Fixed, the same merge with 3 ranks keeps what was finished and writes the rest, bit-identical."""
    paths, base, tuned, instruct = trio
    bad = dict(tuned)
    name = "model.layers.3.mlp.down_proj.weight"
    bad[name] = bad[name].clone()
    bad[name][0, 0] = float("nan")
    write_checkpoint(paths["tuned"], bad, 2)
    run = torchrun(2, paths, tmp_path / "out")
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("graftcore: error:")]
    assert len(lines) == 2 and all(name in line and "NaN/Inf" in line for line in lines), run.stderr
    failing = lines[0].split(":")[2].strip()
    assert all(failing in line for line in lines) and ours_without_traceback(run.stderr)
    assert not (tmp_path / "out" / "graftcore.json").exists()
    assert not list((tmp_path / "out").glob("*.partial"))
    write_checkpoint(paths["tuned"], tuned, 2)
    run = torchrun(3, paths, tmp_path / "out")
    assert run.returncode == 0, run.stderr
    graftcore.graft(**paths, output=tmp_path / "one", quiet=True)
    assert hashes(tmp_path / "out") == hashes(tmp_path / "one")


def test_rerun_with_another_world_size_keeps_finished_shards(trio, tmp_path):
    paths, *_ = trio
    graftcore.graft(**paths, output=tmp_path / "out", quiet=True, workers=2)
    before = hashes(tmp_path / "out")
    (tmp_path / "out" / "model-00003-of-00005.safetensors").unlink()
    report = graftcore.graft(**paths, output=tmp_path / "out", quiet=True, workers=3)
    assert report.shards_kept == 4 and report.shards_written == 1
    assert hashes(tmp_path / "out") == before


def test_shards_are_dealt_by_bytes_largest_first():
    from graftcore.merge.distributed import assign

    sizes = {"a": 50, "b": 40, "c": 30, "d": 20, "e": 10, "kept": 99}
    owner = assign(sizes, {"kept"}, 2)
    assert "kept" not in owner
    load = [sum(sizes[f] for f, r in owner.items() if r == rank) for rank in (0, 1)]
    assert owner["a"] == 0 and owner["b"] == 1 and sorted(load) == [70, 80]


def test_workers_return_a_large_report(tmp_path):
    """A plan of 3000 tensors pickles to far more than a pipe holds: the parent must read the workers' reports
    while they run, not after (they would block on the full pipe forever)."""
    tensors = {f"layer.{k}.weight": torch.full((4,), float(k), dtype=torch.bfloat16) for k in range(3000)}
    paths = {r: write_checkpoint(tmp_path / r, tensors, 3) for r in ("base", "tuned", "instruct")}
    report = graftcore.graft(**paths, output=tmp_path / "out", quiet=True, workers=2)
    assert report.shards_written == 3 and len(report.plan.ops) == 3000


def test_workers_inside_torchrun_is_refused_and_dry_run_spawns_nothing(trio, tmp_path):
    paths, *_ = trio
    run = torchrun(2, paths, tmp_path / "out", "--workers", "2")
    assert run.returncode != 0 and "--workers 2: this process is already one of 2 ranks" in run.stderr
    report = graftcore.graft(**paths, output=tmp_path / "dry", workers=2, dry_run=True)
    assert report.dry_run and not (tmp_path / "dry").exists()


def test_workers_report_what_one_process_reports(trio, tmp_path):
    """Every rank's notes and read counts reach graftcore.json and the Report; rank 0's log lines and the
    progress of all ranks reach the caller's callbacks."""
    paths, base, tuned, instruct = trio
    carried = {n: t.clone() for n, t in instruct.items()}
    carried["model.layers.3.mlp.up_proj.weight"][0, 0] = float("nan")  # a note, from whichever rank grafts it
    write_checkpoint(paths["instruct"], carried, 5, config={"torch_dtype": "bfloat16"})
    one = graftcore.graft(**paths, output=tmp_path / "one", quiet=True)
    logged, seen = [], []
    two = graftcore.graft(
        **paths, output=tmp_path / "two", quiet=True, workers=2, log=logged.append, progress=seen.append
    )
    manifests = [json.loads((tmp_path / d / "graftcore.json").read_text()) for d in ("one", "two")]
    assert manifests[0]["notes"] == manifests[1]["notes"] and any("carried" in n for n in manifests[1]["notes"])
    assert manifests[0]["reads"] == manifests[1]["reads"]
    assert two.notes == one.notes and two.shards_written == 5 and two.bytes_written == one.bytes_written
    assert seen and seen[-1].done == seen[-1].total == sum(t.numel() * t.element_size() for t in instruct.values())
    (tmp_path / "two" / "model-00002-of-00005.safetensors").unlink()
    graftcore.graft(**paths, output=tmp_path / "two", quiet=True, workers=2, log=logged.append)
    assert any("4 of 5 shard(s) already finished" in line for line in logged)


def test_workers_are_capped_at_the_shards_to_write(trio, tmp_path):
    paths, *_ = trio
    report = graftcore.graft(**paths, output=tmp_path / "out", quiet=True, workers=64)
    assert report.shards_written == 5


def test_workers_stop_when_their_parent_is_killed(tmp_path):
    """kill -9 of the --workers parent while its workers start (import, plan, join the group) or merge: they stop
    within seconds instead of finishing the folder (or waiting forever for a peer), and nothing looks finished.
    (torch's SIGINT on the parent's death was swallowed there: the workers ran on and wrote graftcore.json.)"""
    import time

    big = {f"model.layers.{k}.mlp.up_proj.weight": torch.randn(512, 512).bfloat16() for k in range(24)}
    paths = {r: write_checkpoint(tmp_path / r, big, 4) for r in ("base", "tuned", "instruct")}
    for delay in (0.0, 0.5):
        out = tmp_path / f"out{delay}"
        cmd = [
            sys.executable,
            "-m",
            "graftcore",
            "merge",
            "--base",
            paths["base"],
            "--tuned",
            paths["tuned"],
            "--instruct",
            paths["instruct"],
            "--output",
            out,
            "--workers",
            "2",
            "--quiet",
            "--chunk-size",
            "256",
        ]
        proc = subprocess.Popen([str(c) for c in cmd], stderr=subprocess.DEVNULL, start_new_session=True)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        deadline = time.monotonic() + 60
        while len(workers := [int(p) for p in children.read_text().split()]) < 3:  # the 2 workers, torch's tracker
            assert time.monotonic() < deadline and proc.poll() is None, "the workers never started"
            time.sleep(0.01)
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        alive = lambda p: (
            Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        )  # noqa: E731
        while any(alive(p) for p in workers):
            if time.monotonic() > deadline:
                for p in workers:
                    if alive(p):
                        os.kill(p, 9)
                raise AssertionError(f"the workers of a killed parent still run 30 s later (delay {delay})")
            time.sleep(0.1)
        assert not (out / "graftcore.json").exists() and not list(out.glob("*.partial")), delay


def test_ctrl_c_stops_workers_without_hanging(tmp_path):
    """SIGINT to the terminal's process group mid-merge: the parent and both workers end within seconds, exit 130,
    leave no partial shard and no graftcore.json, and a rerun resumes. (The parent once deleted the workers'
    rendezvous file on its way out, and workers then waited forever on their store.)"""
    import signal
    import time

    big = {f"model.layers.{k}.mlp.up_proj.weight": torch.randn(512, 512).bfloat16() for k in range(24)}
    paths = {r: write_checkpoint(tmp_path / r, big, 4) for r in ("base", "tuned", "instruct")}
    cmd = [
        sys.executable,
        "-m",
        "graftcore",
        "merge",
        "--base",
        paths["base"],
        "--tuned",
        paths["tuned"],
        "--instruct",
        paths["instruct"],
        "--output",
        tmp_path / "out",
        "--workers",
        "2",
        "--quiet",
        "--chunk-size",
        "256",
    ]
    proc = subprocess.Popen([str(c) for c in cmd], stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob("graftcore.progress.rank*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the merge finished before it could be interrupted: the trio needs to be larger"
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("graftcore --workers did not end within 30 s of Ctrl-C") from None
    assert proc.returncode == 130 and "interrupted" in err and 'File "' not in err, err
    assert not list((tmp_path / "out").glob("*.partial")) and not (tmp_path / "out" / "graftcore.json").exists()
    report = graftcore.graft(**paths, output=tmp_path / "out", quiet=True, workers=2)
    assert report.shards_written + report.shards_kept == 4
