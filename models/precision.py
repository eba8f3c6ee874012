"""The precision rule of the model, in one place, and the dtype names the command lines accept.

Rule: the long-convolution filter of every Hyena operator (the module each operator holds as
`filter`: an `RTF` with its a, b, h0, slack, or an `ImplicitFilter` with its MLP) keeps float32
parameters, whatever dtype the rest of the model is trained, stored or run in. Why:

* RTF poles sit close to the unit circle for long memories; the roots of 1 + a_1 z^-1 + ... move
  by far more than bfloat16's 8 mantissa bits allow, so a bf16 denominator is a different filter.
* The kernel comes from an FFT, which has no bfloat16 path, and is computed in float32 anyway.

Everything that casts a model goes through this module: `.to()` / `.half()` keep the filters
float32 (`Float32Parameters`), transformers' `from_pretrained(dtype=...)` does through
`_keep_in_fp32_modules_strict = [FILTER_MODULE]`, a half-precision export keeps them
(`is_filter_param`), the generation CLI casts with `cast_keeping_filters`, and the trainer checks
with `check_filters_float32`. float64 parameters (the reference tests) stay float64.

The full table of what stays float32 / float64 and why: docs/precision.md of the Hyena-RTF
repository.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

# The precisions a config may name for the long filters' kernels and recurrent states.
DtypeName = Literal["float32", "float64"]
FILTER_MODULE = "filter"  # attribute name of the long filter inside every Hyena operator

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HALF = (torch.float16, torch.bfloat16)


def dtype_from_name(name: str) -> torch.dtype:
    """torch dtype of a name in DTYPES ("float32", "bfloat16", "float16"); ValueError otherwise."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def is_filter_param(name: str) -> bool:
    """True for a parameter name or state-dict key that lies inside a Hyena operator's filter,
    e.g. `model.blocks.0.mixer.filter.a` or `...filter.mlp.0.weight`."""
    return f".{FILTER_MODULE}." in f".{name}"


class Float32Parameters(nn.Module):
    """Base class of the filters: a cast of the module to half precision (`.to(bfloat16)`,
    `.half()`, a mixed-precision engine that casts whole models) leaves its parameters, their
    accumulated gradients and its buffers (an RTF's stored modal form) as they were, only moved to
    the cast's device: a filter never holds a rounded number. Other casts (float64, device moves)
    apply as usual."""

    def _apply(self, fn, recurse=True):
        # detach(): the tensor as it is now (a cast may swap a parameter's .data in place)
        before = [(m, kind, name, t.detach(), None if t.grad is None else t.grad.detach())
                  for m in self.modules() for kind in ("_parameters", "_buffers")
                  for name, t in getattr(m, kind).items() if t is not None]  # fmt: skip
        super()._apply(fn, recurse)

        def rounded(old: torch.Tensor | None, new: torch.Tensor | None) -> bool:
            return old is not None and new is not None and new.dtype in _HALF and old.dtype not in _HALF

        for module, kind, name, old, old_grad in before:
            new = getattr(module, kind)[name]
            if rounded(old, new):
                if kind == "_parameters":
                    new.data = old.to(new.device)
                else:
                    module._buffers[name] = old.to(new.device)
            if rounded(old_grad, None if new is None else new.grad):
                new.grad = old_grad.to(new.grad.device)  # an accumulated gradient is a filter number too
        return self


def cast_keeping_filters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers to `dtype`, except the filters' parameters and buffers
    (found by name, so this works for a model loaded from a checkpoint folder's own code too) and
    float64 buffers. Returns `model`."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not is_filter_param(name):
            p.data = p.data.to(dtype)
    for name, b in model.named_buffers():
        if b.is_floating_point() and b.dtype != torch.float64 and not is_filter_param(name):
            b.data = b.data.to(dtype)
    return model


def check_filters_float32(model: nn.Module) -> None:
    """Raise RuntimeError naming the first filter parameter that is not float32."""
    for name, p in model.named_parameters():
        if is_filter_param(name) and p.dtype != torch.float32:
            raise RuntimeError(f"filter parameter {name} is {p.dtype}; the long filters must stay float32")
