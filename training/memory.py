"""How much memory a run's model needs per process, estimated before anything is allocated.

A typo such as model.n_layer=1000000 or model.d_model=10**9 would otherwise grow for minutes until
the operating system kills the process (or torch raises deep inside an initialiser). The estimate
is made from the model code itself, not from a formula that could drift from it: the model is built
and run forward inside torch's FakeTensorMode, where tensors have shapes and dtypes but no storage,
so nothing is computed or allocated.

    parameters      P = base + sum over layers of the parameters of that layer's kind
    model states    per parameter: fp32 weight 4 B + gradient 4 B + AdamW's two moments 8 B;
                    ZeRO shards the moments (stage >= 1) and the gradients (stage >= 2) over the
                    W processes: 4 + 4 / W^[stage>=2] + 8 / W^[stage>=1] bytes
    activations     the bytes autograd saves for the backward of one micro-batch
                    (train.micro_batch_size x data.seq_len), counted by a saved-tensors hook

Layers are grouped by kind (softmax attention or Hyena, and its RTF order): each kind is measured
once, as the difference between a fake model of two such layers and one of one, so a million
layers cost no more to estimate than two. The estimate is the autograd-saved set, a lower bound
of the peak (the allocator, temporaries and communication buffers come on top), so a run is
refused only when even that exceeds the memory of its device: a refusal is never a false alarm.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch
from transformers import GPTNeoXConfig, PreTrainedConfig

from training.config import instantiate
from training.engine import lm_loss_terms

GIB = 2**30


@dataclass
class MemoryEstimate:
    """Per-process estimate: `params` (count), `states` and `activations` (bytes); `inf` when a size
    overflows what torch can even describe."""

    params: float
    states: float
    activations: float

    @property
    def total(self) -> float:
        return self.states + self.activations


def _layer_kinds(config: PreTrainedConfig) -> Counter:
    """How many layers of each kind (attention?, RTF order) the model has."""
    if isinstance(config, GPTNeoXConfig):
        return Counter({("attention", None): config.num_hidden_layers})
    n, attn = config.n_layer, set(config.attn_layers or [])
    sizes = config.state_sizes or [config.state_size] * n  # (attributes read once: config lookups are slow)
    return Counter(("attention", None) if i in attn else ("hyena", sizes[i]) for i in range(n))


def _with_layers(config: PreTrainedConfig, kind: tuple, n: int) -> PreTrainedConfig:
    """A copy of `config` with `n` layers, all of `kind`."""
    if isinstance(config, GPTNeoXConfig):
        return GPTNeoXConfig(**{**config.to_dict(), "num_hidden_layers": n})
    d = config.to_dict()
    d.update(n_layer=n, state_sizes=None, attn_layers=list(range(n)) if kind[0] == "attention" else [])
    if kind[1] is not None:
        d["state_size"] = kind[1]
    return type(config)(**d)


def _fake_run(config: PreTrainedConfig, batch: int, seq_len: int, bf16: bool) -> tuple[int, int]:
    """(parameters, bytes saved for backward) of one training forward of `config`, in fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cpu"):
        model = instantiate(config)
        tokens = torch.zeros(batch, seq_len + 1, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                lm_loss_terms(model, tokens)  # the training step's own loss (chunked for Hyena-RTF)
        params = sum(p.numel() for p in model.parameters())
    return params, saved


def estimate(
    config: PreTrainedConfig, batch: int, seq_len: int, *, bf16: bool, world_size: int = 1, zero_stage: int = 0
) -> MemoryEstimate:
    """The module docstring's estimate for one process of a run training `config` with micro-batches
    of `batch` x `seq_len` tokens, `zero_stage` 0 for an unsharded engine."""
    kinds = _layer_kinds(config)
    params, acts = 0.0, 0.0
    try:
        per_kind = {}
        for kind in kinds:
            p1, s1 = _fake_run(_with_layers(config, kind, 1), batch, seq_len, bf16)
            p2, s2 = _fake_run(_with_layers(config, kind, 2), batch, seq_len, bf16)
            per_kind[kind] = (p2 - p1, s2 - s1)
            base = (p1 - (p2 - p1), s1 - (s2 - s1))
        params = base[0] + sum(per_kind[k][0] * count for k, count in kinds.items())
        acts = base[1] + sum(per_kind[k][1] * count for k, count in kinds.items())
    except (RuntimeError, OverflowError) as e:  # "Storage size calculation overflowed"
        if "overflow" not in str(e).lower():
            raise
        return MemoryEstimate(float("inf"), float("inf"), float("inf"))
    W = max(1, world_size)
    per_param = 4 + 4 / (W if zero_stage >= 2 else 1) + 8 / (W if zero_stage >= 1 else 1)
    return MemoryEstimate(float(params), params * per_param, float(acts))


def device_memory(device: torch.device, local_processes: int = 1) -> int:
    """Bytes one process may use: the GPU's total memory, or the host's physical memory (or the
    cgroup limit, when lower) shared by the processes of this host."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total // max(1, local_processes)


def describe(est: MemoryEstimate, batch: int, seq_len: int) -> str:
    """'about X GiB per process (N parameters: S GiB of weights, gradients and AdamW moments;
    activations of micro-batch B x T tokens: A GiB)'."""
    if est.total == float("inf"):
        return "more memory than torch can address (a size overflows 64 bits)"
    return (
        f"about {est.total / GIB:,.1f} GiB per process ({est.params:,.0f} parameters: {est.states / GIB:,.1f} GiB "
        f"of weights, gradients and AdamW moments; activations of {batch} x {seq_len} tokens: "
        f"{est.activations / GIB:,.1f} GiB)"
    )
