"""DeepSeek-V4-Flash-shaped trios in DeepSeek's own files' layout: Base with FP8 experts (as
deepseek-ai/DeepSeek-V4-Flash-Base), Instruct with FP4 routed experts (as deepseek-ai/DeepSeek-V4-Flash), tuned bf16.

Shapes from transformers 5.25's DeepseekV4Config defaults: hidden_size 4096, moe_intermediate_size 2048,
q_lora_rank 1024, 64 heads of head_dim 512, o_groups 8 of o_lora_rank 1024, vocab 129280; cut in layers, routed
experts (and for the small preset the vocabulary). Dense weights: block FP8, 128x128 blocks, F8_E8M0 scales under
`.scale` (`scale_fmt: ue8m0`); routed experts of Instruct: I8 [out, in / 2] (two E2M1 a byte, low nibble first)
with F8_E8M0 [out, in / 32] scales (`expert_dtype: fp4`). Embeddings, head, norms and router in bf16.

    python bench/make_v4_checkpoints.py --preset v4-small --out bench/data/v4-small
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from graftcore.io.safetensors_file import ShardWriter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cached_trio, finish_trio, log  # noqa: E402

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_MID = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


@dataclass(frozen=True)
class Spec:
    layers: int
    experts: int
    vocab: int = 129280
    hidden: int = 4096
    moe_intermediate: int = 2048
    q_lora: int = 1024
    heads: int = 64
    head_dim: int = 512
    o_groups: int = 8
    o_lora: int = 1024


PRESETS = {
    "v4-tiny": Spec(
        layers=1,
        experts=2,
        vocab=1024,
        hidden=512,
        moe_intermediate=256,
        q_lora=128,
        heads=2,
        head_dim=128,
        o_groups=2,
        o_lora=128,
    ),  # fmt: skip
    "v4-small": Spec(layers=1, experts=8, vocab=8192),
    "v4-flash-27gb": Spec(layers=4, experts=64),
}


def layer_tensors(s: Spec, k: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of layer k: kind "fp8" (dense block FP8), "expert" (routed: FP8 in Base, FP4 in
    Instruct) or "bf16"."""
    p = f"layers.{k}."
    out = [
        (p + "attn_norm.weight", (s.hidden,), "bf16"),
        (p + "attn.wq_a.weight", (s.q_lora, s.hidden), "fp8"),
        (p + "attn.wq_b.weight", (s.heads * s.head_dim, s.q_lora), "fp8"),
        (p + "attn.wkv.weight", (s.head_dim, s.hidden), "fp8"),
        (p + "attn.wo_a.weight", (s.o_groups * s.o_lora, s.heads * s.head_dim // s.o_groups), "fp8"),
        (p + "attn.wo_b.weight", (s.hidden, s.o_groups * s.o_lora), "fp8"),
        (p + "ffn_norm.weight", (s.hidden,), "bf16"),
        (p + "ffn.gate.weight", (s.experts, s.hidden), "bf16"),
    ]
    for w, shape in (("w1", (s.moe_intermediate, s.hidden)), ("w2", (s.hidden, s.moe_intermediate)),
                     ("w3", (s.moe_intermediate, s.hidden))):  # fmt: skip
        out.append((p + f"ffn.shared_experts.{w}.weight", shape, "fp8"))
        out += [(p + f"ffn.experts.{e}.{w}.weight", shape, "expert") for e in range(s.experts)]
    return out


def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F8_E4M3, E8M0 scale per 128x128 block): s = 2 ** ceil(log2(amax / 448))."""
    rows, cols = w.shape
    t = w.view(rows // 128, 128, cols // 128, 128)
    amax = t.abs().amax(dim=(1, 3)).clamp(min=1e-30)
    s = torch.exp2(torch.ceil(torch.log2(amax / 448)))
    q = (t / s.view(rows // 128, 1, cols // 128, 1)).clamp(-448, 448).view(rows, cols).to(torch.float8_e4m3fn)
    return q, s.to(torch.float8_e8m0fnu)


def fp8_decode(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    return (q.float().view(rows // 128, 128, cols // 128, 128) * s.float().view(rows // 128, 1, cols // 128, 1)).view(
        rows, cols
    )


def fp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(I8 packed E2M1, E8M0 scale per 32 inputs): s = 2 ** ceil(log2(amax / 6)); nearest value, ties even."""
    rows, cols = w.shape
    g = w.view(rows, cols // 32, 32)
    s = torch.exp2(torch.ceil(torch.log2(g.abs().amax(dim=2).clamp(min=1e-30) / 6)))
    y = (g / s.unsqueeze(2)).view(rows, cols)
    mag = y.abs().clamp(max=6)
    code = torch.bucketize(mag, E2M1_MID)
    tie = torch.isin(mag, E2M1_MID)
    code = torch.where(tie & (code % 2 == 1), code + 1, code) | (torch.signbit(y).long() << 3)
    c = code.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).view(torch.int8), s.to(torch.float8_e8m0fnu)


def fp4_decode(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    u = q.view(torch.uint8)
    codes = torch.stack((u & 0xF, u >> 4), dim=-1).view(u.shape[0], -1).long()
    table = torch.cat([E2M1, -E2M1])
    return table[codes] * s.float().repeat_interleave(32, dim=1)


def config(s: Spec, expert_dtype: str | None) -> dict:
    cfg = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "hidden_size": s.hidden,
        "moe_intermediate_size": s.moe_intermediate,
        "num_hidden_layers": s.layers,
        "n_routed_experts": s.experts,
        "vocab_size": s.vocab,
        "q_lora_rank": s.q_lora,
        "num_attention_heads": s.heads,
        "head_dim": s.head_dim,
        "o_groups": s.o_groups,
        "o_lora_rank": s.o_lora,
        "torch_dtype": "bfloat16",
    }
    if expert_dtype is not None:
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128],
            "expert_dtype": expert_dtype,
        }
    return cfg


CODES = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0", torch.int8: "I8", torch.bfloat16: "BF16"}


def make_trio(folder: Path, preset: str) -> dict:
    """Write the trio (one shard per layer plus one for embeddings and head); {role: {"dir", "bytes"}}. Skipped
    when `folder` already holds this preset."""
    spec = PRESETS[preset]
    cached = cached_trio(folder, asdict(spec))
    if cached is not None:
        return cached
    roles = {r: folder / r for r in ("base", "tuned", "instruct")}
    groups = [[("embed.weight", (spec.vocab, spec.hidden), "bf16"), ("norm.weight", (spec.hidden,), "bf16"),
               ("head.weight", (spec.vocab, spec.hidden), "bf16")]]  # fmt: skip
    groups += [layer_tensors(spec, k) for k in range(spec.layers)]
    maps = {r: {} for r in roles}
    g = torch.Generator().manual_seed(0)
    for j, group in enumerate(groups):
        fname = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        writers = {}
        tensors = {r: [] for r in roles}  # (name, tensor), in order
        for name, shape, kind in group:
            w = torch.randn(shape, generator=g).mul_(0.02) if len(shape) == 2 else torch.ones(shape)
            noise = torch.randn(shape, generator=g) if len(shape) == 2 else torch.zeros(shape)
            if kind == "bf16":
                tensors["base"].append((name, w.bfloat16()))
                tensors["tuned"].append((name, (w + 0.001 * noise).bfloat16()))
                tensors["instruct"].append((name, (w + 0.004 * noise.roll(1, 0)).bfloat16()))
                continue
            qb, sb = fp8_quantize(w)
            xb = fp8_decode(qb, sb)
            tensors["base"] += [(name, qb), (name[: -len("weight")] + "scale", sb)]
            tensors["tuned"].append((name, (xb + 0.001 * noise).bfloat16()))  # a fine-tune of the decoded Base
            quantize = fp4_quantize if kind == "expert" else fp8_quantize
            qi, si = quantize(xb + 0.004 * noise.roll(1, 0))
            tensors["instruct"] += [(name, qi), (name[: -len("weight")] + "scale", si)]
        for r, ts in tensors.items():
            writers[r] = ShardWriter(
                roles[r] / fname, [(n, CODES[t.dtype], tuple(t.shape)) for n, t in ts], {"format": "pt"}
            )
            for _, t in ts:
                writers[r].append(t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous())
            writers[r].finish()
            maps[r].update({n: fname for n, _ in ts})
        log(f"{preset}: shard {j + 1}/{len(groups)} written")
    configs = {r: config(spec, {"base": "fp8", "instruct": "fp4", "tuned": None}[r]) for r in roles}
    return finish_trio(folder, maps, configs, asdict(spec), preset)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="v4-small", choices=PRESETS)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    make_trio(args.out, args.preset)


if __name__ == "__main__":
    main()
