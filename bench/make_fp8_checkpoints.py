"""FP8 trios with DeepSeek-V3's real shapes: Base and Instruct in block FP8 (F32 scales, 128x128 blocks, as
deepseek-ai/DeepSeek-V3 ships them), tuned in bf16 (a fine-tune of the dequantized Base, as users make it).

    python bench/make_fp8_checkpoints.py --preset dsv3-26gb
    python bench/make_fp8_checkpoints.py --preset tiny --out fp8-demo     # ~60 MB in seconds: to try FP8 merges

Shapes (DeepSeek-V3's config.json: hidden 7168, q_lora_rank 1536, kv_lora_rank 512, 128 heads of
qk_nope 128 + qk_rope 64 and v 128, moe_intermediate 2048, intermediate 18432, vocab 129280); layers and routed
experts cut (first_k_dense_replace layers dense) so that the trio fits the disk. Quantized as the model's files
are: every linear weight of a layer but the router, one scale per 128x128 block (edge blocks partial:
kv_a_proj_with_mqa is [576, 7168], so its grid is [5, 56]), s = amax / 448 (DeepSeek-V3 inference/kernel.py
weight_quant). Embeddings, lm_head, norms and the router stay bf16, e_score_correction_bias F32.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, cached_trio, finish_trio, log  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from graftcore.io.safetensors_file import ShardWriter  # noqa: E402

BLOCK = 128


@dataclass(frozen=True)
class Spec:
    layers: int
    dense_layers: int
    experts: int
    vocab: int = 129280
    hidden: int = 7168
    q_lora: int = 1536
    kv_lora: int = 512
    heads: int = 128
    intermediate: int = 18432
    moe_intermediate: int = 2048


PRESETS = {
    # 26.5 GB of inputs (Base 7.6, Instruct 7.6, tuned 11.3): more than the 23.5 GiB of the bench machine
    "dsv3-26gb": Spec(layers=3, dense_layers=1, experts=32),
    "dsv3-small": Spec(layers=2, dense_layers=1, experts=2, vocab=8192),  # 4.3 GB of inputs: profiling
    # DeepSeek-V3's layout and 128x128 blocks at small widths (kv_a_proj_with_mqa [192, 1024]: a partial block row)
    "tiny": Spec(
        layers=2,
        dense_layers=1,
        experts=2,
        vocab=1024,
        hidden=1024,
        q_lora=256,
        kv_lora=128,
        heads=4,
        intermediate=2048,
        moe_intermediate=512,
    ),
}


def layer_tensors(spec: Spec, k: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, quantized) of layer k, in DeepSeek-V3's names."""
    h, p = spec.hidden, f"model.layers.{k}"
    qk = 128 + 64
    out = [
        (f"{p}.input_layernorm.weight", (h,), False),
        (f"{p}.post_attention_layernorm.weight", (h,), False),
        (f"{p}.self_attn.q_a_proj.weight", (spec.q_lora, h), True),
        (f"{p}.self_attn.q_a_layernorm.weight", (spec.q_lora,), False),
        (f"{p}.self_attn.q_b_proj.weight", (spec.heads * qk, spec.q_lora), True),
        (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (spec.kv_lora + 64, h), True),
        (f"{p}.self_attn.kv_a_layernorm.weight", (spec.kv_lora,), False),
        (f"{p}.self_attn.kv_b_proj.weight", (spec.heads * 256, spec.kv_lora), True),
        (f"{p}.self_attn.o_proj.weight", (h, spec.heads * 128), True),
    ]
    if k < spec.dense_layers:
        i = spec.intermediate
        return out + [
            (f"{p}.mlp.gate_proj.weight", (i, h), True),
            (f"{p}.mlp.up_proj.weight", (i, h), True),
            (f"{p}.mlp.down_proj.weight", (h, i), True),
        ]
    i = spec.moe_intermediate
    out += [
        (f"{p}.mlp.gate.weight", (spec.experts, h), False),
        (f"{p}.mlp.gate.e_score_correction_bias", (spec.experts,), False),
    ]
    for e in [*(f"experts.{j}" for j in range(spec.experts)), "shared_experts"]:
        out += [
            (f"{p}.mlp.{e}.gate_proj.weight", (i, h), True),
            (f"{p}.mlp.{e}.up_proj.weight", (i, h), True),
            (f"{p}.mlp.{e}.down_proj.weight", (h, i), True),
        ]
    return out


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, F32 scale grid): s = amax / 448 per 128x128 block (1 for an all-zero block)."""
    rows, cols = w.shape
    gr, gc = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = torch.nn.functional.pad(w, (0, gc * BLOCK - cols, 0, gr * BLOCK - rows))
    amax = padded.abs().view(gr, BLOCK, gc, BLOCK).amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    full = s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return (w / full).clamp_(-448, 448).to(torch.float8_e4m3fn), s


def dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    return q.float() * s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]


def config(spec: Spec, quantized: bool) -> dict:
    doc = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "moe_intermediate_size": spec.moe_intermediate,
        "num_hidden_layers": spec.layers,
        "first_k_dense_replace": spec.dense_layers,
        "n_routed_experts": spec.experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": min(8, spec.experts),
        "n_group": 1,  # DeepseekV3Config's default of 8 groups needs at least 8 routed experts to run
        "topk_group": 1,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.heads,
        "q_lora_rank": spec.q_lora,
        "kv_lora_rank": spec.kv_lora,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "vocab_size": spec.vocab,
        "torch_dtype": "bfloat16",
    }
    if quantized:
        doc["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [BLOCK, BLOCK],
        }
    return doc


def make_trio(folder: Path, preset: str) -> dict:
    """Write the trio under `folder` (base, instruct: FP8; tuned: bf16), one shard per layer plus one for the
    embeddings and head; returns {role: {"dir", "bytes"}}. Skipped when `folder` already holds this preset."""
    spec = PRESETS[preset]
    cached = cached_trio(folder, asdict(spec))
    if cached is not None:
        return cached
    roles = {r: folder / r for r in ("base", "tuned", "instruct")}
    groups = [
        [
            ("model.embed_tokens.weight", (spec.vocab, spec.hidden), False),
            ("model.norm.weight", (spec.hidden,), False),
            ("lm_head.weight", (spec.vocab, spec.hidden), False),
        ]
    ]
    groups += [layer_tensors(spec, k) for k in range(spec.layers)]
    maps = {r: {} for r in roles}
    g = torch.Generator().manual_seed(0)
    for j, group in enumerate(groups):
        fname = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {r: {} for r in roles}
        for name, shape, quantized in group:
            w = torch.randn(shape, generator=g).mul_(0.02) if len(shape) == 2 else torch.ones(shape)
            if name.endswith("e_score_correction_bias"):
                for r in roles:
                    tensors[r][name] = torch.zeros(shape)
                continue
            if not quantized:
                noise = torch.randn(shape, generator=g)
                tensors["base"][name] = w.bfloat16()
                tensors["tuned"][name] = (w + 0.001 * noise).bfloat16()
                tensors["instruct"][name] = (w + 0.004 * noise.roll(1, 0)).bfloat16()
                continue
            qb, sb = quantize(w)
            xb = dequantize(qb, sb)
            noise = torch.randn(shape, generator=g)
            tensors["base"][name], tensors["base"][name[:-6] + "weight_scale_inv"] = qb, sb
            tensors["tuned"][name] = (xb + 0.001 * noise).bfloat16()  # a fine-tune of the dequantized Base
            qi, si = quantize(xb + 0.004 * noise.roll(1, 0))
            tensors["instruct"][name], tensors["instruct"][name[:-6] + "weight_scale_inv"] = qi, si
        for r, ts in tensors.items():
            codes = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.bfloat16: "BF16"}
            writer = ShardWriter(
                roles[r] / fname, [(n, codes[t.dtype], tuple(t.shape)) for n, t in ts.items()], {"format": "pt"}
            )
            for t in ts.values():
                writer.append(t.contiguous().view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.contiguous())
            writer.finish()
            maps[r].update({n: fname for n in ts})
        log(f"{preset}: shard {j + 1}/{len(groups)} written")
    configs = {r: config(spec, r != "tuned") for r in roles}
    return finish_trio(folder, maps, configs, asdict(spec), preset)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="dsv3-small", choices=PRESETS)
    ap.add_argument("--out", type=Path, help="folder for base/, tuned/ and instruct/ (default: bench/data/PRESET)")
    args = ap.parse_args()
    make_trio(args.out or DATA / args.preset, args.preset)


if __name__ == "__main__":
    main()
