"""The package's own import graph, read from the source with ``ast``: no cycle, no import of a module the
package does not have, and the library never imports the command line.

Every import counts, also one inside a function: a deferred import still ties two files together (and
under ``python -m tofu_triton`` a module that imports ``__main__`` back loads it a second time).
Relative imports are resolved, and ``kernels/`` is read as what it is installed as,
``tofu_triton.kernels`` (setup.py's ``package_dir``).
"""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

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


def _installed(module: str) -> str:
    """``kernels.x`` (the folder's name) as what it is installed as, ``tofu_triton.kernels.x``."""
    return "tofu_triton." + module if module == "kernels" or module.startswith("kernels.") else module


def import_statements(name: str, known: Dict[str, Path]) -> List[Tuple[str, List[str]]]:
    """(module, names) of every import in module ``name``'s file, anywhere in it, relative ones resolved:
    ``import a.b`` gives ("a.b", []), ``from ..a import b, c`` in package p.q gives ("p.a", ["b", "c"])."""
    path = known[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(_installed(alias.name), []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # ``from ..x import y`` in package a.b.c is a.b.x
                parts = package.split(".")
                module = ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])
            out.append((_installed(module), [alias.name for alias in node.names]))
    return out


def imports_of(name: str, known: Dict[str, Path]) -> Set[str]:
    """The modules of ``known`` that module ``name`` imports."""
    found = set()
    for module, names in import_statements(name, known):
        # ``from package import name`` imports the submodule package.name if there is one.
        for target in [f"{module}.{n}" if f"{module}.{n}" in known else module for n in names] or [module]:
            while target and target not in known:  # ``import a.b`` of another distribution: not ours
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def broken_imports(known: Dict[str, Path]) -> List[str]:
    """Imports from this package's namespace of a module it does not have (they fail when they run,
    which for an import inside a function is only when that function is called)."""
    return sorted(f"{name} imports {module}" for name in known for module, _ in import_statements(name, known)
                  if (module == "tofu_triton" or module.startswith("tofu_triton.")) and module not in known)


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


def test_every_import_of_the_package_names_one_of_its_modules():
    assert broken_imports(module_files(ROOT)) == []


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
        "tofu_triton/testing/__init__.py": "def check():\n    from .reference import split_sizes\n",
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
    # ``.reference`` from inside tofu_triton/testing/ is tofu_triton.testing.reference, which does not exist.
    assert broken_imports(module_files(tmp_path)) == ["tofu_triton.testing imports tofu_triton.testing.reference"]
