"""What benchmarks/train/throughput.py reports from its JSON: the PNG (tokens/s and peak memory
against sequence length, a line per model) and the README tables
(`python -m benchmarks.train.throughput --markdown --out FILE.json`). Both read the rows and the
ratios only, so the README and the plot come from the JSON."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import save_png
from utils.logs import get_logger

MODELS = ("hyena_rtf", "hyena_implicit", "gpt_neox")
BASELINE = "gpt_neox"
log = get_logger("bench")


# ---------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # a bare GPU machine: the JSON is the result, the PNG can be drawn elsewhere
        log.warning(f"matplotlib is not installed: no {path.name} (redraw it with --plot-only)")
        return
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    fig = Figure(figsize=(12, 4.6))
    left, right = fig.subplots(1, 2)
    colors = dict(zip(MODELS, ("tab:blue", "tab:green", "tab:red")))
    for kind in MODELS:
        mine = sorted((r["length"], r["tokens_per_s"], r.get("peak_memory_gb")) for r in rows if r["model"] == kind)
        if mine:
            left.plot([m[0] for m in mine], [m[1] for m in mine], marker="o", color=colors[kind], label=kind)
            mem = [(m[0], m[2]) for m in mine if m[2] is not None]
            if mem:
                right.plot(*zip(*mem), marker="o", color=colors[kind], label=kind)
    lengths = sorted({r["length"] for r in result["rows"]})
    for ax, ylabel in ((left, "training tokens/s"), (right, "peak memory (GB)")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=ylabel)
        ax.set_xticks(lengths, [str(T) for T in lengths])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    m, mach = result["model"], result["machine"]
    where = mach.get("gpu") or f"CPU ({mach['cpu']}), {mach['torch_threads']} thread(s)"
    fig.suptitle(
        f"{where}, {result['precision']}: d {m['d_model']}, {m['n_layer']} layers, vocab {m['vocab_size']}, "
        f"{result['args']['tokens_per_step']} tokens per step; median of the timed steps",
        fontsize=9,
    )
    save_png(fig, path, dpi=110)


def markdown(result: dict) -> str:
    """The README tables: tokens/s per model and length, the ratios to GPT-NeoX, peak memory."""
    rows = {(r["model"], r["length"]): r for r in result["rows"]}
    kinds = [k for k in MODELS if any(key[0] == k for key in rows)]
    ratio = {(e["model"], e["length"]): e for e in result["ratios"]}
    lengths = sorted({key[1] for key in rows})

    def cell(kind, T, key, fmt):
        r = rows.get((kind, T))
        if r is None:
            return ""
        if r["status"] != "ok":
            return "skipped"
        return fmt.format(r[key]) + (" *" if "note" in r else "") if key in r else "n/a"

    # On a CPU, a second table per process CPU-second: steadier than wall time on a shared machine.
    clocks = [("tokens_per_s", "tokens/s", "tokens_per_s_vs_gpt_neox")]
    if not result["machine"].get("gpu"):
        clocks.append(("tokens_per_cpu_s", "tokens/CPU-s", "tokens_per_cpu_s_vs_gpt_neox"))
    lines = []
    for key, unit, ratio_key in clocks:
        head = ["length", "batch"] + [f"{k} {unit}" for k in kinds]
        head += [f"{k} / {BASELINE}" for k in kinds if k != BASELINE] + [f"{k} GB" for k in kinds]
        lines += ["" if lines else None, "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for T in lengths:
            batch = next(r["batch"] for (k, t), r in rows.items() if t == T)
            cells = [str(T), str(batch)] + [cell(k, T, key, "{:,.0f}") for k in kinds]
            for k in kinds:
                if k != BASELINE:
                    e = ratio.get((k, T))
                    cells.append(f"{e[ratio_key]:.2f}x" if e else "")
            cells += [cell(k, T, "peak_memory_gb", "{:.2f}") for k in kinds]
            lines.append("| " + " | ".join(cells) + " |")
    lines = [line for line in lines if line is not None]
    if any("mfu" in r for r in result["rows"]):
        lines += ["", "| length | " + " | ".join(f"{k} MFU" for k in kinds) + " |", "|" + " --- |" * (1 + len(kinds))]
        for T in lengths:
            lines.append(f"| {T} | " + " | ".join(cell(k, T, "mfu", "{:.1%}") for k in kinds) + " |")
    notes = [f"- {r['model']} at {r['length']}: skipped, {r['reason']}" for r in result["rows"] if r["status"] != "ok"]
    notes += [f"- * {r['model']} at {r['length']}: {r['note']}" for r in result["rows"] if "note" in r]
    if notes:
        lines += [""] + notes
    return "\n".join(lines)
