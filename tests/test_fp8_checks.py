"""FP8 outputs that cannot be written, measures that must not break a merge, and configs or scales that disagree
with the tensors: each refused before any output byte (dry runs included), or measured in float64 as stated."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import dequantize_fp8, load_folder, quantize_fp8, tiny_qwen3, write_checkpoint, write_fp8_checkpoint

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

BLOCK = (32, 32)
NAME = "model.layers.1.mlp.down_proj.weight"


def merge(cli, tmp_path, *extra, out="out", tuned=("tuned",)):
    tuned_args = [x for t in tuned for x in ("--tuned", tmp_path / t)]
    roles = ["--base", tmp_path / "base", *tuned_args, "--instruct", tmp_path / "instruct"]
    return cli("merge", *roles, "--output", tmp_path / out, "--quiet", *extra)


def state(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def assert_refused(code, err, tmp_path, *named):
    """Exit 2, one line naming each of `named`, no traceback, nothing that looks like a finished output."""
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in named:
        assert str(n) in err, (n, err)
    out = tmp_path / "out"
    assert not (out / "graftcore.json").exists()
    assert not out.exists() or not list(out.glob("*.safetensors")), sorted(out.iterdir())


def block_fp8_trio(tmp_path, scale_dtype, big=None):
    """Base and Instruct block FP8 with `scale_dtype` scales; tuned bf16 (or F32 when `big` is set: one element of
    NAME set to `big`)."""
    model = tiny_qwen3(0)
    config = model.config.to_dict()
    sd = state(model)
    write_fp8_checkpoint(tmp_path / "base", sd, config, BLOCK, scale_dtype)
    write_fp8_checkpoint(tmp_path / "instruct", sd, config, BLOCK, scale_dtype)
    tuned = {k: v.float() if big is not None else v for k, v in sd.items()}
    if big is not None:
        tuned[NAME] = tuned[NAME].clone()
        tuned[NAME][0, 0] = big
    write_checkpoint(tmp_path / "tuned", tuned, 1, config)


def compressed_tensors_trio(tmp_path, strategy="channel", scale_dtype=torch.float16, weights=None, big=None):
    """A compressed-tensors FP8 Instruct (NAME.weight_scale per channel or per tensor in `scale_dtype`) over bf16
    Base and tuned; `weights`: replaces the config group's weights scheme; `big`: one tuned element of NAME."""
    model = tiny_qwen3(0)
    config = model.config.to_dict()
    sd = state(model)
    inst = {}
    for n, t in sd.items():
        if t.dim() == 2 and ".layers." in n and "_proj" in n:
            block = (1, t.shape[1]) if strategy == "channel" else tuple(t.shape)
            q, s = quantize_fp8(t, block, scale_dtype)
            inst[n], inst[n[: -len("weight")] + "weight_scale"] = q, s if strategy == "channel" else s.view(1)
        else:
            inst[n] = t
    scheme = weights or {"num_bits": 8, "type": "float", "strategy": strategy}
    quant = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme}},
        "ignore": ["lm_head"],
    }
    write_checkpoint(tmp_path / "instruct", inst, 1, {**config, "quantization_config": quant})
    write_checkpoint(tmp_path / "base", sd, 1, config)
    tuned = dict(sd)
    if big is not None:
        tuned[NAME] = sd[NAME].clone()
        tuned[NAME][0, 0] = big
    write_checkpoint(tmp_path / "tuned", tuned, 1, config)


@pytest.mark.parametrize("kind", ["block fp8", "compressed-tensors"])
def test_a_scale_its_dtype_cannot_hold_is_refused(kind, tmp_path, cli):
    """An F16 scale (Qwen3-FP8's weight_scale_inv dtype, or compressed-tensors' F16 weight_scale) that the grafted
    block would need above 65504: exit 2 naming the tensor and its scale, not an Inf scale written with exit 0."""
    big = 3e7  # needs a scale of 3e7 / 448 = 67k > 65504
    scale = NAME[: -len("weight")] + ("weight_scale_inv" if kind == "block fp8" else "weight_scale")
    if kind == "block fp8":
        block_fp8_trio(tmp_path, torch.float16, big)
    else:
        compressed_tensors_trio(tmp_path, "channel", torch.float16, big=big)
    code, _, err = merge(cli, tmp_path)
    assert_refused(code, err, tmp_path, NAME, scale, tmp_path / "instruct", "--dtype bfloat16")
    code, _, err = merge(cli, tmp_path, "--dtype", "bfloat16", out="deq")  # what the error advises
    assert code == 0, err
    assert load_folder(tmp_path / "deq")[NAME][0, 0].float() == torch.tensor(big).bfloat16().float()


def update_error64(out: dict, instruct: dict, x: torch.Tensor, scale_name: str, block) -> float:
    """The definition in float64: sqrt(sum (deq(out) - x)^2 / sum (x - deq(I))^2) over the finite elements, with
    deq(.) = float32(q) * scale and x the float32 grafted values."""
    deq_out = dequantize_fp8(out[NAME], out[scale_name], block).double()
    deq_i = dequantize_fp8(instruct[NAME], instruct[scale_name], block).double()
    x = x.double()
    error = ((deq_out - x) ** 2).sum()
    update = ((x - deq_i) ** 2).sum()
    return math.sqrt(float(error) / float(update))


def test_the_update_error_of_a_huge_element_is_measured_in_float64(tmp_path, cli):
    """A tuned element of 2e19 (F32, scales F32: representable): its square overflows float32, but the merge
    finishes, graftcore.json is written, and the tensor's update error is the float64 definition."""
    block_fp8_trio(tmp_path, torch.float32, big=2e19)
    code, out, err = merge(cli, tmp_path)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "graftcore.json").read_text())
    got, base, tuned, instruct = (load_folder(tmp_path / r) for r in ("out", "base", "tuned", "instruct"))
    scale = NAME[: -len("weight")] + "weight_scale_inv"
    x = dequantize_fp8(instruct[NAME], instruct[scale], BLOCK) + (
        tuned[NAME] - dequantize_fp8(base[NAME], base[scale], BLOCK)
    )
    want = update_error64(got, instruct, x, scale, BLOCK)
    assert manifest["fp8"]["tensors"][NAME]["update_error"] == pytest.approx(want, rel=1e-9)
    assert manifest["fp8"]["update_error"] is not None and math.isfinite(manifest["fp8"]["update_error"])
    code, _, err = cli("verify", tmp_path / "out")
    assert code == 0, err


def test_the_update_error_of_two_deltas_is_the_float64_definition(tmp_path, cli):
    """compressed-tensors per-tensor scales, two tuned inputs: each tensor's recorded update error is the float64
    definition to 1e-9 (a float32 sum of squares was off in the 5th digit)."""
    compressed_tensors_trio(tmp_path, "tensor", torch.bfloat16)
    model = tiny_qwen3(0)
    sd = state(model)
    g = torch.Generator().manual_seed(3)
    for k, role in enumerate(("t1", "t2")):
        write_checkpoint(
            tmp_path / role,
            {n: (v.float() + 0.004 * (k + 1) * torch.randn(v.shape, generator=g)).to(v.dtype) for n, v in sd.items()},
            1,
            model.config.to_dict(),
        )
    code, _, err = merge(cli, tmp_path, tuned=("t1", "t2"))
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "graftcore.json").read_text())
    got, base, t1, t2, instruct = (load_folder(tmp_path / r) for r in ("out", "base", "t1", "t2", "instruct"))
    checked = 0
    for name, rec in manifest["fp8"]["tensors"].items():
        scale = name[: -len("weight")] + "weight_scale"
        block = tuple(instruct[name].shape)
        xi = dequantize_fp8(instruct[name], instruct[scale].view(1, 1), block)
        x = xi + (t1[name].float() - base[name].float())
        x = x + (t2[name].float() - base[name].float())
        deq_out = dequantize_fp8(got[name], got[scale].view(1, 1), block).double()
        error, update = ((deq_out - x.double()) ** 2).sum(), ((x.double() - xi.double()) ** 2).sum()
        assert rec["update_error"] == pytest.approx(math.sqrt(float(error / update)), rel=1e-9), name
        checked += 1
    assert checked == 14


def fp8_config_case(tmp_path, change):
    """A block FP8 trio whose Instruct config.json's quantization_config gets `change` applied."""
    block_fp8_trio(tmp_path, torch.float32)
    path = tmp_path / "instruct" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"] = change(cfg["quantization_config"])
    path.write_text(json.dumps(cfg))


def set_scales(tmp_path, role, fn, scale_suffix="weight_scale_inv"):
    """Rewrite every scale of `role`'s one-shard checkpoint through fn(scale) -> scale."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / role / "model.safetensors"
    tensors = load_file(path)
    for n in tensors:
        if n.endswith(scale_suffix):
            tensors[n] = fn(tensors[n])
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("dry_run", [False, True])
def test_configs_that_disagree_with_the_tensors(dry_run, tmp_path, cli):
    """scale_fmt that transformers does not know; ue8m0 declared over scales that are not powers of two;
    compressed-tensors strategy "tensor" over per-channel scales; type "int" or num_bits 4 over F8_E4M3: each exit
    2 naming the config (and the tensor), in a dry run too."""
    extra = ("--dry-run",) if dry_run else ()
    fp8_config_case(tmp_path, lambda q: {**q, "scale_fmt": "bogus"})
    code, _, err = merge(cli, tmp_path, *extra)
    assert_refused(code, err, tmp_path, "config.json", "scale_fmt", "'bogus'")

    fp8_config_case(tmp_path, lambda q: {**q, "scale_fmt": "ue8m0"})
    code, _, err = merge(cli, tmp_path, *extra)
    assert_refused(code, err, tmp_path, "instruct", "weight_scale_inv", "powers of two", "ue8m0")
    set_scales(tmp_path, "instruct", lambda s: torch.exp2(torch.ceil(torch.log2(s))))  # now powers of two
    code, _, err = merge(cli, tmp_path, *extra, out="ok")
    assert code == 0, err

    for scheme, named in (
        ({"num_bits": 8, "type": "float", "strategy": "tensor"}, "strategy tensor"),
        ({"num_bits": 8, "type": "int", "strategy": "channel"}, "'int'"),
        ({"num_bits": 4, "type": "float", "strategy": "channel"}, "num_bits 4"),
    ):
        compressed_tensors_trio(tmp_path, "channel", weights=scheme)
        code, _, err = merge(cli, tmp_path, *extra)
        assert_refused(code, err, tmp_path, "instruct", named)


def two_shard_trio(tmp_path):
    """Base and Instruct block FP8 in two shards (every scale in the second), tuned bf16."""
    model = tiny_qwen3(0)
    config = model.config.to_dict()
    sd = state(model)
    for r in ("base", "instruct"):
        write_fp8_checkpoint(tmp_path / r, sd, config, BLOCK, torch.float32, shards=2)
    write_checkpoint(tmp_path / "tuned", sd, 1, config)


BAD_SCALES = {"NaN": float("nan"), "Inf": float("inf"), "zero": 0.0, "negative": -1e-3}


@pytest.mark.parametrize("value", list(BAD_SCALES))
@pytest.mark.parametrize("role", ["base", "instruct"])
def test_bad_scales_are_found_at_plan_time(value, role, tmp_path, cli):
    """A NaN, Inf, zero or negative scale in the second of two shards: refused by the dry run too, and by the merge
    before any shard is written (it used to be found after shard 1 was finished)."""
    two_shard_trio(tmp_path)
    from safetensors.torch import load_file, save_file

    path = tmp_path / role / "model-00002-of-00002.safetensors"  # the scales' shard
    tensors = load_file(path)
    scale = NAME[: -len("weight")] + "weight_scale_inv"
    tensors[scale][0, 0] = BAD_SCALES[value]
    save_file(tensors, path, metadata={"format": "pt"})
    for extra in (("--dry-run",), ()):
        code, _, err = merge(cli, tmp_path, *extra)
        assert_refused(code, err, tmp_path, path, scale)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_an_index_that_omits_a_scale_is_refused(tmp_path, cli):
    """Instruct's index leaves out a scale its shard holds (transformers would not load it): exit 2 naming the
    index and the tensor."""
    two_shard_trio(tmp_path)
    index = tmp_path / "instruct" / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    scale = NAME[: -len("weight")] + "weight_scale_inv"
    del doc["weight_map"][scale]
    index.write_text(json.dumps(doc))
    code, _, err = merge(cli, tmp_path, "--dry-run")
    assert_refused(code, err, tmp_path, index, scale, "does not map it")
