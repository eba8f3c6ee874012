"""Run one benchmark command on this tree and on an earlier commit, one after the other in one run, on
the same machine, and keep both results side by side.

    python -m benchmarks.against_baseline --baseline d47685f -- python -m benchmarks.recurrence_build
    python -m benchmarks.against_baseline --baseline d47685f --name decode_small -- \\
        python -m benchmarks.decode --preset small --methods hyena_rtf_recurrent

The earlier commit is checked out into a temporary git worktree, and the SAME benchmark script (this
tree's) runs with that worktree's packages first on the import path (a temporary folder maps
hyena_rtf.models, .training, ... onto it), so only the code under test differs. Each run gets
`--out` (appended to the command) in benchmarks/results/; the side-by-side file
<name>_vs_<baseline>.json holds the machine, both commands and both results. The benchmark must
accept --out and import only what both trees have: a module only this tree has still resolves to
this tree (through the editable install's finder), so a benchmark that needs one must ask first
whether the tree under test has it (benchmarks/recurrence_build.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, RESULTS, machine, write_json
from hyena_rtf.utils.logs import get_logger, setup_logging

log = get_logger("bench")
PACKAGES = ("models", "data_prep", "training", "hf", "utils")


def run(command: list[str], out: Path, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    log.info("running %s", " ".join([*command, "--out", str(out)]))
    subprocess.run([*command, "--out", str(out)], cwd=REPO, env=env, check=True)
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="a commit of this repository")
    p.add_argument("--name", help="results name (default: the benchmark module's)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark command")
    args = p.parse_args(argv)
    setup_logging()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the benchmark command after --")
    if command[0] in ("python", "python3"):  # this interpreter: the one with the project's environment
        command = [sys.executable, *command[1:]]
    module = next((c for c in command if c.startswith("benchmarks.")), command[-1])
    name = args.name or module.rsplit(".", 1)[-1]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", args.baseline], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    results = {}
    with tempfile.TemporaryDirectory(prefix="baseline_") as tmp:
        tree, shim = Path(tmp) / "tree", Path(tmp) / "shim" / "hyena_rtf"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=REPO, check=True)
        try:
            shim.mkdir(parents=True)
            (shim / "__init__.py").write_text("")
            for package in PACKAGES:
                (shim / package).symlink_to(tree / package)
            results["this tree"] = run(command, RESULTS / f"{name}_this_tree.json", None)
            results[f"baseline {commit}"] = run(command, RESULTS / f"{name}_baseline_{commit}.json", str(shim.parent))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
    side_by_side = {
        "benchmark": name,
        "machine": machine(),
        "command": command,
        "baseline": commit,
        "results": results,
    }
    path = write_json(RESULTS / f"{name}_vs_{commit}.json", side_by_side)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
