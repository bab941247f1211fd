"""qshield_dist's imports point one way: no import cycle, counting every import statement
(module level, inside functions and under TYPE_CHECKING), and executors know nothing of a
sweep (they take plain values). Read from the source with `ast`: nothing is imported."""

from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qshield_dist"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (importing a.b.c also runs a.b's __init__)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    root = package.name

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package `level - 1` steps above this one
                    base = ".".join(
                        here[: len(here) - node.level + 1] + ([node.module] if node.module else [])
                    )
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                found = owner(target) if target.split(".")[0] == root else None
                if found is None:
                    continue
                parts = found.split(".")
                # the module and every package above it but the root (whose __init__ is empty)
                for i in range(2, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "qshield_dist.config" in graph["qshield_dist.grid"]
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_the_check_sees_a_cycle_under_type_checking(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub.b import B\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
        "def f():\n    from .. import a\n"
    )
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(graph).prepare()


LATER = {  # a module of the data flow (config -> grid -> executor -> run_trial -> store -> summary)
    # and the modules downstream of it, which it must not import
    "qshield_dist.config": ("grid", "executors", "trial", "results", "summary", "launch", "plan"),
    "qshield_dist.grid": ("executors", "trial", "summary", "launch", "plan"),
    "qshield_dist.executors": ("config", "grid", "trial", "results", "summary", "launch", "plan"),
}


@pytest.mark.parametrize("module", sorted(LATER))
def test_no_module_imports_one_downstream_of_it(module: str) -> None:
    """Executors in particular decide only where jobs run: the launcher gives them plain values."""
    graph = import_graph()
    later = tuple(f"qshield_dist.{name}" for name in LATER[module])
    for name, deps in graph.items():
        if name == module or name.startswith(module + "."):
            wrong = sorted(d for d in deps if d in later or d.startswith(tuple(f"{m}." for m in later)))
            assert not wrong, f"{name} imports {wrong}"


def test_the_readme_layout_names_every_module_and_package() -> None:
    """The README's Layout section matches the tree: it names every top-level module and
    package of qshield_dist, and every file it names exists."""
    repo = PACKAGE.parent
    layout = (repo / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    named = {n.rsplit("/", 1)[-1] or n for n in re.findall(r"[\w./-]+?\.(?:py|sh)|\w+/", layout)}
    top = {p.name for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    top |= {f"{p.parent.name}/" for p in PACKAGE.glob("*/__init__.py")}
    assert not top - named, f"the README's Layout does not name {sorted(top - named)}"
    files = {n for n in named if not n.endswith("/")}
    existing = {p.name for p in repo.rglob("*") if ".venv" not in p.parts}
    assert files <= existing, f"the README's Layout names files that are gone: {sorted(files - existing)}"
