"""Numerics that only differ on a GPU cluster, checked through their decisions on the CPU: the
dtype DeepSpeed reduces gradients in (a real `deepspeed.initialize` on the generated config, one
gloo rank), the ZeRO communication settings of every preset, and TF32 for fp32 runs under a
CUDA device that is only named, never used."""

from __future__ import annotations

from pathlib import Path

import deepspeed
import pytest
import torch
from support.train_utils import TINY, in_process_deepspeed

from training.config import load_config, resolve_batch
from training.dist_env import DistEnv
from training.engine import DS_BUCKET_ELEMENTS, TorchEngine, configure_tf32, deepspeed_config

REPO = Path(__file__).resolve().parents[3]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.integration  # a real deepspeed.initialize: seconds
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_deepspeed_reduces_bf16_run_gradients_in_float32(monkeypatch, zero_stage):
    """bf16 autocast under DeepSpeed: one float32 gradient bucket, and every reduction DeepSpeed
    performs in a step is float32 (its default marks Linear/Conv1d parameters, the tied
    embedding/head among them, for a bfloat16 reduction)."""
    eng = engine_mod_deepspeed(monkeypatch, zero_stage)
    try:
        opt = eng.ds.optimizer
        assert set(opt.ipg_buckets) == {torch.float32}
        assert not any(hasattr(p, "comm_dtype") for p in eng.module.parameters())
        assert opt.reduce_bucket_size == DS_BUCKET_ELEMENTS
        seen = []
        real = opt.average_tensor

        def recording(tensor, communication_data_type):
            seen.append((tensor.dtype, communication_data_type))
            return real(tensor, communication_data_type)

        monkeypatch.setattr(opt, "average_tensor", recording)
        assert eng.train_step([torch.randint(0, 512, (4, 65)) for _ in range(2)]).applied
        assert seen and set(seen) == {(torch.float32, torch.float32)}
    finally:
        eng.close()


def engine_mod_deepspeed(monkeypatch, zero_stage):
    # DeepSpeed caches its clone of the world group in a module global, which outlives the process
    # group an earlier engine of this process destroyed on close(); a fresh engine needs it unset.
    monkeypatch.setattr(deepspeed.utils.groups, "_WORLD_GROUP", None)
    return in_process_deepspeed(monkeypatch, "bf16", zero_stage=zero_stage)


def preset_ds_config(path: Path, *overrides: str) -> tuple[int, dict]:
    """(accumulation steps, DeepSpeed JSON) of a preset on 8 GPUs, or on one process for a preset
    whose global batch is a single micro-batch (the CPU default)."""
    cfg = load_config(str(path), list(overrides))
    t = cfg.train
    plan = resolve_batch(t, 8 if (t.global_batch_size or 0) % (8 * t.micro_batch_size) == 0 else 1)
    ds = deepspeed_config(plan, cfg.train.zero_stage, cfg.train.precision, cfg.optim.grad_clip, {})
    return plan.grad_accum_steps, ds


@pytest.mark.parametrize("stage", [None, 1, 2], ids=["as-is", "zero1", "zero2"])
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_overlaps_stage_2_reductions_and_sizes_buckets(preset, stage):
    """ZeRO-2 reduce-scatters gradients at every micro-batch: never without overlap_comm (as the
    preset is, and with train.zero_stage overridden). Buckets stay far below DeepSpeed's
    5e8-element (2 GB) default; bf16 runs reduce in float32."""
    _, ds = preset_ds_config(preset, *([f"train.zero_stage={stage}"] if stage else []))
    zero = ds["zero_optimization"]
    assert zero.get("overlap_comm", False) is (zero["stage"] == 2)
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == DS_BUCKET_ELEMENTS <= 1e8
    if "torch_autocast" in ds:
        assert ds["torch_autocast"]["lower_precision_safe_modules"] == []


def test_the_1_3b_preset_reduces_once_per_step():
    """pile_1.3b accumulates 16 micro-batches on 8 GPUs (8 on 16): ZeRO-1 reduces once per step, at the
    accumulation boundary, where ZeRO-2 would reduce at each micro-batch."""
    accum, ds = preset_ds_config(REPO / "configs" / "pile_1.3b.yaml")
    assert accum == 16 and ds["zero_optimization"]["stage"] == 1


def test_user_settings_still_override_the_generated_ones():
    plan = resolve_batch(load_config(None, TINY).train, 1)
    extra = {"zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 1000}}
    zero = deepspeed_config(plan, 2, "bf16", 1.0, extra)["zero_optimization"]
    assert (zero["overlap_comm"], zero["reduce_bucket_size"], zero["stage"]) == (False, 1000, 2)


@pytest.fixture
def tf32_flags(monkeypatch):
    """torch's TF32 flags restored after the test; NVIDIA_TF32_OVERRIDE unset during it."""
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


CUDA = torch.device("cuda", 0)


def test_fp32_on_cuda_turns_tf32_on(tf32_flags):
    assert configure_tf32(CUDA, "fp32") is True
    assert flags() == (True, True)


def test_strict_fp32_keeps_tf32_off(tf32_flags, monkeypatch):
    torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions
    assert configure_tf32(CUDA, "fp32", strict_fp32=True) is False
    assert flags() == (False, False)
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    assert configure_tf32(CUDA, "fp32") is False
    assert flags() == (False, False)


@pytest.mark.parametrize(("device", "precision"), [(torch.device("cpu"), "fp32"), (CUDA, "bf16")])
def test_cpu_and_bf16_keep_torchs_defaults(tf32_flags, device, precision):
    assert configure_tf32(device, precision) is None
    assert flags() == (False, False)


def test_an_engine_on_a_cuda_device_applies_the_choice(tf32_flags):
    """The engines make the choice themselves (a one-process TorchEngine does not move the model,
    so a CUDA device can be named here without one)."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    plan = resolve_batch(load_config(None, TINY).train, 1)
    env = DistEnv(0, 0, 1, "none")
    eng = TorchEngine(model, opt, plan, CUDA, "fp32", env, 1.0)
    assert eng.tf32 is True and flags() == (True, True)
    eng = TorchEngine(model, opt, plan, CUDA, "fp32", env, 1.0, strict_fp32=True)
    assert eng.tf32 is False and flags() == (False, False)


@pytest.mark.parametrize("strict", [False, True])
def test_train_strict_fp32_reaches_the_engine(tf32_flags, strict):
    """The config key `train.strict_fp32` is what the user sets; build_engine passes it on."""
    from training.build import build_engine

    cfg = load_config(None, [*TINY, f"train.strict_fp32={str(strict).lower()}"])
    model = torch.nn.Linear(2, 2)
    eng = build_engine(cfg, model, resolve_batch(cfg.train, 1), CUDA, DistEnv(0, 0, 1, "none"), "single")
    assert eng.tf32 is (not strict) and flags() == (not strict, not strict)
