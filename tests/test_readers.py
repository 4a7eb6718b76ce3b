"""The input streamer: explicit reads into a small ring of buffers, in plan order, whatever the boundaries.

Every merge here is checked bit for bit against the float32 formula written plainly in helpers.reference.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import llama_tensors, load_folder, reference, same_bits, write_checkpoint

import graftcore
from graftcore.errors import CheckpointError
from graftcore.io import input_file
from graftcore.io.input_file import PageMap
from graftcore.io.safetensors_file import TORCH_TO_CODE, ShardWriter, read_header, tensor_bytes
from graftcore.stream import readers


def write_in_order(path, tensors: dict):
    """A safetensors file with tensors in exactly this order (no reordering for alignment, unlike save_file),
    so an F32 tensor may start at an offset that is not a multiple of 4."""
    entries = [(n, TORCH_TO_CODE[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    w = ShardWriter(path, entries, {"format": "pt"})
    for t in tensors.values():
        w.append(tensor_bytes(t.contiguous()))
    w.finish()


def odd_trio(tmp_path):
    """Tensors of mixed dtypes and sizes: zero-size, one element, sizes prime to every chunk and buffer."""
    shapes = {
        "a.empty": ((0, 7), torch.bfloat16),
        "b.one": ((1,), torch.bfloat16),
        "c.odd": ((3, 1001), torch.bfloat16),
        "e.f16": ((999,), torch.float16),
        "d.f32": ((257, 33), torch.float32),
        "f.big": ((211, 97), torch.bfloat16),
        "g.int": ((13,), torch.int64),
    }  # d.f32 starts 2 bytes past a multiple of 4 in its file
    trio = {}
    for role, seed in (("base", 1), ("tuned", 2), ("instruct", 3)):
        g2 = torch.Generator().manual_seed(seed)
        sd = {}
        for n, (shape, dtype) in shapes.items():
            if dtype == torch.int64:
                sd[n] = torch.arange(13, dtype=dtype) * seed
                continue
            base = torch.randn(shape, generator=torch.Generator().manual_seed(hash(n) % 1000))
            sd[n] = (base + 0.01 * torch.randn(shape, generator=g2)).to(dtype)
        folder = tmp_path / role
        folder.mkdir()
        write_in_order(folder / "model.safetensors", sd)
        assert read_header(folder / "model.safetensors").tensors["d.f32"].start % 4 == 2
        trio[role] = sd
    return trio


def assert_odd_trio_merged(out, trio):
    got = load_folder(out)
    b, t, i = trio["base"], trio["tuned"], trio["instruct"]
    for n in i:
        want = i[n] if i[n].dtype == torch.int64 else reference(i[n], t[n], b[n])
        assert same_bits(got[n], want), n


@pytest.mark.parametrize(
    "chunk,buffer,depth", [(1000, "4KiB", 2), (4096, "8KiB", 3), (333, "1MiB", 2), (1 << 18, None, None)]
)
def test_boundaries_are_bit_exact(tmp_path, chunk, buffer, depth):
    trio = odd_trio(tmp_path)
    out = tmp_path / "out"
    graftcore.graft(
        base=tmp_path / "base",
        tuned=tmp_path / "tuned",
        instruct=tmp_path / "instruct",
        output=out,
        device="cpu",
        quiet=True,
        chunk_size=chunk,
        read_buffer=buffer,
        read_depth=depth,
    )
    assert_odd_trio_merged(out, trio)


def test_many_shards_and_copies_through_tiny_buffers(tmp_path):
    base, tuned, instruct = llama_tensors(1), llama_tensors(2, noise=2e-3), llama_tensors(3, noise=5e-3)
    for role, sd, k in (("base", base, 3), ("tuned", tuned, 2), ("instruct", instruct, 5)):
        write_checkpoint(tmp_path / role, sd, k)
    out = tmp_path / "out"
    # embeddings are copied unchanged (raw steps of one buffer each); everything else grafted
    graftcore.graft(
        base=tmp_path / "base",
        tuned=tmp_path / "tuned",
        instruct=tmp_path / "instruct",
        output=out,
        device="cpu",
        quiet=True,
        exclude=["embed"],
        chunk_size=700,
        read_buffer="4KiB",
        read_depth=2,
    )
    got = load_folder(out)
    for n in instruct:
        want = instruct[n] if "embed" in n else reference(instruct[n], tuned[n], base[n])
        assert same_bits(got[n], want), n


def evict(folder):
    """Drop a folder's files from the page cache (as a cold start finds them)."""
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_residency_probe(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    pages = PageMap(fd, 1 << 20)
    try:
        assert pages.resident(12345, 100_000)  # just written: in the page cache
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not pages.resident(12345, 100_000)
        os.pread(fd, 4096, 0)
        assert pages.resident(100, 200) and not pages.resident(100, 100_000)  # page 0 only
        os.pread(fd, 1 << 20, 0)
        assert pages.resident(0, 1 << 20) and not pages.resident(0, (1 << 20) + 1)  # past the end: unknown
    finally:
        pages.close()
        os.close(fd)


@pytest.mark.parametrize("cold", [False, True], ids=["page-cache", "o-direct"])
def test_cold_and_warm_inputs_read_the_same_bits(tmp_path, cold):
    trio = odd_trio(tmp_path)
    if cold:
        for role in trio:
            evict(tmp_path / role)
    out = tmp_path / "out"
    graftcore.graft(
        base=tmp_path / "base",
        tuned=tmp_path / "tuned",
        instruct=tmp_path / "instruct",
        output=out,
        device="cpu",
        quiet=True,
        chunk_size=777,
    )
    reads = json.loads((out / "graftcore.json").read_text())["reads"]
    total = {role: (tmp_path / role / "model.safetensors").stat().st_size for role in trio}
    for role, r in reads.items():
        assert 0 < r["direct"] + r["page_cache"] <= total[role]
        # cold: what the header read's own read-ahead did not bring into the cache comes with O_DIRECT
        assert (r["direct"] > 0) == cold and (r["page_cache"] > 0 if not cold else True), reads
    assert_odd_trio_merged(out, trio)


@pytest.mark.parametrize("most,cold", [(100, False), (4096, True)], ids=["100B-cached", "4KiB-direct"])
def test_short_reads_are_continued(tmp_path, monkeypatch, most, cold):
    trio = odd_trio(tmp_path)
    if cold:
        for role in trio:
            evict(tmp_path / role)
    real = os.preadv
    calls = []

    def short_preadv(fd, buffers, offset):  # at most `most` bytes per call, as a network filesystem may return
        calls.append(offset)
        return real(fd, [memoryview(buffers[0])[:most]], offset)

    monkeypatch.setattr(input_file.os, "preadv", short_preadv)
    out = tmp_path / "out"
    graftcore.graft(
        base=tmp_path / "base",
        tuned=tmp_path / "tuned",
        instruct=tmp_path / "instruct",
        output=out,
        device="cpu",
        quiet=True,
        chunk_size=500,
    )
    assert len(calls) > 30
    reads = json.loads((out / "graftcore.json").read_text())["reads"]
    assert all((r["direct"] > 0) == cold for r in reads.values()), reads
    assert_odd_trio_merged(out, trio)


def test_file_truncated_during_the_merge(tmp_path, monkeypatch):
    base, tuned, instruct = llama_tensors(1), llama_tensors(2, noise=2e-3), llama_tensors(3, noise=5e-3)
    for role, sd, k in (("base", base, 1), ("tuned", tuned, 2), ("instruct", instruct, 1)):
        write_checkpoint(tmp_path / role, sd, k)
    victim = tmp_path / "tuned" / "model-00002-of-00002.safetensors"
    original = victim.read_bytes()
    real = os.preadv

    def truncating_preadv(fd, buffers, offset):  # the first read of the victim finds it cut in half
        if os.path.samefile(f"/proc/self/fd/{fd}", victim) and victim.stat().st_size == len(original):
            os.truncate(victim, len(original) // 2)
        return real(fd, buffers, offset)

    monkeypatch.setattr(input_file.os, "preadv", truncating_preadv)
    out = tmp_path / "out"
    args = dict(
        base=tmp_path / "base",
        tuned=tmp_path / "tuned",
        instruct=tmp_path / "instruct",
        output=out,
        device="cpu",
        quiet=True,
    )
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*(truncated|changed)"):
        graftcore.graft(**args, chunk_size=256)
    assert not (out / "graftcore.json").exists()
    assert not list(out.glob("*.partial"))
    assert not (out / "model.safetensors").exists()  # the one output shard reads the victim: never finished

    monkeypatch.setattr(input_file.os, "preadv", real)
    victim.write_bytes(original)  # restored: a new ctime, so shards read from it are recomputed, never kept
    graftcore.graft(**args)
    got = load_folder(out)
    for n in instruct:
        assert same_bits(got[n], reference(instruct[n], tuned[n], base[n])), n


def test_truncated_input_is_exit_2_from_the_cli(tmp_path):
    """A file cut short between planning and reading (here: before the merge starts reading it) is exit 2 with
    one line naming it, never a SIGBUS."""
    base, tuned, instruct = llama_tensors(1), llama_tensors(2, noise=2e-3), llama_tensors(3, noise=5e-3)
    for role, sd in (("base", base), ("tuned", tuned), ("instruct", instruct)):
        write_checkpoint(tmp_path / role, sd)
    victim = tmp_path / "base" / "model.safetensors"
    probe = f"""
import os, sys
import graftcore.io.input_file as r
real = os.preadv
def cut(fd, bufs, off):
    if os.path.samefile(f"/proc/self/fd/{{fd}}", {str(victim)!r}) and os.path.getsize({str(victim)!r}) > 100:
        os.truncate({str(victim)!r}, 100)
    return real(fd, bufs, off)
r.os.preadv = cut
from graftcore.cli import main
sys.exit(main(sys.argv[1:]))
"""
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            "merge",
            "--base",
            str(tmp_path / "base"),
            "--tuned",
            str(tmp_path / "tuned"),
            "--instruct",
            str(tmp_path / "instruct"),
            "--output",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(victim) in lines[0] and "Traceback" not in run.stderr
    assert not (tmp_path / "out" / "graftcore.json").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_timings_say_where_the_time_went(tmp_path):
    base, tuned, instruct = llama_tensors(1), llama_tensors(2, noise=2e-3), llama_tensors(3, noise=5e-3)
    for role, sd in (("base", base), ("tuned", tuned), ("instruct", instruct)):
        write_checkpoint(tmp_path / role, sd)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    graftcore.graft(
        base=tmp_path / "base",
        tuned=tmp_path / "tuned",
        instruct=tmp_path / "instruct",
        output=out,
        device="cpu",
        quiet=True,
    )
    wall = time.perf_counter() - t0
    manifest = json.loads((out / "graftcore.json").read_text())
    timings = manifest["timings"]
    assert 0 < manifest["seconds"] <= wall
    # each part is a share of the merge's time (rounded to ms); the work that always happens took some
    for key in ("compute", "wait_input", "wait_writer", "write", "fsync", "read_base", "read_tuned", "read_instruct"):
        assert isinstance(timings[key], float) and 0 <= timings[key] <= manifest["seconds"] + 0.001, key
    # timings are rounded to ms and this merge is tiny: together, the reads and the compute took some
    assert sum(timings[k] for k in ("compute", "read_base", "read_tuned", "read_instruct")) > 0, timings


def test_reader_and_engine_agree_on_every_read(tmp_path):
    """The streamer hands out exactly the bytes each step asks for (checked against the file itself)."""
    from graftcore.options import MergeOptions
    from graftcore.plan import DeltaInput, build_plan
    from graftcore.sources.local import open_checkpoint
    from graftcore.stream.steps import op_steps

    trio = odd_trio(tmp_path)
    cks = {r: open_checkpoint(tmp_path / r) for r in trio}
    plan = build_plan(cks["instruct"], [DeltaInput("tuned", 1.0, cks["tuned"])], cks["base"], MergeOptions())
    streamer = readers.InputStreamer(cks, plan.ops, chunk=300, pin=False, drop_behind=True, buffer_bytes=4096, depth=2)
    try:
        n = 0
        for op in plan.ops:
            for step in op_steps(op, 300, streamer.raw_bytes):
                for read in step.reads:
                    held = streamer.take(read)
                    with open(cks[read.role].shard_path(read.info.file), "rb") as f:
                        f.seek(read.start_byte)
                        assert bytes(held.data.numpy()) == f.read(read.end_byte - read.start_byte)
                    held.release()
                    n += 1
        assert n > 20
    finally:
        streamer.close()
