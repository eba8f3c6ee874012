"""The model and the engine of a run, built from its config.

The model's hyper-parameters are resolved from the config's model section and the data
(training/config.py: `resolve_model_kwargs`), turned into the config of the architecture
`model.arch` names (training/architectures.py: Hyena-RTF or GPT-NeoX), written back into the config
(the effective config a checkpoint stores), and the model is initialised from train.seed. Its
parameters are float32 in every precision mode: bf16 training is autocast (training/engine.py),
and the long filters stay float32 whatever the engine does to the model (models/precision.py),
which `build_engine` checks.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from hyena_rtf.models.configuration_hyena_rtf import HyenaRTFConfig
from hyena_rtf.models.precision import check_filters_float32
from hyena_rtf.training import architectures
from hyena_rtf.training.config import BatchPlan, ConfigError, fill_model_section, resolve_model_kwargs
from hyena_rtf.training.dist_env import DistEnv
from hyena_rtf.training.engine import DeepSpeedEngine, Engine, TorchEngine, deepspeed_config
from hyena_rtf.training.optim import make_optimizer, param_groups
from hyena_rtf.training.rng import seed_everything


def build_model(cfg: DictConfig, vocab_size: int, device: torch.device) -> PreTrainedModel:
    """The model of cfg.model (HyenaRTFForCausalLM, or GPTNeoXForCausalLM for model.arch=gpt_neox)
    for a tokenizer of `vocab_size` tokens, seeded and on `device`; cfg.model is filled with the
    resolved values. ConfigError for an invalid combination."""
    seq_len = cfg.data.seq_len
    kwargs = resolve_model_kwargs(cfg.model, vocab_size, seq_len)
    try:
        model_config = architectures.model_config(cfg.model.arch, kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid model configuration: {e}") from None
    rtf = isinstance(model_config, HyenaRTFConfig) and model_config.filter == "rtf"
    if rtf and seq_len <= model_config.state_size:  # (modal filters have no coefficients to cut)
        # The RTF kernel zero-pads its state_size + 1 denominator coefficients to the training
        # length; a shorter length would silently cut them off (implicit filters have no order).
        raise ConfigError(f"data.seq_len={seq_len} must be greater than model.state_size={model_config.state_size}")
    fill_model_section(cfg, architectures.section_values(model_config))
    seed_everything(cfg.train.seed)
    return architectures.build(model_config).to(device)


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
        engine: Engine = DeepSpeedEngine(model, optimizer, plan, device, t.precision, env, ds_cfg)
    else:
        engine = TorchEngine(model, optimizer, plan, device, t.precision, env, o.grad_clip)
    check_filters_float32(engine.module)  # after the engine has wrapped (DeepSpeed: and flattened) it
    return engine
