"""graftcore at several model sizes: time should grow linearly with bytes moved, peak memory stay flat.

    python bench/bench_scaling.py --sizes 250mb,1gb,4gb --reps 3 --both

For each preset, the trio is made by make_checkpoints.py when missing (under bench/data/PRESET), then
the I/O floor (read the three inputs concurrently, write one output-sized file with fdatasync) and
graftcore (`--device cpu`, plus `--device cuda` when torch sees a GPU) run N times each, cold and/or
warm, exactly as in bench_merge.py. A least-squares line `seconds = startup + bytes / rate` is fitted
per series. Writes bench/scaling.png (time and peak RssAnon against bytes moved) and appends the table
and the image link to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import ROLES, Row, floor_rows, graftcore_rows, run_row, shard_files  # noqa: E402
from common import BENCH, DATA, Series, append_results, gb, log, table  # noqa: E402
from make_checkpoints import PRESETS, make_trio  # noqa: E402


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x; returns (a, b). With one point: the line through the origin."""
    if len(xs) < 2:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


Points = dict[str, list[tuple[int, float, int]]]  # "method (cache)" -> [(bytes moved, median seconds, peak RssAnon)]


def plot(points: Points, path: Path, title: str) -> None:
    """Left: median seconds against GB moved (with fitted lines); right: peak RssAnon against GB moved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    top = 0.0
    for label, pts in points.items():
        xs, ts, mem = [p[0] / 1e9 for p in pts], [p[1] for p in pts], [p[2] / 1e6 for p in pts]
        color = "C0" if "(cold)" in label else "C1"  # colour: cache mode; style: floor dashed, cuda squares
        floor = label.startswith("I/O floor")
        style = "x--" if floor else ("s-" if "cuda" in label else "o-")
        ax_t.plot(xs, ts, style, color=color, label=label)
        if not floor:
            ax_m.plot(xs, mem, style, color=color, label=label)
            top = max(top, *mem)
    ax_t.set(xlabel="GB moved (read B+T+I, write output)", ylabel="seconds (median, to disk)", title="time")
    ax_m.set(xlabel="GB moved (read B+T+I, write output)", ylabel="MB", title="peak RssAnon")
    ax_m.set_ylim(0, top * 1.3 or 1)
    ax_t.set_ylim(bottom=0)
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="250mb,1gb,4gb", help="comma-separated presets")
    ap.add_argument("--reps", type=int, default=3)
    cache = ap.add_mutually_exclusive_group()
    cache.add_argument("--cold", dest="modes", action="store_const", const=["cold"])
    cache.add_argument("--warm", dest="modes", action="store_const", const=["warm"])
    cache.add_argument("--both", dest="modes", action="store_const", const=["cold", "warm"], help="(default)")
    ap.add_argument("--no-floor", action="store_true", help="skip the I/O floor rows")
    ap.add_argument("--check", action="store_true", help="also check each output bit for bit (slow at large sizes)")
    ap.add_argument("--plot", default=str(BENCH / "scaling.png"), help="where to write the figure")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()
    modes = args.modes or ["cold", "warm"]
    sizes = args.sizes.split(",")
    for s in sizes:
        if s not in PRESETS:
            sys.exit(f"bench_scaling: unknown preset {s!r} (choose from {', '.join(PRESETS)})")

    points: Points = {}
    lines, checks = [], {}
    for size in sizes:
        trio = make_trio(DATA / size, PRESETS[size], log=log)
        work = DATA / size / "runs"
        work.mkdir(parents=True, exist_ok=True)
        rows: list[Row] = graftcore_rows(trio, work)
        if not args.no_floor:
            rows = [r for r in floor_rows(trio, work) if "read" in r.name or "write" in r.name] + rows
        for r in rows:
            r.check = r.check if args.check else None
        inputs = [p for role in ROLES for p in shard_files(trio, role)]
        moved = sum(trio["roles"][r]["bytes"] for r in ROLES) + trio["roles"]["instruct"]["bytes"]
        for mode in modes:
            results = {r.name: Series() for r in rows}
            for rep in range(args.reps):
                for row in rows if rep % 2 == 0 else rows[::-1]:
                    log(f"{size} {mode} rep {rep + 1}/{args.reps}: {row.name}")
                    run_row(row, mode == "cold", inputs, results[row.name], checks)
            done = {n: s for n, s in results.items() if s.runs}
            floor = [done[r.name].median_to_disk for r in rows if r.floor and r.name in done]
            floor_s = sum(floor) if len(floor) == 2 else None  # read + write
            if floor_s:
                points.setdefault(f"I/O floor ({mode})", []).append((moved, floor_s, 0))
            for r in rows:
                s = done.get(r.name)
                if r.floor or s is None:
                    continue
                points.setdefault(f"{r.name} ({mode})", []).append((moved, s.median_to_disk, s.peak_anon))
                lines.append(
                    [
                        size,
                        gb(moved),
                        mode,
                        r.name,
                        f"{s.min:.2f}",
                        f"{s.median:.2f}",
                        f"{moved / 1e9 / s.median_to_disk:.2f}",
                        f"{s.median_to_disk / floor_s:.2f}" if floor_s else "",
                        gb(s.peak_anon),
                        gb(s.peak_rss),
                        checks.get(r.name, "") if args.check else "",
                    ]
                )

    header = [
        "preset",
        "moved",
        "cache",
        "method",
        "wall s min",
        "wall s median",
        "GB/s moved",
        "x floor",
        "peak RssAnon",
        "peak RSS",
        "bit-identical",
    ]
    fits = []
    for label, pts in points.items():
        if len(pts) >= 2:
            a, b = fit_line([p[0] for p in pts], [p[1] for p in pts])
            fits.append(f"- {label}: seconds = {a:.2f} + bytes moved / ({1 / b / 1e9:.2f} GB/s)")
    plot(points, Path(args.plot), f"graftcore scaling, {', '.join(sizes)}, {args.reps} reps")
    body = (
        "`moved` = bytes read (Base + tuned + Instruct) + bytes written (output). Times are medians to disk "
        "(wall + fsync of the output afterwards). Least-squares fits:\n\n"
        + "\n".join(fits)
        + "\n\n"
        + table(header, lines)
        + f"\n\n![scaling]({Path(args.plot).name})"
    )
    print(body)
    if not args.no_record:
        append_results(f"bench_scaling {args.sizes}", body, DATA)


if __name__ == "__main__":
    main()
