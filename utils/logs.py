"""One log format for every command line (train.py, generate.py, evaluate_lm.py, data preparation).

Progress and diagnostics go to stderr as `[component] message`; stdout is kept for what a command
produces (generated text, the evaluation table, a printed config), so it can be piped. A fatal
error is one line, `prog: error: message`, and exit status 2, as argparse does for bad flags.

    log = get_logger("train")          # logger "hyena_rtf.train", printed as "[train] ..."
    setup_logging()                    # once, in the command's main(); quiet=True on other ranks
"""

from __future__ import annotations

import logging
import sys

ROOT = "hyena_rtf"
USAGE_ERROR = 2


class _ComponentFormatter(logging.Formatter):
    """`[train] message`: the logger name without the package prefix."""

    def format(self, record: logging.LogRecord) -> str:
        record.component = record.name.removeprefix(ROOT + ".")
        return super().format(record)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (tests and tools replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ assigns one; the property ignores it
        pass


def get_logger(component: str) -> logging.Logger:
    """The project's logger for `component` (e.g. "train", "data_prep", "export")."""
    return logging.getLogger(f"{ROOT}.{component}")


def setup_logging(quiet: bool = False) -> None:
    """Send the project's log records to stderr in the one format; `quiet` keeps only warnings
    (non-zero ranks of a distributed run). Safe to call more than once."""
    root = logging.getLogger(ROOT)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):  # a second call adds nothing
        handler = _StderrHandler()
        handler.setFormatter(_ComponentFormatter("[%(component)s] %(message)s"))
        root.addHandler(handler)


def error_exit(prog: str, error: BaseException | str, code: int = USAGE_ERROR) -> int:
    """Print `prog: error: message` (whitespace folded to one line) to stderr; returns `code` for
    `sys.exit`."""
    print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return code
