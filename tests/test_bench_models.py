"""The benchmarks' models are models transformers runs: each FP8 preset's config (bench/make_fp8_checkpoints.py)
builds a DeepseekV3ForCausalLM on the meta device whose forward pass goes through (a config with DeepSeek-V3's
default 8 expert groups over 2 routed experts did not: "shape '[-1, 8, 0]' is invalid")."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parents[1] / "bench"


def fp8_generator():
    spec = importlib.util.spec_from_file_location("make_fp8_checkpoints", BENCH / "make_fp8_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


GENERATOR = fp8_generator()


@pytest.mark.parametrize("preset", list(GENERATOR.PRESETS))
def test_every_fp8_preset_is_a_model_transformers_runs(preset):
    doc = GENERATOR.config(GENERATOR.PRESETS[preset], quantized=False)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in doc.items() if k != "architectures"})
    assert type(config).__name__ == "DeepseekV3Config" and config.n_routed_experts == doc["n_routed_experts"]
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(config).to(torch.bfloat16)
        logits = model(torch.zeros(1, 4, dtype=torch.long)).logits
    assert tuple(logits.shape) == (1, 4, doc["vocab_size"])
