"""Package layout: layers point down only, no import cycles, every command's --help works.

Imports are read from the source with ``ast`` (module-level and function-level alike), so a
lazy import inside a function counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "raycmr"


def _imports(root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> every module it imports`` (absolute names, raycmr and third-party)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((root / "raycmr").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = found
    return graph


def _internal_graph(root: Path = ROOT) -> dict[str, set[str]]:
    graph = _imports(root)
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


#: Cycles whose removal is under way on another branch (issue 9's training half merges the DCKT
#: stack into one trainer); empty this set once it lands.
PENDING_CYCLES: set[str] = set()


def test_no_import_cycles_between_modules() -> None:
    graph = _internal_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    found = {" -> ".join(c) for c in cycles}
    assert not found - PENDING_CYCLES, "import cycles: " + "; ".join(sorted(found - PENDING_CYCLES))


def _layer_violations(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for module, targets in _imports().items():
        if module == layer or module.startswith(layer + "."):
            out += [f"{module} imports {t}" for t in sorted(targets)
                    if any(t == f or t.startswith(f + ".") for f in forbidden)]
    return out


@pytest.mark.parametrize("layer,forbidden", [
    ("raycmr.data", ("raycmr.models", "raycmr.train", "raycmr.evaluate", "raycmr.index",
                     "raycmr.serve", "raycmr.tune", "raycmr.teacher", "ray.train", "ray.serve",
                     "deepspeed")),
    ("raycmr.losses", ("raycmr.train", "raycmr.data", "ray", "deepspeed")),
    ("raycmr.models", ("raycmr.train", "raycmr.data", "raycmr.evaluate", "ray", "deepspeed")),
    ("raycmr.artifacts", ("raycmr.train", "raycmr.data", "raycmr.index", "raycmr.serve", "ray",
                          "deepspeed")),
    ("raycmr.evaluate", ("raycmr.train", "raycmr.index", "raycmr.serve", "raycmr.tune",
                         "ray.train", "ray.serve", "deepspeed")),
    ("raycmr.index", ("raycmr.train", "raycmr.serve", "raycmr.tune", "ray.train", "deepspeed")),
    ("raycmr.serve", ("raycmr.train", "raycmr.tune", "deepspeed")),
    ("raycmr.teacher", ("raycmr.train", "raycmr.serve", "raycmr.tune", "deepspeed")),
])
def test_layers_point_down(layer: str, forbidden: tuple[str, ...]) -> None:
    assert not _layer_violations(layer, forbidden)


def test_only_train_imports_deepspeed_and_only_serve_imports_ray_serve() -> None:
    graph = _imports()
    deepspeed = [m for m, t in graph.items() if any(x.split(".")[0] == "deepspeed" for x in t)]
    serve = [m for m, t in graph.items()
             if any(x == "ray.serve" or x.startswith("ray.serve.") for x in t)]
    assert all(m.startswith("raycmr.train") for m in deepspeed), deepspeed
    # raycmr.compat is the one home of private Ray APIs (Serve's replica-name prefix among them)
    assert all(m.startswith("raycmr.serve") or m == "raycmr.compat" for m in serve), serve


def test_shard_files_are_read_row_by_row_only_in_data() -> None:
    """One shard scanner (raycmr/data/scan.py and the Ray Data pipeline): outside raycmr/data
    nothing opens a tar shard or walks a Parquet file's batches or row groups (the Serve
    gallery reads one row group for one thumbnail, located by the scanner)."""
    readers = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in PACKAGE.rglob("*.py")
               if any(s in p.read_text() for s in ("import tarfile", "iter_batches(",
                                                    "read_row_group("))}
    assert {m for m in readers if not _in(m, "raycmr.data")} == {"raycmr.serve.gallery"}
    assert "scan_shard" in (PACKAGE / "serve" / "gallery.py").read_text()


def test_no_module_is_named_a_reranker() -> None:
    """The retired one-vector reranker is the feature teacher (raycmr/teacher/,
    models/feature_teacher.py); re-ranking is the slow stage's action, not a module's name."""
    assert not [str(p) for p in PACKAGE.rglob("*") if "rerank" in p.stem]


def test_private_ray_apis_only_in_compat() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                 if p.name != "compat.py"
                 and any(s in p.read_text() for s in ("._internal", "._private", "_execution_idx",
                                                      "._trial_info", "._metric_op"))]
    assert not offenders, f"private Ray APIs outside raycmr/compat.py: {offenders}"


def test_cli_only_dispatches_to_package_commands() -> None:
    from raycmr import cli

    for name, (module, _) in cli.COMMANDS.items():
        assert module.__name__.endswith(".cli"), name
        assert callable(module.add_arguments) and callable(module.run), name


HELP_SCRIPT = """
import contextlib, io, sys
from raycmr.cli import COMMANDS, build_parser
for name in [None, *COMMANDS]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            build_parser().parse_args([*([name] if name else []), "--help"])
        except SystemExit as exc:
            code = exc.code
    text = out.getvalue()
    assert code == 0 and text.startswith("usage: raycmr"), (name, code, text)
    assert name is not None or all(c in text for c in COMMANDS), text
    print("ok", name)
"""


def test_every_command_help_runs() -> None:
    """Each command's --help in a fresh interpreter (raycmr.cli imports every command module
    at its top): a broken import fails loudly here."""
    from raycmr.cli import COMMANDS

    proc = subprocess.run([sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [w for c in [None, *COMMANDS] for w in ("ok", str(c))]


TRAIN = "raycmr.train"
METHOD_FOLDERS = sorted(p.name for p in (PACKAGE / "train").iterdir()
                        if p.is_dir() and (p / "__init__.py").exists())


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_one_folder_per_registered_method() -> None:
    from raycmr.config import choices
    from raycmr.train.registry import METHODS

    assert METHOD_FOLDERS == sorted(METHODS) == sorted(choices("train.task"))
    for name, method in METHODS.items():
        for ref in (method.task, method.driver, method.test_eval):
            assert not ref or _in(ref.split(":")[0], f"{TRAIN}.{name}"), (name, ref)


def test_a_method_folder_imports_the_engine_never_another_method() -> None:
    crossing = []
    for module, targets in _internal_graph().items():
        for own in METHOD_FOLDERS:
            if _in(module, f"{TRAIN}.{own}"):
                crossing += [f"{module} imports {t}" for t in sorted(targets)
                             for other in METHOD_FOLDERS
                             if other != own and _in(t, f"{TRAIN}.{other}")]
    assert not crossing, crossing


def test_the_engine_reaches_methods_only_through_the_registry() -> None:
    """train/'s root modules name a method's modules only as registry strings, never import one."""
    engine = {m: t for m, t in _internal_graph().items()
              if _in(m, TRAIN) and not any(_in(m, f"{TRAIN}.{f}") for f in METHOD_FOLDERS)}
    imports = [f"{m} imports {t}" for m, targets in engine.items() for t in sorted(targets)
               if any(_in(t, f"{TRAIN}.{f}") for f in METHOD_FOLDERS)]
    assert not imports, imports


def import_depth(graph: dict[str, set[str]], within: str) -> list[str]:
    """The longest chain ``a -> b -> ...`` of modules under ``within`` each importing the next
    (the graph has no cycles)."""
    inside = {m: {t for t in ts if _in(t, within)} for m, ts in graph.items() if _in(m, within)}

    @functools.cache
    def chain(m: str) -> tuple[str, ...]:
        return (m, *max((chain(t) for t in inside[m]), key=len, default=()))

    return list(max((chain(m) for m in inside), key=len))


def test_train_stays_shallow() -> None:
    """train/'s longest internal import chain: cli -> session -> trainer -> loop -> registry
    -> task (8 modules deep before the one-folder-per-method layout)."""
    assert len(import_depth(_internal_graph(), TRAIN)) <= 6


if __name__ == "__main__":  # python tests/test_layout.py [REPO_ROOT]: train/'s size and depth
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    graph = _internal_graph(root)
    chain = import_depth(graph, TRAIN)
    print(f"raycmr modules: {len(graph)}; train/ modules: "
          f"{sum(1 for m in graph if _in(m, TRAIN))}")
    print(f"train/ import depth: {len(chain)} modules: {' -> '.join(chain)}")
