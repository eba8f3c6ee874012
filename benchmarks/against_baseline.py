"""Run one benchmark command on this tree and on an earlier commit, one after the other in one run, on
the same machine, and keep both results side by side.

    python -m benchmarks.against_baseline --baseline d47685f -- python -m benchmarks.recurrence_build
    python -m benchmarks.against_baseline --baseline d47685f --name decode_small -- \\
        python -m benchmarks.decode --preset small --methods hyena_rtf_recurrent

The earlier commit is checked out into a temporary git worktree, and the SAME benchmark script (this
tree's) runs against that worktree's packages: it runs in a temporary folder whose `benchmarks` is
this tree's and whose `models`, `training`, ... are the worktree's (links), so only the code under
test differs. Commits from before the packages were the folders themselves import them as
`hyena_rtf.<folder>`; the folder maps that name onto the worktree too. Each run gets `--out`
(appended to the command) in benchmarks/results/; the side-by-side file <name>_vs_<baseline>.json
holds the machine, both commands and both results. The benchmark must accept --out and import only
what both trees have, or ask first whether the tree under test has a module
(benchmarks/recurrence_build.py does).
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
from utils.logs import get_logger, setup_logging

log = get_logger("bench")
PACKAGES = ("models", "data_prep", "training", "hf", "utils", "serving", "distillation", "evaluation", "export")


def run(command: list[str], out: Path, root: Path) -> dict:
    """Run the command in `root` (this checkout, or the baseline's linked folder), with `root` as
    the only project folder on the import path."""
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log.info("running %s", " ".join([*command, "--out", str(out)]))
    subprocess.run([*command, "--out", str(out)], cwd=root, env=env, check=True)
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
    name = args.name or module.removeprefix("benchmarks.").replace(".", "_")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", args.baseline], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    results = {}
    with tempfile.TemporaryDirectory(prefix="baseline_") as tmp:
        tree, root = Path(tmp) / "tree", Path(tmp) / "root"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=REPO, check=True)
        try:
            (root / "hyena_rtf").mkdir(parents=True)
            (root / "hyena_rtf" / "__init__.py").write_text("")
            (root / "benchmarks").symlink_to(REPO / "benchmarks")
            for package in PACKAGES:
                if (tree / package).is_dir():
                    (root / package).symlink_to(tree / package)
                    (root / "hyena_rtf" / package).symlink_to(tree / package)
            results["this tree"] = run(command, RESULTS / f"{name}_this_tree.json", REPO)
            results[f"baseline {commit}"] = run(command, RESULTS / f"{name}_baseline_{commit}.json", root)
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
