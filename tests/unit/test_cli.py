"""Every command's error contract for a bad argument (utils/cli.py): one line on stderr,
`PROG: error: ...`, exit status 2, nothing else printed (argparse's own error prints the usage
over two lines; train.py did until it shared the parser)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from data_prep import prepare

REPO = Path(__file__).resolve().parents[2]


def script(name: str):
    """A root script (generate.py, evaluate_lm.py, distill.py): `generate.py` is `import generate`."""
    return importlib.import_module(name)


COMMANDS = {
    "train.py": lambda argv: train.main(argv),
    "train.py export": lambda argv: train.main(["export", *argv]),
    "generate.py": lambda argv: script("generate").main(argv),
    "evaluate_lm.py": lambda argv: script("evaluate_lm").main(argv),
    "distill.py": lambda argv: script("distill").main(argv),
    prepare.PROG: lambda argv: prepare.main(argv),
}


@pytest.mark.parametrize("prog", list(COMMANDS))
def test_an_unknown_option_is_one_line_and_exit_2(prog, capsys):
    code = COMMANDS[prog](["--no-such-option", "x"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    name = "train.py" if prog == "train.py export" else prog  # (like the export's other errors)
    assert err.count("\n") == 1 and err.startswith(f"{name}: error: "), err
    assert "--no-such-option" in err or "required" in err, err


@pytest.mark.parametrize("argv, code", [(["--print-config"], 0), (["no_such_section.key=1"], 2)])
def test_a_launched_rank_exits_with_its_code_and_its_output_flushed(argv, code):
    """A rank started by torchrun / deepspeed (WORLD_SIZE > 1) ends through os._exit, skipping Python's
    shutdown (train.py `exit_launched_rank`), which would otherwise flush a piped stdout: the
    printed config (several KB, block-buffered into a pipe) and the one-line error must still
    arrive, with the exit status main() returned."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as launchers leave it
    env.update(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1")
    done = subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == code, done.stderr[-2000:]
    if code == 0:
        assert done.stdout.startswith("model:") and "train:" in done.stdout, done.stdout[:300]
        assert done.stdout.endswith("\n")
    else:
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("train.py: error: "), done.stderr
