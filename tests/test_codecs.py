"""The codec layer: the registry finds each format by its quantization_config, and a codec defined outside the
package (a toy INT8 format with one F32 scale per row, written here in one class) is read and written by every
pass (merge, similarity, verify --recompute) through the protocol alone: none of the passes names a format."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import llama_tensors, write_checkpoint

import graftcore
from graftcore.codecs import codec_for_config, codec_named, register
from graftcore.codecs.registry import REGISTRY, QuantFormat
from graftcore.errors import CheckpointError
from graftcore.io.safetensors_file import Quantized


def test_the_registry_reads_each_format_by_its_config():
    assert codec_for_config({"quant_method": "fp8"}, "c.json").name == "fp8"
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    assert codec_for_config(ct, "c.json") is codec_named("float-quantized")
    assert codec_for_config({"quant_method": "compressed-tensors"}, "c.json").name == "float-quantized"
    with pytest.raises(CheckpointError, match=r"^c.json: quantization_config.quant_method is 'awq'; graftcore reads"):
        codec_for_config({"quant_method": "awq"}, "c.json")
    with pytest.raises(CheckpointError, match=r"^c.json: compressed-tensors format 'int-quantized'; .*float-quant"):
        codec_for_config({"quant_method": "compressed-tensors", "format": "int-quantized"}, "c.json")


class RowInt8:
    """A toy format: `NAME.weight` I8 [rows, cols] and `NAME.row_scale` F32 [rows]; value = q * scale[row]. Encoding:
    keep Instruct's row scale s while every |x| / s <= 127.5, else s = amax / 127; q = round-half-even(x / s),
    clamped to +-127."""

    name = "toy-int8"
    kind = "INT8"
    methods = ("toy-int8",)
    config_keys = ("quantization_config",)
    companion_suffixes = (".row_scale",)

    def describe(self):
        return "'toy-int8'"

    def claims(self, config):
        return config.get("quant_method") == "toy-int8"

    def read_config(self, config, where):
        return QuantFormat(self.name, config)

    def stored_dtypes(self):
        return ("I8",)

    def fold(self, tensors, fmt, locate, ref):
        out = {}
        for name, info in tensors.items():
            if info.dtype == "I8":
                scale = tensors[name[: -len("weight")] + "row_scale"]
                out[name] = Quantized(
                    name, "I8", info.shape, info.file, info.start, info.end, scale, (1, info.shape[1]), self.name
                )
        return out

    def parts(self, q):
        return (q, q.scale)

    def check_values(self, q, part, data, where):
        if not all(v > 0 for v in torch.frombuffer(bytearray(data), dtype=torch.float32).tolist()):
            raise CheckpointError(f"{where}: tensor {part.name!r}: a row scale is not positive")

    def row_band(self, q):
        return 1

    def row_reads(self, q, row0, row1):
        return ((q, row0 * q.cols, row1 * q.cols), (q.scale, row0, row1))

    def check_read(self, q, k, t, where, role=""):
        pass

    def decode(self, q, parts, row0, scratch=None, buffer="decoded"):
        weight, scale = parts
        return weight.view(-1, q.cols).float() * scale.view(-1, 1)

    def output_entries(self, q):
        return [(q.name, "I8", q.shape), (q.scale.name, "F32", tuple(q.scale.shape))]

    def encoder(self, q, where, threads=None):
        return RowInt8Encoder(q)


class RowInt8Encoder:
    def __init__(self, q):
        self.q = q
        self.scale = torch.empty(q.shape[0])
        self.rescaled = 0

    def encode(self, out, x, row0, instruct, decoded, scratch=None):
        x = x.view(-1, self.q.cols)
        kept = instruct[1].float()
        amax = x.abs().amax(dim=1)
        s = torch.where(amax / kept > 127.5, amax / 127, kept)
        self.rescaled += int((s != kept).sum())
        self.scale[row0 : row0 + x.shape[0]] = s
        out.view(torch.int8).view(-1, self.q.cols).copy_(torch.round(x / s.view(-1, 1)).clamp(-127, 127))

    def write_entry(self, k, out, lo, hi):
        out.copy_(self.scale[lo:hi])

    def entries_for_rows(self, row0, row1):
        return [(self.q.scale.name, row0, row1, self.scale[row0:row1].clone())]

    def record(self):
        return {"update_error": 0.0, "rescaled_blocks": self.rescaled, "blocks": self.q.shape[0]}


@pytest.fixture
def toy_codec():
    codec = register(RowInt8())
    yield codec
    del REGISTRY[codec.name]


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, per-row scale float32) of a 2-D weight: s = amax / 127 per row (1 for a zero row)."""
    amax = w.float().abs().amax(dim=1)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(w.float() / s.view(-1, 1)).clamp(-127, 127).to(torch.int8), s


def write_int8(folder, sd: dict):
    tensors = {}
    for n, t in sd.items():
        if t.dim() == 2 and "_proj" in n:
            tensors[n], tensors[n[: -len("weight")] + "row_scale"] = int8_rows(t)
        else:
            tensors[n] = t
    return write_checkpoint(
        folder, tensors, 1, {"model_type": "llama", "quantization_config": {"quant_method": "toy-int8"}}
    )


def test_a_codec_registered_outside_the_package_runs_every_pass(toy_codec, tmp_path):
    base_sd, inst_sd = llama_tensors(0), llama_tensors(1)
    tuned_sd = {
        n: (t.float() + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(2))).to(t.dtype)
        for n, t in base_sd.items()
    }
    base, inst = write_int8(tmp_path / "base", base_sd), write_int8(tmp_path / "inst", inst_sd)
    tuned = write_checkpoint(tmp_path / "tuned", tuned_sd)
    out = tmp_path / "out"
    graftcore.graft(base=str(base), tuned=str(tuned), instruct=str(inst), output=str(out), quiet=True, chunk_size=256)

    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    stored_i = load_file(inst / "model.safetensors")
    stored_b = load_file(base / "model.safetensors")
    checked = 0
    for n, t in tuned_sd.items():
        if n not in stored_i or stored_i[n].dtype != torch.int8:
            continue
        scale_name = n[: -len("weight")] + "row_scale"
        # the rule written plainly, row by row, in float32
        for r in range(t.shape[0]):
            si, sb = float(stored_i[scale_name][r]), float(stored_b[scale_name][r])
            xi = stored_i[n][r].float() * si
            x = xi + (t[r].float() - stored_b[n][r].float() * sb)
            amax = float(x.abs().max())
            s = torch.tensor(amax, dtype=torch.float32) / 127 if amax / si > 127.5 else torch.tensor(si)
            assert math.isclose(float(got[scale_name][r]), float(s), rel_tol=0, abs_tol=0), (n, r)
            want = torch.round(x / s).clamp(-127, 127).to(torch.int8)
            assert torch.equal(got[n][r], want), (n, r)
        checked += 1
    assert checked >= 4
    assert json.loads((out / "config.json").read_text())["quantization_config"] == {"quant_method": "toy-int8"}
    record = json.loads((out / "graftcore.json").read_text())["fp8"]
    assert record["blocks"] == sum(t.shape[0] for n, t in stored_i.items() if t.dtype == torch.int8)

    report = graftcore.verify(str(out), recompute=20, seed=0)
    assert report.chunks_recomputed >= 20

    sim = graftcore.similarity(base=str(base), instruct=str(inst), tuned=str(tuned), quiet=True)
    name = next(n for n, t in stored_i.items() if t.dtype == torch.int8)
    row = next(t for t in sim.tensors if t.name == name)
    xi = stored_i[name].float() * stored_i[name[: -len("weight")] + "row_scale"].view(-1, 1)
    xb = stored_b[name].float() * stored_b[name[: -len("weight")] + "row_scale"].view(-1, 1)
    want = float((xi.double() - xb.double()).norm() / xb.double().norm())
    assert row.metrics("instruct")["rel_l2"] == pytest.approx(want, rel=1e-6)
