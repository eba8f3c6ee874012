"""The torch pins agree with what transformers accepts: transformers turns PyTorch off below its own
minimum (its `[torch]` extra's bound, which this project does not request, so pip never enforces
it), and then every model build fails. docker/TORCH_VERSION is the one pin the Docker image and
scripts/setup.sh install; pyproject.toml's lower bound must be the real minimum. No docker needed:
the files are read, and the image's build check (docker/smoke.py) is run here on the CPU."""

from __future__ import annotations

import importlib.metadata
import re
import runpy
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[3]
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()
PIN = Version((REPO / "docker" / "TORCH_VERSION").read_text().strip())


def torch_minimum(requires: list[str]) -> Version:
    """The lowest torch a transformers release accepts: the `>=` of torch in its `torch` extra."""
    for line in requires:
        req = Requirement(line)
        if req.name == "torch" and req.marker is not None and req.marker.evaluate({"extra": "torch"}):
            return min(Version(s.version) for s in req.specifier if s.operator == ">=")
    raise AssertionError("transformers' metadata names no torch>= in its torch extra")


def transformers_minimums() -> dict[str, Version]:
    """{transformers version: its minimum torch} for the installed one and the oldest supported
    one's environment (.venv-transformers-X.Y, made by scripts/test.sh) when it is there."""
    found = {importlib.metadata.version("transformers"): torch_minimum(importlib.metadata.requires("transformers"))}
    for meta in REPO.glob(".venv-transformers-*/lib/python3*/site-packages/transformers-*.dist-info/METADATA"):
        msg = Parser().parsestr(meta.read_text())
        found[msg["Version"]] = torch_minimum(msg.get_all("Requires-Dist") or [])
    return found


def pyproject_torch() -> Requirement:
    """The torch requirement of pyproject.toml's dependencies (read as text: tomllib is 3.11+)."""
    (line,) = re.findall(r'^\s*"(torch\s*[<>=!~][^"]*)"', (REPO / "pyproject.toml").read_text(), re.M)
    return Requirement(line)


def test_pyproject_states_the_minimum_torch_transformers_accepts():
    need = max(transformers_minimums().values())
    req = pyproject_torch()
    lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert lower == [need], f"pyproject.toml says {req}; transformers {transformers_minimums()} needs torch>={need}"


def test_the_pinned_torch_is_accepted_by_transformers_and_pyproject():
    assert PIN >= max(transformers_minimums().values())
    assert pyproject_torch().specifier.contains(PIN)


def test_the_image_and_setup_install_the_one_pin():
    # The image installs the file's version and holds it with a pip constraint for later installs.
    assert "COPY docker/TORCH_VERSION" in DOCKERFILE
    assert re.search(r'pip install [^\n]*"torch==\$\(cat docker/TORCH_VERSION\)"', DOCKERFILE)
    assert "ENV PIP_CONSTRAINT=" in DOCKERFILE
    # No torch comes with the base image, so none but the pinned one can be kept.
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE, re.M).group(1)
    assert not base.startswith("pytorch/"), base
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "docker/TORCH_VERSION" in setup
    assert not re.search(r"torch==\d", setup), "setup.sh pins torch itself instead of reading docker/TORCH_VERSION"


def test_the_image_installs_the_project_and_its_build_check_runs_a_model():
    assert re.search(r"pip install --no-deps -e \.", DOCKERFILE)
    # The folders are the packages: the image puts its checkout on every process's import path.
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE, re.M).group(1)
    assert re.search(rf"^ENV PYTHONPATH={re.escape(workdir)}$", DOCKERFILE, re.M)
    assert "python docker/smoke.py" in DOCKERFILE
    assert "import torch, deepspeed, transformers; print" not in DOCKERFILE  # an import is no check


def test_the_build_check_passes_here(capsys):
    """docker/smoke.py on this environment's CPU torch: same version as the pin (CI tests the
    image's torch), accepted by transformers, a tiny model trained one step. Its main() in this
    process (the image runs the file; the Dockerfile test above checks that command)."""
    smoke = runpy.run_path(str(REPO / "docker" / "smoke.py"))  # defines main() without running it
    assert smoke["main"]() == 0
    assert "smoke: ok" in capsys.readouterr().out
