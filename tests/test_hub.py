"""Hub inputs (`org/name[@rev]`): a pre-populated offline cache, and a loopback server that speaks the hub's
HTTP API to the real huggingface_hub client. The CLI runs in a subprocess with HF_* set in its environment,
as a user runs it (huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import). No internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub
from safetensors.torch import load_file, save_file

BF16 = torch.bfloat16
ROWS, GROWN = 100, 104  # vocabulary of base/tuned, and Instruct's (grown: extra rows copied)


# ---------------------------------------------------------------- tiny checkpoints


def tensors_for(role: str, layers: int, dim: int = 32, big: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Llama-like checkpoint; `big` adds an lm_head of `big` x 2048 bf16 (4 KB per row)."""
    g = torch.Generator().manual_seed({"base": 0, "tuned": 1, "instruct": 2}[role])
    base = torch.Generator().manual_seed(0)

    def w(*shape, dtype=BF16):  # base weights + a role-specific update
        b = torch.randn(*shape, generator=base)
        return (b + (0 if role == "base" else 0.05 * torch.randn(*shape, generator=g))).to(dtype)

    out = {"model.embed_tokens.weight": w(ROWS, dim)}
    if role == "instruct":
        out["model.embed_tokens.weight"] = torch.cat(
            [out["model.embed_tokens.weight"], torch.randn(GROWN - ROWS, dim, generator=g).to(BF16)]
        )
        out["model.position_ids"] = torch.arange(16, dtype=torch.int64)
    for i in range(layers):
        out[f"model.layers.{i}.self_attn.q_proj.weight"] = w(dim, dim)
        out[f"model.layers.{i}.mlp.down_proj.weight"] = w(dim, 2 * dim)
        out[f"model.layers.{i}.input_layernorm.weight"] = w(dim, dtype=torch.float32)
    if big:
        out["lm_head.weight"] = w(big, 2048)
    return out


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], shards: int, extras: bool = False) -> Path:
    """`tensors` split in order over `shards` files with an index (one file: model.safetensors); Instruct's extra
    files."""
    folder.mkdir(parents=True)
    names = list(tensors)
    n = len(names)  # contiguous runs of tensors, as save_pretrained shards them
    groups = [names[k * n // shards : (k + 1) * n // shards] for k in range(shards)]
    files = (
        ["model.safetensors"]
        if shards == 1
        else [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    )
    for f, group in zip(files, groups):
        save_file({n: tensors[n] for n in group}, folder / f, metadata={"format": "pt"})
    if shards > 1:
        index = {"metadata": {}, "weight_map": {n: f for f, g in zip(files, groups) for n in g}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if extras:
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": GROWN}))
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
        (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return folder


def make_trio(root: Path, layers: int = 4, shards: int = 2, big: int = 0) -> dict[str, Path]:
    """Base and tuned with `shards` files, Instruct with `shards + 1` (different layouts on purpose)."""
    return {
        "base": write_checkpoint(root / "base", tensors_for("base", layers, big=big), shards),
        "tuned": write_checkpoint(root / "tuned", tensors_for("tuned", layers, big=big), shards),
        "instruct": write_checkpoint(
            root / "instruct", tensors_for("instruct", layers, big=big), shards + 1, extras=True
        ),
    }


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def assert_bit_exact(output: Path, trio: dict[str, Path]) -> None:
    """Every output tensor equals the float32 formula written plainly, bit for bit."""
    i, t, b = (folder_tensors(trio[r]) for r in ("instruct", "tuned", "base"))
    out = folder_tensors(output)
    assert set(out) == set(i)
    for name, x in i.items():
        if not x.is_floating_point():
            want = x
        elif x.shape == t[name].shape:
            want = (x.float() + (t[name].float() - b[name].float())).to(x.dtype)
        else:  # vocabulary grown in Instruct: shared rows grafted, the extra rows copied
            rows = t[name].shape[0]
            want = torch.cat([(x[:rows].float() + (t[name].float() - b[name].float())).to(x.dtype), x[rows:]])
        assert out[name].dtype == want.dtype and torch.equal(out[name].view(torch.uint8), want.view(torch.uint8)), name


def dir_size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:  # deleted while we walk
                pass
    return total


# ---------------------------------------------------------------- running the CLI


def hub_env(tmp_path: Path, endpoint: str | None = None, offline: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_DISABLE_TELEMETRY="1")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def merge_args(base: str, tuned: str, instruct: str, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "graftcore.cli",
        "merge",
        "--base",
        base,
        "--tuned",
        tuned,
        "--instruct",
        instruct,
        "--output",
        str(output),
        "--quiet",
        *extra,
    ]


def run_merge(env, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(merge_args(*args, **kw), env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def hub():
    server = FakeHub()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    return make_trio(tmp_path_factory.mktemp("trio"))


def serve_trio(hub: FakeHub, trio: dict[str, Path]) -> dict[str, str]:
    """Serve the trio as org/base, org/tuned, org/instruct; returns role -> commit."""
    return {role: hub.add_folder(f"org/{role}", folder) for role, folder in trio.items()}


# ---------------------------------------------------------------- offline: a pre-populated cache


def populate_cache(cache: Path, repo: str, folder: Path, commit: str, blobs: bool) -> None:
    """Lay `folder` out as huggingface_hub's cache does: refs/main, snapshots/<commit>/ (symlinks into blobs/,
    or plain files, which the cache also accepts)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for p in folder.iterdir():
        if blobs:
            blob = root / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            shutil.copyfile(p, blob)
            (snapshot / p.name).symlink_to(Path("../../blobs") / blob.name)
        else:
            shutil.copyfile(p, snapshot / p.name)


def test_offline_cache_merge_by_repo_ids(tmp_path, trio):
    commits = {role: hashlib.sha1(role.encode()).hexdigest() for role in trio}
    for role, folder in trio.items():
        populate_cache(tmp_path / "cache", f"org/{role}", folder, commits[role], blobs=role != "base")
    env = hub_env(tmp_path, endpoint="http://127.0.0.1:9", offline=True)  # nothing listens there: offline or fail
    out = tmp_path / "out"
    r = run_merge(env, "org/base", f"org/tuned@{commits['tuned']}", "org/instruct", out)
    assert r.returncode == 0, r.stderr
    assert_bit_exact(out, trio)
    manifest = json.loads((out / "graftcore.json").read_text())
    assert {role: manifest["inputs"][role]["revision"] for role in trio} == commits
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (trio["instruct"] / f).read_bytes()

    r = run_merge(env, "org/base", "org/tuned", "org/not-cached", tmp_path / "out2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "org/not-cached@main" in r.stderr and "HF_HUB_OFFLINE" in r.stderr


# ---------------------------------------------------------------- a loopback hub


def test_merge_by_repo_ids_then_reuse_the_cache(tmp_path, hub, trio):
    commits = serve_trio(hub, trio)
    env = hub_env(tmp_path, hub.url)
    out = tmp_path / "out"
    r = run_merge(env, "org/base", "org/tuned", f"org/instruct@{commits['instruct']}", out)
    assert r.returncode == 0, r.stderr
    assert_bit_exact(out, trio)
    manifest = json.loads((out / "graftcore.json").read_text())
    assert {role: manifest["inputs"][role]["revision"] for role in trio} == commits
    assert (out / "tokenizer_config.json").read_bytes() == (trio["instruct"] / "tokenizer_config.json").read_bytes()
    shards = sum(len(list(f.glob("*.safetensors"))) for f in trio.values())
    assert len(list((tmp_path / "cache").rglob("blobs/*"))) >= shards  # the shards went into the shared cache

    hub.data_bytes = 0  # a second merge of the same inputs: everything comes from the cache
    r = run_merge(env, "org/base", "org/tuned", "org/instruct", tmp_path / "out2")
    assert r.returncode == 0, r.stderr
    assert hub.data_bytes == 0
    assert_bit_exact(tmp_path / "out2", trio)


def test_shape_mismatch_fails_before_any_tensor_data(tmp_path, hub, trio):
    serve_trio(hub, trio)
    bad = tensors_for("tuned", 4)
    bad["model.layers.1.mlp.down_proj.weight"] = bad["model.layers.1.mlp.down_proj.weight"][:, :-1].contiguous()
    hub.add_folder("org/tuned-bad", write_checkpoint(tmp_path / "tuned-bad", bad, 2))
    t0 = time.perf_counter()
    r = run_merge(hub_env(tmp_path, hub.url), "org/base", "org/tuned-bad", "org/instruct", tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "model.layers.1.mlp.down_proj.weight" in r.stderr
    assert hub.data_bytes == 0  # only headers were read
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize(
    "ref, status, code, words",
    [
        ("org/private", 401, "RepoNotFound", ["org/private@main", "HTTP 401", "token"]),
        ("org/gated", 403, "GatedRepo", ["org/gated@main", "gated", "HTTP 403"]),
        ("org/missing", None, None, ["org/missing@main", "no such repo", "HTTP 404"]),
        ("org/instruct@v9", None, None, ["org/instruct@v9", "no such revision", "HTTP 404"]),
        ("org/pickled", None, None, ["org/pickled@main", "pickled", "pytorch_model.bin"]),
    ],
)
def test_hub_errors_are_one_line(tmp_path, hub, trio, ref, status, code, words):
    serve_trio(hub, trio)
    if status is not None:
        hub.add_folder(ref, trio["instruct"], status=status, error_code=code)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    hub.add_folder("org/pickled", pickled)
    r = run_merge(hub_env(tmp_path, hub.url), "org/base", "org/tuned", ref, tmp_path / "out")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graftcore: error: "), r.stderr
    for w in words:
        assert w in lines[0]
    assert hub.data_bytes == 0


def test_cut_download_is_resumed(tmp_path, hub):
    # huggingface_hub writes (and so can resume from) whole 10 MiB blocks: the shard must be bigger than one
    trio = make_trio(tmp_path / "trio", layers=1, shards=1, big=3200)
    serve_trio(hub, trio)
    shard = "model.safetensors"
    size = (trio["tuned"] / shard).stat().st_size
    assert size > 11 << 20
    hub.cut[("org/tuned", shard)] = 11 << 20
    out = tmp_path / "out"
    r = run_merge(hub_env(tmp_path, hub.url), "org/base", "org/tuned", "org/instruct", out)
    assert r.returncode == 0, r.stderr
    assert_bit_exact(out, trio)
    gets = hub.ranges("org/tuned", shard)
    assert gets.count("") == 1 and f"bytes={10 << 20}-" in gets, gets  # the retry asked only for the rest


def test_low_disk_keeps_few_input_shards(tmp_path, hub):
    trio = make_trio(tmp_path / "trio", layers=16, shards=16)
    serve_trio(hub, trio)
    hub.delay = 0.002  # per 16 KB: slow enough for the merge to wait on downloads, as it does for real
    out = tmp_path / "out"
    scratch = out / ".graftcore-downloads"
    proc = subprocess.Popen(
        merge_args("org/base", "org/tuned", "org/instruct", out, "--low-disk"),
        env=hub_env(tmp_path, hub.url),
        stderr=subprocess.PIPE,
        text=True,
    )
    sampled = 0
    while proc.poll() is None:
        sampled = max(sampled, dir_size(scratch))
        time.sleep(0.002)
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr
    assert_bit_exact(out, trio)
    assert not scratch.exists()  # every input shard deleted after its last use
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # and none went into the shared cache

    note = next(n for n in json.loads((out / "graftcore.json").read_text())["notes"] if n.startswith("--low-disk"))
    assert note in stderr  # the CLI summary says it too
    peak = int(re.search(r"at most (\d+) bytes", note)[1])
    shard_sizes = [p.stat().st_size for f in trio.values() for p in f.glob("*.safetensors")]
    inputs = sum(shard_sizes)
    bound = 3 * 2 * max(shard_sizes)  # per input: the shard being merged + the next one downloading
    assert sampled <= peak + 64 * 1024  # what we saw on disk (plus huggingface_hub's small metadata files)
    assert peak <= bound < inputs / 2
    output = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(
        f"\n--low-disk: input shards peaked at {peak} B on disk (sampled {sampled} B); default keeps all "
        f"{inputs} B of input shards in the cache; output {output} B"
    )
