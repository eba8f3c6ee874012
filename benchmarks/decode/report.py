"""What benchmarks/decode/run.py reports from its rows: the summary of the goals (stored in the JSON),
the README tables (`python -m benchmarks.decode --markdown --out FILE.json`), the console table
and the PNG. Everything here reads rows only, so the README and the plot come from the JSON.

Summary, computed from the ok rows:
    recurrent_vs_gpt_neox   decode tokens/s of hyena_rtf_recurrent (and _compiled) / gpt_neox_kv's,
                            per (batch, prompt) where both ran
    latency_flatness        per (method, batch): per-token latency at the longest prompt / at the
                            shortest (1.0 = flat)
    compiled_vs_eager       per (batch, prompt): eager per-token latency / compiled (> 1: faster)
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import save_png

METHOD_ORDER = ("hyena_rtf_recurrent", "hyena_rtf_compiled", "hyena_implicit", "gpt_neox_kv", "hyena_rtf_no_cache")
COLORS = dict(zip(METHOD_ORDER, ("tab:blue", "tab:purple", "tab:green", "tab:red", "tab:gray")))


def _ok(rows: list[dict]) -> dict:
    return {(r["method"], r["batch"], r["prompt_len"]): r for r in rows if r["status"] == "ok"}


def summary(rows: list[dict]) -> dict:
    ok = _ok(rows)
    out: dict = {"recurrent_vs_gpt_neox": [], "latency_flatness": [], "compiled_vs_eager": []}
    for (method, batch, prompt), r in sorted(ok.items()):
        neox = ok.get(("gpt_neox_kv", batch, prompt))
        if method in ("hyena_rtf_recurrent", "hyena_rtf_compiled") and neox:
            out["recurrent_vs_gpt_neox"].append(
                {
                    "method": method,
                    "batch": batch,
                    "prompt_len": prompt,
                    "tokens_per_s_ratio": r["decode_tokens_per_s"] / neox["decode_tokens_per_s"],
                }
            )
        eager = ok.get(("hyena_rtf_recurrent", batch, prompt))
        if method == "hyena_rtf_compiled" and eager:
            out["compiled_vs_eager"].append(
                {"batch": batch, "prompt_len": prompt, "speedup": eager["per_token_ms"] / r["per_token_ms"]}
            )
    for method, batch in sorted({(m, b) for m, b, _ in ok}):
        prompts = sorted(p for m, b, p in ok if (m, b) == (method, batch))
        if len(prompts) > 1:
            lo, hi = ok[(method, batch, prompts[0])], ok[(method, batch, prompts[-1])]
            out["latency_flatness"].append(
                {
                    "method": method,
                    "batch": batch,
                    "prompts": [prompts[0], prompts[-1]],
                    "ratio": hi["per_token_ms"] / lo["per_token_ms"],
                }
            )
    return out


def _table(rows: list[dict], title: str, value) -> list[str]:
    """One markdown table: a line per (method, batch), a column per prompt length."""
    prompts = sorted({r["prompt_len"] for r in rows})
    lines = [f"**{title}**", "", "| method | batch | " + " | ".join(f"prompt {p}" for p in prompts) + " |"]
    lines.append("|" + " --- |" * (2 + len(prompts)))
    index = {(r["method"], r["batch"], r["prompt_len"]): r for r in rows}
    for batch in sorted({r["batch"] for r in rows}):
        for method in METHOD_ORDER:
            cells = []
            for p in prompts:
                r = index.get((method, batch, p))
                cells.append("" if r is None else (value(r) if r["status"] == "ok" else "skipped"))
            if any(cells):
                lines.append(f"| {method} | {batch} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = _table(rows, "ms per new token (median)", lambda r: f"{r['per_token_ms']:.2f}")
    lines += _table(rows, "decode tokens/s", lambda r: f"{r['decode_tokens_per_s']:,.0f}")
    lines += _table(
        rows,
        "first token (ms): recurrence build + prefill",
        lambda r: f"{r['first_token_ms']:,.0f} ({r['recurrence_build_ms']:,.0f} + {r['prefill_ms']:,.0f})",
    )
    lines += _table(
        rows,
        "memory (MB): cache / peak",
        lambda r: f"{r['cache_mb']:,.1f} / " + (f"{r['peak_memory_mb']:,.0f}" if "peak_memory_mb" in r else "n/a"),
    )
    s = result.get("summary") or summary(rows)
    lines += [
        f"- {e['method']} vs gpt_neox_kv, batch {e['batch']}, prompt {e['prompt_len']}: "
        f"{e['tokens_per_s_ratio']:.1f}x the tokens/s"
        for e in s["recurrent_vs_gpt_neox"]
    ]
    lines += [
        f"- {e['method']}, batch {e['batch']}: per-token latency at prompt {e['prompts'][1]} = "
        f"{e['ratio']:.2f}x that at {e['prompts'][0]}"
        for e in s["latency_flatness"]
    ]
    lines += [
        f"- compiled step, batch {e['batch']}, prompt {e['prompt_len']}: {e['speedup']:.2f}x the eager step's speed"
        for e in s["compiled_vs_eager"]
    ]
    lines += [
        f"- {r['method']} batch {r['batch']} prompt {r['prompt_len']}: skipped, {r['reason']}"
        for r in rows
        if r["status"] != "ok"
    ]
    return "\n".join(lines)


def print_rows(rows: list[dict]) -> None:
    print(
        f"{'method':20} {'batch':>5} {'prompt':>6} {'build ms':>8} {'prefill ms':>10} {'ms/token':>9} "
        f"{'min ms':>7} {'tokens/s':>9} {'cache MB':>8}"
    )
    for row in rows:
        head = f"{row['method']:20} {row['batch']:5d} {row['prompt_len']:6d}"
        if row["status"] == "ok":
            print(
                f"{head} {row['recurrence_build_ms']:8.1f} {row['prefill_ms']:10.1f} {row['per_token_ms']:9.2f} "
                f"{row['per_token_ms_min']:7.2f} {row['decode_tokens_per_s']:9.1f} {row['cache_mb']:8.2f}"
                + (" *" if "note" in row else "")
            )
        else:
            print(f"{head}  skipped: {row['reason']}")


def plot(result: dict, path: Path) -> None:
    """Left: per-token latency against prompt length, a line per (method, batch). Right: decode
    tokens/s against batch at the longest prompt every method reached."""
    try:
        import matplotlib.ticker
        from matplotlib.figure import Figure
    except ImportError:  # a bare GPU machine: the JSON is the result, the PNG can be drawn elsewhere
        print(f"matplotlib is not installed: no {path.name} (redraw it with --plot-only)")
        return
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    batches = sorted({r["batch"] for r in rows})
    prompts = sorted({r["prompt_len"] for r in rows})
    styles = dict(zip(batches, ("-", "--", ":", "-.") * 4))
    fig = Figure(figsize=(12, 4.8))
    left, right = fig.subplots(1, 2)
    for method in METHOD_ORDER:
        for b in batches:
            pts = sorted((r["prompt_len"], r["per_token_ms"]) for r in rows if (r["method"], r["batch"]) == (method, b))
            if pts:
                left.plot(*zip(*pts), styles[b], marker="o", color=COLORS[method], label=f"{method}, batch {b}")
        for_prompt = {p: {r["batch"] for r in rows if (r["method"], r["prompt_len"]) == (method, p)} for p in prompts}
        ref = max((p for p in prompts if len(for_prompt[p]) > 0), default=None)
        pts = sorted(
            (r["batch"], r["decode_tokens_per_s"]) for r in rows if (r["method"], r["prompt_len"]) == (method, ref)
        )
        if pts:
            right.plot(*zip(*pts), marker="o", color=COLORS[method], label=f"{method}, prompt {ref}")
    left.set(xscale="log", yscale="log", xlabel="prompt length (tokens)", ylabel="per-token latency (ms)")
    left.set_title("latency of one new token")
    right.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s")
    right.set_title("throughput at the longest prompt each method reached")
    for ax, ticks in ((left, prompts), (right, batches)):
        if ticks:
            ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    m, mach = result["model"], result["machine"]
    where = mach.get("gpu") or (
        f"CPU, {mach['torch_threads']} thread(s), load average "
        f"{mach.get('load_average_at_start', ['?'])[0]} on {mach['cpu_count']} cores"
    )
    fig.suptitle(
        f"{where}, {result['dtype']}: d {m['d_model']}, {m['n_layer']} layers, state {m['state_size']}, "
        f"vocab {m['vocab_size']}; median step of the best of {result['args']['repeats']} rounds",
        fontsize=9,
    )
    save_png(fig, path, dpi=110)
