"""Helpers shared by the benchmark scripts: measured runs, page-cache control, machine facts, results.

- `measure(cmd)` runs a command as its own process and samples the peak RssAnon / VmRSS of its whole
  process tree from /proc every ~5 ms (VmRSS also from the kernel's own high-water mark via wait4).
- `evict(files)` drops just those files from the page cache (fsync, then POSIX_FADV_DONTNEED);
  `prewarm(files)` reads them once. Nothing here drops the whole machine's caches.
- `check_output(out, base, tuned, instruct)` streams an output folder against the float32 reference
  `round(I + (T - B))`, tensor by tensor, in bounded memory; call it outside the timed region.
- `machine()`, `versions()`, `git_commit()`, `append_results()` describe and record a run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = BENCH / "data"
RESULTS = BENCH / "RESULTS.md"
MERGEKIT_VENV = BENCH / ".venv-mergekit"


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- measured runs


@dataclass
class Run:
    """One measured process: wall seconds, peaks in bytes, exit code, the tail of its output."""

    seconds: float
    peak_anon: int
    peak_rss: int
    rc: int
    tail: str = ""


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (through /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:  # exited meanwhile
            pass
    return out


def _status_kb(pid: int) -> dict[str, int]:
    """RssAnon, VmRSS and VmHWM of one process in kB; empty once it is gone."""
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("RssAnon", "VmRSS", "VmHWM"):
                    vals[key] = int(line.split()[1])
    except OSError:
        pass
    return vals


def measure(cmd: list[str], interval: float = 0.005, env: dict | None = None, cwd: str | Path | None = None) -> Run:
    """Run `cmd`, sampling the process tree's summed RssAnon and VmRSS every `interval` seconds.

    The wall time runs from just before the fork to the moment wait4 reaps the process. The peak RSS
    is the larger of the sampled sum and the main process's own high-water mark (VmHWM, exact).
    RssAnon has no high-water mark in the kernel, so a spike shorter than `interval` can be missed.
    (wait4's ru_maxrss is not used: it counts the parent's pages the child had before its exec.)
    """
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)  # returns after exec
        peak_anon = peak_rss = 0
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                seconds = time.perf_counter() - t0
                break
            anon = rss = hwm = 0
            for p in _tree(proc.pid):
                v = _status_kb(p)
                anon, rss = anon + v.get("RssAnon", 0), rss + v.get("VmRSS", 0)
                hwm = v.get("VmHWM", 0) if p == proc.pid else hwm
            peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss, hwm)
            time.sleep(interval)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        tail = out.read()[-3000:].decode(errors="replace")
    return Run(seconds, peak_anon * 1024, peak_rss * 1024, proc.returncode, tail)


@dataclass
class Series:
    """Repeated runs of one row."""

    runs: list[Run] = field(default_factory=list)
    flush: list[float] = field(default_factory=list)  # seconds to fsync the output after the process ended

    def add(self, run: Run, flush: float = 0.0) -> None:
        self.runs.append(run)
        self.flush.append(flush)

    @property
    def min(self) -> float:
        return min(r.seconds for r in self.runs)

    @property
    def median(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def median_to_disk(self) -> float:
        return statistics.median(r.seconds + f for r, f in zip(self.runs, self.flush))

    @property
    def peak_anon(self) -> int:
        return max(r.peak_anon for r in self.runs)

    @property
    def peak_rss(self) -> int:
        return max(r.peak_rss for r in self.runs)


# ---------------------------------------------------------------- page cache


def files_under(*folders: str | Path, pattern: str = "*") -> list[Path]:
    """Regular files below the folders, sorted (the shards, with pattern '*.safetensors')."""
    return sorted(p for d in folders for p in Path(d).rglob(pattern) if p.is_file())


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache: fsync first (dirty pages are not dropped), then DONTNEED."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prewarm(paths: list[Path], block: int = 8 << 20) -> None:
    """Read each file once so it sits in the page cache."""
    buf = bytearray(block)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def fsync_files(paths: list[Path]) -> float:
    """fsync every file; return the seconds it took (the write-back a tool left to the kernel)."""
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def cached_fraction(paths: list[Path]) -> float:
    """Fraction of these files' pages now in the page cache (mincore over a mapping), for sanity checks."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    total = cached = 0
    for p in paths:
        size = p.stat().st_size
        if not size:
            continue
        pages = -(-size // mmap.PAGESIZE)
        vec = ctypes.create_string_buffer(pages)
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            libc.mincore(addr, size, vec)
            libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += pages
        cached += sum(b & 1 for b in vec.raw)
    return cached / total if total else 1.0


# ---------------------------------------------------------------- machine and versions


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def mount_of(path: str | Path) -> tuple[str, str, str]:
    """(mount point, filesystem type, source device) of the filesystem holding `path`."""
    path = os.path.realpath(path)
    best = ("/", "?", "?")
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        point = left.split()[4].replace("\\040", " ")
        fstype, source = (right.split() + ["?", "?"])[:2]
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, fstype, source)
    return best


def machine(data_dir: str | Path = DATA) -> dict:
    """Cores, RAM, CPU model, kernel, and the disk holding data_dir (device, filesystem, rotational)."""
    cpu = re.search(r"model name\s*:\s*(.*)", _read("/proc/cpuinfo"))
    mem = re.search(r"MemTotal:\s*(\d+)", _read("/proc/meminfo"))
    point, fstype, source = mount_of(data_dir)
    dev = Path(source).name
    disk = re.sub(r"\d+$", "", dev) if not Path(f"/sys/block/{dev}").exists() else dev
    rotational = _read(f"/sys/block/{disk}/queue/rotational").strip()
    model = _read(f"/sys/block/{disk}/device/model").strip()
    out = {
        "cpu": cpu.group(1).strip() if cpu else platform.processor() or "?",
        "cores": os.cpu_count(),
        "ram_gb": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "kernel": platform.release(),
        "disk": f"{source} ({fstype} at {point}{', ' + model if model else ''}"
        f"{', rotational' if rotational == '1' else ', non-rotational' if rotational == '0' else ''})",
    }
    gpu = (
        subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if _which("nvidia-smi")
        else None
    )
    if gpu and gpu.returncode == 0:
        out["gpu"] = gpu.stdout.strip().replace("\n", ", ")
    return out


def _which(name: str) -> str | None:
    from shutil import which

    return which(name)


def versions() -> dict:
    """Versions of Python and the packages the rows use (mergekit from its own venv, when there)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("graftcore", "torch", "safetensors", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    py = MERGEKIT_VENV / "bin" / "python"
    if py.exists():
        r = subprocess.run(
            [str(py), "-c", "from importlib.metadata import version as v; print(v('mergekit'), v('torch'))"],
            capture_output=True,
            text=True,
        )
        if r.returncode == 0:
            mk, torch_v = r.stdout.split()
            out["mergekit"] = f"{mk} (torch {torch_v})"
    return out


def git_commit() -> str:
    """Short commit of the checkout, '+dirty' when tracked files differ from it."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# ---------------------------------------------------------------- results


def gb(n: float) -> str:
    """Bytes for people: '156 MB' below a gigabyte, '2.31 GB' above."""
    return f"{n / 1e6:.0f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def append_results(
    title: str, body: str, data_dir: str | Path = DATA, commands: dict[str, list[str]] | None = None
) -> None:
    """Append a section to bench/RESULTS.md: date, commit, machine, versions, the exact command, body."""
    m, v = machine(data_dir), versions()
    lines = [
        f"## {title}",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- commit: {git_commit()}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GiB RAM, kernel {m['kernel']}"
        + (f", GPU {m['gpu']}" if "gpu" in m else ""),
        f"- disk: {m['disk']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        body,
        "",
    ]
    if commands:
        lines += ["<details><summary>commands run per row (paths relative to the repository root)</summary>", ""]
        lines += [f"- {name}: `{shlex.join(short(a) for a in cmd)}`" for name, cmd in commands.items()]
        lines += ["", "</details>", ""]
    with open(RESULTS, "a") as f:
        f.write("\n".join(lines) + "\n")
    log(f"appended to {RESULTS}")


def short(arg: str) -> str:
    """A command argument for people: `python` for this interpreter, paths inside the repo made relative."""
    if arg == sys.executable:
        return "python"
    if arg == str(Path(sys.executable).with_name("graftcore")):
        return "graftcore"
    return arg.replace(str(ROOT) + "/", "")


# ---------------------------------------------------------------- bit-exactness


def _tensor_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the file holding it, through the index or the single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(p, "pt") as f:
            out.update({n: p for n in f.keys()})
    return out


def check_output(
    out: str | Path,
    base: str | Path,
    tuned: str | Path,
    instruct: str | Path,
    alpha: float = 1.0,
    max_elements: int = 1 << 24,
) -> tuple[bool, str]:
    """Compare every tensor of `out` bit for bit with round(I + alpha * (T - B)) computed in float32.

    Streams: one slice of at most `max_elements` elements of one tensor is in memory at a time.
    Returns (identical, a short note such as 'yes' or '12 of 75 tensors differ, 3.1% of elements').
    """
    import torch
    from safetensors import safe_open

    out_map, maps = _tensor_files(Path(out)), [_tensor_files(Path(d)) for d in (instruct, tuned, base)]
    if set(out_map) != set(maps[0]):
        missing, extra = set(maps[0]) - set(out_map), set(out_map) - set(maps[0])
        return False, f"tensor names differ from Instruct's (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
    handles: dict[Path, object] = {}

    def slicer(path: Path, name: str):
        if path not in handles:
            handles[path] = safe_open(path, "pt")
        return handles[path].get_slice(name)

    bad_tensors = bad_elems = total = 0
    for name in sorted(out_map):
        o = slicer(out_map[name], name)
        i, t, b = (slicer(m[name], name) for m in maps)
        if o.get_shape() != i.get_shape() or o.get_dtype() != i.get_dtype():
            return (
                False,
                f"{name}: {o.get_dtype()}{o.get_shape()} in the output, {i.get_dtype()}{i.get_shape()} in Instruct",
            )
        shape = o.get_shape()
        rows = shape[0] if shape else 1
        per_row = max(1, (max(1, total_of(shape)) // max(rows, 1)))
        step = max(1, max_elements // per_row)
        differs = 0
        for lo in range(0, rows, step):
            sl = slice(lo, min(rows, lo + step))
            got = o[sl] if shape else o[:]
            it, tt, bt = (x[sl] if shape else x[:] for x in (i, t, b))
            if not it.is_floating_point():
                differs += int((got != it).sum())
                continue
            delta = tt.float() - bt.float()
            if alpha != 1.0:
                delta = delta * alpha
            want = (it.float() + delta).to(got.dtype)
            ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
            differs += int((got.view(ints) != want.view(ints)).sum())
        total += total_of(shape)
        if differs:
            bad_tensors += 1
            bad_elems += differs
    if not bad_tensors:
        return True, "yes"
    return (
        False,
        f"no: {bad_tensors} of {len(out_map)} tensors differ, {100 * bad_elems / max(total, 1):.2f}% of elements",
    )


def total_of(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_lora_output(out: str | Path, instruct: str | Path, adapter: str | Path) -> tuple[bool, str]:
    """Compare `out` with round(I + s * B @ A) computed in float32 per LoRA target (s = lora_alpha / r, or
    / sqrt(r) with rsLoRA), and with Instruct's bits elsewhere. The matmul's summation order is the BLAS's,
    so a few elements may differ by one ulp: the note gives the count and the largest difference in ulps.
    """
    import json
    import math

    import torch
    from safetensors import safe_open

    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    r, lora_alpha = config["r"], config["lora_alpha"]
    scale = lora_alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    with safe_open(Path(adapter) / "adapter_model.safetensors", "pt") as h:
        factors = {k: h.get_tensor(k) for k in h.keys()}
    out_map, in_map = _tensor_files(Path(out)), _tensor_files(Path(instruct))
    if set(out_map) != set(in_map):
        return False, "tensor names differ from Instruct's"
    differ = total = worst = 0
    for name in sorted(out_map):
        with safe_open(out_map[name], "pt") as ho, safe_open(in_map[name], "pt") as hi:
            got, i = ho.get_tensor(name), hi.get_tensor(name)
        key = "base_model.model." + name.removesuffix(".weight")
        a, b = factors.get(key + ".lora_A.weight"), factors.get(key + ".lora_B.weight")
        want = i if a is None else (i.float() + scale * (b.float() @ a.float())).to(i.dtype)
        total += got.numel()
        if got.dtype.is_floating_point and got.element_size() == 2:
            ulps = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
            differ += int((ulps > 0).sum())
            worst = max(worst, int(ulps.max()) if ulps.numel() else 0)
        else:
            differ += int((got != want).sum())
    if differ == 0:
        return True, "yes"
    return False, f"{differ / total:.2e} of elements differ, by at most {worst} ulp (float32 matmul order)"


def add_run_options(ap, presets) -> None:
    """The options every end-to-end benchmark takes: the preset, repetitions, and the page cache's state."""
    ap.add_argument("--preset", default="2gb", choices=presets)
    ap.add_argument("--reps", type=int, default=3)
    cache = ap.add_mutually_exclusive_group()
    cache.add_argument(
        "--cold", dest="modes", action="store_const", const=["cold"], help="inputs evicted before each run"
    )
    cache.add_argument("--warm", dest="modes", action="store_const", const=["warm"], help="inputs read before each run")
    cache.add_argument("--both", dest="modes", action="store_const", const=["cold", "warm"], help="(default)")


def run_interleaved(rows: list, reps: int, mode: str, run) -> dict:
    """row name -> Series of `reps` runs of each row, the order rotated by one every rep (so a drift of the
    machine's state spreads over every row alike); a row that fails is not run again. `run(row, series)` runs
    one and returns whether it succeeded.

    Rotated, not reversed: reversing ran the last row twice in a row at every other rep boundary (in two 2gb
    runs, each such second read floor took 3.0-3.7 s beside 6.3-7.6 s for the others: the host below this VM
    may cache what was just read, beyond our eviction). Rotated, no row follows itself (with 3 rows or more;
    2 rows keep one order)."""
    results = {r.name: Series() for r in rows}
    failed: set[str] = set()
    for rep in range(reps):
        shift = rep % len(rows) if len(rows) >= 3 else 0
        for row in rows[shift:] + rows[:shift]:
            if row.name in failed:
                continue
            log(f"{mode} rep {rep + 1}/{reps}: {row.name}")
            if not run(row, results[row.name]):
                failed.add(row.name)
    return results


def cached_trio(folder: Path, spec: dict) -> dict | None:
    """{role: {"dir", "bytes"}} of the trio a generator wrote under `folder` for `spec` (a dict), else None (the
    folder is then cleared and the role folders made)."""
    import shutil

    stamp = folder / "trio.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") == spec:
        return json.loads(stamp.read_text())["roles"]
    shutil.rmtree(folder, ignore_errors=True)
    for role in ("base", "tuned", "instruct"):
        (folder / role).mkdir(parents=True)
    return None


def finish_trio(folder: Path, maps: dict, configs: dict, spec: dict, label: str) -> dict:
    """Each role's index (`maps`: role -> tensor -> shard) and config.json (`configs`), the stamp cached_trio reads;
    returns {role: {"dir", "bytes"}}."""
    out = {}
    for role, weight_map in maps.items():
        d = folder / role
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (d / "config.json").write_text(json.dumps(configs[role], indent=2))
        out[role] = {"dir": str(d), "bytes": sum(p.stat().st_size for p in d.glob("*.safetensors"))}
    (folder / "trio.json").write_text(json.dumps({"spec": spec, "roles": out}))
    log(f"{label}: " + ", ".join(f"{r} {gb(v['bytes'])}" for r, v in out.items()))
    return out
