"""Data-prep throughput: MB/s of raw text and tokens/s of a full ``prepare`` (reading, worker
start-up, tokenizing, writing shards and manifest), with the GPT-NeoX-20B tokenizer.

    .venv/bin/python -m benchmarks.data_prep [--workers N] [--repeats 3] [--out FILE]

Scenarios (real data from ../shared/data, never copied into the repository):

* ``prose``: pile_sample.jsonl.zst (The Pile's format: Wikipedia + Gutenberg) and
  tinyshakespeare_input.txt, 20B tokenizer;
* ``stdlib_code``: the embedded default corpus (Python stdlib source, ~31 MB) exported to a Pile
  shard, 20B tokenizer;
* ``default_corpus``: ``prepare(None, ...)`` with its defaults: trains the 8,192-token BPE, then
  tokenizes (the time a fresh checkout needs before training).

MB/s = UTF-8 bytes of the documents written / wall-clock seconds of the ``prepare`` call.
Results go to benchmarks/results/data_prep_cpu.json with the machine description and the load
average (the machine may be shared, which lowers the figures).
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy
import tokenizers

from benchmarks.common import REPO, RESULTS, machine, write_json
from data_prep import default_corpus
from data_prep.prepare import default_workers, prepare
from utils.logs import get_logger, setup_logging

DATA = REPO / ".." / "shared" / "data"
log = get_logger("bench")


def _cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def run_once(inputs, out, tokenizer, workers, **kw) -> dict:
    """One full prepare. Besides wall-clock figures it records CPU seconds of this process and
    of its (reaped) worker processes: on a shared machine the wall clock measures the contention,
    while CPU time measures the work (the load average is recorded beside the results)."""
    c0, t = _cpu(), time.perf_counter()
    m = prepare(inputs, out, tokenizer=tokenizer, workers=workers, force=True, verbose=False, **kw)
    dt = time.perf_counter() - t
    c1 = _cpu()
    main_cpu, child_cpu = c1[0] - c0[0], c1[1] - c0[1]
    mb = m["text_bytes"] / 1e6
    return {
        "seconds": round(dt, 3),
        "text_mb": round(mb, 3),
        "tokens": m["tokens"],
        "documents": m["documents"]["written"],
        "mb_per_s": round(mb / dt, 3),
        "tokens_per_s": round(m["tokens"] / dt),
        "cpu_seconds_main": round(main_cpu, 3),
        "cpu_seconds_workers": round(child_cpu, 3),
        "mb_per_cpu_second": round(mb / (main_cpu + child_cpu), 3),
    }


def scenario(name, inputs, tokenizer, workers, repeats, tmp, **kw) -> dict:
    runs = [run_once(inputs, Path(tmp) / name, tokenizer, workers, **kw) for _ in range(repeats)]
    best = max(runs, key=lambda r: r["mb_per_s"])
    med = statistics.median(r["mb_per_s"] for r in runs)
    res = {
        "inputs": [str(i) for i in inputs] if inputs else "default corpus",
        "tokenizer": str(tokenizer) if tokenizer else "trained BPE (8192)",
        "workers": workers,
        "runs": runs,
        "median_mb_per_s": round(med, 3),
        "best_mb_per_s": best["mb_per_s"],
        "median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs)),
    }
    log.info(
        f"{name:15s} {res['median_mb_per_s']:6.2f} MB/s median (best {res['best_mb_per_s']:.2f}), "
        f"{res['median_tokens_per_s']:,} tokens/s, {runs[0]['text_mb']} MB, "
        f"{[r['seconds'] for r in runs]} s"
    )
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=None, help="default: data_prep's own choice")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "data_prep_cpu.json"))
    ap.add_argument("--skip-default", action="store_true", help="skip the default-corpus scenario")
    a = ap.parse_args(argv)
    setup_logging()
    if a.workers is None:
        a.workers = default_workers()
    tok = DATA / "20B_tokenizer.json"
    prose = [DATA / "pile_sample.jsonl.zst", DATA / "tinyshakespeare_input.txt"]
    if not tok.is_file() or not all(p.is_file() for p in prose):
        sys.exit(f"real data not found in {DATA.resolve()}: this benchmark needs ../shared/data")
    result = {
        "benchmark": "data_prep",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {**machine(), "tokenizers": tokenizers.__version__, "numpy": numpy.__version__},
        "load_average_before": list(os.getloadavg()),
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        sc = result["scenarios"]
        sc["prose"] = scenario("prose", [str(p) for p in prose], tok, a.workers, a.repeats, tmp)
        shard = Path(tmp) / "stdlib.jsonl.zst"
        default_corpus.write_pile_shard(shard)
        sc["stdlib_code"] = scenario("stdlib_code", [str(shard)], tok, a.workers, 1, tmp)
        if not a.skip_default:
            sc["default_corpus"] = scenario("default_corpus", None, None, a.workers, 1, tmp)
    result["load_average_after"] = list(os.getloadavg())
    result["goal_mb_per_s"] = 5.0
    log.info(f"wrote {write_json(a.out, result)}")


if __name__ == "__main__":
    main()
