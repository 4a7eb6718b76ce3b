"""The reader and writer against the reference safetensors library."""

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from graftcore.errors import CheckpointError, OutputError
from graftcore.io.safetensors_file import ShardWriter, read_header
from graftcore.stream.readers import read_elements


def test_writer_output_loads_with_safetensors_and_is_aligned(tmp_path):
    tensors = {
        "a": torch.randn(3, 5).bfloat16(),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(9).half(),
        "d": torch.tensor([True, False]),
        "e": torch.randn(2, 2),
    }
    order = sorted(tensors, key=lambda n: -tensors[n].element_size())
    codes = {torch.bfloat16: "BF16", torch.int64: "I64", torch.float16: "F16", torch.bool: "BOOL", torch.float32: "F32"}
    w = ShardWriter(
        tmp_path / "x.safetensors",
        [(n, codes[tensors[n].dtype], tuple(tensors[n].shape)) for n in order],
        {"format": "pt"},
    )
    for n in order:
        w.append(tensors[n])
    assert not (tmp_path / "x.safetensors").exists() and (tmp_path / "x.safetensors.partial").exists()
    w.finish()
    assert not (tmp_path / "x.safetensors.partial").exists()
    with safe_open(tmp_path / "x.safetensors", "pt") as h:
        assert h.metadata() == {"format": "pt"}
        for n, t in tensors.items():
            assert torch.equal(h.get_tensor(n), t)
    header = read_header(tmp_path / "x.safetensors")
    assert header.data_start % 8 == 0
    for info in header.tensors.values():
        assert (info.start - header.data_start) % torch.tensor([], dtype=tensors[info.name].dtype).element_size() == 0


def test_writer_refuses_to_finish_short_and_aborts_cleanly(tmp_path):
    w = ShardWriter(tmp_path / "x.safetensors", [("a", "F32", (4,))])
    w.append(torch.zeros(2))
    with pytest.raises(OutputError, match="8 planned|planned"):
        w.finish()
    w.abort()
    assert list(tmp_path.iterdir()) == []
    w = ShardWriter(tmp_path / "y.safetensors", [("a", "F32", (1,))])
    with pytest.raises(OutputError, match="more data"):
        w.append(torch.zeros(2))
    w.abort()


def test_element_reads_match_reference_library(tmp_path):
    t = torch.randn(1000).bfloat16()
    save_file({"t": t, "u": torch.randn(3)}, tmp_path / "m.safetensors")
    header = read_header(tmp_path / "m.safetensors")
    assert torch.equal(read_elements(tmp_path / "m.safetensors", header.tensors["t"]), t)
    assert torch.equal(read_elements(tmp_path / "m.safetensors", header.tensors["t"], 17, 503), t[17:503])


def test_metadata_must_be_strings(tmp_path):
    import json
    import struct

    raw = json.dumps({"__metadata__": {"a": 1}}).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="__metadata__"):
        read_header(tmp_path / "m.safetensors")


def test_a_name_given_twice_is_refused_as_the_reference_parser_refuses_it(tmp_path, cli):
    """Python's json keeps the last entry of a name given twice; the reference parser reads every entry and
    refuses the file. The first entry here is invalid, the second valid: accepting it would read the file as the
    reference library never would."""
    import struct

    name = "model.layers.0.self_attn.q_proj.weight"
    raw = f'{{"{name}": {{"dtype": "NOPE"}}, "{name}": {{"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}}}'
    raw = raw.encode()
    path = tmp_path / "tuned" / "model.safetensors"
    path.parent.mkdir()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(SafetensorError, match="duplicate|twice|NOPE|unknown"):  # the reference library, independently
        with safe_open(path, "pt") as h:
            h.keys()
    with pytest.raises(CheckpointError, match=f"{path}: header names '{name}' twice"):
        read_header(path)
    save_file({name: torch.zeros(2, dtype=torch.bfloat16)}, tmp_path / "model.safetensors")
    for role in ("base", "instruct"):
        (tmp_path / role).mkdir()
        (tmp_path / role / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
    code, _, err = cli(
        "merge",
        "--base",
        tmp_path / "base",
        "--tuned",
        tmp_path / "tuned",
        "--instruct",
        tmp_path / "instruct",
        "--output",
        tmp_path / "out",
        "--quiet",
    )
    assert (
        code == 2 and f"header names '{name}' twice" in err and str(path) in err and len(err.strip().splitlines()) == 1
    ), err
    assert not (tmp_path / "out").exists()
