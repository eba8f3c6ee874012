"""Laughing Hyena distillation of a checkpoint folder: a Hyena-RTF Hugging Face checkpoint in (implicit
filters, or RTF filters of a higher order; Hyena or MultiHyena mixers), a model whose every long
filter is a low-order modal system (or RTF, `form="rtf"`) out, with a report of what was lost.
distill.py is the command line.

What it does, in order; nothing is written before every check has passed:

1. Checks the input (a Hyena-RTF folder with at least one Hyena layer and a tokenizer.json), the
   orders (1 <= order < l_max), the output folder (see `check_target`) and the report path, and
   reads the evaluation data, before loading the model.
2. Finds the long filter of every mixer (the attribute models/precision.FILTER_MODULE of each
   Hyena or MultiHyena operator) and refuses non-finite weights or taps.
3. Fits the distinct filters of each layer (distillation/fit.py: `filter_bank_taps` gives the
   l_max taps the layer trains and scores with; `distill_modal` fits poles and residues,
   `distill_filters` RTF coefficients; at `order` or at the smallest order whose Hankel
   singular-value tail is below `tolerance`).
4. Builds the distilled model (`distilled_config`): the same config but filter="modal" (or "rtf",
   then rtf_constraint="none" and rtf_kernel_dtype="float64"),
   num_a=None and state_sizes = the fitted order per layer (attention layers get the largest
   order as a placeholder, and state_size is that largest order); filter_heads and
   multi_hyena_heads stay, so each new filter bank has as many distinct filters as the old one.
   Every non-filter weight is copied, every new filter gets its fit (`load_into`), and a fit whose
   stored float32 parameters have a pole on or outside the unit circle is refused.
5. Checks that the distilled model's recurrent decoding gives its parallel logits (relative
   RECURRENT_RTOL; a failure writes nothing unless `force`) and, with data, scores both models on
   the same windows (evaluation/scoring.py): perplexity, bits per byte, and KL(original ||
   distilled) of the next-token distributions.
6. Writes the checkpoint with export/folder.save_hf_checkpoint (its replace rules), then the JSON
   report and the PNG plot, each atomically.

Error against order (the report's `hankel_tail_by_order` and the plot, `plot_report`): per layer,
the relative Hankel tail of the worst filter for every order k up to --max-order. It is free (the
fit computes the Hankel spectrum anyway), it is what --tolerance is compared with, and it bounds
from below the Hankel-weighted error of any order-k fit (distillation/fit.py), so it shows at a
glance how far a layer can be compressed. On it: the worst relative tap error of the actual fit
at the chosen order and, with `sweep`, of one more fit per listed order (each costs one more fit of
every layer). The tap error is of the same size as the tail, not bounded by it (another norm).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from safetensors import safe_open
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers.utils import logging as hf_logging

from distillation.fit import (
    R_MAX,
    FilterFit,
    ModalFit,
    distill_filters,
    distill_modal,
    filter_bank_taps,
    memory_error,
)
from evaluation.scoring import (
    check_device,
    check_vocabulary,
    default_context_length,
    document_windows,
    forward_logits,
    load_config,
    load_documents,
    load_model,
    scored_logits,
    start_token_id,
    summarize,
    window_batches,
)
from export.folder import check_export_target, save_hf_checkpoint
from hf.loading import check_model_folder, load_tokenizer
from models.configuration_hyena_rtf import HyenaRTFConfig
from models.hf_compat import cache_kwargs, output_cache
from models.modeling_hyena_rtf import HyenaRTFForCausalLM
from models.precision import FILTER_MODULE, is_filter_param
from models.rtf import fft_length
from utils.atomic import is_json_report, write_bytes, write_text
from utils.logs import ROOT, get_logger

log = get_logger("distill")

REPORT_KIND = "Hyena-RTF distillation report"
REPORT_NAME, PLOT_NAME = "distill_report.json", "distill_report.png"  # the defaults, inside the output folder
RECURRENT_RTOL = 1e-4  # recurrent vs parallel logits of the distilled model, relative to max |logit|
CHECK_PAST_L_MAX = 32  # the check's prompt runs this many tokens past l_max
CHECK_STEPS = 48  # of which the last CHECK_STEPS are decoded token by token
FORMS = ("modal", "rtf")


class DistillError(ValueError):
    """A user-facing problem (bad input, bad value, output in the way): one line, exit status 2."""


@dataclass
class Options:
    """Everything distill.py's flags set; see distill.py --help."""

    checkpoint: Path
    out: Path
    order: int | None = None
    tolerance: float | None = None
    form: str = "modal"
    force: bool = False
    max_order: int = 64
    steps: int = 300
    polish: bool = True
    max_pole_radius: float = R_MAX
    sweep: list[int] = field(default_factory=list)
    data: list[Path] = field(default_factory=list)
    max_documents: int | None = None
    max_tokens: int | None = None
    context_length: int | None = None
    stride: int | None = None
    batch_size: int = 8
    device: str = "cpu"
    report: Path | None = None
    overwrite: bool = False

    @property
    def report_path(self) -> Path:
        return self.report if self.report is not None else self.out / REPORT_NAME

    @property
    def plot_path(self) -> Path:
        return self.report_path.with_suffix(Path(PLOT_NAME).suffix)


@dataclass
class LayerFit:
    """One layer's long filter and what distillation made of it."""

    layer: int
    module: str  # state-dict prefix of the filter, e.g. model.layers.0.mixer.filter
    source: torch.nn.Module  # the original filter
    taps: torch.Tensor  # (num_filters, l_max) float64, what was fitted
    fit: FilterFit | ModalFit
    sweep: dict[int, FilterFit | ModalFit] = field(default_factory=dict)


# ----------------------------------------------------------------------------- checks before any work


def check_source(checkpoint: Path) -> HyenaRTFConfig:
    """The checkpoint's config, or DistillError: not a folder with a valid config.json (LoadError),
    not Hyena-RTF, no Hyena layer, no tokenizer.json."""
    check_model_folder(checkpoint)
    config = load_config(checkpoint)
    if not isinstance(config, HyenaRTFConfig):
        raise DistillError(
            f"{checkpoint / 'config.json'}: model_type {getattr(config, 'model_type', None)!r} is not "
            f"{HyenaRTFConfig.model_type!r}; only Hyena-RTF checkpoints can be distilled"
        )
    if not hyena_layers(config):
        raise DistillError(
            f"{checkpoint / 'config.json'}: attn_layers {config.attn_layers} makes all {config.n_layer} layers "
            "attention; there is no Hyena filter to distil"
        )
    if not (checkpoint / "tokenizer.json").is_file():
        raise DistillError(f"{checkpoint} has no tokenizer.json (the distilled model is saved with it)")
    return config


def hyena_layers(config: HyenaRTFConfig) -> list[int]:
    return [i for i in range(config.n_layer) if i not in config.attn_layers]


def check_options(opts: Options, config: HyenaRTFConfig, where: Path) -> None:
    """Every order asked for must be a valid RTF order of this model (1 <= order < l_max), every
    count positive, the device there."""
    counts = ("max_order", "batch_size", "max_documents", "max_tokens", "context_length", "stride")
    for name, low in [(name, 1) for name in counts] + [("steps", 0)]:
        value = getattr(opts, name)
        if value is not None and value < low:
            raise DistillError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    for flag, k in [("--order", opts.order)] * (opts.order is not None) + [("--sweep", k) for k in opts.sweep]:
        if not 1 <= k < config.l_max:
            raise DistillError(
                f"{flag} {k} is out of range: an RTF order must be in [1, l_max) = [1, {config.l_max}) "
                f"(l_max of {where / 'config.json'})"
            )
    if opts.form not in FORMS:
        raise DistillError(f"--form must be one of {FORMS}, got {opts.form!r}")
    for name in ("tolerance", "max_pole_radius"):
        value = getattr(opts, name)
        if value is not None and not (math.isfinite(value) and 0 < value < 1):
            raise DistillError(f"--{name.replace('_', '-')} must be in (0, 1), got {value}")
    if opts.report_path.suffix == ".png":
        raise DistillError(f"--report {opts.report_path}: the plot goes beside the report as .png; name it .json")
    check_device(opts.device)


def check_target(opts: Options) -> None:
    """The output folder may receive the distilled checkpoint: save_hf_checkpoint's rule (absent,
    empty, or an earlier Hyena-RTF export holding only an export's files, or anything with
    --overwrite), where an earlier distillation's report files count as the export's own; never the
    checkpoint being read. An explicit --report file that exists must be an earlier report, and it
    may not be in the output folder (`check_report_outside`)."""
    if opts.out.resolve() == opts.checkpoint.resolve():
        raise DistillError(f"{opts.out} is the checkpoint being distilled; choose another output folder")
    check_report_outside(opts)
    check_export_target(opts.out, opts.overwrite, also_owned=earlier_report_files(opts))
    if opts.report is None or opts.overwrite:
        return
    for path in (opts.report_path, opts.plot_path):
        if path.is_dir():
            raise DistillError(f"--report: {path} is a folder")
    if (opts.report_path.exists() or opts.plot_path.exists()) and not is_report(opts.report_path):
        raise DistillError(
            f"--report: {opts.report_path} (or its .png) exists and is not a distill.py report; "
            "pass --overwrite to replace it, or choose another path"
        )


def check_report_outside(opts: Options) -> None:
    """DistillError when --report or its .png is the output folder or lies inside it, other than
    as the default pair (distill_report.json/.png, what leaving --report out gives).

    The report is written after the checkpoint has replaced the folder, so a name of the
    checkpoint's own (OUT/config.json, OUT/tokenizer.json) would overwrite that file, and the
    folder itself fails only after the fit; any other name would be a file the export's stamp does
    not list, which makes the next run refuse the folder."""
    if opts.report is None:
        return
    out = opts.out.resolve()
    for path in (opts.report_path, opts.plot_path):
        resolved = path.resolve()
        if resolved.parent == out and resolved.name in (REPORT_NAME, PLOT_NAME):
            continue
        if resolved == out or out in resolved.parents:
            where = "is" if resolved == out else "lies inside"
            raise DistillError(
                f"--report {opts.report}: {path} {where} the output folder {opts.out}, which receives the "
                f"distilled checkpoint; name a file outside it, or leave --report out to write {REPORT_NAME} there"
            )


def earlier_report_files(opts: Options) -> tuple[str, ...]:
    """The names of an earlier run's report and plot inside the output folder, if its report is
    one: the default pair, the only one a report may have there (`check_report_outside`)."""
    return (REPORT_NAME, PLOT_NAME) if is_report(opts.out / REPORT_NAME) else ()


def is_report(path: Path) -> bool:
    return is_json_report(path, REPORT_KIND)


def check_data(opts: Options, tokenizer, config) -> tuple[dict, int, int]:
    """{path: Documents} of every --data input (read as evaluate_lm.py reads them), the context
    length and the stride of the windows."""
    for path in opts.data:
        if not path.exists():
            raise DistillError(f"--data {path} not found")
    context_length = opts.context_length or default_context_length(config)
    stride = opts.stride or context_length
    if stride > context_length:
        raise DistillError(f"--stride {stride} is larger than the context length {context_length}")
    documents = {path: load_documents(path, tokenizer, opts.max_documents, opts.max_tokens) for path in opts.data}
    return documents, context_length, stride


def load_source(checkpoint: Path, device: str) -> HyenaRTFForCausalLM:
    """The checkpoint's model in float32, without transformers' loading bar, so that a refusal
    (LoadError, or the checks that follow) is the only line the user sees."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_model(checkpoint, "float32", device)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------- filters and fits


def long_filters(model: HyenaRTFForCausalLM) -> list[tuple[int, str, torch.nn.Module]]:
    """(layer, state-dict prefix, filter module) of every Hyena / MultiHyena mixer."""
    found = []
    for i, block in enumerate(model.model.layers):
        module = getattr(block.mixer, FILTER_MODULE, None)
        if module is not None:
            found.append((i, f"model.layers.{i}.mixer.{FILTER_MODULE}", module))
    return found


def check_finite(checkpoint: Path, name: str, module: torch.nn.Module, taps: torch.Tensor) -> None:
    """DistillError naming the first non-finite weight of the filter, or its taps if they overflow."""
    for param_name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise DistillError(f"{checkpoint}: filter weight {name}.{param_name} is not finite (NaN or inf)")
    if not torch.isfinite(taps).all():
        raise DistillError(f"{checkpoint}: the taps of filter {name} are not finite though its weights are")


def fit_layers(checkpoint: Path, model: HyenaRTFForCausalLM, opts: Options) -> list[LayerFit]:
    """Fit every long filter of `model` (distinct filters only) at opts.order, or at opts.tolerance
    up to opts.max_order (at most l_max - 1), and at every opts.sweep order."""
    l_max = model.config.l_max
    fft_len, max_order = fft_length(l_max), min(opts.max_order, l_max - 1)
    found = long_filters(model)
    targets = []
    for _, name, module in found:  # every check before the first (slow) fit
        with torch.no_grad():
            taps = filter_bank_taps(module, l_max)
        check_finite(checkpoint, name, module, taps)
        targets.append(taps)
    fits = []
    if opts.form == "modal":
        fit = functools.partial(
            distill_modal, steps=opts.steps, max_order=max_order, r_max=opts.max_pole_radius, polish=opts.polish
        )
    else:
        fit = functools.partial(
            distill_filters, fft_len=fft_len, steps=opts.steps, max_order=max_order, r_max=opts.max_pole_radius
        )
    inner = sys.stderr.isatty()  # the fit's own bar (refinement steps) only on a terminal
    bar = tqdm(list(zip(found, targets)), desc="distilling", unit="layer", disable=None, file=sys.stderr)
    with logging_redirect_tqdm([logging.getLogger(ROOT)]), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for (layer, name, module), taps in bar:
            chosen = fit(taps, order=opts.order, tolerance=opts.tolerance, progress=inner)
            fits.append(LayerFit(layer, name, module, taps, chosen, {k: fit(taps, order=k) for k in opts.sweep}))
            for warning in caught:  # e.g. no order up to --max-order meets --tolerance
                log.warning("layer %d: %s", layer, warning.message)
            caught.clear()
            memory = memory_error(chosen.kernel(l_max), taps)
            log.info(
                "layer %d (%s, %d filters): %s order %d, memory-tap error median %.3g max %.3g, Hankel tail %.3g",
                layer,
                describe_filter(module),
                taps.shape[0],
                opts.form,
                chosen.order,
                float(memory.median()),
                float(memory.max()),
                float(tail_at(chosen, chosen.order).max()),
            )
    return fits


def describe_filter(module: torch.nn.Module) -> str:
    order = getattr(module, "state_size", None)
    return type(module).__name__ + ("" if order is None else f" order {order}")


def tail_at(fit: FilterFit, order: int) -> torch.Tensor:
    """Per filter, the relative Hankel tail after `order` singular values (distillation/fit.py: no
    order-`order` fit has a smaller Hankel-weighted error; what --tolerance is compared with)."""
    tail = fit.hankel_tail
    return tail[:, order] if order < tail.shape[1] else torch.zeros_like(tail[:, 0])


# ----------------------------------------------------------------------------- the distilled model


def distilled_config(config: HyenaRTFConfig, orders: dict[int, int], form: str = "modal") -> HyenaRTFConfig:
    """The source config with filters of kind `form` ("modal" or "rtf") of the fitted orders
    (`orders`: layer -> order)."""
    top = max(orders.values())
    new = HyenaRTFConfig.from_dict(config.to_dict())
    new.filter, new.num_a = form, None
    if form == "rtf":
        # Fitted poles reach the --max-pole-radius (0.9999): unconstrained, and the training
        # kernel's FFT in float64 (models/rtf.py); decoding promotes its state where it must.
        new.rtf_constraint, new.rtf_kernel_dtype = "none", "float64"
    new.state_size = top
    new.state_sizes = [orders.get(i, top) for i in range(config.n_layer)]
    new.check()
    return new


def build_distilled(model: HyenaRTFForCausalLM, fits: list[LayerFit]) -> HyenaRTFForCausalLM:
    """The distilled model: `model`'s non-filter weights and generation config, the fits' filters."""
    form = "modal" if isinstance(fits[0].fit, ModalFit) else "rtf"
    config = distilled_config(model.config, {f.layer: f.fit.order for f in fits}, form)
    device = next(model.parameters()).device
    distilled = HyenaRTFForCausalLM(config).to(device).eval()
    distilled.generation_config = type(model.generation_config).from_dict(model.generation_config.to_dict())
    kept = {k: v for k, v in model.state_dict().items() if not is_filter_param(k)}
    missing, unexpected = distilled.load_state_dict(kept, strict=False)
    stray = [k for k in missing if not is_filter_param(k)] + list(unexpected)
    if stray:  # the two models are built from one config: this is a bug, not a user error
        raise RuntimeError(f"distilled model does not match the source model: {stray[:5]}")
    new_filters = {name: module for _, name, module in long_filters(distilled)}
    for f in fits:
        new = new_filters[f.module]
        if new.num_filters != f.taps.shape[0] or new.channels != f.source.channels:
            raise RuntimeError(
                f"{f.module}: distilled filter bank ({new.num_filters} filters, {new.channels} channels) "
                f"differs from the source ({f.taps.shape[0]} filters, {f.source.channels} channels)"
            )
        f.fit.load_into(new)
        check_stored(f, new)
    return distilled


def check_stored(f: LayerFit, new: torch.nn.Module) -> None:
    """DistillError unless the filters as the saved model holds them (float32 parameters) are
    stable and finite: rounding the coefficients of a high-order RTF fit with poles near the unit
    circle can move a pole out of it, and the model would then diverge (a modal filter keeps
    |pole| < 1 by construction; its taps are checked all the same)."""
    with torch.no_grad():
        radius, finite = float(new.pole_radius().max()), bool(torch.isfinite(new.kernel(f.taps.shape[-1])).all())
    if not (radius < 1.0 and finite):
        raise DistillError(
            f"{f.module}: the order-{f.fit.order} fit has a pole at |p| = {radius:.6g} once stored in float32 "
            f"({'unstable' if finite else 'non-finite taps'}); use a lower order (--order, or a larger --tolerance) "
            "or a smaller --max-pole-radius"
        )


def relative_error(approx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||approx - target||_2 / ||target||_2 per row, float64."""
    target = target.double()
    return (approx.double() - target).norm(dim=-1) / target.norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)


@torch.inference_mode()
def recurrent_check(model: HyenaRTFForCausalLM, prompt: torch.Tensor) -> dict:
    """The distilled model's cached decoding against its parallel forward on `prompt` (1, T), T past
    l_max: a prefill of the first half, the rest up to the last CHECK_STEPS tokens as one chunk
    continuing that state, then CHECK_STEPS tokens one at a time (every cached route there is)."""
    T = prompt.shape[1]
    parallel = model(input_ids=prompt, use_cache=False).logits.double()
    cut = [0, (T - CHECK_STEPS) // 2, T - CHECK_STEPS, *range(T - CHECK_STEPS + 1, T + 1)]
    cache, pieces = None, []
    try:
        for start, end in zip(cut[:-1], cut[1:]):
            out = model(input_ids=prompt[:, start:end], use_cache=True, **cache_kwargs(cache))
            cache = output_cache(out)
            pieces.append(out.logits.double())
    except ValueError as error:  # e.g. a fitted pole outside the unit circle: the recurrence is refused
        return {"prompt_tokens": T, "rtol": RECURRENT_RTOL, "passed": False, "error": str(error)}
    recurrent = torch.cat(pieces, dim=1)
    err = float((recurrent - parallel).abs().max() / parallel.abs().max().clamp_min(1e-30))
    return {
        "prompt_tokens": T,
        "decoded_one_at_a_time": CHECK_STEPS,
        "rtol": RECURRENT_RTOL,
        "max_rel_error": err,
        "passed": err <= RECURRENT_RTOL,  # False for NaN too
    }


def check_prompt(windows: list, vocab_size: int, l_max: int) -> torch.Tensor:
    """l_max + CHECK_PAST_L_MAX tokens of the evaluation data (windows joined), else a fixed
    pseudo-random prompt."""
    length = l_max + CHECK_PAST_L_MAX
    tokens = [int(t) for w in windows for t in w.tokens][:length]
    if len(tokens) == length:
        return torch.tensor(tokens).unsqueeze(0)
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- model-level evaluation


def kl_divergence_sum(p_logits: torch.Tensor, q_logits: torch.Tensor, chunk: int = 256) -> float:
    """sum over positions of KL(softmax p || softmax q), float64, `chunk` positions at a time."""
    total = 0.0
    for start in range(0, p_logits.shape[0], chunk):
        lp = torch.log_softmax(p_logits[start : start + chunk].double(), -1)
        lq = torch.log_softmax(q_logits[start : start + chunk].double(), -1)
        total += float((lp.exp() * (lp - lq)).sum())
    return total


@torch.inference_mode()
def compare_models(original, distilled, windows: list, n_bytes: int, batch_size: int) -> dict:
    """Both models on the same windows (evaluation/scoring.py's batching and scored positions): their
    perplexity and bits per byte, and KL(original || distilled) and top-1 agreement per token."""
    device = next(original.parameters()).device
    nll, kl, agree, n_tokens = [0.0, 0.0], 0.0, 0, 0
    for index, input_ids in window_batches(windows, batch_size, "comparing"):
        logits = [forward_logits(m, input_ids.to(device), "parallel") for m in (original, distilled)]
        for r, i in enumerate(index):
            (p, targets), (q, _) = (scored_logits(lg, windows[i], r) for lg in logits)
            for k, scored in enumerate((p, q)):
                nll[k] += float(F.cross_entropy(scored, targets, reduction="none").double().sum())
            kl += kl_divergence_sum(p, q)
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            n_tokens += len(targets)
    return {
        "original": summarize(nll[0], n_tokens, n_bytes),
        "distilled": summarize(nll[1], n_tokens, n_bytes),
        "kl_nats_per_token": kl / n_tokens,
        "top1_agreement": agree / n_tokens,
    }


# ----------------------------------------------------------------------------- report and plot


def stats(values: torch.Tensor) -> dict:
    values = values.double()
    return {"mean": float(values.mean()), "median": float(values.median()), "max": float(values.max())}


def layer_report(f: LayerFit, distilled: HyenaRTFForCausalLM, source_filter: str) -> dict:
    new = dict((name, m) for _, name, m in long_filters(distilled))[f.module]
    with torch.no_grad():  # the taps as the saved model computes them (float32 parameters)
        kernel = new.kernel(f.taps.shape[-1])[:: new.channels // new.num_filters]
    stored, memory = relative_error(kernel, f.taps), memory_error(kernel, f.taps)
    sv, k = f.fit.hankel_sv.double(), f.fit.order
    sv_next = sv[:, k] / sv[:, 0].clamp_min(1e-300) if k < sv.shape[1] else torch.zeros_like(sv[:, 0])
    return {
        "layer": f.layer,
        "module": f.module,
        "source_filter": source_filter,
        "source_order": getattr(f.source, "state_size", None),
        "form": "modal" if isinstance(f.fit, ModalFit) else "rtf",
        "filters": f.taps.shape[0],
        "channels": f.source.channels,
        "order": f.fit.order,
        "rel_error": stats(f.fit.rel_error),
        "stored_rel_error": stats(stored),
        "memory_tap_error": stats(memory),
        "memory_tap_error_per_filter": memory.tolist(),
        "hankel_tail": stats(tail_at(f.fit, k)),
        "hankel_sv_next": stats(sv_next),
        "hankel_tail_by_order": f.fit.hankel_tail.double().amax(0).tolist(),
        "max_pole_radius": float(new.pole_radius().max()),
        "sweep": [{"order": k, "rel_error": stats(fit.rel_error)} for k, fit in sorted(f.sweep.items())],
    }


def plot_report(report: dict) -> bytes:
    """PNG: per layer, the relative Hankel tail of the worst filter against the order k (dashed:
    what --tolerance reads) and the largest (circles; filled: the chosen order, open: --sweep) and
    mean (crosses) relative tap error of the fits."""
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, entry in enumerate(report["layers"]):
        color = f"C{i % 10}"
        tail = [max(t, 1e-300) for t in entry["hankel_tail_by_order"]]
        ax.semilogy(range(1, len(tail)), tail[1:], "--", color=color, lw=1, label=f"layer {entry['layer']}")
        fits = [(entry["order"], entry["rel_error"], "full")]
        fits += [(s["order"], s["rel_error"], "none") for s in entry["sweep"]]
        for order, error, fill in fits:
            ax.semilogy([order], [max(error["max"], 1e-300)], "o", fillstyle=fill, color=color)
            ax.semilogy([order], [max(error["mean"], 1e-300)], "x", color=color)
    ax.set_xlabel("order k")
    ax.set_ylabel("relative error")
    ax.set_title(
        "fits: worst filter (o; filled: the chosen order) and mean (x); worst filter's Hankel tail (dashed)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def saved_dtype(checkpoint: Path) -> torch.dtype | None:
    """The half precision the checkpoint's non-filter weights are stored in (the distilled model
    keeps it), None for float32. Read from the weight files' headers, which cannot disagree with
    the weights (a folder saved by other code may carry any "dtype" in its config.json)."""
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(path, "pt") as weights:
            for key in weights.keys():
                if not is_filter_param(key):
                    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(weights.get_slice(key).get_dtype())
    return None


# ----------------------------------------------------------------------------- the whole run


def distill_checkpoint(opts: Options) -> dict:
    """Run everything `opts` asks for (module docstring); returns the report (also written)."""
    started = time.time()
    config = check_source(opts.checkpoint)
    check_options(opts, config, opts.checkpoint)
    check_target(opts)
    documents, windows, context_length, stride = {}, [], None, None
    if opts.data:  # read before the model loads, so that bad data fails fast
        tokenizer = load_tokenizer(opts.checkpoint)
        documents, context_length, stride = check_data(opts, tokenizer, config)
        start_id = start_token_id(tokenizer, config)
        every = [d for docs in documents.values() for d in docs]
        windows = [w for d in every for w in document_windows(d, start_id, context_length, stride)]
    model = load_source(opts.checkpoint, opts.device)
    for path, docs in documents.items():
        check_vocabulary(path, docs, model, config)
    loaded = time.time()
    fits = fit_layers(opts.checkpoint, model, opts)
    fitted = time.time()
    distilled = build_distilled(model, fits)
    check = recurrent_check(distilled, check_prompt(windows, config.vocab_size, config.l_max).to(opts.device))
    if check["passed"]:
        log.info("recurrent decoding = parallel forward (max relative error %.2g)", check["max_rel_error"])
    elif not opts.force:
        raise DistillError(
            f"the distilled model's cached decoding differs from its parallel forward "
            f"({check.get('max_rel_error', check.get('error'))} > {RECURRENT_RTOL}); nothing written "
            "(--force writes it anyway)"
        )
    else:
        log.warning("recurrent decoding of the distilled model differs from its parallel forward: %s", check)
    evaluation = None
    if opts.data:
        n_bytes = sum(d.n_bytes for docs in documents.values() for d in docs)
        evaluation = {
            "data": [str(p) for p in opts.data],
            "documents": sum(len(docs) for docs in documents.values()),
            "windows": len(windows),
            "tokens": sum(w.n_score for w in windows),
            "bytes": n_bytes,
            "context_length": context_length,
            "stride": stride,
            **compare_models(model, distilled, windows, n_bytes, opts.batch_size),
        }
        log.info(
            "perplexity %.4f -> %.4f, bits/byte %.5f -> %.5f, KL %.3g nats/token",
            evaluation["original"]["perplexity"],
            evaluation["distilled"]["perplexity"],
            evaluation["original"]["bits_per_byte"],
            evaluation["distilled"]["bits_per_byte"],
            evaluation["kl_nats_per_token"],
        )
    report = {
        "kind": REPORT_KIND,
        "checkpoint": str(opts.checkpoint),
        "output": str(opts.out),
        "report": str(opts.report_path),
        "plot": str(opts.plot_path),
        "settings": {
            "order": opts.order,
            "tolerance": opts.tolerance,
            "max_order": min(opts.max_order, config.l_max - 1),
            "steps": opts.steps,
            "max_pole_radius": opts.max_pole_radius,
            "sweep": opts.sweep,
            "device": opts.device,
        },
        "source": {
            "filter": config.filter,
            "state_size": config.state_size if config.filter == "rtf" else None,
            "multi_hyena_heads": config.multi_hyena_heads,
            "n_layer": config.n_layer,
            "hyena_layers": hyena_layers(config),
        },
        "state_sizes": distilled.config.state_sizes,
        "layers": [layer_report(f, distilled, config.filter) for f in fits],
        "recurrent_check": check,
        "evaluation": evaluation,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    report["seconds"] = {
        "load": round(loaded - started, 3),
        "fit": round(fitted - loaded, 3),
        "check_and_evaluation": round(time.time() - fitted, 3),
        "total": round(time.time() - started, 3),
    }
    write_outputs(opts, distilled, report)
    return report


def write_outputs(opts: Options, distilled: HyenaRTFForCausalLM, report: dict) -> None:
    """The checkpoint (save_hf_checkpoint's safe replace), then the report and the plot."""
    save_hf_checkpoint(
        distilled.cpu(),
        opts.checkpoint / "tokenizer.json",
        opts.out,
        saved_dtype(opts.checkpoint),
        opts.overwrite,
        also_owned=earlier_report_files(opts),  # an earlier run's report goes with its folder
    )
    opts.report_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(opts.report_path, json.dumps(report, indent=2) + "\n")
    write_bytes(opts.plot_path, plot_report(report))
    log.info("wrote %s, %s and %s", opts.out, opts.report_path, opts.plot_path)
