"""FP8 merge benchmark: graftcore on a DeepSeek-V3-shaped FP8 trio (Base and Instruct FP8, tuned bf16), cold,
against two I/O floors measured in the same run, and the way users do it today.

    python bench/bench_fp8.py --preset dsv3-26gb --reps 2

Rows (each its own process; the inputs evicted from the page cache before each run; order rotated per rep):
- I/O floor, sequential: the three inputs read by three concurrent `cat`s, then one output-sized file written
  with `dd ... conv=fdatasync` (two rows, summed);
- I/O floor, overlapped: the three `cat`s and the `dd` started together (graftcore overlaps reads and writes,
  so this is the floor its ratio is stated against);
- graftcore (--device cpu): FP8 output in Instruct's format;
- the users' way (once): dequantize Base and Instruct to bf16 (bench/fp8_user_flow.py, as DeepSeek's
  fp8_cast_bf16.py does), `graftcore merge` of the bf16 trio, quantize again (s = amax / 448): time and bytes
  moved per stage.
graftcore's output is checked once, every FP8 byte and scale, against the requantization rule written plainly
in torch here (check_fp8), and its other tensors against round(I + (T - B)).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import Row, graftcore_cmd, run_row  # noqa: E402
from common import DATA, append_results, evict, gb, log, measure, run_interleaved, table  # noqa: E402
from make_fp8_checkpoints import PRESETS, make_trio  # noqa: E402

ROLES = ("base", "tuned", "instruct")


def files_of(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in files_of(folder))


def block_scales(x: torch.Tensor, s: torch.Tensor, block=128) -> torch.Tensor:
    rows, cols = x.shape
    return s.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]


def reference_fp8(qi, si, b, t, block=128):
    """The rule plainly, whole tensor: x = deq(I) + (T - deq(B)); per block keep s if max|x| / s <= 464, else
    the smallest F32 s >= amax / 448 with amax / s <= 448; q = clamp(x / s, +-448) to E4M3."""
    x = qi.float() * block_scales(qi, si) + (t.float() - b)
    rows, cols = x.shape
    gr, gc = si.shape
    finite = torch.where(torch.isfinite(x), x.abs(), 0.0)  # NaN/Inf do not count toward a block's max
    amax = torch.nn.functional.pad(finite, (0, gc * block - cols, 0, gr * block - rows))
    amax = amax.view(gr, block, gc, block).amax(dim=(1, 3))
    scale = si.float().clone()
    grow = amax / scale > 464
    for i, j in grow.nonzero().tolist():
        s = amax[i, j] / 448
        while s < amax[i, j] / 448 or amax[i, j] / s > 448:
            s = torch.nextafter(s, torch.tensor(math.inf))
        scale[i, j] = s
    q = (x / block_scales(x, scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale


def check_fp8(out: Path, trio: dict) -> tuple[bool, str]:
    """Every tensor of the output against the plain reference (FP8: bytes and scales; others: round(I+(T-B)))."""
    maps = {
        r: json.loads((Path(trio[r]["dir"]) / "model.safetensors.index.json").read_text())["weight_map"] for r in ROLES
    }
    out_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    if set(out_map) != set(maps["instruct"]):
        return False, "tensor names differ from Instruct's"

    def get(role, name):
        folder = Path(trio[role]["dir"]) if role != "out" else out
        where = out_map if role == "out" else maps[role]
        with safe_open(folder / where[name], "pt") as h:
            return h.get_tensor(name)

    bad = []
    for name in sorted(out_map):
        if name.endswith("_scale_inv"):
            continue
        got, i = get("out", name), get("instruct", name)
        if i.dtype == torch.float8_e4m3fn:
            sn = name[: -len("weight")] + "weight_scale_inv"
            qb, sb = get("base", name), get("base", sn)
            q, s = reference_fp8(i, get("instruct", sn), qb.float() * block_scales(qb, sb), get("tuned", name))
            same = torch.equal(got.view(torch.uint8), q.view(torch.uint8)) and torch.equal(get("out", sn), s)
        else:
            want = (i.float() + (get("tuned", name).float() - get("base", name).float())).to(i.dtype)
            same = torch.equal(got.view(torch.int16), want.view(torch.int16))
        if not same:
            bad.append(name)
    return (not bad, "yes" if not bad else f"no: {len(bad)} tensors differ ({bad[0]})")


def floor_rows(trio: dict, work: Path) -> list[Row]:
    cats = " & ".join(f"cat {shlex.quote(trio[r]['dir'])}/*.safetensors > /dev/null" for r in ROLES)
    mib = math.ceil(trio["instruct"]["bytes"] / 2**20)
    target = shlex.quote(str(work / "floor" / "out.bin"))
    dd = f"dd if=/dev/zero of={target} bs=1M count={mib} conv=fdatasync status=none"
    return [
        Row("floor", "I/O floor: read B+T+I (3 concurrent cat)", ["sh", "-c", cats + " & wait"], floor=True),
        Row("floor", "I/O floor: write output (dd, fdatasync)", ["sh", "-c", dd], out=work / "floor", floor=True),
        Row(
            "floor",
            "I/O floor, overlapped: the 3 cats and the dd at once",
            ["sh", "-c", f"{cats} & {dd} & wait"],
            out=work / "floor",
            floor=True,
        ),
    ]


def user_flow(trio: dict, work: Path) -> list[list[str]]:
    """The users' way, stage by stage, cold: [stage, seconds, peak RssAnon, bytes read, bytes written]."""
    script = str(Path(__file__).resolve().parent / "fp8_user_flow.py")
    deq = {r: work / f"user-{r}-bf16" for r in ("base", "instruct")}
    merged, final = work / "user-merged-bf16", work / "user-fp8"
    stages = [
        (
            "dequantize Base to bf16",
            [sys.executable, script, "dequantize", trio["base"]["dir"], str(deq["base"])],
            [trio["base"]["dir"]],
            deq["base"],
        ),
        (
            "dequantize Instruct to bf16",
            [sys.executable, script, "dequantize", trio["instruct"]["dir"], str(deq["instruct"])],
            [trio["instruct"]["dir"]],
            deq["instruct"],
        ),
        (
            "graftcore merge of the bf16 trio",
            [
                *graftcore_cmd(),
                "merge",
                "--base",
                str(deq["base"]),
                "--tuned",
                trio["tuned"]["dir"],
                "--instruct",
                str(deq["instruct"]),
                "--output",
                str(merged),
                "--quiet",
                "--device",
                "cpu",
            ],
            [deq["base"], trio["tuned"]["dir"], deq["instruct"]],
            merged,
        ),
        (
            "quantize again (amax / 448)",
            [sys.executable, script, "quantize", str(merged), str(final), trio["instruct"]["dir"]],
            [merged],
            final,
        ),
    ]
    rows, total = [], [0.0, 0, 0]
    for name, cmd, reads, out in stages:
        shutil.rmtree(out, ignore_errors=True)
        evict([p for folder in reads for p in files_of(folder)])
        run = measure(cmd)
        if run.rc != 0:
            log(f"{name}: exit {run.rc}\n{run.tail}")
            return rows + [[name, "failed", "", "", ""]]
        read, written = sum(folder_bytes(f) for f in reads), folder_bytes(out)
        rows.append([name, f"{run.seconds:.1f}", gb(run.peak_anon), gb(read), gb(written)])
        total = [total[0] + run.seconds, total[1] + read, total[2] + written]
        log(f"user flow: {name}: {run.seconds:.1f} s")
    rows.append(["**total**", f"{total[0]:.1f}", "", gb(total[1]), gb(total[2])])
    for folder in [*deq.values(), merged, final]:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


COLD_COLUMNS = ["method", "wall s min", "wall s median", "x overlapped floor", "x sequential floor", "peak RssAnon"]


def cold_lines(rows: list[Row], results: dict, checks: dict) -> list[list[str]]:
    """The table's rows: floor_rows' three first, then the sequential floor (read, then write), then the merges
    with their ratios to the overlapped and the sequential floor of this run (median + the output's fsync)."""
    read, write, overlapped = (results[r.name] for r in rows[:3])
    sequential = read.median + write.median_to_disk
    lines = []
    for r in rows:
        s = results[r.name]
        if not s.runs:
            lines.append([r.name, "failed", "", "", "", "", ""])
            continue
        vs = "" if r.floor else f"{s.median_to_disk / overlapped.median:.2f}"
        vs_seq = "" if r.floor else f"{s.median_to_disk / sequential:.2f}"
        lines.append([r.name, f"{s.min:.2f}", f"{s.median:.2f}", vs, vs_seq, gb(s.peak_anon), checks.get(r.name, "")])
        if r is rows[1]:
            lines.append(["**I/O floor, sequential: read, then write**", "", f"{sequential:.2f}", "", "1.00", "", ""])
        if r is rows[2]:
            lines[-1][3] = "1.00"
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="dsv3-26gb", choices=PRESETS)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-user-flow", action="store_true", help="skip the users' way (it moves ~4x the bytes)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--before", metavar="VENV", help="a venv holding an earlier graftcore: adds its row")
    args = ap.parse_args()
    data = DATA / args.preset
    trio = make_trio(data, args.preset)
    work = data / "runs"
    work.mkdir(parents=True, exist_ok=True)
    out = work / "graftcore"
    merge = [
        *graftcore_cmd(),
        "merge",
        *(x for r in ROLES for x in (f"--{r}", trio[r]["dir"])),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--quiet",
        "--overwrite",
    ]
    rows = [
        *floor_rows(trio, work),
        Row("graftcore", "graftcore (--device cpu)", merge, out, lambda o: check_fp8(o, trio)),
    ]
    if args.before:  # an earlier graftcore (VENV/bin/graftcore), the same merge: before/after in one run
        exe = str(Path(args.before).resolve() / "bin" / "graftcore")
        before = work / "graftcore-before"
        cmd = [exe, *merge[len(graftcore_cmd()) :]]
        cmd[cmd.index(str(out))] = str(before)
        rows.append(
            Row("before", f"graftcore before (--device cpu, {args.before})", cmd, before, lambda o: check_fp8(o, trio))
        )
    inputs = [p for r in ROLES for p in files_of(trio[r]["dir"])]
    checks: dict[str, str] = {}
    log(
        f"{args.preset}: "
        + ", ".join(f"{r} {gb(trio[r]['bytes'])}" for r in ROLES)
        + f"; {len(rows)} rows x {args.reps} reps, cold"
    )
    t0 = time.perf_counter()
    results = run_interleaved(rows, args.reps, "cold", lambda row, series: run_row(row, True, inputs, series, checks))
    lines = cold_lines(rows, results, checks)
    body = (
        f"Trio `{args.preset}` (DeepSeek-V3 shapes, {PRESETS[args.preset]}): Base {gb(trio['base']['bytes'])} FP8, "
        f"tuned {gb(trio['tuned']['bytes'])} bf16, Instruct {gb(trio['instruct']['bytes'])} FP8; output FP8. "
        f"Cold, {args.reps} reps per row, order rotated every rep. Ratios divide the median wall time (+ the "
        "output's fsync after exit) by the overlapped floor and by the sequential one, both from this run.\n\n"
        + table(COLD_COLUMNS + ["bit-identical to the plain reference"], lines)
    )
    if not args.no_user_flow:
        flow = user_flow(trio, work)
        g = results["graftcore (--device cpu)"]
        moved = sum(trio[r]["bytes"] for r in ROLES) + trio["instruct"]["bytes"]
        body += (
            "\n\nThe users' way today, on the same trio (each stage cold, once), beside graftcore's one pass "
            f"({statistics.median(x.seconds for x in g.runs):.1f} s median, {gb(moved)} moved):\n\n"
            + table(["stage", "wall s", "peak RssAnon", "read", "written"], flow)
        )
    print(body)
    log(f"bench_fp8: {time.perf_counter() - t0:.0f} s")
    if not args.no_record:
        append_results(f"bench_fp8 {args.preset}", body, data, {r.name: r.cmd for r in rows})


if __name__ == "__main__":
    main()
