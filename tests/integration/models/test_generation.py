"""Recurrent generation of Hyena-RTF against the parallel forward, through our cache and through
Hugging Face's GenerationMixin (greedy, sampling, beam search, repetition penalty, stop tokens,
left padding).

Models are random and tiny, float32, with a short l_max (32) so that decoding runs past it. Half of
the RTF channels get a pole near the unit circle (radius ~0.995) and a larger numerator: their
impulse response is still large after l_max taps, so a recurrence that ignored the kernel's
aliasing (the C = b (I - A^L)^-1 correction) or a prefill with a wrong state would fail these
tests instead of hiding behind fast-decaying filters. initializer_range 0.3 spreads the logits, and
greedy tokens are checked with `assert_greedy` (a greedy choice of the parallel forward, up to a
rounding tie), sampled tokens with `assert_sampled` and beams with `assert_beams` (drawn from, and
scored by, the parallel forward), never as equal ids from two routes whose rounding a near-tie
could tell apart.
"""

import pytest
import torch
from support.helpers import (
    SAMPLED_OUTPUTS,
    assert_beams,
    assert_greedy,
    assert_sampled,
    naive_greedy,
    seeded,
    spy_on_forward,
    tiny_config,
    train_tiny_tokenizer,
)

from models import HyenaRTFForCausalLM
from models.hf_compat import cache_kwargs, output_cache
from models.hyena import HyenaState

pytestmark = pytest.mark.hf  # CI runs these under every supported transformers release

VOCAB, L_MAX = 97, 32


def tiny_model(filter="rtf", attn_layers=None, seed=0) -> HyenaRTFForCausalLM:
    torch.manual_seed(seed)
    fields = dict(filter=filter, attn_layers=attn_layers, implicit_order=16, initializer_range=0.3, pad_token_id=0)
    cfg = tiny_config(vocab_size=VOCAB, pad_vocab_size_multiple=8, l_max=L_MAX, **fields)
    model = HyenaRTFForCausalLM(cfg).eval()
    if filter == "rtf":
        for block in model.model.layers:
            if block.is_attention:
                continue
            f = block.mixer.filter
            with torch.no_grad():  # slow poles on every other filter (see the module docstring)
                f.a[::2] = 0.0
                f.a[::2, 0] = -1.0
                f.slack[::2] = 0.005
                f.b.mul_(3.0)
            assert 0.99 < f.pole_radius().max() < 1.0
    # Unset generation defaults, so every test states what it uses.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative error per position: ||a - b|| / ||b|| over the vocabulary, (B, T)."""
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


MODELS = [("rtf", None), ("rtf", [1]), ("implicit", None), ("implicit", [1])]


@pytest.mark.parametrize("filter,attn", MODELS, ids=["rtf", "rtf+attn", "implicit", "implicit+attn"])
@pytest.mark.parametrize(
    "prompt,total", [(8, 24), (8, 80), (48, 80)], ids=["below_lmax", "across_lmax", "prefill_past_lmax"]
)
def test_prefill_then_steps_match_parallel_forward(filter, attn, prompt, total):
    model = tiny_model(filter, attn)
    ids = torch.randint(0, VOCAB, (2, total), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits  # parallel FFT form over the whole sequence
        out = model(ids[:, :prompt], use_cache=True)
        logits, cache = [out.logits], output_cache(out)
        for t in range(prompt, total):
            out = model(ids[:, t : t + 1], use_cache=True, **cache_kwargs(cache))
            logits.append(out.logits)
    dec = torch.cat(logits, dim=1)
    assert dec.shape == ref.shape
    assert cache.get_seq_length() == total
    err = rel_err(dec, ref)
    assert err.max() <= 1e-4, f"max relative error {err.max():.2e} at position {err.max(0).values.argmax()}"


@pytest.mark.parametrize("attn", [None, [1]], ids=["hyena", "hybrid"])
def test_greedy_generate_decodes_greedily_past_l_max(attn):
    model = tiny_model("rtf", attn)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False)  # 46 tokens > l_max
    assert out.shape == (2, 46)
    assert_greedy(model, out, 6)


def test_sampling_is_seeded_and_matches_the_uncached_path():
    """Seeded sampling (temperature, top-k, top-p) is reproducible, and through the cache it draws
    from the parallel forward's distribution with the random numbers of a run without the cache
    (assert_sampled; the tokens of the two routes are not compared, a draw within rounding of a
    boundary may part them)."""
    model = tiny_model("rtf", [1])
    ids = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=30, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, **SAMPLED_OUTPUTS)

    def sample(seed, **extra):
        return seeded(seed, lambda: model.generate(ids, **kw, **extra))

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a.out.sequences, b.out.sequences)  # the same route twice: the same arithmetic
    assert not torch.equal(a.out.sequences, c.out.sequences)
    assert_sampled(model, a, 5, reference=sample(0, use_cache=False))
    greedy = model.generate(ids, max_new_tokens=30, do_sample=False)
    assert not torch.equal(a.out.sequences, greedy)


@pytest.mark.parametrize("attn", [None, [1]], ids=["hyena", "hybrid"])
def test_beam_search_with_cache_equals_without(attn):
    """Beam search reorders the cache every step (HyenaRTFCache.reorder_cache): every beam it returns,
    with the cache and without, is scored as the parallel forward scores it and keeps only
    continuations among the best 4 of their prefix (assert_beams; the two routes' beams are not
    compared, a near-tie of two candidates may send them down different branches)."""
    model = tiny_model("rtf", attn)
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=30, num_beams=4, num_return_sequences=2, do_sample=False, early_stopping=False)
    kw.update(return_dict_in_generate=True, output_scores=True)
    cached = seeded(0, lambda: model.generate(ids, **kw))
    uncached = seeded(0, lambda: model.generate(ids, **kw, use_cache=False))
    assert cached.out.sequences.shape == (4, 35)
    assert_beams(model, cached, 5, num_beams=4, returned=2, reference=uncached)
    # Two distinct beams per prompt came back (the search kept alternatives alive).
    assert not torch.equal(cached.out.sequences[0], cached.out.sequences[1])
    assert not torch.equal(cached.out.sequences[2], cached.out.sequences[3])


def test_repetition_penalty_decodes_greedily_on_penalised_logits():
    model = tiny_model("rtf", [1])
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=30, do_sample=False, repetition_penalty=1.8)
    assert out.shape == (2, 36)
    assert_greedy(model, out, 6, penalty=1.8)
    assert not torch.equal(out, naive_greedy(model, ids, 30))  # the penalty changed something


def test_stop_token_ends_each_row_and_pads_it():
    model = tiny_model("rtf", [1])
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        free = model.generate(ids, max_new_tokens=30, do_sample=False)  # the same route, no stop token
    assert_greedy(model, free, 6)
    free = free[:, 6:]
    # A stop token that row 0 produces at step k (for the first time) and row 1 later or never.
    k = 4
    eos = int(free[0, k])
    while eos in free[0, :k].tolist():
        k += 1
        eos = int(free[0, k])
    pad = next(t for t in range(1, VOCAB) if t not in free.flatten().tolist())
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=pad)[:, 6:]
    ends = [(row.tolist() + [eos]).index(eos) + 1 for row in free]  # tokens up to and incl. eos
    assert out.shape[1] == min(30, max(ends))
    for r in range(2):
        n = min(ends[r], out.shape[1])
        assert torch.equal(out[r, :n], free[r, :n])
        assert (out[r, n:] == pad).all()
    assert out[0, k] == eos
    assert ends[0] == k + 1


def _cache_shapes(cache) -> list:
    return [
        (tuple(s.conv.shape), tuple(s.filt.shape), s.filt.dtype)
        if isinstance(s, HyenaState)
        else tuple(tuple(t.shape) for t in s)
        for s in cache.layers
    ]


def test_cache_size_is_constant_for_hyena_layers():
    model = tiny_model("rtf", None)
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    shapes = []
    with torch.no_grad():
        for new in (1, 5, 60):  # 60: well past l_max
            out = model.generate(ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
            shapes.append(_cache_shapes(output_cache(out)))
            # Decoding keeps: short-conv tail (3d, w - 1) and the modal state (d, 2, slots), with
            # ceil(n / 2) = 2 slots for order 4 (real poles two to a slot). The filters of
            # tiny_model with a pole at the origin of multiplicity 3 get cancelling residues
            # (models/rtf.py `_spread_zero_cluster`), so their layers' state is float64.
            assert shapes[-1] == [((2, 96, 2), (2, 32, 2, 2), torch.float64)] * 2
        assert shapes[0] == shapes[1] == shapes[2]
        # Stepping by hand: same sizes at every step, and the byte count never moves.
        cache = output_cache(model(ids, use_cache=True))
        nbytes = sum(s.conv.nbytes + s.filt.nbytes for s in cache.layers)
        for t in range(50):
            cache = output_cache(model(ids[:, t % 10 : t % 10 + 1], use_cache=True, **cache_kwargs(cache)))
            assert _cache_shapes(cache) == shapes[0]
        assert sum(s.conv.nbytes + s.filt.nbytes for s in cache.layers) == nbytes
        # The attention layer of a hybrid model, by contrast, grows by one key per token.
        hybrid = tiny_model("rtf", [1])
        cache = output_cache(hybrid(ids, use_cache=True))
        cache = output_cache(hybrid(ids[:, :1], use_cache=True, **cache_kwargs(cache)))
        assert cache.layers[1][0].shape[2] == 11


@pytest.mark.parametrize("attn", [None, [1]], ids=["hyena", "hybrid"])
def test_left_padded_batch_decodes_each_prompt_as_if_alone(attn):
    model = tiny_model("rtf", attn)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (3, 14, 8)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    new = 30  # 14 + 30 > l_max
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)[:, width:]
        for row, p in zip(batched, prompts):  # greedy for the prompt alone: no padding in the reference
            assert_greedy(model, torch.cat([p, row])[None], len(p))
            alone = model.generate(p[None], max_new_tokens=new, do_sample=False)
            assert_greedy(model, alone, len(p))


@pytest.mark.parametrize("attn", [None, [1]], ids=["hyena", "hybrid"])
def test_chunked_prefill_feeds_chunks_and_generates_the_same_tokens(attn):
    """generate(prefill_chunk_size=7) on a left-padded batch whose prompt (45) runs past l_max (32):
    greedy tokens, and the model is fed the prompt in pieces of at most 7
    positions (counted), each continuing the state in closed form, then one position per step."""
    model = tiny_model("rtf", attn)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, VOCAB, (2, 45), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    calls = spy_on_forward(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, prefill_chunk_size=7)
    fed = [c.positions for c in calls]
    assert fed == [7] * 6 + [3] + [1] * 7, fed
    assert out.shape == (2, 53)
    assert_greedy(model, out, 45, mask)


def test_stop_strings_with_a_tokenizer(tmp_path):
    """generate(stop_strings=..., tokenizer=...): the tokenizer is generate()'s, never forwarded to the
    model; the output is the unstopped greedy output cut right after the first stop string."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=train_tiny_tokenizer(tmp_path / "tok.json"))
    model = tiny_model("rtf", None)
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    full = model.generate(ids, max_new_tokens=20, do_sample=False)
    text = tok.decode(full[0, 12:])
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    out = model.generate(ids, max_new_tokens=20, do_sample=False, stop_strings=[stop], tokenizer=tok)
    assert torch.equal(out[0], full[0, : out.shape[1]])
    assert stop in tok.decode(out[0, 12:]) and out.shape[1] < full.shape[1]
