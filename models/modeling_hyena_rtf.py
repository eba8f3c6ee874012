"""Hyena-RTF decoder language model (Hugging Face custom code).

    h_0 = embed(input_ids)                                   (B, T, d)
    h   = h + mixer(norm1(h))      mixer: Hyena (RTF filter) or, at config.attn_layers, attention
    h   = h + mlp(norm2(h))        mlp: Linear(d, 4d) -> GELU -> Linear(4d, d)
    logits = lm_head(norm_f(h))[..., :vocab_size]            (B, T, V), lm_head tied to embed

Generation is recurrent: the first call prefills every layer's state in parallel (FFT), then each
new token costs O(n_layer * d * (d + n)) whatever the length of the context (attention layers,
if any, keep a growing KV cache). The cache is `HyenaRTFCache`, created in `forward`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import CausalSelfAttention
from .configuration_hyena_rtf import HyenaRTFConfig
from .hyena import HyenaOperator, HyenaState


class HyenaRTFCache:
    """Per-layer decoding state: `HyenaState` for Hyena layers, (k, v) for attention layers.

    Its tensors never grow for Hyena layers. `seen_tokens` counts the positions processed so far
    (padding included), which is what `generate` slices new tokens by.
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers: list = [None] * num_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the states of the selected beams (in place)."""
        for i, s in enumerate(self.layers):
            if isinstance(s, HyenaState):
                self.layers[i] = s.index_select(beam_idx.to(s.conv.device))
            elif s is not None:
                self.layers[i] = tuple(t.index_select(0, beam_idx.to(t.device)) for t in s)

    def __len__(self) -> int:
        return len(self.layers)


class MLP(nn.Module):
    def __init__(self, config: HyenaRTFConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)
        self.proj.is_residual_proj = True
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: Hyena or attention mixer, then MLP."""

    def __init__(self, config: HyenaRTFConfig, layer_idx: int):
        super().__init__()
        self.is_attention = layer_idx in config.attn_layers
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mixer = (CausalSelfAttention(config.d_model, config.n_head) if self.is_attention
                      else HyenaOperator(config))
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None, cache: HyenaRTFCache | None = None,
                layer_idx: int = 0) -> torch.Tensor:
        """h: (B, T, d). mask: (B, past + T) 0/1 or None. With a cache: prefill when this layer has
        no state yet, else step token by token (T is usually 1)."""
        x = self.norm1(h)
        if self.is_attention:
            kv = cache.layers[layer_idx] if cache is not None else None
            y, kv = self.mixer(x, key_mask=mask, kv=kv)
            if cache is not None:
                cache.layers[layer_idx] = kv
        elif cache is None:
            y = self.mixer(x, mask)
        elif cache.layers[layer_idx] is None:
            y, cache.layers[layer_idx] = self.mixer(x, mask, return_state=True)
        else:
            state, ys = cache.layers[layer_idx], []
            for t in range(x.shape[1]):
                y_t, state = self.mixer.step(x[:, t], state)
                ys.append(y_t)
            y, cache.layers[layer_idx] = torch.stack(ys, dim=1), state
        h = h + self.drop(y)
        return h + self.mlp(self.norm2(h))


class HyenaRTFPreTrainedModel(PreTrainedModel):
    config_class = HyenaRTFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    # Long-filter parameters stay float32 whatever dtype the model is loaded in (DESIGN: the FFT
    # has no bf16 path and B/A is badly conditioned near the unit circle).
    _keep_in_fp32_modules_strict = ["filter"]

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections / sqrt(2 n_layer).
        RTF and implicit filters keep the initialisation of their own constructors."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_proj", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class HyenaRTFModel(HyenaRTFPreTrainedModel):
    def __init__(self, config: HyenaRTFConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def forward(self, input_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: HyenaRTFCache | None = None) -> torch.Tensor:
        """-> final hidden states (B, T, d). attention_mask: (B, past + T) or None."""
        h = self.drop(self.embed(input_ids) if inputs_embeds is None else inputs_embeds)
        mask = attention_mask
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: take the unmasked fast paths
        for i, block in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                h = checkpoint(block, h, mask, None, i, use_reentrant=False)
            else:
                h = block(h, mask, cache, i)
        return self.norm_f(h)


class HyenaRTFForCausalLM(HyenaRTFPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: HyenaRTFConfig):
        super().__init__(config)
        self.model = HyenaRTFModel(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our cache is recurrent; forward creates it

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: HyenaRTFCache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids: (B, T) new tokens. attention_mask: (B, past + T). labels: (B, T), shifted
        inside, -100 ignored.

        With a cache that has seen tokens, the new tokens are decoded recurrently. With
        `use_cache=True` and no cache, the input is prefilled and a new cache is returned. A plain
        call (`use_cache` not given) builds no cache: scoring should not pay for a prefill, and
        `generate()` asks for one explicitly (see `prepare_inputs_for_generation`)."""
        cache = past_key_values
        if cache is None and use_cache and self.config.use_cache:
            cache = HyenaRTFCache(self.config.n_layer)
        T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        h = self.model(input_ids, inputs_embeds, attention_mask, cache)
        if cache is not None:
            cache.seen_tokens += T
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(h[:, keep])[..., : self.config.vocab_size]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values=None,
                                      attention_mask: torch.Tensor | None = None, inputs_embeds=None,
                                      use_cache: bool | None = None, **kwargs) -> dict:
        """Feed only the tokens the cache has not seen yet (the whole prompt on the first call)."""
        if past_key_values is not None and past_key_values.seen_tokens > 0:
            input_ids, inputs_embeds = input_ids[:, past_key_values.seen_tokens:], None
        use_cache = self.config.use_cache if use_cache is None else use_cache
        inputs = {"past_key_values": past_key_values, "attention_mask": attention_mask, "use_cache": use_cache}
        if inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids.contiguous()
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs
