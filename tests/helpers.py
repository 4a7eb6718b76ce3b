"""Tiny checkpoints for the tests, and the reference formula written plainly."""

from __future__ import annotations

import importlib.util
import json
import os
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


def interpreted_kernel_module():
    """A private copy of graftcore.kernels.triton_graft decorated in Triton's interpreter (runs on CPU tensors).

    Interpreter mode is fixed when `@triton.jit` runs, so the env var is set only around this import and the
    canonical module (sys.modules) stays compiled for GPU tests. Triton's own library is imported first,
    outside interpreter mode: decorated in it, later compiled kernels would find interpreted functions.
    """
    import triton.language  # noqa: F401

    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.find_spec("graftcore.kernels.triton_graft")
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
