"""Cost per tensor: planning and bookkeeping of a trio with very many small tensors (an MoE-like layout).

    python bench/bench_many_tensors.py --tensors 100000

A DeepSeek-V3-class MoE has ~90k tensors; what graftcore does per tensor (parse, match, plan, one step, the
writer's bookkeeping) must stay small beside the bytes. Writes a Base / tuned / Instruct trio of N tensors
(expert-sized groups: 64x64, 64, 4096-element matrices; ~4 shards per checkpoint, other shard splits per role),
then times, each in its own process with peak RssAnon sampled:

- `import`: `python -c 'import torch, graftcore.api'`, the fixed start-up every run pays;
- `--dry-run`: resolve, read every header, plan (the work done before any byte moves);
- `merge`: the whole merge.

The table gives seconds and the cost per tensor above start-up (µs and KB per tensor); a row goes to RESULTS.md.

With `--fp8` the trio is DeepSeek-V3's kind: Base and Instruct hold N tensors in all, half of them FP8 weights
[64, 64] and half their F32 `weight_scale_inv` (one 128x128 block each), with a block-FP8 quantization_config;
tuned holds the N/2 weights in bf16. (`--tensors 91991` is DeepSeek-V3's count, scales included.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import DATA, append_results, gb, log, measure, table  # noqa: E402

from graftcore.io.safetensors_file import ShardWriter  # noqa: E402

SHAPES = [(64, 64), (64,), (16, 256)]  # cycled: 4096-, 64- and 4096-element tensors


FP8_CONFIG = {
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
}


def make_fp8_trio(folder: Path, n: int) -> None:
    """N tensors in Base and Instruct (N/2 FP8 weights [64, 64] and their scales), N/2 bf16 weights in tuned."""
    stamp = folder / "trio.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("tensors") == n:
        log(f"{folder}: already holds a {n}-tensor FP8 trio")
        return
    shutil.rmtree(folder, ignore_errors=True)
    names = [
        f"model.layers.{k // 768}.mlp.experts.{(k // 3) % 256}.{('gate', 'up', 'down')[k % 3]}_proj.weight"
        for k in range(n // 2)
    ]
    for role, per_shard, seed in (("base", n // 8 + 1, 1), ("tuned", n // 6 + 1, 2), ("instruct", n // 10 + 1, 3)):
        out = folder / role
        out.mkdir(parents=True)
        g = torch.Generator().manual_seed(seed)
        groups = [names[k : k + per_shard] for k in range(0, len(names), per_shard)]
        files = [f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors" for j in range(len(groups))]
        weight_map = {}
        for group, fname in zip(groups, files):
            if role == "tuned":
                entries = [(name, "BF16", (64, 64)) for name in group]
            else:
                entries = [
                    e
                    for name in group
                    for e in ((name, "F8_E4M3", (64, 64)), (name[:-6] + "weight_scale_inv", "F32", (1, 1)))
                ]
            w = ShardWriter(out / fname, entries, {"format": "pt"})
            for _, dtype, _ in entries:
                x = torch.randn(64, 64, generator=g).mul_(0.02)
                if dtype == "BF16":
                    w.append(x.bfloat16())
                elif dtype == "F32":
                    w.append(torch.tensor([[0.02 * 4 / 448]]))
                else:
                    w.append(x.mul_(448 / (0.02 * 4)).clamp_(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
            w.finish()
            weight_map.update({name: fname for name, _, _ in entries})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (out / "config.json").write_text(json.dumps({} if role == "tuned" else FP8_CONFIG))
    stamp.write_text(json.dumps({"tensors": n}))


def make_trio(folder: Path, n: int) -> None:
    """N tensors per checkpoint, bf16; shards of n/4, n/3 and n/5 tensors for base, tuned, instruct."""
    stamp = folder / "trio.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("tensors") == n:
        log(f"{folder}: already holds a {n}-tensor trio")
        return
    shutil.rmtree(folder, ignore_errors=True)
    names = [f"model.layers.{k // 768}.mlp.experts.{(k // 3) % 256}.w{k % 3}" for k in range(n)]
    for role, per_shard, seed in (("base", n // 4 + 1, 1), ("tuned", n // 3 + 1, 2), ("instruct", n // 5 + 1, 3)):
        out = folder / role
        out.mkdir(parents=True)
        g = torch.Generator().manual_seed(seed)
        groups = [names[k : k + per_shard] for k in range(0, n, per_shard)]
        files = [f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors" for j in range(len(groups))]
        weight_map = {}
        for group, fname in zip(groups, files):
            shapes = {name: SHAPES[int(name[-1])] for name in group}  # w0, w1, w2
            w = ShardWriter(out / fname, [(name, "BF16", shapes[name]) for name in group], {"format": "pt"})
            for name in group:
                w.append(torch.randn(shapes[name], generator=g).mul_(0.02).bfloat16())
            w.finish()
            weight_map.update({name: fname for name in group})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (out / "config.json").write_text("{}")
    stamp.write_text(json.dumps({"tensors": n}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=100_000)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--fp8", action="store_true", help="Base and Instruct in block FP8 (weights and scales)")
    args = ap.parse_args()
    folder = DATA / f"many-{args.tensors}{'-fp8' if args.fp8 else ''}"
    (make_fp8_trio if args.fp8 else make_trio)(folder, args.tensors)
    exe = Path(sys.executable).with_name("graftcore")
    roles = [str(folder / r) for r in ("base", "tuned", "instruct")]
    merge = [
        str(exe),
        "merge",
        "--base",
        roles[0],
        "--tuned",
        roles[1],
        "--instruct",
        roles[2],
        "--device",
        "cpu",
        "--quiet",
    ]
    runs = {
        "import torch, graftcore.api": measure([sys.executable, "-c", "import torch, graftcore.api"]),
        "--dry-run (headers + plan)": measure([*merge, "--output", str(folder / "out"), "--dry-run"]),
    }
    shutil.rmtree(folder / "out", ignore_errors=True)
    runs["merge"] = measure([*merge, "--output", str(folder / "out")])
    inputs = sum(p.stat().st_size for r in roles for p in Path(r).glob("*.safetensors"))
    base = runs["import torch, graftcore.api"]
    rows = []
    for name, run in runs.items():
        if run.rc != 0:
            rows.append([name, f"failed ({run.rc})", "", "", ""])
            log(run.tail)
            continue
        extra = name != "import torch, graftcore.api"
        per_us = (run.seconds - base.seconds) / args.tensors * 1e6 if extra else None
        per_kb = (run.peak_anon - base.peak_anon) / args.tensors / 1024 if extra else None
        rows.append(
            [
                name,
                f"{run.seconds:.2f}",
                gb(run.peak_anon),
                f"{per_us:.1f}" if extra else "",
                f"{per_kb:.2f}" if extra else "",
            ]
        )
    kind = "Base and Instruct FP8 (half of them scales), tuned bf16" if args.fp8 else "bf16"
    body = (
        f"{args.tensors} tensors per checkpoint ({kind}, {gb(inputs)} of inputs in all, 4/3/5 shards); cost per "
        f"tensor = (row - import) / tensors.\n\n"
        + table(["run", "wall s", "peak RssAnon", "µs per tensor", "KB per tensor"], rows)
    )
    print(body)
    if not args.no_record:
        title = f"bench_many_tensors {args.tensors}{' --fp8' if args.fp8 else ''}"
        append_results(title, body, folder, {"merge": merge})
    shutil.rmtree(folder / "out", ignore_errors=True)


if __name__ == "__main__":
    main()
