"""distill.py: a Hyena-RTF checkpoint in, one whose long filters are low-order RTFs out (Laughing Hyena).

Tiny models are built here, exported with save_hf_checkpoint and distilled through distill.py's
main(argv) in process (once as a subprocess, for the exit status). Each distillation runs once per
module (fixtures) and the tests read what it wrote: the checkpoint (loaded with
AutoModelForCausalLM, no trust_remote_code), the report and the plot.

Exactness.  A model whose filters are RTFs of order n, distilled at order m >= n, must give the
source's logits: each filter's taps are an order-n rational sequence (their Hankel matrix has rank
n), so an order-m RTF reproduces them exactly, the m - n extra poles being cancelled by zeros. What
is left is rounding: the fit in float64 (measured: 4e-16 relative on the taps), the float32
storage of a, b, h0 (2e-7 on the taps, as the saved model computes them) and the float32 forward
of two or three layers (measured 5e-7 to 9e-7 on the logits, max |difference| / max |logit|; KL
3e-13 nats per token). RTOL = 1e-4 leaves two decades for larger or deeper models, while a wrong
filter, a shifted tap or a lost feed-through moves the logits by O(1) relative (the order-1 fits
of the sweep are 40-55% off: these filters are far from trivial).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from support.helpers import REPO, assert_greedy, load_script, tiny_model, train_tiny_tokenizer
from transformers import AutoModelForCausalLM

import distillation.checkpoint as distill_checkpoint
from distillation.fit import distill_filters
from export.folder import save_hf_checkpoint
from models.hf_compat import output_cache
from models.hyena import HyenaState

pytestmark = pytest.mark.hf

distill = load_script("distill.py")
evaluate = load_script("evaluate_lm.py")

RTOL = 1e-4  # distilled vs source logits at order >= the source order (module docstring)
RECURRENT_RTOL = 1e-4  # recurrent decoding vs the parallel forward of the distilled model
L_MAX = 32  # tiny_config's
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

WORDS = "the cat dog sat on a mat and ran to house tree big small red blue quick lazy fox jumps over".split()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def run(*argv) -> int:
    return distill.main([str(a) for a in argv])


def listing(folder) -> dict:
    """Every path under `folder` (hidden ones too) with its bytes: what "nothing written" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """A small jsonl: 4 documents of 20-70 words, so a few windows of l_max tokens each."""
    rng = torch.Generator().manual_seed(1)
    lines = []
    for n in (20, 35, 50, 70):
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=rng)]
        lines.append(json.dumps({"text": " ".join(words) + "."}))
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def export(model, tokenizer_file, folder):
    save_hf_checkpoint(model, tokenizer_file, folder)
    return folder


SOURCES = {
    # order-4 RTFs, an attention layer in the middle (its state_sizes entry is a placeholder)
    "hyena": dict(n_layer=3, attn_layers=[1]),
    # MultiHyena: 4 heads of 8 channels, one filter per head
    "multihyena": dict(multi_hyena_heads=4),
}


@pytest.fixture(scope="module", params=sorted(SOURCES))
def exact(request, tokenizer_file, docs, tmp_path_factory):
    """An order-4 RTF model distilled at order 6 with --data: (source folder, out folder, report)."""
    root = tmp_path_factory.mktemp(f"exact_{request.param}")
    source = export(tiny_model(vocab=320, **SOURCES[request.param]), tokenizer_file, root / "ckpt")
    out = root / "out"
    assert run(source, out, "--order", 6, "--sweep", "1", "--data", docs) == 0
    return source, out, json.loads((out / "distill_report.json").read_text())


@pytest.fixture(scope="module")
def implicit(tokenizer_file, tmp_path_factory):
    """A smooth implicit-filter model (a narrow filter MLP) distilled at --tolerance 0.05: the Hankel
    spectrum picks an order per layer (3 and 2 here)."""
    root = tmp_path_factory.mktemp("implicit")
    model = tiny_model(vocab=320, filter="implicit", implicit_order=4, implicit_bands=1)
    source = export(model, tokenizer_file, root / "ckpt")
    out = root / "out"
    report = root / "reports" / "implicit.json"
    assert run(source, out, "--tolerance", 0.05, "--max-order", 15, "--report", report) == 0
    return source, out, json.loads(report.read_text())


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 300, (1, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the distilled checkpoint


def test_the_distilled_folder_loads_with_rtf_filters_of_the_fitted_orders(exact):
    source, out, report = exact
    model = load(out)
    config = json.loads((out / "config.json").read_text())
    n_layer = json.loads((source / "config.json").read_text())["n_layer"]
    # The default form: poles and residues (models/modal.py), 3 slots for order 6.
    assert (config["filter"], config["num_a"]) == ("modal", None)
    assert config["state_sizes"] == [6] * n_layer
    assert [entry["order"] for entry in report["layers"]] == [6] * len(report["layers"])
    for entry in report["layers"]:
        block = model.model.layers[entry["layer"]]
        assert block.mixer.filter.state_size == 6 and block.mixer.filter.log_decay.shape[-1] == 3
        assert entry["form"] == "modal"


@pytest.mark.parametrize("length", [24, 48], ids=["within_lmax", "past_lmax"])
def test_distilling_at_the_source_order_or_above_keeps_the_logits(exact, length):
    source, out, _ = exact
    ids = prompt(length)
    # The distilled model computes its kernels in float64 (rtf_kernel_dtype); the source, compared in
    # the same precision, isolates the fit from the float32 kernel rounding of the source's own
    # default (~3e-4 relative on the MultiHyena model, whose outer products amplify it).
    source_model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, rtf_kernel_dtype="float64")
    with torch.no_grad():
        assert rel(load(out)(ids).logits, source_model.eval()(ids).logits) < RTOL


def test_the_sweep_shows_the_filters_are_not_trivially_low_order(exact):
    # Guards the test above: an order-1 fit of these filters is far off, so agreement is not luck.
    for entry in exact[2]["layers"]:
        (one,) = entry["sweep"]
        assert one["order"] == 1
        assert one["rel_error"]["mean"] > 1e-2
        assert entry["rel_error"]["max"] < 1e-5


def check_recurrent_decoding(out, report):
    """Token by token through the cache (40 tokens: past l_max) against one parallel forward."""
    model, ids = load(out), prompt(40, seed=3)
    with torch.no_grad():
        parallel = evaluate.forward_logits(model, ids, "parallel")
        recurrent = evaluate.forward_logits(model, ids, "recurrent")
    assert rel(recurrent, parallel) < RECURRENT_RTOL
    assert report["recurrent_check"]["passed"] is True
    assert report["recurrent_check"]["max_rel_error"] < RECURRENT_RTOL


def test_recurrent_decoding_equals_the_parallel_forward(exact):
    check_recurrent_decoding(*exact[1:])


def test_recurrent_decoding_equals_the_parallel_forward_after_implicit_filters(implicit):
    check_recurrent_decoding(*implicit[1:])


def hyena_state_shapes(model, length: int) -> list:
    with torch.no_grad():
        cache = output_cache(model(prompt(length), use_cache=True))
    return [(s.conv.shape, s.filt.shape) for s in cache.layers if isinstance(s, HyenaState)]


def check_constant_state(out, report):
    model = load(out)
    short, long = hyena_state_shapes(model, 16), hyena_state_shapes(model, 64)
    assert short == long
    # (B, C, 2, slots): a modal filter of order n has ceil(n / 2) slots
    assert [filt[-1] for _, filt in short] == [-(-entry["order"] // 2) for entry in report["layers"]]


def test_the_decoding_state_does_not_grow_with_the_prompt(exact):
    check_constant_state(*exact[1:])


def test_the_decoding_state_does_not_grow_after_implicit_filters(implicit):
    check_constant_state(*implicit[1:])


def test_generate_decodes_greedily(exact):
    model, ids = load(exact[1]), prompt(10, seed=5)
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    assert_greedy(model, generated, ids.shape[1])


def test_implicit_filters_get_orders_chosen_from_the_tolerance(implicit):
    _, out, report = implicit
    orders = [entry["order"] for entry in report["layers"]]
    assert all(1 <= k <= 15 for k in orders)
    assert len(set(orders)) > 1  # these two layers' Hankel spectra fall below 0.05 at different orders
    assert all(entry["hankel_tail"]["max"] <= 0.05 for entry in report["layers"])
    assert json.loads((out / "config.json").read_text())["state_sizes"] == orders
    assert [entry["source_filter"] for entry in report["layers"]] == ["implicit", "implicit"]
    assert report["evaluation"] is None
    assert not (out / "distill_report.json").exists()  # --report put it elsewhere


# ----------------------------------------------------------------------------- report, plot, evaluation


def finite_numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in finite_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in finite_numbers(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def test_the_report_has_every_key_and_finite_numbers(exact):
    _, out, report = exact
    assert {"checkpoint", "output", "settings", "layers", "recurrent_check", "evaluation", "seconds"} <= set(report)
    for entry in report["layers"]:
        assert {"layer", "order", "rel_error", "hankel_tail", "hankel_sv_next", "stored_rel_error"} <= set(entry)
        assert set(entry["rel_error"]) == {"mean", "median", "max"}
    assert all(math.isfinite(x) for x in finite_numbers(report))
    assert (out / "distill_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perplexity_bpb_and_kl_on_the_data(exact, docs):
    source, out, report = exact
    ev = report["evaluation"]
    assert ev["tokens"] > 100
    assert ev["context_length"] == L_MAX
    for model, folder in (("original", source), ("distilled", out)):
        scored = evaluate.evaluate(evaluate.build_parser().parse_args([str(folder), "--data", str(docs)]))
        for key in ("tokens", "bytes", "perplexity", "bits_per_byte"):  # the numbers evaluate_lm.py gives
            assert ev[model][key] == pytest.approx(scored["data"][0][key], rel=1e-6)
    assert ev["distilled"]["perplexity"] == pytest.approx(ev["original"]["perplexity"], rel=1e-4)
    # The same filters, but the distilled model computes its kernel in float64 where the source used
    # float32: logits differ by float32 rounding (~1e-5 relative here), and KL ~ (that)^2 / 2 << 1e-7.
    assert 0 <= ev["kl_nats_per_token"] < 1e-7
    assert ev["top1_agreement"] == 1.0


def test_a_rerun_replaces_an_earlier_distillation(exact, tmp_path):
    source, _, _ = exact
    out = tmp_path / "out"
    assert run(source, out, "--order", 4, "--steps", 0) == 0
    first = (out / "distill_report.json").read_bytes()
    assert run(source, out, "--order", 5, "--steps", 0) == 0
    assert json.loads((out / "config.json").read_text())["state_size"] == 5
    assert (out / "distill_report.json").read_bytes() != first


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_sources(tokenizer_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    attention_only = export(tiny_model(vocab=320, attn_layers=[0, 1]), tokenizer_file, root / "attention_only")
    model = tiny_model(vocab=320)
    with torch.no_grad():
        model.model.layers[1].mixer.filter.b[3, 0] = float("nan")
    nan = export(model, tokenizer_file, root / "nan")
    not_ckpt = root / "not_a_checkpoint"
    not_ckpt.mkdir()
    (not_ckpt / "notes.txt").write_text("hello")
    other = root / "other_architecture"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    good = export(tiny_model(vocab=320), tokenizer_file, root / "good")
    return {"attention_only": attention_only, "nan": nan, "not_ckpt": not_ckpt, "other": other, "good": good}


BAD = {
    "no_hyena_layer": ("attention_only", ["--order", 4], "attn_layers [0, 1] makes all 2 layers attention"),
    "order_at_l_max": ("good", ["--order", L_MAX], "--order 32 is out of range"),
    "order_zero": ("good", ["--order", 0], "--order 0 is out of range"),
    "sweep_too_large": ("good", ["--order", 4, "--sweep", "2,40"], "--sweep 40 is out of range"),
    "nan_filter": ("nan", ["--order", 4], "filter weight model.layers.1.mixer.filter.b is not finite"),
    "not_a_checkpoint": ("not_ckpt", ["--order", 4], "is not a Hugging Face checkpoint folder (no config.json)"),
    "other_architecture": ("other", ["--order", 4], "model_type 'gpt2' is not 'hyena_rtf'"),
    "no_order": ("good", [], "one of the arguments --order --tolerance is required"),
    "missing_data": ("good", ["--order", 4, "--data", "MISSING.jsonl"], "--data MISSING.jsonl not found"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, bad_sources, tmp_path, capsys, monkeypatch):
    source, flags, message = BAD[case]
    monkeypatch.chdir(tmp_path)  # relative paths (MISSING.jsonl) resolve here
    before = listing(tmp_path)
    assert run(bad_sources[source], tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill.py: error: "), err
    assert message in err
    assert "\n" not in err
    assert listing(tmp_path) == before  # no OUT, no lock or staging folder beside it


def test_an_output_holding_other_files_is_refused(bad_sources, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    export_with_a_stray = shutil.copytree(bad_sources["good"], tmp_path / "export")
    (export_with_a_stray / "distill_report.json").write_text("{}")  # the name, but not a report
    before = listing(tmp_path)
    for target in (out, export_with_a_stray, bad_sources["good"]):  # foreign files; the checkpoint itself
        assert run(bad_sources["good"], target, "--order", 4) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"distill.py: error: {target}"), err
        assert "\n" not in err
    assert listing(tmp_path) == before


def test_a_foreign_report_file_is_refused(bad_sources, tmp_path, capsys):
    (tmp_path / "report.json").write_text("{}")
    before = listing(tmp_path)
    assert run(bad_sources["good"], tmp_path / "out", "--order", 4, "--report", tmp_path / "report.json") == 2
    assert "is not a distill.py report" in capsys.readouterr().err
    assert listing(tmp_path) == before


def test_a_fit_that_float32_storage_makes_unstable_is_refused(bad_sources, tmp_path, capsys, monkeypatch):
    """A pole pushed out of the unit circle (as rounding a high-order fit to float32 can do) must
    stop the run before anything is written, not produce a model whose recurrence diverges."""

    def unstable(*args, **kwargs):
        fit = distill_filters(*args, **kwargs)
        fit.a[:] = -1.01  # order 1: the pole is -a_1
        return fit

    monkeypatch.setattr(distill_checkpoint, "distill_filters", unstable)
    before = listing(tmp_path)
    assert run(bad_sources["good"], tmp_path / "out", "--order", 1, "--form", "rtf") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.layers.0.mixer.filter: the order-1 fit has a pole at |p| = 1.01 once stored in float32" in err
    assert listing(tmp_path) == before


def test_a_half_precision_checkpoint_stays_half_precision(tokenizer_file, tmp_path):
    model = tiny_model(vocab=320)
    save_hf_checkpoint(model, tokenizer_file, tmp_path / "ckpt", dtype=torch.bfloat16)
    assert run(tmp_path / "ckpt", tmp_path / "out", "--order", 4) == 0
    dtypes = {k: v.dtype for k, v in load_file(tmp_path / "out" / "model.safetensors").items()}
    assert {d for k, d in dtypes.items() if ".filter." in k} == {torch.float32}  # models/precision.py
    assert {d for k, d in dtypes.items() if ".filter." not in k} == {torch.bfloat16}


@pytest.mark.slow  # an end-to-end command: run once, under the newest transformers
def test_the_command_exits_2_with_one_line(bad_sources, tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "distill.py"), str(bad_sources["good"]), str(tmp_path / "out"), "--order", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ONE_THREAD_ENV,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("distill.py: error: --order 0 is out of range")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, earlier",
    [(".", False), ("config.json", False), ("tokenizer.json", False), ("mine.json", False), ("sub/r.json", False)]
    + [(".", True), ("config.json", True)],
)
def test_a_report_in_the_output_folder_is_refused_before_the_fit(
    bad_sources, tmp_path, capsys, monkeypatch, name, earlier
):
    """The report is written after the checkpoint has replaced OUT: --report OUT/config.json
    overwrote the distilled model's own config (exit 0, a folder that no longer loads) and
    --report OUT failed after the fit naming a temp file. Refused before any work, whether OUT is
    new or an earlier distillation's folder (which is left as it was)."""
    out = tmp_path / "out"
    if earlier:
        assert run(bad_sources["good"], out, "--order", 4, "--steps", 0, "--no-polish") == 0
    monkeypatch.setattr(distill_checkpoint, "fit_layers", lambda *a: pytest.fail("refused only after the fit"))
    report = out if name == "." else out / name
    before = listing(tmp_path)
    capsys.readouterr()
    assert run(bad_sources["good"], out, "--order", 4, "--report", report) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"distill.py: error: --report {report}: "), err
    assert f"the output folder {out}, which receives the distilled checkpoint" in err and "\n" not in err, err
    assert listing(tmp_path) == before


def test_data_made_with_another_tokenizer_is_refused(bad_sources, docs, tmp_path, capsys):
    """--data read as evaluate_lm.py reads it: a token shard of another tokenizer (here a BPE
    trained on the documents, smaller than the model's) is refused, not scored as if its ids were
    the model's."""
    from data_prep.prepare import prepare

    prepare([str(docs)], tmp_path / "other", vocab_size=290, workers=1, val_fraction=0.5, verbose=False)
    before = listing(tmp_path)
    assert run(bad_sources["good"], tmp_path / "out", "--order", 4, "--data", tmp_path / "other") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"distill.py: error: {tmp_path / 'other'} was made with another tokenizer"), err
    assert f"the tokenizer of {bad_sources['good']} " in err and "\n" not in err, err
    assert listing(tmp_path) == before


def test_the_default_report_named_explicitly_is_the_default(bad_sources, tmp_path):
    """--report OUT/distill_report.json is what leaving --report out gives: written, and a rerun
    replaces it with the folder."""
    out = tmp_path / "out"
    for _ in range(2):
        assert run(bad_sources["good"], out, "--order", 4, "--steps", 0, "--report", out / "distill_report.json") == 0
        assert json.loads((out / "distill_report.json").read_text())["kind"] == "Hyena-RTF distillation report"
        assert (out / "distill_report.png").is_file() and (out / "config.json").is_file()
