"""The structure of the source tree, read with `ast`: no import cycles inside a package, project
imports only at module top, and nothing outside `models/` imported by the exported model code."""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.helpers import PACKAGES, REPO

SCRIPTS = ["train.py", "generate.py", "evaluate_lm.py", "distill.py"]


def tracked_python() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines() if (REPO / line).is_file()]


def module_name(path: Path) -> str:
    """models/rtf.py -> 'models.rtf', models/__init__.py -> 'models': the name IS the path."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """'training.trainer' -> path, for every module of the project's packages."""
    return {module_name(path): path for pkg in PACKAGES for path in sorted((REPO / pkg).rglob("*.py"))}


def resolve(name: str) -> Path | None:
    """The file that module `a.b.c` is, read from the repository root with no import machinery."""
    path = REPO.joinpath(*name.split("."))
    return next((f for f in (path.with_suffix(".py"), path / "__init__.py") if f.is_file()), None)


def imported_modules(module: str, path: Path) -> list[tuple[ast.stmt, str]]:
    """(import node, absolute name) for every import of a project module: `from a.b import c` gives
    a.b and a.b.c (a submodule when there is one, else a name defined in a.b)."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base.split(".")[0] in PACKAGES:
                found += [(node, f"{base}.{a.name}") for a in node.names] + [(node, base)]
        elif isinstance(node, ast.Import):
            found += [(node, a.name) for a in node.names if a.name.split(".")[0] in PACKAGES]
    return found


def defined_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_every_import_of_the_project_resolves_to_a_file_of_the_tree():
    """Import path = file path: in every tracked Python file (scripts, tests, benchmarks, docker), an
    import of a project module names a file under the repository root (`models.rtf` is
    models/rtf.py), and an imported name is defined in the file it is imported from. Nothing maps
    one name onto another folder (the test reads the tree; it imports nothing)."""
    files = tracked_python()
    assert len(files) > 100, "the walk found too few files to mean anything"
    bad = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(REPO)
        if "hyena_rtf." in text.replace("hyena_rtf.py", ""):
            for line in text.splitlines():
                if line.lstrip().startswith(("import hyena_rtf", "from hyena_rtf")):
                    bad.append(f"{where}: {line.strip()}")
        for node, name in imported_modules(module_name(path), path):
            if resolve(name):
                continue
            base, _, attr = name.rpartition(".")
            home = resolve(base) if isinstance(node, ast.ImportFrom) and base else None
            if home is None or attr not in defined_names(home) | {"*"}:
                bad.append(f"{where}:{node.lineno} imports {name}, which is no file or name of the tree")
    assert not bad, "\n".join(sorted(set(bad)))


def test_nothing_of_the_project_is_importable_outside_the_checkout():
    """The install brings dependencies and vLLM's entry point, no module: from another folder, with no
    PYTHONPATH, none of the project's generic names (models, training, ...) imports."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import importlib.util, sys; print([p for p in sys.argv[1:] if importlib.util.find_spec(p)])"
    out = subprocess.run(
        [sys.executable, "-c", code, *sorted(PACKAGES)], cwd="/", env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", f"installed into site-packages under generic names: {out.strip()}"


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


# benchmarks/ is left out: a benchmark run against an earlier commit asks inside a block whether
# that tree has a module (benchmarks/against_baseline.py).
@pytest.mark.parametrize("where", sorted(PACKAGES - {"benchmarks"}) + SCRIPTS)
def test_project_imports_are_at_module_top(where):
    paths = [REPO / where] if where.endswith(".py") else sorted((REPO / where).rglob("*.py"))
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import) and id(node) not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                project = getattr(node, "level", 0) > 0 or any(n.split(".")[0] in PACKAGES for n in names)
                assert not project, f"{path.relative_to(REPO)}:{node.lineno} imports {names} inside a block"


def test_the_exported_model_code_imports_only_its_own_folder():
    """What modeling_hyena_rtf.py pulls in (relative imports, transitively) is what an export copies;
    none of it may import the project by absolute name, which an exported folder does not have."""
    modules = project_modules()
    todo, exported = ["models.modeling_hyena_rtf"], set()
    while todo:
        m = todo.pop()
        if m in exported:
            continue
        exported.add(m)
        for node, name in imported_modules(m, modules[m]):
            if name in modules:
                assert node.level > 0, f"{modules[m].name} imports {name} by absolute name"
                todo.append(name)
    assert {"models.rtf", "models.precision", "models.cache"} <= exported


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


def test_the_reading_paths_name_files_that_exist():
    """docs/reading_paths.md sends readers to files in an order; every file it names must exist."""
    import re

    text = (REPO / "docs" / "reading_paths.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([\w./-]+\.(?:py|md))`", text))
    assert len(named) > 30
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"docs/reading_paths.md names files that do not exist: {missing}"
