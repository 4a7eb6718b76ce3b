"""Tiny checkpoints for the tests, and the reference formula written plainly."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# ---- trios of checkpoints ----


def write_trio(
    folder: Path,
    tensors: tuple[dict, dict, dict],
    shards=(1, 1, 1),
    config=None,
    config_roles=("instruct",),
    extra_files=None,
) -> tuple[Path, Path, Path]:
    """Base, tuned and Instruct (`tensors` in that order) written as `folder/base`, `/tuned` and `/instruct`, in
    `shards` files each; `config` (config.json) goes to the roles in `config_roles`, `extra_files` to Instruct."""
    return tuple(
        write_checkpoint(
            Path(folder) / role,
            sd,
            k,
            config=config if role in config_roles else None,
            extra_files=extra_files if role == "instruct" else None,
        )
        for role, sd, k in zip(("base", "tuned", "instruct"), tensors, shards)
    )


def llama_tensors(seed: int, dtype=torch.bfloat16, vocab=96, hidden=32, inter=64, layers=2, tied=False, noise=0.0):
    """Llama-shaped random tensors; `noise` perturbs a shared seed-0 set, like a fine-tune of one Base."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for k in range(layers):
        p = f"model.layers.{k}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (hidden // 2, hidden),
                p + "self_attn.v_proj.weight": (hidden // 2, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    base = {
        n: torch.randn(s, generator=g) * (0.02 if len(s) > 1 else 1.0) + (1.0 if len(s) == 1 else 0)
        for n, s in shapes.items()
    }
    g2 = torch.Generator().manual_seed(seed)
    return {n: (v + noise * torch.randn(v.shape, generator=g2)).to(dtype) for n, v in base.items()}


def write_checkpoint(
    folder: Path, tensors: dict, shard_count: int = 1, config: dict | None = None, extra_files=None
) -> Path:
    """Save `tensors` as `shard_count` safetensors files (with an index when > 1) plus optional files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shard_count == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shard_count)
        for k in range(shard_count):
            part = names[k * per : (k + 1) * per]
            fname = f"model-{k + 1:05d}-of-{shard_count:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, folder / fname, metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    return folder


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors folder (through the index when there is one)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    out = {}
    for f in files:
        with safe_open(folder / f, "pt") as h:
            for n in h.keys():
                out[n] = h.get_tensor(n)
    return out


def reference(i: torch.Tensor, t: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, dtype=None) -> torch.Tensor:
    """The contract, plainly: float32 math, one rounding to the output dtype."""
    delta = t.to(torch.float32) - b.to(torch.float32)
    if alpha != 1.0:
        delta = delta * alpha
    return (i.to(torch.float32) + delta).to(dtype or i.dtype)


def reference64(i, t, b, alpha, dtype=None):
    return (i.double() + alpha * (t.double() - b.double())).to(dtype or i.dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def interpreted_kernel_module(name: str = "triton_graft"):
    """A private copy of graftcore.kernels.`name` decorated in Triton's interpreter (runs on CPU tensors).

    Interpreter mode is fixed when `@triton.jit` runs, so the env var is set only around this import and the
    canonical module (sys.modules) stays compiled for GPU tests. Triton's own library is imported first,
    outside interpreter mode: decorated in it, later compiled kernels would find interpreted functions.
    """
    import triton.language  # noqa: F401

    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.find_spec(f"graftcore.kernels.{name}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    assert module.INTERPRET
    return module


# ---- models and adapters made by transformers and PEFT ----

LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    attention_bias=True,
)


def tiny_llama_config(**overrides):
    """A transformers LlamaConfig of LLAMA's tiny sizes, with `overrides`."""
    import transformers

    return transformers.LlamaConfig(**{**LLAMA, **overrides})


def perturbed(model, seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def load_model(folder, cls=None):
    import transformers

    cls = cls or transformers.AutoModelForCausalLM
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def make_adapter(base: Path, out: Path, seed: int = 7, save_embedding_layers="auto", **lora) -> Path:
    """A PEFT adapter trained (here: randomised) on Base: every trainable tensor gets non-zero noise."""
    import peft

    model = peft.get_peft_model(load_model(base), peft.LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))  # DoRA magnitudes near the norms
            elif "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))  # B is zero at init
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=g))  # modules_to_save, trained biases
    model.save_pretrained(out, save_embedding_layers=save_embedding_layers)
    return out


def peft_merge(model_dir: Path, adapter: Path):
    """PEFT's own answer: the adapter loaded onto `model_dir` and merged, float32."""
    import peft

    model = peft.PeftModel.from_pretrained(load_model(model_dir), str(adapter)).merge_and_unload()
    return model, {k: v.detach() for k, v in model.state_dict().items()}


# ---- FP8 checkpoints (block-scaled, as DeepSeek-V3 / Qwen3-FP8 ship them) ----

QWEN3 = dict(  # widths that 32x32 blocks tile with partial edge blocks (48 = 32 + 16, 80 = 64 + 16)
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def tiny_qwen3(seed: int = 0):
    """A tiny Qwen3 built by transformers from QWEN3, in bf16, its weights drawn with `seed`."""
    import transformers

    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3)).to(torch.bfloat16)


E4M3_MAX = 448.0


def quantize_fp8(w: torch.Tensor, block=(128, 128), scale_dtype=torch.float32):
    """(q float8_e4m3fn, scale) of a 2-D weight, as DeepSeek-V3's inference/kernel.py weight_quant and transformers'
    Fp8Quantize write it, block by block in plain loops: s = amax / 448 (1 for an all-zero block), stored in
    `scale_dtype`; q = x / s cast to E4M3 (clamped: a bf16-rounded s may be below amax / 448). Edge blocks are
    partial: the grid is [ceil(rows / bh), ceil(cols / bw)]."""
    rows, cols = w.shape
    bh, bw = block
    grid = (-(-rows // bh), -(-cols // bw))
    scale = torch.empty(grid, dtype=scale_dtype)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            x = w[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw].float()
            amax = x.abs().max()
            s = (amax / E4M3_MAX if amax > 0 else torch.tensor(1.0)).to(scale_dtype)
            scale[i, j] = s
            q[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw] = (x / s.float()).clamp(-E4M3_MAX, E4M3_MAX).to(q.dtype)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """float32 value of every element: float32(q) * the scale of its block, written element-wise by index."""
    rows, cols = q.shape
    r = torch.arange(rows).view(-1, 1) // block[0]
    c = torch.arange(cols).view(1, -1) // block[1]
    return q.float() * scale.float()[r, c]


def is_quantized(name: str, t: torch.Tensor) -> bool:
    """What the FP8 checkpoints quantize: the 2-D linear weights of the layers; not embeddings, norms, the head or
    the router (`mlp.gate.weight`), as DeepSeek-V3's files leave them."""
    return t.dim() == 2 and ".layers." in name and name.endswith(".weight") and "_proj" in name.split(".")[-2]


def fp8_state_dict(sd: dict, block=(128, 128), scale_dtype=torch.float32) -> dict:
    """`sd` with every weight is_quantized selects as FP8 plus its NAME.weight_scale_inv."""
    out = {}
    for n, t in sd.items():
        if is_quantized(n, t):
            q, s = quantize_fp8(t, block, scale_dtype)
            out[n], out[n[: -len("weight")] + "weight_scale_inv"] = q, s
        else:
            out[n] = t
    return out


def fp8_config(config: dict, block=(128, 128)) -> dict:
    """A model's config.json with the quantization_config DeepSeek-V3's carries."""
    return {
        **config,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(block),
        },
    }


def write_fp8_checkpoint(folder: Path, sd: dict, config: dict, block=(128, 128), scale_dtype=torch.float32, shards=1):
    """An FP8 checkpoint of the bf16 state dict `sd`; with shards=2 every scale lies in the other shard than its
    weight (DeepSeek-V3's index maps some scales so), through the index."""
    tensors = fp8_state_dict(sd, block, scale_dtype)
    folder = Path(folder)
    if shards == 1:
        return write_checkpoint(folder, tensors, 1, fp8_config(config, block))
    folder.mkdir(parents=True, exist_ok=True)
    parts = [{n: t for n, t in tensors.items() if not n.endswith("_scale_inv")}]
    parts.append({n: t for n, t in tensors.items() if n.endswith("_scale_inv")})
    weight_map = {}
    for k, part in enumerate(parts):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(fp8_config(config, block)))
    return folder


def requantize_reference(x: torch.Tensor, kept: torch.Tensor, block, scale_dtype=torch.float32):
    """The FP8 encoding rule written plainly, block by block (the project's contract): keep Instruct's scale s if
    every finite |x| / s <= 464, else the smallest s in the scale dtype with max |x| / s <= 448 found by stepping
    up from amax / 448; q = x / s round-to-nearest-even, saturating at 448 (Inf too), NaN as 0x7F. Returns (q uint8
    bytes, scale)."""
    rows, cols = x.shape
    bh, bw = block
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = kept.clone()
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[scale_dtype]
    for i in range(kept.shape[0]):
        for j in range(kept.shape[1]):
            blk = x[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw]
            s = kept[i, j].to(scale_dtype)
            finite = blk[torch.isfinite(blk)]  # NaN and Inf do not count toward the max
            amax = finite.abs().max() if finite.numel() else torch.tensor(0.0)
            if amax / s.float() > 464:
                s = (amax / E4M3_MAX).to(scale_dtype)
                while s.float() < amax / E4M3_MAX or amax / s.float() > E4M3_MAX:
                    s = (s.view(bits) + 1).view(scale_dtype)
            scale[i, j] = s
            y = (blk / s.float()).clamp(-E4M3_MAX, E4M3_MAX)
            q[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw] = e4m3_round(y)
    out = q.view(torch.uint8)
    out[torch.isnan(x)] = 0x7F
    return out, scale


def e4m3_round(y: torch.Tensor) -> torch.Tensor:
    """y (within +-448) to float8_e4m3fn by round-to-nearest-even on the table of all 256 codes, independently of
    torch's cast: the nearest finite code, on a tie the one with an even (last bit 0) code."""
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).float()
    ok = torch.isfinite(values) & ~((codes >= 128) & (values == 0))  # finite codes, +0 once
    values, codes = values[ok], codes[ok]
    order = torch.argsort(values)
    values, codes = values[order], codes[order]
    flat = y.reshape(-1)
    hi = torch.searchsorted(values, flat).clamp(1, len(values) - 1)
    lo = hi - 1
    d_lo, d_hi = flat - values[lo], values[hi] - flat
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(codes[lo] % 2 == 0, lo, hi)))
    out = codes[pick]
    out[(values[pick] == 0) & torch.signbit(flat)] = 0x80  # a negative value that rounds to zero is -0
    return out.view(torch.float8_e4m3fn).view(y.shape)


def module_of(name: str) -> str:
    """The module a parameter belongs to: its name less `.weight`, `.bias` or an expert parameter's `_bias`."""
    return re.sub(r"(\.weight|\.bias|_bias)$", "", name)


def projection_modules(cls, tmp_path) -> set[str]:
    """What --targets projections must select, as modules in the files' names (tmp_path/base, saved from a model of
    `cls`): those whose tensors PEFT's all-linear LoRA changes (Base with random LoRA factors on every module
    "all-linear" resolves to, merged by merge_and_unload and saved by save_pretrained), and the MoE experts'
    tensors, which all-linear leaves out on some families."""
    import peft

    base = cls.from_pretrained(tmp_path / "base", dtype=torch.float32)
    config = peft.LoraConfig(target_modules="all-linear", r=2, lora_alpha=2, init_lora_weights=False)
    merged = peft.get_peft_model(base, config).merge_and_unload()
    merged.save_pretrained(tmp_path / "peft")
    before = {n: t.float() for n, t in load_folder(tmp_path / "base").items()}
    after = load_folder(tmp_path / "peft")
    assert set(after) == set(before)
    changed = {module_of(n) for n, t in after.items() if not torch.equal(t.float(), before[n])}
    # the experts: every parameter the model holds under an `experts` module, changed in memory and saved by
    # save_pretrained, so that the files' names of them (per expert, fused or renamed) come from transformers
    experts = cls.from_pretrained(tmp_path / "base", dtype=torch.float32)
    with torch.no_grad():
        for name, p in experts.named_parameters():
            if ".experts." in f".{name}":
                p.add_(1.0)
    experts.save_pretrained(tmp_path / "experts")
    after = load_folder(tmp_path / "experts")
    return changed | {module_of(n) for n, t in after.items() if not torch.equal(t.float(), before[n])}
