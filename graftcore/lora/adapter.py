"""PEFT LoRA adapter -> one low-rank update per Instruct tensor.

Shadow-FT trains LoRA on Base and merges it straight into Instruct; Base itself is not needed:

    W_out = W_instruct + alpha * s * (B @ A)        s = lora_alpha / r   (lora_alpha / sqrt(r) with rsLoRA)

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, whose tensors are named
(PEFT 0.21, checked against `peft.utils.save_and_load.get_peft_model_state_dict`):

    base_model.model.<module>.lora_A.weight          [r, in]        Linear (and Conv1D with fan_in_fan_out)
    base_model.model.<module>.lora_B.weight          [out, r]
    base_model.model.<module>.lora_B.bias            [out]          lora_bias=True: bias += s * lora_B.bias
    base_model.model.<module>.lora_embedding_A       [r, vocab]     Embedding: delta = (B @ A).T
    base_model.model.<module>.lora_embedding_B       [dim, r]
    base_model.model.<module>.lora_magnitude_vector  [out] or [dim] DoRA
    base_model.model.<name>                          full tensors: modules_to_save, trained biases
                                                     (`<module>.base_layer.bias`), and the frozen copy of a
                                                     targeted embedding (`<module>.base_layer.weight`)
    base_model.model.<module>[.base_layer]*.lora_A.weight   LoRA on a parameter (target_parameters): see
                                                     lora/params.py

Every update is written as `left @ right` over the rows of the Instruct tensor as stored (lora/update.py), so
the engine computes it chunk by chunk over output rows whatever the layer type.

Full tensors trained on Base (modules_to_save, biases) are grafted like a full fine-tune,
I + alpha * (T - B), and so need --base; so does DoRA, whose merged weight depends on Base's norms.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from graftcore.errors import AdapterError, CheckpointError
from graftcore.io.json_files import read_json_file
from graftcore.io.safetensors_file import FLOAT_DTYPES, Quantized, TensorInfo
from graftcore.lora.params import parameter_updates, wrapper_depth
from graftcore.lora.update import LowRankUpdate
from graftcore.plan.layouts import segment_variants
from graftcore.plan.names import infer_rewrites, rewrite_names
from graftcore.sources.checkpoint import NEVER_UNPICKLES, Checkpoint
from graftcore.sources.local import open_local

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PEFT_PREFIX = "base_model.model."
# key suffix -> (layer kind, part)
PARTS = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_B.bias": ("linear", "bias"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
    ".lora_magnitude_vector": (None, "m"),
    ".lora_magnitude_vector.weight": (None, "m"),  # the in-memory name; PEFT strips `.weight` when saving
}
# config options whose adapters cannot be merged as W + s * B @ A (or DoRA), so we refuse rather than guess
UNSUPPORTED = {
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "aLoRA (activated only after invocation tokens)",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "use_qalora": "QALoRA",
    "megatron_config": "Megatron parallel layers",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
}
# init_lora_weights values that rewrite the base weights, so the adapter only fits that rewritten model
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# modules whose vocabulary may have grown in Instruct: the update covers the leading rows only
VOCAB_MODULES = ("lm_head", "embed_out", "embed_tokens", "wte", "word_embeddings")


def is_adapter(ref) -> bool:
    """Whether REF is a local PEFT adapter folder (decided from file names alone, before opening anything)."""
    path = Path(str(ref)).expanduser()
    return path.is_dir() and any((path / n).is_file() for n in (CONFIG_NAME, WEIGHTS_NAME, *PICKLE_NAMES))


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of `adapter_config.json` that decide which module gets which update."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    fan_in_fan_out: bool = False
    target_modules: list | str | None = None
    exclude_modules: list | str | None = None
    layers_to_transform: list | int | None = None
    layers_pattern: list | str | None = None
    modules_to_save: list | None = None
    use_dora: bool = False
    target_parameters: list | None = None

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """PEFT's LoraModel._create_and_replace: the first pattern key matching the module, else the default."""
        r = self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return r, alpha

    def scale(self, module: str) -> float:
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """PEFT's check_target_module_exists, for the options a saved LoRA config can hold."""
        if self.exclude_modules:
            ex = self.exclude_modules
            if (
                re.fullmatch(ex, module)
                if isinstance(ex, str)
                else module in ex or any(module.endswith("." + k) for k in ex)
            ):
                return False
        if self.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save):
            return False
        t = self.target_modules
        if isinstance(t, str):
            return t.lower() == "all-linear" or re.fullmatch(t, module) is not None
        if not t:
            return False
        if module in t:
            return True
        if not any(module.endswith("." + k) for k in t):
            return False
        wanted = self.layers_to_transform
        if wanted is None or (isinstance(wanted, list) and not wanted):
            return True
        if not self.layers_pattern:
            # the first numbered segment is the layer index (not e.g. an MoE expert index further on)
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            m = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None)
        if m is None:
            return False
        return int(m["idx"]) == wanted if isinstance(wanted, int) else int(m["idx"]) in wanted


def pattern_key(patterns: dict, module: str) -> str:
    """peft.utils.other.get_pattern_key: the first key K (in file order) with `(.*\\.)?(K)$` matching the module."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def is_rank(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_config(path: Path) -> AdapterConfig:
    """Parse and check `adapter_config.json`; refuse adapter kinds that are not plain LoRA or DoRA."""
    try:
        doc = read_json_file(path, "the adapter config", AdapterError)
    except FileNotFoundError:
        raise AdapterError(f"{path}: cannot read the adapter config (no such file)") from None
    if not isinstance(doc, dict):
        raise AdapterError(f"{path}: not a JSON object")
    kind = doc.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise AdapterError(f"{path}: peft_type is {kind!r}; graftcore merges LoRA adapters only")
    for key, what in UNSUPPORTED.items():
        if doc.get(key):
            raise AdapterError(f"{path}: {key} is set ({what}); graftcore merges plain LoRA and DoRA adapters only")
    init = doc.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(
            f"{path}: init_lora_weights={init!r} rewrites the base weights, so the adapter does not fit the original "
            f"model; convert it first with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    if isinstance(init, str) and init.lower() == "mica":
        raise AdapterError(f"{path}: init_lora_weights='mica' is a LoRA variant graftcore does not merge")
    r, alpha = doc.get("r", 8), doc.get("lora_alpha", 8)
    if not is_rank(r) or not is_finite_number(alpha):
        raise AdapterError(
            f"{path}: r must be a positive integer and lora_alpha a finite number (got r={r!r}, lora_alpha={alpha!r})"
        )
    patterns = {}
    for name, valid in (("rank_pattern", is_rank), ("alpha_pattern", is_finite_number)):
        value = doc.get(name) or {}
        if not isinstance(value, dict) or not all(valid(v) for v in value.values()):
            what = "positive integers" if name == "rank_pattern" else "finite numbers"
            raise AdapterError(f"{path}: {name} must map module patterns to {what} (got {str(value)[:100]})")
        patterns[name] = value
    for key, types in (
        ("target_modules", (str, list)),
        ("exclude_modules", (str, list)),
        ("modules_to_save", (list,)),
        ("layers_pattern", (str, list)),
        ("layers_to_transform", (int, list)),
        ("target_parameters", (list,)),
    ):
        value = doc.get(key)
        if value is not None and (
            not isinstance(value, types)
            or isinstance(value, bool)
            or (
                isinstance(value, list)
                and not all(isinstance(v, int if key == "layers_to_transform" else str) for v in value)
            )
        ):
            raise AdapterError(f"{path}: {key} has the wrong type ({str(value)[:100]})")
    regexes = [*patterns["rank_pattern"], *patterns["alpha_pattern"]]
    regexes += [doc[k] for k in ("target_modules", "exclude_modules", "layers_pattern") if isinstance(doc.get(k), str)]
    regexes += [p for k in ("modules_to_save", "layers_pattern") if isinstance(doc.get(k), list) for p in doc[k]]
    for regex in regexes:
        try:
            re.compile(regex)
        except re.error as e:
            raise AdapterError(f"{path}: {regex!r} is not a valid regular expression ({e})") from None
    try:
        return AdapterConfig(
            path=path,
            r=r,
            lora_alpha=alpha,
            use_rslora=bool(doc.get("use_rslora", False)),
            fan_in_fan_out=bool(doc.get("fan_in_fan_out", False)),
            target_modules=doc.get("target_modules"),
            exclude_modules=doc.get("exclude_modules"),
            layers_to_transform=doc.get("layers_to_transform"),
            layers_pattern=doc.get("layers_pattern"),
            modules_to_save=doc.get("modules_to_save"),
            use_dora=bool(doc.get("use_dora", False)),
            target_parameters=doc.get("target_parameters"),
            **patterns,
        )
    except TypeError as e:
        raise AdapterError(f"{path}: unexpected value ({e})") from None


@dataclass
class Adapter:
    """An opened adapter folder: its config and its weights as a Checkpoint (headers only)."""

    root: Path
    config: AdapterConfig
    checkpoint: Checkpoint

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS_NAME


def open_adapter(ref) -> Adapter:
    """Open a local PEFT adapter folder; AdapterError when a file is missing or only pickled weights exist."""
    root = Path(str(ref)).expanduser()
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [n for n in PICKLE_NAMES if (root / n).is_file()]
        if pickles:
            raise AdapterError(
                f"{root / pickles[0]}: the adapter is stored only as pickled weights; {NEVER_UNPICKLES}. "
                f"Re-save it with PEFT: model.save_pretrained(dir, safe_serialization=True)"
            )
        raise AdapterError(f"{root}: no {WEIGHTS_NAME} in the adapter folder")
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{weights}: no {CONFIG_NAME} beside it, so r and lora_alpha are unknown")
    config = read_config(config_path)
    try:
        ck = open_local(weights)
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    # the config changes the output as much as the weights do: a rerun with another alpha must not "resume"
    ck.fingerprint = f"{ck.fingerprint}+{hashlib.sha256(config_path.read_bytes()).hexdigest()}"
    ck.ref, ck.root = str(root), root  # messages then say ADAPTER_DIR/adapter_model.safetensors
    return Adapter(root, config, ck)


def adapter_terms(
    adapter: Adapter, instruct: Checkpoint, base: Checkpoint | None, notes: list[str], renames=()
) -> tuple[dict[str, TensorInfo], dict[str, LowRankUpdate]]:
    """What the adapter changes, by Instruct tensor name: (full tensors trained on Base, low-rank updates).
    AdapterError when an adapter tensor has no home in Instruct or needs a Base that was not given.

    Example:
        >>> full, updates = adapter_terms(open_adapter("my-lora"), open_checkpoint(i), None, [])  # doctest: +SKIP
    """
    cfg, where = adapter.config, str(adapter.weights)
    modules: dict[str, dict[str, TensorInfo]] = {}
    kinds: dict[str, str] = {}
    full: dict[str, TensorInfo] = {}  # Instruct name -> adapter tensor
    for key, info in adapter.checkpoint.tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        suffix = next((s for s in PARTS if name.endswith(s)), None)
        if suffix is None:
            if ".lora_" in name:
                raise AdapterError(f"{where}: tensor {key!r} is a LoRA tensor graftcore does not know how to merge")
            target = name.replace(".base_layer.", ".")
            if target in full:
                raise AdapterError(f"{where}: tensors {full[target].name!r} and {key!r} both target {target!r}")
            full[target] = info
            continue
        module = name[: -len(suffix)]
        kind, part = PARTS[suffix]
        parts = modules.setdefault(module, {})
        if part in parts:
            raise AdapterError(f"{where}: tensors {parts[part].name!r} and {key!r} are both {part} of {module!r}")
        parts[part] = info
        if kind is not None:
            if kinds.setdefault(module, kind) != kind:
                raise AdapterError(f"{where}: module {module!r} has both Linear and Embedding LoRA tensors ({key!r})")

    wrappers = {m: modules.pop(m) for m in list(modules) if on_parameter(m, cfg)}
    homes, rules = module_homes(modules, kinds, full, instruct, where, notes, list(renames))
    full = {homes.get(t, t): info for t, info in full.items()}
    updates: dict[str, LowRankUpdate] = {}
    for module, parts in modules.items():
        add_updates(updates, plan_module(module, parts, kinds.get(module), cfg, instruct, where, homes.get(module)))
    for module, parts in wrappers.items():
        check_wrapper_parts(module, parts, kinds.get(module), where)
        owner, depth = wrapper_depth(module)
        home = next((new + owner[len(old) :] for old, new in rules if owner.startswith(old)), None)
        add_updates(updates, parameter_updates(owner, depth, parts, cfg, instruct, where, home))
    for target in [t for t in full if t.endswith(".weight") and t[: -len(".weight")] in modules]:
        # save_embedding_layers: PEFT saves a targeted embedding's frozen base weight beside its LoRA factors;
        # it is Base's, unchanged by training, so the graft has nothing to take from it
        notes.append(
            f"{where}: {full.pop(target).name!r} is the frozen base weight PEFT saves with an embedding LoRA; not used"
        )
    for target, info in full.items():
        if target in updates:
            raise AdapterError(f"{where}: tensor {info.name!r} and a LoRA update both target {target!r}")
        if target not in instruct.tensors:
            raise AdapterError(
                f"{where}: tensor {info.name!r} targets {target!r}, which Instruct ({instruct.ref}) does not have"
            )
    if full and base is None:
        names = ", ".join(repr(i.name) for i in list(full.values())[:3]) + (" ..." if len(full) > 3 else "")
        raise AdapterError(
            f"{where}: holds {len(full)} full tensor(s) trained on Base (modules_to_save or biases: {names}); "
            f"grafting them as instruct + alpha * (tuned - base) needs --base"
        )
    dora = [u for u in updates.values() if u.magnitude is not None]
    if dora and base is None:
        raise AdapterError(
            f"{where}: DoRA adapter (tensor {dora[0].magnitude.name!r}): the merged weight depends on Base's weight "
            f"norms, so it needs --base"
        )

    notes.append(f"LoRA adapter {adapter.root}: {len(updates)} low-rank update(s), {len(full)} full tensor(s)")
    return full, updates


def on_parameter(module: str, cfg: AdapterConfig) -> bool:
    """Whether `module`'s factors are PEFT's LoRA on a parameter (lora/params.py) rather than on a layer: the config
    has target_parameters and the module is a nested wrapper or not a target_modules match."""
    owner, depth = wrapper_depth(module)
    return bool(cfg.target_parameters) and (depth > 0 or not cfg.targets(owner))


def check_wrapper_parts(module: str, parts: dict[str, TensorInfo], kind: str | None, where: str) -> None:
    """AdapterError unless a ParamWrapper's tensors are a plain lora_A / lora_B pair of float dtypes."""
    first = next(iter(parts.values())).name
    if "A" not in parts or "B" not in parts:
        lacks = "A" if "A" not in parts else "B"
        raise AdapterError(f"{where}: tensor {first!r} has no lora_{lacks} partner for module {module!r}")
    if kind != "linear" or set(parts) != {"A", "B"}:
        raise AdapterError(
            f"{where}: tensor {first!r}: LoRA on a parameter ({module!r}) has tensors "
            f"{sorted(p.name for p in parts.values())}; graftcore merges its lora_A / lora_B pair only"
        )
    for x in parts.values():
        if x.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{where}: tensor {x.name!r} is {x.dtype}; graftcore reads F16, BF16 or F32 adapters")


def add_updates(updates: dict[str, LowRankUpdate], new: dict[str, LowRankUpdate]) -> None:
    """updates |= new; AdapterError when two adapter modules update one Instruct tensor."""
    for target, u in new.items():
        if target in updates:
            raise AdapterError(f"{u.where}: modules {updates[target].module!r} and {u.module!r} both update {target!r}")
        updates[target] = u


def module_homes(
    modules: dict, kinds: dict, full: dict, instruct: Checkpoint, where: str, notes: list[str], renames: list = ()
) -> dict:
    """adapter module (or full tensor) name -> the name Instruct's files give it, where they differ by prefix.

    PEFT names an adapter's modules as the model holds them in memory; transformers 5 holds a VL model's language
    layers as `model.language_model.layers.N...` and its vision tower as `model.vision_tower...`, but saves them as
    `language_model.model.layers.N...` and `vision_tower...` (Llava, Gemma 3). The rewrites are inferred as for
    full checkpoints (names.infer_rewrites), from the weight shapes the factors imply."""
    shapes = {}
    for module, parts in modules.items():
        a, b = parts.get("A"), parts.get("B")
        if a is None or b is None or len(a.shape) != 2 or len(b.shape) != 2:
            continue
        linear = kinds.get(module) != "embedding"
        shapes[module + ".weight"] = (b.shape[0], a.shape[1]) if linear else (a.shape[1], b.shape[0])
    shapes.update({t: info.shape for t, info in full.items()})
    reference = {n: i.shape for n, i in instruct.tensors.items()}
    if all(n in reference for n in shapes):
        return {}, []
    rules = list(renames) or infer_rewrites(shapes, reference)  # --rename rules, where given, apply here too
    moved = rewrite_names(list(shapes), rules, reference)
    homes = {}
    for name, home in moved.items():
        if home == name:
            continue
        module = name.removesuffix(".weight")
        if module in modules:  # an adapted module, by its own name (its weight's, less ".weight")
            homes[module] = home.removesuffix(".weight")
        else:  # a full tensor the adapter carries, by its name
            homes[name] = home
    for old, new in rules:
        notes.append(f"{where}: adapter module names with the prefix {old!r} read as {new!r} (Instruct's files)")
    return homes, rules


def plan_module(
    module: str,
    parts: dict[str, TensorInfo],
    kind: str | None,
    cfg: AdapterConfig,
    instruct: Checkpoint,
    where: str,
    home: str | None = None,
):
    """The LowRankUpdate(s) of one adapted module, after checking names, ranks and shapes; `home`: the module's
    name in Instruct's files where it differs."""
    target, i = adapted_tensor(module, parts, cfg, instruct, where, home)
    a, b, m = parts["A"], parts["B"], parts.get("m")
    if kind == "linear" and cfg.fan_in_fan_out:
        kind = "fan_in_fan_out"
    rows, cols, grown = update_shape(module, a, b, i, kind, cfg, target, where)
    check_dora(module, m, cfg, kind, (rows, cols), grown, target, where)
    scale = cfg.scale(module)
    out = {target: LowRankUpdate(module, kind, scale, a, b, rows, cols, m, where)}
    bias = parts.get("bias")
    if bias is not None:
        target_b = (home or module) + ".bias"
        ib = instruct.tensors.get(target_b)
        if ib is None or tuple(ib.shape) != (b.shape[0],):
            found = "missing" if ib is None else list(ib.shape)
            raise AdapterError(
                f"{where}: tensor {bias.name!r} {list(bias.shape)} targets {target_b!r}, which is {found} in Instruct"
            )
        out[target_b] = LowRankUpdate(module, "bias", scale, bias, None, b.shape[0], 1, None, where)
    return out


def adapted_tensor(module: str, parts: dict, cfg: AdapterConfig, instruct: Checkpoint, where: str, home):
    """(name, TensorInfo) of the Instruct weight that `module`'s factors adapt; AdapterError for a factor without
    its partner, a module the config does not select, a target Instruct lacks, or dtypes graftcore cannot read."""
    first = next(iter(parts.values())).name
    if "A" not in parts or "B" not in parts:
        lacks = "A" if "A" not in parts else "B"
        raise AdapterError(f"{where}: tensor {first!r} has no lora_{lacks} partner for module {module!r}")
    if not cfg.targets(module):
        raise AdapterError(
            f"{where}: tensor {first!r} adapts module {module!r}, which {cfg.path.name}'s target_modules / "
            f"layers_to_transform / exclude_modules do not select (PEFT would ignore it)"
        )
    a = parts["A"]
    target = (home or module) + ".weight"
    if target not in instruct.tensors:  # a segment transformers renames on load (PhiMoE's router: plan/layouts.py)
        target = next((v for v in segment_variants(target) if v in instruct.tensors), target)
    i = instruct.tensors.get(target)
    if i is None:
        raise AdapterError(
            f"{where}: tensor {a.name!r} targets {target!r}, which Instruct ({instruct.ref}) does not have"
        )
    if i.dtype not in FLOAT_DTYPES and not isinstance(i, Quantized):
        raise AdapterError(
            f"{where}: tensor {a.name!r} targets {target!r}, which is {i.dtype} in Instruct, not F16/BF16/F32/FP8"
        )
    for x in (a, parts["B"], parts.get("m"), parts.get("bias")):
        if x is not None and x.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{where}: tensor {x.name!r} is {x.dtype}; graftcore reads F16, BF16 or F32 adapters")
    return target, i


def update_shape(module: str, a, b, i, kind: str, cfg: AdapterConfig, target: str, where: str):
    """(rows, cols, grown) of the update `left @ right` the factors make over the stored Instruct weight `i`
    (grown: Instruct's vocabulary has more rows); AdapterError for ranks or shapes that do not fit."""
    if len(a.shape) != 2 or len(b.shape) != 2 or len(i.shape) != 2:
        raise AdapterError(
            f"{where}: tensor {a.name!r} is {list(a.shape)} with lora_B {list(b.shape)} for {target!r} "
            f"{list(i.shape)}; only 2-D (Linear, Conv1D, Embedding) LoRA is supported"
        )
    r, _ = cfg.rank_and_alpha(module)
    # what the stored Instruct weight must be: [rows, cols] with rows = left's rows, cols = right's columns
    rows, cols = {
        "linear": (b.shape[0], a.shape[1]),
        "fan_in_fan_out": (a.shape[1], b.shape[0]),
        "embedding": (a.shape[1], b.shape[0]),
    }[kind]
    shape_text = f"lora_A {list(a.shape)}, lora_B {list(b.shape)}"
    if a.shape[0] != b.shape[1]:
        raise AdapterError(f"{where}: tensor {a.name!r}: ranks differ ({shape_text})")
    if a.shape[0] != r:
        raise AdapterError(
            f"{where}: tensor {a.name!r} has rank {a.shape[0]} but {cfg.path.name} gives {module!r} rank {r} "
            f"(r / rank_pattern)"
        )
    grown = module.rsplit(".", 1)[-1] in VOCAB_MODULES and cols == i.shape[1] and rows < i.shape[0]
    if (rows, cols) != tuple(i.shape) and not grown:
        layout = {"linear": "[out, in]", "fan_in_fan_out": "[in, out] (fan_in_fan_out)", "embedding": "[vocab, dim]"}
        raise AdapterError(
            f"{where}: tensor {a.name!r} ({shape_text}) makes a {layout[kind]} update of {[rows, cols]}, but "
            f"{target!r} is {list(i.shape)} in Instruct"
        )
    return rows, cols, grown


def check_dora(module: str, m, cfg: AdapterConfig, kind: str, shape: tuple, grown: bool, target: str, where: str):
    """AdapterError unless a DoRA magnitude `m` (or None) agrees with the config's use_dora and the update's shape."""
    if m is None:
        if cfg.use_dora:
            raise AdapterError(
                f"{where}: {cfg.path.name} has use_dora but module {module!r} has no lora_magnitude_vector"
            )
        return
    if not cfg.use_dora:
        raise AdapterError(f"{where}: tensor {m.name!r} is a DoRA magnitude but {cfg.path.name} has no use_dora")
    if grown:
        raise AdapterError(f"{where}: DoRA on {target!r} whose vocabulary grew in Instruct is not supported")
    want = shape[0] if kind == "linear" else shape[1]
    if tuple(m.shape) != (want,):
        raise AdapterError(f"{where}: tensor {m.name!r} is {list(m.shape)}; DoRA on {target!r} needs [{want}]")
