"""The merge users write by hand: load all three checkpoints, compute in float32, save per Instruct shard.

    python bench/naive_merge.py BASE TUNED INSTRUCT OUT

The benchmark's baseline for time and memory (it holds all three models in RAM). Its output is the same
float32 formula as graftcore's, so it is bit-identical to the reference.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def shards(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [p.name for p in sorted(folder.glob("*.safetensors"))]


def load_all(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """shard file -> its tensors, every shard loaded into memory."""
    return {f: load_file(folder / f) for f in shards(folder)}


def main(base: str, tuned: str, instruct: str, out: str) -> None:
    base_p, tuned_p, instruct_p, out_p = map(Path, (base, tuned, instruct, out))
    b, t = ({n: x for sd in load_all(p).values() for n, x in sd.items()} for p in (base_p, tuned_p))
    instruct_shards = load_all(instruct_p)
    out_p.mkdir(parents=True, exist_ok=True)
    for f, i in instruct_shards.items():
        merged = {n: (x.float() + (t[n].float() - b[n].float())).to(x.dtype) for n, x in i.items()}
        save_file(merged, out_p / f, metadata={"format": "pt"})
    for p in instruct_p.iterdir():  # config, tokenizer, index
        if p.is_file() and not p.name.endswith(".safetensors"):
            shutil.copy(p, out_p / p.name)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
