"""Command-line conventions: a closed pipe exits quietly, a mistyped local path is not sent to the hub,
config.json's dtype follows --dtype, and --help / --version never import torch."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import llama_tensors, tiny_llama_config, write_checkpoint, write_trio

from graftcore.cli import main
from graftcore.io.output_folder import config_with_dtype

ROOT = Path(__file__).resolve().parent.parent
# what a quiet exit may never print
NOISE = ("Traceback", "BrokenPipe", "Exception ignored")


def trio(tmp_path, extra_tensors: int = 0, config: dict | None = None):
    """Base / tuned / Instruct folders; base and tuned get `extra_tensors` tiny tensors Instruct lacks
    (each one a line of the --dry-run plan)."""
    extras = {
        f"extra.{k:05d}.a_long_name_so_that_the_plan_fills_a_pipe_buffer.weight": torch.zeros(1, dtype=torch.bfloat16)
        for k in range(extra_tensors)
    }
    sds = {**llama_tensors(1), **extras}, {**llama_tensors(2, noise=1e-3), **extras}, llama_tensors(3, noise=1e-3)
    return write_trio(tmp_path, sds, config=config if config is not None else {})


def offline_env(tmp_path) -> dict:
    """The environment of a CLI subprocess: the hub offline with an empty cache, HOME inside tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    cache = tmp_path / "hf-cache"
    cache.mkdir(exist_ok=True)
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"), HOME=str(tmp_path))
    return env


def graftcore_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "graftcore", *map(str, args)]


# ---------------------------------------------------------------- 1. a closed pipe


def test_dry_run_into_head_exits_quietly(tmp_path):
    """The plan (~500 KB) is far larger than a pipe's buffer: the print is still writing when head exits."""
    b, t, i = trio(tmp_path, extra_tensors=6000)
    cmd = shlex.join(
        graftcore_cmd(
            "merge",
            "--dry-run",
            "--base",
            b,
            "--tuned",
            t,
            "--instruct",
            i,
            "--output",
            tmp_path / "out",
            "--exclude",
            r"^extra\.",  # dropped on purpose: listed in the plan
        )
    )
    script = f'{cmd} | head -1; echo "graftcore exit ${{PIPESTATUS[0]}}" >&2'
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=offline_env(tmp_path), timeout=300)
    assert run.stdout.startswith("plan: ") and run.stdout.count("\n") == 1, run.stdout[:300]
    assert not any(n in run.stderr for n in NOISE), run.stderr[-3000:]
    status = run.stderr.strip().splitlines()[-1]
    assert status in ("graftcore exit 0", "graftcore exit 141"), run.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args", [["--version"], ["merge", "--help"], ["merge", "--dry-run"]], ids=["version", "help", "dry-run"]
)
def test_stdout_closed_before_any_output(tmp_path, args):
    """stdout a pipe whose reader is gone from the start: the output is flushed at exit, into no one."""
    if args == ["merge", "--dry-run"]:
        b, t, i = trio(tmp_path)
        args = [*args, "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "out"]
    r, w = os.pipe()
    os.close(r)
    try:
        run = subprocess.run(
            graftcore_cmd(*args), stdout=w, stderr=subprocess.PIPE, text=True, env=offline_env(tmp_path), timeout=300
        )
    finally:
        os.close(w)
    assert not any(n in run.stderr for n in NOISE), run.stderr
    assert run.returncode in (0, 141), (run.returncode, run.stderr)


def test_stdout_to_a_file_is_unchanged(tmp_path):
    """The quiet exit is only for a closed pipe: a normal --dry-run still prints the whole plan, exit 0."""
    b, t, i = trio(tmp_path, extra_tensors=10)
    run = subprocess.run(
        graftcore_cmd(
            "merge",
            "--dry-run",
            "--base",
            b,
            "--tuned",
            t,
            "--instruct",
            i,
            "--output",
            tmp_path / "o",
            "--exclude",
            r"^extra\.",
        ),
        capture_output=True,
        text=True,
        env=offline_env(tmp_path),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("plan: ") and "extra.00009." in run.stdout
    assert run.stdout.splitlines()[-2:-1] == ["output shards:"] and run.stdout.splitlines()[-1].startswith(
        "  model.safetensors"
    )


# ---------------------------------------------------------------- 2. a missing local path is not a hub id

PROBE = (
    "import sys; from graftcore.cli import main; code = main(sys.argv[1:]); "
    "print(code, 'huggingface_hub' in sys.modules)"
)


def merge_with(tmp_path, role: str, ref: str):
    """Run a merge in a subprocess (cwd tmp_path) with `role` set to `ref`; (exit code, hub imported, stderr)."""
    b, t, i = trio(tmp_path)
    refs = {"base": str(b), "tuned": str(t), "instruct": str(i), role: ref}
    args = ["merge", *(x for r, v in refs.items() for x in (f"--{r}", v)), "--output", str(tmp_path / "out")]
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**offline_env(tmp_path), "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    code, hub = run.stdout.split()
    return int(code), hub == "True", run.stderr


@pytest.mark.parametrize(
    "role, ref, make",
    [
        ("instruct", "demo/bsae", "demo"),  # a typo inside a folder that exists
        ("tuned", "demo/adpater", "demo"),  # the same for an adapter folder
        ("base", "./nothing-here", None),
        ("instruct", "~/nothing-here", None),
        ("instruct", "/nonexistent-graftcore-path/model", None),
        ("instruct", "models/org/name", None),  # more than one '/'
        ("base", "models/org/name@main", None),
    ],
    ids=["parent-exists", "adapter-parent-exists", "dot", "tilde", "absolute", "two-slashes", "two-slashes-rev"],
)
def test_missing_path_is_not_sent_to_the_hub(tmp_path, role, ref, make):
    if make:
        (tmp_path / make).mkdir()
    code, hub, err = merge_with(tmp_path, role, ref)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"graftcore: error: {ref}: no such file or folder"), lines[0]
    assert "not a hub repo id" in lines[0]
    assert not hub, "huggingface_hub was imported for a local path"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ref", ["org/name", "org/name@v1", "demo/bsae"])
def test_hub_id_still_goes_to_the_hub(tmp_path, ref):
    """One '/', and no folder of the first part: a hub id (offline here, with an empty cache)."""
    code, hub, err = merge_with(tmp_path, "instruct", ref)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("graftcore: error: ") and ref.partition("@")[0] in lines[0]
    assert "no such file or folder" not in lines[0] and "not a hub repo id" not in lines[0]
    assert hub


# ---------------------------------------------------------------- 3. config.json follows --dtype

CONFIG_TEXT = (
    '{\n  "model_type": "llama",\n  "torch_dtype": "bfloat16",\n  "rope_scaling": {"factor": 8.0},\n'
    '  "vocab_size": 96\n}\n'
)


def merge_config(tmp_path, cli, dtype: str, config_text: str = CONFIG_TEXT) -> tuple[Path, Path]:
    b, t, i = trio(tmp_path)
    (i / "config.json").write_text(config_text)
    out = tmp_path / f"out-{dtype}"
    code, _, err = cli(
        "merge", "--base", b, "--tuned", t, "--instruct", i, "--output", out, "--dtype", dtype, "--quiet"
    )
    assert code == 0, err
    return i, out


def test_config_dtype_follows_dtype_flag(tmp_path, cli):
    i, out = merge_config(tmp_path, cli, "float32")
    got = json.loads((out / "config.json").read_text())
    want = json.loads(CONFIG_TEXT)
    assert got["torch_dtype"] == "float32" and "dtype" not in got
    assert list(got) == list(want)  # key order kept
    assert {k: v for k, v in got.items() if k != "torch_dtype"} == {k: v for k, v in want.items() if k != "torch_dtype"}
    assert not list(out.glob("*.partial"))
    assert "config.json" in json.loads((out / "graftcore.json").read_text())["files"]


def test_config_unchanged_with_dtype_auto(tmp_path, cli):
    i, out = merge_config(tmp_path, cli, "auto")
    assert (out / "config.json").read_bytes() == (i / "config.json").read_bytes()


def test_config_that_is_not_json_is_copied_unchanged(tmp_path, cli):
    i, out = merge_config(tmp_path, cli, "float16", config_text='{"torch_dtype": "bfloat16",  oops\n')
    assert (out / "config.json").read_bytes() == (i / "config.json").read_bytes()


@pytest.mark.parametrize(
    "text, want",
    [
        ('{"dtype": "bfloat16", "a": 1}', {"dtype": "float16", "a": 1, "torch_dtype": "float16"}),  # newer transformers
        (
            '{"a": 1, "torch_dtype": "float32", "dtype": "float32"}',
            {"a": 1, "torch_dtype": "float16", "dtype": "float16"},
        ),
        (
            '{"a": {"torch_dtype": "float32"}}',
            {"a": {"torch_dtype": "float32"}, "torch_dtype": "float16"},
        ),  # top level only
    ],
)
def test_config_with_dtype(text, want):
    got = config_with_dtype(text, "float16")
    assert json.loads(got) == want and list(json.loads(got)) == list(want)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"torch_dtype": "float16"}', ""])
def test_config_with_dtype_leaves_text_alone(text):
    """Not a JSON object, or already right: the very same text."""
    assert config_with_dtype(text, "float16") == text


def test_output_loads_in_transformers_with_the_new_dtype(tmp_path, cli):
    transformers = pytest.importorskip("transformers")
    config = tiny_llama_config(intermediate_size=64, attention_bias=False)
    torch.manual_seed(0)
    sd = {k: v.bfloat16() for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    for role in ("base", "tuned"):
        write_checkpoint(tmp_path / role, sd)
    i = write_checkpoint(tmp_path / "instruct", sd)
    config.dtype = "bfloat16"
    config.save_pretrained(i)
    code, _, err = cli(
        "merge",
        "--base",
        tmp_path / "base",
        "--tuned",
        tmp_path / "tuned",
        "--instruct",
        i,
        "--output",
        tmp_path / "out",
        "--dtype",
        "float32",
        "--quiet",
    )
    assert code == 0, err
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written.get("torch_dtype") == "float32" and written.get("dtype", "float32") == "float32"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(
        model.state_dict()["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"].float()
    )


# ---------------------------------------------------------------- 4. --help and --version never import torch


def test_build_parser_does_not_import_torch():
    code = "import graftcore.cli, sys; graftcore.cli.build_parser(); print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stdout + run.stderr


@pytest.mark.parametrize(
    "argv, named",
    [
        (
            ["merge", "--base", "b", "--tuned", "t", "--instruct", "i", "--ouput", "o"],
            "--ouput (did you mean --output?)",
        ),
        (["merge", "--tunned", "t", "--instruct", "i", "--output", "o"], "--tunned (did you mean --tuned?)"),
        (
            ["merge", "--base", "b", "--tuned", "t", "--instruct", "i", "--output", "o", "--alpah", "2"],
            "--alpah (did you mean --alpha?)",
        ),
        (["verify", "o", "--recompte", "3"], "--recompte (did you mean --recompute?)"),
        (["similarity", "--base", "b", "--instruct", "i", "stray"], "unrecognized argument stray"),
    ],
    ids=["typo-of-a-required-option", "typo-among-missing", "typo-with-a-value", "verify", "stray-value"],
)
def test_a_mistyped_option_is_named_by_its_subcommand(argv, named, capsys):
    """Not 'the following arguments are required: --output' for a typed --ouput, and always under the
    subcommand's own name: one line, exit 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and named in err, err
    assert err.startswith(f"graftcore {argv[0]}: error: ") and "required" not in err


def test_negative_values_are_not_taken_for_options(tmp_path, cli):
    b, t, i = trio(tmp_path)
    code, out, err = cli(
        "merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "o", "--alpha", "-0.5", "--dry-run"
    )
    assert code == 0 and out.startswith("plan: "), err


def test_merge_refuses_a_bad_input_before_torch_loads(tmp_path):
    """Resolving and planning import no torch: a shape mismatch is named, exit 2, and torch never loaded."""
    b, t, i = trio(tmp_path)
    tensors = llama_tensors(1)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = torch.zeros(3, 5, dtype=tensors[name].dtype)
    bad = write_checkpoint(tmp_path / "bad-base", tensors)
    code = "import sys; from graftcore.cli import main; code = main(sys.argv[1:]); print(code, 'torch' in sys.modules)"
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "merge",
            "--base",
            str(bad),
            "--tuned",
            str(t),
            "--instruct",
            str(i),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=offline_env(tmp_path),
        timeout=120,
    )
    assert run.stdout.split() == ["2", "False"], run.stdout + run.stderr
    assert name in run.stderr and str(bad) in run.stderr and run.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--version"], ["merge", "--help"]], ids=["version", "help"])
def test_help_and_version_do_not_import_torch(args):
    """The whole command, as run: no torch (nor huggingface_hub) in Python's import log."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "graftcore", *args], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip(), run.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "graftcore.cli" in imported  # the log is there
    assert "torch" not in imported and "huggingface_hub" not in imported


def test_a_dry_run_refuses_what_the_merge_would_refuse(tmp_path, cli):
    """--dry-run checks the output folder as the merge does (without writing): the input's own folder, a folder
    holding something else, an empty path; and a shard size of 0 is refused like a negative one."""
    b, t, i = trio(tmp_path)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("a user's file")
    for out, needle in (
        (i, "is the instruct input's folder"),
        (tmp_path / "theirs", "pass --overwrite"),
        ("", "empty"),
    ):
        code, _, err = cli("merge", "--base", b, "--tuned", t, "--instruct", i, "--output", out, "--dry-run")
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (out, err)
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["notes.txt"]
    code, _, err = cli(
        "merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "theirs", "--dry-run", "--overwrite"
    )
    assert code == 0, err
    code, _, err = cli(
        "merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "o", "--max-shard-size", "0"
    )
    assert code == 2 and "--max-shard-size" in err and not (tmp_path / "o").exists(), err


@pytest.mark.parametrize("text", ["{bad", "[1, 2]"])
def test_a_config_that_cannot_take_the_dtype_is_a_note(tmp_path, cli, text):
    """--dtype with an Instruct config.json that is not a JSON object: copied as it is, and the user is told that
    it does not say the new dtype (before: exit 0 and nothing said)."""
    b, t, i = trio(tmp_path)
    (i / "config.json").write_text(text)
    code, _, err = cli(
        "merge", "--base", b, "--tuned", t, "--instruct", i, "--output", tmp_path / "o", "--dtype", "float16", "--quiet"
    )
    assert code == 0 and "not a JSON object" in err and "torch_dtype float16" in err, err
    assert (tmp_path / "o" / "config.json").read_text() == text
    notes = json.loads((tmp_path / "o" / "graftcore.json").read_text())["notes"]
    assert any("torch_dtype float16" in n for n in notes)
