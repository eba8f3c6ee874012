"""Independent references and instruments shared by the tests (numpy float64, no code under test),
and the tiny models and tokenizer they run on."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from models import HyenaRTFConfig, HyenaRTFForCausalLM

REPO = Path(__file__).resolve().parents[2]

# The project's packages: the top-level folders of the repository (README "Layout").
PACKAGES = frozenset(
    {"models", "data_prep", "training", "hf", "utils", "serving", "benchmarks", "distillation", "evaluation", "export"}
)
# The first lines of a child process that must run on a checkpoint folder's own code: from there on,
# importing any package of the project fails, whatever the import path holds.
NO_PROJECT = f"import sys\nsys.modules.update(dict.fromkeys({sorted(PACKAGES)!r}))\n"


def run_child(cmd: list, *, cwd, env: dict, timeout: int, code: int = 0) -> subprocess.CompletedProcess:
    """Run `cmd` to the end (text output captured) and check its exit code; on a wrong one the
    assertion shows the tail of its stderr."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == code, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    return proc


def load_script(name: str):
    """A top-level script (generate.py, evaluate_lm.py) as the module it is: `generate.py` is
    `import generate` from the repository root, like every other file of the tree."""
    return importlib.import_module(name.removesuffix(".py"))


# Two float routes to the same logits (the cached recurrence and the parallel forward, a compiled
# decoder and an eager one, vLLM and generate()) round differently, and by different amounts on
# different CPUs: on the tiny float32 test models they differ by up to ~25 eps of the largest
# |logit| (measured: 2e-5 at |logit| <= 7.7). Where the best two logits are closer than
# GREEDY_TIE_EPS eps of the largest |logit| (8 times that), either token is a correct greedy choice.
GREEDY_TIE_EPS = 200


def rollout_logits(model, sequences: torch.Tensor, prompt_len: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The logits (float64, (B, new, V)) that chose each token of `sequences` (B, prompt_len + new)
    after the prompt, from the model's parallel forward: use_cache=False, no generation code, causal,
    so one forward over the whole sequences teacher-forces every step.
    mask: (b, prompt_len) attention mask of the prompts (left padding), grown with ones; b may divide
    B (generate()'s num_return_sequences rows per prompt, in order)."""
    B, T = sequences.shape
    if mask is not None:
        mask = mask.repeat_interleave(B // mask.shape[0], dim=0)
        mask = torch.cat([mask, mask.new_ones(B, T - prompt_len)], dim=-1)
    with torch.no_grad():
        return model(sequences, attention_mask=mask, use_cache=False).logits[:, prompt_len - 1 : -1].double()


def rounding_tie(model, logits: torch.Tensor) -> torch.Tensor:
    """How far apart two float routes may round the logits (..., V) of one step: GREEDY_TIE_EPS eps
    of the model's dtype times the step's largest |logit|, shape (...)."""
    return GREEDY_TIE_EPS * torch.finfo(model.dtype).eps * logits.abs().amax(-1)


def penalised(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Hugging Face's repetition penalty, written out so that it is checked, not reused: the logit
    (B, V) of a token in `seen_ids` (B, T) is divided by `penalty` when positive, multiplied when not."""
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seen_ids, True)
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def assert_greedy(
    model, sequences: torch.Tensor, prompt_len: int, mask: torch.Tensor | None = None, penalty: float = 1.0
) -> None:
    """Every token of `sequences` (B, prompt_len + new) after the prompt is a greedy choice of `model`
    given the tokens before it: the largest logit of the model's parallel forward (use_cache=False,
    no generation code; causal, so one forward over the whole sequences teacher-forces every step),
    or within the rounding tie (GREEDY_TIE_EPS) of the largest. Asserting this instead of equal token
    ids keeps a test from pinning which way one machine's rounding decides a near-tie.

    mask: (B, prompt_len) attention mask of the prompts (left padding), grown with ones.
    penalty: Hugging Face's repetition penalty (`penalised`), on the tokens already in the sequence.
    """
    logits = rollout_logits(model, sequences, prompt_len, mask)
    chosen = sequences[:, prompt_len:]
    if penalty != 1.0:
        for j in range(chosen.shape[1]):  # step j has seen the prompt and the first j new tokens
            logits[:, j] = penalised(logits[:, j], sequences[:, : prompt_len + j], penalty)
    best, top = logits.max(-1)
    got = logits.gather(-1, chosen[..., None])[..., 0]
    tie = rounding_tie(model, logits)
    short = (best - got > tie).nonzero().tolist()
    assert not short, "not a greedy choice: " + "; ".join(
        f"row {r} new token {j}: {int(chosen[r, j])} ({float(got[r, j]):.6g}) where {int(top[r, j])} "
        f"has {float(best[r, j]):.6g} (tie {float(tie[r, j]):.2g})"
        for r, j in short[:4]
    )


class Seeded(NamedTuple):
    """A generate() call run from a seed: its output (return_dict_in_generate=True) and the state of
    torch's CPU generator after it, which tells whether two runs drew the same random numbers."""

    out: Any
    rng: torch.Tensor


def seeded(seed: int, run) -> Seeded:
    """run() (a generate() call) under torch.manual_seed(seed) and no_grad."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = run()
    return Seeded(out, torch.get_rng_state())


# What assert_sampled reads from generate(): the raw logits and the processed scores of every step.
SAMPLED_OUTPUTS = dict(return_dict_in_generate=True, output_logits=True, output_scores=True)


def assert_sampled(
    model, run: Seeded, prompt_len: int, mask: torch.Tensor | None = None, reference: Seeded | None = None
) -> None:
    """A sampling route's generate() output (`run`, with SAMPLED_OUTPUTS) drew every token after the
    prompt from the model's distribution given the tokens before it:

    - the logits of every step (output_logits) are the parallel forward's (`rollout_logits`: no cache,
      no generation code) on the run's own sequences, within the rounding tie of two float routes
      (`rounding_tie`: GREEDY_TIE_EPS eps of the step's largest |logit|, 8 times the ~25 eps measured
      between two routes); a cache that lost or misplaced state is off by O(1);
    - every drawn token has a finite processed score (output_scores: after temperature, top-k,
      top-p), i.e. non-zero probability in what the sampler was handed.

    reference: the same call through another route (use_cache=False, the eager cache) from the same
    seed. Both routes must have drawn the same random numbers (the same generator state after them)
    and both pass the checks above. Their ids are not compared: where a draw (or a top-k / top-p cut)
    lies within rounding of a boundary, the same random numbers under two distributions that differ
    by rounding pick different tokens, and the rows part there; each route's continuation is still
    checked against the parallel forward on its own tokens.

    mask: (B, prompt_len) attention mask of the prompts (left padding)."""
    out = run.out
    new = out.sequences[:, prompt_len:]
    assert len(out.logits) == len(out.scores) == new.shape[1], "generate() must return SAMPLED_OUTPUTS"
    ref = rollout_logits(model, out.sequences, prompt_len, mask)
    err = (torch.stack(out.logits, 1).double() - ref).abs().amax(-1)
    tie = rounding_tie(model, ref)
    off = (err > tie).nonzero().tolist()
    assert not off, "logits are not the parallel forward's: " + "; ".join(
        f"row {r} new token {j}: off by {float(err[r, j]):.3g} (tie {float(tie[r, j]):.2g})" for r, j in off[:4]
    )
    drawn = torch.stack(out.scores, 1).gather(-1, new[..., None])[..., 0]
    barred = (~drawn.isfinite()).nonzero().tolist()
    assert not barred, "drawn where the sampler had probability 0: " + "; ".join(
        f"row {r} new token {j}: {int(new[r, j])}" for r, j in barred[:4]
    )
    if reference is not None:
        assert reference.out.sequences.shape == out.sequences.shape
        assert torch.equal(run.rng, reference.rng), "the two routes drew different random numbers"
        assert_sampled(model, reference, prompt_len, mask)


def assert_beams(
    model,
    run: Seeded,
    prompt_len: int,
    num_beams: int,
    returned: int = 1,
    mask: torch.Tensor | None = None,
    sampled: bool = False,
    length_penalty: float = 1.0,
    reference: Seeded | None = None,
) -> None:
    """A beam search's generate() output (`run`: return_dict_in_generate=True, output_scores=True;
    `returned` (num_return_sequences) rows per prompt, in order; no stop token, so every beam has all `new` tokens):

    - each returned beam's sequences_score is the parallel forward's (`rollout_logits`) sum of the
      log-probabilities of its tokens divided by new ** length_penalty, within
      (2 sum_j tie_j + new eps |sum|) / new ** length_penalty: a logit off by tie_j (`rounding_tie`)
      moves a log-softmax by at most 2 tie_j, and the float32 running sum of `new` terms rounds by
      at most new eps |sum|. A cache reordered to the wrong beam scores its tokens under another
      prefix, off by O(1);
    - (not `sampled`) every token is among the best num_beams continuations of its own prefix, up
      to the rounding tie: a beam is kept only while it ranks in the top num_beams candidates, and
      its prefix's other continuations compete with the same running score;
    - each prompt's beams come back best first.

    reference: the same call through another route (use_cache=False, the eager cache), same seed:
    both routes drew the same random numbers and pass these checks. Their beams are not compared:
    one candidate kept instead of another within rounding of the same score sends the two searches
    down different branches, whose final scores need not be close.

    mask: (B, prompt_len) attention mask of the prompts (left padding)."""
    out = run.out
    seqs, scores = out.sequences, out.sequences_scores.double()
    new = seqs.shape[1] - prompt_len
    logits = rollout_logits(model, seqs, prompt_len, mask)
    tie = rounding_tie(model, logits)
    chosen = seqs[:, prompt_len:, None]
    total = logits.log_softmax(-1).gather(-1, chosen)[..., 0].sum(-1)
    eps = torch.finfo(torch.float32).eps  # generate() keeps beam scores in float32
    bound = (2 * tie.sum(-1) + new * eps * total.abs()) / new**length_penalty
    err = (scores - total / new**length_penalty).abs()
    off = (err > bound).nonzero()[:, 0].tolist()
    assert not off, "beam scores are not the parallel forward's: " + "; ".join(
        f"beam {r}: {float(scores[r]):.6g} where the forward gives {float(total[r] / new**length_penalty):.6g} "
        f"(bound {float(bound[r]):.2g})"
        for r in off[:4]
    )
    if not sampled:
        got = logits.gather(-1, chosen)
        better = (logits > got + tie[..., None]).sum(-1)
        low = (better >= num_beams).nonzero().tolist()
        assert not low, f"not among the best {num_beams} continuations: " + "; ".join(
            f"beam {r} new token {j}: {int(chosen[r, j])} has {int(better[r, j])} better" for r, j in low[:4]
        )
    per_prompt = out.sequences_scores.view(-1, returned)
    assert (per_prompt[:, :-1] >= per_prompt[:, 1:]).all(), per_prompt
    if reference is not None:
        assert reference.out.sequences.shape == seqs.shape
        assert torch.equal(run.rng, reference.rng), "the two routes drew different random numbers"
        assert_beams(model, reference, prompt_len, num_beams, returned, mask, sampled, length_penalty)


def naive_greedy(
    model, ids: torch.Tensor, new: int, mask: torch.Tensor | None = None, penalty: float = 1.0
) -> torch.Tensor:
    """Greedy decoding by a full parallel forward over the whole sequence for every token: no cache,
    no generation code. mask: (B, T) attention mask of `ids` (left padding), grown with the ids.
    penalty as in `assert_greedy`. For a test that needs a continuation to compare text or stops
    against; a route's own tokens are checked with `assert_greedy`."""
    with torch.no_grad():
        for _ in range(new):
            logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
            if penalty != 1.0:
                logits = penalised(logits, ids, penalty)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
    return ids


# Every keyword a model may receive its cache under (transformers from 5.24, and before).
CACHE_KEYWORDS = ("cache", "past_key_values")


@dataclass
class Call:
    positions: int  # how many positions this forward was fed
    seen: int | None  # positions the cache it was given had already seen (None: no cache)
    flops: int


def spy_on_forward(model) -> list[Call]:
    """Replace model.forward by a recorder (generate() calls the module, which calls forward)."""
    calls: list[Call] = []
    forward = type(model).forward.__get__(model)  # the real one, even if a spy is already installed

    @functools.wraps(forward)  # keeps the signature, which generate() inspects to decide what to pass
    def recording_forward(*args, **kwargs):
        fed = next(x for x in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")) if x is not None)
        cache = next((kwargs[name] for name in CACHE_KEYWORDS if kwargs.get(name) is not None), None)
        seen = None if cache is None else cache.seen_tokens
        with FlopCounterMode(display=False) as counter:
            out = forward(*args, **kwargs)
        calls.append(Call(fed.shape[1], seen, counter.get_total_flops()))
        return out

    model.forward = recording_forward
    return calls


def np_causal_conv(u: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Naive O(T^2) causal convolution, u (B, C, T), k (C, T): y_t = sum_{s<=t} k_s u_{t-s}."""
    T = u.shape[-1]
    y = np.zeros(u.shape)
    for t in range(T):
        y[..., t] = (k[:, : t + 1][:, ::-1] * u[..., : t + 1]).sum(-1)
    return y


class FFTSpy(TorchFunctionMode):
    """Records (function name, dtype of the first tensor argument) of every torch.fft call made
    under it, however torch.fft was imported."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, torch.dtype]] = []

    @property
    def dtypes(self) -> list[torch.dtype]:
        return [d for _, d in self.calls]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if "fft" in name and args and isinstance(args[0], torch.Tensor):
            self.calls.append((name, args[0].dtype))
        return func(*args, **(kwargs or {}))


def filter_chunk(kernel: torch.Tensor, rec, u: torch.Tensor, x: torch.Tensor | None = None):
    """A chunk u (B, C, T) through a long filter from the state x (or zero), composed as every operator
    composes it (models/long_filter.py): (kernel * u + rec.response(x, T), rec.advance(u, x)).
    kernel: (C, T), the filter's kernel(T) or its system's taps(T)."""
    from models.fftconv import fft_causal_conv

    y = fft_causal_conv(u, kernel.to(u.dtype))
    if x is not None:
        y = y + rec.response(x, u.shape[-1]).to(y.dtype)
    return y, rec.advance(u, x)


def train_tiny_tokenizer(path) -> str:
    """A byte-level BPE of about 300 tokens with `<|endoftext|>`, trained on a few generated English
    sentences and written to `path` (a tokenizers JSON file); returns the path as a string. Lets the
    Hugging Face tests run without the shared real tokenizers, with a vocabulary small enough that
    a tiny model's embedding costs nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = (
        "the cat dog sat on a mat and ran to house tree big small red blue quick lazy fox jumps over "
        "def return class import for in if else while print self value list"
    ).split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=12)) + "." for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    tok.save(str(path))
    return str(path)


def tiny_config(**fields) -> HyenaRTFConfig:
    """A tiny HyenaRTFConfig: d_model 32, 2 layers, l_max 32, state size 4, 4 heads, and whatever
    `fields` set (or override)."""
    return HyenaRTFConfig(**{"d_model": 32, "n_layer": 2, "l_max": 32, "state_size": 4, "n_head": 4, **fields})


def tiny_model(attn_layers=None, vocab=97, seed=0, **overrides) -> HyenaRTFForCausalLM:
    """A random tiny Hyena-RTF (`tiny_config`) that decodes exactly the tokens asked for (no EOS),
    pad id 0; `overrides` replace any config field."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=vocab, pad_vocab_size_multiple=8, attn_layers=attn_layers, initializer_range=0.3)
    model = HyenaRTFForCausalLM(tiny_config(**{**fields, "pad_token_id": 0, **overrides})).eval()
    model.generation_config.eos_token_id = None  # every test decodes exactly the tokens it asks for
    model.generation_config.pad_token_id = 0
    return model


def slow_poles(model) -> HyenaRTFForCausalLM:
    """Give every other RTF filter of every Hyena layer a pole at radius ~0.995 and a larger
    numerator, so that its impulse response is still large after l_max taps: decoding past l_max
    then depends on the kernel's aliasing correction and on an exact prefill (as in
    test_generation.py). Returns the model."""
    for block in model.model.layers:
        f = getattr(block.mixer, "filter", None)
        if f is None or not hasattr(f, "slack"):
            continue
        with torch.no_grad():
            f.a[::2] = 0.0
            f.a[::2, 0] = -1.0
            f.slack[::2] = 0.005
            f.b.mul_(3.0)
        assert 0.99 < f.pole_radius().max() < 1.0
    return model


def counting_backend(graphs: list):
    """A torch.compile backend that records the example inputs of each graph it is handed and runs
    the graph as it is."""

    def backend(gm, example_inputs, **_):
        graphs.append(example_inputs)
        return gm.forward

    return backend


def decode_tolerance(model, eps: float, floor: float = 0.0) -> float:
    """A bound on the relative error of a model's recurrent decoding against its parallel form,
    derived from the conditioning of its filters' modal forms: each state term rounds by eps, and
    the output of a filter sums its terms with a cancellation of at most `amplification`
    (models/modal.py); 64 covers the rounding of the products, the layers and the steps. Never
    below `floor` (the rounding of the rest of the network, which the caller knows)."""
    from models.modal import amplification

    worst = 1.0
    for module in model.modules():
        if getattr(module, "finite_state", False) and hasattr(module, "recurrence"):
            rec = module.recurrence(torch.float64)
            worst = max(worst, float(amplification(rec, rec.taps(module.l_max + 1)).max()))
    return max(floor, 64 * eps * worst)
