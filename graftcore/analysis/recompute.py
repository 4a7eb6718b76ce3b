"""`graftcore verify --recompute K`: the recorded inputs re-opened and chunks of the output computed again.

The inputs are opened as graftcore.json records them (hub inputs pinned to their recorded commits, local ones
at their recorded absolute paths); each must have its recorded fingerprint (headers) and, for a local input,
each file the identity the merge saw. The plan is rebuilt from them and the recorded options (the same
tensors, dtypes, shapes, shard for shard), and K random chunks plus the first and last chunk of every shard
are read through the streaming pass (stream/driver.run_pass, only those steps) and computed again on the CPU, compared
bit for bit (LoRA blocks merged on a GPU: within one ulp, the GEMM's order being the device's). This module
imports torch; analysis/verify.py loads it only for --recompute.

Example:
    >>> recompute_chunks(folder, manifest, headers, 8, None, report, {})   # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import random
from dataclasses import fields
from pathlib import Path

import torch

from graftcore.codecs import codec_of
from graftcore.errors import GraftError, VerifyError
from graftcore.io.safetensors_file import byte_view, torch_dtype
from graftcore.options import MergeOptions
from graftcore.plan.build import build_plan
from graftcore.plan.inputs import job_fingerprint, open_inputs
from graftcore.plan.ops import Plan, headers_entries, plan_entries
from graftcore.plan.report import VerifyReport
from graftcore.stream.codec_steps import out_elements
from graftcore.stream.compute_step import compute_step, load_lora
from graftcore.stream.driver import StepConsumer, read_buffer_bytes, run_pass
from graftcore.stream.readers import raw_step_bytes, read_elements
from graftcore.stream.steps import Step, op_steps
from graftcore.version import __version__


def recompute_chunks(
    folder: Path, manifest: dict, headers: dict, k: int, seed, report: VerifyReport, hub: dict
) -> None:
    """Recompute `k` random chunks (and the first and last of every shard) of the output `folder` whose
    graftcore.json is `manifest`; VerifyError at the first difference or changed input; counts into `report`."""
    opts = recorded_options(manifest, hub)
    refs = pinned_refs(manifest)
    tuned = [refs[r] for r in sorted((r for r in refs if r.startswith("tuned")), key=tuned_order)]
    checkpoints, deltas = open_inputs(refs["instruct"], tuned, refs.get("base"), opts)
    plan = build_plan(checkpoints["instruct"], deltas, checkpoints.get("base"), opts)
    for role, ck in checkpoints.items():
        recorded = manifest["inputs"].get(role, {})
        if recorded.get("fingerprint") != ck.fingerprint:
            raise VerifyError(
                f"{ck.ref}: the {role} input is not the one the merge read (its files or headers changed since; "
                f"graftcore.json records fingerprint {str(recorded.get('fingerprint'))[:12]}.., now "
                f"{ck.fingerprint[:12]}..)"
            )
        for file, state in sorted((recorded.get("file_states") or {}).items()):  # a header can stay, the data not
            if ck.file_state(file) != state:
                raise VerifyError(
                    f"{ck.locate(file)}: the {role} input's file changed since the merge (replaced or rewritten: its "
                    "inode, size or times differ from graftcore.json's record), so the output may not be what it "
                    "gives "
                    f"now; rerun the same merge to bring the output up to date"
                )
    if job_fingerprint(checkpoints, opts) != manifest["fingerprint"]:
        written_by = manifest.get("graftcore_version")
        why = (
            f"it was written by graftcore {written_by}, whose options may select differently; rerun the merge"
            if written_by != __version__
            else "an option such as the alpha, or an input's record, was edited after the merge"
        )
        raise VerifyError(
            f"{folder / 'graftcore.json'}: its inputs and options do not give the job fingerprint it records ({why})"
        )
    if sorted(plan_entries(plan)) != sorted(headers_entries(headers)):
        raise VerifyError(
            f"{folder}: the plan rebuilt from the recorded inputs and options names other tensors, dtypes or shapes"
        )
    rng = random.Random(seed)
    if seed is None:
        seed = rng.randrange(1 << 31)
        rng = random.Random(seed)
    report.notes.append(f"chunks chosen with seed {seed}")
    chunk, merged_on_gpu = recorded_chunk(manifest)
    from graftcore.compute.cpu import CpuCompute

    ops = [op for shard in plan.shards for op in shard.ops]
    raw = raw_step_bytes(ops, chunk, read_buffer_bytes(opts))  # what the streamer makes of every op
    chosen = choose_steps(plan, chunk, raw, k, rng)
    groups = [(shard.file, [op for op, _ in picks]) for shard, picks in chosen]
    steps = [steps for _, picks in chosen for _, steps in picks]  # by the op's index in the pass
    consumer = RecomputeConsumer(folder, headers, checkpoints, CpuCompute(chunk), opts, merged_on_gpu, report)
    with consumer.compute:
        run_pass(
            groups,
            checkpoints,
            opts,
            consumer,
            chunk=chunk,
            total=0,
            label="verify",
            scratch=folder / ".graftcore-downloads",
            buffer_bytes=raw,
            steps=lambda k, op, _raw: iter(steps[k]),
        )


class RecomputeConsumer(StepConsumer):
    """Verify's side of the pass: each chosen step computed again on the CPU and compared with the output's bytes
    (bit for bit; LoRA blocks merged on a GPU within one ulp); VerifyError at the first difference."""

    def __init__(self, folder: Path, headers: dict, checkpoints: dict, compute, opts, merged_on_gpu, report):
        self.folder, self.headers, self.checkpoints, self.compute, self.opts = (
            folder,
            headers,
            checkpoints,
            compute,
            opts,
        )
        self.merged_on_gpu, self.report = merged_on_gpu, report
        self.loaded = self.encoder = None

    def begin_group(self, name: str, ops: list) -> None:
        self.header, self.file = self.headers[name], name

    def begin_op(self, op) -> None:
        self.loaded = load_lora(op, self.compute, self.checkpoints, self.opts) if op.low_rank else None
        self.encoder = codec_of(op.instruct).encoder(op.instruct, op.instruct.file) if op.quantized_out else None

    def step(self, op, step: Step, held: list) -> int:
        # a raw step may copy a quantized weight's scales; a packed output's weight has its stored name
        name = step.reads[0].info.name if step.raw else op.entries[0][0]
        try:
            if step.raw:
                first, stop = step.lo, step.hi
                want = held[0].tensor(step.reads[0].info)
            else:
                first, stop = out_elements(op, step)
                want = torch.empty(stop - first, dtype=torch_dtype(op.out_dtype))
                compute_step(op, step, held, want, self.compute, self.loaded, self.encoder)
                self.compute.nonfinite()  # a merge that kept NaN/Inf (--allow-nonfinite) recomputes them too
            ulp = op.low_rank and self.merged_on_gpu
            self.compare(name, first, stop, want, ulp)
            if self.encoder is not None and not step.raw:  # the new scales of the block rows just encoded
                cols = op.instruct.cols
                for entry, first, stop, values in self.encoder.entries_for_rows(step.lo // cols, step.hi // cols):
                    self.compare(entry, first, stop, values, False)
        finally:
            for h in held:
                h.release()
        self.report.chunks_recomputed += 1
        self.report.within_ulp += ulp
        return 0

    def compare(self, name: str, lo: int, hi: int, want: torch.Tensor, ulp: bool) -> None:
        """VerifyError unless elements [lo, hi) of the output tensor `name` are `want`'s bits (or within one ulp)."""
        info = byte_view(self.header.tensors[name])  # a dtype below a byte: its bytes, as the raw step copied them
        got = read_elements(self.folder / info.file, info, lo, hi)
        if not same(got, want, ulp):
            raise VerifyError(
                f"{self.folder / self.file}: tensor {name!r}, elements {lo}..{hi}: the bytes differ "
                "from what the recorded inputs give now (an input's data changed since the merge, or the shard "
                "was written wrong)"
            )


def recorded_options(manifest: dict, hub: dict) -> MergeOptions:
    names = {f.name for f in fields(MergeOptions)}
    recorded = {k: v for k, v in (manifest.get("options") or {}).items() if k in names}
    recorded.update(quiet=True, device="cpu", **{k: v for k, v in hub.items() if k in names})
    try:
        return MergeOptions(**recorded)
    except (GraftError, TypeError) as e:
        raise VerifyError(f"graftcore.json: the recorded options are unusable ({e})") from None


def pinned_refs(manifest: dict) -> dict[str, str]:
    """role -> REF: local inputs by absolute path, hub inputs pinned to the commit the merge resolved them to
    (verify.check_manifest has checked the records: a ref each, instruct and a tuned input among them)."""
    refs = {}
    for role, rec in manifest["inputs"].items():
        ref, revision, path = rec["ref"], rec.get("revision"), rec.get("path")
        if isinstance(path, str) and not revision:
            refs[role] = path  # a local input, by the absolute path the merge resolved (its ref may be relative)
        else:
            refs[role] = f"{ref.split('@')[0]}@{revision}" if revision else ref
    return refs


def tuned_order(role: str) -> int:
    return 1 if role == "tuned" else int(role.removeprefix("tuned"))


def recorded_chunk(manifest: dict) -> tuple[int, bool]:
    """The chunk the merge computed with (LoRA blocks follow it) and whether it ran on a GPU."""
    from graftcore.compute.cuda import GPU_CHUNK
    from graftcore.kernels import CHUNK

    on_gpu = str(manifest.get("device", "cpu")).startswith("cuda")
    chunk = (manifest.get("options") or {}).get("chunk_size")
    return (chunk if isinstance(chunk, int) and chunk > 0 else GPU_CHUNK if on_gpu else CHUNK), on_gpu


def choose_steps(plan: Plan, chunk: int, raw: int, k: int, rng: random.Random) -> list:
    """[(shard, [(op, [step, ...]), ...]), ...]: the first and last chunk of every shard, and `k` other distinct
    chunks drawn uniformly (all of them when the output has no more than that); each chunk at most once, in plan
    order, only the shards and ops that have one. `raw`: the bytes of a copied step."""
    ops = [(shard, op) for shard in plan.shards for op in shard.ops]
    starts = [0]  # the index of each op's first chunk among all the output's chunks
    for _, op in ops:
        starts.append(starts[-1] + sum(1 for _ in op_steps(op, chunk, raw)))
    fixed: set[int] = set()
    i = 0
    for shard in plan.shards:  # a shard's ops are consecutive in `ops`
        lo, hi = starts[i], starts[i + len(shard.ops)]
        if hi > lo:
            fixed.update((lo, hi - 1))
        i += len(shard.ops)
    total = starts[-1]
    others = min(k, total - len(fixed))
    drawn = set()
    while len(drawn) < others:  # rejection is cheap while k is small; otherwise draw from what is left
        if others > (total - len(fixed)) // 2:
            drawn = set(rng.sample(sorted(set(range(total)) - fixed), others))
            break
        g = rng.randrange(total)
        if g not in fixed:
            drawn.add(g)
    wanted = sorted(fixed | drawn)
    chosen: dict = {}
    for (shard, op), start, end in zip(ops, starts, starts[1:]):
        lo = bisect.bisect_left(wanted, start)
        if lo < len(wanted) and wanted[lo] < end:
            picks = set(wanted[lo : bisect.bisect_left(wanted, end)])
            steps = [step for j, step in enumerate(op_steps(op, chunk, raw)) if start + j in picks]
            if any(step.entry for step in steps):  # the new scales: checked with each block row's step
                steps = [step for step in steps if not step.entry] or [next(op_steps(op, chunk, raw))]
            chosen.setdefault(shard.file, (shard, []))[1].append((op, steps))
    return list(chosen.values())


def same(got: torch.Tensor, want: torch.Tensor, within_ulp: bool) -> bool:
    """Equal bits; or, for `within_ulp`, every element at most one representable value apart (or both NaN)."""
    if got.numel() != want.numel():
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    a, b = got.contiguous().view(ints).long(), want.contiguous().view(ints).long()
    if not within_ulp:
        return torch.equal(a, b)
    width = 8 * got.element_size()
    ordered = lambda v: torch.where(v < 0, -(v & ((1 << (width - 1)) - 1)), v)  # noqa: E731  sign-magnitude order
    close = (ordered(a) - ordered(b)).abs() <= 1
    return bool((close | (got.isnan() & want.isnan())).all())
