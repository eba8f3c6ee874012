"""Generate text from a Hugging Face causal-LM checkpoint folder (ours or any other).

    python generate.py CKPT --prompt "Once upon a time" --max-new-tokens 64 --temperature 0.8 --top-p 0.95
    python generate.py CKPT --prompt-file prompts.txt --batch-size 8 --num-samples 2
    python generate.py CKPT --prompt "def f(x):" --compile     # the static, compiled decode step

The decode loop is written out here rather than hidden in `model.generate()`: the prompt is run
once through the model (for Hyena-RTF: a parallel FFT prefill that fills the recurrent cache), then
every new token is one `model(token, cache=cache)` call, which for Hyena-RTF costs the
same whatever the length of the context. With --compile (Hyena-RTF models with RTF filters) the
tokens after the prefill go through the static decode step instead (models/static_decode.py): the
state in fixed buffers, one torch.compile'd function per token, captured as a CUDA graph on CUDA;
the tokens are the same. Sampling uses transformers' own logits processors in the
order `generate()` applies them, so with the same seed both give the same tokens.

Output: with a single prompt and a single sample the text streams to stdout as it is produced;
otherwise each output gets a `==> prompt I sample J <==` header (streamed when --batch-size is 1,
printed per batch otherwise). Time to first token and tokens/s are logged to stderr. Bad arguments
and folders that cannot be loaded give a one-line error and exit code 2, before any model loads
(--compile on a model without a static step, and a prompt plus --max-new-tokens longer than a
model with learned absolute positions can take: once it has loaded, before any token is decoded).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import logging as hf_logging

from evaluation.scoring import position_limit
from hf.loading import LoadError, check_model_folder, load_pretrained, load_tokenizer
from hf.streaming import Streamer
from models.hf_compat import cache_kwargs, output_cache
from models.precision import DTYPES, cast_keeping_filters, dtype_from_name
from models.static_decode import StaticDecoder, StaticDecodeUnsupported
from utils.cli import OneLineParser, UsageError
from utils.logs import error_exit, get_logger, setup_logging

log = get_logger("generate")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="Hugging Face checkpoint folder (config.json, weights, tokenizer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="text file, one prompt per line (blank lines skipped)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy decoding")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1, help="continuations per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="sequences decoded together")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a checkpoint folder's own Python code to run (needed only for architectures "
        "other than Hyena-RTF that ship custom code; off by default)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode with the static step compiled by torch.compile (Hyena-RTF models with RTF filters; "
        "a CUDA graph on CUDA): same tokens, less per-token overhead, a compilation first",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=tuple(DTYPES),
        help="weights / activations; the RTF filters and their recurrent state stay float32",
    )
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Parse and validate everything that needs no torch; returns the args and the prompts."""
    args = build_parser().parse_args(argv)
    for name in ("temperature", "top_p", "repetition_penalty"):
        if not math.isfinite(getattr(args, name)):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    for name in ("max_new_tokens", "num_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.repetition_penalty <= 0:
        raise UsageError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    try:
        check_model_folder(args.checkpoint)
    except LoadError as e:
        raise UsageError(str(e)) from None
    if args.prompt is not None:
        prompts = [args.prompt]
        if not args.prompt.strip():
            raise UsageError("--prompt is empty")
        try:  # the shell hands over bytes that are not UTF-8 as lone surrogates, which no tokenizer takes
            args.prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UsageError(f"--prompt is not UTF-8 text ({e.reason} at character {e.start})") from None
    else:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"prompt file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first prompt
        except UnicodeDecodeError as e:
            raise UsageError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        # One prompt per line: split at line feeds only (CRLF included), never at the other characters
        # str.splitlines() treats as line ends (form feed, U+2028, ...), which source code and text hold.
        prompts = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
        if not prompts:
            raise UsageError(f"prompt file {path} has no non-empty line")
    return args, prompts


def load(checkpoint: str, device: str, dtype_name: str, trust_remote_code: bool = False):
    """(model, tokenizer) from a checkpoint folder; one-line UsageError when it cannot be loaded.
    Hyena-RTF checkpoints load from the installed code; the folder's own code runs only with
    trust_remote_code (hf/loading.py). The model is loaded in float32 and then cast with
    `cast_keeping_filters`, so the long filters stay float32 even under a folder's own code."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    try:
        model = load_pretrained(AutoModelForCausalLM, "model", checkpoint, trust_remote_code, dtype=torch.float32)
        tokenizer = load_tokenizer(checkpoint, trust_remote_code)
    except LoadError as e:
        raise UsageError(str(e)) from None
    model = cast_keeping_filters(model, dtype_from_name(dtype_name)).to(device).eval()
    tokenizer.padding_side = "left"  # new tokens are appended on the right of every row
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = (
            tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.convert_ids_to_tokens(0)
        )
    return model, tokenizer


def check_positions(model, tokenizer, prompts: list[str], args) -> None:
    """UsageError before any token is decoded when the longest prompt plus --max-new-tokens does not
    fit a model with learned absolute positions (GPT-2's n_positions; `position_limit`): past its
    position table the forward fails with an IndexError, after part of the text has been streamed.
    Models whose positions are computed (Hyena-RTF, rotary GPT-NeoX) decode any length."""
    limit = position_limit(model)
    if limit is None:
        return
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] + args.max_new_tokens > limit[0]:
        which = "the prompt" if len(prompts) == 1 else f"prompt {longest + 1}"
        raise UsageError(
            f"{which} of {lengths[longest]} tokens + --max-new-tokens {args.max_new_tokens} exceeds the "
            f"{limit[0]} positions of the model ({limit[1]} in {Path(args.checkpoint) / 'config.json'}: learned "
            "absolute positions); shorten the prompt or lower --max-new-tokens"
        )


def logits_processors(args):
    """The processors `generate()` would build for these settings, in its order."""
    procs = LogitsProcessorList()
    if args.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(args.repetition_penalty))
    if args.temperature > 0:  # warpers only matter when sampling
        if args.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(args.temperature))
        if args.top_k > 0:
            procs.append(TopKLogitsWarper(args.top_k))
        if args.top_p < 1.0:
            procs.append(TopPLogitsWarper(args.top_p))
    return procs


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    if ids is None:
        ids = tokenizer.eos_token_id
    return [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))


def decode_batch(model, tokenizer, prompts: list[str], args, on_token=None, decoder=None):
    """Generate for one batch of prompts (left-padded together); see `decode_ids`."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and enc["input_ids"].numel() and int(enc["input_ids"].max()) >= vocab:
        raise UsageError(
            f"the tokenizer gave token id {int(enc['input_ids'].max())}, but the model's vocabulary has "
            f"{vocab} tokens: the folder's tokenizer does not belong to its model"
        )
    return decode_ids(model, tokenizer, enc["input_ids"], enc["attention_mask"], args, on_token, decoder)


def static_decoder(model, tokenizer, prompts: list[str], args) -> StaticDecoder:
    """The compiled static decoder for --compile, its buffers sized for the longest prompt plus
    --max-new-tokens, so that every batch of the same size reuses one compiled step."""
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    try:
        return StaticDecoder(model, compile=True, max_length=longest + args.max_new_tokens)
    except StaticDecodeUnsupported as e:
        raise UsageError(f"--compile: {e}") from None


def decode_ids(model, tokenizer, ids, mask, args, on_token=None, decoder=None):
    """Decode after token ids (B, T) with attention mask (B, T). Returns (new token ids
    (B, <= max_new_tokens), stats).

    on_token(step, tokens) is called with each new column of tokens as soon as it is chosen.
    Rows that produced an end-of-sequence token are padded afterwards, as `generate()` does.
    decoder: a StaticDecoder (--compile), which then runs the prefill and the steps.
    """
    procs = logits_processors(args)
    stop = torch.tensor(eos_ids(model, tokenizer), dtype=torch.long, device=model.device)
    # Rotary / learned-position models need positions that skip the left padding; ours ignores them.
    accepted = inspect.signature(model.forward).parameters
    wants_positions = "position_ids" in accepted
    kwargs = {"position_ids": (mask.cumsum(-1) - 1).clamp_min(0)} if wants_positions else {}
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = 1  # the prefill needs the last position's logits only
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    new_tokens, cache, t_first, start = [], None, None, time.perf_counter()
    with torch.inference_mode():
        inputs = ids
        for step in range(args.max_new_tokens):
            if decoder is not None:  # the parallel prefill, then the static step (state in fixed buffers)
                last = (
                    decoder.prefill(ids, mask, ids.shape[1] + args.max_new_tokens)
                    if step == 0
                    else decoder.step(inputs)
                )
            else:
                out = model(input_ids=inputs, attention_mask=mask, use_cache=True, **cache_kwargs(cache), **kwargs)
                cache = output_cache(out)
                if cache is None:  # decoding on would feed one token with no context: garbage, no error
                    raise UsageError(
                        f"{type(model).__name__} returned no cache for use_cache=True, so it cannot be "
                        "decoded token by token"
                    )
                last = out.logits[:, -1]
            # The processors see each row's own tokens: a left pad (often the end-of-text id) would
            # count as a token the row produced, and the repetition penalty would then hit it in a
            # batch and not for the same prompt alone. Pads read as the row's newest token, which the
            # row holds anyway.
            scores = procs(torch.where(mask.bool(), ids, ids[:, -1:]), last.float())
            if args.temperature > 0:
                tok = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tok = scores.argmax(-1)
            tok = torch.where(unfinished, tok, tokenizer.pad_token_id)
            new_tokens.append(tok)
            if t_first is None:
                t_first = time.perf_counter()  # prefill + first token: time to first token
            if on_token is not None:
                on_token(step, tok)
            unfinished &= ~torch.isin(tok, stop)
            if not unfinished.any():
                break
            # Only the new token goes in: the cache carries everything before it.
            inputs = tok[:, None]
            ids = torch.cat([ids, inputs], dim=-1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            if wants_positions:
                kwargs["position_ids"] = kwargs["position_ids"][:, -1:] + 1
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    tokens = torch.stack(new_tokens, dim=1)
    return tokens, {"ttft": t_first - start, "steps": len(new_tokens), "rows": len(tokens), "decode_s": end - t_first}


def continuation_text(tokenizer, row, stop: list[int]) -> str:
    """Text of one row of new tokens, cut at (and without) the first stop token."""
    row = row.tolist()
    cut = next((i for i, t in enumerate(row) if t in stop), len(row))
    return tokenizer.decode(row[:cut], skip_special_tokens=True)


def run(args, prompts: list[str], out=sys.stdout) -> list[str]:
    """Generate for every prompt x sample; write texts to `out`, log the timings; return the texts."""
    model, tokenizer = load(args.checkpoint, args.device, args.dtype, args.trust_remote_code)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    stop = eos_ids(model, tokenizer)
    check_positions(model, tokenizer, prompts, args)
    decoder = static_decoder(model, tokenizer, prompts, args) if args.compile else None
    jobs = [(i, j) for i in range(len(prompts)) for j in range(args.num_samples)]
    single = len(jobs) == 1
    texts, total_tokens, total_time, ttfts = [], 0, 0.0, []
    for first in range(0, len(jobs), args.batch_size):
        batch = jobs[first : first + args.batch_size]
        batch_prompts = [prompts[i] for i, _ in batch]
        streamer = None
        if len(batch) == 1:  # stream this row token by token
            i, j = batch[0]
            out.write(batch_prompts[0] if single else f"==> prompt {i + 1} sample {j + 1} <==\n{batch_prompts[0]}")
            out.flush()
            streamer = Streamer(tokenizer, out)

        def on_token(step, tok, streamer=streamer):
            if streamer is not None and tok[0].item() not in stop:
                streamer.put(tok[0].item())

        tokens, stats = decode_batch(model, tokenizer, batch_prompts, args, on_token, decoder)
        for row, (i, j) in zip(tokens, batch):
            text = continuation_text(tokenizer, row, stop)
            texts.append(text)
            if streamer is None:
                out.write(f"==> prompt {i + 1} sample {j + 1} <==\n{prompts[i]}{text}\n")
            else:
                streamer.end()  # what it held back for a character the next token might have completed
                out.write("\n")
        out.flush()
        ttfts.append(stats["ttft"])
        total_tokens += stats["rows"] * stats["steps"]
        total_time += stats["ttft"] + stats["decode_s"]
        rate = stats["rows"] * (stats["steps"] - 1) / stats["decode_s"] if stats["steps"] > 1 else float("nan")
        log.info(
            f"batch {first // args.batch_size + 1}: {stats['rows']} x {stats['steps']} tokens, "
            f"time to first token {stats['ttft'] * 1e3:.1f} ms, decode {rate:.1f} tokens/s"
        )
    log.info(
        f"total: {total_tokens} tokens in {total_time:.2f} s = {total_tokens / total_time:.1f} tokens/s, "
        f"mean time to first token {1e3 * sum(ttfts) / len(ttfts):.1f} ms "
        f"(device {model.device}, dtype {args.dtype}{', compiled static step' if args.compile else ''})"
    )
    return texts


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    hf_logging.disable_progress_bar()  # keep stderr for the timings
    try:
        args, prompts = parse_args(argv)
        run(args, prompts)
    except UsageError as e:
        return error_exit("generate.py", e)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`generate.py ... | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
