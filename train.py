"""Train a Hyena-RTF language model, or export a training checkpoint as a Hugging Face folder.

Training (the same command line under every launcher; the engine is picked from the environment):

    python train.py --config configs/default.yaml [section.key=value ...]          # one process
    torchrun --nproc_per_node 8 train.py --config configs/pile_125m.yaml            # torch DDP
    deepspeed [--num_gpus 8] [--hostfile H] train.py --config configs/pile_125m.yaml  # DeepSpeed ZeRO

Overrides use OmegaConf dot-list syntax, e.g. `optim.lr=3e-4 train.max_steps=2000
train.zero_stage=2 train.precision=bf16`. Rerunning a command resumes from the latest checkpoint in
train.out_dir (checkpoint.resume=auto).

Export (any checkpoint, any engine, from the full float32 weights):

    python train.py export runs/default/checkpoints/step_00000300 OUT_DIR
    python train.py export runs/default OUT_DIR          # the run's latest checkpoint

Exit codes (training):

    0    finished: train.max_steps reached (final evaluation and export done), or stopped as planned
         at train.stop_after_steps (checkpoint saved; a planned stop is not an interruption: the
         command did what it was asked, and rerunning without it continues)
    1    training failed (the model diverged: train.max_nonfinite_steps non-finite steps)
    2    the run could not start or resume: configuration, data or checkpoint error, or
         train.out_dir is locked by another run (training/runlock.py)
    130  stopped by SIGINT (Ctrl-C), after saving a checkpoint; rerun the same command to resume
    143  stopped by SIGTERM (cluster pre-emption), after saving a checkpoint; likewise

Under torchrun / deepspeed these are the codes of the rank processes; the launcher reports its own.
Errors print one line, `train.py: error: <message naming the key or file>`, on stderr; set
HYENA_RTF_DEBUG=1 to get the traceback as well.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from export.from_training import export_checkpoint
from models.precision import DTYPES, dtype_from_name
from training.checkpoint import CheckpointError
from training.config import ConfigError, load_config, to_yaml
from training.data import DataError
from training.runlock import RunLockedError
from training.trainer import TrainingError, run
from utils.atomic import NotReplaceableError
from utils.cli import OneLineParser, UsageError
from utils.logs import error_exit, get_logger, setup_logging

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
# Exceptions that mean "fix the command, the config, the data or the checkpoint" (exit 2).
USER_ERRORS = (UsageError, ConfigError, DataError, CheckpointError, RunLockedError, NotReplaceableError)


def _split_launcher_args(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` / `--local-rank N` that DeepSpeed's launcher and old torch
    launchers append; the rank is read from the LOCAL_RANK environment variable instead."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(a)
    return out


def _fail(e: BaseException, code: int) -> int:
    """`train.py: error: <message>` on one line of stderr; the traceback too with HYENA_RTF_DEBUG=1."""
    if os.environ.get("HYENA_RTF_DEBUG") == "1":
        traceback.print_exception(e)
    return error_exit("train.py", e, code)


def _export(argv: list[str]) -> int:
    p = OneLineParser(prog="train.py export", description="Export a checkpoint as an HF folder")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("out_dir")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="dtype of the saved weights (the long filters always stay float32)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR even if it is not an earlier export (never the run or checkpoint itself)",
    )
    try:
        args = p.parse_args(argv)
        setup_logging()
        out = export_checkpoint(
            args.checkpoint, args.out_dir, dtype=dtype_from_name(args.dtype), overwrite=args.overwrite
        )
    except USER_ERRORS as e:
        return _fail(e, 2)
    except KeyboardInterrupt as e:  # the export is built beside OUT_DIR and swapped in last
        return _fail(type(e)(f"interrupted: {args.out_dir} left as it was"), 130)
    except OSError as e:  # a checkpoint file vanished or changed while read (a run pruning it), an I/O error
        return _fail(type(e)(f"reading {args.checkpoint}: {e}"), 2)
    get_logger("export").info(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = _split_launcher_args(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        return _export(argv[1:])

    p = OneLineParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="YAML preset (default: configs/default.yaml, the small CPU-friendly run)",
    )
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    try:
        args = p.parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg))  # the product of this command: stdout, not the log
            return 0
        summary = run(cfg)  # sets up the log itself: quiet on all but the main rank
    except TrainingError as e:
        return _fail(e, 1)
    except USER_ERRORS as e:
        return _fail(e, 2)
    # 128 + signal number, the shell's code for a process ended by that signal: 143 / 130
    return 128 + summary["signal"] if summary["signal"] else 0


def exit_launched_rank(code: int) -> None:
    """End a process started by torchrun / deepspeed (WORLD_SIZE > 1) with `code`, its output flushed,
    without Python's shutdown: freeing the DDP reducer there would destroy the gloo process group
    with the GIL held, which can deadlock (training/engine.py, TorchEngine.close). Everything this
    run writes is closed, renamed into place and released before main() returns."""
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):  # set by every launcher
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    code = main()
    exit_launched_rank(code)
    sys.exit(code)
