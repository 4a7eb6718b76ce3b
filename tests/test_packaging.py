"""The package as users get it: nothing of ours answers `import kernels` (Hugging Face's kernel hub package,
which transformers imports), and a wheel built from this tree installs `graftcore.kernels` and merges."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from helpers import llama_tensors, load_folder, reference, same_bits, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_kernels_from_the_repository_root_is_not_ours():
    """`python -m pytest` and `python` started in the root put it first on sys.path: transformers must still find
    the hub's `kernels` (transformers 5 imports it on `import transformers.activations`)."""
    assert importlib.util.find_spec("kernels") is not None, "transformers' dependency `kernels` is not installed"
    code = (
        "import importlib.util, kernels, transformers.activations\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin)\n"
        "from kernels import CUDAProperties\n"  # what transformers' hub_kernels.py imports
    )
    run = run_python(code, ROOT)
    assert run.returncode == 0, run.stderr
    origin = Path(run.stdout.split()[-1]).resolve()
    assert not origin.is_relative_to(ROOT / "kernels"), f"'import kernels' from the root finds ours: {origin}"
    assert origin.is_relative_to(Path(sysconfig.get_paths()["purelib"]).resolve()), origin  # the installed package
    assert (ROOT / "kernels").is_dir() and not (ROOT / "kernels" / "__init__.py").exists()


def test_graftcore_kernels_imports_from_any_folder(tmp_path):
    run = run_python("import graftcore.kernels as k, graftcore; print(k.graft_.__module__, k.__file__)", tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == "graftcore.kernels"


def test_a_built_wheel_installs_and_merges(tmp_path):
    """`pip wheel .` gives a wheel whose `graftcore.kernels` imports in a fresh environment (torch and the other
    dependencies from this one) and runs a merge there, from another folder, bit for bit the formula."""
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("graftcore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "graftcore/kernels/__init__.py" in names and "graftcore/kernels/triton_graft.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "the wheel ships a top-level kernels package"
    ours = {f"graftcore/{p.relative_to(ROOT / 'graftcore')}" for p in (ROOT / "graftcore").rglob("*.py")}
    assert sorted(ours - set(names)) == []  # every subpackage listed in pyproject.toml

    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = str(env / "bin" / "python")
    target = run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])", tmp_path, python).stdout.strip()
    # this environment's packages (torch, ...) as a plain path: its .pth files, our editable install's among
    # them, are not processed from there, so graftcore can only come from the wheel
    Path(target, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    sds = {
        role: llama_tensors(seed, noise=0.0 if role == "base" else 3e-3)
        for seed, role in enumerate(("base", "tuned", "instruct"))
    }
    paths = {role: write_checkpoint(tmp_path / role, sd) for role, sd in sds.items()}
    code = (
        "import graftcore, graftcore.kernels as k\n"
        "print(k.__file__)\n"
        f"graftcore.graft(base={str(paths['base'])!r}, tuned={str(paths['tuned'])!r}, "
        f"instruct={str(paths['instruct'])!r}, "
        f"output={str(tmp_path / 'out')!r}, quiet=True, device='cpu')\n"
    )
    run = run_python(code, tmp_path, python)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.split()[0]).is_relative_to(Path(target)), run.stdout
    got = load_folder(tmp_path / "out")
    for name, i in sds["instruct"].items():
        assert same_bits(got[name], reference(i, sds["tuned"][name], sds["base"][name])), name
