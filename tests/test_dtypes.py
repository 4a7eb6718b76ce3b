"""Every dtype the reference safetensors (0.8) writes is read: a file it accepts is never refused for its dtypes. A
tensor of a float dtype graftcore does no arithmetic on (outside a quantized format) is copied byte for byte where
Instruct alone has it, and refused, naming it, where an input would update it."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from helpers import llama_tensors, write_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from graftcore.io.safetensors_file import read_header

ODD = {  # name -> a tensor torch and safetensors write in that dtype
    "extra.e8m0": lambda: torch.tensor([0.5, 1.0, 2.0, 4.0]).to(torch.float8_e8m0fnu),
    "extra.fnuz": lambda: torch.tensor([1.5, -2.0, 0.25]).to(torch.float8_e4m3fnuz),
    "extra.e5m2fnuz": lambda: torch.tensor([1.0, -3.0]).to(torch.float8_e5m2fnuz),
    "extra.e5m2": lambda: torch.tensor([1.0, -3.0, 7.0]).to(torch.float8_e5m2),
    "extra.c64": lambda: torch.tensor([1 + 2j, -0.5j], dtype=torch.complex64),
    "extra.f4": lambda: torch.arange(12, dtype=torch.uint8).view(torch.float4_e2m1fn_x2).view(3, 4),
}


def dtype_in_file(path, name) -> str:
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n])[name]["dtype"]


def test_every_dtype_of_the_reference_library_is_read(tmp_path):
    tensors = {name: make() for name, make in ODD.items()}
    save_file(tensors, tmp_path / "m.safetensors")
    header = read_header(tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        for name in ODD:
            info = header.tensors[name]
            assert info.dtype == dtype_in_file(tmp_path / "m.safetensors", name)
            want = f.get_tensor(name)
            assert info.end - info.start == want.numel() * want.element_size(), name


def test_a_sub_byte_tensor_that_is_not_whole_bytes_is_refused(tmp_path, cli):
    header = json.dumps({"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    code, _, err = cli("merge", "--base", tmp_path / "m.safetensors", "--tuned", tmp_path / "m.safetensors",
                       "--instruct", tmp_path / "m.safetensors", "--output", tmp_path / "out")  # fmt: skip
    assert code == 2 and "'w'" in err and "F4[3] is not a whole number of bytes" in err, err


OPAQUE = [n for n in ODD if n != "extra.e5m2"]  # an F8_E4M3/E5M2 tensor says the model is FP8: it needs its config


def test_odd_dtypes_of_instruct_alone_are_copied_as_they_are(tmp_path, cli):
    base, tuned = llama_tensors(0), llama_tensors(1)
    instruct = {**llama_tensors(2), **{name: ODD[name]() for name in OPAQUE}}
    refs = [write_checkpoint(tmp_path / r, t) for r, t in (("base", base), ("tuned", tuned), ("inst", instruct))]
    code, _, err = cli(
        "merge", "--base", refs[0], "--tuned", refs[1], "--instruct", refs[2], "--output", tmp_path / "out"
    )
    assert code == 0, err
    with (
        safe_open(tmp_path / "out" / "model.safetensors", "pt") as got,
        safe_open(refs[2] / "model.safetensors", "pt") as want,
    ):
        for name in OPAQUE:
            a, b = got.get_tensor(name), want.get_tensor(name)
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert bytes(a.contiguous().view(torch.uint8).numpy()) == bytes(b.contiguous().view(torch.uint8).numpy()), (
                name
            )
    code, out, err = cli("verify", tmp_path / "out", "--recompute", 1000)  # every chunk, the copied bytes too
    assert code == 0, err
    for name in OPAQUE:
        assert dtype_in_file(tmp_path / "out" / "model.safetensors", name) == dtype_in_file(
            refs[2] / "model.safetensors", name
        )


@pytest.mark.parametrize("name", ["extra.e8m0", "extra.f4", "extra.c64"])
def test_an_odd_dtype_an_input_updates_is_refused(name, tmp_path, cli):
    odd = {name: ODD[name]()}
    refs = [
        write_checkpoint(tmp_path / r, {**llama_tensors(k), **odd}) for k, r in enumerate(("base", "tuned", "inst"))
    ]
    code, _, err = cli(
        "merge", "--base", refs[0], "--tuned", refs[1], "--instruct", refs[2], "--output", tmp_path / "out"
    )
    assert code == 2 and repr(name) in err and "does no arithmetic" in err and str(refs[2]) in err, err
    assert "Traceback" not in err and not (tmp_path / "out" / "graftcore.json").exists()
    args = ["--base", refs[0], "--tuned", refs[1], "--instruct", refs[2], "--output", tmp_path / "out2"]
    code, _, err = cli("merge", *args, "--exclude", name)
    assert code == 0, err
