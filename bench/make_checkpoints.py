"""Write a synthetic Base / tuned / Instruct trio of Llama-shaped checkpoints for the benchmarks.

    python bench/make_checkpoints.py 100mb --out bench/data/100mb     # -> base/ tuned/ instruct/

Values are realistic in scale (projections ~N(0, 0.02), norms ~1); tuned and Instruct are Base plus
independent N(0, noise) perturbations, large enough to change most bf16 elements, as a real fine-tune
does. Every tensor is drawn from its own torch.Generator seeded from (seed, role, name), chunk by chunk,
and appended to a streaming ShardWriter, so an 8 GB trio needs a few hundred MB of RAM, not 8 GB.

The three checkpoints get different shard sizes (by default half, 0.35 and a quarter of the preset's
nominal size: 1 GB / 700 MB / 500 MB for `2gb`), so the three shard layouts differ, as they do for
real Base and Instruct releases. A stamp file DIR/trio.json records what was written; a second run
with the same settings does nothing (unless --force).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from graftcore.io.safetensors_file import ShardWriter  # noqa: E402

GEN_VERSION = 3  # bump when the values written for a given spec change, to invalidate old stamps
CHUNK = 1 << 22  # elements drawn per randn call: 16 MB of float32, what bounds memory per tensor


@dataclass(frozen=True)
class Spec:
    """The shape of a Llama-like model (the fields of transformers' LlamaConfig that set tensor shapes)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False
    nominal: int = 0  # the preset's nominal checkpoint size in bytes; sets the default shard sizes
    qkv_bias: bool = False  # q/k/v projections with biases (Qwen2-style)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


MB, GB = 10**6, 10**9
# name -> Spec; the bf16 size per checkpoint is close to the name (2gb is TinyLlama-1.1B's shape)
PRESETS = {
    "demo": Spec(hidden=256, intermediate=688, layers=4, vocab=4096, heads=4, kv_heads=2, nominal=10 * MB),
    "100mb": Spec(hidden=512, intermediate=1408, layers=8, vocab=32000, heads=8, kv_heads=4, nominal=100 * MB),
    "250mb": Spec(hidden=768, intermediate=2048, layers=12, vocab=32000, heads=12, kv_heads=4, nominal=250 * MB),
    "1gb": Spec(hidden=1536, intermediate=4096, layers=16, vocab=32000, heads=12, kv_heads=4, nominal=1 * GB),
    "2gb": Spec(hidden=2048, intermediate=5632, layers=22, vocab=32000, heads=32, kv_heads=4, nominal=2 * GB),
    "4gb": Spec(hidden=2560, intermediate=6912, layers=27, vocab=32000, heads=20, kv_heads=4, nominal=4 * GB),
    "8gb": Spec(hidden=3072, intermediate=8960, layers=36, vocab=32000, heads=24, kv_heads=8, nominal=8 * GB),
    # Qwen2.5-32B's shapes (q/k/v biases, untied head, vocabulary 152064) cut to 6 layers: 9 GB per checkpoint,
    # so a trio (27 GB) plus its output does not fit in a 24 GB machine's page cache: the out-of-core preset
    "32b-ooc": Spec(
        hidden=5120, intermediate=27648, layers=6, vocab=152064, heads=40, kv_heads=8, nominal=9 * GB, qkv_bias=True
    ),
}
ROLES = ("base", "tuned", "instruct")
SHARD_FRACTIONS = {"base": 0.5, "tuned": 0.35, "instruct": 0.25}  # of the nominal size
DTYPE_CODES = {
    "bfloat16": ("BF16", torch.bfloat16),
    "float16": ("F16", torch.float16),
    "float32": ("F32", torch.float32),
}


def tensor_shapes(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in the order transformers' LlamaForCausalLM state dict lists them."""
    h, kv = spec.hidden, spec.kv_heads * spec.head_dim
    out = [("model.embed_tokens.weight", (spec.vocab, h))]
    for k in range(spec.layers):
        p = f"model.layers.{k}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
        ]
        if spec.qkv_bias:
            out += [
                (p + "self_attn.q_proj.bias", (h,)),
                (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.bias", (kv,)),
            ]
        out += [
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (spec.intermediate, h)),
            (p + "mlp.up_proj.weight", (spec.intermediate, h)),
            (p + "mlp.down_proj.weight", (h, spec.intermediate)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not spec.tied:
        out.append(("lm_head.weight", (spec.vocab, h)))
    return out


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int) -> list[list[int]]:
    """Greedy split of tensor indices into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(shapes):
        n = numel(shape) * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def seed_for(seed: int, role: str, name: str) -> int:
    """A 63-bit generator seed from (seed, role, name): stable across runs, machines and Python versions."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{role}/{name}".encode()).digest()[:8], "little") >> 1


def draw(seed: int, role: str, name: str, n: int):
    """Yield the standard-normal float32 values of one tensor, CHUNK elements at a time."""
    g = torch.Generator().manual_seed(seed_for(seed, role, name))
    for lo in range(0, n, CHUNK):
        yield torch.randn(min(CHUNK, n - lo), generator=g)


def llama_config(spec: Spec, dtype: str) -> dict:
    """A config.json that transformers' LlamaConfig / AutoModelForCausalLM accepts for these shapes."""
    qwen2 = spec.qkv_bias  # Llama has no q/k/v-only biases; Qwen2 is Llama with them
    return {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": spec.tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }


def tokenizer_files(vocab: int, chat: bool) -> dict[str, dict]:
    """A small but loadable tokenizer (word-level, `vocab` tokens) as transformers' fast tokenizer files.

    Every checkpoint gets one, as real releases do; only Instruct's has a chat template, so a tool that
    copies Base's tokenizer instead of Instruct's shows up in the output.
    """
    specials = ["<unk>", "<s>", "</s>"]
    words = {w: k for k, w in enumerate(specials + [f"w{k}" for k in range(len(specials), vocab)])}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": k,
                "content": w,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for k, w in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 2048,
    }
    if chat:
        config["chat_template"] = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    return {
        "tokenizer.json": tokenizer,
        "tokenizer_config.json": config,
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    }


def make_trio(
    out: str | Path,
    spec: Spec,
    seed: int = 0,
    dtype: str = "bfloat16",
    tuned_dtype: str | None = None,
    noise: float = 2e-3,
    shard_bytes: dict[str, int] | None = None,
    force: bool = False,
    log=lambda msg: print(msg, file=sys.stderr),
) -> dict:
    """Write out/base, out/tuned, out/instruct (unless out/trio.json says they are already there).

    Args:
        spec: the model shape. seed: makes the values. dtype: of Base and Instruct.
        tuned_dtype: of the tuned model (default: dtype). noise: std of tuned - Base and Instruct - Base.
        shard_bytes: role -> max shard size in bytes (default: fractions of spec.nominal).
    Returns:
        The stamp dict: settings, and per role its folder, shard files and total bytes.
    """
    out = Path(out)
    tuned_dtype = tuned_dtype or dtype
    nominal = spec.nominal or 2 * sum(numel(s) for _, s in tensor_shapes(spec))
    shard_bytes = shard_bytes or {r: int(f * nominal) for r, f in SHARD_FRACTIONS.items()}
    settings = {
        "gen_version": GEN_VERSION,
        "spec": asdict(spec),
        "seed": seed,
        "dtype": dtype,
        "tuned_dtype": tuned_dtype,
        "noise": noise,
        "shard_bytes": shard_bytes,
    }
    stamp_path = out / "trio.json"
    if not force and stamp_path.exists():
        stamp = json.loads(stamp_path.read_text())
        files_ok = all((out / r / f).exists() for r in ROLES for f in stamp["roles"][r]["files"])
        if stamp.get("settings") == settings and files_ok:
            log(f"make_checkpoints: {out} already holds this trio (trio.json); skipping (--force to rewrite)")
            return with_dirs(stamp, out)
    stamp_path.unlink(missing_ok=True)  # a trio is valid only once its stamp is written, last
    for role in ROLES:
        shutil.rmtree(out / role, ignore_errors=True)
        (out / role).mkdir(parents=True)

    shapes = tensor_shapes(spec)
    dtypes = {"base": dtype, "tuned": tuned_dtype, "instruct": dtype}
    layouts, writers, roles = {}, {}, {}
    for role in ROLES:
        code, tdtype = DTYPE_CODES[dtypes[role]]
        shards = plan_shards(shapes, tdtype.itemsize, shard_bytes[role])
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        )
        layouts[role] = (code, tdtype, shards, names)
        roles[role] = {"files": names, "bytes": 0, "dtype": dtypes[role]}
    shard_of = {role: {i: k for k, idx in enumerate(layouts[role][2]) for i in idx} for role in ROLES}

    t0 = time.perf_counter()
    for i, (name, shape) in enumerate(shapes):
        for role in ROLES:  # open the shard this tensor starts, in each layout
            code, tdtype, shards, names = layouts[role]
            k = shard_of[role][i]
            if shards[k][0] == i:
                entries = [(shapes[j][0], code, shapes[j][1]) for j in shards[k]]
                writers[role] = ShardWriter(out / role / names[k], entries, {"format": "pt"})
        # Base ~ N(0, 0.02) for matrices, 1 + N(0, 0.02) for norms; tuned and Instruct add their own noise
        is_norm = len(shape) == 1 and not name.endswith(".bias")
        noises = (draw(seed, "tuned", name, numel(shape)), draw(seed, "instruct", name, numel(shape)))
        for z, zt, zi in zip(draw(seed, "base", name, numel(shape)), *noises):
            base = (z * 0.02 + (1.0 if is_norm else 0.0)).to(layouts["base"][1])
            b32 = base.float()  # the fine-tunes start from Base as stored
            writers["base"].append(base)
            writers["tuned"].append(zt.mul_(noise).add_(b32).to(layouts["tuned"][1]))
            writers["instruct"].append(zi.mul_(noise).add_(b32).to(layouts["instruct"][1]))
        for role in ROLES:  # close the shard this tensor ends
            shards = layouts[role][2]
            if shards[shard_of[role][i]][-1] == i:
                writers.pop(role).finish()

    for role in ROLES:
        folder, (code, tdtype, shards, names) = out / role, layouts[role]
        sizes = [(folder / f).stat().st_size for f in names]
        roles[role]["bytes"] = sum(sizes)
        if len(names) > 1:
            weight_map = {shapes[j][0]: names[k] for k, idx in enumerate(shards) for j in idx}
            total = sum(numel(s) * tdtype.itemsize for _, s in shapes)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (folder / "config.json").write_text(json.dumps(llama_config(spec, dtypes[role]), indent=2))
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
        for fname, doc in tokenizer_files(spec.vocab, chat=role == "instruct").items():
            (folder / fname).write_text(json.dumps(doc, indent=2 if fname != "tokenizer.json" else None))
    stamp = {"settings": settings, "roles": roles}
    stamp_path.write_text(json.dumps(stamp, indent=2))
    seconds = time.perf_counter() - t0
    total = sum(r["bytes"] for r in roles.values())
    log(f"make_checkpoints: wrote {total / 1e9:.2f} GB in {seconds:.1f} s ({total / 1e9 / seconds:.2f} GB/s) to {out}")
    return with_dirs(stamp, out)


def with_dirs(stamp: dict, out: Path) -> dict:
    """The stamp with each role's absolute folder added (the stamp on disk holds none: the trio can move)."""
    for role, r in stamp["roles"].items():
        r["dir"] = str(out.resolve() / role)
    return stamp


def parse_size(text: str) -> int:
    """'700MB' -> 700_000_000 (decimal units, like the preset names)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def spec_from_args(args) -> Spec:
    spec = PRESETS[args.preset]
    changes = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "vocab") if getattr(args, k)}
    if changes:
        hidden = changes.get("hidden", spec.hidden)
        if hidden % spec.head_dim:
            sys.exit(f"make_checkpoints: --hidden {hidden} is not a multiple of head_dim {spec.head_dim}")
        heads = hidden // spec.head_dim
        kv_heads = next(k for k in range(min(spec.kv_heads, heads), 0, -1) if heads % k == 0)
        spec = Spec(**{**asdict(spec), **changes, "heads": heads, "kv_heads": kv_heads})
    if args.tied:
        spec = Spec(**{**asdict(spec), "tied": True})
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("preset", choices=PRESETS, help="model size per checkpoint (bf16)")
    ap.add_argument("--out", required=True, help="folder to hold base/ tuned/ instruct/")
    ap.add_argument("--hidden", type=int, help="override the preset's hidden size")
    ap.add_argument("--intermediate", type=int, help="override the MLP size")
    ap.add_argument("--layers", type=int, help="override the layer count")
    ap.add_argument("--vocab", type=int, help="override the vocabulary size")
    ap.add_argument("--tied", action="store_true", help="tie embeddings (no lm_head.weight)")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPE_CODES, help="dtype of Base and Instruct")
    ap.add_argument("--tuned-dtype", choices=DTYPE_CODES, help="dtype of the tuned model (default: --dtype)")
    ap.add_argument("--noise", type=float, default=2e-3, help="std of tuned - Base and Instruct - Base")
    ap.add_argument(
        "--shard-sizes", metavar="B,T,I", help="max shard sizes of base,tuned,instruct, e.g. 1GB,700MB,500MB"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite even if the stamp matches")
    args = ap.parse_args()
    spec = spec_from_args(args)
    shard_bytes = None
    if args.shard_sizes:
        sizes = [parse_size(s) for s in args.shard_sizes.split(",")]
        if len(sizes) != 3:
            sys.exit("make_checkpoints: --shard-sizes needs three sizes: base,tuned,instruct")
        shard_bytes = dict(zip(ROLES, sizes))
    stamp = make_trio(args.out, spec, args.seed, args.dtype, args.tuned_dtype, args.noise, shard_bytes, args.force)
    params = sum(numel(s) for _, s in tensor_shapes(spec))
    print(f"{args.preset}: {params / 1e6:.1f}M parameters per checkpoint, {len(tensor_shapes(spec))} tensors")
    for r in stamp["roles"].values():
        print(f"  {r['dir']}: {r['bytes'] / 1e6:.1f} MB {r['dtype']} in {len(r['files'])} file(s)")


if __name__ == "__main__":
    main()
