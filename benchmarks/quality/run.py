"""Language-modelling quality of the model variants at equal parameters and equal tokens:
Hyena-RTF (order 16 and 64), Hyena's implicit filters, MultiHyena, a Hyena-RTF / attention hybrid
and a GPT-NeoX Transformer (benchmarks/variants.py).

    python -m benchmarks.quality --preset cpu                  # about an hour on an idle 2-core machine
    python -m benchmarks.quality --preset english-cpu          # English prose, WikiText-2 and LAMBADA
    python -m benchmarks.quality --preset gpu-125m --data PILE_DIR
    python -m benchmarks.quality --preset cpu --variants rtf16,gpt_neox --lrs 3e-3 --seeds 0

Per variant: a learning-rate sweep (the preset's three optim.lr values, first seed), then the other
seeds at the lr with the lowest validation perplexity (the sweep's run is the first seed's run).
Every run is `python train.py --config <preset yaml> <preset overrides> <variant overrides>` in a
subprocess (what a user runs), on the same prepared data, for the same steps, batch and schedule;
its export is then scored with evaluate_lm.py's code (evaluation/scoring.py): perplexity and bits per byte
on each evaluation set of the preset (benchmarks/quality/presets.py), LAMBADA where the preset has
it. Parameter counts are checked before any training (within 5% of the reference variant, else
the run stops with exit status 2 naming the variant: change its knob in the preset) and recorded.

Resumable: each finished run leaves OUT/results/<run>.json and is skipped by a rerun of the same
command; an interrupted train.py resumes from its own checkpoint in OUT/runs/<run>/ (train.py's
checkpoint.resume=auto). Ctrl-C (or SIGTERM to the benchmark) stops the runs after their
checkpoint; a killed benchmark also stops its runs (they get SIGTERM when it dies).

Output: benchmarks/results/quality_<preset>.json (--report; every run's row, the summary, the
comparisons against the reference variant with the significance rule of quality_stats.py, the
machine) and a PNG beside it (loss curves at the chosen lr, mean over seeds; the lr sweep). On a
shared machine the tokens/s are noisy; the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from benchmarks.common import REPO, RESULTS, ints, machine, write_json
from benchmarks.quality.presets import PRESETS, RUN_OVERRIDES, Preset, PresetError
from benchmarks.quality.report import metric_values, plot, summarize, table
from benchmarks.quality.scoring import Scorer, training_record
from benchmarks.quality.stats import best_lr, parameter_check, reference_variant
from benchmarks.variants import KNOWN, VARIANTS, base_overrides, parameter_count, resolved_n_layer, variant_overrides
from evaluation.scoring import EvalError
from hf.loading import LoadError
from training import config as train_config
from training.build import build_model
from training.data import open_split
from utils.logs import error_exit, get_logger, setup_logging

log = get_logger("quality")


class QualityError(RuntimeError):
    """A run failed or the benchmark cannot go on; the message is one line naming the run and log."""


class Terminated(Exception):
    """SIGTERM reached the benchmark (raised by its handler, in the main thread)."""


def _terminate(signum, frame) -> None:
    raise Terminated


@dataclass(frozen=True)
class Run:
    variant: str
    lr: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.variant}_lr{self.lr:g}_seed{self.seed}"


class Benchmark:
    """One invocation: the preset, the prepared data, the runs done so far, the scoring."""

    def __init__(self, preset: Preset, args):
        self.preset, self.args = preset, args
        self.out: Path = args.out
        self.data = preset.data_dir(self.out, args.data)
        self.base = [*RUN_OVERRIDES, *preset.overrides, *args.override, f"data.dir={self.data}"]
        cfg = train_config.load_config(str(preset.config), self.base)
        self.seq_len = cfg.data.seq_len
        self.tokens_per_run = cfg.train.max_steps * (cfg.train.global_batch_size or cfg.train.micro_batch_size)
        self.tokens_per_run *= self.seq_len
        self.n_layer = resolved_n_layer(self.base, preset.config)
        self.vocab_size = open_split(str(self.data), "train", self.seq_len).vocab_size
        self.eval_sets = preset.eval_sets(self.data)
        self.scorer = Scorer(preset, self.eval_sets, self.seq_len)
        self.lock = threading.Lock()  # one scoring at a time: it is short next to training
        self.done, self.total, self.walls = 0, 0, []
        self.children: set[subprocess.Popen] = set()  # the train.py processes running now

    # ---- the runs --------------------------------------------------------------------------

    def variant_part(self, variant: str) -> list[str]:
        """The variant's overrides (benchmarks/variants.py); a knob in the preset's
        variant_overrides replaces the variant's own value of that key."""
        extra = self.preset.variant_overrides.get(variant, ())
        replaced = {o.partition("=")[0] for o in extra}
        own = [o for o in variant_overrides(variant, self.n_layer) if o.partition("=")[0] not in replaced]
        return [*own, *extra]

    def overrides(self, run: Run) -> list[str]:
        """train.py's overrides for `run`: the preset's, the run's, then the variant's."""
        own = [f"optim.lr={run.lr:g}", f"train.seed={run.seed}", f"train.out_dir={self.out / 'runs' / run.id}"]
        return [*base_overrides(run.variant, [*self.base, *own]), *self.variant_part(run.variant)]

    def parameter_counts(self, variants: list[str]) -> dict[str, int]:
        """Each variant's parameter count, from the model train.py builds (on the meta device)."""
        counts = {}
        for name in variants:
            cfg = train_config.load_config(str(self.preset.config), self.overrides(Run(name, 1e-3, 0)))
            with torch.device("meta"):
                counts[name] = parameter_count(build_model(cfg, self.vocab_size, torch.device("meta")))
        return counts

    def result_path(self, run: Run) -> Path:
        return self.out / "results" / f"{run.id}.json"

    def execute(self, run: Run) -> dict:
        """The run's result: read back if it finished before, else train, score and record it."""
        path = self.result_path(run)
        if path.is_file():
            result = read_json(path)
            self._progress(run, result, "done before")
            return result
        started = time.time()
        diverged = self._train(run)
        run_dir = self.out / "runs" / run.id
        result = {**run.__dict__, "id": run.id, **training_record(run_dir / "metrics.jsonl")}
        with self.lock:
            result.update(self.scorer.unscored() if diverged else self.scorer.score(run_dir / "hf"))
        result["overrides"] = self.overrides(run)
        result["wall_s_this_invocation"] = time.time() - started
        write_json(path, result)
        self.walls.append(result["wall_s_this_invocation"])
        self._progress(run, result, "")
        return result

    def command(self, run: Run) -> list[str]:
        """train.py and its arguments for `run` (run with this Python, from the repository root)."""
        return [str(REPO / "train.py"), "--config", str(self.preset.config), *self.overrides(run)]

    def _train(self, run: Run) -> bool:
        """Run train.py for `run` (its log: OUT/logs/<run>.log); True when it stopped because the
        model diverged (exit status 1, non-finite steps), QualityError on any other failure."""
        cmd = self.command(run)
        env = dict(os.environ)
        threads = self.args.threads or self.preset.threads
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        logfile = self.out / "logs" / f"{run.id}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "a") as f:
            f.write(f"$ python {' '.join(cmd)}\n")
            f.flush()
            # A session of its own: a Ctrl-C at the terminal reaches the benchmark only, which
            # passes exactly one SIGTERM on (`stop`); a second signal would stop train.py at once.
            proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, *cmd], cwd=REPO, env=env, stdout=f, stderr=f, start_new_session=True
            )
            self.children.add(proc)
            try:
                code = proc.wait()
            finally:
                self.children.discard(proc)
        last = (logfile.read_text(errors="replace").strip().splitlines() or [""])[-1]
        if code == 1 and "non-finite steps" in last:
            return True
        if code != 0:
            raise QualityError(f"run {run.id}: train.py exited with status {code} ({last}); log: {logfile}")
        return False

    def stop(self) -> None:
        """SIGTERM to every running train.py: each saves a checkpoint at the end of its step and
        exits (143); a rerun of the benchmark continues from there."""
        for proc in list(self.children):
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _progress(self, run: Run, result: dict, note: str) -> None:
        self.done += 1
        left = self.total - self.done
        eta = "?" if not self.walls else f"{math.ceil(left * statistics.mean(self.walls) / self.jobs / 60)} min"
        ppl = result["eval"][self.eval_sets[0][0]]["perplexity"]
        score = "diverged" if ppl is None else f"val ppl {ppl:.2f}"
        log.info(
            f"run {self.done}/{self.total} {run.variant} lr={run.lr:g} seed={run.seed}: {score}, "
            f"{result['tokens_per_s'] / 1e3:.1f}k tok/s, {note or 'ETA ' + eta}"
        )

    @property
    def jobs(self) -> int:
        return self.args.jobs or self.preset.jobs

    def run_all(self, runs: list[Run]) -> list[dict]:
        """Execute `runs`, `jobs` at a time; results in the order of `runs`. On any exception (a
        failed run, Ctrl-C, SIGTERM) the running train.py processes are stopped after their
        checkpoint and no further run starts."""
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            return list(pool.map(self.execute, runs))
        except BaseException:
            self.stop()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# Runs train.py in place of itself (exec, same process), after asking Linux to send it SIGTERM when
# the benchmark dies without stopping it first (kill -9; prctl PR_SET_PDEATHSIG = 1, kept across
# exec), so that no run outlives the benchmark holding its folder's lock. Linux sends that signal
# once per thread of the benchmark that exits, so such a run may get a second one and stop without
# a final checkpoint; the rerun then continues from its last periodic one. Set in the child rather
# than with Popen's preexec_fn, which is not safe in a process with threads (the runs are started
# from a thread pool).
LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except (OSError, AttributeError):\n    pass\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---- command line ----------------------------------------------------------------------------

PROG = "python -m benchmarks.quality"


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated (default: the six compared; the RTF ablations of benchmarks/variants.py too)",
    )
    p.add_argument("--out", type=Path, help="runs, logs, per-run results (default: runs/quality_<preset>)")
    p.add_argument("--report", type=Path, help="the JSON (default: benchmarks/results/quality_<preset>.json)")
    p.add_argument("--data", type=Path, help="a data_prep folder (gpu-125m: or Pile *.jsonl.zst shards to prepare)")
    p.add_argument("--lrs", type=floats, help="optim.lr grid of the sweep (default: the preset's)")
    p.add_argument("--seeds", type=ints, help="seeds; the sweep runs on the first (default: 0,1,2)")
    p.add_argument("--override", action="append", default=[], help="extra train.py override, repeatable")
    p.add_argument("--jobs", type=int, help="train.py runs at a time (default: the preset's)")
    p.add_argument("--threads", type=int, help="OMP threads per run (default: the preset's)")
    p.add_argument("--plan", action="store_true", help="print the parameter counts and the sweep's commands, then stop")
    p.add_argument(
        "--summarize-only",
        action="store_true",
        help="recompute the summary, table and PNG from the rows of an existing --report JSON (nothing is trained)",
    )
    return p


def resummarize(report: Path) -> int:
    """--summarize-only: the summary, PNG and table again from the report's own rows, the rest of
    the report (machine, load, settings) kept as it was measured."""
    result = read_json(report)
    s = result["summary"]
    variants, seeds = list(s["variants"]), result["settings"]["seeds"]
    counts = {v: c["parameters"] for v, c in result["parameter_check"].items()}
    result["summary"] = summary = summarize(result["rows"], variants, seeds, s["primary_metric"], counts)
    write_json(report, result)
    title = f"{result['preset']}: {result['settings']['tokens_per_run']:,} tokens a run"
    plot(summary, result["rows"], report.with_suffix(".png"), title)
    print(table(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    hf_logging.disable_progress_bar()  # a bar per loaded export would bury the progress lines
    preset = PRESETS[args.preset]
    args.out = args.out or REPO / "runs" / f"quality_{preset.name}"
    args.report = args.report or RESULTS / f"quality_{preset.name}.json"
    if args.summarize_only:
        return resummarize(args.report)
    variants = [v for v in args.variants.split(",") if v]
    lrs, seeds = args.lrs or list(preset.lrs), args.seeds or list(preset.seeds)
    unknown = [v for v in variants if v not in KNOWN]
    if unknown or not variants:
        return error_exit(PROG, f"--variants: unknown {unknown or 'none given'} (choose from {', '.join(KNOWN)})")
    if args.threads or preset.threads:  # the scoring here, as each run trains
        torch.set_num_threads(args.threads or preset.threads)
    load_before = list(os.getloadavg())
    signal.signal(signal.SIGTERM, _terminate)  # stop the runs after their checkpoint, as Ctrl-C does
    try:
        bench = Benchmark(preset, args)
        counts = bench.parameter_counts(variants)
        check = parameter_check(counts, reference_variant(variants))
        off = [
            f"{v} {c['parameters']:,} ({c['relative_to_reference']:+.1%})" for v, c in check.items() if not c["within"]
        ]
        if off:
            raise QualityError(
                f"unequal parameter counts against {reference_variant(variants)} ({min(counts.values()):,} .. "
                f"{max(counts.values()):,}): {', '.join(off)} are off by more than 5%; set the variant's knob "
                "(e.g. its model.mlp_ratio) in the preset's variant_overrides"
            )
        if args.plan:
            for v, c in check.items():
                print(f"{v}: {c['parameters']:,} parameters ({c['relative_to_reference']:+.2%})")
            for run in [Run(v, lr, seeds[0]) for v in variants for lr in lrs]:
                print(" ".join(["python", *bench.command(run)]))
            return 0
        bench.total = len(variants) * (len(lrs) + len(seeds) - 1)
        primary = f"{bench.eval_sets[0][0]}_ppl"
        log.info(
            f"{preset.name}: {len(variants)} variants x ({len(lrs)} lrs + {len(seeds) - 1} more seeds) = "
            f"{bench.total} runs of {bench.tokens_per_run:,} tokens; data {bench.data}; runs in {args.out}"
        )
        sweep = bench.run_all([Run(v, lr, seeds[0]) for v in variants for lr in lrs])
        chosen = {
            v: best_lr({r["lr"]: metric_values(r)[primary] for r in sweep if r["variant"] == v})[0] for v in variants
        }
        rest = bench.run_all([Run(v, chosen[v], s) for v in variants for s in seeds[1:]])
    except (KeyboardInterrupt, Terminated) as e:
        log.info("interrupted: the runs saved their checkpoints; rerun the same command to continue")
        return 143 if isinstance(e, Terminated) else 130
    except (QualityError, PresetError, EvalError, LoadError, train_config.ConfigError) as e:
        return error_exit(PROG, e)
    rows = sweep + rest
    summary = summarize(rows, variants, seeds, primary, counts)
    result = {
        "benchmark": "quality",
        "preset": preset.name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(torch.device(preset.device)),
        "load_average_before_after": [load_before, list(os.getloadavg())],
        "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {
            "train_config": str(preset.config.relative_to(REPO)),
            "overrides": bench.base,
            "data": str(bench.data),
            "tokens_per_run": bench.tokens_per_run,
            "lr_grid": lrs,
            "seeds": seeds,
            "evaluation": {"sets": [n for n, _ in bench.eval_sets], "max_tokens": preset.eval_max_tokens},
            "lambada_examples": preset.lambada_examples if preset.lambada() else None,
            "jobs": bench.jobs,
            "threads_per_run": args.threads or preset.threads,
            "variant_overrides": {v: bench.variant_part(v) for v in variants},
        },
        "parameter_check": check,
        "summary": summary,
        "rows": rows,
    }
    write_json(args.report, result)
    plot(summary, rows, args.report.with_suffix(".png"), f"{preset.name}: {bench.tokens_per_run:,} tokens a run")
    print(table(summary))
    log.info(f"wrote {args.report} and {args.report.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
