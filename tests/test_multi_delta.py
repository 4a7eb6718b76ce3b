"""Several fine-tunes in one pass: round(I + a1*(T1 - B) + a2*(T2 - B) + ...), float32, one rounding.

Each merge is compared with the formula written plainly below (float32 terms added left to right), bit
for bit, on the CPU path and through the real Triton kernel (interpreted on CPU tensors); adapters mixed
with full checkpoints against float64 within one ulp (their GEMM's summation order is the device's).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import interpreted_kernel_module, llama_tensors, load_folder, same_bits, write_checkpoint

import graftcore
from graftcore.api import run_plan
from graftcore.compute.cuda import StreamCompute
from graftcore.options import MergeOptions
from graftcore.plan import DeltaInput, build_plan
from graftcore.sources.local import open_checkpoint

KERNEL = interpreted_kernel_module()


def formula(i, tuned, b, alphas, dtype=None):
    """The contract, plainly: x = I; x = x + ak * (Tk - B) for each k, in float32; one rounding."""
    x = i.to(torch.float32)
    for t, a in zip(tuned, alphas):
        d = t.to(torch.float32) - b.to(torch.float32)
        if a != 1.0:
            d = d * a
        x = x + d
    return x.to(dtype or i.dtype)


@pytest.fixture
def family(tmp_path):
    """Base, Instruct and three fine-tunes of Base in mixed dtypes and shard layouts; Instruct's vocabulary
    has 4 extra rows (copied, never grafted)."""
    base = llama_tensors(1)
    tuned = [
        llama_tensors(2, torch.float32, noise=2e-3),
        llama_tensors(3, noise=3e-3),
        llama_tensors(4, torch.float16, noise=1e-3),
    ]
    instruct = llama_tensors(5, noise=5e-3)
    instruct["lm_head.weight"] = llama_tensors(5, vocab=100, noise=5e-3)["lm_head.weight"]
    paths = {
        "base": write_checkpoint(tmp_path / "base", base, 1),
        "instruct": write_checkpoint(tmp_path / "instruct", instruct, 2),
    }
    paths["tuned"] = [write_checkpoint(tmp_path / f"t{k}", t, k + 1) for k, t in enumerate(tuned)]
    return paths, base, tuned, instruct


def check(out, base, tuned, instruct, alphas, dtype=None):
    got = load_folder(out)
    assert set(got) == set(instruct)
    for n, i in instruct.items():
        rows = base[n].shape[0]
        want = formula(i[:rows], [t[n] for t in tuned], base[n], alphas, dtype)
        assert same_bits(got[n][:rows], want), n
        assert same_bits(got[n][rows:], i[rows:].to(dtype or i.dtype)), n


@pytest.mark.parametrize("n, alphas", [(2, [1.0, 1.0]), (2, [0.7, -0.3]), (3, [0.5, 1.0, 2.0])])
def test_full_checkpoints_bit_exact_on_cpu(family, tmp_path, n, alphas):
    paths, base, tuned, instruct = family
    report = graftcore.graft(
        base=paths["base"],
        tuned=paths["tuned"][:n],
        instruct=paths["instruct"],
        alpha=alphas,
        output=tmp_path / "out",
        device="cpu",
        quiet=True,
        chunk_size=1000,
    )
    check(tmp_path / "out", base, tuned[:n], instruct, alphas)
    assert report.grafted_rows == 1 and report.grafted == len(instruct) - 1
    manifest = json.loads((tmp_path / "out" / "graftcore.json").read_text())
    assert list(manifest["inputs"]) == ["instruct", "base", "tuned", "tuned2", "tuned3"][: 2 + n]
    assert manifest["options"]["alpha"] == alphas
    assert "(tuned2 - base)" in manifest["formula"]


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_full_checkpoints_through_the_interpreted_kernel(family, tmp_path, n):
    """StreamCompute (the GPU path, on a CPU device) with the real kernel: the same bits as the formula; 6
    deltas chain two launches through the float32 partial sum."""
    paths, base, tuned, instruct = family
    tuned6 = (tuned * 2)[:n]
    alphas = [0.5 + 0.25 * k for k in range(n)]
    cks = {"instruct": open_checkpoint(paths["instruct"]), "base": open_checkpoint(paths["base"])}
    roles = ["tuned"] + [f"tuned{k + 1}" for k in range(1, n)]
    deltas = [DeltaInput(r, a, open_checkpoint(paths["tuned"][k % 3])) for k, (r, a) in enumerate(zip(roles, alphas))]
    cks.update({d.role: d.checkpoint for d in deltas})
    opts = MergeOptions(quiet=True, alpha=alphas, dtype="float16")
    plan = build_plan(cks["instruct"], deltas, cks["base"], opts)
    run_plan(plan, cks, tmp_path / "out", opts, print, compute=StreamCompute("cpu", 3000, KERNEL.launch_graft))
    check(tmp_path / "out", base, tuned6, instruct, alphas, torch.float16)


def test_one_delta_is_todays_formula(family, tmp_path):
    paths, base, tuned, instruct = family
    graftcore.graft(
        base=paths["base"],
        tuned=[paths["tuned"][1]],
        instruct=paths["instruct"],
        alpha=[0.3],
        output=tmp_path / "list",
        quiet=True,
    )
    graftcore.graft(
        base=paths["base"],
        tuned=paths["tuned"][1],
        instruct=paths["instruct"],
        alpha=0.3,
        output=tmp_path / "one",
        quiet=True,
    )
    a, b = load_folder(tmp_path / "list"), load_folder(tmp_path / "one")
    for n, i in instruct.items():
        rows = base[n].shape[0]
        want = (i[:rows].float() + 0.3 * (tuned[1][n].float() - base[n].float())).to(i.dtype)
        assert same_bits(a[n][:rows], want) and same_bits(a[n], b[n]), n


def test_kernel_and_twin_agree_on_n_deltas():
    from graftcore.kernels import graft_cpu

    g = torch.Generator().manual_seed(0)
    i, b = torch.randn(7001, generator=g).bfloat16(), torch.randn(7001, generator=g).half()
    tuned = [
        torch.randn(7001, generator=g).to(d)
        for d in (torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16)
    ]
    alphas = [0.5, 1.0, -2.25, 1e-3, 3.0]
    for n in range(1, 6):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            twin, kernel = torch.empty(7001, dtype=dtype), torch.empty(7001, dtype=dtype)
            assert graft_cpu(twin, i, tuned[:n], b, alphas[:n]) == (0, 0, 0)
            assert KERNEL.graft_triton(kernel, i, tuned[:n], b, alphas[:n]) == (0, 0, 0)
            want = formula(i, tuned[:n], b, alphas[:n], dtype)
            assert same_bits(twin, want) and same_bits(kernel, want), (n, dtype)


def test_nonfinite_in_the_second_delta_names_it(family, tmp_path):
    paths, base, tuned, instruct = family
    bad = dict(tuned[1])
    bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"].clone()
    bad["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
    write_checkpoint(tmp_path / "bad", bad)
    with pytest.raises(graftcore.NonFiniteError, match=r"tuned2: .*bad.*up_proj.*1 element"):
        graftcore.graft(
            base=paths["base"],
            tuned=[paths["tuned"][0], tmp_path / "bad"],
            instruct=paths["instruct"],
            output=tmp_path / "out",
            quiet=True,
        )
    assert not (tmp_path / "out" / "graftcore.json").exists()


def test_changed_coefficient_is_not_resumed(family, tmp_path):
    """A rerun with one alpha changed may not keep a single shard of the earlier run: it is another merge."""
    paths, base, tuned, instruct = family
    args = dict(
        base=paths["base"], tuned=paths["tuned"][:2], instruct=paths["instruct"], output=tmp_path / "out", quiet=True
    )
    graftcore.graft(**args, alpha=[1.0, 0.5])
    with pytest.raises(graftcore.OutputError, match="not written by this same merge"):
        graftcore.graft(**args, alpha=[1.0, 0.25])
    report = graftcore.graft(**args, alpha=[1.0, 0.25], overwrite=True)
    assert report.shards_kept == 0 and report.shards_written == 2
    check(tmp_path / "out", base, tuned[:2], instruct, [1.0, 0.25])
    again = graftcore.graft(**args, alpha=[1.0, 0.25])  # the same merge again: everything kept
    assert again.shards_kept == 2 and again.shards_written == 0


def test_cli_repeatable_tuned_and_alpha(family, tmp_path, cli):
    paths, base, tuned, instruct = family
    t1, t2 = paths["tuned"][:2]
    code, _, err = cli(
        "merge",
        "--base",
        paths["base"],
        "--tuned",
        t1,
        "--tuned",
        t2,
        "--alpha",
        "0.75",
        "--alpha",
        "0.5",
        "--instruct",
        paths["instruct"],
        "--output",
        tmp_path / "out",
        "--quiet",
    )
    assert code == 0, err
    check(tmp_path / "out", base, tuned[:2], instruct, [0.75, 0.5])
    code, _, err = cli(
        "merge",
        "--base",
        paths["base"],
        "--tuned",
        t1,
        "--tuned",
        t2,
        "--alpha",
        "0.5",
        "--instruct",
        paths["instruct"],
        "--output",
        tmp_path / "one-alpha",
        "--quiet",
    )
    assert code == 0, err
    check(tmp_path / "one-alpha", base, tuned[:2], instruct, [0.5, 0.5])
    code, _, err = cli(
        "merge",
        "--base",
        paths["base"],
        "--tuned",
        t1,
        "--tuned",
        t2,
        "--alpha",
        "1",
        "--alpha",
        "2",
        "--alpha",
        "3",
        "--instruct",
        paths["instruct"],
        "--output",
        tmp_path / "bad",
    )
    assert code == 2 and "3 values for 2 --tuned" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_progress_callback_counts_every_byte(family, tmp_path):
    paths, base, tuned, instruct = family
    seen = []
    graftcore.graft(
        base=paths["base"],
        tuned=paths["tuned"][:2],
        instruct=paths["instruct"],
        output=tmp_path / "out",
        quiet=True,
        chunk_size=500,
        progress=seen.append,
    )
    total = sum(t.numel() * t.element_size() for t in instruct.values())
    assert seen and all(p.total == total for p in seen)
    assert [p.done for p in seen] == sorted(p.done for p in seen) and seen[-1].done == total
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert {(p.shard, p.tensor) for p in seen} <= set((f, n) for n, f in index.items())
    assert {p.tensor for p in seen} == set(instruct)


def test_dry_run_summary_describes_the_plan(family, tmp_path):
    paths, base, tuned, instruct = family
    report = graftcore.graft(
        base=paths["base"], tuned=paths["tuned"][:2], instruct=paths["instruct"], output=tmp_path / "out", dry_run=True
    )
    text = report.summary()
    assert "dry run" in text and f"plan: {len(instruct)} tensors in 2 output shard(s)" in text
    assert report.grafted == len(instruct) - 1 and report.grafted_rows == 1
    assert isinstance(report, graftcore.Report) and isinstance(report.plan, graftcore.Plan)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(alpha=[1.0, 2.0, 3.0]), "3 values for 2 --tuned"),
        (dict(alpha="0.5"), "not a number"),
        (dict(alpha=[1.0, float("nan")]), "must be finite"),
        (dict(alpha=True), "not a number"),
        (dict(include=["q_proj", 3]), "list of regular expressions"),
        (dict(targets="attn"), "expected one of all, projections"),
        (dict(dtype="int8"), "expected one of auto, bfloat16"),
        (dict(device="tpu"), "expected auto, cpu, cuda or cuda:N"),
        (dict(overwrite="yes"), "expected True or False"),
        (dict(chunk_size=1.5), "whole number"),
        (dict(max_shard_size="lots"), "cannot read"),
        (dict(colour="red"), "unknown option"),
        (dict(tuned=42), "expected a REF or a list"),
        (dict(tuned=[]), "expected a REF or a list"),
    ],
)
def test_bad_options_fail_before_the_output_is_touched(family, tmp_path, bad, message):
    paths, *_ = family
    args = dict(
        base=paths["base"], tuned=paths["tuned"][:2], instruct=paths["instruct"], output=tmp_path / "out", quiet=True
    )
    with pytest.raises(graftcore.GraftError, match=message):
        graftcore.graft(**{**args, **bad})
    assert not (tmp_path / "out").exists()


def test_include_as_a_string_is_one_pattern(family, tmp_path):
    paths, base, tuned, instruct = family
    report = graftcore.graft(
        base=paths["base"],
        tuned=paths["tuned"][0],
        instruct=paths["instruct"],
        output=tmp_path / "out",
        include="q_proj",
        dtype="bf16",
        quiet=True,
    )
    assert report.grafted == 2 and report.copied == len(instruct) - 2  # q_proj of 2 layers, not every tensor
    got = load_folder(tmp_path / "out")
    n = "model.layers.0.self_attn.q_proj.weight"
    assert same_bits(got[n], formula(instruct[n], [tuned[0][n]], base[n], [1.0], torch.bfloat16))


def test_swapped_base_and_instruct_get_a_hint(family, tmp_path, cli):
    paths, *_ = family
    code, _, err = cli(
        "merge",
        "--base",
        paths["instruct"],
        "--tuned",
        paths["tuned"][0],
        "--instruct",
        paths["base"],
        "--output",
        tmp_path / "out",
    )
    assert code == 2 and "lm_head.weight" in err and "swapped" in err and "Traceback" not in err


# ---- tensors already in memory ----------------------------------------------------------------------------


def test_graft_tensor_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    i, b = torch.randn(33, 17, generator=g).bfloat16(), torch.randn(33, 17, generator=g)
    t1, t2 = torch.randn(33, 17, generator=g).half(), torch.randn(33, 17, generator=g).bfloat16()
    got = graftcore.graft_tensor(i, [t1, t2], b, alpha=[0.5, 2.0], dtype="fp16")
    assert got.shape == i.shape and same_bits(got, formula(i, [t1, t2], b, [0.5, 2.0], torch.float16))
    assert same_bits(graftcore.graft_tensor(i, t1, b), formula(i, [t1], b, [1.0]))
    with pytest.raises(graftcore.MismatchError, match="shape"):
        graftcore.graft_tensor(i, t1[:3], b)
    with pytest.raises(graftcore.GraftError, match="torch.int64"):
        graftcore.graft_tensor(i, t1.long(), b)
    with pytest.raises(graftcore.GraftError, match="finite"):
        graftcore.graft_tensor(i, t1, b, alpha=float("inf"))
    t1[0, 0] = float("inf")
    with pytest.raises(graftcore.NonFiniteError, match="1 element"):
        graftcore.graft_tensor(i, t1, b)
    assert graftcore.graft_tensor(i, t1, b, allow_nonfinite=True)[0, 0].isinf()


def test_graft_state_dict_follows_the_file_policy():
    base = llama_tensors(1)
    tuned = [llama_tensors(2, noise=2e-3), llama_tensors(3, torch.float32, noise=2e-3)]
    instruct = llama_tensors(4, noise=5e-3)
    instruct["lm_head.weight"] = llama_tensors(4, vocab=100, noise=5e-3)["lm_head.weight"]
    instruct["vision.proj"] = torch.ones(3, 3, dtype=torch.bfloat16)  # Instruct only: copied
    instruct["position_ids"] = torch.arange(5)  # not floating point: copied as it is
    got = graftcore.graft_state_dict(instruct, tuned, base, alpha=[1.0, 0.5], dtype=torch.float32, exclude=["norm"])
    for n, i in instruct.items():
        if n in ("vision.proj", "position_ids") or "norm" in n:
            want = i.to(torch.float32) if i.is_floating_point() else i
            assert same_bits(got[n], want), n
            continue
        rows = base[n].shape[0]
        assert same_bits(got[n][:rows], formula(i[:rows], [t[n] for t in tuned], base[n], [1.0, 0.5], torch.float32)), n
        assert same_bits(got[n][rows:], i[rows:].float()), n
    broken = dict(tuned[1])
    del broken["model.norm.weight"]
    with pytest.raises(graftcore.MismatchError, match="model.norm.weight.*in base but not in tuned2"):
        graftcore.graft_state_dict(instruct, [tuned[0], broken], base)


def test_graft_refuses_an_out_it_cannot_write():
    from graftcore.kernels import graft_

    x = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="not contiguous"):
        graft_(torch.empty(6, 4).T, x, x, x)
    with pytest.raises(ValueError, match="shape"):
        graft_(torch.empty(24), x, x, x)
