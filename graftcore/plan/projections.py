"""`--targets projections`: the tensors of the modules PEFT's `target_modules="all-linear"` adapts, on Instruct's
architecture, so that a full fine-tune grafted with `projections` updates what an all-linear LoRA would.

PEFT resolves "all-linear" on a model: every `nn.Linear` and `Conv1D` module but the output embedding
(peft.tuners.tuners_utils._maybe_include_all_linear_layers), and on the MoE families transformers 5 fuses
(Mixtral's, Qwen2-MoE's) also the experts' 3-D parameters and the router, as parameters
(peft.utils.transformers_weight_conversion._convert_peft_config_moe). The experts of the other MoE families
(GPT-OSS, PhiMoE, GraniteMoE, ...) are 3-D parameters too, which "all-linear" does not reach although they are
the MLP's linear maps (a LoRA reaches them through `target_parameters`): `projections` adds them, so that a full
fine-tune's experts are grafted on every MoE architecture. Here that model is Instruct's
`config.json` built by transformers on the meta device (no weights, a few ms), PEFT's `get_peft_model` is run on
it, and each adapted module's parameters (weight, bias; an expert parameter and its `_bias`) are read back in
Instruct's file naming through the renaming transformers publishes for the architecture
(`conversion_mapping.get_model_conversion_mapping`, `core_model_loading.rename_source_key`: the names
`from_pretrained` maps the files' tensors to).

Without transformers and PEFT installed, or for an architecture they cannot build (custom code), the name rules
of options.PROJECTION decide (less convolutions, by shape), and the plan says so.

Example:
    >>> chosen = projection_tensors(open_checkpoint("Qwen/Qwen3-8B"), notes=[])          # doctest: +SKIP
    >>> "model.layers.0.self_attn.q_proj.weight" in chosen, "model.norm.weight" in chosen  # doctest: +SKIP
    (True, False)
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

from graftcore import interrupts
from graftcore.options import PROJECTION
from graftcore.sources.checkpoint import Checkpoint

CONFIG = "config.json"


def projection_tensors(instruct: Checkpoint, notes: list[str]) -> frozenset[str]:
    """Instruct's tensor names that `--targets projections` selects (see the module docstring): PEFT's
    all-linear, or the name rules (name_rule_tensors) with a note saying why."""
    chosen = peft_all_linear(instruct, notes)
    return name_rule_tensors(instruct) if chosen is None else chosen


def name_rule_tensors(instruct: Checkpoint) -> frozenset[str]:
    """The tensors options.PROJECTION names, less convolutions (a weight of more than 2 dimensions that is not
    an MoE expert tensor: a vision tower's patch embedding)."""
    return frozenset(
        n for n, info in instruct.tensors.items() if PROJECTION.search(n) and (len(info.shape) <= 2 or ".experts." in n)
    )


def peft_all_linear(instruct: Checkpoint, notes: list[str]) -> frozenset[str] | None:
    """PEFT's all-linear on Instruct's architecture, in Instruct's names; None, with a note, where it cannot
    be had."""
    if CONFIG not in instruct.extra_files():
        notes.append(f"{instruct.ref}: no {CONFIG}, so --targets projections selects by the name rules")
        return None
    try:
        with interrupts.deferred(), quiet_libraries():  # torch's import must not be cut by a Ctrl-C
            memory = adapted_parameters(str(instruct.extra_file_path(CONFIG).parent))
    except ImportError as e:
        notes.append(
            f"--targets projections selects by the name rules: {e.name or e} is not installed (with transformers "
            f"and peft installed it is PEFT's all-linear on Instruct's architecture)"
        )
        return None
    except Exception as e:  # noqa: BLE001 - any failure to build the architecture falls back to the name rules
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        notes.append(
            f"{instruct.extra_file_path(CONFIG)}: transformers could not build the architecture on the meta device "
            f"({first}), so --targets projections selects by the name rules"
        )
        return None
    to_memory, selected = memory
    return frozenset(name for name in instruct.tensors if to_memory(name) in selected)


def adapted_parameters(folder: str):
    """(file name -> in-memory name, the in-memory names of the parameters PEFT's all-linear LoRA adapts) of the
    model whose config.json is in `folder`."""
    import peft
    import torch
    import transformers
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)  # never a folder's code
    cls = model_class(transformers, config)
    with torch.device("meta"):
        model = cls._from_config(config)
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)

    def to_memory(name: str) -> str:
        return rename_source_key(name, renamings, converters, prefix, meta)[0]

    selected = {  # MoE experts held as parameters (not nn.Linear), which PEFT reaches only in some families
        f"{path}.{name}"
        for path, module in model.named_modules()
        if ".experts." in f".{path}." and not isinstance(module, torch.nn.Linear)
        for name, _ in module.named_parameters(recurse=False)
    }
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear", r=1, lora_alpha=1))
    for path, module in wrapped.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        owner = path.removeprefix("base_model.model.").replace(".base_layer", "")
        parameter = getattr(module, "parameter_name", None)  # a ParamWrapper: one parameter of the module
        if parameter is not None:
            selected |= {f"{owner}.{parameter}", f"{owner}.{parameter}_bias"}
        else:
            selected |= {f"{owner}.weight", f"{owner}.bias"}
    return to_memory, selected


def model_class(transformers, config):
    """The class config.json's `architectures` names (what saved Instruct), else the causal-LM Auto class."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM._model_mapping[type(config)]


@contextlib.contextmanager
def quiet_libraries():
    """Building a model from a config makes transformers and PEFT warn (token ids, missing generation
    defaults): none of it concerns the user of a merge, so warnings and their logs are held back here."""
    loggers = [logging.getLogger(n) for n in ("transformers", "peft")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
