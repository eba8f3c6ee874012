"""The static decode step (models/static_decode.py, StaticHyenaRTFCache in models/cache.py).

The references are independent of the step: the parallel FFT forward over the whole sequence (no
cache, no recurrence), in float64 for logits and as greedy choices for tokens (helpers.assert_greedy:
a near-tie may go either way, as rounding decides it), and the eager cached path (HyenaRTFCache,
growing KV cache). "It compiles
as one graph and is reused" is checked by counting what torch.compile's backend is handed, and "the
state is written in place" by the tensors' addresses, never by comparing a path with itself.

Models are tiny (d 32, l_max 32), decode past l_max, and have slow poles on every other RTF filter
(helpers.slow_poles), so an error in the recurrence or the prefill shows; initializer_range 0.3
spreads the logits. Token-for-token equality is asserted only between routes that do the same
arithmetic (a traced graph run as is, a returned cache continued).
"""

from __future__ import annotations

import pytest
import torch
from support.helpers import (
    SAMPLED_OUTPUTS,
    assert_beams,
    assert_greedy,
    assert_sampled,
    counting_backend,
    decode_tolerance,
    seeded,
    slow_poles,
    tiny_model,
)
from transformers import CompileConfig

from models.attention import StaticKV
from models.cache import StaticHyenaRTFCache
from models.hf_compat import cache_kwargs, output_cache
from models.hyena import HyenaState
from models.static_decode import (
    StaticDecoder,
    StaticDecodeUnsupported,
    check_static_decoding,
    decode_step,
    greedy_decode,
)

VOCAB, PROMPT, TOTAL = 97, 8, 48  # l_max is 32: the steps run past it
KINDS = {
    "rtf": {},
    "hybrid": {"attn_layers": [1]},
    "multihyena": {"multi_hyena_heads": 4},
    "multihyena_hybrid": {"multi_hyena_heads": 8, "attn_layers": [0]},
}


def model_of(kind: str, dtype=torch.float32):
    recurrent = "float64" if dtype == torch.float64 else "float32"
    return slow_poles(tiny_model(**KINDS[kind], recurrent_dtype=recurrent)).to(dtype)


def batch(width=TOTAL, pads=(3, 0, 5)):
    """Random ids (3, width) and a left-padding mask with `pads` leading zeros per row."""
    ids = torch.randint(1, VOCAB, (len(pads), width), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(width)[None, :] >= torch.tensor(pads)[:, None]).long()
    return ids, mask


def copied_inputs(example_inputs: list) -> list[torch.Tensor]:
    """The tensors a compiled graph takes that are neither parameters nor marked static: what is
    copied in at every call (and what a CUDA graph would replay from a stale address otherwise)."""
    return [
        t
        for t in example_inputs
        if isinstance(t, torch.Tensor)
        and not isinstance(t, torch.nn.Parameter)
        and not hasattr(t, "_dynamo_static_input_type")
    ]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over positions of ||a - b|| / ||b|| over the vocabulary."""
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def static_logits(model, ids, mask, decoder=None) -> torch.Tensor:
    """Prefill ids[:, :PROMPT], then feed the rest one token per static step: logits (B, T - PROMPT + 1, V)."""
    decoder = decoder or StaticDecoder(model)
    with torch.no_grad():
        out = [decoder.prefill(ids[:, :PROMPT], mask[:, :PROMPT], ids.shape[1])]
        out += [decoder.step(ids[:, t]) for t in range(PROMPT, ids.shape[1])]
    return torch.stack(out, dim=1)


# ---- the step against independent references -----------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_float64_steps_match_the_parallel_forward(kind):
    """Prefill + 40 static steps (left-padded rows) give the logits of one parallel forward over the
    whole sequence. float64 throughout (recurrent_dtype float64): relative error within
    `decode_tolerance` (64 eps64 times the largest cancellation of a filter's modal terms; at
    least 1e-11), observed <= 2e-11."""
    model = model_of(kind, torch.float64)
    ids, mask = batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=False).logits[:, PROMPT - 1 :]
    err = rel_err(static_logits(model, ids, mask), ref)
    tol = decode_tolerance(model, torch.finfo(torch.float64).eps, floor=1e-11)
    assert err < tol, f"{kind}: {err:.2e} > {tol:.2e}"


@pytest.mark.hf  # generate() is the reference
@pytest.mark.parametrize("kind", KINDS)
def test_float32_logits_and_greedy_tokens_equal_the_eager_cache(kind):
    """float32: static steps vs the eager cached path (HyenaRTFCache, growing KV cache), fed the
    same tokens: 1e-5 relative (float32 rounding of (B, d) against (B, 1, d) matmuls and of attention
    over the fixed-length masked key axis; observed <= 1.3e-6), and 1e-4 against the parallel
    forward (as test_generation.py). Greedy decoding by the static step and by generate() with the
    eager cache both give the parallel forward's greedy tokens, on a left-padded batch."""
    model = model_of(kind)
    ids, mask = batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=False).logits[:, PROMPT - 1 :]
        out = model(ids[:, :PROMPT], attention_mask=mask[:, :PROMPT], use_cache=True)
        cache, eager = output_cache(out), [out.logits[:, -1]]
        for t in range(PROMPT, TOTAL):
            step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], use_cache=True, **cache_kwargs(cache))
            eager.append(step.logits[:, -1])
    static = static_logits(model, ids, mask)
    assert rel_err(static, torch.stack(eager, 1)) < 1e-5
    assert rel_err(static, ref) < 1e-4

    prompt, prompt_mask = ids[:, :PROMPT], mask[:, :PROMPT]
    with torch.no_grad():
        hf = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=40, do_sample=False)[:, PROMPT:]
    tokens = greedy_decode(model, prompt, prompt_mask, 40)
    assert tokens.shape == hf.shape == (3, 40)
    assert_greedy(model, torch.cat([prompt, tokens], 1), PROMPT, prompt_mask)
    assert_greedy(model, torch.cat([prompt, hf], 1), PROMPT, prompt_mask)


def test_left_padded_rows_decode_as_each_prompt_alone():
    model = model_of("hybrid")
    ids, mask = batch(PROMPT, pads=(3, 0, 5))
    together = greedy_decode(model, ids, mask, 30)
    for row, pad in enumerate((3, 0, 5)):  # greedy for the prompt alone: no padding in the reference
        prompt = ids[row : row + 1, pad:]
        assert_greedy(model, torch.cat([prompt, together[row : row + 1]], 1), prompt.shape[1])
        assert_greedy(model, torch.cat([prompt, greedy_decode(model, prompt, None, 30)], 1), prompt.shape[1])


# ---- static: in place, one graph -----------------------------------------------------------------
def addresses(cache) -> list[int]:
    tensors = []
    for s in cache.layers:
        tensors += [s.conv, s.filt] if isinstance(s, HyenaState) else [s.k, s.v, s.valid]
    return [t.data_ptr() for t in tensors + [cache.pos]]


@pytest.mark.parametrize("kind", ["hybrid", "multihyena"])
def test_steps_write_into_the_same_buffers(kind):
    """The static cache's tensors keep their addresses through the steps (nothing reallocated);
    the eager cache's Hyena states are written in place by the same step."""
    model = model_of(kind)
    ids, mask = batch()
    decoder = StaticDecoder(model)
    with torch.no_grad():
        decoder.prefill(ids[:, :PROMPT], mask[:, :PROMPT], TOTAL)
        before, states = addresses(decoder.cache), list(decoder.cache.layers)
        for t in range(PROMPT, TOTAL):
            decoder.step(ids[:, t])
    assert addresses(decoder.cache) == before
    assert all(a is b for a, b in zip(decoder.cache.layers, states))
    assert decoder.cache.seen_tokens == TOTAL

    with torch.no_grad():
        cache = output_cache(model(ids[:, :PROMPT], use_cache=True))
        hyena = [s for s in cache.layers if isinstance(s, HyenaState)]
        before = [(s.conv.data_ptr(), s.filt.data_ptr()) for s in hyena]
        for t in range(PROMPT, 20):
            cache = output_cache(model(ids[:, t : t + 1], use_cache=True, **cache_kwargs(cache)))
    assert [(s.conv.data_ptr(), s.filt.data_ptr()) for s in hyena] == before
    assert [s for s in cache.layers if isinstance(s, HyenaState)] == hyena


@pytest.mark.parametrize("kind", KINDS)
def test_compiles_as_one_graph_reused_for_every_step_and_prompt(kind):
    """torch.compile(decode_step, fullgraph=True) accepts the step (no graph break: no .item(), no
    bool(tensor), no data-dependent branch), traces it ONCE for all 40 steps (a Python scalar that
    changed per step would force a retrace) and again not for a second prompt of the same shapes,
    whose buffers it writes in place; the tokens equal the uncompiled step's."""
    model = model_of(kind)
    ids, mask = batch(PROMPT)
    graphs = []
    compiled = StaticDecoder(model, compile=True, backend=counting_backend(graphs))
    assert torch.equal(greedy_decode(model, ids, mask, 40, decoder=compiled), greedy_decode(model, ids, mask, 40))
    assert len(graphs) == 1
    other = torch.randint(1, VOCAB, ids.shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(greedy_decode(model, other, None, 40, decoder=compiled), greedy_decode(model, other, None, 40))
    assert len(graphs) == 1
    # Every tensor the graph reads is a parameter or a buffer marked static (so a CUDA graph reads
    # and writes it where it is), except the step's token ids, the one input copied in per step.
    # (Sizes that dynamo made symbolic, after other tests in the process compiled other shapes,
    # are passed as SymInt scalars, not tensors: they are not copies.)
    assert [tuple(t.shape) for t in copied_inputs(graphs[0])] == [(3,)]


@pytest.mark.parametrize("kind", KINDS)
def test_with_symbolic_sizes_the_graph_still_reads_only_static_tensors(kind):
    """Once dynamo has compiled the step for two models of different widths it compiles with
    symbolic sizes (automatic dynamic shapes), and a size read from a tensor the step does not
    otherwise touch (a pole tensor's shape, say) makes that tensor a graph input copied in at every
    step, which a CUDA graph would replay from a stale address. In a fresh dynamo state, whatever
    ran before in the process."""
    torch._dynamo.reset()
    ids, mask = batch(PROMPT)
    for d_model in (32, 64):  # the second compile: sizes symbolic
        model = slow_poles(tiny_model(**KINDS[kind], d_model=d_model))
        graphs = []
        compiled = StaticDecoder(model, compile=True, backend=counting_backend(graphs))
        assert torch.equal(greedy_decode(model, ids, mask, 6, decoder=compiled), greedy_decode(model, ids, mask, 6))
    assert len(graphs) == 1
    assert [t.dim() for t in copied_inputs(graphs[0])] == [1]  # the step's token ids, (B,)


def test_aot_eager_backend_gives_the_same_tokens():
    """AOTAutograd's functionalisation of the in-place writes (what inductor compiles from) keeps
    the tokens of the uncompiled step."""
    model = model_of("multihyena_hybrid")
    ids, mask = batch(PROMPT)
    decoder = StaticDecoder(model, compile=True, backend="aot_eager")
    assert torch.equal(greedy_decode(model, ids, mask, 40, decoder=decoder), greedy_decode(model, ids, mask, 40))


def test_a_second_shorter_prompt_sees_none_of_the_first():
    """Buffers reused for a shorter prompt hold nothing of the longer one before it (its keys
    beyond the new prompt are not valid): the same tokens as a fresh decoder."""
    model = model_of("hybrid")
    decoder = StaticDecoder(model, max_length=TOTAL + 8)
    long, _ = batch(TOTAL)
    greedy_decode(model, long, None, 8, decoder=decoder)
    short = long[:, :5].flip(0)
    assert torch.equal(greedy_decode(model, short, None, 30, decoder=decoder), greedy_decode(model, short, None, 30))


def test_decode_step_takes_ids_of_shape_b_or_b1_and_returns_b_by_v():
    model = model_of("hybrid")
    ids, _ = batch(PROMPT)
    a, b = StaticDecoder(model), StaticDecoder(model)
    with torch.no_grad():
        a.prefill(ids, None, 20), b.prefill(ids, None, 20)
        la, lb = decode_step(model, a.cache, ids[:, 0]), decode_step(model, b.cache, ids[:, :1])
    assert la.shape == (3, VOCAB)
    assert torch.equal(la, lb)


# ---- what it refuses -----------------------------------------------------------------------------
@pytest.mark.hf  # through generate(cache_implementation="static")
def test_implicit_filters_and_other_models_are_refused_in_one_line():
    implicit = tiny_model(filter="implicit", implicit_order=16)
    with pytest.raises(StaticDecodeUnsupported, match=r"^layer 0 uses the implicit filter, whose decoding state grows"):
        check_static_decoding(implicit)
    with pytest.raises(ValueError, match="layer 0 uses the implicit filter"), torch.no_grad():
        implicit.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=3, cache_implementation="static")
    with pytest.raises(StaticDecodeUnsupported, match="^Linear has no static decode step"):
        check_static_decoding(torch.nn.Linear(2, 2))


def test_room_is_checked_on_the_host_before_any_key_is_written():
    model = model_of("hybrid")
    ids, _ = batch(PROMPT)
    decoder = StaticDecoder(model)
    with torch.no_grad():
        decoder.prefill(ids, None, PROMPT + 2)
        decoder.step(ids[:, 0]), decoder.step(ids[:, 1])
        with pytest.raises(ValueError, match=r"max_length=10 positions, but 11 are asked for"):
            decoder.step(ids[:, 2])
        with pytest.raises(ValueError, match="needs StaticHyenaRTFCache\\(max_length=...\\)"):
            model(ids, use_cache=True, **cache_kwargs(StaticHyenaRTFCache()))
    assert isinstance(decoder.cache.layers[1], StaticKV)


# ---- transformers' generate() drives the same step -----------------------------------------------
def compiled_calls(model) -> list[tuple[int, ...]]:
    """Record the input shape of every call generate() makes to its compiled forward (the wrapper
    sits outside the compiled region, so it records without being traced)."""
    calls, get = [], model.get_compiled_call

    def get_compiled_call(compile_config):
        compiled = get(compile_config)

        def call(**inputs):
            calls.append(tuple(inputs["input_ids"].shape))
            return compiled(**inputs)

        return call

    model.get_compiled_call = get_compiled_call
    return calls


def compile_everywhere(graphs: list) -> CompileConfig:
    """generate() compiles on accelerators only, unless its CompileConfig allows every device (the
    private flag transformers' own tests set); fullgraph=True, with the counting backend."""
    config = CompileConfig(backend=counting_backend(graphs), fullgraph=True)
    config._compile_all_devices = True
    return config


@pytest.mark.hf
@pytest.mark.parametrize("how", ["cache", "cache_implementation"])
def test_generate_compiles_the_static_step_and_feeds_one_token_per_step(how):
    """generate() with a StaticHyenaRTFCache (given, or built for cache_implementation="static")
    runs the prefill eagerly, then every step through its torch.compile'd forward, one token per
    row each, traced once with fullgraph=True; the tokens are greedy, on a left-padded batch of a
    hybrid model."""
    model = model_of("hybrid")
    ids, mask = batch(PROMPT)
    graphs, calls = [], compiled_calls(model)
    static = StaticHyenaRTFCache(max_length=PROMPT + 30)
    extra = cache_kwargs(static) if how == "cache" else {"cache_implementation": "static"}
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=30,
            do_sample=False,
            compile_config=compile_everywhere(graphs),
            return_dict_in_generate=True,
            **extra,
        )
    assert calls == [(3, 1)] * 29  # the 30th token is chosen from the 29th step's logits
    assert out.sequences.shape == (3, PROMPT + 30)
    assert_greedy(model, out.sequences, PROMPT, mask)
    assert len(graphs) == 1
    cache = output_cache(out)
    assert isinstance(cache, StaticHyenaRTFCache)
    assert cache.seen_tokens == PROMPT + 29
    if how == "cache":
        assert cache is static


@pytest.mark.hf
def test_generate_with_a_static_cache_samples_and_beam_searches_as_the_eager_cache():
    """Sampling (same seed) through the compiled static step draws from the parallel forward's
    distribution with the eager cache's random numbers (assert_sampled); beam search on a static
    cache (reorder_cache in place on its buffers; generate() runs beam search's steps uncompiled)
    returns beams scored as the parallel forward scores them, each token among the best 4
    continuations of its prefix (assert_beams). The ids of the two routes are not compared: their
    rounding (~1e-6 of a probability) may part them at a draw or a beam score that close to a
    boundary. A returned static cache continues greedily in a second generate() call."""
    model = model_of("hybrid")
    ids, _ = batch(PROMPT, pads=(0, 0))
    sample = dict(max_new_tokens=20, do_sample=True, top_k=20, **SAMPLED_OUTPUTS)
    beams = dict(max_new_tokens=20, num_beams=4, num_return_sequences=2, do_sample=False, early_stopping=False)
    beams.update(return_dict_in_generate=True, output_scores=True)

    def static_and_eager(kw, graphs):
        compiled = dict(compile_config=compile_everywhere(graphs), cache_implementation="static")
        static = seeded(0, lambda: model.generate(ids, **kw, **compiled))
        assert isinstance(output_cache(static.out), StaticHyenaRTFCache)
        return static, seeded(0, lambda: model.generate(ids, **kw))

    graphs = []
    runs = {"sample": static_and_eager(sample, graphs), "beams": static_and_eager(beams, [])}
    assert len(graphs) == 1  # sampling's steps ran through the compiled static step
    assert_sampled(model, runs["sample"][0], PROMPT, reference=runs["sample"][1])
    assert_beams(model, runs["beams"][0], PROMPT, num_beams=4, returned=2, reference=runs["beams"][1])
    with torch.no_grad():
        first = model.generate(
            ids,
            max_new_tokens=5,
            do_sample=False,
            return_dict_in_generate=True,
            **cache_kwargs(StaticHyenaRTFCache(PROMPT + 20)),
        )
        more = torch.cat([first.sequences, ids[:, :3]], dim=1)
        second = model.generate(more, max_new_tokens=6, do_sample=False, **cache_kwargs(output_cache(first)))
        assert second.shape[1] == more.shape[1] + 6
        assert_greedy(model, second, more.shape[1])
        with pytest.raises(ValueError, match="max_length=12 positions, but 13 are asked for"):
            model.generate(ids, max_new_tokens=10, do_sample=False, **cache_kwargs(StaticHyenaRTFCache(12)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_capture_the_compiled_step(monkeypatch):
    """On CUDA the step compiles with mode="reduce-overhead" and is captured as a CUDA graph: with
    cudagraph_or_error set, anything that made inductor skip the capture (a CPU scalar, a mutated
    input not marked static, a dynamic shape) raises instead. The tokens are greedy."""
    monkeypatch.setattr(torch._inductor.config.triton, "cudagraph_or_error", True)
    model = model_of("multihyena_hybrid").cuda()
    ids, mask = (t.cuda() for t in batch(PROMPT))
    torch._dynamo.utils.counters.clear()
    tokens = greedy_decode(model, ids, mask, 40, compile=True)  # inductor's kernels: their own rounding
    assert_greedy(model, torch.cat([ids, tokens], 1), PROMPT, mask)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
