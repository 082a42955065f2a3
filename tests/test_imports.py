"""The package's own import graph, read from the source with ``ast``: no cycle, and the library never
imports the command line.

Every import counts, also one inside a function: a deferred import still ties two files together (and
under ``python -m tofu_triton`` a module that imports ``__main__`` back loads it a second time).
Relative imports are resolved, and ``kernels/`` is read as what it is installed as,
``tofu_triton.kernels`` (setup.py's ``package_dir``).
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"tofu_triton": "tofu_triton", "kernels": "tofu_triton.kernels"}  # folder -> installed package
# The applications: they import the library, never the other way round.
APPS = ("tofu_triton.cli", "tofu_triton.__main__")


def module_files(root: Path) -> Dict[str, Path]:
    """{module name: file} of every .py file under the folders of PACKAGE_DIRS (a package is its __init__.py)."""
    out = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _own_module(target: str, known: Dict[str, Path]) -> str:
    """The module of ``known`` that importing ``target`` runs last ("" for another distribution's)."""
    if target == "kernels" or target.startswith("kernels."):  # the folder's name where the installed one is meant
        target = "tofu_triton." + target
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target


def imports_of(name: str, known: Dict[str, Path]) -> Set[str]:
    """The modules of ``known`` that module ``name`` imports anywhere in its file."""
    path = known[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: List[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # ``from ..x import y`` in package a.b.c is a.b.x
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])
            # ``from package import name`` imports the submodule package.name if there is one.
            targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return {m for m in (_own_module(t, known) for t in targets) if m and m != name}


def import_graph(root: Path) -> Dict[str, Set[str]]:
    known = module_files(root)
    return {name: imports_of(name, known) for name in known}


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle [a, b, ..., a] of ``graph``, or [] if there is none."""
    done: Set[str] = set()
    path: List[str] = []

    def visit(node: str) -> List[str]:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return []
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return []

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return []


def is_app(name: str) -> bool:
    return any(name == app or name.startswith(app + ".") for app in APPS)


def library_imports_of_apps(graph: Dict[str, Set[str]]) -> List[str]:
    return sorted(f"{name} -> {dep}" for name, deps in graph.items() if not is_app(name)
                  for dep in deps if is_app(dep))


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph(ROOT))
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_command_line():
    graph = import_graph(ROOT)
    assert "tofu_triton.cli" in graph and "tofu_triton.cli.common" in graph["tofu_triton.cli.demo"]
    assert library_imports_of_apps(graph) == []


def test_the_reader_sees_deferred_relative_and_kernel_imports(tmp_path):
    # A made-up tree with each kind of import the checks must see, all inside functions.
    files = {
        "tofu_triton/__init__.py": "from .ops import run\n",
        "tofu_triton/ops.py": "def run():\n    from .kernels import step\n",
        "tofu_triton/reference.py": "def show():\n    from .cli.common import table\n",
        "tofu_triton/cli/__init__.py": "",
        "tofu_triton/cli/common.py": "import torch\ndef table():\n    from tofu_triton import reference\n",
        "kernels/__init__.py": "",
        "kernels/step.py": "def launch():\n    from ..ops import run\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["tofu_triton.ops"] == {"tofu_triton.kernels.step"}
    assert graph["tofu_triton.kernels.step"] == {"tofu_triton.ops"}
    assert graph["tofu_triton.cli.common"] == {"tofu_triton.reference"}  # torch is not ours
    assert find_cycle(graph) in (["tofu_triton.kernels.step", "tofu_triton.ops", "tofu_triton.kernels.step"],
                                 ["tofu_triton.ops", "tofu_triton.kernels.step", "tofu_triton.ops"])
    assert library_imports_of_apps(graph) == ["tofu_triton.reference -> tofu_triton.cli.common"]
