"""From YAML to a model config, in one module: the typed schema, YAML presets, command-line dot-list
overrides, the model section, the architectures, and every check, made before any data is opened.

A run is configured by three layers merged in this order (later wins):

    schema defaults (the dataclasses below)  <-  YAML preset (--config FILE)  <-  CLI `a.b=value`

The merge goes through OmegaConf *structured* configs, so an unknown key or a value of the wrong
type fails at load time with a `ConfigError` naming the key and where it came from.

The `model` section is not written by hand: its dataclass is derived from the signature of
`HyenaRTFConfig.__init__` (one source of truth for model hyper-parameters), every field made
Optional with default None meaning "not set here". A set `model.preset` (a key of `PRESETS`) fills
the unset fields; the rest fall back to HyenaRTFConfig's own defaults. A preset chosen on the
command line also replaces the sizes the YAML file set (`apply_preset_layer`). `vocab_size` comes from the
data's tokenizer (`resolve_model_kwargs`), and `l_max` defaults to `data.seq_len`. `model.arch`
picks the architecture (below: Hyena-RTF, or GPT-NeoX, which uses only the keys the two share;
`check_arch_keys` says what happens to the others). Choice fields are `Literal` types, checked by
OmegaConf as the layers merge; every other rule is checked once, in `check_values`, when the config
is loaded, before any data is opened.

Batch arithmetic has one source of truth, `resolve_batch`:

    global_batch = micro_batch_size * grad_accum_steps * world_size      (sequences per step)

Give `train.global_batch_size` to keep the optimisation identical whatever the number of
processes: `grad_accum_steps` is then derived (and must divide exactly).

Architectures: the ones a run can train (`model.arch`), and the one mapping from the model section
to each one's Hugging Face config (`model_config`; `instantiate` builds the model).

    model.arch=hyena_rtf   (default) HyenaRTFForCausalLM; every key of the model section applies
    model.arch=gpt_neox    transformers' own GPTNeoXForCausalLM: the Transformer baseline, trained by
                           the same loop, data, schedule, engines, checkpoints and export

GPT-NeoX uses the keys the two architectures share, mapped as

    d_model -> hidden_size                       n_layer -> num_hidden_layers
    n_head -> num_attention_heads                mlp_ratio * d_model -> intermediate_size
    l_max -> max_position_embeddings             dropout -> hidden_dropout and attention_dropout
    vocab_size (the tokenizer's, unpadded), layer_norm_eps, initializer_range,
    tie_word_embeddings, use_cache, bos/eos/pad_token_id -> the same names

A shared key left unset takes HyenaRTFConfig's default, so both architectures have the same width,
depth and heads unless told otherwise; a `model.preset` gives GPT-NeoX its shared keys only. The
embeddings are tied, as in Hyena-RTF, so that parameter counts compare. The rest is fixed as in
Pythia, which are GPTNeoXConfig's own defaults: rotary position embeddings on 25% of each head's
dimensions (base 10000), the parallel residual x + attn(ln1(x)) + mlp(ln2(x)), GELU, biases,
normal(0, initializer_range) init. Attention runs through PyTorch SDPA.

Every other key (HYENA_ONLY_KEYS: state_size, filter, attn_layers, multi_hyena_heads, ...) has no
meaning for GPT-NeoX; `check_arch_keys` refuses one set explicitly together with
model.arch=gpt_neox.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib.util
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedConfig, PreTrainedModel

from models.configuration_hyena_rtf import PRESETS, HyenaRTFConfig
from models.modeling_hyena_rtf import HyenaRTFForCausalLM


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
    engine: Literal["auto", "single", "ddp", "deepspeed"] = "auto"
    zero_stage: Literal[1, 2] = 1  # DeepSpeed ZeRO stage
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast; parameters stay fp32
    strict_fp32: bool = False  # fp32 on CUDA: false lets matmuls use TF32 (Ampere+); true keeps IEEE float32
    device: Literal["auto", "cpu", "cuda"] = "auto"
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


# --------------------------------------------------------------------------------------------
# The model section, derived from HyenaRTFConfig.__init__, and the architectures it configures
# --------------------------------------------------------------------------------------------

_SCALARS = (int, float, bool, str)

# `model.arch`: the architectures a run can train (the module docstring's mapping), and the default.
Arch = Literal["hyena_rtf", "gpt_neox"]
DEFAULT_ARCH = "hyena_rtf"
ARCHS = typing.get_args(Arch)
# Fields the training config adds in front of the model config's parameters.
RESERVED = ("arch", "preset")


def _omegaconf_type(annotation: Any) -> Any:
    """Map a model-config annotation to a type OmegaConf validates, wrapped in Optional.

    Scalars and Literal choices stay typed (so `model.d_model=abc` and `model.filter=rtff` fail at
    load time, naming the key and the choices), list/tuple/Sequence of a scalar become
    List[scalar]; anything OmegaConf cannot check becomes Any.
    """
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation in _SCALARS:
        return Optional[annotation]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _omegaconf_type(args[0])
    if origin in (list, tuple, collections.abc.Sequence):
        elems = [a for a in args if a is not Ellipsis]
        if len(set(elems)) == 1 and elems[0] in _SCALARS:
            return Optional[list[elems[0]]]
        return Optional[list[Any]]
    if origin is typing.Literal:  # OmegaConf checks the choice itself, naming the allowed values
        return Optional[annotation]
    return Any


def model_schema(config_cls: type) -> type:
    """Dataclass with one Optional field (default None) per parameter of `config_cls.__init__`.

    Parameters without a type annotation, *args/**kwargs and `self` are skipped. Two fields are
    added in front: `arch` (default DEFAULT_ARCH) and `preset`.
    """
    hints = typing.get_type_hints(config_cls.__init__)
    fields: list[tuple] = [("arch", Arch, field(default=DEFAULT_ARCH)), ("preset", Optional[str], field(default=None))]
    for name, p in inspect.signature(config_cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name not in hints:
            continue
        if name in RESERVED:
            raise TypeError(f"{config_cls.__name__} has a parameter named {name!r}, which the training config reserves")
        fields.append((name, _omegaconf_type(hints[name]), field(default=None)))
    return dataclasses.make_dataclass("ModelConfig", fields)


def model_defaults(config_cls: type) -> dict[str, Any]:
    """Signature defaults of `config_cls.__init__` (the values used when neither preset nor YAML sets one)."""
    out = {}
    for name, p in inspect.signature(config_cls.__init__).parameters.items():
        if p.default is not inspect.Parameter.empty and name != "self":
            out[name] = list(p.default) if isinstance(p.default, tuple) else p.default
    return out


# Model-section keys GPT-NeoX uses (the mapping is `gpt_neox_config`); every other key is Hyena-only.
SHARED_KEYS = (
    "vocab_size",
    "d_model",
    "n_layer",
    "n_head",
    "mlp_ratio",
    "l_max",
    "layer_norm_eps",
    "dropout",
    "initializer_range",
    "tie_word_embeddings",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_HYENA_DEFAULTS = model_defaults(HyenaRTFConfig)
HYENA_ONLY_KEYS = tuple(k for k in _HYENA_DEFAULTS if k not in SHARED_KEYS)


def gpt_neox_config(kwargs: dict[str, Any]) -> GPTNeoXConfig:
    """The GPTNeoXConfig of resolved model-section values (the module docstring's mapping). Keys
    outside SHARED_KEYS are not read; shared keys missing from `kwargs` take HyenaRTFConfig's
    defaults. ValueError when the heads do not divide the width."""
    v = {k: kwargs[k] if kwargs.get(k) is not None else _HYENA_DEFAULTS[k] for k in SHARED_KEYS}
    if v["d_model"] % v["n_head"]:
        raise ValueError(f"d_model ({v['d_model']}) must be divisible by n_head ({v['n_head']})")
    return GPTNeoXConfig(
        vocab_size=v["vocab_size"],
        hidden_size=v["d_model"],
        num_hidden_layers=v["n_layer"],
        num_attention_heads=v["n_head"],
        intermediate_size=v["mlp_ratio"] * v["d_model"],
        max_position_embeddings=v["l_max"],
        hidden_dropout=v["dropout"],
        attention_dropout=v["dropout"],
        layer_norm_eps=v["layer_norm_eps"],
        initializer_range=v["initializer_range"],
        tie_word_embeddings=v["tie_word_embeddings"],
        use_cache=v["use_cache"],
        # GPTNeoXConfig's own defaults are 0 and 2 (the 20B tokenizer's); the export sets the
        # ids of the run's tokenizer, as it does for Hyena-RTF.
        bos_token_id=v["bos_token_id"],
        eos_token_id=v["eos_token_id"],
        pad_token_id=v["pad_token_id"],
        use_parallel_residual=True,  # Pythia; the rotary fraction and base are left at Pythia's defaults
        attn_implementation="sdpa",
    )


def model_config(arch: str, kwargs: dict[str, Any]) -> PreTrainedConfig:
    """The Hugging Face config of `arch` from resolved model-section values (training/config.py:
    resolve_model_kwargs). ValueError / TypeError for an invalid combination."""
    if arch == "gpt_neox":
        return gpt_neox_config(kwargs)
    if arch == DEFAULT_ARCH:
        return HyenaRTFConfig(**kwargs)
    raise ValueError(f"unknown architecture {arch!r} (choose one of {', '.join(ARCHS)})")


def arch_of(config: PreTrainedConfig) -> str:
    """The `model.arch` of a model config."""
    return "gpt_neox" if isinstance(config, GPTNeoXConfig) else DEFAULT_ARCH


def instantiate(config: PreTrainedConfig) -> PreTrainedModel:
    """A freshly initialised causal LM of `config` (initialised from torch's global generator)."""
    return GPTNeoXForCausalLM(config) if isinstance(config, GPTNeoXConfig) else HyenaRTFForCausalLM(config)


def section_values(config: PreTrainedConfig) -> dict[str, Any]:
    """The model-section values `config` was built from (what the effective config records):
    every key for Hyena-RTF, the shared keys for GPT-NeoX (its Hyena-only keys stay unset)."""
    if isinstance(config, GPTNeoXConfig):
        d = config.hidden_size
        return {
            "vocab_size": config.vocab_size,
            "d_model": d,
            "n_layer": config.num_hidden_layers,
            "n_head": config.num_attention_heads,
            "mlp_ratio": config.intermediate_size // d,
            "l_max": config.max_position_embeddings,
            "layer_norm_eps": config.layer_norm_eps,
            "dropout": config.hidden_dropout,
            "initializer_range": config.initializer_range,
            "tie_word_embeddings": config.tie_word_embeddings,
            "use_cache": config.use_cache,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        }
    out = {}
    for key in _HYENA_DEFAULTS:
        value = getattr(config, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def attention_shape(config: PreTrainedConfig) -> tuple[int, int]:
    """(number of softmax-attention layers, model width): what the attention term of the
    FLOPs-per-token estimate needs (training/metrics.py)."""
    if isinstance(config, GPTNeoXConfig):
        return config.num_hidden_layers, config.hidden_size
    return len(config.attn_layers or []), config.d_model


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


def yaml_line(path: str, dotted: str) -> int | None:
    """The 1-based line of the key `dotted` ("optim.lrr") in the YAML file `path`, or None where it
    cannot be found: OmegaConf keeps no positions, so the file is composed again (PyYAML, which
    OmegaConf reads YAML with) and its mapping nodes walked key by key."""
    try:
        with open(path, encoding="utf-8") as f:
            node = yaml.compose(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    line = None
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def _merge(
    base: DictConfig, other: DictConfig, source: str, schema: DictConfig, yaml_file: str | None = None
) -> DictConfig:
    """OmegaConf.merge with its exceptions turned into ConfigErrors naming key and source (and, for
    the layer read from `yaml_file`, the key's line in it)."""

    def at(key: str) -> str:
        line = yaml_line(yaml_file, key) if yaml_file and key else None
        return source if line is None else f"{source}, line {line}"

    try:
        unset = sorted(OmegaConf.missing_keys(other))
    except OmegaConfBaseException:
        unset = []  # a malformed layer: merging it below names what is wrong
    if unset:  # OmegaConf's "???" (a value still to give) would leave the layer below in place, silently
        raise ConfigError(f"{source}: '{unset[0]}' is '???', which gives no value; give one, or leave the key out")
    for key, node in other.items_ex(resolve=False) if isinstance(other, DictConfig) else ():
        # OmegaConf reports a scalar given for a whole section as "invalid value for 'None': None".
        if key in schema and isinstance(schema[key], DictConfig) and not isinstance(node, (dict, DictConfig)):
            raise ConfigError(f"{at(key)}: '{key}' must be a mapping of keys (e.g. {key}.KEY=VALUE), got {node!r}")
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e)
        raise ConfigError(
            f"{at(key)}: unknown config key '{key}'. Valid keys here: {_valid_keys(schema, key)}"
        ) from None
    except ValidationError as e:
        # e.msg is OmegaConf's first line ("Value 'abc' of type 'str' could not be converted to Integer").
        reason = str(e.msg).splitlines()[0]
        raise ConfigError(f"{at(str(e.full_key or ''))}: invalid value for '{e.full_key}': {reason}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(
    config_file: str | None = None,
    overrides: list[str] | None = None,
    config_cls: type | None = None,
    check_model: bool = True,
) -> DictConfig:
    """Schema <- YAML file <- dot-list overrides, typed and checked. Raises ConfigError.

    overrides: ["optim.lr=3e-4", "train.max_steps=100", ...] (YAML syntax on the right-hand side).
    check_model: False only to read a partial layering that later overrides complete (the
    benchmarks' variants read the depth of their base before the variant's own keys are added); the
    model section's rules are then checked when the full config loads.
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
        cfg = _merge(cfg, loaded, config_file, schema, yaml_file=config_file)
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
    apply_preset_layer(cfg, layers)
    if check_model:
        check_model_section(cfg)
    check_arch_keys(cfg, layers)
    return cfg


def _sets(layer: DictConfig, key: str) -> bool:
    """True when the YAML file or override `layer` gives model.<key> a value (null is no value)."""
    model = layer.get("model")
    return isinstance(model, DictConfig) and model.get(key) is not None


def apply_preset_layer(cfg: DictConfig, layers: list[tuple[int, str, DictConfig]]) -> None:
    """A `model.preset` chosen on the command line sizes the model, even over the YAML file's sizes:
    a key the preset gives (PRESETS) that only the file set is cleared, so the preset fills it
    (configs/default.yaml sets d_model, n_layer, state_size and n_head, which would otherwise shadow
    most of any preset, silently). A key set where the preset was chosen or later (the same file,
    or the command line) stays: the explicit value wins, as it does over any preset. `layers` as in
    `check_arch_keys`."""
    preset = cfg.model.preset
    if preset is None or preset not in PRESETS:  # an unknown one is refused when the model is built
        return
    chosen_in = max(group for group, _, layer in layers if _sets(layer, "preset"))
    for key in PRESETS[preset]:
        if not any(group >= chosen_in for group, _, layer in layers if _sets(layer, key)):
            cfg.model[key] = None


def check_arch_keys(cfg: DictConfig, layers: list[tuple[int, str, DictConfig]]) -> None:
    """Another model.arch than Hyena-RTF has no use for the Hyena-only keys
    (HYENA_ONLY_KEYS). `layers`: (0 for the YAML file, 1 for the command
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
    """Checks OmegaConf's types cannot express (finite numbers, ranges; the choices are Literal
    types, which OmegaConf checks while merging); the model section as a whole is `check_model_section`."""
    check_finite(OmegaConf.to_container(cfg, resolve=True))
    t = cfg.train
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
    for key in ("beta1", "beta2"):
        if not 0.0 <= cfg.optim[key] < 1.0:
            raise ConfigError(f"invalid value for 'optim.{key}': {cfg.optim[key]} (must be in [0, 1))")
    if cfg.optim.eps <= 0:
        raise ConfigError(f"invalid value for 'optim.eps': {cfg.optim.eps} (must be > 0)")
    for key, v in {
        "schedule.decay_steps": cfg.schedule.decay_steps,
        "logging.unigram_max_train_samples": cfg.logging.unigram_max_train_samples,
    }.items():
        if v is not None and v < 1:
            raise ConfigError(f"invalid value for '{key}': {v} (must be >= 1, or null for the default)")
    if not 0.0 <= cfg.schedule.min_lr_ratio <= 1.0:
        raise ConfigError(f"invalid value for 'schedule.min_lr_ratio': {cfg.schedule.min_lr_ratio} (must be in [0, 1])")
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"invalid value for 'train.seed': {t.seed} (must be in [0, 2**32 - 1])")
    check_deepspeed_extra(OmegaConf.to_container(t.deepspeed, resolve=True), t.zero_stage)


def check_model_section(cfg: DictConfig) -> None:
    """The model section's hyper-parameters checked together (the architecture config's own check:
    an RTF order below l_max, heads that divide the width, ...) when the config is loaded, before any
    data is opened. The data's vocabulary is not known yet: an explicit model.vocab_size, else a
    stand-in that every check accepts (the real one replaces it in `resolve_model_kwargs`)."""
    vocab = cfg.model.vocab_size if cfg.model.vocab_size is not None else 1
    seq_len = cfg.data.seq_len
    try:
        config = model_config(cfg.model.arch, resolve_model_kwargs(cfg.model, vocab, seq_len))
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid model configuration: {str(e).splitlines()[0]}") from None
    if isinstance(config, HyenaRTFConfig) and config.filter == "rtf" and seq_len <= config.state_size:
        # The RTF kernel zero-pads its state_size + 1 denominator coefficients to the training
        # length; a shorter length would silently cut them off (modal and implicit filters have no
        # coefficients to cut).
        raise ConfigError(f"data.seq_len={seq_len} must be greater than model.state_size={config.state_size}")


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
    raw.pop("arch", None)  # which class gets these arguments: `model_config`
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
    `values`: model-section key -> value (`section_values`)."""
    for key, value in values.items():
        cfg.model[key] = list(value) if isinstance(value, tuple) else value


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
