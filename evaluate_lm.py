"""Perplexity, bits per byte and LAMBADA for any local Hugging Face causal LM (ours included).

    python evaluate_lm.py CKPT --data ../shared/data/wikitext2_raw_test.raw --context-length 1024
    python evaluate_lm.py CKPT --data DATA_PREP_DIR more.jsonl.zst --lambada lambada_test.jsonl --output r.json

Perplexity and bits per byte are defined, and computed, in evaluation/scoring.py (shared with distill.py):
every document token is scored once, after a start token (BOS, else EOS), by sliding windows of
`--context-length C` inputs started every `--stride S` tokens (1 <= S <= C; S = C, the default,
gives disjoint windows). `--mode recurrent` computes the same windows token by token through the
decoding cache; both modes must agree to rounding.

LAMBADA (`--lambada FILE`, one {"text": ...} per line): context = text before the last space,
target = " " + last word, tokenized separately, no start token (lm-evaluation-harness convention).
accuracy = fraction of examples where greedy argmax reproduces every target token;
perplexity = exp(mean over examples of the target's NLL), the per-word figure papers report;
token_perplexity = exp(target NLL / target tokens).

A data_prep shard (`--data` folder or .bin/.idx) holds token ids, which mean something only to
the tokenizer that made them: it is refused unless every token of the tokenizer.json beside it
has the same id in the model's tokenizer. A model with learned absolute positions (GPT-2's
n_positions, OPT's max_position_embeddings) refuses a --context-length past that table; models
whose positions are computed (Hyena-RTF, rotary GPT-NeoX) take any length.

Exit status: 0 done; 2 bad arguments, model, data or --output (one line `evaluate_lm.py: error: ...`
naming the file); 130 interrupted (Ctrl-C), also one line. --output is checked before the evaluation
runs: not a folder, in a writable folder, apart from every input (not the model folder or a data file,
not inside one: realpath compared), and either absent or an earlier report of this program (its
"kind" field; anything else is replaced only with --overwrite); it is written whole or not at all,
and a failed write (full disk, read-only folder) is one line naming it after the results are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import transformers

from data_prep.indexed import MMapIndexedDataset

# The scoring code lives in evaluation/scoring.py (shared with distill.py and benchmarks/quality/run.py, LAMBADA
# included); the names marked F401 are not
# used here but stay reachable as evaluate_lm.<name>, as they were before the move.
from evaluation.scoring import (
    EvalError,
    Window,  # noqa: F401
    check_context_length,
    check_device,
    check_vocabulary,
    default_context_length,
    forward_logits,  # noqa: F401
    lambada_metrics,
    lambada_windows,
    load_config,
    load_documents,
    load_model,
    perplexity_metrics,
    read_texts,  # noqa: F401
    score_windows,  # noqa: F401
    shard_documents,  # noqa: F401
    start_token_id,
    summarize,
    text_documents,  # noqa: F401
    window_plan,  # noqa: F401
)
from hf.loading import LoadError, check_model_folder, load_tokenizer
from models.precision import DTYPES
from utils.atomic import NotReplaceableError, check_apart, file_target, is_json_report, write_text
from utils.cli import OneLineParser, UsageError
from utils.logs import error_exit

# ----------------------------------------------------------------------------- command line


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


REPORT_KIND = "Hyena-RTF evaluate_lm report"  # the stamp in every --output file (check_output)
# The fields of a report written before the stamp existed: a rerun of the main job (scripts/main.sh)
# replaces its own earlier runs/default/eval.json.
UNSTAMPED_REPORT_KEYS = {"model", "model_type", "parameters", "versions", "settings", "data", "seconds"}


def is_report(path: Path) -> bool:
    """Whether `path` holds a report of this program, known by its content: the stamp, or every
    field of a report from before the stamp and no other."""
    if is_json_report(path, REPORT_KIND):
        return True
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and set(report) - {"total", "lambada"} == UNSTAMPED_REPORT_KEYS


def build_parser():
    p = OneLineParser(prog="evaluate_lm.py", description=__doc__.split("\n")[0])
    p.add_argument("model", help="local Hugging Face causal-LM folder (config.json, weights, tokenizer)")
    p.add_argument(
        "--data",
        nargs="+",
        default=[],
        type=Path,
        help="text files (.txt/.raw: one document each), .jsonl/.jsonl.zst with 'text', data_prep shard folders",
    )
    p.add_argument("--lambada", type=Path, help='LAMBADA jsonl, one {"text": ...} per line')
    p.add_argument(
        "--context-length", type=positive_int, help="max input tokens per window (default: model's max length)"
    )
    p.add_argument(
        "--stride",
        type=positive_int,
        help="tokens between window starts, <= context length (default: = context length)",
    )
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--mode", choices=("parallel", "recurrent"), default="parallel")
    p.add_argument("--dtype", choices=(*DTYPES, "auto"), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model folder's own Python code to run (needed only for architectures other than "
        "Hyena-RTF that ship custom code; off by default)",
    )
    p.add_argument(
        "--max-documents", type=positive_int, help="score at most this many documents per input (LAMBADA: examples)"
    )
    p.add_argument("--max-tokens", type=positive_int, help="score at most about this many tokens per --data input")
    p.add_argument("--output", type=Path, help="write the results as JSON here (default: print only)")
    p.add_argument(
        "--overwrite", action="store_true", help="let --output replace a file that is not an earlier evaluation report"
    )
    return p


def check_arguments(args):
    """Cheap checks before loading anything, so mistakes fail fast with one line."""
    check_model_folder(args.model)
    if not args.data and args.lambada is None:
        raise EvalError("nothing to evaluate: give --data and/or --lambada")
    for path in [*args.data, *([args.lambada] if args.lambada else [])]:
        if not path.exists():
            raise EvalError(f"data {path} not found")
    if args.stride is not None and args.context_length is not None and args.stride > args.context_length:
        raise EvalError(f"--stride {args.stride} is larger than --context-length {args.context_length}")
    check_device(args.device)


def evaluate(args):
    """Run everything the arguments ask for; return the results as a JSON-ready dict. Data is read
    and tokenized before the model is loaded, so that bad data fails fast."""
    check_arguments(args)
    started = time.time()
    config = load_config(args.model, args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    context_length = args.context_length or default_context_length(config)
    stride = args.stride or context_length
    if stride > context_length:
        raise EvalError(f"--stride {stride} is larger than the context length {context_length}")
    start_id = start_token_id(tokenizer, config)
    # The shard reader is passed from this module's namespace, where tests stand in for it.
    inputs = [
        (path, load_documents(path, tokenizer, args.max_documents, args.max_tokens, MMapIndexedDataset))
        for path in args.data
    ]
    lambada = lambada_windows(args.lambada, tokenizer, context_length, args.max_documents) if args.lambada else None

    model = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    check_context_length(model, args.model, context_length)  # GPT-2 and the like: no position past their table
    results = {
        "kind": REPORT_KIND,
        "model": str(args.model),
        "model_type": getattr(config, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {
            "mode": args.mode,
            "dtype": args.dtype,
            "device": args.device,
            "context_length": context_length,
            "stride": stride,
            "batch_size": args.batch_size,
            "max_documents": args.max_documents,
            "max_tokens": args.max_tokens,
            "start_token_id": start_id,
        },
        "data": [],
    }
    for path, documents in inputs:
        check_vocabulary(path, documents, model, config)
        metrics = perplexity_metrics(
            documents, model, start_id, context_length, stride, args.batch_size, args.mode, path.name
        )
        results["data"].append({"path": str(path), **metrics})
    if len(results["data"]) > 1:
        results["total"] = summarize(
            math.fsum(d["nll_nats"] for d in results["data"]),
            sum(d["tokens"] for d in results["data"]),
            sum(d["bytes"] for d in results["data"]),
        )
    if lambada is not None:
        results["lambada"] = {"path": str(args.lambada), **lambada_metrics(lambada, model, args.batch_size, args.mode)}
    results["seconds"] = round(time.time() - started, 3)
    return results


def format_table(results):
    lines = [f"model {results['model']}  " + "  ".join(f"{k}={v}" for k, v in results["settings"].items())]
    rows = [(Path(d["path"]).name, d) for d in results["data"]] + (
        [("total", results["total"])] if "total" in results else []
    )
    if rows:
        lines.append(f"{'data':<32} {'tokens':>10} {'bytes':>11} {'perplexity':>12} {'bits/byte':>10}")
        lines += [
            f"{name:<32} {d['tokens']:>10} {d['bytes']:>11} {d['perplexity']:>12.4f} {d['bits_per_byte']:>10.5f}"
            for name, d in rows
        ]
    if "lambada" in results:
        lam = results["lambada"]
        lines.append(
            f"LAMBADA {lam['examples']} examples: accuracy {lam['accuracy']:.4f}  "
            f"perplexity {lam['perplexity']:.4f}  token perplexity {lam['token_perplexity']:.4f}"
        )
    return "\n".join(lines)


def check_output(path: Path | None, inputs=(), overwrite: bool = False) -> None:
    """EvalError unless --output can be written, checked before the (long) evaluation runs: not a
    folder, in a writable folder, none of `inputs` (the model folder and the data files), nor
    inside one of them (writing it would replace a file of the model or data, or be read back as
    data next time), and not a file this program did not write, unless `overwrite`."""
    if path is None:
        return
    try:
        file_target(path)  # not a folder, a device or a FIFO, --overwrite or not
    except NotReplaceableError as e:
        raise EvalError(f"--output: {e}") from None
    if (path.exists() or path.is_symlink()) and not overwrite and not is_report(path):
        raise EvalError(
            f"--output {path} exists and is not an evaluate_lm.py report; pass --overwrite to replace it, "
            "or choose another path"
        )
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise EvalError(f"--output {path}: {parent or path.parent} is not a writable folder")
    try:
        check_apart(path, inputs, flag="--output")
    except NotReplaceableError as e:
        raise EvalError(str(e)) from None


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        check_output(args.output, [args.model, *args.data, *([args.lambada] if args.lambada else [])], args.overwrite)
        results = evaluate(args)
    except (UsageError, EvalError, LoadError) as error:
        return error_exit("evaluate_lm.py", error)
    except OSError as error:  # an input unreadable or removed meanwhile
        return error_exit("evaluate_lm.py", f"{error.filename or ''}: {error.strerror or error}")
    except KeyboardInterrupt:
        return error_exit("evaluate_lm.py", "interrupted (Ctrl-C) before the results; nothing written", code=130)
    print(format_table(results))
    if args.output is not None:  # complete or not at all, never a half-written file
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            write_text(args.output, json.dumps(results, indent=2) + "\n")
        except OSError as error:  # a full disk, a folder removed meanwhile: the results are printed above
            where = f" ({error.filename})" if error.filename and str(error.filename) != str(args.output) else ""
            why = f"--output {args.output}: {error.strerror or error}{where}; the results are printed above"
            return error_exit("evaluate_lm.py", EvalError(why))
        except KeyboardInterrupt:
            why = f"interrupted (Ctrl-C) while writing --output {args.output}: it is whole or as it was before"
            return error_exit("evaluate_lm.py", why, code=130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
