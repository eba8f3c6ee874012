"""Single-process training: exact kill-and-resume, a kill during a checkpoint save, non-finite steps,
clear data errors, metrics, and the HF export loading with AutoModelForCausalLM."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from support.helpers import assert_greedy
from support.train_utils import (
    REPO,
    TINY,
    assert_learned,
    assert_same_run,
    child_env,
    run_cmd,
    run_one_thread,
    torch_threads,
)
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from export.folder import EXPORT_KIND
from export.from_training import model_from_checkpoint
from models.configuration_hyena_rtf import HyenaRTFConfig
from models.modeling_hyena_rtf import HyenaRTFForCausalLM
from training import checkpoint as ckpt
from training import engine as engine_mod
from training.config import load_config, resolve_batch
from training.dist_env import DistEnv
from training.engine import TorchEngine
from training.metrics import read_metrics
from training.optim import make_optimizer, param_groups
from training.trainer import TrainingError, run
from utils.atomic import replace_dir


def tiny(corpus, out_dir, *extra):
    return load_config(None, [*TINY, f"data.dir={corpus}", f"train.out_dir={out_dir}", *extra])


def curve(out_dir):
    recs = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    return [r["step"] for r in recs], [r["loss"] for r in recs], [r["grad_norm"] for r in recs]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted 10-step run (exported at the end)."""
    out = tmp_path_factory.mktemp("ref")
    return out, run_one_thread(tiny(corpus, out, "checkpoint.export_at_end=true", "checkpoint.keep_last=2"))


def test_reference_run_logs_and_keeps_checkpoints(reference):
    out, summary = reference
    steps, losses, norms = curve(out)
    assert_learned(steps, losses)
    rec = read_metrics(out / "metrics.jsonl")[-1]
    assert rec["tokens"] == 10 * 8 * 64
    assert rec["tokens_per_s"] > 0
    assert rec["lr"] > 0
    assert rec["rtf_lr"] > 0
    evals = read_metrics(out / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [5, 10]
    assert evals[-1]["val_ppl"] == pytest.approx(summary["val_ppl"])
    assert summary["unigram_ppl"] > 1.0
    # keep_last=2: periodic step 4 pruned, 8 and the final 10 kept; no partial folders left
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [8, 10]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000008", "step_00000010"]
    final = out / "checkpoints" / "step_00000010"
    saved = load_config(str(final / "config.yaml"))  # the effective config, loadable as a preset
    assert saved.model.vocab_size == 512
    assert saved.model.d_model == 32
    assert saved.model.l_max == 64
    assert {"model.pt", "optimizer.pt", "rng_rank0.pt", "tokenizer.json", "trainer_state.json"} <= set(
        os.listdir(final)
    )
    assert ckpt.read_trainer_state(final)["step"] == 10


def test_interrupted_and_resumed_run_reproduces_losses_exactly(corpus, reference, tmp_path):
    ref_out, _ = reference
    with torch_threads(1):  # as the reference
        first = run(tiny(corpus, tmp_path, "train.stop_after_steps=3"))
        assert first["step"] == 3
        assert "val_loss" not in first
        assert ckpt.latest_checkpoint(tmp_path / "checkpoints").endswith("step_00000003")
        second = run(tiny(corpus, tmp_path))  # checkpoint.resume=auto picks step 3 up
    assert second["step"] == 10
    assert_same_run(tmp_path, ref_out)  # bit for bit: losses, grad norms, evaluations, weights


KILL_DURING_SAVE = """
import os, signal, sys
import training.engine as E
orig = E.TorchEngine.save
def save(self, d):
    orig(self, d)
    if d.endswith("step_00000008"):  # half-written optimizer state, then SIGKILL
        p = os.path.join(d, "optimizer.pt")
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
E.TorchEngine.save = save
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_leaves_previous_checkpoint_loadable(corpus, reference, tmp_path):
    args = [*TINY, f"data.dir={corpus}", f"train.out_dir={tmp_path}"]
    p = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, *args],
        cwd=REPO,
        env=child_env(threads=1),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    root = tmp_path / "checkpoints"
    assert ".tmp-step_00000008" in os.listdir(root)  # the interrupted save
    assert ckpt.latest_checkpoint(root).endswith("step_00000004")  # the previous one is the latest
    run_cmd([sys.executable, "train.py", *args], threads=1)  # resumes from step 4
    assert ".tmp-step_00000008" not in os.listdir(root)
    assert curve(tmp_path) == curve(reference[0])


def _engine(corpus):
    torch.manual_seed(0)
    cfg = tiny(corpus, "unused")
    model = HyenaRTFForCausalLM(HyenaRTFConfig(vocab_size=512, d_model=32, n_layer=2, l_max=64, state_size=4))
    opt = make_optimizer(param_groups(model, 1e-3, 1e-3, 0.1), betas=(0.9, 0.95), eps=1e-8)
    env = DistEnv(0, 0, 1, "none")
    return TorchEngine(model, opt, resolve_batch(cfg.train, 1), torch.device("cpu"), "fp32", env, grad_clip=1.0)


def test_nonfinite_step_is_skipped_without_touching_weights_or_optimizer(corpus, monkeypatch):
    eng = _engine(corpus)
    batches = [torch.randint(0, 512, (4, 65)) for _ in range(2)]
    real = engine_mod.lm_loss
    monkeypatch.setattr(engine_mod, "lm_loss", lambda m, b: real(m, b) * float("nan"))
    before = {k: v.clone() for k, v in eng.module.state_dict().items()}
    res = eng.train_step(batches)
    assert not res.applied
    assert math.isnan(res.loss)
    assert all(torch.equal(before[k], v) for k, v in eng.module.state_dict().items())
    assert eng.optimizer.state_dict()["state"] == {}  # no Adam moment was touched
    assert all(p.grad is None for p in eng.module.parameters())  # the poisoned gradients are gone
    monkeypatch.setattr(engine_mod, "lm_loss", real)
    res = eng.train_step(batches)
    assert res.applied
    assert math.isfinite(res.loss)
    assert res.grad_norm > 0
    assert any(not torch.equal(before[k], v) for k, v in eng.module.state_dict().items())


def test_too_many_nonfinite_steps_stop_with_a_clear_message(corpus, tmp_path, monkeypatch):
    real = engine_mod.lm_loss
    calls = {"n": 0}

    def loss(m, b):  # finite for the first two steps (4 micro-batches), then nan
        calls["n"] += 1
        return real(m, b) * (1.0 if calls["n"] <= 4 else float("inf"))

    monkeypatch.setattr(engine_mod, "lm_loss", loss)
    with pytest.raises(TrainingError, match=r"3 non-finite steps \(limit train.max_nonfinite_steps=3\)"):
        run(tiny(corpus, tmp_path, "train.max_nonfinite_steps=3"))
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 2, 3]
    assert recs[2]["loss"] == "nan"  # no finite loss in that step's window


def test_data_errors_are_clear(corpus, tmp_path, capsys):
    base = [*TINY, f"data.dir={corpus}", f"train.out_dir={tmp_path}"]
    assert train.main([*base, "train.micro_batch_size=4", "train.global_batch_size=4096"]) == 2
    err = capsys.readouterr().err
    assert "too few tokens for one batch" in err
    assert "global_batch_size = 4096" in err
    assert train.main([*base, "model.vocab_size=1000"]) == 2
    assert "model.vocab_size=1000 disagrees with the data's tokenizer, which has 512 tokens" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train.main([*TINY, f"data.dir={tmp_path / 'empty'}", f"train.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err
    assert err.count("data_prep.prepare") == 1, err  # the advice once
    # Data not prepared is refused before the run folder is made (a refusal touches nothing).
    assert train.main([*TINY, f"data.dir={tmp_path / 'empty'}", f"train.out_dir={tmp_path / 'new_run'}"]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "new_run").exists()
    # An export given as data.dir is named as what it is, with no advice to prepare data over it
    # (data_prep would refuse to replace a folder of another kind).
    with replace_dir(tmp_path / "export", EXPORT_KIND):
        pass
    assert train.main([*TINY, f"data.dir={tmp_path / 'export'}", f"train.out_dir={tmp_path / 'new_run'}"]) == 2
    err = capsys.readouterr().err
    assert f"is a {EXPORT_KIND}, not a prepared dataset" in err and "data_prep.prepare" not in err, err


def test_export_loads_with_automodel_and_generates(reference, tmp_path):
    """Exported at the end of training, and again on demand from a checkpoint folder: each loads
    with the Auto classes (from the folder alone: local_files_only), computes the checkpoint's
    logits, tokenizes and decodes as the checkpoint's tokenizer.json, and decodes greedily as
    a full forward per token does."""
    ref_out, _ = reference
    assert train.main(["export", str(ref_out / "checkpoints" / "step_00000008"), str(tmp_path / "hf8")]) == 0
    prompt = "def main(argv=None):\n    return"
    for folder, step in ((ref_out / "hf", 10), (tmp_path / "hf8", 8)):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        ckpt_dir = ref_out / "checkpoints" / f"step_{step:08d}"
        src, _ = model_from_checkpoint(str(ckpt_dir))
        own = Tokenizer.from_file(str(ckpt_dir / "tokenizer.json"))
        ids = tok(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == own.encode(prompt).ids
        assert tok.decode(ids[0]) == prompt  # the exact text back, spaces and newline included
        with torch.no_grad():
            assert torch.equal(model(ids).logits, src(input_ids=ids).logits)
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 8
        assert_greedy(src, out, ids.shape[1])
        new_ids = out[0, ids.shape[1] :]
        assert tok.decode(new_ids) == own.decode(new_ids.tolist())
