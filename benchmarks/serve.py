"""Serving throughput: vLLM serving Hyena-RTF (serving/) against vLLM serving a Hugging Face GPT-NeoX of
the same width, depth and vocabulary, and against this project's own `generate()`:

    vllm_hyena      vllm.LLM on an exported random Hyena-RTF (RTF filters): continuous batching, the
                    per-request state in vLLM's state cache
    vllm_gpt_neox   vllm.LLM on a random GPT-NeoX (vLLM's own implementation, paged KV cache)
    generate        HyenaRTFForCausalLM.generate() on all requests as one batch (greedy, recurrent)

Every method gets the same workload: R concurrent requests (all submitted at once), random prompts of
P tokens, N new tokens each (greedy, no EOS stop), for each P asked for. Each method and P runs in a
fresh process (its peak resident memory is its own). vLLM runs at --token-budget tokens a step
(max_num_batched_tokens, default 4096: vLLM's own default for vllm.LLM on a CPU) with chunked
prefill, so a longer prompt is prefilled over several steps. With --repeats K each P runs K rounds of all
methods, the order reversed every other round (A B, B A, ...), so that a slow spell of a shared
machine lands on both sides; the summary gives each method's median and the ratio of medians.
--malloc default,hugepages runs every method under each memory-allocator setting in turn (below):

    output tokens/s      R N / wall time of the whole batch
    TTFT                 time to first token: vLLM's per-request first-token time after arrival
                         (mean and max); generate(): one call with N = 1 (all requests at once)
    peak memory          the process's peak resident set (ru_maxrss: weights, activations, caches)
    state bytes/request  what one request keeps between tokens:
                           Hyena-RTF  per Hyena layer 3d (w - 1) conv inputs (4 bytes) and the
                                      modal state C x 2 x m_max in float64 (serving/hyena_mixer.py)
                           GPT-NeoX   keys and values of every position: 2 n_layer d (P + N) x 4 bytes
    malloc               the C allocator's setting in the measured process: `default` (nothing set:
                         what a user gets; the Hyena-RTF plugin keeps freed memory in the heap on
                         CPU, serving/host_memory.py, GPT-NeoX runs on glibc's own policy), `glibc`
                         (glibc's own policy for both: HYENA_RTF_RETAIN_FREED_MEMORY=0), `retain`
                         (the plugin's policy for both, set through GLIBC_TUNABLES), or
                         `hugepages` (GLIBC_TUNABLES=glibc.malloc.hugetlb=1: memory it maps gets
                         transparent huge pages, so a large temporary that glibc maps and unmaps on
                         every step costs a few faults instead of one per 4 KiB page), or `heap`
                         (huge pages too, and every block below 32 MiB, the largest threshold
                         glibc's own adjustment reaches, taken from the heap and kept there for
                         reuse instead of being mapped and returned to the kernel each time), or
                         `heap_all` (the same with a 1 GiB threshold, which the tunable accepts:
                         the MLP's 34 MB blocks at 8192 tokens stay in the heap too)
    page faults          the measured process's minor page faults over the timed batch (fresh memory
                         touched: the allocator's policy shows here, serving/host_memory.py)
    cpu / steal seconds  over the timed batch: this process's CPU time (user + system), and the time
                         the hypervisor gave the machine's cores to someone else (/proc/stat "steal",
                         all cores): a wall time well above the CPU time with steal beside it is
                         the machine, not the method

    python -m benchmarks.serve                                     # 64 requests, P 512,2048,8192, N 64
    python -m benchmarks.serve --requests 16 --prompt-lengths 256,1024 --new-tokens 16 --name small
    python -m benchmarks.serve --prompt-lengths 8192 --methods vllm_hyena,vllm_gpt_neox --repeats 3
    python -m benchmarks.serve --prompt-lengths 8192 --methods vllm_hyena,vllm_gpt_neox --malloc default,hugepages

Needs vLLM (the .venv-vllm that scripts/test.sh builds: `.venv-vllm/bin/python -m benchmarks.serve`).
Writes benchmarks/results/serve_<name>.json (machine, arguments, every run's figures, and the
summary: per method and P the medians) and serve_<name>.png (median tokens/s and TTFT against P).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, gpt_neox_baseline, ints, machine, save_png, write_json
from serving import host_memory  # the plugin's allocator policy (no vLLM import)

METHODS = ("vllm_hyena", "vllm_gpt_neox", "generate")
# The measured process's extra environment per allocator setting (module docstring, "malloc").
MALLOC = {
    "default": {},
    "glibc": {host_memory.SWITCH: "0"},
    "retain": {
        "GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={host_memory.MMAP_THRESHOLD}"
        f":glibc.malloc.trim_threshold={host_memory.TRIM_THRESHOLD}"
    },
    "hugepages": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    "heap": {
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"
        f":glibc.malloc.mmap_threshold={32 << 20}:glibc.malloc.trim_threshold={1 << 40}"
    },
    "heap_all": {
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"
        f":glibc.malloc.mmap_threshold={1 << 30}:glibc.malloc.trim_threshold={1 << 40}"
    },
}


def hyena_config(args):
    from models import config_from_preset

    return config_from_preset(args.preset, vocab_size=args.vocab, l_max=args.l_max, pad_token_id=0)


def state_bytes(args, method: str, prompt: int) -> int:
    """Bytes one request holds between tokens (module docstring)."""
    config = hyena_config(args)
    if method == "vllm_gpt_neox":
        return 2 * config.n_layer * config.d_model * (prompt + args.new_tokens) * 4
    from serving.hyena_mixer import state_shapes  # vLLM's modules load with it

    conv, filt = state_shapes(config)
    per_layer = conv[0] * conv[1] * 4 + filt[0] * filt[1] * filt[2] * 8
    if method == "generate":  # the project's cache: float32 modal state, m slots of the converted filters
        per_layer = conv[0] * conv[1] * 4 + filt[0] * filt[1] * filt[2] * 4
    return config.n_layer * per_layer


def random_prompts(args, prompt: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(1, args.vocab, (args.requests, prompt), generator=g).tolist()


def export(args, method: str, folder: Path) -> Path:
    """A random model of the preset, saved as vLLM reads it (no tokenizer: ids in, ids out)."""
    import torch

    torch.manual_seed(0)
    config = hyena_config(args)
    if method == "vllm_gpt_neox":
        from transformers import GPTNeoXForCausalLM

        neox = gpt_neox_baseline(config, args.vocab, max(args.prompt_lengths) + args.new_tokens + 64)
        GPTNeoXForCausalLM(neox).save_pretrained(folder)
        return folder
    from export.folder import save_hf_checkpoint
    from models import HyenaRTFForCausalLM

    return save_hf_checkpoint(HyenaRTFForCausalLM(config).eval(), None, folder)


def steal_seconds() -> float:
    """Seconds of "steal" summed over the machine's cores so far (/proc/stat; 0 where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return 0.0
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 and fields[0] == "cpu" else 0.0


def page_faults() -> int:
    """This process's minor page faults so far (a fresh page of memory touched for the first time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_seconds() -> float:
    """This process's CPU time so far, user + system, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(args, method: str, prompt: int) -> dict:
    """One method at one prompt length, in this process: the figures of the module docstring."""
    prompts = random_prompts(args, prompt)
    total = args.requests * args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(args, method, Path(tmp) / "model")
        if method == "generate":
            import torch

            from models import HyenaRTFForCausalLM

            model = HyenaRTFForCausalLM.from_pretrained(folder).eval()
            ids = torch.tensor(prompts)
            run = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
            with torch.no_grad():
                t = time.perf_counter()
                model.generate(ids, max_new_tokens=1, **run)
                ttft = time.perf_counter() - t
                t, cpu, steal, faults = time.perf_counter(), cpu_seconds(), steal_seconds(), page_faults()
                model.generate(ids, max_new_tokens=args.new_tokens, **run)
                wall, cpu, steal = time.perf_counter() - t, cpu_seconds() - cpu, steal_seconds() - steal
                faults = page_faults() - faults
            ttft_mean = ttft_max = ttft
        else:
            import vllm

            llm = vllm.LLM(
                model=str(folder),
                skip_tokenizer_init=True,
                dtype="float32",
                max_model_len=prompt + args.new_tokens,
                max_num_seqs=args.requests,
                max_num_batched_tokens=args.token_budget,
                enable_chunked_prefill=True,  # a prompt longer than the budget is split over steps
                kv_cache_memory_bytes=args.kv_cache_gb << 30,
                enable_prefix_caching=False,
                disable_log_stats=False,
                seed=0,
            )
            params = vllm.SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
            llm.generate([{"prompt_token_ids": prompts[0][:16]}], params, use_tqdm=False)  # warm-up
            t, cpu, steal, faults = time.perf_counter(), cpu_seconds(), steal_seconds(), page_faults()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            wall, cpu, steal = time.perf_counter() - t, cpu_seconds() - cpu, steal_seconds() - steal
            faults = page_faults() - faults
            assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
            firsts = [first_token_delay(o, t) for o in outs]
            ttft_mean, ttft_max = sum(firsts) / len(firsts), max(firsts)
    return {
        "method": method,
        "prompt_length": prompt,
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "steal_seconds": round(steal, 3),
        "page_faults": faults,
        "output_tokens_per_s": round(total / wall, 2),
        "ttft_mean_s": round(ttft_mean, 3),
        "ttft_max_s": round(ttft_max, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "state_bytes_per_request": state_bytes(args, method, prompt),
    }


def summarise(runs: list[dict], methods: list[str], prompts: list[int], mallocs: list[str]) -> list[dict]:
    """Per allocator setting, method and prompt length: the median run's figures (by wall time; with
    an even count the slower of the middle two), the spread of tokens/s over the rounds, and against
    vLLM's GPT-NeoX under the same allocator both the ratio of medians and each round's own ratio."""

    def median(rows: list[dict]) -> dict:
        return sorted(rows, key=lambda r: r["seconds"])[len(rows) // 2]

    out = []
    for malloc in mallocs:
        for prompt in prompts:
            here = [r for r in runs if r.get("malloc", "default") == malloc and r["prompt_length"] == prompt]
            base = [r for r in here if r["method"] == "vllm_gpt_neox"]
            for method in methods:
                mine = sorted((r for r in here if r["method"] == method), key=lambda r: r["seconds"])
                row = {k: v for k, v in median(mine).items() if k != "repeat"}
                row.update(
                    rounds=len(mine),
                    tokens_per_s_range=[mine[-1]["output_tokens_per_s"], mine[0]["output_tokens_per_s"]],
                )
                if base:
                    row["tokens_per_s_vs_vllm_gpt_neox"] = round(
                        row["output_tokens_per_s"] / median(base)["output_tokens_per_s"], 2
                    )
                    by_round = {r["repeat"]: r for r in base}
                    row["per_round_vs_vllm_gpt_neox"] = [
                        round(r["output_tokens_per_s"] / by_round[r["repeat"]]["output_tokens_per_s"], 2)
                        for r in sorted(mine, key=lambda r: r["repeat"])
                    ]
                out.append(row)
    return out


def first_token_delay(output, submitted: float) -> float:
    """Seconds from submitting the batch to this request's first token (vLLM's request metrics,
    whose times are time.monotonic(), the clock perf_counter reads on Linux too)."""
    metrics = output.metrics
    first = getattr(metrics, "first_token_ts", None) or getattr(metrics, "first_token_time", None)
    if first is None:
        raise RuntimeError("this vLLM returns no first-token time in RequestOutput.metrics")
    return first - submitted if first > submitted - 1e6 else float("nan")


def draw(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    mallocs = result["args"]["malloc"]
    for malloc in mallocs:
        for method in result["args"]["methods"]:
            rows = [r for r in result["summary"] if r["method"] == method and r.get("malloc", "default") == malloc]
            xs = [r["prompt_length"] for r in rows]
            label = method if len(mallocs) == 1 else f"{method}, malloc {malloc}"
            style = "o-" if malloc == mallocs[0] else "s--"
            left.plot(xs, [r["output_tokens_per_s"] for r in rows], style, label=label)
            right.plot(xs, [r["ttft_mean_s"] for r in rows], style, label=label)
    for ax, label in ((left, "output tokens/s"), (right, "mean time to first token (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.legend()
    a = result["args"]
    rounds = f", median of {a['repeats']} rounds" if a["repeats"] > 1 else ""
    fig.suptitle(
        f"{a['requests']} concurrent requests, {a['new_tokens']} new tokens, preset {a['preset']} (CPU{rounds})"
    )
    fig.tight_layout()
    return save_png(fig, path, 120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=50277)
    parser.add_argument("--l-max", type=int, default=2048, help="the Hyena config's training length")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-lengths", type=ints, default=[512, 2048, 8192])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--token-budget",
        type=int,
        default=4096,
        help="vLLM's max_num_batched_tokens (default: vLLM's own default for vllm.LLM on a CPU)",
    )
    parser.add_argument("--kv-cache-gb", type=int, default=6)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every method per prompt length (>= 1)")
    parser.add_argument("--malloc", default="default", help=f"allocator settings, comma-separated: {', '.join(MALLOC)}")
    parser.add_argument("--name", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "method,prompt": the child process's job
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    args.malloc = args.malloc.split(",")
    if unknown := [m for m in args.malloc if m not in MALLOC]:
        parser.error(f"--malloc: unknown setting {unknown[0]!r} (known: {', '.join(MALLOC)})")
    if args.one:
        method, prompt = args.one.split(",")
        print(json.dumps(measure(args, method, int(prompt))))
        return 0
    import torch

    where = machine(torch.device("cpu"))  # before the runs: its load average is the machine's, not ours
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the engine in the measured process
    runs = []
    for prompt in args.prompt_lengths:
        for repeat in range(args.repeats):
            for malloc in args.malloc:
                for method in args.methods if repeat % 2 == 0 else args.methods[::-1]:
                    cmd = [sys.executable, "-m", "benchmarks.serve", *(argv if argv is not None else sys.argv[1:])]
                    extra = dict(MALLOC[malloc])
                    if "GLIBC_TUNABLES" in extra and env.get("GLIBC_TUNABLES"):
                        extra["GLIBC_TUNABLES"] = f"{env['GLIBC_TUNABLES']}:{extra['GLIBC_TUNABLES']}"
                    done = subprocess.run(
                        [*cmd, "--one", f"{method},{prompt}"], env={**env, **extra}, capture_output=True, text=True
                    )
                    if done.returncode:
                        raise SystemExit(f"{method} at prompt {prompt} failed:\n{done.stderr[-3000:]}")
                    runs.append(
                        {**json.loads(done.stdout.strip().splitlines()[-1]), "malloc": malloc, "repeat": repeat}
                    )
                    print(json.dumps(runs[-1]), flush=True)
    summary = summarise(runs, args.methods, args.prompt_lengths, args.malloc)
    for row in summary:
        print(json.dumps(row), flush=True)
    result = {"machine": where, "args": vars(args), "runs": runs, "summary": summary}
    import vllm

    result["machine"]["vllm"] = vllm.__version__
    json_path = write_json(RESULTS / f"serve_{args.name}.json", result)
    png_path = draw(result, RESULTS / f"serve_{args.name}.png")
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
