"""The synthetic suite's results (benchmarks/synthetic/run.py): per-setting statistics over seeds, the
PNG, and the markdown table for the README. Everything here reads the result JSON only, so the
figure and the table can be redrawn without training anything.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from matplotlib.figure import Figure

from benchmarks.common import save_png


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`, or None when there is no such file. ValueError naming the file
    when it is there but not a JSON object (files are written atomically, so only a hand edit or
    another program makes one)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


def summarize(runs: list[dict]) -> dict:
    """{task: {setting: {variant: {mean, std, seeds, accuracies}}}} over the runs' seeds, in the
    runs' order. std is the sample standard deviation (n - 1), 0.0 for a single seed."""
    groups: dict = {}
    for r in runs:
        groups.setdefault(r["task"], {}).setdefault(r["setting"], {}).setdefault(r["variant"], []).append(r)
    out: dict = {}
    for task, settings in groups.items():
        for setting, variants in settings.items():
            for variant, rs in variants.items():
                acc = [r["accuracy"] for r in rs]
                mean = sum(acc) / len(acc)
                var = sum((a - mean) ** 2 for a in acc) / (len(acc) - 1) if len(acc) > 1 else 0.0
                out.setdefault(task, {}).setdefault(setting, {})[variant] = {
                    "mean": mean,
                    "std": math.sqrt(var),
                    "seeds": [r["seed"] for r in rs],
                    "accuracies": acc,
                }
    return out


def chance(params: dict) -> float:
    """Accuracy of guessing uniformly among the answers of the right kind (a model that has learnt
    only which tokens can be answers)."""
    return 1 / params["num_values"] if params["task"] == "mqar" else 1 / params["num_symbols"]


def context_guess(params: dict) -> float | None:
    """MQAR: accuracy of guessing among the N values present in the context, 1 / N (the plateau
    before a model learns which value goes with which key); None for the other tasks."""
    return 1 / params["num_pairs"] if params["task"] == "mqar" else None


def _cell(stats: dict | None) -> str:
    if stats is None:
        return "-"
    if len(stats["accuracies"]) == 1:
        return f"{100 * stats['mean']:.1f}"
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def _guesses(info: dict) -> str:
    guesses = [(s["label"], context_guess(s["params"])) for s in info["settings"]]
    if any(g is None for _, g in guesses):
        return ""
    return "; a value of the context: " + ", ".join(f"{100 * g:.1f}% at {label}" for label, g in guesses)


def markdown(result: dict) -> str:
    """One table per task: variants down, the task's settings across, held-out accuracy in %
    as mean ± sample std over seeds."""
    lines = []
    for task, info in result["tasks"].items():
        summary = result["summary"].get(task, {})
        labels = [s["label"] for s in info["settings"] if s["label"] in summary]
        variants = [v for v in result["variants"] if any(v in summary[label] for label in labels)]
        if not labels:
            continue
        seeds = ", ".join(map(str, result["seeds"]))
        lines += [
            f"**{task}** ({info['axis']}; {info['steps']} steps, batch {result['training']['batch']}, "
            f"seeds {seeds}; chance {100 * chance(info['settings'][0]['params']):.1f}%{_guesses(info)})",
            "",
            "| variant | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for v in variants:
            lines.append(f"| {v} | " + " | ".join(_cell(summary[label].get(v)) for label in labels) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _color(variant: str, variants: list[str]) -> str:
    """The same colour for a variant in every panel."""
    return f"C{variants.index(variant) % 10}"


def _errorbar(ax, xs, stats, **kw):
    ax.errorbar(xs, [100 * s["mean"] for s in stats], yerr=[100 * s["std"] for s in stats], capsize=3, marker="o", **kw)


def _plot_task(ax, task: str, info: dict, summary: dict, variants: list[str]) -> None:
    settings = [s for s in info["settings"] if s["label"] in summary]
    sweep = [s for s in settings if s["after"]]
    if sweep:  # accuracy against the swept value, the other variants as horizontal references
        for v in variants:
            points = [(s["x"], summary[s["label"]][v]) for s in sweep if v in summary[s["label"]]]
            if points:
                xs, st = zip(*points, strict=True)
                _errorbar(ax, xs, st, label=f"{v} ({info['axis']})", color=_color(v, variants))
        refs = [s for s in settings if not s["after"]]
        for s in refs:
            for v in variants:
                if v in summary[s["label"]]:
                    mean = 100 * summary[s["label"]][v]["mean"]
                    ax.axhline(
                        mean, linestyle="--", linewidth=1, color=_color(v, variants), label=f"{v} ({s['label']})"
                    )
        ax.set_xscale("log", base=2)
        ax.set_xticks([s["x"] for s in sweep], [str(s["x"]) for s in sweep])
        ax.minorticks_off()
        ax.set_xlabel(info["axis"])
    elif len(settings) > 1:
        for v in variants:
            points = [(s["x"], summary[s["label"]][v]) for s in settings if v in summary[s["label"]]]
            if points:
                xs, st = zip(*points, strict=True)
                _errorbar(ax, xs, st, label=v, color=_color(v, variants))
        ax.set_xticks([s["x"] for s in settings], [str(s["x"]) for s in settings])
        ax.set_xlabel(info["axis"])
    else:
        stats = summary[settings[0]["label"]]
        names = [v for v in variants if v in stats]
        ax.bar(
            names,
            [100 * stats[v]["mean"] for v in names],
            yerr=[100 * stats[v]["std"] for v in names],
            capsize=3,
            color=[_color(v, variants) for v in names],
        )
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_xlabel(settings[0]["label"])
    ax.axhline(100 * chance(settings[0]["params"]), color="grey", linestyle=":", linewidth=1, label="chance")
    guesses = [(s["x"], context_guess(s["params"])) for s in settings]
    if len(guesses) > 1 and all(g is not None for _, g in guesses):
        ax.plot(
            *zip(*[(x, 100 * g) for x, g in guesses], strict=True), "k--", linewidth=1, label="1/N (a context value)"
        )
    # Zoom in when every point is low (MQAR at a CPU budget), else the whole 0-100% range.
    tops = [100 * (st["mean"] + st["std"]) for s in settings for st in summary[s["label"]].values()]
    top = 102 if max(tops) > 40 else max(10.0, 1.25 * max(tops))
    ax.set(ylim=(0, top), ylabel="held-out accuracy (%)", title=f"{task} ({info['steps']} steps)")
    ax.legend(fontsize=7)


def plot(result: dict, path: Path) -> None:
    """One panel per task: lines of accuracy against difficulty, a bar chart for a single setting,
    accuracy against state size for a sweep (mean over seeds, bars: sample std)."""
    tasks = [t for t in result["tasks"] if t in result["summary"]]
    fig = Figure(figsize=(5.2 * max(1, len(tasks)), 4.4))
    axes = fig.subplots(1, max(1, len(tasks)), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=False):
        _plot_task(ax, task, result["tasks"][task], result["summary"][task], list(result["variants"]))
    seeds = len(result["seeds"])
    fig.suptitle(f"Synthetic tasks, {seeds} seed(s) per point, {result['machine'].get('cpu', 'cpu')}", fontsize=10)
    save_png(fig, path, dpi=110)
