"""DeepSeek-V4 merge benchmark: Base with FP8 experts, Instruct with FP4 routed experts, tuned bf16
(bench/make_v4_checkpoints.py), cold, against the I/O floors of bench_fp8.py measured in the same run.

    python bench/bench_v4.py --preset v4-flash-27gb --reps 2

The output is checked on a sample (every dense weight and the first routed expert of each layer, w1/w2/w3), every
byte and scale, against the rules written plainly here: FP8 with E8M0 scales per 128x128 block (keep s while
amax / s <= 464, else 2 ** ceil(log2(amax / 448))), FP4 per 32 inputs (keep s while amax / s <= 7, else
2 ** ceil(log2(amax / 6)); nearest E2M1 value, ties even). The update-error table per format is graftcore.json's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fp8 import COLD_COLUMNS, ROLES, cold_lines, files_of, floor_rows  # noqa: E402
from bench_merge import Row, graftcore_cmd, run_row  # noqa: E402
from common import DATA, append_results, gb, log, run_interleaved, table  # noqa: E402
from make_v4_checkpoints import E2M1_MID, PRESETS, fp4_decode, fp8_decode, make_trio  # noqa: E402


def fp8_rule(x: torch.Tensor, kept: torch.Tensor):
    rows, cols = x.shape
    t = x.view(rows // 128, 128, cols // 128, 128)
    amax = t.abs().amax(dim=(1, 3))
    s = kept.float()
    s = torch.where(amax / s > 464, torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-30) / 448))), s)
    q = (t / s.view(rows // 128, 1, cols // 128, 1)).clamp(-448, 448).view(rows, cols).to(torch.float8_e4m3fn)
    return q.view(torch.uint8), s.to(torch.float8_e8m0fnu).view(torch.uint8)


def fp4_rule(x: torch.Tensor, kept: torch.Tensor):
    rows, cols = x.shape
    g = x.view(rows, cols // 32, 32)
    amax = g.abs().amax(dim=2)
    s = kept.float()
    s = torch.where(amax / s > 7, torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-30) / 6))), s)
    y = (g / s.unsqueeze(2)).view(rows, cols)
    mag = y.abs().clamp(max=6)
    code = torch.bucketize(mag, E2M1_MID)
    code = torch.where(torch.isin(mag, E2M1_MID) & (code % 2 == 1), code + 1, code) | (torch.signbit(y).long() << 3)
    c = code.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4), s.to(torch.float8_e8m0fnu).view(torch.uint8)


FORMATS: dict = {}  # graftcore.json's per-format update error, kept by check_v4 (the output is deleted after)


def check_v4(out: Path, trio: dict) -> tuple[bool, str]:
    """Every byte of the sampled tensors against the rules; (ok, text)."""
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    dense = lambda n: ("attn.w" in n and "experts." not in n) or "shared_experts" in n  # noqa: E731
    sample = [n for n in index if n.endswith(".weight") and (dense(n) or "ffn.experts.0." in n)]

    def get(role, name):
        folder = Path(trio[role]["dir"]) if role != "out" else out
        file = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
        with safe_open(folder / file, "pt") as f:
            return f.get_tensor(name)

    FORMATS.update(json.loads((out / "graftcore.json").read_text())["fp8"]["formats"])
    bad = []
    for name in sample:
        scale = name[: -len("weight")] + "scale"
        b = fp8_decode(get("base", name), get("base", scale))
        qi, si = get("instruct", name), get("instruct", scale)
        expert = qi.dtype == torch.int8
        x = (fp4_decode(qi, si) if expert else fp8_decode(qi, si)) + (get("tuned", name).float() - b)
        q, s = (fp4_rule if expert else fp8_rule)(x, si)
        got_q, got_s = get("out", name).view(torch.uint8), get("out", scale).view(torch.uint8)
        if not (torch.equal(got_q, q) and torch.equal(got_s, s)):
            bad.append(name)
    experts = sum("ffn.experts." in n for n in sample)
    text = f"yes ({len(sample)} tensors, {experts} of them FP4 experts)"
    return (not bad, text if not bad else f"no: {len(bad)} differ ({bad[0]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="v4-small", choices=PRESETS)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    data = DATA / args.preset
    trio = make_trio(data, args.preset)
    work = data / "runs"
    work.mkdir(parents=True, exist_ok=True)
    out = work / "graftcore"
    merge = [*graftcore_cmd(), "merge", *(x for r in ROLES for x in (f"--{r}", trio[r]["dir"])), "--output", str(out),
             "--device", "cpu", "--quiet", "--overwrite"]  # fmt: skip
    rows = [
        *floor_rows(trio, work),
        Row("graftcore", "graftcore (--device cpu)", merge, out, lambda o: check_v4(o, trio)),
    ]
    inputs = [p for r in ROLES for p in files_of(trio[r]["dir"])]
    checks: dict[str, str] = {}
    log(f"{args.preset}: " + ", ".join(f"{r} {gb(trio[r]['bytes'])}" for r in ROLES) + f"; {args.reps} reps, cold")
    t0 = time.perf_counter()
    results = run_interleaved(rows, args.reps, "cold", lambda row, series: run_row(row, True, inputs, series, checks))
    lines = cold_lines(rows, results, checks)
    formats = FORMATS
    spec = PRESETS[args.preset]
    body = (
        f"Trio `{args.preset}` (DeepSeek-V4-Flash shapes from transformers' DeepseekV4Config, {spec}): Base "
        f"{gb(trio['base']['bytes'])} (FP8 experts), tuned {gb(trio['tuned']['bytes'])} bf16, Instruct "
        f"{gb(trio['instruct']['bytes'])} (FP4 experts); output in Instruct's formats. Cold, {args.reps} reps per "
        "row, order rotated every rep; ratios of the median (+ fsync) to the floors of this run.\n\n"
        + table(COLD_COLUMNS + ["bit-identical to the plain rules"], lines)
        + "\n\nWhat re-encoding kept of the update (graftcore.json `fp8.formats`; a synthetic update of 5% of a "
        "weight's size: noise of 0.001 on weights of 0.02):\n\n"
        + table(
            ["format", "tensors", "update error", "precision"],
            [[k, str(v["tensors"]), f"{v['update_error']:.1%}", v["precision"]] for k, v in formats.items()],
        )  # fmt: skip
    )
    print(body)
    log(f"bench_v4: {time.perf_counter() - t0:.0f} s")
    if not args.no_record:
        append_results(f"bench_v4 {args.preset}", body, data, {r.name: r.cmd for r in rows})


if __name__ == "__main__":
    main()
