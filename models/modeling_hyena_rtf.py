"""Hyena-RTF decoder language model (Hugging Face custom code).

    h_0 = embed(input_ids)                                   (B, T, d)
    h   = h + mixer(norm1(h))      mixer: Hyena (RTF filter) or, at config.attn_layers, attention
    h   = h + mlp(norm2(h))        mlp: Linear(d, 4d) -> GELU -> Linear(4d, d)
    logits = norm_f(h) @ W[:vocab_size]^T                    (B, T, V), W: lm_head tied to embed

With `skip_logits=True` (the trainer's call) the loss is taken from norm_f(h) and W directly, in
blocks of rows (models/chunked_loss.py), and no (B, T, V) logits are built.

Generation is recurrent: the first call prefills every layer's state in parallel (FFT), then each
new token costs O(n_layer * d * (d + n)) whatever the length of the context (MultiHyena layers:
O(n_layer * d * (d + e n)) with head width e; attention layers, if any, keep a growing KV cache).
The cache is `HyenaRTFCache` (models/cache.py), created by `forward` whenever `use_cache` is on;
`hf_compat` passes it under the name the running transformers release uses (`cache` from 5.24 on,
`past_key_values` before).
"""

from __future__ import annotations

import functools
import inspect
import math
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.generation import GenerationMode
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .attention import CausalSelfAttention
from .cache import HyenaRTFCache, StaticHyenaRTFCache
from .chunked_loss import linear_cross_entropy
from .configuration_hyena_rtf import HyenaRTFConfig
from .hf_compat import CACHE_NAME, cache_kwargs, output_cache, pick_cache
from .hyena import HyenaOperator
from .long_filter import LongFilter
from .multihyena import MultiHyenaOperator
from .precision import FILTER_MODULE
from .static_decode import decode_steps

PADDED_HEAD_DEVICES = ("cuda",)  # where the LM head multiplies by its padded rows (`logits`)


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
        self.mixer = (
            CausalSelfAttention(config.d_model, config.n_head)
            if self.is_attention
            else (MultiHyenaOperator if config.multi_hyena_heads else HyenaOperator)(config, layer_idx)
        )
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, h: torch.Tensor, mask: torch.Tensor | None = None, cache: HyenaRTFCache | None = None, layer_idx: int = 0
    ) -> torch.Tensor:
        """h: (B, T, d). mask: (B, past + T) 0/1 or None. With a cache: prefill when this layer has
        no state yet, else one recurrent step (T = 1) or the closed-form continuation of its state
        over the T new positions (models/hyena.py); masked new positions count as zero inputs, as
        in the parallel forward."""
        x = self.norm1(h)
        if self.is_attention:
            kv = cache.layers[layer_idx] if cache is not None else None
            y, kv = self.mixer(x, key_mask=mask, kv=kv)
            if cache is not None:
                cache.layers[layer_idx] = kv
        elif cache is None:
            y = self.mixer(x, mask)
        else:
            state = cache.layers[layer_idx]
            new_mask = None if mask is None else mask[:, -x.shape[1] :]
            if state is not None and x.shape[1] == 1:  # one token: the O(1) step, the state in place
                y = self.mixer.step(x[:, 0], state, None if new_mask is None else new_mask[:, 0])[0][:, None]
            else:  # prefill, or a chunk continuing the state in closed form (in place)
                y, cache.layers[layer_idx] = self.mixer(
                    x, new_mask, return_state=True, pole_check=cache.pole_check, state=state
                )
        return self._residual(h, y)

    def step(self, h: torch.Tensor, state, pos: torch.Tensor) -> torch.Tensor:
        """One token of the static decode path (models/static_decode.py): h (B, d) -> (B, d).
        state: this layer's HyenaState, or StaticKV with the write position pos ((1,) on the device),
        advanced in place by the same per-layer steps as the eager cache."""
        x = self.norm1(h)
        y = self.mixer.step(x, state, pos) if self.is_attention else self.mixer.step(x, state)[0]
        return self._residual(h, y)

    def _residual(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = h + self.drop(y)
        return h + self.mlp(self.norm2(h))


class HyenaRTFPreTrainedModel(PreTrainedModel):
    config_class = HyenaRTFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    # The long filters stay float32 whatever dtype the model is loaded in (precision.py says why).
    _keep_in_fp32_modules_strict = [FILTER_MODULE]

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save_pretrained (so `Trainer.save_model` too), plus two rules. A model whose
        config says `stored_recurrence` stores its filters' current recurrent form first (unless a
        `state_dict` is given: that is saved as given). A folder whose
        config.json names the model code (`auto_map`) holds that code. transformers copies the code
        only for a class registered with `register_for_auto_class`, which a model loaded by a
        process that imported the project (the Auto classes know it, no trust_remote_code) is not,
        while its config still carries the auto_map of the folder it came from: the saved folder
        then loaded nowhere else. So when an auto_map will be written, it is set to this code's
        three classes and the code files (this module and everything it imports relatively, as
        transformers gathers them) are copied beside config.json. Without an auto_map (a model built
        here, never exported) the folder is written as transformers writes it."""
        writes_code = bool(getattr(self.config, "auto_map", None)) or any(
            type(obj)._auto_class is not None for obj in (self, self.config)
        )
        if self.config.stored_recurrence and kwargs.get("state_dict") is None:
            self.store_recurrence()  # fine-tuned since it was loaded: the stored form follows
        if writes_code:
            self.config.auto_map = code_auto_map()
        super().save_pretrained(save_directory, *args, **kwargs)
        if writes_code and kwargs.get("is_main_process", True):
            for source in (Path(__file__), *map(Path, get_relative_import_files(__file__))):
                shutil.copyfile(source, Path(save_directory) / source.name)

    def store_recurrence(self) -> None:
        """Store every long filter's recurrent form in the model's state (models/long_filter.py), and
        say so in the config, so that the checkpoint saved next decodes without building it again.
        An export calls it; `save_pretrained` refreshes it for a model whose config already says so
        (a stored form that no longer matches its parameters is never used: models/rtf.py)."""
        for module in self.modules():
            if isinstance(module, LongFilter):
                module.store_recurrence()
        self.config.stored_recurrence = True

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


def code_auto_map() -> dict[str, str]:
    """config.json's auto_map for a folder holding this code: AutoConfig, AutoModel (the decoder
    without its head) and AutoModelForCausalLM, as module.Class of the files copied beside it."""
    module = Path(__file__).stem
    return {
        "AutoConfig": f"{Path(inspect.getfile(HyenaRTFConfig)).stem}.{HyenaRTFConfig.__name__}",
        "AutoModel": f"{module}.HyenaRTFModel",
        "AutoModelForCausalLM": f"{module}.HyenaRTFForCausalLM",
    }


def check_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor | None, length: int) -> None:
    """Accept position_ids that only count the positions of each row; refuse ones that restart.

    position_ids: (B, T) or (1, T), T = length (the new positions); attention_mask: (B, past + T)
    or None. Over the real tokens of a row (mask 1; all of them without a mask), each position must
    be the previous real token's plus one: an arange, a left- or right-padded arange (padding
    positions are not read), or the continuation of a cached prefix. Positions that restart are
    packed documents (trl's padding-free packing), which a long convolution with no positions
    cannot keep apart: refused, with how to turn packing off. One host synchronisation per call."""
    if position_ids.dim() != 2 or position_ids.shape[-1] != length:
        raise ValueError(f"position_ids must be (batch, {length}), like the input; got {tuple(position_ids.shape)}")
    real = (
        torch.ones_like(position_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask[:, -length:].bool()
    )
    # A row counts consecutively iff position - (rank among the row's real tokens) is one constant.
    offset = position_ids.long() - real.cumsum(-1)
    big = torch.iinfo(offset.dtype).max
    low = offset.masked_fill(~real, big).amin(-1)
    high = offset.masked_fill(~real, -big).amax(-1)
    if bool((high > low).any()):
        raise ValueError(
            "position_ids restart inside a row (packed sequences): Hyena-RTF has no positions and its long "
            "convolutions cannot keep packed documents apart; turn packing off (trl: SFTConfig(packing=False, "
            "padding_free=False)) and give one document per row with an attention_mask"
        )


class HyenaRTFModel(HyenaRTFPreTrainedModel):
    """The decoder without its head: embeddings -> blocks -> final norm (what `AutoModel` loads)."""

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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: HyenaRTFCache | None = None,
        past_key_values: HyenaRTFCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids (B, T) or inputs_embeds (B, T, d): the tokens the cache has not seen yet.
        attention_mask: (B, past + T), 1 for real tokens, 0 for (left) padding; or None.
        position_ids: (B or 1, T) or None. The model has no positions, so they are only checked:
        counting ones are accepted and change nothing, restarting ones (packed documents) are
        refused (`check_positions`).

        use_cache: build and return a decoding cache (a given cache is always used and advanced).
        An explicit argument wins; left as None it is `config.use_cache`, except in training mode,
        where a plain forward never pays for a recurrent prefill. Only an explicit True refuses a
        filter whose recurrence would diverge (see HyenaRTFCache); the default warns.
        -> last_hidden_state (B, T, d); hidden_states (n_layer + 1 tensors (B, T, d): the embeddings,
        then each block's output, the last one after the final norm) when asked; the cache.
        """
        if output_attentions:
            raise ValueError(
                "Hyena-RTF returns no attention weights (its mixers are long convolutions); "
                "call it with output_attentions=False"
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if position_ids is not None:
            check_positions(
                position_ids, attention_mask, (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
            )
        cache = pick_cache(cache, past_key_values)
        static = cache if isinstance(cache, StaticHyenaRTFCache) else None
        if static is not None:
            if static.is_loaded:
                raise ValueError("a filled StaticHyenaRTFCache decodes through HyenaRTFForCausalLM only")
            cache, use_cache = None, True  # the prefill fills an ordinary cache, then static takes it over
        if cache is not None:
            cache.check_batch((input_ids if inputs_embeds is None else inputs_embeds).shape[0])
        asked = use_cache is not None
        if not asked:
            use_cache = self.config.use_cache and not self.training
        if cache is None and use_cache:
            # A cache nobody asked for must not make scoring fail: an unstable filter's recurrence
            # is then built with a warning, and refused only when the caller asked for a cache.
            cache = HyenaRTFCache([block.is_attention for block in self.layers], "error" if asked else "warn")
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict

        h = self.drop(self.embed(input_ids) if inputs_embeds is None else inputs_embeds)
        mask = attention_mask
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: take the unmasked fast paths
        hidden = [h] if output_hidden_states else None
        for i, block in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                h = checkpoint(block, h, mask, None, i, use_reentrant=False)
            else:
                h = block(h, mask, cache, i)
            if hidden is not None and i < len(self.layers) - 1:
                hidden.append(h)
        h = self.norm_f(h)
        if hidden is not None:
            hidden.append(h)
        if cache is not None:
            cache.seen_tokens += h.shape[1]
        if static is not None:
            static.load_(cache, attention_mask)
            cache = static
        out = BaseModelOutputWithPast(
            last_hidden_state=h, hidden_states=None if hidden is None else tuple(hidden), **cache_kwargs(cache)
        )
        return out if return_dict else out.to_tuple()


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_{b,t} -log softmax(logits[b, t])[targets[b, t]] in float32, positions with target -100
    skipped. logits (B, T, V) and targets (B, T) are already aligned (targets[:, t] is what
    logits[:, t] predicts). The one loss of the project: `causal_lm_loss` below uses it, and
    `HyenaRTFForCausalLM.head_nll` (what the trainer, training/engine.py, calls through
    forward(skip_logits=True)) computes the same sum in blocks without the logits."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) at position t predict labels[:, t + 1]; -100 ignored.
    `shift_labels` (B, T), already aligned (shift_labels[:, t] is what logits[:, t] predicts, as in
    transformers' ForCausalLMLoss), replaces labels and scores every position.

    Mean over the predicted tokens of this batch, or, when `num_items_in_batch` is given (the
    predicted tokens of the whole accumulated step, which `transformers.Trainer` counts over
    labels[:, 1:]), the sum divided by it, so that accumulated micro-batches add up to the mean
    over the step however their token counts differ.
    """
    if shift_labels is None:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    return mean_nll(next_token_nll(logits, targets), targets, num_items_in_batch)


def mean_nll(nll: torch.Tensor, targets: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """nll (a summed loss) / the tokens it was summed over: num_items_in_batch where given, else the
    targets that are not -100."""
    count = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return nll / torch.as_tensor(count, device=nll.device, dtype=nll.dtype)


class HyenaRTFForCausalLM(HyenaRTFPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}
    # Trainer passes num_items_in_batch to forward (see causal_lm_loss) instead of averaging itself.
    accepts_loss_kwargs = True
    # The cache is a recurrent state that cannot be rewound, so assisted decoding and prompt lookup
    # (which roll the cache back over rejected candidates) cannot work. Releases up to 5.24 refuse
    # them for `_is_stateful` models; 5.25 dropped that check and fails inside assisted decoding
    # instead. Listing the modes that work makes every release refuse the others up front, with
    # transformers' own "only supports" message.
    _is_stateful = True
    _supported_generation_modes = tuple(
        mode.value  # plain strings (GenerationMode is a str enum): the refusal then lists readable names
        for mode in (
            GenerationMode.GREEDY_SEARCH,
            GenerationMode.SAMPLE,
            GenerationMode.BEAM_SEARCH,
            GenerationMode.BEAM_SAMPLE,
        )
    )

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

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Resize to `new_num_tokens` real tokens. The embedding keeps `config.vocab_size` (the
        logits' size) and the padded row count apart, as the constructor does, so the saved config
        rebuilds exactly the resized shapes on reload."""
        multiple = pad_to_multiple_of or self.config.pad_vocab_size_multiple
        vocab = self.config.vocab_size if new_num_tokens is None else new_num_tokens
        embed = super().resize_token_embeddings(vocab, pad_to_multiple_of=multiple, mean_resizing=mean_resizing)
        self.config.vocab_size, self.config.pad_vocab_size_multiple = vocab, multiple
        self.vocab_size = vocab
        return embed

    def _plain_head_weight(self, device: torch.device) -> torch.Tensor | None:
        """The weight a plain head multiplies by on `device`: every (padded) row on the devices of
        PADDED_HEAD_DEVICES (CUDA), the first vocab_size rows elsewhere; None for a head that is
        wrapped (PEFT) or hooked (accelerate's offloading), which must be called as a module."""
        head = self.lm_head
        # accelerate wraps the instance's forward instead of registering torch hooks.
        hooked = head._forward_hooks or head._forward_pre_hooks or "forward" in head.__dict__
        if type(head) is not nn.Linear or hooked:
            return None
        if device.type in PADDED_HEAD_DEVICES:
            # A GPU GEMM whose output width is a multiple of 64 takes the aligned kernels (an odd
            # 50,277 does not, for the forward and both backward GEMMs): multiply by every row,
            # the padding columns are dropped afterwards.
            return head.weight
        return head.weight[: self.config.vocab_size]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head on the real vocabulary: h (..., d) -> (..., vocab_size), the embedding's padding
        rows left out. A plain head multiplies by the first vocab_size rows of its weight (a
        contiguous view), so no padded logits are built, then copied and back-propagated by the loss
        (1.7 s of a 15 s CPU training step at 8192 tokens and vocabulary 50,277). A head that is
        wrapped (PEFT) or hooked (accelerate's offloading) is called as a module and sliced, and so is
        a plain head on the devices of PADDED_HEAD_DEVICES (CUDA), whose padded rows are multiplied."""
        weight = self._plain_head_weight(h.device)
        if weight is None:
            return self.lm_head(h)[..., : self.config.vocab_size]
        logits = F.linear(h, weight)
        # Sliced only when padded: even a full-width slice would copy the gradient in the backward.
        return logits[..., : self.config.vocab_size] if weight.shape[0] > self.config.vocab_size else logits

    def head_nll(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """next_token_nll(self.logits(h), targets) without the logits: h (B, T, d), targets (B, T)
        aligned, -100 ignored -> the float32 sum, by `linear_cross_entropy` over blocks of rows (the
        head's padded rows on CUDA, as `logits`, masked out of the softmax). A wrapped or hooked
        head has no weight to hand over: its logits are built and scored as in `next_token_nll`."""
        weight = self._plain_head_weight(h.device)
        if weight is None:
            return next_token_nll(self.logits(h), targets)
        return linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), n_classes=self.config.vocab_size
        )

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our cache is recurrent; forward creates it

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """generate()'s cache set-up (same signature in transformers 5.17 to 5.25). With
        `cache_implementation="static"` and no cache given, a StaticHyenaRTFCache for this call's
        length: generate() then compiles the decode step where it compiles (CUDA, or a
        `compile_config` allowing all devices). transformers' own StaticCache holds keys and values
        only and cannot serve this model. With `prefill_chunk_size`, an empty HyenaRTFCache that the
        chunks fill in turn. Anything else goes to transformers."""
        given = pick_cache(model_kwargs.get("cache"), model_kwargs.get("past_key_values"))
        if isinstance(given, StaticHyenaRTFCache) and given.is_loaded:
            # A static cache returned by an earlier generate() was sized for that call: make room for
            # this one's sequence (prompt so far + new tokens), keeping what it holds. (An empty one
            # keeps the size its maker chose; too small, it is refused before any step.)
            given.reserve(max_cache_length)
        if generation_config.cache_implementation == "static" and given is None and generation_config.use_cache:
            model_kwargs[CACHE_NAME] = StaticHyenaRTFCache(max_cache_length)
            return
        if getattr(generation_config, "prefill_chunk_size", None) and given is None and generation_config.use_cache:
            # Chunked prefill feeds the prompt in pieces to a cache that must exist before the first
            # (forward creates one only when given none); each piece continues the state exactly.
            model_kwargs[CACHE_NAME] = HyenaRTFCache([block.is_attention for block in self.model.layers])
            return
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: HyenaRTFCache | None = None,
        past_key_values: HyenaRTFCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        position_ids: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        skip_logits: bool = False,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids: (B, T) new tokens (or inputs_embeds (B, T, d)). attention_mask: (B, past + T).
        labels: (B, T), shifted inside, -100 ignored; or shift_labels: (B, T) already aligned (what
        position t predicts; transformers' name). logits_to_keep: only the last k positions'
        logits (0: all). position_ids: only checked, as in `HyenaRTFModel` (packed documents are
        refused). The cache (under either name) and `use_cache` work as in `HyenaRTFModel`:
        with a cache that has seen tokens, the new tokens are decoded recurrently, O(1) each.
        skip_logits (with labels; the name Liger kernels and transformers' Trainer use): return the
        loss only, computed in blocks of rows from the hidden states (`head_nll`), logits None: no
        (B, T, V) logits in the forward or the backward. Same loss, within float32 rounding.
        -> loss, logits (B, T or k, vocab_size), cache, hidden_states."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        scored = labels is not None or shift_labels is not None
        if scored and logits_to_keep:
            raise ValueError("labels need the logits of every position: do not combine them with logits_to_keep")
        if skip_logits and not scored:
            raise ValueError("skip_logits returns the loss only: it needs labels (or shift_labels)")
        cache = pick_cache(cache, past_key_values)
        if isinstance(cache, StaticHyenaRTFCache) and cache.is_loaded:
            # Decoding from a filled static cache: the compilable step, one token at a time. A decode
            # step's token is never padding, so with one token the mask is not even looked at (a
            # compiled step would otherwise be guarded on its length, one column longer each step);
            # several new tokens (continuing a returned cache) are checked once.
            if input_ids is None or scored or output_hidden_states:
                raise ValueError("a filled StaticHyenaRTFCache decodes token ids into logits only")
            new = input_ids.shape[1]
            if new > 1 and position_ids is not None:
                check_positions(position_ids, attention_mask, new)
            if new > 1 and attention_mask is not None and not bool(attention_mask[:, -new:].all()):
                raise ValueError(
                    "padding among the new tokens fed to a filled StaticHyenaRTFCache: its steps take real "
                    "tokens only; continue with the ordinary cache (no cache_implementation='static')"
                )
            logits = decode_steps(self, cache, input_ids)
            logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
            result = CausalLMOutputWithPast(logits=logits, **cache_kwargs(cache))
            return result if return_dict else result.to_tuple()
        out = self.model(
            input_ids,
            attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            position_ids=position_ids,
        )
        h = out.last_hidden_state
        h = h[:, -logits_to_keep:] if logits_to_keep else h
        if skip_logits:
            logits = None
            targets = labels[:, 1:] if shift_labels is None else shift_labels
            nll = self.head_nll(h if shift_labels is not None else h[:, :-1], targets)
            loss = mean_nll(nll, targets, num_items_in_batch)
        else:
            logits = self.logits(h)
            loss = causal_lm_loss(logits, labels, num_items_in_batch, shift_labels) if scored else None
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **cache_kwargs(output_cache(out))
        )
        return result if return_dict else result.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: HyenaRTFCache | None = None,
        past_key_values: HyenaRTFCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        next_sequence_length: int | None = None,
        is_first_iteration: bool | None = None,
        **kwargs,
    ) -> dict:
        """What `generate()` feeds the model at each step: only the positions the cache has not seen.

        The first call gets the whole prompt (its ids, or `inputs_embeds`); every later one a single
        token. A cache returned by an earlier `generate()` continues from where it stopped: the ids
        are the whole sequence so far, of which the cache has seen `seen_tokens` positions.
        `next_sequence_length` is how many new positions generate() says there are (1 per decode
        step); without it, that is the sequence length (from the attention mask, which covers the
        whole sequence, embedded prompt included) minus what the cache has seen, except for
        generate()'s chunked prefill (`prefill_chunk_size`), which passes each chunk alone.
        """
        cache = pick_cache(cache, past_key_values)
        total = attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1]
        if isinstance(cache, StaticHyenaRTFCache):
            cache.check_room(total)  # host integers: refused before a key is written out of bounds

        def seen() -> int:  # a static cache counts on the device: read only when needed (a host sync)
            return 0 if cache is None else cache.seen_tokens

        # Generation arguments that are not inputs of forward (generate(stop_strings=..., tokenizer=...)
        # leaves `tokenizer` among them) stay out of the call.
        # position_ids too: the model has no positions, and a user's would cover the whole sequence,
        # not the positions fed.
        kwargs = {k: v for k, v in kwargs.items() if k in _forward_arguments(type(self)) and k != "position_ids"}
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, **cache_kwargs(cache), **kwargs}
        if inputs_embeds is not None and (is_first_iteration or (cache is not None and seen() == 0)):
            inputs["inputs_embeds"] = inputs_embeds[:, seen() :]  # the prompt, given as vectors
            return inputs
        if inputs_embeds is not None and cache is None:
            raise ValueError(
                "generate(inputs_embeds=...) needs the recurrent cache: the prompt exists only as "
                "vectors, so it cannot be re-run from ids; do not pass use_cache=False"
            )
        if next_sequence_length is not None:
            new = next_sequence_length
        elif is_first_iteration and attention_mask is None and cache is not None and seen() > 0:
            new = input_ids.shape[1]  # generate()'s chunked prefill passes each chunk alone, without a mask
        else:
            new = total - seen()
        if cache is not None and not 0 < new <= input_ids.shape[1]:
            raise ValueError(
                f"the cache has seen {seen()} positions but the input has {input_ids.shape[1]} ids and "
                f"a mask of {total}: pass the whole sequence so far to continue from a cache"
            )
        inputs["input_ids"] = input_ids[:, -new:].contiguous() if cache is not None else input_ids.contiguous()
        return inputs


@functools.cache
def _forward_arguments(cls) -> frozenset:
    """The keyword arguments `cls.forward` takes."""
    return frozenset(inspect.signature(cls.forward).parameters) - {"self"}
