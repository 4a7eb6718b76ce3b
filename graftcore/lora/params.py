"""PEFT LoRA on parameters (`target_parameters`): which parameter each saved factor pair adapts, and its updates
named as Instruct's files name the tensors.

transformers 5 holds MoE experts as 3-D parameters (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I];
GPT-OSS's transposed, [E, H, 2I] and [E, I, H]) and routers as bare 2-D parameters (`mlp.gate.weight`), not as
nn.Linear, so PEFT 0.21 adapts them with lora.ParamWrapper: `target_parameters`, to which it also converts
`target_modules="all-linear"` and the v4 names (gate_proj, w1, ...) of MoE models
(peft.utils.transformers_weight_conversion._convert_peft_config_moe). The saved factors are

    <module>.lora_A.weight   [r * E, in]     E = 1 for a 2-D parameter
    <module>.lora_B.weight   [out, r * E]

and when several parameters of one module are adapted the wrappers nest, the first wrapped innermost:
`<module>.base_layer.lora_A.weight` is the first parameter, `<module>.lora_A.weight` the last
(tuners_utils._inject_parameters wraps a module's parameters in the order the module registers them; for the
experts of transformers 5 that is gate_up_proj, then down_proj, which PEFT's conversion code states too: "the
gate_up_proj is the inner PEFT ParamWrapper"). Rank and alpha come from rank_pattern / alpha_pattern matched
against `<module>.<parameter>`.

Instruct's files hold such a parameter as it is (fused) or one tensor per expert (`experts.{e}.gate_proj.weight`,
transformers' default save; layouts.expert_parts); lora/update.py computes both from the same factors.

Example:
    >>> updates = parameter_updates("model.layers.0.mlp.experts", 1, parts, cfg, instruct, where)  # doctest: +SKIP
"""

from __future__ import annotations

from graftcore.errors import AdapterError
from graftcore.io.json_files import read_json_file
from graftcore.io.safetensors_file import TensorInfo
from graftcore.lora.update import LowRankUpdate
from graftcore.plan.layouts import NAMINGS, expert_parts, segment_variants
from graftcore.sources.checkpoint import Checkpoint

# the parameters of transformers 5's expert modules, in the order they register them (Qwen3MoeExperts,
# MixtralExperts, DeepseekV3NaiveMoe: gate_up_proj, down_proj; GptOssExperts: with a bias after each)
REGISTERED = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
# model types whose experts transformers stores [E, in, out] (`is_transposed = True` in their modeling files)
TRANSPOSED_EXPERTS = ("gpt_oss", "aria", "ergo", "openai_privacy_filter")
BASE_LAYER = ".base_layer"


def file_home(module: str, tensors: dict[str, TensorInfo]) -> str:
    """The module's name in the files: `module` where they hold parameters of it, else with an in-memory segment
    read as the files name it (layouts.FILE_SEGMENTS: transformers renames on load what PEFT then names)."""
    return next((m for m in segment_variants(module) if module_parameters(m, tensors)), module)


def wrapper_depth(module: str) -> tuple[str, int]:
    """(the adapted module's name, how deep the wrapper is): `m.experts.base_layer` -> (`m.experts`, 1)."""
    depth = 0
    while module.endswith(BASE_LAYER):
        module, depth = module[: -len(BASE_LAYER)], depth + 1
    return module, depth


def is_targeted(key: str, target_parameters) -> bool:
    """tuners_utils._inject_parameters: `<module>.<parameter>` equals a target or ends with `.target`."""
    return any(key == t or key.endswith("." + t) for t in target_parameters or ())


def module_parameters(home: str, tensors: dict[str, TensorInfo]) -> list[tuple[str, tuple, bool]]:
    """(parameter name, its in-memory shape, whether Instruct stores it one expert at a time) of the module `home`
    (Instruct's name for it), in registration order: parameters Instruct stores as they are, and the fused expert
    parameters rebuilt from per-expert tensors (`home.{e}.gate_proj.weight` ... or `home.{e}.w1.weight` ...)."""
    found = {n[len(home) + 1 :]: (tuple(i.shape), False) for n, i in tensors.items() if n.rpartition(".")[0] == home}
    for gate, _, down in NAMINGS:
        experts = 0
        while f"{home}.{experts}.{gate}.weight" in tensors:
            experts += 1
        if experts:
            g, d = tensors[f"{home}.0.{gate}.weight"].shape, tensors.get(f"{home}.0.{down}.weight")
            found.setdefault("gate_up_proj", ((experts, 2 * g[0], g[1]), True))
            if d is not None:
                found.setdefault("down_proj", ((experts, *d.shape), True))
            break
    order = {p: k for k, p in enumerate(REGISTERED)}
    names = sorted(found, key=lambda p: order.get(p, len(order)))  # stable: the rest in file order
    return [(p, *found[p]) for p in names]


def experts_transposed(instruct: Checkpoint) -> bool | None:
    """Whether Instruct's model type stores its experts [E, in, out]; None when its config.json is unreadable."""
    try:
        doc = read_json_file(instruct.extra_file_path("config.json"), "config.json", AdapterError)
    except (AssertionError, KeyError, OSError, AdapterError):
        return None
    kind = doc.get("model_type") if isinstance(doc, dict) else None
    return None if not isinstance(kind, str) else kind in TRANSPOSED_EXPERTS


def parameter_updates(
    module: str,
    depth: int,
    parts: dict[str, TensorInfo],
    cfg,
    instruct: Checkpoint,
    where: str,
    home: str | None = None,
) -> dict[str, LowRankUpdate]:
    """The updates, by Instruct tensor name, of the ParamWrapper `depth` levels deep in the adapted `module` (its
    in-memory name; `home`: its name in Instruct's files where that differs). AdapterError when no parameter of
    the module fits the factors."""
    home = file_home(home or module, instruct.tensors)
    a, b = parts["A"], parts["B"]
    params = [
        p for p in module_parameters(home, instruct.tensors) if is_targeted(f"{module}.{p[0]}", cfg.target_parameters)
    ]
    if depth >= len(params):
        raise AdapterError(
            f"{where}: tensor {a.name!r} adapts a parameter of {module!r} (wrapper {depth} deep), but Instruct "
            f"({instruct.ref}) has {len(params)} parameter(s) of it that target_parameters "
            f"{list(cfg.target_parameters)} selects"
        )
    param, shape, per_expert = params[len(params) - 1 - depth]
    key = f"{module}.{param}"
    r, _ = cfg.rank_and_alpha(key)
    experts = shape[0] if len(shape) == 3 else 1
    text = f"lora_A {list(a.shape)}, lora_B {list(b.shape)}"
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] or a.shape[0] != r * experts:
        raise AdapterError(
            f"{where}: tensor {a.name!r} ({text}) does not fit {key!r} {list(shape)} with rank {r} "
            f"(r / rank_pattern) and {experts} expert(s)"
        )
    scale = cfg.scale(key)
    if len(shape) == 2:
        if (b.shape[0], a.shape[1]) != shape:
            raise AdapterError(
                f"{where}: tensor {a.name!r} ({text}) makes a {[b.shape[0], a.shape[1]]} update of {key!r} "
                f"{list(shape)}"
            )
        target = f"{home}.{param}"
        return {target: LowRankUpdate(key, "linear", scale, a, b, shape[0], shape[1], None, where)}
    if len(shape) != 3:
        raise AdapterError(f"{where}: tensor {a.name!r} adapts {key!r} {list(shape)}; only 2-D and 3-D parameters are")
    kind = orientation(shape, a, b, instruct)
    if kind is None:
        raise AdapterError(
            f"{where}: tensor {a.name!r} ({text}) does not fit {key!r} {list(shape)} in either expert layout "
            f"([E, out, in] or [E, in, out])"
        )
    if kind == "square":
        raise AdapterError(
            f"{where}: tensor {a.name!r} adapts {key!r} {list(shape)}, whose layout ([E, out, in] or [E, in, out]) "
            f"only Instruct's config.json model_type tells, and it has none"
        )
    rows, cols = shape[1], shape[2]
    if not per_expert:
        return {f"{home}.{param}": LowRankUpdate(key, kind, scale, a, b, experts * rows, cols, None, where, experts)}
    if kind != "expert":
        raise AdapterError(f"{where}: {key!r} is stored per expert in Instruct but transposed in the model")
    names, (part_rows, _) = expert_parts(f"{home}.{param}", shape, instruct.tensors)
    per = len(names) // experts  # tensors per expert: gate and up, or down
    return {
        n: LowRankUpdate(key, kind, scale, a, b, part_rows, cols, None, where, experts, k // per, (k % per) * part_rows)
        for k, n in enumerate(names)
    }


def orientation(shape: tuple, a: TensorInfo, b: TensorInfo, instruct: Checkpoint) -> str | None:
    """'expert' when the parameter is [E, out, in] for these factors (PEFT swaps in and out for a 3-D parameter
    that is not `is_transposed`), 'expert_t' when [E, in, out]; for a square one, Instruct's model type decides
    ('square' when it is unknown); None when neither fits."""
    out_in = (shape[1], shape[2]) == (b.shape[0], a.shape[1])
    in_out = (shape[1], shape[2]) == (a.shape[1], b.shape[0])
    if out_in and in_out:
        transposed = experts_transposed(instruct)
        return "square" if transposed is None else "expert_t" if transposed else "expert"
    return "expert" if out_in else "expert_t" if in_out else None
