"""The command-line error contract every entry point shares (train.py, generate.py, evaluate_lm.py,
distill.py, data_prep): a bad argument or input is one line on stderr, `PROG: error: message`,
and exit status 2 (utils/logs.py `error_exit`), never argparse's usage block over two lines.

    p = OneLineParser(prog="tool.py")      # argparse, but a bad argument raises UsageError
    try:
        args = p.parse_args(argv)
        ...
    except UsageError as e:
        return error_exit("tool.py", e)    # 2

`--help` still prints the full usage and exits 0.
"""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """A bad argument or input: reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors raise UsageError instead of printing the usage and
    exiting, so the caller reports them with the other one-line errors."""

    def error(self, message: str):
        raise UsageError(message)
