"""AdamW parameter groups and the warmup + cosine learning-rate schedule.

Groups (each parameter in exactly one):

- `rtf`: every parameter of a long filter whose kind asks for its own group (`own_optimizer_group`:
  RTF's a, b, h0, slack; a modal filter's poles, residues and h0). Own peak lr (`optim.rtf_lr`,
  1e-3 in the paper), weight decay 0: decaying the denominator (or the poles' log decay) pulls the
  poles towards the origin and the numerator towards a zero filter, which is a prior on the filter
  shape, not regularisation. These parameters are float32 whatever the training precision (the rule of
  models/precision.py, which the trainer checks after building the engine).
- `no_decay`: tensors with fewer than 2 dimensions (biases, norm gains, scalars) and the token
  embedding (tied to the LM head). Decaying norm gains or biases only shrinks scale/offset
  parameters the next layer can re-learn; decaying the embedding shrinks rare tokens' rows much
  more than frequent ones', since they get few gradient updates to counter it.
- `decay`: all other matrices (projections, MLP, short-conv weights), weight decay `optim.weight_decay`.

The schedule is a pure function of the optimizer step, so resuming needs only the step number:

    f(s) = (s + 1) / W                                             for s < W   (W = warmup_steps)
    f(s) = r + (1 - r) * (1 + cos(pi * min(1, (s - W) / (D - W)))) / 2   otherwise

with r = min_lr_ratio and D = decay_steps (default max_steps). Group lr at step s = peak * f(s).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from models.long_filter import LongFilter


def param_groups(model: nn.Module, lr: float, rtf_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups as described in the module docstring.

    Each group dict carries `name` and `peak_lr` in addition to torch's keys; `peak_lr` is what
    `set_lr` multiplies by the schedule factor. Empty groups are dropped.
    """
    own = [m for m in model.modules() if isinstance(m, LongFilter) and m.own_optimizer_group]
    rtf_ids = {id(p) for module in own for p in module.parameters()}
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "rtf": []}
    for p in model.parameters():  # de-duplicated, so a tied head/embedding appears once
        if not p.requires_grad:
            continue
        if id(p) in rtf_ids:
            groups["rtf"].append(p)
        elif p.ndim < 2 or id(p) in embed_ids:
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    settings = {"decay": (lr, weight_decay), "no_decay": (lr, 0.0), "rtf": (rtf_lr, 0.0)}
    return [
        {
            "params": ps,
            "name": name,
            "peak_lr": settings[name][0],
            "lr": settings[name][0],
            "weight_decay": settings[name][1],
        }
        for name, ps in groups.items()
        if ps
    ]


def make_optimizer(groups: list[dict], betas: tuple, eps: float) -> torch.optim.AdamW:
    """torch AdamW. DeepSpeed gets the same object as a client optimizer (ZeRO wraps it), which
    avoids DeepSpeed's JIT-compiled FusedAdam / CPUAdam ops (minutes of compilation on first use,
    and no CUDA toolkit on CPU machines) and keeps one update rule for all engines."""
    return torch.optim.AdamW(groups, betas=betas, eps=eps)


def lr_factor(step: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """Schedule multiplier f(step) in (0, 1]; see the module docstring. step counts from 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, decay_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(param_groups_: Iterable[dict], factor: float) -> None:
    """lr = peak_lr * factor for every group (works on DeepSpeed's wrapped optimizer groups too)."""
    for g in param_groups_:
        g["lr"] = g["peak_lr"] * factor


# Which group field holds which config value (index into betas where it is a pair). Only the
# `decay` group's weight decay comes from the config; the others' is 0 by the rule above.
def _config_fields(group_name: str) -> dict[str, tuple[str, int | None]]:
    fields = {
        "optim.rtf_lr" if group_name == "rtf" else "optim.lr": ("peak_lr", None),
        "optim.beta1": ("betas", 0),
        "optim.beta2": ("betas", 1),
        "optim.eps": ("eps", None),
    }
    if group_name == "decay":
        fields["optim.weight_decay"] = ("weight_decay", None)
    return fields


def config_settings(param_groups_: Iterable[dict]) -> dict[str, float]:
    """The optimizer settings that come from config keys, as the groups hold them now, by key:
    optim.lr, optim.rtf_lr, optim.weight_decay, optim.beta1, optim.beta2, optim.eps (a key whose
    group is absent is absent).

    Needed around a resume: loading an optimizer state (torch's `load_state_dict`, DeepSpeed's
    ZeRO load) restores the saved groups' hyper-parameters, `peak_lr` included, so without
    `apply_settings` a resume would silently keep the checkpoint's values, not the config's."""
    out: dict[str, float] = {}
    for g in param_groups_:
        for key, (field, index) in _config_fields(g["name"]).items():
            out.setdefault(key, g[field] if index is None else g[field][index])
    return out


def apply_settings(param_groups_: Iterable[dict], settings: dict[str, float]) -> None:
    """Set the groups' hyper-parameters to `settings` (as `config_settings` returns them); the
    optimizer's per-parameter state (AdamW's moments, step count) is left as it is."""
    for g in param_groups_:
        for key, (field, index) in _config_fields(g["name"]).items():
            if key not in settings:
                continue
            if index is None:
                g[field] = settings[key]
            else:
                pair = list(g[field])
                pair[index] = settings[key]
                g[field] = tuple(pair)
