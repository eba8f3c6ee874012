"""The structure of the source tree, read with `ast`: no import cycles inside a package, project
imports only at module top, and nothing outside `models/` imported by the exported model code."""

from __future__ import annotations

import ast
import fnmatch
import subprocess
from pathlib import Path

import pytest
from helpers import REPO

PACKAGES = {"models", "data_prep", "training", "hf", "utils"}  # folders installed as hyena_rtf.<name>
SCRIPTS = ["train.py", "generate.py", "evaluate_lm.py", "distill.py"]


def project_modules() -> dict[str, Path]:
    """'hyena_rtf.training.trainer' -> path, for every module of the installed packages."""
    return {
        f"hyena_rtf.{pkg}.{path.stem}" if path.stem != "__init__" else f"hyena_rtf.{pkg}": path
        for pkg in PACKAGES
        for path in sorted((REPO / pkg).glob("*.py"))
    }


def imported_modules(module: str, path: Path) -> list[tuple[ast.stmt, str]]:
    """(import node, absolute name of the imported project module) for every project import."""
    package = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base.startswith("hyena_rtf"):
                # `from pkg import mod` imports the submodule when there is one
                found += [(node, f"{base}.{a.name}") for a in node.names] + [(node, base)]
        elif isinstance(node, ast.Import):
            found += [(node, a.name) for a in node.names if a.name.startswith("hyena_rtf")]
    return found


def test_no_package_imports_a_sibling_that_imports_it_back():
    modules = project_modules()
    graph = {
        m: {name for _, name in imported_modules(m, p) if name in modules and name != m} for m, p in modules.items()
    }
    assert len(graph) > 30, "the walk found too few modules to mean anything"

    def reaches(start: str, target: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == target:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return False

    cycles = [(a, b) for a in graph for b in graph[a] if reaches(b, a)]
    assert cycles == []


@pytest.mark.parametrize("where", sorted(PACKAGES) + SCRIPTS)
def test_project_imports_are_at_module_top(where):
    paths = [REPO / where] if where.endswith(".py") else sorted((REPO / where).glob("*.py"))
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import) and id(node) not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                project = getattr(node, "level", 0) > 0 or any(n.startswith("hyena_rtf") for n in names)
                assert not project, f"{path.relative_to(REPO)}:{node.lineno} imports {names} inside a block"


def test_the_exported_model_code_imports_only_its_own_folder():
    """What modeling_hyena_rtf.py pulls in (relative imports, transitively) is what an export copies;
    none of it may import the project by absolute name, which an exported folder does not have."""
    modules = project_modules()
    todo, exported = ["hyena_rtf.models.modeling_hyena_rtf"], set()
    while todo:
        m = todo.pop()
        if m in exported:
            continue
        exported.add(m)
        for node, name in imported_modules(m, modules[m]):
            if name in modules:
                assert node.level > 0, f"{modules[m].name} imports {name} by absolute name"
                todo.append(name)
    assert {"hyena_rtf.models.rtf", "hyena_rtf.models.precision", "hyena_rtf.models.cache"} <= exported


def readme_layout() -> tuple[set[str], set[str]]:
    """The README's Layout block: (top-level entries, the file names and glob patterns listed under
    models/). An entry is the first word of an unindented line; a models/ line indented by two
    names one or more files ("a.py, b.py   what they are", "distill*.py   ...")."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    top, models, section = set(), set(), None
    for line in filter(str.strip, block.splitlines()):
        if not line.startswith(" "):
            section = line.split()[0]
            top.add(section.rstrip("/"))
        elif section == "models/" and not line.startswith("   "):  # (deeper lines continue a comment)
            names = line.strip().split("  ")[0]
            models.update(n for n in names.split(", ") if n.endswith(".py"))
    return top, models


def test_the_readme_layout_lists_the_tree():
    """Every tracked top-level folder and script is in the README's layout and every entry there
    exists; every file of models/ is named (or matched by a pattern) and every name exists."""
    top, models = readme_layout()
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    entries = {p.split("/")[0] for p in tracked.splitlines() if not p.startswith(".")}
    expected = {e for e in entries if (REPO / e).is_dir() or e.endswith(".py")}
    assert top == expected, (
        f"README layout lists {sorted(top - expected)} that are not in the tree, misses {sorted(expected - top)}"
    )
    files = {p.name for p in (REPO / "models").glob("*.py")} - {"__init__.py"}
    unmatched = {f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in models)}
    assert not unmatched, f"models/ files missing from the README layout: {sorted(unmatched)}"
    stale = {pattern for pattern in models if not any(fnmatch.fnmatch(f, pattern) for f in files)}
    assert not stale, f"the README layout names models/ files that do not exist: {sorted(stale)}"
