"""Bandwidth of the fused Triton graft kernel on a CUDA GPU, against a device-to-device copy and eager torch.

For each size (the bytes of one bf16 input tensor, 1 MiB to 1 GiB) and input mix, it times with
`triton.testing.do_bench` (median; L2 flushed before every run):

    kernel   launch_graft(out, I, T, B, counter)           bytes = |I| + |T| + |B| + |out|
    copy     dst.copy_(src) moving the same total bytes     bytes = |src| + |dst|
    eager    (I.float() + (T.float() - B.float())).to(bf16), credited with the kernel's bytes

and prints a markdown table (GB/s = 1e9 bytes/s, % of the copy's bandwidth, speedup over eager), which
it also appends to bench/RESULTS.md with the date, commit, machine, versions and the command.

With --sass (no GPU needed) it compiles the kernel ahead of time for sm_80 and sm_90 instead and counts the
SASS instructions per element on its common path (kernels/aot.py), per output dtype, input mix and number of
deltas: the instruction cost of the NaN/Inf counting and of each extra delta, measured rather than guessed.

Usage:
    python bench/bench_kernel.py            # 1 MiB .. 1 GiB, bf16 and a float32 fine-tune (GPU)
    python bench/bench_kernel.py --quick    # 1, 64, 1024 MiB (GPU)
    python bench/bench_kernel.py --sass     # instructions per element from the compiled SASS (any machine)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
DEVICE = "cuda"
SIZES_MIB = [1, 4, 16, 64, 256, 1024]
QUICK_SIZES_MIB = [1, 64, 1024]
BF16, FP32 = torch.bfloat16, torch.float32
# (name, instruct, tuned, base, out): the common case, and a float32 fine-tune of a bf16 model
MIXES = [("bf16", BF16, BF16, BF16, BF16), ("bf16 + fp32 tuned", BF16, FP32, BF16, BF16)]


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def ram_gib() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return float("nan")


def bench_mix(mix, size_mib: int, do_bench, launch_graft) -> dict:
    name, di, dt, db, do = mix
    n = size_mib * MIB // 2  # elements in one bf16 tensor of size_mib
    g = torch.Generator(device=DEVICE).manual_seed(0)
    base = torch.randn(n, generator=g, device=DEVICE).to(db)
    tuned = (base.float() + 0.01 * torch.randn(n, generator=g, device=DEVICE)).to(dt)
    instruct = (base.float() + 0.01 * torch.randn(n, generator=g, device=DEVICE)).to(di)
    out = torch.empty(n, dtype=do, device=DEVICE)
    counter = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    moved = n * sum(x.element_size() for x in (instruct, tuned, base, out))

    launch_graft(out, instruct, tuned, base, counter)  # first call per mix autotunes (on scratch buffers)
    eager = (instruct.float() + (tuned.float() - base.float())).to(do)
    if bool(counter.any()) or not torch.equal(out.view(torch.int16), eager.view(torch.int16)):
        raise SystemExit(f"kernel and eager torch disagree at {size_mib} MiB, {name}: not benchmarking a wrong kernel")
    del eager

    # the lambdas run inside do_bench, before the `del` below (which is what ruff's F821 sees)
    t_kernel = do_bench(lambda: launch_graft(out, instruct, tuned, base, counter), return_mode="median")  # noqa: F821
    t_eager = do_bench(lambda: (instruct.float() + (tuned.float() - base.float())).to(do), return_mode="median")  # noqa: F821
    del instruct, tuned, base, out
    src = torch.empty(moved // 2, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    t_copy = do_bench(lambda: dst.copy_(src), return_mode="median")  # noqa: F821
    del src, dst
    torch.cuda.empty_cache()

    def gbps(ms):
        return moved / (ms * 1e-3) / 1e9

    return dict(
        mix=name,
        mib=size_mib,
        n=n,
        kernel_ms=t_kernel,
        kernel=gbps(t_kernel),
        copy=gbps(t_copy),
        eager_ms=t_eager,
        eager=gbps(t_eager),
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| mix | size/tensor | elements | kernel ms | kernel GB/s | copy GB/s | % of copy "
        "| eager ms | eager GB/s | vs eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mix']} | {r['mib']} MiB | {r['n']:,} | {r['kernel_ms']:.4f} | {r['kernel']:.0f} | {r['copy']:.0f} "
            f"| {100 * r['kernel'] / r['copy']:.0f}% | {r['eager_ms']:.4f} | {r['eager']:.0f} "
            f"| {r['eager_ms'] / r['kernel_ms']:.1f}x |"
        )
    return "\n".join(lines)


SASS_CASES = [  # (out, (I, B, T1, ...), alphas)
    ("bfloat16", ("bfloat16",) * 3, (1.0,)),
    ("bfloat16", ("bfloat16",) * 3, (0.5,)),
    ("bfloat16", ("bfloat16", "bfloat16", "float32"), (0.5,)),
    ("float16", ("float16",) * 3, (0.5,)),
    ("float32", ("float32",) * 3, (0.5,)),
    ("bfloat16", ("bfloat16",) * 4, (0.5, 0.5)),
    ("bfloat16", ("bfloat16",) * 6, (0.5,) * 4),
]


def sass_report() -> str:
    """Instructions per element on the kernel's common path, compiled for sm_80 and sm_90 (no GPU needed)."""
    import triton

    from graftcore.kernels.aot import compile_graft, sass_per_element

    lines = [
        "| out | I, B, T1.. | alphas | sm_80 instr/elem | sm_90 instr/elem | PTX: fma, .ftz, v4 loads, v4 stores |",
        "|---|---|---|---:|---:|---|",
    ]
    for out, ins, alphas in SASS_CASES:
        counts, ptx = [], ""
        for cap in (80, 90):
            k = compile_graft(cap, out, ins, alphas)
            counts.append(sass_per_element(k))
            ptx = k.asm["ptx"]
        checks = f"{ptx.count('fma')}, {ptx.count('.ftz')}, {ptx.count('ld.global.v4')}, {ptx.count('st.global.v4')}"
        lines.append(
            f"| {out} | {', '.join(ins)} | {', '.join(map(str, alphas))} | {counts[0]:.2f} | {counts[1]:.2f} | "
            f"{checks} |"
        )
    return "\n".join(
        [
            "## Kernel instructions per element (SASS, ahead of time), "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            "",
            f"- command: `{shlex.join(['python', *sys.argv])}`",
            f"- commit: {git_commit()}; triton {triton.__version__}; {platform.platform()}",
            "- compiled by graftcore.kernels.aot as the launcher launches it (BLOCK_SIZE 1024, 4 warps, 16-byte "
            "aligned "
            "pointers, no FMA contraction); counted: SASS instructions up to the EXIT of a block without NaN/Inf "
            "results "
            "(NOPs left out), divided by the 8 elements each thread handles",
            "",
            *lines,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES_MIB} MiB only")
    parser.add_argument("--sass", action="store_true", help="count SASS instructions per element (no GPU needed)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md", help="file to append to")
    parser.add_argument("--no-append", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    if args.sass:
        report = sass_report()
        print(report)
        if not args.no_append:
            with open(args.results, "a") as f:
                f.write("\n" + report)
        return 0

    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0

    import triton
    from triton.testing import do_bench

    from graftcore.kernels import triton_graft

    if triton_graft.INTERPRET:
        print("TRITON_INTERPRET is set: timings would be meaningless; unset it")
        return 2

    sizes = QUICK_SIZES_MIB if args.quick else SIZES_MIB
    rows = []
    for mix in MIXES:
        for size in sizes:
            rows.append(bench_mix(mix, size, do_bench, triton_graft.launch_graft))
            r = rows[-1]
            print(
                f"{r['mix']:>18} {size:>5} MiB: kernel {r['kernel']:6.0f} GB/s, copy {r['copy']:6.0f} GB/s, "
                f"eager {r['eager']:6.0f} GB/s",
                file=sys.stderr,
            )

    # Triton keys its tuning cache by the dtypes of the tensor arguments (bf16 travels as int16)
    picked = [
        f"{'/'.join(k.replace('torch.', '') for k in key)}: {cfg}"
        for key, cfg in triton_graft._autotuned_kernel.cache.items()
    ]
    props = torch.cuda.get_device_properties(0)
    report = "\n".join(
        [
            f"## Kernel bandwidth, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            "",
            f"- command: `{shlex.join(['python', *sys.argv])}`",
            f"- commit: {git_commit()}",
            f"- machine: {props.name} ({props.total_memory / (1 << 30):.0f} GiB), {os.cpu_count()} CPUs, "
            f"{ram_gib():.0f} GiB RAM, {platform.platform()}",
            f"- versions: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
            f"Python {platform.python_version()}",
            f"- autotune picked (out/I/T/B/counter dtypes as passed): {'; '.join(picked)}",
            "- GB/s = 1e9 bytes/s over 3 reads + 1 write; copy moves the same bytes; medians of do_bench, L2 flushed",
            "",
            table(rows),
            "",
        ]
    )
    print(report)
    if not args.no_append:
        new = not args.results.exists()
        with open(args.results, "a") as f:
            if new:
                f.write("# Benchmark results\n\nAppended by the scripts in bench/; newest last.\n\n")
            f.write(report + "\n")
        print(f"appended to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
