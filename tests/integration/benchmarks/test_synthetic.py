"""The synthetic capability suite: task generators against hand-written references, and the CLI.

Each generator is checked by an independent reader written here with plain Python loops: it
recovers the answers from the input sequence alone (so the answers are determined by what a causal
model has seen), and the generator's targets must equal them exactly, position by position. The
same readers check the vocabulary roles, the masks, and that no answer reaches the inputs at or
after the position where it is asked for.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from support.helpers import REPO

from benchmarks.synthetic.run import main
from benchmarks.synthetic.tasks import IGNORE, MQAR, Copying

SMALL_MQAR = [
    MQAR(seq_len=16, num_pairs=3, num_keys=5, num_values=4, num_filler=2),
    MQAR(seq_len=24, num_pairs=6, num_keys=6, num_values=6, num_filler=1),  # every slot is a query
    MQAR(seq_len=40, num_pairs=4, num_keys=9, num_values=7, num_filler=3, power_a=1.0),
]
SMALL_COPYING = [
    Copying(num_tokens=3, num_blank=0, num_symbols=4),
    Copying(num_tokens=4, num_blank=5, num_symbols=3),
    Copying(num_tokens=3, num_blank=6, num_symbols=5, selective=True),
    Copying(num_tokens=5, num_blank=1, num_symbols=2, selective=True),
]


def role(task, token: int) -> str:
    (name,) = [name for name, (lo, hi) in task.ranges().items() if lo <= token < hi]
    return name


def mqar_reference(task: MQAR, row: list[int]) -> list[int]:
    """The targets MQAR's definition gives for one input row: read the N pairs of the prefix,
    then every later key token asks for its value; every other position is unscored."""
    n = task.num_pairs
    table = {}
    for i in range(n):
        key, value = row[2 * i], row[2 * i + 1]
        assert role(task, key) == "key" and role(task, value) == "value"
        assert key not in table, "a key occurs twice in the prefix"
        table[key] = value
    assert len(set(table.values())) == n, "a value occurs twice in the prefix"
    targets = [IGNORE] * (2 * n)
    for t in range(2 * n, len(row)):
        targets.append(table[row[t]] if role(task, row[t]) == "key" else IGNORE)
    return targets


def copying_reference(task: Copying, row: list[int]) -> list[int]:
    """The targets of (selective) copying for one input row: the non-blank tokens of the first
    M + L positions, in order, answered one per marker."""
    region = task.num_tokens + task.num_blank
    data = [x for x in row[:region] if role(task, x) != "blank"]
    assert all(role(task, x) == "data" for x in data)
    assert all(role(task, x) == "marker" for x in row[region:])
    return [IGNORE] * region + data


@pytest.mark.parametrize("task", SMALL_MQAR)
def test_mqar_targets_follow_from_the_inputs(task):
    batch = task.sample(64, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == batch.targets.shape == (64, task.seq_len)
    for row, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        assert targets == mqar_reference(task, row)
        queried = [row[t] for t in range(len(row)) if targets[t] != IGNORE]
        assert sorted(queried) == sorted(row[0 : 2 * task.num_pairs : 2]), "every key is asked exactly once"
        for t, answer in enumerate(targets):
            if answer != IGNORE:
                assert (t - 2 * task.num_pairs) % 2 == 0, "queries sit on the even slots of the query region"
                assert answer in row[:t] and answer not in row[t:], "the answer is seen before, never at or after"


@pytest.mark.parametrize("task", SMALL_COPYING)
def test_copying_targets_follow_from_the_inputs(task):
    batch = task.sample(64, torch.Generator().manual_seed(0))
    region = task.num_tokens + task.num_blank
    assert batch.inputs.shape == batch.targets.shape == (64, task.seq_len)
    first_positions = set()
    for row, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        assert targets == copying_reference(task, row)
        assert len([x for x in row[:region] if x != 0]) == task.num_tokens
        positions = tuple(t for t in range(region) if row[t] != 0)
        first_positions.add(positions)
        if not task.selective:
            assert positions == tuple(range(task.num_tokens)), "copying: the data open the sequence"
            for j in range(task.num_tokens):  # a pure delay of M + L
                assert targets[region + j] == row[region + j - (task.num_tokens + task.num_blank)]
    if task.selective:
        assert len(first_positions) > 1, "selective copying must scatter the data differently per sequence"


@pytest.mark.parametrize("task", SMALL_MQAR + SMALL_COPYING)
def test_vocabulary_ranges_are_disjoint_and_cover_the_vocabulary(task):
    covered = sorted(i for lo, hi in task.ranges().values() for i in range(lo, hi))
    assert covered == list(range(task.vocab_size))
    batch = task.sample(32, torch.Generator().manual_seed(1))
    assert 0 <= int(batch.inputs.min()) and int(batch.inputs.max()) < task.vocab_size


@pytest.mark.parametrize("task", SMALL_MQAR + SMALL_COPYING)
def test_sampling_is_determined_by_the_seed(task):
    a, b, c = (task.sample(16, torch.Generator().manual_seed(s)) for s in (3, 3, 4))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


def test_mqar_query_slots_follow_the_power_law():
    """With one pair, the query slot's distribution is P(g) exactly: (g + 1)^(a - 1) normalised
    (numpy float64 here). 40,000 draws; tolerance 5 binomial standard errors per slot, so a
    correct generator fails with probability below 1e-5 while a uniform one (P off by 0.1 on slot
    0) fails for sure."""
    task = MQAR(seq_len=16, num_pairs=1, num_keys=2, num_values=2, num_filler=1, power_a=0.3)
    draws = 40_000
    targets = task.sample(draws, torch.Generator().manual_seed(5)).targets
    slots = ((targets != IGNORE).nonzero()[:, 1].numpy() - 2) // 2
    observed = np.bincount(slots, minlength=7) / draws
    g = np.arange(1, 8, dtype=np.float64)
    expected = g ** (0.3 - 1) / (g ** (0.3 - 1)).sum()
    stderr = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(observed - expected) < 5 * stderr), (observed, expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MQAR(seq_len=12, num_pairs=4),
        lambda: MQAR(seq_len=15, num_pairs=2),
        lambda: MQAR(seq_len=64, num_pairs=8, num_keys=7),
        lambda: Copying(num_tokens=0),
        lambda: Copying(num_tokens=4, num_blank=0, selective=True),
    ],
)
def test_impossible_task_parameters_are_refused(make):
    with pytest.raises(ValueError):
        make()


# The CLI at a toy size: 2 training steps, width 16, two variants, two seeds, every task.
TOY = [
    "--variants", "rtf64,gpt_neox", "--seeds", "0,1", "--steps", "2", "--batch", "2",
    "--eval-sequences", "4", "--jobs", "1", "--override", "model.d_model=16",
]  # fmt: skip


def toy_args(tmp_path, *extra) -> list[str]:
    return [*TOY, "--work-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "synthetic.json"), *extra]


@pytest.fixture(scope="module")
def toy_suite(tmp_path_factory):
    """The suite run once in a fresh process, as a user runs it; (folder, result JSON, stderr)."""
    tmp = tmp_path_factory.mktemp("synthetic")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.synthetic", *toy_args(tmp)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return tmp, json.loads((tmp / "synthetic.json").read_text()), proc.stderr


def test_cli_writes_every_run_with_its_task_parameters(toy_suite):
    tmp, result, stderr = toy_suite
    assert result["benchmark"] == "synthetic" and result["machine"]["cpu"]
    assert result["seeds"] == [0, 1] and list(result["variants"]) == ["rtf64", "gpt_neox"]
    mqar = result["tasks"]["mqar"]["settings"]
    assert [s["params"]["num_pairs"] for s in mqar] == [16, 32, 64]
    assert all(s["params"]["seq_len"] == 256 for s in mqar)
    copying = result["tasks"]["copying"]["settings"]
    assert [s["x"] for s in copying if s["after"]] == [16, 32, 64, 128, 256]
    # 3 MQAR + 1 selective-copying settings x 2 variants, 5 state sizes for rtf64 + gpt_neox on its own config.
    assert len(result["runs"]) == 2 * (3 * 2 + 1 * 2 + 5 + 1)
    for run in result["runs"]:
        assert run["steps"] == 2 and run["seed"] in (0, 1) and 0.0 <= run["accuracy"] <= 1.0
        assert not run["reused"]
        assert "model.d_model=16" in run["base"]
    assert stderr.count("accuracy") == len(result["runs"]) and "ETA" in stderr  # a progress line per run
    assert (tmp / "synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_state_sweep_builds_each_state_size(toy_suite):
    """The RTF parameters grow by 2 d_model per layer and unit of state (a and b): the sweep's
    parameter counts must differ by exactly that, so the state size really reached the model."""
    _, result, _ = toy_suite
    runs = [r for r in result["runs"] if r["task"] == "copying" and r["after"] and r["seed"] == 0]
    sweep = {int(r["after"][0].removeprefix("model.state_size=")): r["parameters"] for r in runs}
    assert sorted(sweep) == [16, 32, 64, 128, 256]
    d_model, n_layer = 16, 4
    for n in (32, 64, 128, 256):
        assert sweep[n] - sweep[16] == 2 * d_model * n_layer * (n - 16)


def test_cli_summary_is_mean_and_sample_std_over_seeds(toy_suite):
    _, result, _ = toy_suite
    for run in result["runs"]:
        stats = result["summary"][run["task"]][run["setting"]][run["variant"]]
        accs = [r["accuracy"] for r in result["runs"] if (r["task"], r["setting"], r["variant"]) ==
                (run["task"], run["setting"], run["variant"])]  # fmt: skip
        assert stats["accuracies"] == accs and stats["seeds"] == [0, 1]
        # numpy float64 reference; 1e-12 is rounding of two-term sums of numbers in [0, 1].
        assert abs(stats["mean"] - np.mean(accs)) < 1e-12
        assert abs(stats["std"] - np.std(accs, ddof=1)) < 1e-12


def test_cli_resumes_finished_runs_and_reruns_changed_ones(toy_suite, capsys):
    tmp, first, _ = toy_suite
    assert main(toy_args(tmp)) == 0
    again = json.loads((tmp / "synthetic.json").read_text())
    assert all(r["reused"] for r in again["runs"])
    assert [r["accuracy"] for r in again["runs"]] == [r["accuracy"] for r in first["runs"]]
    assert "[1/" not in capsys.readouterr().err  # no run trained
    changed = ["--tasks", "selective_copying", "--variants", "rtf64", "--seeds", "0", "--steps", "3"]
    assert main(toy_args(tmp, *changed)) == 0
    (run,) = json.loads((tmp / "synthetic.json").read_text())["runs"]
    assert run["steps"] == 3 and not run["reused"]


def test_cli_markdown_table_and_plot_from_the_json(toy_suite, capsys):
    tmp = toy_suite[0]
    out = tmp / "table.json"
    assert main(toy_args(tmp, "--tasks", "mqar", "--out", str(out))) == 0
    capsys.readouterr()
    assert main(["--markdown", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    stats = result["summary"]["mqar"]["16 pairs"]["rtf64"]
    row = next(line for line in table.splitlines() if line.startswith("| rtf64 |"))
    assert row.split(" | ")[1] == f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"
    assert "| variant | 16 pairs | 32 pairs | 64 pairs |" in table
    png = out.with_suffix(".png")
    png.unlink()
    assert main(["--plot-only", "--out", str(out)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, named",
    [
        (["--tasks", "mqar,nope"], "--tasks"),
        (["--variants", "s4"], "--variants"),
        (["--steps", "0"], "--steps"),
        (["--markdown", "--out", "/nonexistent/synthetic.json"], "--out"),
        (["--tasks", "mqar", "--override", "model.nope=3"], "model.nope"),
        (["--tasks", "mqar", "--override", "model.n_layer=2"], "n_layer"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, named, capsys):
    with pytest.raises(SystemExit) as e:
        sys.exit(main(args))
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and named in last
