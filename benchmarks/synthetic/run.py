"""Synthetic capability suite: multi-query associative recall (MQAR), selective copying and the RTF
paper's copying task, for the model variants of the quality benchmark (benchmarks/variants.py).

    python -m benchmarks.synthetic                 # the whole default suite (see SUITE below)
    python -m benchmarks.synthetic --tasks copying --variants rtf64,gpt_neox --seeds 0,1 --steps 300
    python -m benchmarks.synthetic --markdown      # the results table of --out, for the README
    python -m benchmarks.synthetic --plot-only     # redraw the PNG of --out

Every run trains one variant from scratch on one task setting with one seed, for a fixed number of
steps on freshly sampled batches (the training stream is seeded by the run's seed, the model's
initialisation too), then scores token accuracy on the answer positions of a held-out set that
is the same for every run of that setting. The loss is the cross-entropy on the answer positions
only (the project's next_token_nll; every other position is IGNORE). Models are called as users
call them, model(input_ids).logits, and optimised as train.py does: AdamW with the project's
parameter groups (RTF filters on their own lr, no decay), warmup + cosine schedule, gradient
clipping at 1.

Runs are independent and resumable: each finished run is written to --work-dir as one JSON file
(its full description and its result); a rerun skips every run whose file describes exactly the
same run, so an interrupted suite continues where it stopped and a changed setting reruns only
what it changes. --jobs runs that many runs at once, one torch thread each. A progress line per
run gives the elapsed time and an ETA. At the end, --out (JSON: machine, every task's parameters,
the training settings, per-run accuracies, mean and sample std over seeds) and a PNG beside it.

The default suite (66 runs, 2 seeds; about 7,000 CPU-seconds, so about 1 hour with --jobs 2 on
an idle 2-core machine) and why, from measurements on the project's 2-core machine (2026-12-04,
one torch thread, CPU time per step, which is what an idle machine's wall time would be):

- Models: width 64, depth 4, 4 heads (the RTF paper's copying model is 64 x 4; the hybrid needs
  3 layers or more, its attention sits at layer 2). A step of batch 8 x 256 tokens costs about
  0.09 s for the Hyena variants, 0.10 s for gpt_neox, 0.14 s for multihyena; 8 x 512 tokens
  0.16 s (rtf64) to 0.27 s (gpt_neox).
- Batch 8, lr 3e-3 (configs/default.yaml's): what limits learning here is the number of updates,
  not the sequences per update (copying at state 256 is at 100% after 200 steps of batch 8), and
  batch 8 buys four times the steps of batch 32.
- Copying, 600 steps: M = 256 data tokens, no blanks (the paper: M = 1024, 4 layers), so the
  delay is 256. One RTF of order n >= 256 holds it alone; a smaller order must chain delays over
  layers (4 x 64 >= 256 at best), which is learnt much later: state 256 reached 100% in 200
  steps, state 128 was at 11% after 600, state 64 at chance after 300 steps of batch 16.
- Selective copying, 1,000 steps: 16 data tokens among 240 positions (the Mamba paper's 16
  tokens and 16 symbols, at length 256 instead of 4096). gpt_neox was at 24% after 800 steps and
  rising, rtf64 at chance (6.25%).
- MQAR, 1,000 steps: at this budget no variant gets past guessing among the values present in
  the context (1/N): gpt_neox at 16 pairs was at 7% after 2,700 steps (1/16 = 6.25%), and at 8
  pairs over 128 tokens at 7% after 1,000 steps of batch 16 (11% with lr 1e-2; 1/8 = 12.5%).
  Zoology trains on about a hundred times more sequences. So the MQAR columns show how far each
  variant gets towards the task in a CPU budget, not its recall capacity; measure that with
  more steps on a bigger machine (`--tasks mqar --steps 20000`).

More seeds rather than more steps where the spread across seeds is large: `--seeds 0,1,2,3`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import REPO, RESULTS, ints, machine, write_json
from benchmarks.synthetic.report import markdown, plot, read_json, summarize
from benchmarks.synthetic.tasks import IGNORE, MQAR, Copying, make_task
from benchmarks.variants import VARIANTS, build_variant, parameter_count
from models.modeling_hyena_rtf import next_token_nll
from training.optim import lr_factor, make_optimizer, param_groups, set_lr
from utils.logs import error_exit, get_logger, setup_logging

log = get_logger("synthetic")
PROG = "python -m benchmarks.synthetic"

BASE = ("model.d_model=64", "model.n_layer=4", "model.n_head=4")  # train.py model overrides of every run
TRAINING = dict(lr=3e-3, rtf_lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, warmup=0.05, min_lr_ratio=0.1)
BATCH = 8
EVAL_SEQUENCES = 512
EVAL_SEED = 2**31 - 1  # the held-out set's generator; training streams use the run's seed
SWEEP_VARIANT = "rtf64"  # the copying task's state sweep: this variant with model.state_size=n
STATE_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Setting:
    """One point on a task's difficulty axis: `x` (its value), the task, the variants it runs
    (None: every selected variant) and model overrides applied after the variant's own."""

    label: str
    x: int
    task: MQAR | Copying
    variants: tuple[str, ...] | None = None
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    axis: str
    steps: int
    settings: tuple[Setting, ...]


def _copying_settings() -> tuple[Setting, ...]:
    task = Copying(num_tokens=256, num_blank=0, num_symbols=62)
    sweep = tuple(Setting(f"state {n}", n, task, (SWEEP_VARIANT,), (f"model.state_size={n}",)) for n in STATE_SIZES)
    others = tuple(v for v in VARIANTS if v not in ("rtf16", SWEEP_VARIANT))  # rtf16/64 are sweep points
    return (*sweep, Setting("own config", 0, task, others))


SUITE: dict[str, Suite] = {
    "mqar": Suite(
        "key-value pairs", 1000, tuple(Setting(f"{n} pairs", n, MQAR(seq_len=256, num_pairs=n)) for n in (16, 32, 64))
    ),
    "selective_copying": Suite(
        "data tokens",
        1000,
        (Setting("16 tokens", 16, Copying(num_tokens=16, num_blank=224, num_symbols=16, selective=True)),),
    ),
    "copying": Suite("RTF state size", 600, _copying_settings()),
}


@dataclass(frozen=True)
class Run:
    task: str
    setting: str
    variant: str
    seed: int
    steps: int
    batch: int
    eval_sequences: int
    params: dict  # the task's parameters (MQAR.params / Copying.params)
    base: tuple[str, ...]
    after: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.task} | {self.setting} | {self.variant} | seed {self.seed}"

    @property
    def file_name(self) -> str:
        slug = "_".join(str(x).replace(" ", "") for x in (self.task, self.setting, self.variant, f"seed{self.seed}"))
        return slug + ".json"

    def describe(self) -> dict:
        """Everything that determines the result (a stored run is reused only if this is equal)."""
        d = {**asdict(self), "training": TRAINING, "eval_seed": EVAL_SEED}
        return json.loads(json.dumps(d))  # as a stored file reads back (tuples become lists)

    @property
    def cost(self) -> float:
        """Relative compute: tokens processed in training."""
        return self.steps * self.batch * self.params["seq_len"]


def train_run(run: Run) -> dict:
    """Train and score one run; returns its result (accuracy on the held-out answers, the mean
    training loss over the last tenth of the steps, parameters, seconds)."""
    torch.set_num_threads(1)  # several runs share the cores; tiny tensors gain little from threads
    task = make_task(run.params)
    t0 = time.perf_counter()
    model = build_variant(run.variant, task.vocab_size, task.seq_len, base=run.base, seed=run.seed, after=run.after)
    groups = param_groups(model, TRAINING["lr"], TRAINING["rtf_lr"], TRAINING["weight_decay"])
    opt = make_optimizer(groups, TRAINING["betas"], TRAINING["eps"])
    warmup = max(1, int(TRAINING["warmup"] * run.steps))
    gen = torch.Generator().manual_seed(run.seed)
    model.train()
    tail = []
    for step in range(run.steps):
        set_lr(opt.param_groups, lr_factor(step, warmup, run.steps, TRAINING["min_lr_ratio"]))
        batch = task.sample(run.batch, gen)
        loss = next_token_nll(model(batch.inputs).logits, batch.targets) / (batch.targets != IGNORE).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # configs/default.yaml's optim.grad_clip
        opt.step()
        if step >= run.steps - max(1, run.steps // 10):
            tail.append(loss.item())
    train_seconds = time.perf_counter() - t0
    return {
        "accuracy": evaluate(model, task, run.eval_sequences, run.batch),
        "final_loss": sum(tail) / len(tail),
        "parameters": parameter_count(model),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: MQAR | Copying, sequences: int, batch: int) -> float:
    """Token accuracy over the answer positions of `sequences` held-out sequences (EVAL_SEED):
    argmax over the task's vocabulary (a padded embedding's extra rows never count)."""
    model.eval()
    data = task.sample(sequences, torch.Generator().manual_seed(EVAL_SEED))
    right = total = 0
    for i in range(0, sequences, batch):
        inputs, targets = data.inputs[i : i + batch], data.targets[i : i + batch]
        guess = model(inputs).logits[..., : task.vocab_size].argmax(-1)
        scored = targets != IGNORE
        right += int((guess[scored] == targets[scored]).sum())
        total += int(scored.sum())
    model.train()
    return right / total


def plan(args) -> list[Run]:
    runs = []
    for name in args.tasks:
        suite = SUITE[name]
        for s in suite.settings:
            for variant in [v for v in args.variants if s.variants is None or v in s.variants]:
                for seed in args.seeds:
                    runs.append(
                        Run(
                            name,
                            s.label,
                            variant,
                            seed,
                            args.steps or suite.steps,
                            args.batch,
                            args.eval_sequences,
                            s.task.params(),
                            (*BASE, *args.override),
                            s.after,
                        )
                    )
    return runs


def check_models(runs: list[Run]) -> None:
    """Build every distinct model of the plan once, untrained, so that a bad --override (or a
    variant it breaks, such as the hybrid below 3 layers) fails at once with ValueError, not in a
    worker after hours of runs."""
    for variant, base, after, seq_len, vocab in sorted(
        {(r.variant, r.base, r.after, r.params["seq_len"], r.params["vocab_size"]) for r in runs}
    ):
        build_variant(variant, vocab, seq_len, base=base, after=after)


def _worker(run: Run) -> tuple[Run, dict]:
    return run, train_run(run)


def execute(runs: list[Run], work_dir: Path, jobs: int) -> list[dict]:
    """Run what is not already in `work_dir`; returns every run's record (description + result)."""
    records, todo = {}, []
    for run in runs:
        try:
            stored = read_json(work_dir / run.file_name)
        except ValueError as e:
            log.warning("%s; running it again", e)
            stored = None
        if stored and stored.get("run") == run.describe():
            records[run.file_name] = {**stored, "reused": True}
        else:
            todo.append(run)
    log.info(
        "%d runs: %d already done in %s, %d to run on %d job(s)", len(runs), len(records), work_dir, len(todo), jobs
    )
    start, done_cost, total_cost = time.perf_counter(), 0.0, sum(r.cost for r in todo)
    pool = multiprocessing.get_context("spawn").Pool(jobs) if jobs > 1 and len(todo) > 1 else None
    results = pool.imap_unordered(_worker, todo) if pool else map(_worker, todo)
    try:
        for i, (run, result) in enumerate(results, 1):
            record = {"run": run.describe(), "result": result}
            write_json(work_dir / run.file_name, record)
            records[run.file_name] = {**record, "reused": False}
            done_cost += run.cost
            elapsed = time.perf_counter() - start
            eta = elapsed * (total_cost - done_cost) / done_cost
            log.info(
                "[%d/%d] %s: accuracy %.3f, %.0f s | elapsed %s, ETA %s",
                i,
                len(todo),
                run.name,
                result["accuracy"],
                result["seconds"],
                _hms(elapsed),
                _hms(eta),
            )
    finally:
        if pool:
            pool.terminate()
    return [records[r.file_name] for r in runs]


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _names(choices) -> callable:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {bad or 'empty list'} (choose from {', '.join(choices)})")
        return names

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=_names(SUITE), default=list(SUITE), help="comma-separated (default: all)")
    ap.add_argument("--variants", type=_names(VARIANTS), default=list(VARIANTS), help="comma-separated (default: all)")
    ap.add_argument("--seeds", type=ints, default=[0, 1])
    ap.add_argument("--steps", type=int, help="training steps of every run (default: each task's own)")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--eval-sequences", type=int, default=EVAL_SEQUENCES)
    ap.add_argument("--override", action="append", default=[], help="extra train.py model override, repeatable")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, one torch thread each")
    ap.add_argument("--work-dir", type=Path, default=REPO / "runs" / "synthetic", help="per-run result files")
    ap.add_argument("--out", type=Path, default=RESULTS / "synthetic_cpu.json", help="JSON; the PNG goes beside it")
    ap.add_argument("--markdown", action="store_true", help="print the table of --out as markdown, train nothing")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG of --out, train nothing")
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "eval_sequences", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.seeds:
        ap.error("--seeds: give at least one seed")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    if args.markdown or args.plot_only:
        try:
            result = read_json(args.out)
        except ValueError as e:
            return error_exit(PROG, f"--out {e}")
        if result is None:
            return error_exit(PROG, f"--out {args.out}: no such file (run the suite first)")
        if args.plot_only:
            plot(result, args.out.with_suffix(".png"))
        if args.markdown:
            print(markdown(result))
        return 0
    start = time.perf_counter()
    runs = plan(args)
    try:
        check_models(runs)
    except ValueError as e:
        return error_exit(PROG, f"--override: {e}")
    records = execute(runs, args.work_dir, args.jobs)
    result = {
        "benchmark": "synthetic",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([PROG, *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(torch.device("cpu")),
        "elapsed_seconds": round(time.perf_counter() - start, 1),  # this invocation, reused runs cost nothing
        "run_seconds_total": round(sum(r["result"]["seconds"] for r in records), 1),
        "jobs": args.jobs,
        "base_overrides": [*BASE, *args.override],
        "training": {**TRAINING, "batch": args.batch, "eval_sequences": args.eval_sequences, "eval_seed": EVAL_SEED},
        "tasks": {
            name: {
                "axis": SUITE[name].axis,
                "steps": args.steps or SUITE[name].steps,
                "settings": [
                    {"label": s.label, "x": s.x, "params": s.task.params(), "variants": s.variants, "after": s.after}
                    for s in SUITE[name].settings
                ],
            }
            for name in args.tasks
        },
        "variants": {v: list(VARIANTS[v]) for v in args.variants},
        "seeds": args.seeds,
        "runs": [{**r["run"], **r["result"], "reused": r["reused"]} for r in records],
    }
    result["summary"] = summarize(result["runs"])
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    log.info("wrote %s and %s (%s)", args.out, args.out.with_suffix(".png"), _hms(result["elapsed_seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
