"""Hyena-RTF as a vLLM model: the checkpoints `train.py export` writes, served as they are.

    h     = embed(input_ids)                                 (N, d): the step's tokens, all requests
    h     = h + mixer(norm1(h))     HyenaMixer (state in vLLM's state cache), or, at
                                    config.attn_layers, causal attention through vLLM's Attention
                                    (paged KV cache)
    h     = h + mlp(norm2(h))       Linear(d, 4d) -> GELU -> Linear(4d, d)
    logits = norm_f(h) @ embed.weight[:vocab_size]^T         (tied head)

The modules and their parameter names are those of models/modeling_hyena_rtf.py, so `load_weights`
reads the exported model.safetensors name for name. Tensor and pipeline parallelism are not
supported (one worker holds the whole model: these are small models, and the modal state is per
channel, so a split would only divide the projections).

What is refused, in one line, when vLLM checks the configuration: serving/servable.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, SupportsMambaPrefixCaching
from vllm.sequence import IntermediateTensors

from models.rtf import STORED_FORM_BUFFERS

from .host_memory import retain_freed_memory
from .hyena_mixer import HyenaMixer, state_dtype, state_shapes
from .servable import log as logger
from .servable import refusal


class AttentionMixer(nn.Module):
    """The project's CausalSelfAttention (qkv, proj; no positional embedding, scale hd^-1/2)
    on vLLM's Attention layer, which keeps the keys and values in the paged KV cache."""

    def __init__(self, config, cache_config, prefix: str):
        super().__init__()
        d, h = config.d_model, config.n_head
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        hd = d // h
        self.attn = Attention(h, hd, hd**-0.5, num_kv_heads=h, cache_config=cache_config, prefix=f"{prefix}.attn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (N, d) each: heads contiguous, as the project's view
        return self.proj(self.attn(q.contiguous(), k.contiguous(), v.contiguous()))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GELU in place on fc's output: no second (N, 4d) block (see HyenaMixer.forward).
        return self.proj(torch.ops.aten.gelu_(self.fc(x)))


class Block(nn.Module):
    """Pre-norm residual block, as models/modeling_hyena_rtf.Block (no dropout: inference)."""

    def __init__(self, config, layer_idx: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        if layer_idx in config.attn_layers:
            self.mixer = AttentionMixer(config, vllm_config.cache_config, f"{prefix}.mixer")
        else:
            self.mixer = HyenaMixer(config, layer_idx, vllm_config.model_config.dtype, f"{prefix}.mixer")
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.mixer(self.norm1(h))  # a new h: the caller's (the embedding's) is left as it is
        return h.add_(self.mlp(self.norm2(h)))


class HyenaRTFBackbone(nn.Module):
    """Embeddings -> blocks -> final norm, named as HyenaRTFModel (`model.` in the checkpoint)."""

    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.embed = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            Block(config, i, vllm_config, f"{prefix}.layers.{i}") for i in range(config.n_layer)
        )
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            h = block(h)
        return self.norm_f(h)


class HyenaRTFForCausalLM(nn.Module, HasInnerState, IsHybrid, SupportsMambaPrefixCaching):
    """vLLM's entry point for architecture "HyenaRTFForCausalLM" (serving/vllm_plugin.py registers it).

    IsHybrid tells vLLM the per-layer state (its shapes and dtypes come from the config alone, before
    any weight is read); SupportsMambaPrefixCaching lets it keep a state per cached block, which is
    exact here because every prefill chunk resumes from its stored state in closed form.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        parallel = vllm_config.parallel_config
        reason = refusal(config, parallel.tensor_parallel_size, parallel.pipeline_parallel_size)
        if reason:
            raise ValueError(reason)
        self.config = config
        if vllm_config.device_config.device.type == "cpu":
            # The mixer's big temporaries are re-made every layer and step: keep them in the heap
            # (serving/host_memory.py), as the caching allocator vLLM's CPU backend expects would.
            logger.info("host allocator: %s", retain_freed_memory())
        self.model = HyenaRTFBackbone(config, vllm_config, "model" if not prefix else f"{prefix}.model")
        # The output head: the embedding itself when tied (the default), else its own weight.
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        )

    # ---- the state vLLM allocates per request (before the model exists) ---------------------------
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return state_shapes(vllm_config.model_config.hf_config)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return vllm_config.model_config.dtype, state_dtype(vllm_config.model_config.hf_config)

    @classmethod
    def get_mamba_state_copy_func(cls):
        # Prefix caching copies a slot's whole state between blocks (no speculative tokens).
        return get_temporal_copy_spec, get_temporal_copy_spec

    # ---- forward ---------------------------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """input_ids (N,) of this step's tokens -> hidden states (N, d). `positions` is not read:
        the Hyena layers carry position, and the attention layers have no positional embedding."""
        h = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        return self.model(h)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, vocab_size): the head (tied: the embedding) without its padding rows."""
        head = self.model.embed if self.lm_head is None else self.lm_head
        return F.linear(hidden_states, head.weight[: self.config.vocab_size])

    # ---- weights ---------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy the checkpoint's tensors into the parameters and buffers of the same name (a tied head
        has no weight of its own, an untied one is `lm_head.weight`; an export's filters carry their
        stored modal form as buffers, models/rtf.py), then build every filter's modal recurrence."""
        params = {**dict(self.named_buffers()), **dict(self.named_parameters())}
        loaded = set()
        for name, tensor in weights:
            if name not in params and (name == "lm_head.weight" or name.rsplit(".", 1)[-1] in STORED_FORM_BUFFERS):
                continue  # tied: the embedding holds it; a stored form the config does not ask for: built again
            if name not in params:
                raise ValueError(f"unexpected tensor {name} in a Hyena-RTF checkpoint")
            param = params[name]
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
            loaded.add(name)
        if self.lm_head is not None and "lm_head.weight" not in loaded:  # else it would score with random weights
            raise ValueError("the checkpoint's config unties the output head but it has no lm_head.weight")
        mixers = [m for m in self.modules() if isinstance(m, HyenaMixer)]
        for mixer in mixers:
            mixer.build_recurrence()
        return loaded
