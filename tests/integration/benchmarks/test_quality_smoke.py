"""benchmarks/quality/run.py on a tiny budget (two variants, one lr, one seed, the tiny corpus), and its
statistics on hand-computed tables: the rows of the JSON, the parameter-count check, the
significance rule, and resuming (a deleted result is the only run redone)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
from support.train_utils import REPO, child_env

import benchmarks.quality.run as quality
from benchmarks.quality.report import summarize, table
from benchmarks.quality.stats import (
    best_lr,
    compare,
    mean_std,
    parameter_check,
    pooled_std,
    reference_variant,
)

# A tiny budget on the tiny corpus: d 64 (where GPT-NeoX is within 5% of rtf16: 132,864 against
# 138,752 parameters, -4.2%), 2 layers, 4 steps of 8 x 64 tokens, one thread per run.
TINY = [
    "model.d_model=64",
    "model.n_layer=2",
    "data.seq_len=64",
    "train.max_steps=4",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "schedule.warmup_steps=2",
    "data.eval_samples=4",
    "logging.log_every=2",
]


def smoke_args(corpus, tmp_path, *extra, variants="rtf16,gpt_neox", tiny=TINY):
    args = ["--preset", "cpu", "--data", str(corpus), "--variants", variants, "--lrs", "1e-2", "--seeds", "0"]
    args += ["--out", str(tmp_path / "out"), "--report", str(tmp_path / "quality.json"), "--jobs", "1"]
    args += ["--threads", "1", *extra]
    for o in tiny:
        args += ["--override", o]
    return args


@pytest.fixture(scope="module")
def smoke(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    assert quality.main(smoke_args(corpus, tmp)) == 0
    return tmp, json.loads((tmp / "quality.json").read_text())


def test_the_json_has_one_row_per_run_with_its_scores(smoke):
    tmp, report = smoke
    rows = {r["id"]: r for r in report["rows"]}
    assert sorted(rows) == ["gpt_neox_lr0.01_seed0", "rtf16_lr0.01_seed0"]
    for r in rows.values():
        assert r["tokens"] == 4 * 8 * 64  # equal tokens: steps x global batch x seq_len
        assert r["curve"]["step"] == [2, 4]
        assert 1 < r["eval"]["val"]["perplexity"] < 512  # the tiny corpus' vocabulary
        expected_bpb = math.log(r["eval"]["val"]["perplexity"]) * r["eval"]["val"]["tokens"]
        expected_bpb /= math.log(2) * r["eval"]["val"]["bytes"]
        assert r["eval"]["val"]["bits_per_byte"] == pytest.approx(expected_bpb, rel=1e-12)  # the same NLL
        assert r["tokens_per_s"] > 0
    assert "model.arch=gpt_neox" in rows["gpt_neox_lr0.01_seed0"]["overrides"]
    assert (tmp / "quality.png").stat().st_size > 0
    assert report["machine"]["cpu_count"] >= 1


def test_parameter_counts_are_checked_and_recorded(smoke):
    _, report = smoke
    check = report["parameter_check"]
    # GPT-NeoX at d 64, 2 layers, vocabulary 512: V d + L (12 d^2 + 13 d) + 2 d (closed form)
    assert check["gpt_neox"]["parameters"] == 512 * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64 == 132864
    assert check["gpt_neox"]["within"] is True
    assert check["rtf16"]["relative_to_reference"] == 0.0
    for v in ("rtf16", "gpt_neox"):  # the count checked before training is the trained export's
        assert report["summary"]["variants"][v]["parameters_of_exports"] == [check[v]["parameters"]]


def test_one_seed_has_no_spread_to_call_a_difference_significant(smoke):
    _, report = smoke
    c = report["summary"]["comparisons"]["gpt_neox"]["val_ppl"]
    assert c["significant"] is None
    assert c["pooled_std"] is None


def test_unequal_parameter_counts_stop_the_benchmark_before_training(corpus, tmp_path, capsys):
    """At d 32 GPT-NeoX has 6.6% fewer parameters than rtf16 (41,856 against 44,800)."""
    tiny = [o for o in TINY if not o.startswith("model.d_model")] + ["model.d_model=32"]
    assert quality.main(smoke_args(corpus, tmp_path, tiny=tiny)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m benchmarks.quality: error: unequal parameter counts against rtf16"), err
    assert "gpt_neox 41,856 (-6.6%)" in err, err
    assert not (tmp_path / "out" / "runs").exists()


def test_unknown_variant_is_one_line(corpus, tmp_path, capsys):
    assert quality.main(smoke_args(corpus, tmp_path, variants="rtf16,mamba")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m benchmarks.quality: error: --variants: unknown ['mamba']"), err


def test_a_rerun_redoes_only_the_run_whose_result_was_deleted(smoke, corpus, capsys):
    tmp, _ = smoke
    results = tmp / "out" / "results"
    kept = (results / "rtf16_lr0.01_seed0.json").read_bytes()
    (results / "gpt_neox_lr0.01_seed0.json").unlink()
    log = tmp / "out" / "logs" / "gpt_neox_lr0.01_seed0.log"
    launches = log.read_text().count("$ python ")
    capsys.readouterr()
    assert quality.main(smoke_args(corpus, tmp)) == 0
    assert (results / "rtf16_lr0.01_seed0.json").read_bytes() == kept  # not redone
    assert (results / "gpt_neox_lr0.01_seed0.json").is_file()
    assert log.read_text().count("$ python ") == launches + 1  # train.py ran again for it, and only it
    assert (tmp / "out" / "logs" / "rtf16_lr0.01_seed0.log").read_text().count("$ python ") == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[quality] run ")]
    assert any("rtf16 lr=0.01 seed=0" in m and m.endswith("done before") for m in lines), lines
    assert any("gpt_neox lr=0.01 seed=0" in m and "ETA" in m for m in lines), lines


# ---- the statistics, on numbers worked out by hand ----------------------------------------------


def test_mean_and_sample_standard_deviation():
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; s = sqrt(5 / 3)
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3), rel=1e-15))
    assert mean_std([7.0]) == (7.0, None)


def test_pooled_standard_deviation_and_the_two_sigma_rule():
    # a: mean 2, s^2 = 1; b: mean 4, s^2 = 4; s_p = sqrt((2 * 1 + 2 * 4) / 4) = sqrt(2.5) = 1.5811
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]
    assert pooled_std(a, b) == pytest.approx(math.sqrt(2.5), rel=1e-15)
    c = compare(a, b)  # difference 2 < 2 s_p = 3.162: not significant
    assert c["difference"] == 2.0
    assert c["threshold"] == pytest.approx(2 * math.sqrt(2.5), rel=1e-15)
    assert c["significant"] is False
    # 10, 11, 12 against 13, 14, 15: s_p = 1, difference 3 > 2
    assert compare([10.0, 11.0, 12.0], [13.0, 14.0, 15.0])["significant"] is True
    # 3 seeds each, difference exactly 2 s_p: not more than the threshold, so not significant
    assert compare([10.0, 11.0, 12.0], [12.0, 13.0, 14.0])["significant"] is False
    assert compare([1.0], [2.0])["significant"] is None  # no degree of freedom


def test_best_lr_and_the_edge_of_the_grid():
    assert best_lr({1e-3: 40.0, 3e-3: 38.0, 1e-2: 39.0}) == (3e-3, False)
    assert best_lr({1e-3: 40.0, 3e-3: 38.0, 1e-2: 37.0}) == (1e-2, True)
    assert best_lr({1e-3: 40.0, 3e-3: float("nan"), 1e-2: float("inf")}) == (1e-3, True)  # diverged runs lose
    with pytest.raises(ValueError, match="diverged"):
        best_lr({1e-3: float("nan")})


def test_parameter_check_and_the_reference():
    check = parameter_check({"rtf16": 1000, "rtf64": 1050, "gpt_neox": 949}, "rtf16")
    assert check["rtf64"] == {"parameters": 1050, "relative_to_reference": 0.05, "within": True}
    assert check["gpt_neox"]["within"] is False  # 5.1% fewer
    assert reference_variant(["gpt_neox", "rtf16"]) == "rtf16"
    assert reference_variant(["gpt_neox", "rtf64", "hybrid"], {"rtf64": 40.0, "hybrid": 39.0}) == "hybrid"
    assert reference_variant(["implicit", "gpt_neox"]) == "implicit"


def synthetic_row(variant, lr, seed, ppl):
    return {
        "variant": variant,
        "lr": lr,
        "seed": seed,
        "eval": {"val": {"perplexity": ppl, "bits_per_byte": ppl / 10}},
        "tokens_per_s": 1000.0,
        "parameters": 100,
        "tokens": 50,
    }


def test_summary_of_a_synthetic_table():
    """rtf16: sweep 40 / 38 / 39 at lr 1, 2, 3 -> lr 2; seeds at lr 2: 38, 39, 40 (mean 39, s 1).
    gpt_neox: sweep 45 / 44 / 43 -> lr 3 (grid edge); seeds 43, 45, 47 (mean 45, s 2).
    s_p = sqrt((2 * 1 + 2 * 4) / 4) = 1.5811, 2 s_p = 3.162 < 6: significant. implicit: seeds 39.5,
    40.5, 41.5 (mean 40.5, s 1): difference 1.5 < 2 s_p = 2: not significant."""
    sweeps = {"rtf16": (40.0, 38.0, 39.0), "gpt_neox": (45.0, 44.0, 43.0), "implicit": (41.0, 39.5, 42.0)}
    seeds = {"rtf16": (2.0, 39.0, 40.0), "gpt_neox": (3.0, 45.0, 47.0), "implicit": (2.0, 40.5, 41.5)}
    rows = []
    for v, ppls in sweeps.items():
        rows += [synthetic_row(v, lr, 0, p) for lr, p in zip((1.0, 2.0, 3.0), ppls)]
        lr, *rest = seeds[v]
        rows += [synthetic_row(v, lr, s, p) for s, p in zip((1, 2), rest)]
    s = summarize(rows, list(sweeps), [0, 1, 2], "val_ppl", {v: 100 for v in sweeps})
    assert s["reference"] == "rtf16"
    assert (s["variants"]["rtf16"]["chosen_lr"], s["variants"]["rtf16"]["chosen_lr_at_grid_edge"]) == (2.0, False)
    assert (s["variants"]["gpt_neox"]["chosen_lr"], s["variants"]["gpt_neox"]["chosen_lr_at_grid_edge"]) == (3.0, True)
    assert s["variants"]["gpt_neox"]["metrics"]["val_ppl"]["values"] == [43.0, 45.0, 47.0]
    neox = s["comparisons"]["gpt_neox"]["val_ppl"]
    assert neox["difference"] == 6.0
    assert neox["threshold"] == pytest.approx(2 * math.sqrt(2.5), rel=1e-12)
    assert neox["significant"] is True
    implicit = s["comparisons"]["implicit"]["val_ppl"]
    assert implicit["difference"] == pytest.approx(1.5, rel=1e-12)
    assert implicit["threshold"] == pytest.approx(2.0, rel=1e-12)
    assert implicit["significant"] is False
    text = table(s)
    assert "| gpt_neox | 100 | 3 (edge) | 45.00 ± 2.00 |" in text
    assert "+6.00 / 3.16: significant" in text
    assert "+1.50 / 2.00: not significant" in text


def test_the_gpu_preset_plans_equal_sized_125m_variants(corpus, tmp_path, capsys):
    """gpu-125m cannot train here; --plan builds every variant on the meta device (vocabulary 512 of
    the tiny corpus) and prints the counts and the sweep's train.py commands."""
    args = ["--preset", "gpu-125m", "--data", str(corpus), "--out", str(tmp_path), "--plan"]
    assert quality.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    counts = {line.split(":")[0]: line for line in lines[:6]}
    assert list(counts) == ["rtf16", "rtf64", "implicit", "multihyena", "hybrid", "gpt_neox"]
    for line in counts.values():
        relative = float(line.split("(")[1].rstrip("%)"))
        assert abs(relative) <= 5.0, line
    commands = lines[6:]
    assert len(commands) == 6 * 3  # the sweep: every variant at every lr
    assert all("configs/pile_125m.yaml" in c and "train.precision=bf16" in c for c in commands)
    assert sum("model.multi_hyena_heads=96" in c for c in commands) == 3  # the preset's knob, instead of 16
    assert not any("model.multi_hyena_heads=16" in c for c in commands)


def test_a_diverged_run_is_recorded_and_never_chosen(corpus, tmp_path):
    """lr 1e6 makes the tiny model's loss NaN at step 2; with train.max_nonfinite_steps=1 train.py
    stops (exit status 1): the row says so, has no score, and the sweep picks the other lr."""
    extra = ["--lrs", "1e-2,1e6", "--override", "train.max_nonfinite_steps=1"]
    assert quality.main(smoke_args(corpus, tmp_path, *extra, variants="rtf16")) == 0
    report = json.loads((tmp_path / "quality.json").read_text())
    rows = {r["id"]: r for r in report["rows"]}
    assert rows["rtf16_lr1e+06_seed0"]["diverged"] is True
    assert rows["rtf16_lr1e+06_seed0"]["eval"]["val"]["perplexity"] is None
    assert rows["rtf16_lr0.01_seed0"]["diverged"] is False
    summary = report["summary"]["variants"]["rtf16"]
    assert summary["chosen_lr"] == 0.01
    assert summary["diverged_runs"] == ["rtf16_lr1e+06_seed0"]


def test_sigterm_stops_the_runs_after_a_checkpoint_and_a_rerun_continues_them(corpus, tmp_path):
    """The benchmark in a subprocess, stopped by SIGTERM once its run has logged step 20 of 300:
    exit status 143, the run saved a checkpoint on the way out and left no result; the same
    command again (its main() here) resumes the run from that checkpoint and finishes it."""
    tiny = [o for o in TINY if not o.startswith(("train.max_steps", "logging.log_every"))]
    tiny += ["train.max_steps=300", "logging.log_every=10"]
    cmd = [sys.executable, "-m", "benchmarks.quality", *smoke_args(corpus, tmp_path, variants="rtf16", tiny=tiny)]
    log = tmp_path / "out" / "logs" / "rtf16_lr0.01_seed0.log"
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(threads=1), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240  # a hang fails the test instead of blocking the suite
    while not (log.is_file() and "step 20 |" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 20"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    text = log.read_text()
    assert "stopped by SIGTERM: checkpoint saved at step" in text
    assert not (tmp_path / "out" / "results" / "rtf16_lr0.01_seed0.json").exists()
    stopped_at = int(text.split("stopped by SIGTERM: checkpoint saved at step ")[1].split(";")[0])
    assert 20 <= stopped_at < 300
    assert quality.main(cmd[3:]) == 0  # the same command again (in this process: one start fewer)
    assert f"resumed from {tmp_path / 'out' / 'runs' / 'rtf16_lr0.01_seed0' / 'checkpoints'}" in log.read_text()
    result = json.loads((tmp_path / "out" / "results" / "rtf16_lr0.01_seed0.json").read_text())
    assert result["curve"]["step"][-1] == 300
    assert result["tokens"] == 300 * 8 * 64


def test_summarize_only_recomputes_the_summary_from_the_rows(smoke):
    """--summarize-only on the smoke report: nothing trained, the same summary from the same rows,
    the measured parts (machine, rows) untouched, the PNG drawn again."""
    tmp, _ = smoke
    report = tmp / "quality.json"
    before = json.loads(report.read_text())
    (tmp / "quality.png").unlink()
    assert quality.main(["--preset", "cpu", "--report", str(report), "--summarize-only"]) == 0
    after = json.loads(report.read_text())
    assert after == before
    assert (tmp / "quality.png").stat().st_size > 0
