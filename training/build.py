"""The model and the engine of a run, built from its config.

The model's hyper-parameters are resolved from the config's model section and the data
(training/config.py: `resolve_model_kwargs`), turned into the config of the architecture
`model.arch` names (training/config.py: Hyena-RTF or GPT-NeoX), written back into the config
(the effective config a checkpoint stores), and the model is initialised from train.seed. Its
parameters are float32 in every precision mode: bf16 training is autocast (training/engine.py),
and the long filters stay float32 whatever the engine does to the model (models/precision.py),
which `build_engine` checks.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from models.precision import check_filters_float32
from training import memory
from training.config import (
    BatchPlan,
    ConfigError,
    fill_model_section,
    instantiate,
    model_config,
    resolve_model_kwargs,
    section_values,
)
from training.dist_env import DistEnv
from training.engine import DeepSpeedEngine, Engine, TorchEngine, deepspeed_config
from training.optim import make_optimizer, param_groups
from training.rng import seed_everything
from utils.logs import get_logger


def build_model(
    cfg: DictConfig, vocab_size: int, device: torch.device, kind: str = "single", env: DistEnv | None = None
) -> PreTrainedModel:
    """The model of cfg.model (HyenaRTFForCausalLM, or GPTNeoXForCausalLM for model.arch=gpt_neox)
    for a tokenizer of `vocab_size` tokens, seeded and on `device`; cfg.model is filled with the
    resolved values. ConfigError for an invalid combination, or for a model whose estimated memory
    per process (engine `kind` over the processes of `env`; training/memory.py) exceeds the
    device's."""
    seq_len = cfg.data.seq_len
    kwargs = resolve_model_kwargs(cfg.model, vocab_size, seq_len)
    try:  # (checked when the config was loaded; the data's vocabulary is the one new value here)
        config = model_config(cfg.model.arch, kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid model configuration: {e}") from None
    check_memory(cfg, config, device, kind, env)
    fill_model_section(cfg, section_values(config))
    seed_everything(cfg.train.seed)
    return instantiate(config).to(device)


def check_memory(cfg: DictConfig, model_config, device: torch.device, kind: str, env: DistEnv | None) -> None:
    """ConfigError naming the size keys when even the estimate of training/memory.py (a lower bound
    of the peak) exceeds the memory of `device`: one line before anything is allocated. A model the
    estimate cannot trace is not checked (a warning), rather than refused."""
    world = env.world_size if env else 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if device.type == "cpu" else 1
    zero = cfg.train.zero_stage if kind == "deepspeed" else 0
    batch, seq_len = cfg.train.micro_batch_size, cfg.data.seq_len
    try:
        est = memory.estimate(
            model_config, batch, seq_len, bf16=cfg.train.precision == "bf16", world_size=world, zero_stage=zero
        )
    except Exception as e:  # a safety net, never a reason to stop a run: a model fake tensors cannot trace
        get_logger("train").warning(f"memory estimate unavailable ({type(e).__name__}: {e}); not checked")
        return
    available = memory.device_memory(device, local)
    if est.total > available:
        keys = "model.n_layer, model.d_model" + (
            ", model.multi_hyena_heads" if cfg.model.get("multi_hyena_heads") else ""
        )
        raise ConfigError(
            f"{keys}, train.micro_batch_size={batch}, data.seq_len={seq_len}: the model needs "
            f"{memory.describe(est, batch, seq_len)}, more than the {available / memory.GIB:,.1f} GiB of "
            f"{device.type}; make it smaller"
        )


def build_engine(
    cfg: DictConfig, model: PreTrainedModel, plan: BatchPlan, device: torch.device, env: DistEnv, kind: str
) -> Engine:
    """The engine of `kind` ("single", "ddp", "deepspeed") around `model` and an AdamW with the
    groups of training/optim.py. RuntimeError if a filter parameter is no longer float32."""
    o, t = cfg.optim, cfg.train
    optimizer = make_optimizer(param_groups(model, o.lr, o.rtf_lr, o.weight_decay), betas=(o.beta1, o.beta2), eps=o.eps)
    if kind == "deepspeed":
        extra = OmegaConf.to_container(t.deepspeed, resolve=True)
        ds_cfg = deepspeed_config(plan, t.zero_stage, t.precision, o.grad_clip, extra)
        engine: Engine = DeepSpeedEngine(model, optimizer, plan, device, t.precision, env, ds_cfg, t.strict_fp32)
    else:
        engine = TorchEngine(model, optimizer, plan, device, t.precision, env, o.grad_clip, t.strict_fp32)
    check_filters_float32(engine.module)  # after the engine has wrapped (DeepSpeed: and flattened) it
    return engine
