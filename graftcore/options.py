"""Merge options, declared once: the CLI turns each field into a flag, the API takes them as keywords."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from graftcore.errors import GraftError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # --targets reference
# --targets projections is what PEFT's "all-linear" adapts on Instruct's architecture (plan/projections.py); where
# transformers and PEFT cannot tell, these name rules stand in, by the name of the module holding the weight (or,
# for experts stored fused, of the parameter), as transformers saves them:
#   *_proj: q/k/v/o, Phi-3's qkv_proj and gate_up_proj, DeepSeek-V3's MLA q_a/q_b/kv_a_proj_with_mqa/kv_b_proj,
#           vision towers' out_proj, Qwen3-Next's in_proj_qkvz / in_proj_ba, the fused experts' gate_up_proj /
#           down_proj (GPT-OSS: their _bias too)
#   w1/w2/w3, v1: Mixtral's block_sparse_moe.experts.N.w*, DBRX's experts      fc1/fc2, qkv, proj: vision towers
#   c_attn/c_fc/c_proj: GPT-2, GPT-BigCode, StarCoder2      fc_in/fc_out: GPT-J, CodeGen      Wqkv: MPT, DBRX
#   query_key_value, dense, dense_h_to_4h/dense_4h_to_h: GPT-NeoX, Falcon, BLOOM, Phi
#   input_linear/output_linear: GraniteMoE's experts      output_gate: MiniMax      linear_1/linear_2: projectors
#   merger.mlp.N: Qwen2-VL's patch merger (a Sequential of Linear layers)
# Not projections: embeddings, norms, lm_head, routers (mlp.gate, block_sparse_moe.gate, mlp.router), and
# convolutions (a weight of more than 2 dimensions outside the experts: projections.name_rule_tensors).
PROJECTION = re.compile(
    r"(^|\.)([a-z0-9_]*_proj(_with_mqa)?|in_proj_[a-z]+|w[123]|v1|fc[12]|fc_(in|out)|qkv|[Ww]qkv|proj|linear_[12]"
    r"|c_(attn|fc|proj)|query_key_value|dense|dense_h_to_4h|dense_4h_to_h|input_linear|output_linear|output_gate"
    r"|merger\.mlp\.[0-9]+)"
    r"(_bias)?(\.(weight|bias))?$"
)
MAX_CHUNK = 1 << 28  # elements: 1 GiB of float32 per compute buffer
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


@dataclass
class MergeOptions:
    alpha: float | list[float] = field(
        default=1.0,
        metadata={
            "help": "scale of each grafted update: W_I + a1 * (W_T1 - W_B) + ...; one --alpha for every --tuned, or "
            "one "
            "per --tuned in the same order (repeatable)",
            "metavar": "A",
        },
    )
    include: list[str] = field(
        default_factory=list,
        metadata={"help": "graft only tensors whose name matches REGEX (repeatable)", "metavar": "REGEX"},
    )
    exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "copy tensors whose name matches REGEX from Instruct (repeatable)", "metavar": "REGEX"},
    )
    rename: list[str] = field(
        default_factory=list,
        metadata={
            "help": "read Base's and tuned tensor names with the prefix OLD as NEW (e.g. "
            "'model.=language_model.model.'); by default a consistent prefix difference is found from the headers "
            "(repeatable)",
            "metavar": "OLD=NEW",
        },
    )
    targets: str = field(
        default="all",
        metadata={
            "help": "all: every tensor the inputs share; projections: the modules PEFT's target_modules="
            "'all-linear' adapts on Instruct's architecture (its linear layers and MoE experts, not the head; "
            "name rules without transformers and peft); reference: only q/k/v/o/gate/up/down_proj, the paper's code",
            "choices": ("all", "projections", "reference"),
        },
    )
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available), cpu, cuda or cuda:N"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "output dtype of floating tensors (auto: Instruct's, FP8 included; bf16, fp16, fp32 also read; "
            "an FP8 Instruct is then written dequantized)",
            "choices": ("auto", "bfloat16", "float16", "float32"),
        },
    )
    max_shard_size: str | None = field(
        default=None,
        metadata={
            "help": "re-shard the output into files of at most SIZE (e.g. 5GB); default: Instruct's layout",
            "metavar": "SIZE",
        },
    )
    token: str | None = field(
        default=None, metadata={"help": "Hugging Face token (default: $HF_TOKEN or the saved login)"}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "hub cache folder (default: $HF_HUB_CACHE)"})
    low_disk: bool = field(
        default=False, metadata={"help": "hub inputs: keep only the input shards still needed on disk"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace the weights of a non-empty output folder"})
    allow_nonfinite: bool = field(
        default=False,
        metadata={
            "help": "keep NaN/Inf that appear in tuned - base, or that finite inputs produce (overflow), instead of "
            "failing"
        },
    )
    dry_run: bool = field(default=False, metadata={"help": "print the plan and write nothing"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})
    workers: int = field(
        default=1,
        metadata={
            "help": "merge with K local processes (each writes its share of the output shards)",
            "metavar": "K",
            "type": int,
        },
    )
    chunk_size: int | None = field(
        default=None,
        metadata={"help": "elements per compute chunk (default: 256K on CPU, 4M on GPU)", "hidden": True, "type": int},
    )
    read_buffer: str | None = field(
        default=None, metadata={"help": "bytes per input read buffer (default 4MiB)", "hidden": True, "metavar": "SIZE"}
    )
    read_depth: int | None = field(
        default=None, metadata={"help": "read buffers per input (default 3)", "hidden": True, "type": int}
    )
    read_workers: int | None = field(
        default=None, metadata={"help": "concurrent reads per input (default 2)", "hidden": True, "type": int}
    )

    def __post_init__(self):
        """Check and normalise every field, so a bad option is a GraftError before any input is opened."""
        self.alpha = alphas_from(self.alpha)
        self.rename = [self.rename] if isinstance(self.rename, str) else self.rename
        if not isinstance(self.rename, (list, tuple)):
            raise GraftError(f"rename: expected a list of OLD=NEW rules, got {self.rename!r}")
        self.rename = list(self.rename)
        parse_renames(self.rename)
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):  # one pattern, not a sequence of one-character patterns
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
                raise GraftError(f"{name}: expected a list of regular expressions, got {value!r}")
            setattr(self, name, list(value))
            for pattern in value:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise GraftError(f"--{name}: bad regular expression {pattern!r} ({e})") from None
        name = str(self.dtype).removeprefix("torch.")  # torch.bfloat16 and "torch.bfloat16" too
        self.dtype = DTYPE_ALIASES.get(name, name)
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if "choices" in meta and value not in meta["choices"]:
                raise GraftError(f"--{flag(f.name)} {value!r}: expected one of {', '.join(meta['choices'])}")
            if f.type == "bool" and not isinstance(value, bool):
                raise GraftError(f"{f.name}: expected True or False, got {value!r}")
            if (
                meta.get("type") is int
                and value is not None
                and (not isinstance(value, int) or isinstance(value, bool))
            ):
                raise GraftError(f"--{flag(f.name)}: expected a whole number, got {value!r}")
            if (
                f.type == "str | None"
                and value is not None
                and not isinstance(value, str)
                and f.name != "max_shard_size"
            ):
                raise GraftError(f"--{flag(f.name)}: expected a string, got {value!r}")
        if not isinstance(self.device, str) or re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is None:
            raise GraftError(f"--device {self.device!r}: expected auto, cpu, cuda or cuda:N")
        if self.workers < 1:
            raise GraftError("--workers must be at least 1")
        if self.chunk_size is not None and not 1 <= self.chunk_size <= MAX_CHUNK:
            raise GraftError(
                f"--chunk-size must be from 1 to {MAX_CHUNK} elements (each compute buffer holds a chunk in float32)"
            )
        if self.max_shard_size is not None and parse_size(self.max_shard_size) < 1:
            raise GraftError(f"--max-shard-size {self.max_shard_size!r}: must be at least 1 byte")
        if self.read_buffer is not None and not 4096 <= parse_size(self.read_buffer, "--read-buffer") <= 1 << 30:
            raise GraftError("--read-buffer must be from 4KiB to 1GiB")
        if self.read_depth is not None and self.read_depth < 2:
            raise GraftError("--read-depth must be at least 2 (one buffer being read, one being consumed)")
        if self.read_workers is not None and self.read_workers < 1:
            raise GraftError("--read-workers must be at least 1")

    def alphas(self, n: int) -> list[float]:
        """The coefficient of each of `n` tuned inputs: one alpha for all, or one each."""
        if len(self.alpha) == 1:
            return self.alpha * n
        if len(self.alpha) != n:
            raise GraftError(
                f"--alpha: {len(self.alpha)} values for {n} --tuned input(s); give one, or one per --tuned"
            )
        return list(self.alpha)

    def selects(self, name: str, projections: frozenset[str] | None = None) -> bool:
        """Whether tensor `name` is to be grafted (as opposed to copied from Instruct). `projections`: the
        tensors `--targets projections` selects on Instruct's architecture (plan/projections.py); None: the name
        rules of PROJECTION decide."""
        if self.targets == "projections" and projections is not None and name not in projections:
            return False
        if self.targets == "projections" and projections is None and not PROJECTION.search(name):
            return False
        if self.targets == "reference" and not re.search(rf"(^|\.)({'|'.join(PROJECTIONS)})(\.|$)", name):
            return False
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not self.excludes(name)

    def excludes(self, name: str) -> bool:
        """Whether `name` is matched by an --exclude pattern: left out on purpose."""
        return any(re.search(p, name) for p in self.exclude)

    def bits_key(self) -> dict:
        """The options that change output bytes: part of the resume fingerprint."""
        return {
            "alpha": self.alpha,
            "include": self.include,
            "exclude": self.exclude,
            **({"rename": self.rename} if self.rename else {}),  # absent when unused: earlier jobs' keys hold
            "targets": self.targets,
            "dtype": self.dtype,
            "max_shard_size": self.max_shard_size,
        }


DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
# the MergeOptions fields `graftcore similarity` (and graftcore.similarity) takes: selection, hub access, the
# progress bar, and the streaming knobs; it writes no model, so none of the output or arithmetic options apply
SIMILARITY_OPTIONS = (
    "rename",
    "include",
    "exclude",
    "targets",
    "token",
    "cache_dir",
    "quiet",
    "chunk_size",
    "read_buffer",
    "read_depth",
    "read_workers",
)


def parse_renames(rules: list[str]) -> list[tuple[str, str]]:
    """--rename OLD=NEW (repeatable) -> [(OLD, NEW)]; GraftError for a rule without '='."""
    out = []
    for rule in rules:
        if not isinstance(rule, str) or "=" not in rule:
            raise GraftError(f"--rename {rule!r}: expected OLD=NEW (a prefix of the tensor names and its replacement)")
        old, new = rule.split("=", 1)
        out.append((old, new))
    return out


def alphas_from(value) -> list[float]:
    """[a1, ...] from one number or a sequence of numbers; GraftError for anything else, NaN or infinite included."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise GraftError("--alpha: no value given")
    for a in values:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            kind = (
                "not a number"
                if isinstance(a, bool) or not isinstance(a, (int, float))
                else "must be finite (a NaN or infinite alpha writes NaN/Inf weights)"
            )
            raise GraftError(f"--alpha {a!r}: {kind}")
    return [float(a) for a in values]


def flag(name: str) -> str:
    return name.replace("_", "-")


def option_fields():
    return fields(MergeOptions)


def parse_size(text: str | int, flag: str = "--max-shard-size") -> int:
    """'5GB' -> 5_000_000_000; '500MiB' -> 524_288_000."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in SIZE_UNITS:
        raise GraftError(f"{flag}: cannot read {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2)])
