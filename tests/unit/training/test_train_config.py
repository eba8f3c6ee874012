"""train.py configuration: typed schema, YAML presets, overrides, clear errors, batch arithmetic,
the generated DeepSpeed JSON, optimizer groups and the schedule. In-process, no training."""

from __future__ import annotations

import importlib.util
import inspect
import math
import re

import pytest
import torch
import torch.nn as nn
from support.train_utils import REPO

import train
from models.configuration_hyena_rtf import PRESETS, HyenaRTFConfig
from models.modeling_hyena_rtf import HyenaRTFForCausalLM
from models.rtf import RTF
from training.config import (
    ConfigError,
    check_optional_packages,
    load_config,
    resolve_batch,
    resolve_model_kwargs,
)
from training.engine import deepspeed_config
from training.optim import lr_factor, param_groups

PRESET_FILES = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml"))

# The model preset each preset file names (None: the model section alone).
PRESET_MODELS = {
    "configs/default.yaml": None,
    "configs/pile_125m.yaml": "125m",
    "configs/pile_355m.yaml": "355m",
    "configs/pile_1.3b.yaml": "1.3b",
}

# (preset file, processes, micro batch, accumulation steps, global batch), worked out by hand from
# the YAML's micro and global batch: accumulation = global / (micro * processes).
PRESET_SPLITS = [
    ("configs/default.yaml", 1, 8, 1, 8),
    ("configs/pile_125m.yaml", 1, 8, 32, 256),
    ("configs/pile_125m.yaml", 8, 8, 4, 256),
    ("configs/pile_125m.yaml", 32, 8, 1, 256),
    ("configs/pile_355m.yaml", 1, 8, 32, 256),
    ("configs/pile_355m.yaml", 8, 8, 4, 256),
    ("configs/pile_355m.yaml", 32, 8, 1, 256),
    ("configs/pile_1.3b.yaml", 1, 4, 128, 512),
    ("configs/pile_1.3b.yaml", 8, 4, 16, 512),
    ("configs/pile_1.3b.yaml", 32, 4, 4, 512),
]

# (preset file, processes, the refusal): a global batch that micro * processes does not divide.
PRESET_REFUSALS = [
    ("configs/default.yaml", 8, "global_batch_size=8 is not a multiple of micro_batch_size * world_size = 8 * 8 = 64"),
    ("configs/default.yaml", 32, "global_batch_size=8 is not a multiple of micro_batch_size * world_size = 8 * 32"),
]


def test_every_preset_file_is_in_the_tables():
    assert sorted(PRESET_MODELS) == PRESET_FILES
    assert {path for path, *_ in PRESET_SPLITS} == set(PRESET_FILES)


@pytest.mark.parametrize("path, preset", PRESET_MODELS.items())
def test_preset_files_name_their_model_preset(path, preset):
    assert load_config(str(REPO / path)).model.preset == preset


def test_the_model_presets_named_exist():
    assert {"125m", "355m", "1.3b"} <= set(PRESETS)


@pytest.mark.parametrize("path, world, micro, accum, global_batch", PRESET_SPLITS)
def test_preset_batch_split(path, world, micro, accum, global_batch):
    plan = resolve_batch(load_config(str(REPO / path)).train, world)
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.world_size) == (micro, accum, world)
    assert plan.global_batch_size == global_batch


@pytest.mark.parametrize("path, world, message", PRESET_REFUSALS)
def test_preset_batch_refused_where_it_does_not_divide(path, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_batch(load_config(str(REPO / path)).train, world)


def test_model_section_is_derived_from_the_model_config_signature():
    cfg = load_config(None)
    params = [
        n
        for n, p in inspect.signature(HyenaRTFConfig.__init__).parameters.items()
        if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    assert list(cfg.model.keys()) == ["arch", "preset", *params]
    assert all(cfg.model[k] is None for k in params)  # None = "not set here"


def test_overrides_are_typed_and_merged_in_order(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 1.0e-3\ntrain:\n  max_steps: 7\nmodel:\n  preset: tiny\n  attn_layers: [1]\n")
    cfg = load_config(str(y), ["optim.lr=3e-4", "model.d_model=48"])
    assert cfg.optim.lr == 3e-4
    assert cfg.train.max_steps == 7
    assert cfg.model.d_model == 48
    kw = resolve_model_kwargs(cfg.model, vocab_size=300, seq_len=64)
    # preset values fill what is unset; explicit values win; vocab from the data; l_max from the preset
    assert kw["n_layer"] == PRESETS["tiny"]["n_layer"]
    assert kw["d_model"] == 48
    assert kw["attn_layers"] == [1]
    assert kw["vocab_size"] == 300
    assert kw["l_max"] == PRESETS["tiny"]["l_max"]
    assert resolve_model_kwargs(load_config(None).model, 300, 64)["l_max"] == 64


def test_a_preset_on_the_command_line_sizes_the_model_over_the_yaml_file(tmp_path):
    """configs/default.yaml sets d_model, n_layer, state_size and n_head; `model.preset=small` on the
    command line gives the preset's sizes (it once gave the file's, with the preset's l_max alone).
    A size set on the command line too wins over the preset; a size set in the same file as the
    preset wins; keys the preset does not give keep the file's values."""

    def sizes(config_file, *overrides):
        return resolve_model_kwargs(load_config(str(config_file), list(overrides)).model, vocab_size=300, seq_len=64)

    kw = sizes(train.DEFAULT_CONFIG, "model.preset=small")
    assert {k: kw[k] for k in PRESETS["small"]} == PRESETS["small"]
    kw = sizes(train.DEFAULT_CONFIG, "model.preset=small", "model.n_layer=3")
    assert (kw["d_model"], kw["n_layer"]) == (PRESETS["small"]["d_model"], 3)
    own = tmp_path / "own.yaml"
    own.write_text("model:\n  preset: small\n  d_model: 96\n  mlp_ratio: 2\n")
    kw = sizes(own)
    assert (kw["d_model"], kw["n_layer"], kw["mlp_ratio"]) == (96, PRESETS["small"]["n_layer"], 2)
    kw = sizes(own, "model.preset=tiny")  # chosen later than the file's d_model: the preset's
    assert (kw["d_model"], kw["mlp_ratio"]) == (PRESETS["tiny"]["d_model"], 2)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["optim.lrr=1e-3"], ["unknown config key 'optim.lrr'", "lr", "rtf_lr", "command-line override"]),
        (["model.dmodel=64"], ["unknown config key 'model.dmodel'", "d_model"]),
        (["optim.lr=fast"], ["'optim.lr'", "fast", "Float"]),
        (["model.n_layer=two"], ["'model.n_layer'", "two", "Integer"]),
        (["train.max_steps=1.5"], ["'train.max_steps'"]),
        (["train.engine=horovod"], ["'train.engine'", "horovod", "deepspeed"]),
        (["train.zero_stage=3"], ["'train.zero_stage'"]),
        (["train.micro_batch_size=0"], ["'train.micro_batch_size'", ">= 1"]),
        (["optim.lr"], ["not of the form"]),
        (["train.out_dir=???"], ["'train.out_dir' is '???', which gives no value"]),  # was dropped silently
    ],
)
def test_config_errors_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for s in expected:
        assert s in str(e.value), str(e.value)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    """A key of the YAML file is named with its line (OmegaConf keeps none: the file is composed
    again), as YAML syntax errors are."""
    y = tmp_path / "bad.yaml"
    y.write_text("optim:\n  lr: 1.0e-3\ntrain:\n  # steps\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line 5: unknown config key 'train.max_step'"):
        load_config(str(y))
    y.write_text("train:\n  max_steps: ten\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line 2: invalid value for 'train.max_steps'"):
        load_config(str(y))
    y.write_text("model: {}\noptim: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line 2: 'optim' must be a mapping of keys"):
        load_config(str(y))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_cli_reports_config_and_data_errors(tmp_path, capsys):
    assert train.main(["optim.betaa=0.9"]) == 2
    assert "unknown config key 'optim.betaa'" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert train.main([f"data.dir={missing}", f"train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "does not exist" in err
    assert "data_prep.prepare" in err


def test_a_value_given_for_a_whole_section_names_the_section(tmp_path, capsys):
    """`optim=3` (or YAML `optim: 3`) said "invalid value for 'None': None"."""
    assert train.main(["optim=3", "--print-config"]) == 2
    assert "'optim' must be a mapping of keys (e.g. optim.KEY=VALUE), got 3" in capsys.readouterr().err
    y = tmp_path / "scalar.yaml"
    y.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match=r"scalar.yaml, line 1: 'optim' must be a mapping of keys"):
        load_config(str(y))


@pytest.mark.parametrize(
    "overrides, package",
    [(["logging.tensorboard=true"], "tensorboard"), (["train.engine=deepspeed"], "deepspeed")],
)
def test_a_missing_optional_package_is_a_config_error(monkeypatch, overrides, package):
    """Whether `package` is installed here or not: find_spec is made to find it, then not."""
    cfg = load_config(None, overrides)
    real = importlib.util.find_spec

    def find_spec(found):
        return lambda name: (object() if found else None) if name == package else real(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec(True))
    check_optional_packages(cfg)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec(False))
    with pytest.raises(ConfigError, match=f"{overrides[0]} needs the {package} package: pip install {package}"):
        check_optional_packages(cfg)
    check_optional_packages(load_config(None))  # nothing optional asked for: nothing needed


def test_vocab_mismatch_and_short_l_max_are_errors():
    cfg = load_config(None, ["model.vocab_size=1000"])
    with pytest.raises(ConfigError, match="model.vocab_size=1000 disagrees with the data's tokenizer, which has 512"):
        resolve_model_kwargs(cfg.model, vocab_size=512, seq_len=64)
    assert resolve_model_kwargs(cfg.model, vocab_size=1000, seq_len=64)["vocab_size"] == 1000
    # Rules of the model section are checked when the config loads, before any data is opened.
    with pytest.raises(ConfigError, match="l_max=32 is smaller than data.seq_len=64"):
        load_config(None, ["model.l_max=32", "data.seq_len=64"])
    with pytest.raises(ConfigError, match="unknown model.preset 'huge'"):
        load_config(None, ["model.preset=huge"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.filter=rtff"], ["'model.filter'", "rtff", "'rtf', 'modal', 'implicit'"]),
        (["model.rtf_init=he"], ["'model.rtf_init'", "'zeros', 'xavier', 'montel'"]),
        (["model.recurrent_dtype=float16"], ["'model.recurrent_dtype'", "'float32', 'float64'"]),
        (["model.arch=llama"], ["'model.arch'", "'hyena_rtf', 'gpt_neox'"]),
        (["model.state_size=300"], ["invalid model configuration", "every RTF order must be in [1, l_max=256)"]),
        (["model.d_model=30", "model.attn_layers=[0]"], ["invalid model configuration", "n_head"]),
        (["model.state_size=300", "model.l_max=512"], ["data.seq_len=256 must be greater than model.state_size=300"]),
        # Out of range: each was a traceback from deep in the model or the optimizer (exit 1, the code
        # of a diverged run) after the run folder had been created, or silently accepted.
        (["model.dropout=5"], ["dropout must be in [0, 1), got 5.0"]),
        (["model.initializer_range=-1"], ["initializer_range must be >= 0"]),
        (["model.pad_vocab_size_multiple=0"], ["pad_vocab_size_multiple must be >= 1, got 0"]),
        (["model.num_a=5"], ["num_a (5) must be >= 1 and divide the 768 filters of a layer"]),
        (["model.mlp_ratio=0"], ["mlp_ratio must be >= 1, got 0"]),
        (["optim.beta1=2"], ["'optim.beta1': 2.0 (must be in [0, 1))"]),
        (["optim.beta2=1.0"], ["'optim.beta2': 1.0 (must be in [0, 1))"]),
        (["optim.eps=0"], ["'optim.eps': 0.0 (must be > 0)"]),
        (["schedule.decay_steps=0"], ["'schedule.decay_steps': 0 (must be >= 1, or null"]),
        (["logging.unigram_max_train_samples=-3"], ["'logging.unigram_max_train_samples': -3"]),
    ],
)
def test_model_section_choices_and_rules_fail_at_load_naming_the_key(overrides, expected):
    """Choice fields are Literal types (one statement each: the model config's signature), checked
    as the config loads; the rules across keys run then too, before any data is opened."""
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    message = str(e.value)
    assert "\n" not in message
    for s in expected:
        assert s in message, message


def test_the_filter_kinds_a_config_may_name_are_the_registry():
    from typing import get_args

    from models.filters import FILTERS, FilterKind

    assert get_args(FilterKind) == tuple(FILTERS)


def test_batch_arithmetic_has_one_source_of_truth():
    t = lambda **kw: load_config(None, [f"train.{k}={v}" for k, v in kw.items()]).train  # noqa: E731
    p = resolve_batch(t(micro_batch_size=4, global_batch_size=32), world_size=2)
    assert (p.micro_batch_size, p.grad_accum_steps, p.global_batch_size) == (4, 4, 32)
    p = resolve_batch(t(micro_batch_size=4, grad_accum_steps=3), world_size=2)
    assert p.global_batch_size == 24
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size"):
        resolve_batch(t(micro_batch_size=4, global_batch_size=30), world_size=2)
    with pytest.raises(ConfigError, match="disagrees with global_batch_size"):
        resolve_batch(t(micro_batch_size=4, global_batch_size=32, grad_accum_steps=2), world_size=2)


def test_deepspeed_json_is_derived_from_the_config():
    cfg = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=16", "optim.grad_clip=0.5"])
    plan = resolve_batch(cfg.train, world_size=4)
    ds = deepspeed_config(plan, 2, "bf16", 0.5, {"zero_optimization": {"overlap_comm": True}})
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    buckets = {"reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, **buckets}
    # bf16 through autocast: parameters (RTF ones included) stay float32; no "bf16" section; no
    # module marked safe for lower precision, so gradients are reduced in float32
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in ds
    assert "torch_autocast" not in deepspeed_config(plan, 1, "fp32", 1.0, {})
    with pytest.raises(ConfigError, match="batch sizes come from"):
        deepspeed_config(plan, 1, "fp32", 1.0, {"train_batch_size": 8})
    with pytest.raises(ConfigError, match="would cast the RTF parameters"):
        deepspeed_config(plan, 1, "fp32", 1.0, {"bf16": {"enabled": True}})
    # the key names match what this DeepSpeed version reads
    from deepspeed.runtime.config import get_torch_autocast_dtype, get_torch_autocast_enabled

    assert get_torch_autocast_enabled(ds)
    assert get_torch_autocast_dtype(ds) == torch.bfloat16


def test_param_groups_rtf_own_lr_and_no_decay_on_norms_biases_embeddings():
    config = HyenaRTFConfig(vocab_size=100, d_model=32, n_layer=2, l_max=64, state_size=4, attn_layers=[1], n_head=2)
    model = HyenaRTFForCausalLM(config)
    groups = {g["name"]: g for g in param_groups(model, lr=6e-4, rtf_lr=1e-3, weight_decay=0.1)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    rtf_params = {id(p) for m in model.modules() if isinstance(m, RTF) for p in m.parameters()}
    assert rtf_params
    assert ids["rtf"] == rtf_params
    assert groups["rtf"]["lr"] == 1e-3
    assert groups["rtf"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["peak_lr"] == groups["no_decay"]["peak_lr"] == 6e-4
    embed = model.get_input_embeddings().weight
    assert id(embed) in ids["no_decay"]
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight is not embed]
    assert norms
    assert linears
    for m in norms:
        assert id(m.weight) in ids["no_decay"]
        assert id(m.bias) in ids["no_decay"]
    for m in linears:
        assert id(m.weight) in ids["decay"]
        assert m.bias is None or id(m.bias) in ids["no_decay"]
    # every trainable parameter exactly once
    all_ids = [i for s in ids.values() for i in s]
    assert len(all_ids) == len(set(all_ids)) == len({id(p) for p in model.parameters()})


def test_warmup_cosine_schedule():
    f = lambda s: lr_factor(s, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
    vals = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert lr_factor(0, 0, 100, 0.0) == pytest.approx(1.0)
    assert not math.isnan(lr_factor(5, 0, 0, 0.0))


@pytest.mark.parametrize(
    "override",
    ["optim.lr=nan", "optim.rtf_lr=inf", "optim.beta2=-inf", "optim.grad_clip=nan", "model.dropout=nan"],
)
def test_non_finite_numbers_are_refused_naming_the_key(override):
    """NaN passes every range check (`nan < 0` is False): without this a NaN lr trained a NaN model."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"invalid value for '{key}'") + ".*finite"):
        load_config(None, [override])


def test_an_unresolvable_interpolation_is_one_error_naming_the_key():
    """`train.out_dir=${train.out_dir}` (a cycle) was a traceback with exit status 1."""
    with pytest.raises(ConfigError, match=r"cannot resolve 'train.out_dir'"):
        load_config(None, ["train.out_dir=${train.out_dir}"])
