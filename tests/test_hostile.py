"""Hostile inputs and conditions: never a hang, a traceback, a silent NaN model or a complete-looking wrong output.

Each test is one defect an adversarial run found; a user error is exit 2 with one line naming the file.
"""

import fcntl
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from helpers import llama_tensors, load_folder, reference, same_bits, write_checkpoint, write_trio
from safetensors import safe_open

import graftcore
from graftcore.errors import CheckpointError, GraftError, MismatchError
from graftcore.io import input_file
from graftcore.io.safetensors_file import read_header


def trio(tmp_path, shards=(1, 2, 3)):
    sds = llama_tensors(1), llama_tensors(2, noise=2e-3), llama_tensors(3, noise=5e-3)
    paths = list(
        write_trio(
            tmp_path, sds, shards, config={"torch_dtype": "bfloat16"}, config_roles=("base", "tuned", "instruct")
        )
    )
    return sds, paths


def cli_args(paths, out, *extra):
    b, t, i = paths
    return [
        sys.executable,
        "-m",
        "graftcore",
        "merge",
        "--base",
        str(b),
        "--tuned",
        str(t),
        "--instruct",
        str(i),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--quiet",
        *map(str, extra),
    ]


def assert_one_line_exit_2(run, *needles):
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


def assert_nothing_finished(out):
    assert not (out / "graftcore.json").exists()
    assert not out.exists() or not list(out.glob("*.partial")), sorted(out.iterdir())


def assert_merged(out, sds):
    base, tuned, instruct = sds
    got = load_folder(out)
    for n in instruct:
        assert same_bits(got[n], reference(instruct[n], tuned[n], base[n])), n


# ---- 1. interrupts ------------------------------------------------------------------------------------------


def test_signals_at_random_moments_always_exit_130_quickly(tmp_path):
    """SIGINT or SIGTERM at random moments (start-up included) of merges with tiny steps: every one exits 130
    within 5 s, no .partial and no finished-looking folder is left, and finished shards are complete."""
    sds, paths = trio(tmp_path, shards=(2, 3, 4))
    rng = random.Random(1234)
    cases, batch = 24, 3  # run a few at once: the test costs seconds, not minutes
    for start in range(0, cases, batch):
        procs = []
        for k in range(start, start + batch):
            out = tmp_path / f"out{k}"
            proc = subprocess.Popen(cli_args(paths, out, "--chunk-size", 64), stderr=subprocess.PIPE, text=True)
            procs.append((proc, out, rng.uniform(0.2, 2.5), rng.choice([signal.SIGINT, signal.SIGTERM])))
        t0 = time.monotonic()
        for proc, out, delay, sig in sorted(procs, key=lambda p: p[2]):
            time.sleep(max(0.0, t0 + delay - time.monotonic()))
            if proc.poll() is None:
                proc.send_signal(sig)
                sent = time.monotonic()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    pytest.fail(f"no exit 5 s after {sig.name} at {delay:.2f} s")
                # 130; or 0 when the merge had already finished and was exiting (the output is complete then)
                finished = (out / "graftcore.json").exists()
                assert proc.returncode == 130 or (proc.returncode == 0 and finished), (
                    sig.name,
                    delay,
                    proc.stderr.read(),
                )
                assert time.monotonic() - sent < 5
                assert "Traceback" not in proc.stderr.read()
            else:
                assert proc.returncode == 0, proc.stderr.read()  # it finished before the signal
            if out.exists():
                assert not list(out.glob("*.partial")), list(out.iterdir())
                if proc.returncode == 130 and not finished:  # what is kept is what a rerun resumes from
                    progress = out / "graftcore.progress.json"
                    kept = json.loads(progress.read_text())["shards"] if progress.exists() else {}
                    for shard in out.glob("*.safetensors"):
                        assert kept.get(shard.name, {}).get("size") == shard.stat().st_size, (shard, kept)
                for shard in out.glob("*.safetensors"):  # under its final name only when complete
                    with safe_open(shard, "pt") as f:
                        for name in f.keys():
                            f.get_tensor(name)
    rerun = subprocess.run(cli_args(paths, tmp_path / "out0"), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert_merged(tmp_path / "out0", sds)


# ---- 2. inputs changed under a running merge ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["rewritten in place", "replaced by rename"])
def test_input_changed_during_the_merge_stops_it(tmp_path, monkeypatch, how):
    sds, paths = trio(tmp_path)
    victim = paths[1] / "model-00002-of-00002.safetensors"
    other = tmp_path / "other.safetensors"
    other.write_bytes(victim.read_bytes()[:-2] + b"\x12\x34")  # same header and size, other data
    real = input_file.InputFile.read_run
    done = []

    def read_then_change(self, *args):
        result = real(self, *args)
        if not done and self.where == str(victim):
            done.append(1)
            if how == "rewritten in place":
                with open(victim, "r+b") as f:
                    f.seek(-2, os.SEEK_END)
                    f.write(b"\x56\x78")
            else:
                os.replace(other, victim)
        return result

    monkeypatch.setattr(input_file.InputFile, "read_run", read_then_change)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: the file changed"):
        graftcore.graft(
            base=paths[0], tuned=paths[1], instruct=paths[2], output=out, device="cpu", quiet=True, chunk_size=512
        )
    assert done
    assert_nothing_finished(out)


def test_resume_recomputes_shards_whose_input_was_rewritten_with_its_mtime_restored(tmp_path):
    (base, tuned, instruct), paths = trio(tmp_path, shards=(1, 1, 3))
    out = tmp_path / "out"
    assert subprocess.run(cli_args(paths, out), capture_output=True).returncode == 0
    # rewrite tuned's data in place (same header, same size), then set its mtime back as a careful attacker would
    f = paths[1] / "model.safetensors"
    st = f.stat()
    changed = {n: (v.float() + 0.01).bfloat16() for n, v in tuned.items()}
    write_checkpoint(tmp_path / "tmp", changed)
    assert read_header(tmp_path / "tmp" / "model.safetensors").header_bytes == read_header(f).header_bytes
    with open(f, "r+b") as h:
        h.write((tmp_path / "tmp" / "model.safetensors").read_bytes())
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    rerun = subprocess.run(cli_args(paths, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert_merged(out, (base, changed, instruct))  # no stale shard kept


# ---- 3. conditions the user must fix: exit 2, one line ------------------------------------------------------


def test_output_under_a_regular_file_or_a_dangling_symlink(tmp_path):
    _, paths = trio(tmp_path)
    (tmp_path / "file").write_text("x")
    assert_one_line_exit_2(
        subprocess.run(cli_args(paths, tmp_path / "file" / "out"), capture_output=True, text=True), "file"
    )
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "out")
    assert_one_line_exit_2(
        subprocess.run(cli_args(paths, tmp_path / "dangling"), capture_output=True, text=True), "dangling"
    )


def test_no_space_left_is_exit_2(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here")
    try:
        _, paths = trio(tmp_path)
        run = subprocess.run(cli_args(paths, mnt / "out"), capture_output=True, text=True)
        assert_one_line_exit_2(run, mnt / "out", "No space left")
        assert_nothing_finished(mnt / "out")
    finally:
        subprocess.run(["umount", str(mnt)])


def raw_checkpoint(folder, header_text: bytes, data: bytes = b""):
    folder.mkdir(parents=True, exist_ok=True)
    raw = header_text + b" " * (-(len(header_text) + 8) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return folder


HOSTILE_HEADERS = {
    "nested 1000 deep": b'{"w":{"dtype":"BF16","shape":[1],"data_offsets":[0,2],"x":'
    + b"[" * 1000
    + b"]" * 1000
    + b"}}",
    "4301-digit integer": b'{"w":{"dtype":"BF16","shape":[1' + b"0" * 4301 + b'],"data_offsets":[0,2]}}',
    "dtype is a list": b'{"w":{"dtype":["BF16"],"shape":[1],"data_offsets":[0,2]}}',
    "dtype is an object": b'{"w":{"dtype":{"a":1},"shape":[1],"data_offsets":[0,2]}}',
    "lone surrogate name": b'{"w\\ud800":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}}',
    "lone surrogate metadata": b'{"__metadata__":{"a":"\\udc00"},'
    b'"w":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}}',
    "true in a shape": b'{"w":{"dtype":"BF16","shape":[true],"data_offsets":[0,2]}}',
    "2^70 dimension, zero size": b'{"w":{"dtype":"BF16","shape":[0,1180591620717411303424],"data_offsets":[0,0]}}',
    "metadata not a string map": b'{"__metadata__":{"a":1},"w":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}}',
    "metadata a list": b'{"__metadata__":[],"w":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}}',
    "no tensors": b"{}",
    "NaN in an extra field": b'{"w":{"dtype":"BF16","shape":[1],"data_offsets":[0,2],"x":NaN}}',
    "1e999 in an extra field": b'{"w":{"dtype":"BF16","shape":[1],"data_offsets":[0,2],"x":1e999}}',
}


@pytest.mark.parametrize("name", HOSTILE_HEADERS)
def test_hostile_headers_are_exit_2(tmp_path, name):
    _, paths = trio(tmp_path)
    data = b"" if b"[0,0]" in HOSTILE_HEADERS[name] or name == "no tensors" else b"\0\0"
    bad = raw_checkpoint(tmp_path / "bad", HOSTILE_HEADERS[name], data)
    run = subprocess.run(cli_args((bad, paths[1], paths[2]), tmp_path / "out"), capture_output=True, text=True)
    assert_one_line_exit_2(run, bad / "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_index_naming_a_300_character_file_and_an_empty_weight_map(tmp_path):
    _, paths = trio(tmp_path)
    index = paths[0] / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "x" * 300 + ".safetensors"}}))
    assert_one_line_exit_2(subprocess.run(cli_args(paths, tmp_path / "out"), capture_output=True, text=True), index)
    index.write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    assert_one_line_exit_2(
        subprocess.run(cli_args(paths, tmp_path / "out"), capture_output=True, text=True), index, "empty"
    )
    assert not (tmp_path / "out").exists()


def test_a_fifo_named_safetensors_does_not_hang(tmp_path):
    _, paths = trio(tmp_path)
    (paths[0] / "model.safetensors").unlink()
    os.mkfifo(paths[0] / "model.safetensors")
    run = subprocess.run(cli_args(paths, tmp_path / "out"), capture_output=True, text=True, timeout=60)
    assert_one_line_exit_2(run, paths[0])


# ---- 5. silent wrong models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_non_finite_alpha_is_refused(tmp_path, alpha):
    _, paths = trio(tmp_path)
    run = subprocess.run(cli_args(paths, tmp_path / "out", "--alpha", alpha), capture_output=True, text=True)
    assert_one_line_exit_2(run, "--alpha")
    assert not (tmp_path / "out").exists()
    with pytest.raises(GraftError, match="alpha"):
        graftcore.graft(base=paths[0], tuned=paths[1], instruct=paths[2], output=tmp_path / "out", alpha=float(alpha))


@pytest.mark.parametrize(
    "change",
    [
        {"lora_alpha": float("nan")},
        {"lora_alpha": float("inf")},
        {"rank_pattern": {"q_proj": 0}},
        {"target_modules": 7},
        {"modules_to_save": ["lm_head("]},
        {"layers_pattern": "layers["},
    ],
)
def test_bad_adapter_configs_are_exit_2(tmp_path, change):
    _, paths = trio(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **change}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg).replace("NaN", "NaN").replace("Infinity", "Infinity"))
    g = torch.Generator().manual_seed(0)
    sd = {
        f"base_model.model.model.layers.{k}.self_attn.q_proj.lora_{ab}.weight": torch.randn(shape, generator=g)
        for k in range(2)
        for ab, shape in (("A", (4, 32)), ("B", (32, 4)))
    }
    from safetensors.torch import save_file

    save_file(sd, adapter / "adapter_model.safetensors")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "graftcore",
            "merge",
            "--tuned",
            str(adapter),
            "--instruct",
            str(paths[2]),
            "--output",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert_one_line_exit_2(run, adapter / "adapter_config.json")


# ---- 6. output folder traps ---------------------------------------------------------------------------------


def test_output_inside_an_input_folder_is_refused(tmp_path):
    _, paths = trio(tmp_path)
    run = subprocess.run(cli_args(paths, paths[2] / "merged"), capture_output=True, text=True)
    assert_one_line_exit_2(run, "inside the instruct input")
    assert not (paths[2] / "merged").exists()
    (tmp_path / "link").symlink_to(paths[0])
    run = subprocess.run(cli_args(paths, tmp_path / "link" / "merged"), capture_output=True, text=True)
    assert_one_line_exit_2(run, "base input")


def test_overwrite_removes_the_previous_models_files(tmp_path):
    sds, paths = trio(tmp_path)
    out = tmp_path / "out"
    (paths[2] / "chat_template.jinja").write_text("model A's template")
    assert subprocess.run(cli_args(paths, out), capture_output=True).returncode == 0
    assert (out / "chat_template.jinja").exists()
    (paths[2] / "chat_template.jinja").unlink()  # model B has none
    (paths[2] / "model.safetensors.index.json").unlink()
    write_checkpoint(tmp_path / "instructB", sds[2], 1, config={"torch_dtype": "bfloat16"})
    (out / "my-notes.txt").write_text("mine")
    run = subprocess.run(
        cli_args((paths[0], paths[1], tmp_path / "instructB"), out, "--overwrite"), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert not (out / "chat_template.jinja").exists()
    assert not (out / "model.safetensors.index.json").exists() and not list(out.glob("model-0000*"))
    assert (out / "my-notes.txt").read_text() == "mine"
    assert_merged(out, sds)


def test_overwrite_never_deletes_outside_the_folder(tmp_path):
    """A crafted graftcore.json listing an absolute path or a path through a symlink must not reach outside."""
    _, paths = trio(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(victim)
    (out / "graftcore.json").write_text(json.dumps({"files": [str(victim / "keep.txt"), "link/keep.txt"]}))
    run = subprocess.run(cli_args(paths, out, "--overwrite"), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (victim / "keep.txt").read_text() == "keep"


def test_a_held_lock_names_its_holder(tmp_path):
    _, paths = trio(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".graftcore.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("4242\n")
        f.flush()
        run = subprocess.run(cli_args(paths, out), capture_output=True, text=True)
    assert_one_line_exit_2(run, out, "pid 4242")
    assert sorted(p.name for p in out.iterdir()) == [".graftcore.lock"]


def test_two_merges_started_together_into_one_folder(tmp_path):
    sds, paths = trio(tmp_path, shards=(2, 3, 4))
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        procs = [
            subprocess.Popen(cli_args(paths, out, "--chunk-size", 256), stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes in ([0, 0], [0, 2]), results  # one after the other (the second resumes), or the loser refused
        for code, err in results:
            if code == 2:
                assert "another graftcore merge (pid" in err and len(err.strip().splitlines()) == 1, err
        assert_merged(out, sds)


def test_a_merge_into_a_folder_another_merge_holds_is_refused(tmp_path):
    """A second merge started while the first holds the folder's lock: exit 2 naming the other pid, one line; the
    first finishes undisturbed."""
    sds, paths = trio(tmp_path, shards=(2, 3, 4))
    out = tmp_path / "out"
    first = subprocess.Popen(cli_args(paths, out, "--chunk-size", 16), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / ".graftcore.lock").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    running = first.poll() is None
    if running:
        first.send_signal(signal.SIGSTOP)  # held where it is, lock and all, while the second one runs
    try:
        second = subprocess.run(cli_args(paths, out), capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert running, "the first merge ended before the second one ran: the lock was never contended"
    assert_one_line_exit_2(second, out, f"another graftcore merge (pid {first.pid}")
    assert_merged(out, sds)


# ---- the fuzz corpus ----------------------------------------------------------------------------------------


def mutations(header: dict):
    """Header mutations: each yields the JSON text of a mutated header."""
    names = [n for n in header if n != "__metadata__"]
    victim = names[len(names) // 2]
    entry = header[victim]
    for key, values in (
        ("dtype", ["F64", "I8", "bf16", "", None, 3]),
        ("shape", [[], [0], [-1], [1.5], ["2"], None, [2**63], [2**31, 2**31, 2**31]]),
        ("data_offsets", [[0], [5, 3], [-2, 0], None, [0, 2**64], [1.0, 2.0]]),
    ):
        for v in values:
            yield f"{key}={v!r}", {**header, victim: {**entry, key: v}}
    yield "entry is a list", {**header, victim: [1, 2]}
    yield "missing dtype", {**header, victim: {k: v for k, v in entry.items() if k != "dtype"}}
    yield "extra key", {**header, victim: {**entry, "extra": {"deep": [1]}}}
    yield "metadata null", {**header, "__metadata__": None}
    yield "metadata nested", {**header, "__metadata__": {"a": {"b": "c"}}}
    yield "renamed to empty", {("" if n == victim else n): v for n, v in header.items()}


FUZZ = len(list(mutations({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})))


@pytest.fixture(scope="module")
def fuzz_trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    sds, paths = trio(root)
    return root, paths


@pytest.mark.parametrize("k", range(FUZZ))
def test_header_mutation_is_refused_or_loads_in_safetensors(fuzz_trio, k, tmp_path):
    root, paths = fuzz_trio
    f = paths[2] / "model-00001-of-00003.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    label, mutated = list(mutations(header))[k]
    folder = tmp_path / "instruct"
    folder.mkdir()
    for p in paths[2].iterdir():
        if p.name != f.name:
            (folder / p.name).write_bytes(p.read_bytes())
    text = json.dumps(mutated).encode()
    text += b" " * (-(len(text) + 8) % 8)
    (folder / f.name).write_bytes(struct.pack("<Q", len(text)) + text + data)
    out = tmp_path / "out"
    try:  # the reference library's verdict on the mutated file: every tensor loads, or it refuses
        with safe_open(folder / f.name, "pt") as h:
            for name in h.keys():
                h.get_tensor(name)
        valid = True
    except Exception:  # noqa: BLE001 - safetensors raises several types for a bad file
        valid = False
    try:
        graftcore.graft(base=paths[0], tuned=paths[1], instruct=folder, output=out, device="cpu", quiet=True)
    except GraftError as e:
        assert str(folder / f.name) in str(e) or str(folder) in str(e), (label, e)
        assert not (out / "graftcore.json").exists()
        # a file the reference library reads is never refused as a bad file: only as one that does not fit the
        # merge (a dtype or shape that Base lacks) or the folder's index (a tensor renamed)
        fits_not = isinstance(e, MismatchError) or "model.safetensors.index.json" in str(e)
        assert not valid or fits_not, (label, type(e).__name__, e)
        return
    assert valid, f"{label}: the reference library refuses this file, graftcore merged it"
    assert (out / "graftcore.json").exists(), label
    for shard in out.glob("*.safetensors"):  # accepted: the reference library must load every output tensor
        with safe_open(shard, "pt") as h:
            for name in h.keys():
                h.get_tensor(name)
