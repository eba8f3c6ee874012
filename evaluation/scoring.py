"""Scoring a causal language model on documents, shared by evaluate_lm.py, distill.py and
benchmarks/quality/run.py: reading evaluation data (text, .jsonl, .jsonl.zst, data_prep token shards),
sliding windows, per-token negative log-likelihoods, perplexity and bits per byte, and LAMBADA
(its conventions are in evaluate_lm.py's docstring). Works for any local Hugging Face causal LM.

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

Sliding window (context length C, stride S, 1 <= S <= C): with the start token at
position 0, a document of n tokens gives m = n predictions; prediction p (input position p,
target position p + 1) is made by a window whose inputs are seq[b:e]. Windows start at
b = 0, S, 2S, ...; e = min(b + C, m); window k scores only predictions e_{k-1} <= p < e_k
(e_{-1} = 0). So every prediction is scored exactly once, from at least C - S + 1 inputs (p
included; fewer only near the document start, where it sees everything). S = C (the default)
gives disjoint windows; a smaller S costs C / S times more compute for more history.

Recurrent mode computes the same windows, each from an empty cache, feeding tokens one at a
time: model(ids[:, t:t+1], cache=cache, use_cache=True), carrying the returned cache (under the name
the running transformers release uses, see models/hf_compat.py).
Both modes then score the same predictions from the same histories and must agree to rounding.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from data_prep import layout
from data_prep.indexed import MMapIndexedDataset
from data_prep.readers import Source, SourceError, classify, iter_records, validate_record
from hf.loading import load_pretrained
from models.hf_compat import cache_kwargs, output_cache
from models.precision import dtype_from_name

# Where configs keep the size of a learned position table (GPT-2: n_positions; OPT, BERT:
# max_position_embeddings). Rotary models (GPT-NeoX, Llama) keep their trained length there too;
# `position_limit` tells the two apart by the model's modules.
POSITION_CONFIG_KEYS = ("max_position_embeddings", "n_positions")
# Where configs keep their trained length (l_max: Hyena-RTF); the default --context-length.
CONTEXT_CONFIG_KEYS = (
    *POSITION_CONFIG_KEYS,
    "l_max",
    "max_seq_len",
    "seq_len",
    "max_sequence_length",
)


class EvalError(Exception):
    """A user-facing problem (bad path, bad value); the CLIs print it as one line and exit 2."""


# ----------------------------------------------------------------------------- model and tokenizer


def check_device(name):
    """EvalError unless `name` is a torch device this machine has (a --device flag)."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise EvalError(f"bad --device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda but no CUDA device is available")


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


# OPT's learned position table has 2 rows more than max_position_embeddings (its positions start at 2).
POSITION_TABLE_OFFSETS = (0, 2)


def position_limit(model):
    """(limit, config key) when the model has learned absolute positions, else None.

    Such a model (GPT-2, OPT) looks each position up in a table of `limit` rows, so a sequence
    longer than that ends in an IndexError deep inside the forward; models whose positions are
    computed (rotary GPT-NeoX, Hyena-RTF's filters) run past their trained length and have no
    limit. The table is recognised as an embedding other than the token embedding whose size is
    the config's position count (POSITION_CONFIG_KEYS), plus OPT's offset."""
    # The keys as config.json spells them (GPT2Config also answers to max_position_embeddings).
    saved, tokens = model.config.to_dict(), model.get_input_embeddings()
    limits = [(saved[key], key) for key in POSITION_CONFIG_KEYS if isinstance(saved.get(key), int)]
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module is not tokens:
            for value, key in limits:
                if module.num_embeddings - value in POSITION_TABLE_OFFSETS:
                    return value, key
    return None


def check_context_length(model, path, context_length):
    """EvalError when windows of `context_length` inputs need positions the model has no embedding
    for (`position_limit`); checked once the model is loaded, before any scoring."""
    limit = position_limit(model)
    if limit is not None and context_length > limit[0]:
        raise EvalError(
            f"--context-length {context_length} exceeds the {limit[0]} positions of the model "
            f"({limit[1]} in {path}/config.json: learned absolute positions); pass --context-length <= {limit[0]}"
        )


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


def shard_prefix(path):
    """The .bin/.idx path prefix of a --data shard: a data_prep folder's val split, or the pair named."""
    return path / layout.VAL if path.is_dir() else path.with_suffix("")


def shard_tokenizer_file(prefix):
    """The tokenizer.json the shard at `prefix` was made with: data_prep keeps it in the shard's folder."""
    tokenizer_file = prefix.parent / layout.TOKENIZER
    if not tokenizer_file.is_file():
        raise EvalError(f"no {layout.TOKENIZER} beside {prefix}: cannot tell which tokenizer made the shard")
    return tokenizer_file


def check_shard_tokenizer(path, tokenizer):
    """EvalError unless the shard at `path` was made with the model's tokenizer `tokenizer`.

    A shard stores token ids, not text: ids of another tokenizer whose vocabulary is no larger
    than the model's pass `check_vocabulary` and are scored into a meaningless perplexity. The
    shard's tokenizer matches when each of its tokens has the same id in the model's tokenizer;
    the model's may hold more (a pad token added at export), which no stored id can be."""
    tokenizer_file = shard_tokenizer_file(shard_prefix(path))
    try:
        stored = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    except Exception as error:  # noqa: BLE001 - tokenizers raises its own exception types
        raise EvalError(f"cannot read {tokenizer_file}: {' '.join(str(error).split())}") from None
    model_vocab = tokenizer.get_vocab()
    differing = sorted((i, token) for token, i in stored.items() if model_vocab.get(token) != i)
    if differing:
        i, token = differing[0]
        model = getattr(tokenizer, "name_or_path", "") or "the model"
        found = "has no such token" if token not in model_vocab else f"gives it id {model_vocab[token]}"
        raise EvalError(
            f"{path} was made with another tokenizer than the model's: {tokenizer_file} gives {token!r} "
            f"id {i}, the tokenizer of {model} {found} ({len(differing)} of {len(stored)} tokens differ); "
            "prepare the data with the model's tokenizer, or pass the text instead"
        )


def shard_documents(path, max_documents=None, max_tokens=None, reader=MMapIndexedDataset):
    """Documents of a data_prep token shard: a folder (its val split) or a .bin/.idx path prefix.

    Reads through `reader(prefix)`, by default data_prep.indexed.MMapIndexedDataset (Megatron
    layout): len(ds) sequences, ds[i] -> array of ids, ds.doc_idx -> document starts in sequence
    units (one sequence per document when absent). Bytes come from the shard's own tokenizer.json."""
    prefix = shard_prefix(path)
    if not prefix.with_suffix(".bin").is_file() or not prefix.with_suffix(".idx").is_file():
        raise EvalError(f"no {prefix}.bin / {prefix}.idx token shard")
    tokenizer_file = shard_tokenizer_file(prefix)
    try:
        decoder = Tokenizer.from_file(str(tokenizer_file))
        dataset = reader(str(prefix))
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


def load_documents(path, tokenizer, max_documents=None, max_tokens=None, reader=MMapIndexedDataset):
    """The Documents of one --data input: a data_prep token shard (read through `reader`, see
    `shard_documents`) or a text / .jsonl / .jsonl.zst file. EvalError if none has a token, or if
    a shard was made with another tokenizer than `tokenizer` (`check_shard_tokenizer`)."""
    if is_shard(path):
        check_shard_tokenizer(path, tokenizer)
        documents = shard_documents(path, max_documents, max_tokens, reader)
    else:
        documents = text_documents(path, tokenizer, max_documents, max_tokens)
    if not any(len(d.tokens) for d in documents):  # a perplexity over nothing is NaN, not a result
        raise EvalError(f"{path}: no document with a token to score")
    return documents


def check_vocabulary(path, documents, model, config):
    """EvalError when a document holds a token id the model has no logit for (another tokenizer)."""
    # The logits' width: config.vocab_size (a head padded to a multiple of 64, as Hyena-RTF's is, has
    # rows past it that no logit comes from), or the head's rows when the config does not say.
    head = model.get_output_embeddings()
    widths = [w for w in (getattr(config, "vocab_size", None), head.weight.shape[0] if head is not None else None) if w]
    vocab = min(widths)
    if any(len(d.tokens) and d.tokens.max() >= vocab for d in documents):
        raise EvalError(f"{path}: token ids beyond the model's vocabulary ({vocab}): different tokenizer?")


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


def window_batches(windows, batch_size, description):
    """Yield (window indices, their input ids (B, width) on the CPU) per batch, with a progress bar.

    Windows of similar length are batched together and right-padded; in a causal model padding
    after a row's last real token cannot change that row's logits, so no attention mask is needed
    (and models without mask support work)."""
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].tokens))
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc=description, unit="batch", disable=None, file=sys.stderr):
        index = order[start : start + batch_size]
        width = max(len(windows[i].tokens) for i in index) - 1
        input_ids = torch.zeros(len(index), width, dtype=torch.long)
        for r, i in enumerate(index):
            input_ids[r, : len(windows[i].tokens) - 1] = torch.from_numpy(windows[i].tokens[:-1])
        yield index, input_ids


def scored_logits(logits, window, row):
    """(logits of the window's scored predictions in >= float32, (n_score, vocab); their targets)
    from row `row` of a batch's logits."""
    n_inputs = len(window.tokens) - 1
    scored = logits[row, n_inputs - window.n_score : n_inputs].float()  # log-softmax in >= fp32
    return scored, torch.from_numpy(window.tokens[-window.n_score :]).to(logits.device)


@torch.inference_mode()
def score_windows(model, windows, batch_size, mode="parallel", description="scoring"):
    """Per window: (NLL of each scored target as float64, greedy-argmax hit of each scored target)."""
    device = next(model.parameters()).device
    results = [None] * len(windows)
    for index, input_ids in window_batches(windows, batch_size, description):
        logits = forward_logits(model, input_ids.to(device), mode)
        for r, i in enumerate(index):
            scored, targets = scored_logits(logits, windows[i], r)
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


# ----------------------------------------------------------------------------- LAMBADA


def lambada_windows(path, tokenizer, context_length, max_documents=None):
    """One Window per LAMBADA example (at most max_documents): context = text before the last
    space, target = " " + last word, tokenized separately, no start token; the most recent context
    that fits context_length inputs is kept and only the target tokens are scored."""
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
    """accuracy (greedy reproduces every target token), perplexity = exp(mean per-example target
    NLL) and token_perplexity = exp(target NLL / target tokens) of `lambada_windows`."""
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
