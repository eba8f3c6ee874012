"""The report of benchmarks/quality/run.py: per-variant summary over seeds, the comparisons against the
reference variant (quality_stats.py's rule), the Markdown table, and the PNG (loss curves at the
chosen lr, mean over seeds, one line per variant; the lr sweep as a small panel)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from benchmarks.common import save_png
from benchmarks.quality.stats import RULE, best_lr, compare, mean_std, reference_variant


def metric_values(row: dict) -> dict[str, float]:
    """The compared metrics of one run: <set>_ppl and <set>_bpb of every evaluation set, and
    lambada_acc / lambada_ppl where LAMBADA was scored. A diverged run (no score: null) counts as
    infinitely bad."""
    out = {}
    for name, scores in row["eval"].items():
        out[f"{name}_ppl"] = math.inf if scores["perplexity"] is None else scores["perplexity"]
        out[f"{name}_bpb"] = math.inf if scores["bits_per_byte"] is None else scores["bits_per_byte"]
    if row.get("lambada"):
        out["lambada_acc"] = row["lambada"]["accuracy"]
        out["lambada_ppl"] = row["lambada"]["perplexity"]
    return out


def summarize(rows: list[dict], variants: list[str], seeds: list[int], primary: str, counts: dict) -> dict:
    """Per variant: the sweep ({lr: primary metric} on the first seed), the chosen lr, every metric's
    mean / standard deviation / values over the seeds at that lr, tokens/s, parameters, tokens;
    then every variant against the reference (quality_stats.reference_variant)."""
    per = {}
    for v in variants:
        sweep = {r["lr"]: metric_values(r)[primary] for r in rows if r["variant"] == v and r["seed"] == seeds[0]}
        lr, at_edge = best_lr(sweep)
        final = [r for r in rows if r["variant"] == v and r["lr"] == lr and r["seed"] in seeds]
        values = [metric_values(r) for r in final]
        metrics = {}
        for key in values[0]:
            xs = [m[key] for m in values]
            mean, std = mean_std(xs)
            metrics[key] = {"mean": mean, "std": std, "values": xs}
        rate_mean, rate_std = mean_std([r["tokens_per_s"] for r in final])
        per[v] = {
            "lr_sweep": {f"{k:g}": m for k, m in sorted(sweep.items())},
            "chosen_lr": lr,
            "chosen_lr_at_grid_edge": at_edge,
            "seeds": [r["seed"] for r in final],
            "metrics": metrics,
            "tokens_per_s": {"mean": rate_mean, "std": rate_std},
            "parameters": counts[v],
            "parameters_of_exports": sorted({r["parameters"] for r in rows if r["variant"] == v and r["parameters"]}),
            "diverged_runs": [r["id"] for r in rows if r["variant"] == v and r.get("diverged")],
            "tokens": sorted({r["tokens"] for r in rows if r["variant"] == v}),
        }
    reference = reference_variant(variants, {v: per[v]["metrics"][primary]["mean"] for v in variants})
    comparisons = {
        v: {
            key: compare(per[reference]["metrics"][key]["values"], per[v]["metrics"][key]["values"])
            for key in per[v]["metrics"]
        }
        for v in variants
        if v != reference
    }
    pairwise = {  # every pair, for the record (the table shows the comparisons with the reference)
        f"{b} - {a}": {
            key: compare(per[a]["metrics"][key]["values"], per[b]["metrics"][key]["values"])
            for key in per[a]["metrics"]
        }
        for i, a in enumerate(variants)
        for b in variants[i + 1 :]
    }
    return {
        "primary_metric": primary,
        "reference": reference,
        "rule": RULE,
        "variants": per,
        "comparisons": comparisons,
        "pairwise": pairwise,
    }


def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.3g}"  # LAMBADA perplexities of tiny models run to 1e9


def _pm(metric: dict, digits: int) -> str:
    std = "n/a" if metric["std"] is None else _num(metric["std"], digits)
    return f"{_num(metric['mean'], digits)} ± {std}"


def table(summary: dict) -> str:
    """The summary as a Markdown table, one row per variant (mean ± standard deviation over
    seeds), the comparison of the primary metric against the reference last."""
    per, ref, primary = summary["variants"], summary["reference"], summary["primary_metric"]
    keys = list(next(iter(per.values()))["metrics"])
    head = ["variant", "parameters", "lr (chosen)", *keys, "tokens/s", f"{primary} vs {ref}: diff / 2 s_p"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v, s in per.items():
        digits = {k: 4 if k.endswith(("bpb", "acc")) else 2 for k in keys}
        cells = [v, f"{s['parameters']:,}", f"{s['chosen_lr']:g}{' (edge)' if s['chosen_lr_at_grid_edge'] else ''}"]
        cells += [_pm(s["metrics"][k], digits[k]) for k in keys]
        cells.append(f"{s['tokens_per_s']['mean'] / 1e3:.2f}k")
        if v == ref:
            cells.append("reference")
        else:
            c = summary["comparisons"][v][primary]
            verdict = {True: "significant", False: "not significant", None: "no spread (one seed)"}[c["significant"]]
            threshold = "n/a" if c["threshold"] is None else f"{c['threshold']:.2f}"
            cells.append(f"{c['difference']:+.2f} / {threshold}: {verdict}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, rows: list[dict], path: str | Path, title: str) -> Path:
    """Left: training loss against tokens at each variant's chosen lr, mean over its seeds. Right:
    the primary metric of the sweep against the lr (first seed)."""
    fig = Figure(figsize=(11, 4.8))
    grid = fig.add_gridspec(1, 2, width_ratios=(3, 1.2))
    curves, sweep = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    for v, s in summary["variants"].items():
        final = [r for r in rows if r["variant"] == v and r["lr"] == s["chosen_lr"] and r["seed"] in s["seeds"]]
        steps = final[0]["curve"]["step"]
        tokens_per_step = final[0]["tokens"] / steps[-1]
        loss = np.mean([r["curve"]["loss"] for r in final], axis=0)
        line = curves.plot(np.asarray(steps) * tokens_per_step / 1e6, loss, label=f"{v} (lr {s['chosen_lr']:g})")
        lrs = [float(k) for k in s["lr_sweep"]]
        sweep.plot(lrs, list(s["lr_sweep"].values()), "o-", color=line[0].get_color(), label=v)
    curves.set_xlabel("training tokens (millions)")
    curves.set_ylabel(f"training loss (nats), mean over {len(next(iter(summary['variants'].values()))['seeds'])} seeds")
    curves.set_title(title)
    curves.legend()
    curves.grid(alpha=0.3)
    sweep.set_xscale("log")
    grid = sorted({float(k) for s in summary["variants"].values() for k in s["lr_sweep"]})
    sweep.set_xticks(grid, [f"{lr:g}" for lr in grid])
    sweep.minorticks_off()
    sweep.set_xlabel("optim.lr")
    sweep.set_ylabel(summary["primary_metric"])
    sweep.set_title("lr sweep (first seed)")
    sweep.grid(alpha=0.3)
    return save_png(fig, path, dpi=120)
