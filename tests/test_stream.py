"""The one streaming pass (stream.run_pass) with a consumer written here: every step of every op reaches it in
plan order with the bytes the files hold (read plainly with the reference library), the hooks come in their
documented order, a group's inputs are checked between drain and finish, and a chosen subset of steps is
streamed alone."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import llama_tensors, write_checkpoint
from safetensors import safe_open

from graftcore.errors import CheckpointError
from graftcore.options import MergeOptions
from graftcore.plan import build_plan
from graftcore.plan.inputs import open_inputs
from graftcore.stream.driver import StepConsumer, run_pass
from graftcore.stream.steps import op_steps


class Recorder(StepConsumer):
    def __init__(self, on_drain=None):
        self.events: list = []
        self.seen: dict = {}  # (role, tensor) -> list of (first, stop, bytes)
        self.on_drain = on_drain

    def begin_group(self, name, ops):
        self.events.append(("begin_group", name))

    def begin_op(self, op):
        self.events.append(("begin_op", op.name))

    def step(self, op, step, held):
        for read, h in zip(step.reads, held):
            self.seen.setdefault((read.role, read.info.name), []).append((read.first, read.stop, h.data.clone()))
            h.release()
        return sum(r.end_byte - r.start_byte for r in step.reads)

    def end_op(self, op):
        self.events.append(("end_op", op.name))

    def drain_group(self):
        self.events.append(("drain",))
        if self.on_drain:
            self.on_drain()

    def finish_group(self):
        self.events.append(("finish",))

    def abort_group(self):
        self.events.append(("abort",))


@pytest.fixture
def planned(tmp_path):
    sds = {r: llama_tensors(k, noise=0.0 if r == "base" else 3e-3) for k, r in enumerate(("base", "tuned", "instruct"))}
    paths = {r: write_checkpoint(tmp_path / r, sd, 2 if r == "instruct" else 1) for r, sd in sds.items()}
    opts = MergeOptions(quiet=True)
    checkpoints, deltas = open_inputs(paths["instruct"], [paths["tuned"]], paths["base"], opts)
    plan = build_plan(checkpoints["instruct"], deltas, checkpoints["base"], opts)
    return plan, checkpoints, paths, opts, tmp_path


def file_bytes(folder, name):
    """The bytes of tensor `name` in the checkpoint folder, through the reference library."""
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            if name in h.keys():
                return h.get_tensor(name).contiguous().view(-1).view(torch.uint8)
    raise KeyError(name)


def test_every_step_in_order_with_the_files_bytes(planned):
    plan, checkpoints, paths, opts, tmp = planned
    groups = [(s.file, s.ops) for s in plan.shards]
    rec = Recorder()
    total = sum(
        r.end_byte - r.start_byte
        for s in plan.shards
        for op in s.ops
        for st in op_steps(op, 100, 1 << 22)
        for r in st.reads
    )
    stats = run_pass(groups, checkpoints, opts, rec, chunk=100, total=total, label="test", scratch=tmp / "scratch")
    want_events = []
    for name, ops in groups:
        want_events.append(("begin_group", name))
        for op in ops:
            want_events += [("begin_op", op.name), ("end_op", op.name)]
        want_events += [("drain",), ("finish",)]
    assert rec.events == want_events
    for (role, name), pieces in rec.seen.items():
        whole = file_bytes(paths[role], name)
        got = torch.cat([p[2] for p in pieces])
        assert torch.equal(got, whole), (role, name)  # every byte, once, in order
    read = sum(v["direct"] + v["page_cache"] for v in stats.reads.values())
    assert read >= total


def test_a_changed_input_stops_the_group_before_it_finishes(planned):
    plan, checkpoints, paths, opts, tmp = planned
    shard = plan.shards[0]
    tuned_file = paths["tuned"] / "model.safetensors"
    rec = Recorder(on_drain=lambda: os.utime(tuned_file, ns=(1, 1)))  # rewritten under us, as far as stat says
    with pytest.raises(CheckpointError, match="changed"):
        run_pass([(shard.file, shard.ops)], checkpoints, opts, rec, chunk=100, total=0, label="t", scratch=tmp / "s")
    assert rec.events[-2:] == [("drain",), ("abort",)] and ("finish",) not in rec.events


def test_only_the_chosen_steps_are_streamed(planned):
    plan, checkpoints, paths, opts, tmp = planned
    op = next(op for s in plan.shards for op in s.ops if op.numel > 500)
    every = list(op_steps(op, 100, 1 << 22))
    chosen = [every[1], every[-1]]
    rec = Recorder()
    run_pass(
        [("x", [op])],
        checkpoints,
        opts,
        rec,
        chunk=100,
        total=0,
        label="t",
        scratch=tmp / "s",
        steps=lambda k, o, raw: iter(chosen),
    )
    pieces = rec.seen[("instruct", op.name)]
    assert [(p[0], p[1]) for p in pieces] == [(s.lo, s.hi) for s in chosen]
    whole = file_bytes(paths["instruct"], op.name)
    size = op.instruct.nbytes // op.instruct.numel
    for first, stop, data in pieces:
        assert torch.equal(data, whole[first * size : stop * size])
