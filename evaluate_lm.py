"""Perplexity, bits per byte and LAMBADA for any local Hugging Face causal LM (ours included).

    python evaluate_lm.py CKPT --data ../shared/data/wikitext2_raw_test.raw --context-length 1024
    python evaluate_lm.py CKPT --data DATA_PREP_DIR more.jsonl.zst --lambada lambada_test.jsonl --output r.json

Definitions (all sums in float64):

    NLL          = sum over scored tokens t of  -ln p(x_t | x_<t)          (nats)
    perplexity   = exp(NLL / N_tokens)
    bits/byte    = NLL / ln(2) / N_bytes,  N_bytes = UTF-8 bytes of the scored text

Documents are scored separately. Each is prefixed with one "start" token (the tokenizer's BOS, else
EOS, as lm-evaluation-harness does for rolling log-likelihoods) so that *every* token of the
document is predicted; the start token itself is never scored. Hence N_tokens = number of document
tokens and N_bytes = UTF-8 bytes of the document text, exactly the text the tokens encode.
Token shards from data_prep are scored as stored (their end-of-document token included); their
bytes are those of the decoded text, where special tokens count 0 bytes.

Sliding window (`--context-length C`, `--stride S`, 1 <= S <= C): with the start token at
position 0, a document of n tokens gives m = n predictions; prediction p (input position p,
target position p + 1) is made by a window whose inputs are seq[b:e]. Windows start at
b = 0, S, 2S, ...; e = min(b + C, m); window k scores only predictions e_{k-1} <= p < e_k
(e_{-1} = 0). So every prediction is scored exactly once, from at least C - S + 1 inputs (p
included; fewer only near the document start, where it sees everything). S = C (the default)
gives disjoint windows; a smaller S costs C / S times more compute for more history.

`--mode recurrent` computes the same windows, each from an empty cache, feeding tokens one at a
time: model(ids[:, t:t+1], cache=cache, use_cache=True), carrying the returned cache (under the name
the running transformers release uses, see models/hf_compat.py).
Both modes then score the same predictions from the same histories and must agree to rounding.

LAMBADA (`--lambada FILE`, one {"text": ...} per line): context = text before the last space,
target = " " + last word, tokenized separately, no start token (lm-evaluation-harness convention).
accuracy = fraction of examples where greedy argmax reproduces every target token;
perplexity = exp(mean over examples of the target's NLL), the per-word figure papers report;
token_perplexity = exp(target NLL / target tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from hyena_rtf.data_prep.indexed import MMapIndexedDataset
from hyena_rtf.data_prep.readers import Source, SourceError, classify, iter_records, validate_record
from hyena_rtf.hf.loading import LoadError, check_model_folder, load_pretrained, load_tokenizer
from hyena_rtf.models.hf_compat import cache_kwargs, output_cache
from hyena_rtf.models.precision import DTYPES, dtype_from_name
from hyena_rtf.utils.atomic import write_text
from hyena_rtf.utils.logs import error_exit

# Where configs keep their trained length (l_max: Hyena-RTF); the default --context-length.
CONTEXT_CONFIG_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "l_max",
    "max_seq_len",
    "seq_len",
    "max_sequence_length",
)


class EvalError(Exception):
    """A user-facing problem (bad path, bad value); the CLI prints it as one line and exits 2."""


# ----------------------------------------------------------------------------- model and tokenizer


def load_config(path, trust_remote_code=False):
    return load_pretrained(AutoConfig, "config", path, trust_remote_code)


def load_model(path, dtype="float32", device="cpu", trust_remote_code=False):
    """Any local causal-LM folder, in `dtype` ("auto": as saved). Hyena-RTF comes from the installed
    code (hf/loading.py) and keeps its filters float32 in any dtype (models/precision.py); a
    folder's own code runs only with trust_remote_code."""
    torch_dtype = "auto" if dtype == "auto" else dtype_from_name(dtype)
    return load_pretrained(AutoModelForCausalLM, "model", path, trust_remote_code, dtype=torch_dtype).to(device).eval()


def start_token_id(tokenizer, config):
    """Token that precedes each document so that its first token is scored too (BOS, else EOS)."""
    for source in (tokenizer, config):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, list):  # some configs list several EOS ids
                value = value[0] if value else None
            if value is not None:
                return int(value)
    raise EvalError("neither the tokenizer nor the model config defines a BOS or EOS token to start documents")


def default_context_length(config):
    for key in CONTEXT_CONFIG_KEYS:
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise EvalError("the model config gives no maximum length; pass --context-length")


# ----------------------------------------------------------------------------- documents


@dataclass
class Document:
    tokens: np.ndarray  # int64 token ids, without the start token
    n_bytes: int  # UTF-8 bytes of the text these tokens encode


def read_texts(path):
    """Yield document texts: each line's "text" of a .jsonl / .jsonl.zst file (Pile format), or a
    whole other file as one document. Read by data_prep's readers, so truncated or corrupt zstd,
    bad JSON and bad UTF-8 are errors naming the file and line (blank lines and empty documents
    are skipped: they hold nothing to score). Plain files keep their bytes exactly (\r\n too), so
    the byte count is that of the file."""
    if not path.is_file():
        raise EvalError(f"{path}: not a text or JSONL file, nor a data_prep folder (no manifest.json)")
    kind = classify(str(path))
    if kind not in ("zst", "jsonl", "text"):
        raise EvalError(f"{path}: unsupported --data format ({kind}); use text, .jsonl or .jsonl.zst")
    try:
        for _, line, record_kind, payload, set_name in iter_records(0, Source(str(path), kind)):
            text, _, skipped = validate_record(record_kind, payload, set_name)
            if skipped is not None:
                reason, message = skipped
                if reason in ("blank_line", "empty_document"):
                    continue
                where = f"{path}:{line}" if record_kind == "J" else str(path)
                raise EvalError(f"{where}: {message}")
            yield text
    except SourceError as error:
        raise EvalError(str(error)) from None


def encode(tokenizer, text):
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return encoding["input_ids"], encoding["offset_mapping"]


def text_documents(path, tokenizer, max_documents=None, max_tokens=None):
    """Tokenize text documents. Under --max-tokens the last document's *text* is cut at a token
    boundary and re-tokenized, so that its tokens and its byte count describe the same text."""
    documents, total = [], 0
    for text in read_texts(path):
        if max_documents is not None and len(documents) >= max_documents:
            break
        ids, offsets = encode(tokenizer, text)
        budget = None if max_tokens is None else max_tokens - total
        while budget is not None and len(ids) > budget and offsets[budget - 1][1] < len(text):
            text = text[: offsets[budget - 1][1]]
            ids, offsets = encode(tokenizer, text)
        documents.append(Document(np.asarray(ids, dtype=np.int64), len(text.encode("utf-8"))))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return documents


def shard_documents(path, max_documents=None, max_tokens=None):
    """Documents of a data_prep token shard: a folder (its val split) or a .bin/.idx path prefix.

    Reads through data_prep.indexed.MMapIndexedDataset(prefix) (Megatron layout): len(ds)
    sequences, ds[i] -> array of ids, ds.doc_idx -> document starts in sequence units (one
    sequence per document when absent). Bytes come from the shard's own tokenizer.json."""
    prefix = path / "val" if path.is_dir() else path.with_suffix("")
    if not prefix.with_suffix(".bin").is_file() or not prefix.with_suffix(".idx").is_file():
        raise EvalError(f"no {prefix}.bin / {prefix}.idx token shard")
    if not (prefix.parent / "tokenizer.json").is_file():
        raise EvalError(f"no tokenizer.json beside {prefix}: cannot count the bytes of the shard's text")
    try:
        decoder = Tokenizer.from_file(str(prefix.parent / "tokenizer.json"))
        dataset = MMapIndexedDataset(str(prefix))
    except Exception as error:  # noqa: BLE001 - tokenizers and the index reader raise several types
        raise EvalError(f"cannot read the token shard {prefix}: {' '.join(str(error).split())}") from None
    doc_idx = getattr(dataset, "doc_idx", None)
    bounds = [int(b) for b in doc_idx] if doc_idx is not None else list(range(len(dataset) + 1))
    documents, total = [], 0
    for d in range(len(bounds) - 1):
        if max_documents is not None and len(documents) >= max_documents:
            break
        ids = np.concatenate([np.asarray(dataset[i], dtype=np.int64) for i in range(bounds[d], bounds[d + 1])])
        full_text = decoder.decode(ids.tolist(), skip_special_tokens=True)
        text, budget = full_text, None if max_tokens is None else max_tokens - total
        if budget is not None and len(ids) > budget:
            # Cut where the kept tokens decode to a prefix of the document's text, i.e. not in the
            # middle of a multi-byte character, so the byte count is exact.
            for keep in range(budget, 0, -1):
                text = decoder.decode(ids[:keep].tolist(), skip_special_tokens=True)
                if full_text.startswith(text):
                    break
            else:
                keep, text = 0, ""
            ids = ids[:keep]
        documents.append(Document(ids, len(text.encode("utf-8"))))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return documents


def is_shard(path):
    return (path.is_dir() and (path / "manifest.json").is_file()) or path.suffix in (".bin", ".idx")


# ----------------------------------------------------------------------------- windows and scoring


def window_plan(n_predictions, context_length, stride):
    """Sliding windows over predictions 0..m-1 (see module docstring).

    Returns [(begin, end, n_score)]: feed inputs seq[begin:end] and score the last n_score
    predictions, i.e. targets seq[end - n_score + 1 : end + 1]."""
    if not 1 <= stride <= context_length:
        raise EvalError(f"need 1 <= stride <= context length, got stride {stride}, context length {context_length}")
    plan, previous_end = [], 0
    for begin in range(0, n_predictions, stride):
        end = min(begin + context_length, n_predictions)
        plan.append((begin, end, end - previous_end))
        previous_end = end
        if end == n_predictions:
            break
    return plan


@dataclass
class Window:
    tokens: np.ndarray  # inputs are tokens[:-1], targets tokens[1:]
    n_score: int  # only the last n_score targets count


def document_windows(document, start_id, context_length, stride):
    """Windows of one document: seq = [start] + tokens, so every document token is a target."""
    sequence = np.concatenate([[start_id], document.tokens]).astype(np.int64)
    n_predictions = len(sequence) - 1
    return [Window(sequence[b : e + 1], n) for b, e, n in window_plan(n_predictions, context_length, stride)]


def forward_logits(model, input_ids, mode):
    """Logits (batch, length, vocab), by one parallel forward or token by token through the cache."""
    if mode == "parallel":
        return model(input_ids=input_ids, use_cache=False).logits
    cache, steps = None, []
    for t in range(input_ids.shape[1]):
        out = model(input_ids=input_ids[:, t : t + 1], use_cache=True, **cache_kwargs(cache))
        cache = output_cache(out)
        if cache is None:  # every later token would be scored with no context, silently
            raise EvalError(f"--mode recurrent: {type(model).__name__} returned no cache for use_cache=True")
        steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1)


@torch.inference_mode()
def score_windows(model, windows, batch_size, mode="parallel", description="scoring"):
    """Per window: (NLL of each scored target as float64, greedy-argmax hit of each scored target).

    Windows of similar length are batched together and right-padded; in a causal model padding
    after a row's last real token cannot change that row's logits, so no attention mask is needed
    (and models without mask support work)."""
    device = next(model.parameters()).device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].tokens))
    results = [None] * len(windows)
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc=description, unit="batch", disable=None, file=sys.stderr):
        rows = [windows[i] for i in order[start : start + batch_size]]
        width = max(len(w.tokens) for w in rows) - 1
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        for r, w in enumerate(rows):
            input_ids[r, : len(w.tokens) - 1] = torch.from_numpy(w.tokens[:-1])
        logits = forward_logits(model, input_ids.to(device), mode)
        for r, (i, w) in enumerate(zip(order[start : start + batch_size], rows)):
            n_inputs = len(w.tokens) - 1
            scored = logits[r, n_inputs - w.n_score : n_inputs].float()  # log-softmax in >= fp32
            targets = torch.from_numpy(w.tokens[-w.n_score :]).to(device)
            nll = F.cross_entropy(scored, targets, reduction="none")
            results[i] = (nll.double().cpu().numpy(), (scored.argmax(-1) == targets).cpu().numpy())
    return results


# ----------------------------------------------------------------------------- metrics


def perplexity_metrics(documents, model, start_id, context_length, stride, batch_size, mode, description):
    """Token perplexity and bits per byte of a list of Documents (formulas in the module docstring)."""
    windows = [w for d in documents for w in document_windows(d, start_id, context_length, stride)]
    scores = score_windows(model, windows, batch_size, mode, description)
    nll = math.fsum(float(s.sum()) for s, _ in scores)
    n_tokens = sum(len(s) for s, _ in scores)
    n_bytes = sum(d.n_bytes for d in documents)
    return {"documents": len(documents), "windows": len(windows), **summarize(nll, n_tokens, n_bytes)}


def summarize(nll, n_tokens, n_bytes):
    return {
        "tokens": n_tokens,
        "bytes": n_bytes,
        "nll_nats": nll,
        "perplexity": math.exp(nll / n_tokens) if n_tokens else float("nan"),
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
    }


def lambada_windows(path, tokenizer, context_length, max_documents=None):
    windows = []
    for line_number, text in enumerate(read_texts(path), start=1):
        if max_documents is not None and len(windows) >= max_documents:
            break
        context, _, word = text.rstrip().rpartition(" ")
        if not context or not word:
            raise EvalError(f"{path}: example {line_number} has no context and last word")
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(target_ids) > context_length:
            raise EvalError(f"{path}: example {line_number}: target longer than the context length")
        # Keep the most recent context that fits: context_length inputs -> context_length + 1 tokens.
        tokens = np.asarray(context_ids + target_ids, dtype=np.int64)[-(context_length + 1) :]
        windows.append(Window(tokens, len(target_ids)))
    if not windows:
        raise EvalError(f"{path}: no examples")
    return windows


def lambada_metrics(windows, model, batch_size, mode):
    scores = score_windows(model, windows, batch_size, mode, "lambada")
    example_nll = np.array([s.sum() for s, _ in scores], dtype=np.float64)
    n_target_tokens = sum(len(s) for s, _ in scores)
    return {
        "examples": len(scores),
        "target_tokens": n_target_tokens,
        "accuracy": float(np.mean([bool(hit.all()) for _, hit in scores])),
        "perplexity": math.exp(example_nll.mean()),
        "token_perplexity": math.exp(example_nll.sum() / n_target_tokens),
    }


# ----------------------------------------------------------------------------- command line


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"evaluate_lm.py: error: {message}\n")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser():
    p = OneLineParser(description=__doc__.split("\n")[0])
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
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise EvalError(f"bad --device {args.device!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda but no CUDA device is available")


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
    inputs = [
        (
            path,
            shard_documents(path, args.max_documents, args.max_tokens)
            if is_shard(path)
            else text_documents(path, tokenizer, args.max_documents, args.max_tokens),
        )
        for path in args.data
    ]
    for path, documents in inputs:  # a perplexity over nothing is NaN, not a result
        if not any(len(d.tokens) for d in documents):
            raise EvalError(f"{path}: no document with a token to score")
    lambada = lambada_windows(args.lambada, tokenizer, context_length, args.max_documents) if args.lambada else None

    model = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else config.vocab_size
    results = {
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
        if any(len(d.tokens) and d.tokens.max() >= vocab for d in documents):
            raise EvalError(f"{path}: token ids beyond the model's vocabulary ({vocab}): different tokenizer?")
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        results = evaluate(args)
    except (EvalError, LoadError) as error:
        return error_exit("evaluate_lm.py", error)
    print(format_table(results))
    if args.output is not None:  # complete or not at all, never a half-written file
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.output, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
