"""The package's layers point one way (docs/architecture.md, "Layers"): read from the source with `ast`, every
import of one graftcore module by another, at module level, inside a function, or by name through
`interrupts.import_deferred(".name")` / `import_module`, goes to a module of the same or a lower layer, and
no chain of imports comes back to where it started. Imports under `if TYPE_CHECKING:` (annotations only, never
run) are left out. The package root `graftcore/__init__.py` only re-exports the API, lazily."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "graftcore"
KERNELS = ROOT / "kernels" / "graft"  # installed as graftcore.kernels

# lowest first; a module may import its own layer and those below
LAYERS = [
    ("base", {"errors", "options", "interrupts", "version", "shapes", "lazy"}),
    (
        "kernels",
        {
            "kernels",
            "kernels.aot",
            "kernels.cpu",
            "kernels.fp8",
            "kernels.lora",
            "kernels.packed4",
            "kernels.triton_fp8",
            "kernels.triton_graft",
        },
    ),
    ("io", {"io", "io.json_files", "io.safetensors_file", "io.input_file", "io.output_folder"}),
    ("codecs", {"codecs", "codecs.registry", "codecs.values", "codecs.fp8", "codecs.packed4"}),
    ("sources", {"sources", "sources.checkpoint", "sources.hub", "sources.local", "sources.quantized"}),
    (
        "plan",
        {
            "plan",
            "plan.ops",
            "plan.names",
            "plan.projections",
            "plan.layouts",
            "plan.build",
            "plan.inputs",
            "plan.report",
            "lora",
            "lora.adapter",
            "lora.params",
            "lora.update",
        },
    ),
    ("compute", {"compute", "compute.cpu", "compute.cuda", "compute.devices"}),
    (
        "stream",
        {"stream", "stream.steps", "stream.readers", "stream.driver", "stream.codec_steps", "stream.compute_step"},
    ),
    (
        "analysis",
        {"analysis", "analysis.similarity", "analysis.similarity_sums", "analysis.verify", "analysis.recompute"},
    ),
    ("merge", {"merge", "merge.engine", "merge.writer", "merge.job", "merge.distributed"}),
    ("api", {"api", "tensors"}),
    ("front", {"cli", "__main__", "__init__"}),
]
LAYER_OF = {module: k for k, (_, modules) in enumerate(LAYERS) for module in modules}


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        files[".".join(parts)] = path
    for path in KERNELS.glob("*.py"):
        files["kernels" if path.stem == "__init__" else f"kernels.{path.stem}"] = path
    return files


def resolve(importer: str, level: int, name: str | None, is_package: bool) -> str:
    """The graftcore module name (without 'graftcore.') of a relative import in `importer`."""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if importer == "__init__":
        base = []
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *(name.split(".") if name else [])])


def known(target: str, modules: set[str]) -> str | None:
    """`target`, or its nearest enclosing module we have (`compute.cpu.CpuCompute` -> `compute.cpu`)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


unresolved: list[str] = []  # imports from a graftcore module that does not exist (filled by imports_of)


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = resolve(module, node.level, node.module, is_package)
                if base and base not in modules:
                    unresolved.append(f"{module}: from {'.' * node.level}{node.module or ''} import ...")
                targets += [f"{base}.{a.name}" if base else a.name for a in node.names] + [base]
            elif node.module and node.module.split(".")[0] == "graftcore":
                base = node.module.removeprefix("graftcore").lstrip(".")
                if base and base not in modules:
                    unresolved.append(f"{module}: from {node.module} import ...")
                targets += [f"{base}.{a.name}" if base else a.name for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets += [a.name.removeprefix("graftcore.") for a in node.names if a.name.startswith("graftcore.")]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = ast.unparse(node.func)
            value = node.args[0].value
            if func.endswith(("import_deferred", "import_module")) and isinstance(value, str):
                targets.append(value.lstrip("."))  # both resolve a leading dot against the package root
        elif isinstance(node, ast.Dict) and is_package:  # _LAZY: name -> module, imported on first use
            targets += [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
        for target in targets:
            hit = known(target, modules)
            if hit is not None and hit != module:
                found.add(hit)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {m: imports_of(m, p, set(files)) for m, p in files.items()}


def test_every_module_has_a_layer():
    assert sorted(set(module_files()) - set(LAYER_OF)) == []
    assert sorted(set(LAYER_OF) - set(module_files())) == []


def test_every_import_of_ours_names_a_module_that_exists():
    unresolved.clear()
    graph()
    assert unresolved == []


def test_no_import_points_up_a_layer():
    upward = [
        f"{m} ({LAYERS[LAYER_OF[m]][0]}) imports {t} ({LAYERS[LAYER_OF[t]][0]})"
        for m, targets in graph().items()
        for t in sorted(targets)
        if LAYER_OF[t] > LAYER_OF[m]
    ]
    assert upward == []


def test_no_import_cycle():
    edges = graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t) :] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_graph_reader_sees_every_kind_of_import():
    """The reader itself: a module-level, a function-level and a by-name import of this package are all edges."""
    edges = graph()
    assert "plan.report" in edges["api"]  # module level
    assert "merge.engine" in edges["merge.job"]  # inside a function
    assert "analysis.recompute" in edges["analysis.verify"]  # interrupts.import_deferred(".analysis.recompute")
    assert "analysis.similarity_sums" in edges["analysis.similarity"]  # by name too
    assert "compute.cpu" in edges["compute.devices"]  # a sibling inside a subpackage
    assert "kernels" in edges["compute.cpu"]  # the kernels, from a subpackage
    assert {"api", "tensors", "plan.report"} <= edges["__init__"]  # the lazy table
    assert {"plan.ops", "plan.build"} <= edges["plan"]  # a subpackage's lazy table


def test_a_dry_run_and_the_report_load_no_torch(tmp_path):
    """`graftcore merge --dry-run` plans and prints the plan without torch (nor a device chosen and warmed up);
    `graftcore.Report` is torch-free too."""
    import subprocess
    import sys

    from helpers import llama_tensors, write_checkpoint

    refs = {
        role: write_checkpoint(tmp_path / role, llama_tensors(k))
        for k, role in enumerate(("base", "tuned", "instruct"))
    }
    args = [x for role, path in refs.items() for x in (f"--{role}", str(path))]
    code = (
        "import sys; from graftcore.cli import main; import graftcore; graftcore.Report; graftcore.Progress; "
        "code = main(sys.argv[1:]); print(code, 'torch' in sys.modules)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, "merge", *args, "--output", str(tmp_path / "out"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.stdout.split()[-2:] == ["0", "False"], run.stdout + run.stderr
    assert "output shards:" in run.stdout and not (tmp_path / "out").exists()
