"""Two CPU processes under `deepspeed --num_gpus 2` (ZeRO 1) and `torchrun --nproc_per_node 2`
train the tiny model with the same global batch (8 = 2 processes x micro 4) as a single process
accumulating two micro-batches of 4, and must follow its loss curve.

Tolerance. Each step trains on the same 8 sequences in every setting (training/data.py); in float32
the runs differ only in the order of additions: per-rank gradients all-reduced (DDP: bucketed;
ZeRO: flattened partitions) instead of accumulated in one process, the loss averaged over ranks,
and 1 thread per process instead of 2. Measured over the 10 steps (lr 1e-2): loss gaps <= 5e-7,
gradient-norm gaps <= 3e-7 relative, for torchrun, ZeRO 1 and ZeRO 2 (resumed), and <= 2.4e-7 for
ZeRO 2 checkpoints resumed on the same or another number of processes (test_train_elastic.py). We allow 2e-5
absolute on the losses (~6) and 1e-4 relative on the gradient norms: 40x the measured noise, and
still far below what a real error does: another batch changes the step-1 loss by 5e-3 to 1.5e-2
(measured on this corpus), a lost 1/accumulation factor doubles the gradient norm.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from support.train_utils import assert_close, assert_resized, curve, in_process_deepspeed, launch

from models.rtf import RTF
from training import checkpoint as ckpt
from training import engine as engine_mod

pytestmark = pytest.mark.slow


def test_torchrun_ddp_matches_single_process(corpus, reference, tmp_path):
    p = launch("torchrun", corpus, tmp_path)
    assert "engine ddp | 2 process(es)" in p.stderr  # the log
    assert "micro 4 x accum 1 x world 2" in p.stderr
    assert_close(curve(tmp_path), reference)


def test_deepspeed_zero1_matches_single_process_exports_fp32_and_resumes_on_one_process(corpus, reference, tmp_path):
    p = launch("deepspeed", corpus, tmp_path, "checkpoint.export_at_end=true")
    assert "engine deepspeed | 2 process(es)" in p.stderr
    assert_close(curve(tmp_path), reference)
    final = tmp_path / "checkpoints" / "step_00000010"
    # one ZeRO optimizer partition per rank, reassembled into full fp32 weights for the export
    files = os.listdir(final / "deepspeed")
    assert sum("optim_states" in f for f in files) == 2
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    full = ckpt.load_fp32_state_dict(str(final))
    assert exported
    assert all(v.dtype == torch.float32 for v in exported.values())
    # the weights, and besides them only the RTF filters' stored modal form (models/rtf.py)
    stored_form = {k for k in exported if k.endswith((".modal_form", ".modal_stamp"))}
    assert stored_form and not stored_form & full.keys()
    for k in exported.keys() - stored_form:
        assert torch.equal(exported[k], full[k]), k
    # Elastic resume under ZeRO 1 (ZeRO 2: as saved, and both ways, in test_train_elastic.py): steps 9 and 10
    # again, from the step-8 checkpoint of the 2 processes, on 1; same curve.
    step8 = final.parent / "step_00000008"
    p = launch("python", corpus, tmp_path, "train.engine=deepspeed", f"checkpoint.resume={step8}")
    assert_resized(p, step=8, saved_on=2, resumed_on=1)
    assert_close(curve(tmp_path), reference)


def test_deepspeed_engine_bf16_keeps_rtf_fp32_and_skips_nonfinite_steps(corpus, monkeypatch):
    """In this process (one rank, no launcher): bf16 through torch_autocast leaves every RTF
    parameter float32, and ZeRO drops a step whose gradients are non-finite."""
    eng = in_process_deepspeed(monkeypatch, "bf16")
    try:
        batches = [torch.randint(0, 512, (4, 65)) for _ in range(2)]
        rtf = [p for m in eng.module.modules() if isinstance(m, RTF) for p in m.parameters()]
        assert rtf
        assert all(p.dtype == torch.float32 for p in eng.module.parameters())
        res = eng.train_step(batches)
        assert res.applied
        assert all(p.dtype == torch.float32 for p in rtf)
        before = {k: v.clone() for k, v in eng.module.state_dict().items()}
        real = engine_mod.lm_loss
        monkeypatch.setattr(engine_mod, "lm_loss", lambda m, b: real(m, b) * float("nan"))
        res = eng.train_step(batches)
        assert not res.applied
        assert all(torch.equal(before[k], v) for k, v in eng.module.state_dict().items())
        monkeypatch.setattr(engine_mod, "lm_loss", real)
        assert eng.train_step(batches).applied
        assert any(not torch.equal(before[k], v) for k, v in eng.module.state_dict().items())
    finally:
        eng.close()


def test_deepspeed_resume_with_new_optimizer_values_trains_with_them(corpus, tmp_path):
    """DeepSpeed's ZeRO load restores the saved groups' peak lrs and its own gradient clipping:
    a resume with a lower optim.lr and optim.grad_clip must train with the config's values. Both
    resumes follow the same schedule, so the changed one's lrs are the plain one's times new / old."""
    import shutil

    from training.metrics import read_metrics

    first = tmp_path / "first"
    launch("python", corpus, first, "train.engine=deepspeed", "train.stop_after_steps=4")
    plain, changed = tmp_path / "plain", tmp_path / "changed"
    shutil.copytree(first, plain), shutil.copytree(first, changed)
    launch("python", corpus, plain, "train.engine=deepspeed", "train.stop_after_steps=5")
    p = launch(
        "python", corpus, changed, "train.engine=deepspeed", "train.stop_after_steps=5", "optim.lr=1e-4",
        "optim.grad_clip=0.5",
    )  # fmt: skip
    assert "optim.lr: checkpoint 0.01 -> config 0.0001" in p.stderr
    assert "optim.grad_clip: checkpoint 1 -> config 0.5" in p.stderr
    a, b = ([r for r in read_metrics(d / "metrics.jsonl") if r["step"] == 5] for d in (plain, changed))
    assert len(a) == len(b) == 1
    assert b[0]["lr"] == pytest.approx(a[0]["lr"] * 1e-4 / 1e-2, rel=1e-9)
    assert b[0]["loss"] == a[0]["loss"]  # step 5's loss is computed before its update
