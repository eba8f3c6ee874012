"""Typed training configuration: dataclass schema, YAML presets, command-line dot-list overrides.

A run is configured by three layers merged in this order (later wins):

    schema defaults (the dataclasses below)  <-  YAML preset (--config FILE)  <-  CLI `a.b=value`

The merge goes through OmegaConf *structured* configs, so an unknown key or a value of the wrong
type fails at load time with a `ConfigError` naming the key and where it came from.

The `model` section is not written by hand: its dataclass is derived from the signature of
`HyenaRTFConfig.__init__` (one source of truth for model hyper-parameters), every field made
Optional with default None meaning "not set here". A set `model.preset` (a key of `PRESETS`) fills
the unset fields; the rest fall back to HyenaRTFConfig's own defaults. `vocab_size` comes from the
data's tokenizer (`resolve_model_kwargs`), and `l_max` defaults to `data.seq_len`. `model.arch`
picks the architecture (training/architectures.py: Hyena-RTF, or GPT-NeoX, which uses only the
keys the two share; `check_arch_keys` says what happens to the others).

Batch arithmetic has one source of truth, `resolve_batch`:

    global_batch = micro_batch_size * grad_accum_steps * world_size      (sequences per step)

Give `train.global_batch_size` to keep the optimisation identical whatever the number of
processes: `grad_accum_steps` is then derived (and must divide exactly).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from models.configuration_hyena_rtf import PRESETS, HyenaRTFConfig
from training.architectures import ARCHS, HYENA_ONLY_KEYS
from training.model_schema import DEFAULT_ARCH, model_schema


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says which key and why."""


# --------------------------------------------------------------------------------------------
# Hand-written sections (everything except the model)
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    dir: str = "data/default"  # output folder of data_prep (token shards + tokenizer + manifest)
    seq_len: int = 256  # tokens per training sample (each sample holds seq_len + 1 tokens)
    eval_samples: int | None = None  # validation samples per evaluation (>= 1); None = whole split


@dataclass
class OptimConfig:
    lr: float = 6e-4  # peak lr of the non-RTF parameters
    rtf_lr: float = 1e-3  # peak lr of the RTF filter parameters (their own group, weight decay 0)
    weight_decay: float = 0.1  # applied to matrices only (see training/optim.py)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad L2 norm; 0 disables clipping


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100  # linear warmup from lr/warmup_steps to lr
    decay_steps: int | None = None  # end of the cosine; None = train.max_steps
    min_lr_ratio: float = 0.1  # lr at the end of the cosine, as a fraction of the peak


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"  # checkpoints/, metrics.jsonl, hf/ (export) live here
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 8  # sequences per process per forward/backward
    grad_accum_steps: int | None = None  # None: derived from global_batch_size (or 1)
    global_batch_size: int | None = None  # sequences per optimizer step, all processes
    seed: int = 1234  # model init and data order; 0 .. 2**32 - 1 (numpy's seed range)
    engine: str = "auto"  # auto | single | ddp | deepspeed
    zero_stage: int = 1  # DeepSpeed ZeRO stage: 1 or 2
    precision: str = "fp32"  # fp32 | bf16 (autocast; parameters stay fp32)
    strict_fp32: bool = False  # fp32 on CUDA: false lets matmuls use TF32 (Ampere+); true keeps IEEE float32
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 200  # steps between validation passes (0: only at the end)
    # Stop after this many skipped non-finite steps in one run; >= 1. A non-finite step can never be
    # applied, so 1 already means "stop at the first"; 0 is refused rather than read as "no limit".
    max_nonfinite_steps: int = 20
    stop_after_steps: int | None = None  # save a checkpoint and exit after this step (a planned interruption)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra keys merged into the generated DeepSpeed JSON


@dataclass
class LoggingConfig:
    log_every: int = 10  # steps per JSONL record / console line (the loss is averaged over them)
    progress_bar: bool = True
    tensorboard: bool = False  # needs the `tensorboard` package
    unigram_baseline: bool = True  # print the add-one unigram perplexity of the validation tokens
    unigram_max_train_samples: int | None = 200_000  # train samples counted for it (None: all)


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between periodic checkpoints (0: only the final one)
    keep_last: int = 3  # periodic checkpoints kept (older ones are deleted)
    resume: str = "auto"  # auto (latest in out_dir, if any) | none | PATH to a checkpoint dir
    export_at_end: bool = True  # write an HF checkpoint to export_dir after the final step
    export_dir: str | None = None  # None: OUT_DIR/hf


ENGINES = ("auto", "single", "ddp", "deepspeed")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


# --------------------------------------------------------------------------------------------
# The model section, derived from HyenaRTFConfig.__init__ (training/model_schema.py)
# --------------------------------------------------------------------------------------------


@functools.cache
def build_schema(config_cls: type | None = None) -> type:
    """The full training-config dataclass; `config_cls` defaults to HyenaRTFConfig."""
    model_cls = model_schema(config_cls or HyenaRTFConfig)
    sections = [
        ("model", model_cls, field(default_factory=model_cls)),
        ("data", DataConfig, field(default_factory=DataConfig)),
        ("optim", OptimConfig, field(default_factory=OptimConfig)),
        ("schedule", ScheduleConfig, field(default_factory=ScheduleConfig)),
        ("train", TrainConfig, field(default_factory=TrainConfig)),
        ("logging", LoggingConfig, field(default_factory=LoggingConfig)),
        ("checkpoint", CheckpointConfig, field(default_factory=CheckpointConfig)),
    ]
    return dataclasses.make_dataclass("TrainingRunConfig", sections)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _valid_keys(schema: DictConfig, dotted: str) -> str:
    """Comma-separated keys of the section that should have contained `dotted`."""
    node = schema
    for part in dotted.split(".")[:-1]:
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            break
    return ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else ""


def _merge(base: DictConfig, other: DictConfig, source: str, schema: DictConfig) -> DictConfig:
    """OmegaConf.merge with its exceptions turned into ConfigErrors naming key and source."""
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e)
        raise ConfigError(
            f"{source}: unknown config key '{key}'. Valid keys here: {_valid_keys(schema, key)}"
        ) from None
    except ValidationError as e:
        # e.msg is OmegaConf's first line ("Value 'abc' of type 'str' could not be converted to Integer").
        raise ConfigError(f"{source}: invalid value for '{e.full_key}': {str(e.msg).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(
    config_file: str | None = None, overrides: list[str] | None = None, config_cls: type | None = None
) -> DictConfig:
    """Schema <- YAML file <- dot-list overrides, typed and checked. Raises ConfigError.

    overrides: ["optim.lr=3e-4", "train.max_steps=100", ...] (YAML syntax on the right-hand side).
    """
    schema = OmegaConf.structured(build_schema(config_cls))
    cfg = schema
    layers: list[tuple[int, str, DictConfig]] = []  # (0: the file, 1: the command line; source; what it set)
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file not found: {config_file}")
        try:
            loaded = OmegaConf.load(config_file)
        except Exception as e:  # yaml.YAMLError and friends
            raise ConfigError(f"{config_file}: not valid YAML: {e}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{config_file}: the top level must be a mapping of sections")
        cfg = _merge(cfg, loaded, config_file, schema)
        layers.append((0, config_file, loaded))
    for item in overrides or []:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"command-line override '{item}' is not of the form section.key=value")
        try:
            dot = OmegaConf.from_dotlist([item])
        except Exception as e:
            raise ConfigError(f"command-line override '{item}': {e}") from None
        cfg = _merge(cfg, dot, f"command-line override '{item}'", schema)
        layers.append((1, f"command-line override '{item}'", dot))
    resolve_all(cfg)
    check_values(cfg)
    check_arch_keys(cfg, layers)
    return cfg


def _sets(layer: DictConfig, key: str) -> bool:
    """True when the YAML file or override `layer` gives model.<key> a value (null is no value)."""
    model = layer.get("model")
    return isinstance(model, DictConfig) and model.get(key) is not None


def check_arch_keys(cfg: DictConfig, layers: list[tuple[int, str, DictConfig]]) -> None:
    """Another model.arch than Hyena-RTF has no use for the Hyena-only keys
    (training/architectures.py: HYENA_ONLY_KEYS). `layers`: (0 for the YAML file, 1 for the command
    line; its source; what it set), in merge order.

    A Hyena-only key set where the architecture was chosen or later (the same YAML file, or the
    command line) is a ConfigError naming it. One set in the YAML file when the command line
    chose the architecture belongs to a config written for Hyena-RTF (configs/default.yaml sets
    model.state_size), so `python train.py model.arch=gpt_neox` clears it (the effective config
    then shows it unset) rather than make every Hyena key of the file be undone by hand."""
    arch = cfg.model.arch
    if arch == DEFAULT_ARCH:
        return
    chosen_in = max(group for group, _, layer in layers if _sets(layer, "arch"))
    for key in HYENA_ONLY_KEYS:
        setters = [(group, source) for group, source, layer in layers if _sets(layer, key)]
        if not setters:
            continue
        group, source = setters[-1]
        if group >= chosen_in:
            raise ConfigError(
                f"{source}: model.{key} is a Hyena-RTF setting, which model.arch={arch} does not use; remove it"
            )
        cfg.model[key] = None


def _choice(value: str, allowed: tuple, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"invalid value for '{key}': {value!r} (choose one of {', '.join(allowed)})")


def resolve_all(cfg: DictConfig) -> None:
    """ConfigError, one line naming the key, for an interpolation that cannot be resolved (a cycle
    such as `train.out_dir=${train.out_dir}`, a missing key), before anything reads the config."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(f"cannot resolve '{getattr(e, 'full_key', None) or '?'}': {reason}") from None


def check_finite(node, path: str = "") -> None:
    """ConfigError naming the first float setting that is NaN or infinite, anywhere in the config: a
    comparison such as `lr < 0` is False for NaN, so range checks alone let it through (and a NaN
    learning rate trains a NaN model that exits 0)."""
    if isinstance(node, dict):
        for key, value in node.items():
            check_finite(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_finite(value, f"{path}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"invalid value for '{path}': {node} (must be a finite number)")


def check_values(cfg: DictConfig) -> None:
    """Checks OmegaConf's types cannot express (finite numbers, choices, ranges)."""
    check_finite(OmegaConf.to_container(cfg, resolve=True))
    t = cfg.train
    _choice(cfg.model.arch, ARCHS, "model.arch")
    _choice(t.engine, ENGINES, "train.engine")
    _choice(t.precision, PRECISIONS, "train.precision")
    _choice(t.device, DEVICES, "train.device")
    if t.zero_stage not in (1, 2):
        raise ConfigError(f"invalid value for 'train.zero_stage': {t.zero_stage} (supported: 1, 2)")
    positive = {
        "train.max_steps": t.max_steps,
        "train.micro_batch_size": t.micro_batch_size,
        "data.seq_len": cfg.data.seq_len,
        "logging.log_every": cfg.logging.log_every,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
    }
    for opt in ("grad_accum_steps", "global_batch_size", "stop_after_steps"):
        if t[opt] is not None:
            positive[f"train.{opt}"] = t[opt]
    if cfg.data.eval_samples is not None:
        positive["data.eval_samples"] = cfg.data.eval_samples
    if t.max_nonfinite_steps < 1:
        raise ConfigError(
            f"invalid value for 'train.max_nonfinite_steps': {t.max_nonfinite_steps} (must be >= 1; "
            f"1 stops at the first non-finite step, there is no 'unlimited')"
        )
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"invalid value for '{key}': {v} (must be >= 1)")
    for key, v in {
        "optim.lr": cfg.optim.lr,
        "optim.rtf_lr": cfg.optim.rtf_lr,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip,
        "schedule.warmup_steps": cfg.schedule.warmup_steps,
        "train.eval_every": t.eval_every,
        "checkpoint.every": cfg.checkpoint.every,
    }.items():
        if v < 0:
            raise ConfigError(f"invalid value for '{key}': {v} (must be >= 0)")
    if not 0.0 <= cfg.schedule.min_lr_ratio <= 1.0:
        raise ConfigError(f"invalid value for 'schedule.min_lr_ratio': {cfg.schedule.min_lr_ratio} (must be in [0, 1])")
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"invalid value for 'train.seed': {t.seed} (must be in [0, 2**32 - 1])")
    check_deepspeed_extra(OmegaConf.to_container(t.deepspeed, resolve=True), t.zero_stage)


def check_deepspeed_extra(extra: dict, zero_stage: int) -> None:
    """train.deepspeed is merged into the generated DeepSpeed JSON last, so it could undo what the
    config decided: the batch keys (`resolve_batch` alone decides them), bf16/fp16 casts (they would
    cast the RTF parameters) and the ZeRO stage (only 1 and 2 are supported: `train.zero_stage`)."""
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in extra:
            raise ConfigError(
                f"train.deepspeed.{key} is not allowed: batch sizes come from train.micro_batch_size, "
                f"train.grad_accum_steps / train.global_batch_size and the number of processes"
            )
    for key in ("bf16", "fp16"):
        if isinstance(extra.get(key), dict) and extra[key].get("enabled"):
            raise ConfigError(
                f"train.deepspeed.{key} is not allowed: it would cast the RTF parameters; "
                f"use train.precision=bf16 (autocast)"
            )
    zero = extra.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError("train.deepspeed.zero_optimization must be a mapping of ZeRO options")
    if "stage" in zero and str(zero["stage"]) != str(zero_stage):
        raise ConfigError(
            f"train.deepspeed.zero_optimization.stage={zero['stage']} is not allowed: set the stage "
            f"with train.zero_stage (supported: 1, 2)"
        )


def check_optional_packages(cfg: DictConfig) -> None:
    """Fail on every rank, before any work, when an enabled option needs a missing package."""
    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard")
    if cfg.train.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("train.engine=deepspeed needs the deepspeed package: pip install deepspeed")


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's sequences are split. global_batch = micro * accum * world."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size


def resolve_batch(train: DictConfig, world_size: int) -> BatchPlan:
    """The one place where micro batch, accumulation, world size and global batch are reconciled."""
    micro, accum, glob = train.micro_batch_size, train.grad_accum_steps, train.global_batch_size
    if glob is None:
        return BatchPlan(micro, accum or 1, world_size)
    per_step = micro * world_size
    if glob % per_step:
        raise ConfigError(
            f"train.global_batch_size={glob} is not a multiple of micro_batch_size * world_size = "
            f"{micro} * {world_size} = {per_step}"
        )
    if accum is not None and accum != glob // per_step:
        raise ConfigError(
            f"train.grad_accum_steps={accum} disagrees with global_batch_size={glob} = micro_batch_size "
            f"{micro} * world_size {world_size} * accumulation {glob // per_step}; set only one of them"
        )
    return BatchPlan(micro, glob // per_step, world_size)


def resolve_model_kwargs(
    model_cfg: DictConfig,
    vocab_size: int,
    seq_len: int,
    presets: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for HyenaRTFConfig: preset values, then explicitly set fields, then data facts.

    vocab_size: the tokenizer's; an explicit model.vocab_size that disagrees is an error.
    seq_len: the training length; l_max defaults to it and may not be smaller.
    """
    presets = PRESETS if presets is None else presets
    raw = OmegaConf.to_container(model_cfg, resolve=True)
    raw.pop("arch", None)  # which class gets these arguments: training/architectures.py
    preset = raw.pop("preset")
    kwargs: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"unknown model.preset {preset!r} (choose one of {', '.join(presets)})")
        kwargs.update(presets[preset])
    kwargs.update({k: v for k, v in raw.items() if v is not None})
    if kwargs.get("vocab_size") is not None and kwargs["vocab_size"] != vocab_size:
        raise ConfigError(
            f"model.vocab_size={kwargs['vocab_size']} disagrees with the data's tokenizer, which has "
            f"{vocab_size} tokens; remove model.vocab_size (it is taken from the data) or use matching data"
        )
    kwargs["vocab_size"] = vocab_size
    if kwargs.get("l_max") is None:
        kwargs["l_max"] = seq_len
    elif kwargs["l_max"] < seq_len:
        raise ConfigError(f"model.l_max={kwargs['l_max']} is smaller than data.seq_len={seq_len}")
    return kwargs


def fill_model_section(cfg: DictConfig, values: dict[str, Any]) -> None:
    """Write the resolved model hyper-parameters back into cfg.model (the effective config);
    `values`: model-section key -> value (training/architectures.py: section_values)."""
    for key, value in values.items():
        cfg.model[key] = list(value) if isinstance(value, tuple) else value


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
