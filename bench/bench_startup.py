"""Start-up time: what `graftcore --version` and `graftcore merge --help` cost before any work.

    python bench/bench_startup.py [--reps 5]

Neither command imports torch (graftcore.cli loads it only once a merge starts), so both should cost about
what the interpreter itself does. Each command runs `--reps` times in its own process, after one untimed run
that warms the page cache; `python -c pass` (the interpreter alone) and `python -c 'import torch'` (what a
merge adds) are timed the same way for scale. The table gives min and median wall seconds and peak RSS; a
section goes to RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Series, append_results, gb, log, measure, short, table  # noqa: E402

GRAFTCORE = str(Path(sys.executable).with_name("graftcore"))
COMMANDS = {
    "graftcore --version": [GRAFTCORE, "--version"],
    "graftcore merge --help": [GRAFTCORE, "merge", "--help"],
    "python -m graftcore --version": [sys.executable, "-m", "graftcore", "--version"],
    "python -c pass (interpreter alone)": [sys.executable, "-c", "pass"],
    "python -c 'import torch' (what a merge adds)": [sys.executable, "-c", "import torch"],
}


def time_command(cmd: list[str], reps: int) -> Series | None:
    """One untimed warm-up run, then `reps` measured ones; None if the command fails."""
    series = Series()
    for k in range(reps + 1):
        run = measure(cmd)
        if run.rc != 0:
            log(f"{short(cmd[0])} failed ({run.rc}): {run.tail}")
            return None
        if k:
            series.add(run)
    return series


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    rows = []
    for name, cmd in COMMANDS.items():
        log(f"{name} x {args.reps}")
        s = time_command(cmd, args.reps)
        rows.append(
            [name, "failed", "", ""] if s is None else [name, f"{s.min:.3f}", f"{s.median:.3f}", gb(s.peak_rss)]
        )
    body = f"{args.reps} runs per command after one untimed warm-up run; wall time from fork to reap.\n\n" + table(
        ["command", "wall s min", "wall s median", "peak RSS"], rows
    )
    print(body)
    if not args.no_record:
        append_results("bench_startup", body, commands=COMMANDS)


if __name__ == "__main__":
    main()
