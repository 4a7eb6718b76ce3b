"""What users do today to graft onto an FP8 model, as a plain script (the baseline of bench_fp8.py):

    python bench/fp8_user_flow.py dequantize SRC DST     FP8 -> bf16 copy (as DeepSeek's fp8_cast_bf16.py does)
    python bench/fp8_user_flow.py quantize SRC DST       bf16 -> block FP8, s = amax / 448 per 128x128 block

Between the two, the bf16 copies are merged (bench_fp8.py runs `graftcore merge` on them: the fastest merge
there is). One shard at a time, each tensor whole: the script holds a shard's tensors, as those scripts do.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

BLOCK = 128


def dequantize_folder(src: Path, dst: Path) -> None:
    """Every FP8 weight times its weight_scale_inv (per 128x128 block), written as bf16; scales dropped and the
    config's quantization_config removed (what fp8_cast_bf16.py writes)."""
    dst.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    new_map = {}
    for f in files:
        out = {}
        with safe_open(src / f, "pt") as h:
            for name in h.keys():
                if name.endswith("_scale_inv"):
                    continue
                t = h.get_tensor(name)
                if t.dtype == torch.float8_e4m3fn:
                    scale_name = name[: -len("weight")] + "weight_scale_inv"
                    with safe_open(src / index[scale_name], "pt") as hs:
                        s = hs.get_tensor(scale_name)
                    rows, cols = t.shape
                    full = s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
                    t = (t.float() * full).to(torch.bfloat16)
                out[name] = t
        save_file(out, dst / f, metadata={"format": "pt"})
        new_map.update({n: f for n in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": new_map}))
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def quantize_folder(src: Path, dst: Path, like: Path) -> None:
    """The weights that are FP8 in `like` (the original FP8 model) quantized afresh: s = amax / 448 per block."""
    dst.mkdir(parents=True, exist_ok=True)
    fp8 = set()
    like_index = json.loads((like / "model.safetensors.index.json").read_text())["weight_map"]
    for f in sorted(set(like_index.values())):
        with safe_open(like / f, "pt") as h:
            fp8 |= {n for n in h.keys() if h.get_slice(n).get_dtype() == "F8_E4M3"}
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    new_map = {}
    for f in sorted(set(index.values())):
        out = {}
        with safe_open(src / f, "pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                if name in fp8:
                    w = t.float()
                    rows, cols = w.shape
                    gr, gc = -(-rows // BLOCK), -(-cols // BLOCK)
                    padded = torch.nn.functional.pad(w, (0, gc * BLOCK - cols, 0, gr * BLOCK - rows))
                    amax = padded.abs().view(gr, BLOCK, gc, BLOCK).amax(dim=(1, 3))
                    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
                    full = s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
                    t = (w / full).clamp(-448, 448).to(torch.float8_e4m3fn)
                    out[name[: -len("weight")] + "weight_scale_inv"] = s
                out[name] = t
        save_file(out, dst / f, metadata={"format": "pt"})
        new_map.update({n: f for n in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": new_map}))
    shutil.copy(like / "config.json", dst / "config.json")


if __name__ == "__main__":
    what, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if what == "dequantize":
        dequantize_folder(src, dst)
    else:
        quantize_folder(src, dst, Path(sys.argv[4]))
