"""Distil the long filters of a Hyena-RTF checkpoint into small recurrences (Laughing Hyena): modal
(poles and residues, the default) or RTF (`--form rtf`) filters of a low order.

    python distill.py CKPT OUT --order 16
    python distill.py CKPT OUT --tolerance 1e-3 --data ../shared/data/wikitext2_raw_test.raw --max-documents 64

CKPT is a Hyena-RTF Hugging Face folder (from train.py's export or save_hf_checkpoint) with implicit
filters, or RTF filters of a higher order; Hyena and MultiHyena mixers alike. Each layer's distinct
long filters are fitted by a system of order --order, or of the smallest order whose Hankel
singular-value tail is below --tolerance (at most --max-order); OUT receives a checkpoint with the
same weights except those filters, config filter="modal" (or "rtf") with the order of each layer in
`state_sizes`, loading like any other (no trust_remote_code) and decoding in O(1) per token. A
checkpoint whose cached decoding fails the recurrent check is not written (exit 2) unless --force.

Also written: a JSON report (default OUT/distill_report.json, or --report PATH) with, per layer,
the relative error of the fitted filters (mean / max over filters), the Hankel singular-value tail
at the chosen order and the chosen order; whether the distilled model's recurrent decoding gives
its parallel logits; with --data, the perplexity and bits per byte of both models on the same
windows (as evaluate_lm.py scores them) and KL(original || distilled) per token. A PNG beside the
report plots error against order per layer: the Hankel tail curve (free) and the fits (the chosen
order, and one fit per --sweep order).

Bad input (a folder that is not a Hyena-RTF checkpoint, no Hyena layer, an order outside
[1, l_max), non-finite filter weights, an OUT that holds other things) is one error line, exit
status 2, before anything is written. OUT (and --report) are checked before the fit: writable, and
apart from the inputs (OUT may not be the checkpoint or a --data file, lie inside one, or contain
one, realpath compared, --overwrite or not); --report may not be OUT nor lie inside it, except as
the default OUT/distill_report.json. OUT is replaced only as train.py's export replaces a
folder (export/folder.py: by the stamp an earlier export wrote, never by names). A write that fails
(full disk, read-only folder, permission denied, a file removed meanwhile) is one line naming the
path, exit 2; Ctrl-C is one line, exit 130; either way OUT is the earlier folder or the new one
whole. The steps in full: distillation/checkpoint.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from distillation.checkpoint import DistillError, Options, check_report_outside, distill_checkpoint
from distillation.fit import R_MAX
from evaluation.scoring import EvalError
from hf.loading import LoadError
from utils.atomic import NotReplaceableError, check_apart, check_not_workplace, check_writable, file_target
from utils.cli import OneLineParser, UsageError
from utils.logs import error_exit, setup_logging

PROG = "distill.py"


def order_list(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of orders: {text!r}") from None


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="Hyena-RTF Hugging Face checkpoint folder")
    p.add_argument("out", type=Path, help="folder for the distilled checkpoint")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--order", type=int, help="RTF order of every layer (1 <= order < l_max)")
    how.add_argument(
        "--tolerance",
        type=float,
        help="per layer, the smallest order whose achieved memory-tap error (modal; RTF: Hankel tail) is below this",
    )
    p.add_argument("--max-order", type=int, default=64, help="largest order --tolerance may choose")
    p.add_argument(
        "--form",
        choices=("modal", "rtf"),
        default="modal",
        help="modal: poles and residues (decodes exactly, fits best; default); rtf: polynomial coefficients",
    )
    p.add_argument(
        "--force", action="store_true", help="write the checkpoint even if its cached decoding fails the check"
    )
    p.add_argument("--steps", type=int, default=300, help="optimisation steps of each fit (0: the Hankel init only)")
    p.add_argument(
        "--no-polish",
        dest="polish",
        action="store_false",
        help="modal form: skip the variable-projection and beating-pair stages for the filters still above "
        "1e-2 after the joint fit (faster; those filters keep the joint fit)",
    )
    p.add_argument(
        "--max-pole-radius",
        type=float,
        default=R_MAX,
        help=f"largest |pole| a fitted filter may have, < 1 (default {R_MAX}; lower is better conditioned in float32)",
    )
    p.add_argument("--sweep", type=order_list, default=[], help="also fit these orders (e.g. 2,4,8) for the plot")
    p.add_argument("--data", nargs="+", type=Path, default=[], help="evaluation data, as evaluate_lm.py reads it")
    p.add_argument("--max-documents", type=int, help="score at most this many documents per --data input")
    p.add_argument("--max-tokens", type=int, help="score at most about this many tokens per --data input")
    p.add_argument("--context-length", type=int, help="tokens per window (default: the model's l_max)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: context length)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--report", type=Path, help="JSON report path (default OUT/distill_report.json); plot beside it")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and --report) whatever they hold")
    return p


def check_paths(opts: Options) -> None:
    """NotReplaceableError (one line) unless OUT and the report are apart from every input (the
    checkpoint, the --data files) and can be written; before anything is loaded."""
    inputs = [opts.checkpoint, *opts.data]
    check_not_workplace(opts.out)  # not the current folder (an empty OUT is one), --overwrite or not
    check_apart(opts.out, inputs, flag="")  # the message starts with OUT itself
    check_writable(opts.out, "OUT")
    check_report_outside(opts)  # before the next check: a report naming OUT is told so
    for path in (opts.report_path, opts.plot_path):
        try:
            file_target(path)  # not a folder, a device or a FIFO, --overwrite or not
        except NotReplaceableError as e:
            raise NotReplaceableError(f"--report {path}: {e}") from None
    if opts.report is not None:
        check_apart(opts.report, inputs, flag="--report")
        check_writable(opts.report, "--report")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        opts = Options(**vars(build_parser().parse_args(argv)))
        check_paths(opts)
        distill_checkpoint(opts)
    except (UsageError, DistillError, EvalError, LoadError, NotReplaceableError) as error:
        return error_exit(PROG, error)
    except OSError as error:  # a read or write that failed: full disk, permission denied, a file removed meanwhile
        where = f"{error.filename}: " if error.filename is not None else ""
        return error_exit(PROG, f"{where}{error.strerror or error}")
    except KeyboardInterrupt:
        return error_exit(PROG, "interrupted (Ctrl-C); every output is the earlier one or the new one, whole", code=130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
