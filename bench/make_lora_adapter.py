"""Write a random PEFT LoRA adapter that fits an Instruct folder: the LoRA input of the merge benchmarks.

    python bench/make_lora_adapter.py INSTRUCT_DIR --out DIR [--rank 128] [--lora-alpha 256] [--seed 0] \\
        [--dtype bfloat16]

The targets are the tensors of INSTRUCT_DIR named `*.{q,k,v,o,gate,up,down}_proj.weight` (Llama-like
models), read from the safetensors headers, so the shapes are exact whatever config.json says. The
factors look trained: lora_A ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT initialises it, lora_B ~ N(0, 1e-3)
(PEFT starts B at zero; training moves it a little). The output is what `PeftModel.save_pretrained`
writes: `adapter_config.json` and `adapter_model.safetensors` with `base_model.model.<module>.lora_{A,B}.weight`.
Each tensor's values depend only on (seed, tensor name), and the file is written tensor by tensor, so
memory stays at one factor whatever the model size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import torch

from graftcore.io.safetensors_file import TORCH_TO_CODE, ShardWriter
from graftcore.sources.local import open_checkpoint

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET = re.compile(rf"^(?P<module>.*\.(?P<proj>{'|'.join(PROJECTIONS)}))\.weight$")


def factor(seed: int, name: str, shape: tuple[int, int], kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic from (seed, name) alone, so adding or reordering targets changes no other tensor."""
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little"))
    if kind == "A":
        bound = 1.0 / shape[1] ** 0.5
        return ((torch.rand(shape, generator=g) * 2 - 1) * bound).to(dtype)
    return (torch.randn(shape, generator=g) * 1e-3).to(dtype)


def make_adapter(
    instruct: str,
    out: Path,
    rank: int = 128,
    lora_alpha: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write the adapter into `out`; returns the path of adapter_model.safetensors."""
    ck = open_checkpoint(instruct)
    targets = [
        (m["module"], info.shape)
        for name, info in ck.tensors.items()
        if (m := TARGET.match(name)) and len(info.shape) == 2
    ]
    if not targets:
        raise SystemExit(f"{instruct}: no *_proj.weight tensors ({', '.join(PROJECTIONS)}) to target")
    entries = []
    for module, (rows, cols) in targets:
        prefix = f"base_model.model.{module}."
        entries += [(prefix + "lora_A.weight", (rank, cols), "A"), (prefix + "lora_B.weight", (rows, rank), "B")]
    out.mkdir(parents=True, exist_ok=True)
    code = TORCH_TO_CODE[dtype]
    writer = ShardWriter(out / "adapter_model.safetensors", [(n, code, s) for n, s, _ in entries], {"format": "pt"})
    try:
        for name, shape, kind in entries:
            writer.append(factor(seed, name, shape, kind, dtype))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": 2 * rank
        if lora_alpha is None
        else int(lora_alpha)
        if float(lora_alpha).is_integer()
        else lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m, _ in targets}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out / "adapter_model.safetensors"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "instruct", help="Instruct folder (or .safetensors file) whose *_proj.weight shapes the adapter fits"
    )
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank r (Shadow-FT's default: 128)")
    p.add_argument("--lora-alpha", type=float, default=None, help="lora_alpha (default: 2 * rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    args = p.parse_args(argv)
    path = make_adapter(args.instruct, args.out, args.rank, args.lora_alpha, args.seed, getattr(torch, args.dtype))
    print(f"{path}: {path.stat().st_size / 1e9:.3f} GB, rank {args.rank}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
