"""`graftcore similarity`: every metric against the float64 formula written plainly here, on the tensors loaded
whole from the generated checkpoints.

    sigma(X, B) = sum|X - B| / (sum|X| + sum|B|)     rel L2 = ||X - B|| / ||B||     cosine = sum X*B / (||X|| ||B||)
    ratio       = ||T - B|| / ||I - B||

A group (a layer, a module kind, the whole model) is measured as the concatenation of its tensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time

import pytest
import torch
from helpers import llama_tensors, load_folder, make_adapter, tiny_llama_config, write_checkpoint
from safetensors.torch import load_file

import graftcore
from graftcore.analysis.similarity import FIGURE_PX

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def metrics(x: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """The definitions, in float64, on whole tensors."""
    x, b = x.double().flatten(), b.double().flatten()
    d = x - b
    return {
        "sigma": (d.abs().sum() / (x.abs().sum() + b.abs().sum())).item(),
        "rel_l2": (torch.sqrt((d * d).sum()) / torch.sqrt((b * b).sum())).item(),
        "cosine": ((x * b).sum() / (torch.sqrt((x * x).sum()) * torch.sqrt((b * b).sum()))).item(),
    }


def ratio(t, i, b) -> float:
    t, i, b = t.double().flatten(), i.double().flatten(), b.double().flatten()
    return (torch.sqrt(((t - b) ** 2).sum()) / torch.sqrt(((i - b) ** 2).sum())).item()


def kind_of(name: str) -> str:
    """The module kinds of the Llama names of helpers.llama_tensors, spelled out."""
    for p in PROJ:
        if f".{p}." in name:
            return p
    if "embed_tokens" in name:
        return "embed"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in name:
        return "norm"
    return "other"


def layer_of(name: str):
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.double().flatten() for t in tensors])


def check_pair(got: dict, want: dict, rel: float = 1e-6):
    for key in ("sigma", "rel_l2", "cosine"):
        assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-15, nan_ok=True), key  # cosine: NaN for a zero Base


@pytest.fixture
def family(tmp_path):
    """Base (bf16, 1 shard), Instruct (fp16, 2 shards) and two fine-tunes of Base (fp32 in 3 shards, bf16 in 2)."""
    base = llama_tensors(1)
    instruct = llama_tensors(5, torch.float16, noise=5e-3)
    tuned = [llama_tensors(2, torch.float32, noise=2e-3), llama_tensors(3, noise=8e-3)]
    paths = {
        "base": write_checkpoint(tmp_path / "base", base, 1),
        "instruct": write_checkpoint(tmp_path / "instruct", instruct, 2),
        "tuned": [write_checkpoint(tmp_path / "t1", tuned[0], 3), write_checkpoint(tmp_path / "t2", tuned[1], 2)],
    }
    return paths, base, instruct, tuned


@pytest.mark.parametrize("chunk", [None, 1000])
def test_every_tensor_and_every_aggregate_against_float64(family, chunk):
    paths, base, instruct, tuned = family
    report = graftcore.similarity(
        base=paths["base"], instruct=paths["instruct"], tuned=paths["tuned"], quiet=True, chunk_size=chunk
    )
    assert report.roles == ["instruct", "tuned", "tuned2"]
    assert [t.name for t in report.tensors] == list(load_folder(paths["instruct"]))  # every tensor, Instruct's order
    xs = {"instruct": instruct, "tuned": tuned[0], "tuned2": tuned[1]}
    for t in report.tensors:
        n = t.name
        assert (t.kind, t.layer, t.numel) == (kind_of(n), layer_of(n), base[n].numel()), n
        for role, x in xs.items():
            check_pair(t.metrics(role), metrics(x[n], base[n]))
            if role != "instruct":
                assert t.metrics(role)["ratio"] == pytest.approx(ratio(x[n], instruct[n], base[n]), rel=1e-6), n

    groups = [(report.model, list(base))]
    groups += [(report.kinds[k], [n for n in base if kind_of(n) == k]) for k in {kind_of(n) for n in base}]
    groups += [(report.layers[k], [n for n in base if layer_of(n) == k]) for k in {layer_of(n) for n in base}]
    assert set(report.kinds) == {kind_of(n) for n in base} and set(report.layers) == {0, 1, None}
    for group, names in groups:
        assert (group.tensors, group.numel) == (len(names), sum(base[n].numel() for n in names)), group.name
        b = cat([base[n] for n in names])
        for role, x in xs.items():
            check_pair(group.metrics(role), metrics(cat([x[n] for n in names]), b))
            if role != "instruct":
                want = ratio(cat([x[n] for n in names]), cat([instruct[n] for n in names]), b)
                assert group.metrics(role)["ratio"] == pytest.approx(want, rel=1e-6), group.name
    # the tuned2 update (noise 8e-3) is larger than the post-training gap (5e-3), tuned's (2e-3) smaller
    assert report.model.metrics("tuned")["ratio"] < 1 < report.model.metrics("tuned2")["ratio"]


def test_tight_read_buffers_do_not_stall(family):
    """Steps taken but not yet handed to a compute thread pin their read buffers: with a ring of 2 buffers of one
    step each, handing steps over 4 at a time would wait forever for a third buffer. The same sums either way."""
    import threading

    paths, base, instruct, tuned = family
    got = []
    kw = dict(base=paths["base"], instruct=paths["instruct"], tuned=paths["tuned"], quiet=True)
    run = threading.Thread(
        target=lambda: got.append(
            graftcore.similarity(**kw, chunk_size=512, read_buffer="4KiB", read_depth=2, read_workers=1)
        ),
        daemon=True,
    )
    run.start()
    run.join(60)
    assert got, "similarity stalled"
    want = graftcore.similarity(**kw)
    for a, b in zip(got[0].tensors, want.tensors):
        for role in want.roles:
            check_pair(a.metrics(role), b.metrics(role), rel=1e-9)


def test_identical_and_sign_flipped_pairs(tmp_path):
    base = llama_tensors(1, torch.float32)
    base["model.zeros"] = torch.zeros(5, 3)  # identical all-zero tensors: sigma 0 (0 / 0 read as 0), cosine undefined
    b = write_checkpoint(tmp_path / "base", base, 2)
    flipped = write_checkpoint(tmp_path / "flipped", {n: -t for n, t in base.items()}, 1)
    for instruct in (b, write_checkpoint(tmp_path / "copy", base, 1)):  # the same folder twice, and a copy
        report = graftcore.similarity(base=b, instruct=instruct, quiet=True)
        for s in [report.model, *report.tensors]:
            m = s.metrics("instruct")
            assert m["sigma"] == 0 and m["rel_l2"] == 0, s.name
            assert m["cosine"] == pytest.approx(1, abs=1e-12) if s.name != "model.zeros" else math.isnan(m["cosine"]), (
                s.name
            )
    report = graftcore.similarity(base=b, instruct=flipped, quiet=True)
    for s in [report.model, *report.kinds.values(), *report.tensors]:
        if s.pairs["instruct"].sq_base == 0:  # model.zeros, and the kind "other" it alone makes
            continue
        m = s.metrics("instruct")
        assert m["sigma"] == 1 and m["rel_l2"] == pytest.approx(2, rel=1e-12), s.name
        assert m["cosine"] == pytest.approx(-1, abs=1e-12), s.name


def test_grown_vocabulary_is_measured_over_the_shared_rows(tmp_path):
    base, tuned, instruct = llama_tensors(1), llama_tensors(2, noise=2e-3), llama_tensors(5, noise=5e-3)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):  # 4 chat tokens added to the embedding and the head
        instruct[n] = torch.cat([instruct[n], torch.randn(4, 32).bfloat16()])
    paths = [
        write_checkpoint(tmp_path / r, x, k) for k, (r, x) in enumerate((("b", base), ("t", tuned), ("i", instruct)), 1)
    ]
    report = graftcore.similarity(
        base=paths[0], tuned=paths[1], instruct=paths[2], output=tmp_path / "out", quiet=True, chunk_size=700
    )
    by_name = {t.name: t for t in report.tensors}
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert instruct[n].shape[0] == 100 and by_name[n].rows == 96 and by_name[n].numel == base[n].numel()
        check_pair(by_name[n].metrics("instruct"), metrics(instruct[n][:96], base[n]))
        check_pair(by_name[n].metrics("tuned"), metrics(tuned[n], base[n]))
        assert any(note.startswith(f"{n}: Instruct has 4 more rows") for note in report.notes)
    shared = [instruct[n][: base[n].shape[0]] for n in base]
    check_pair(report.model.metrics("instruct"), metrics(cat(shared), cat(list(base.values()))))
    doc = json.loads((tmp_path / "out" / "similarity.json").read_text())
    assert doc["tensors"]["lm_head.weight"]["measured_rows"] == 96 and doc["tensors"]["lm_head.weight"]["shape"] == [
        100,
        32,
    ]

    bad = dict(instruct, **{"lm_head.weight": torch.zeros(96, 40, dtype=torch.bfloat16)})  # another column count
    write_checkpoint(tmp_path / "bad", bad, 1)
    with pytest.raises(
        graftcore.MismatchError, match=r"bad/model.safetensors: tensor 'lm_head.weight' is \[96, 40\] in Instruct"
    ):
        graftcore.similarity(base=paths[0], instruct=tmp_path / "bad", quiet=True)


def test_nan_in_an_input_is_a_note_and_null_in_json(tmp_path):
    base, instruct = llama_tensors(1), llama_tensors(5, noise=5e-3)
    instruct["model.layers.1.mlp.up_proj.weight"][3, 7] = float("nan")
    b, i = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "i", instruct)
    report = graftcore.similarity(base=b, instruct=i, output=tmp_path / "out", quiet=True)
    by_name = {t.name: t for t in report.tensors}
    assert math.isnan(by_name["model.layers.1.mlp.up_proj.weight"].metrics("instruct")["sigma"])
    assert math.isnan(report.model.metrics("instruct")["sigma"]) and not math.isnan(
        report.layers[0].metrics("instruct")["sigma"]
    )
    assert "model.layers.1.mlp.up_proj.weight: NaN/Inf in instruct or base; its metrics are NaN" in report.notes
    doc = json.loads((tmp_path / "out" / "similarity.json").read_text())
    assert doc["tensors"]["model.layers.1.mlp.up_proj.weight"]["pairs"]["instruct"]["sigma"] is None


def test_json_png_and_the_missing_matplotlib(family, tmp_path, monkeypatch):
    paths, base, instruct, tuned = family
    t0 = time.perf_counter()
    report = graftcore.similarity(
        base=paths["base"],
        instruct=paths["instruct"],
        tuned=paths["tuned"][0],
        output=tmp_path / "out",
        quiet=True,
        targets="projections",
    )
    wall = time.perf_counter() - t0
    doc = json.loads((tmp_path / "out" / "similarity.json").read_text())
    assert doc["graftcore_version"] == graftcore.__version__ and 0 < doc["seconds"] <= wall
    assert doc["inputs"]["base"] == {
        "ref": str(paths["base"]),
        "revision": None,
        "fingerprint": doc["inputs"]["base"]["fingerprint"],
    }
    assert doc["options"]["targets"] == "projections" and list(doc["inputs"]) == ["instruct", "base", "tuned"]
    assert sorted(doc["tensors"]) == sorted(n for n in base if kind_of(n) in PROJ)  # the rest: not selected
    assert {s["name"] for s in doc["skipped"]} == {n for n in base if kind_of(n) not in PROJ}
    q = "model.layers.1.self_attn.q_proj.weight"
    entry = doc["tensors"][q]["pairs"]["tuned"]
    check_pair(entry, metrics(tuned[0][q], base[q]))
    t, b = tuned[0][q].double(), base[q].double()
    assert entry["sums"]["abs_diff"] == pytest.approx((t - b).abs().sum().item(), rel=1e-6)
    assert entry["sums"]["dot"] == pytest.approx((t * b).sum().item(), rel=1e-6)
    assert doc["model"]["pairs"]["instruct"]["sigma"] == report.model.metrics("instruct")["sigma"]
    assert set(doc["layers"]) == {"0", "1"} and "0/q_proj" in doc["layer_kinds"]

    png = (tmp_path / "out" / "similarity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == FIGURE_PX == (800, 450)
    assert report.png_path == tmp_path / "out" / "similarity.png"

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    (tmp_path / "no-plot").mkdir()
    (tmp_path / "no-plot" / "similarity.png").write_bytes(png)  # an earlier run's: stale beside the new JSON
    report = graftcore.similarity(
        base=paths["base"], instruct=paths["instruct"], output=tmp_path / "no-plot", quiet=True
    )
    assert report.png_path is None and not (tmp_path / "no-plot" / "similarity.png").exists()
    assert (tmp_path / "no-plot" / "similarity.json").exists()
    assert [n for n in report.notes if "matplotlib" in n] == [
        "matplotlib is not installed: no similarity.png (pip install 'graftcore[plot]')"
    ]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """A tiny random Llama saved by transformers as Base (bf16), a perturbed Instruct, a full fine-tune (fp32)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = tiny_llama_config()
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # initialised to zero; trained ones are not
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "base")
    with torch.no_grad():
        sd = {n: p.detach().clone() for n, p in model.state_dict().items()}
        write_checkpoint(
            root / "instruct",
            {n: (p.float() + 0.01 * torch.randn(p.shape, generator=g)).to(torch.bfloat16) for n, p in sd.items()},
        )
        write_checkpoint(
            root / "full", {n: p.float() + 0.004 * torch.randn(p.shape, generator=g) for n, p in sd.items()}, 2
        )
    return root


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`", "ignore::FutureWarning")
def test_a_full_fine_tune_and_a_peft_adapter(hf_models, tmp_path):
    pytest.importorskip("peft")

    root = hf_models
    adapter = make_adapter(
        root / "base",
        tmp_path / "lora",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    report = graftcore.similarity(
        base=root / "base", instruct=root / "instruct", tuned=[root / "full", adapter], quiet=True, chunk_size=500
    )
    base, instruct, full = (load_folder(root / x) for x in ("base", "instruct", "full"))
    # T - B of the adapter, plainly in float64: s * (B @ A) ((B @ A).T for an embedding), its lm_head, else 0
    factors = {
        k.removeprefix("base_model.model."): v.double()
        for k, v in load_file(adapter / "adapter_model.safetensors").items()
    }
    lora = {}
    for n, b in base.items():
        module = n.removesuffix(".weight")
        if module + ".lora_A.weight" in factors:
            delta = 2.0 * (factors[module + ".lora_B.weight"] @ factors[module + ".lora_A.weight"])
        elif module + ".lora_embedding_A" in factors:
            delta = 2.0 * (factors[module + ".lora_embedding_B"] @ factors[module + ".lora_embedding_A"]).T
        elif n in factors:  # modules_to_save: the trained lm_head
            delta = factors[n] - b.double()
        else:
            delta = torch.zeros(b.shape, dtype=torch.float64)
        lora[n] = b.double() + delta
    assert (
        sum(bool((lora[n] != base[n].double()).any()) for n in base) == 2 * 3 + 2
    )  # 3 modules x 2 layers, embed, head
    by_name = {t.name: t for t in report.tensors}
    assert by_name["model.embed_tokens.weight"].dtypes["tuned2"] == "lora"
    assert by_name["lm_head.weight"].dtypes["tuned2"] == "F32"
    for n, b in base.items():
        check_pair(by_name[n].metrics("tuned"), metrics(full[n], b))
        check_pair(by_name[n].metrics("tuned2"), metrics(lora[n], b), rel=1e-5)  # the update is a float32 GEMM
        if n in ("model.layers.0.self_attn.k_proj.weight", "model.norm.weight"):  # not adapted: T = B
            assert by_name[n].metrics("tuned2")["sigma"] == 0
        else:
            assert by_name[n].metrics("tuned2")["ratio"] == pytest.approx(ratio(lora[n], instruct[n], b), rel=1e-5), n
    names = list(base)
    check_pair(
        report.model.metrics("tuned2"), metrics(cat([lora[n] for n in names]), cat([base[n] for n in names])), rel=1e-5
    )
    assert report.model.metrics("tuned")["ratio"] == pytest.approx(
        ratio(cat([full[n] for n in names]), cat([instruct[n] for n in names]), cat([base[n] for n in names])), rel=1e-6
    )

    dora = make_adapter(root / "base", tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(graftcore.AdapterError, match="DoRA.*does not measure DoRA updates yet"):
        graftcore.similarity(base=root / "base", instruct=root / "instruct", tuned=dora, quiet=True)


def test_bad_calls_are_one_line_errors(family, tmp_path):
    paths, base, instruct, tuned = family
    with pytest.raises(graftcore.GraftError, match="--base is required"):
        graftcore.similarity(base=None, instruct=paths["instruct"])
    with pytest.raises(graftcore.GraftError, match="unknown option.*alpha"):
        graftcore.similarity(base=paths["base"], instruct=paths["instruct"], alpha=0.5)
    with pytest.raises(graftcore.GraftError, match="no tensor to measure"):
        graftcore.similarity(base=paths["base"], instruct=paths["instruct"], include="nothing-matches", quiet=True)
    lacking = write_checkpoint(tmp_path / "lacking", {n: t for n, t in tuned[0].items() if "norm" not in n}, 1)
    with pytest.raises(
        graftcore.MismatchError, match="tensor 'model.layers.0.input_layernorm.weight' is in base but not in tuned"
    ):
        graftcore.similarity(base=paths["base"], instruct=paths["instruct"], tuned=lacking, quiet=True)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(graftcore.OutputError, match="a-file: exists and is not a folder"):
        graftcore.similarity(base=paths["base"], instruct=paths["instruct"], output=tmp_path / "a-file", quiet=True)


def test_cli_table_and_exit_codes(family, tmp_path, cli):
    paths, base, instruct, tuned = family
    code, out, err = cli(
        "similarity",
        "--base",
        paths["base"],
        "--instruct",
        paths["instruct"],
        "--tuned",
        paths["tuned"][0],
        "--tuned",
        paths["tuned"][1],
        "--quiet",
    )
    assert code == 0, err
    header, first, *rest = out.splitlines()
    assert (
        header.split()[:5] == ["tensors", "params", "σ(I,B)", "‖I-B‖/‖B‖", "cos(I,B)"] and "‖tuned2-B‖/‖I-B‖" in header
    )
    assert first.split()[:2] == ["model", str(len(base))]  # the whole model first,
    labels = [r.split()[0] for r in rest]
    assert labels[: labels.index("layer")] == [k for k in (*PROJ, "embed", "lm_head", "norm") if k in labels]  # kinds,
    assert [" ".join(r.split()[:2]) for r in rest if r.startswith(("layer", "no layer"))] == [
        "layer 0",
        "layer 1",
        "no layer",
    ]
    sigma = graftcore.similarity(base=paths["base"], instruct=paths["instruct"], quiet=True).model.metrics("instruct")[
        "sigma"
    ]
    assert first.split()[3] == f"{100 * sigma:.3f}%"

    broken = dict(base, **{"model.layers.1.mlp.up_proj.weight": torch.zeros(64, 31, dtype=torch.bfloat16)})
    write_checkpoint(tmp_path / "broken", broken, 1)
    code, out, err = cli("similarity", "--base", tmp_path / "broken", "--instruct", paths["instruct"], "--quiet")
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert (
        "model.layers.1.mlp.up_proj.weight" in err and str(paths["instruct"]) in err and str(tmp_path / "broken") in err
    )


def test_a_bad_input_is_refused_before_torch_loads(family, tmp_path):
    """Resolving and planning import no torch: a mismatched input is named in the time it takes to read headers."""
    paths, base, instruct, tuned = family
    broken = dict(base, **{"model.layers.1.mlp.up_proj.weight": torch.zeros(64, 31, dtype=torch.bfloat16)})
    write_checkpoint(tmp_path / "broken", broken, 1)
    code = (
        "import sys, graftcore\n"
        "try:\n"
        f"    graftcore.similarity(base={str(tmp_path / 'broken')!r}, instruct={str(paths['instruct'])!r}, "
        "quiet=True)\n"
        "except graftcore.MismatchError as e:\n"
        "    print('refused:', e)\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    refused, loaded = run.stdout.splitlines()
    assert refused.startswith("refused:") and "model.layers.1.mlp.up_proj.weight" in refused
    assert loaded == "torch loaded: False"


def test_hub_inputs_resolve_as_for_merge(family, tmp_path):
    """Hub ids (one pinned to a revision) through a loopback hub, as tests/test_hub.py serves them; the CLI in a
    subprocess (huggingface_hub reads HF_ENDPOINT at import)."""
    from hub_server import FakeHub

    paths, base, instruct, tuned = family
    hub = FakeHub()
    hub.start()
    try:
        commits = {role: hub.add_folder(f"org/{role}", paths[role]) for role in ("base", "instruct")}
        commits["tuned"] = hub.add_folder("org/tuned", paths["tuned"][0])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(
            HF_HOME=str(tmp_path / "hf-home"),
            HF_HUB_CACHE=str(tmp_path / "cache"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_ENDPOINT=hub.url,
        )
        cmd = [
            sys.executable,
            "-m",
            "graftcore",
            "similarity",
            "--base",
            "org/base",
            "--instruct",
            f"org/instruct@{commits['instruct']}",
            "--tuned",
            "org/tuned",
            "--output",
            str(tmp_path / "out"),
            "--quiet",
        ]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    finally:
        hub.stop()
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "out" / "similarity.json").read_text())
    assert {role: doc["inputs"][role]["revision"] for role in commits} == commits
    assert doc["inputs"]["instruct"]["ref"] == f"org/instruct@{commits['instruct']}"
    names = list(base)
    check_pair(
        doc["model"]["pairs"]["tuned"], metrics(cat([tuned[0][n] for n in names]), cat([base[n] for n in names]))
    )
    assert run.stdout.splitlines()[1].split()[0] == "model"


def test_missing_base_on_the_command_line_is_one_line(tmp_path, capsys):
    from graftcore.cli import main

    with pytest.raises(SystemExit) as e:
        main(["similarity", "--instruct", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "the following arguments are required: --base" in err


def test_interrupted_while_plotting_leaves_the_previous_pair(family, tmp_path, monkeypatch):
    """Ctrl-C while the PNG is drawn: the folder keeps the previous similarity.json and .png (here: none), no new
    JSON beside an old plot, and no .partial; Ctrl-C inside the atomic write leaves no .partial either."""
    import graftcore.analysis.similarity
    import graftcore.io.output_folder

    paths, *_ = family
    out = tmp_path / "out"
    kw = dict(base=paths["base"], instruct=paths["instruct"], output=out, quiet=True)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(graftcore.analysis.similarity, "plot", interrupted)
    with pytest.raises(KeyboardInterrupt):
        graftcore.similarity(**kw)
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    graftcore.similarity(**kw)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["similarity.json", "similarity.png"]
    monkeypatch.setattr(graftcore.analysis.similarity, "plot", interrupted)
    with pytest.raises(KeyboardInterrupt):
        graftcore.similarity(**kw, include="q_proj")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    monkeypatch.setattr(
        graftcore.io.output_folder.os, "replace", interrupted
    )  # Ctrl-C between the write and the rename
    with pytest.raises(KeyboardInterrupt):
        graftcore.similarity(**kw, include="q_proj")
    assert sorted(p.name for p in out.iterdir()) == ["similarity.json", "similarity.png"]


@pytest.mark.parametrize("scale", [1e20, 1e-30, 1e36])
def test_norms_of_huge_and_tiny_weights_are_exact(tmp_path, scale):
    """float32 squares overflow above 1.8e19 and underflow below 1e-19: finite weights far out in either direction
    are still measured as the float64 definitions give, with no NaN/Inf note."""
    base = {n: t.float() * scale for n, t in llama_tensors(1, layers=1).items()}
    instruct = {n: t.float() * scale for n, t in llama_tensors(5, layers=1, noise=5e-3).items()}
    b, i = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "i", instruct)
    report = graftcore.similarity(base=b, instruct=i, quiet=True)
    assert not report.notes
    for t in report.tensors:
        check_pair(t.metrics("instruct"), metrics(instruct[t.name], base[t.name]))
    check_pair(report.model.metrics("instruct"), metrics(cat(list(instruct.values())), cat(list(base.values()))))


def test_output_inside_an_input_folder_is_refused(family, cli):
    paths, *_ = family
    for out in (paths["instruct"], paths["base"] / "analysis"):
        code, stdout, err = cli(
            "similarity", "--base", paths["base"], "--instruct", paths["instruct"], "--output", out, "--quiet"
        )
        assert code == 2 and "input's folder" in err and len(err.strip().splitlines()) == 1, err
    assert not (paths["instruct"] / "similarity.json").exists() and not (paths["base"] / "analysis").exists()
