"""Configuration of Hyena-RTF decoders, and the model-size presets.

The typed `__init__` signature below is the single source of truth for model hyper-parameters:
the training config derives its `model` section from it, and `save_pretrained` writes it to
config.json.
"""

from __future__ import annotations

from typing import Literal, get_args, get_origin, get_type_hints

from transformers import PreTrainedConfig

from .filters import FilterKind
from .precision import DtypeName
from .rtf import RTFConstraint, RTFInit, check_order

# Model-size presets. 125m follows the Hyena-RTF WikiText-103 model (d 768, 12 layers, state 64);
# larger ones follow the usual GPT-3 / Pythia widths and depths. vocab_size is set from the data.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_layer=2, l_max=256, state_size=8, n_head=4),
    "small": dict(d_model=256, n_layer=4, l_max=512, state_size=16, n_head=4),
    "125m": dict(d_model=768, n_layer=12, l_max=2048, state_size=64, n_head=12),
    "355m": dict(d_model=1024, n_layer=24, l_max=2048, state_size=64, n_head=16),
    "1.3b": dict(d_model=2048, n_layer=24, l_max=2048, state_size=64, n_head=16),
}


class HyenaRTFConfig(PreTrainedConfig):
    """Hyper-parameters of `HyenaRTFForCausalLM`.

    Args:
        vocab_size: tokenizer vocabulary (logits have exactly this size).
        pad_vocab_size_multiple: embedding rows are padded up to a multiple of this, for speed.
        d_model, n_layer: width and depth.
        l_max: training length; the RTF kernel FFT size. Longer inputs still work (see models/rtf.py).
        filter: long filter of the Hyena mixers, a kind of models/filters.py: "rtf", "modal"
            (poles and residues; what distill.py writes) or "implicit".
        state_size: RTF order n. num_a: distinct RTF denominators (None: one per filter).
        state_sizes: RTF order per layer, one entry per layer (attention layers' entries unused);
            None: state_size everywhere. Distillation (distill.py) writes the orders it fitted.
        filter_heads: distinct long filters, tied across d_model / filter_heads channels each
            (None: one per channel). This only shares filters between channels of the order-2
            Hyena operator; it is not the MultiHyena operator (see multi_hyena_heads).
        multi_hyena_heads: None for the order-2 Hyena operator; M for MultiHyena (Laughing Hyena):
            q, k, v split into M heads of d_model / M channels, the outer product k v^T of each
            head filtered by one long filter per head and contracted with q (models/multihyena.py).
        rtf_init: "zeros" | "xavier" | "montel". rtf_constraint: "none" | "l1_montel".
        rtf_kernel_dtype: precision of the kernel FFT, "float32" or "float64" (distilled models;
            see models/rtf.py).
        recurrent_dtype: dtype of the decoding state and coefficients, "float32" or "float64".
        stored_recurrence: the checkpoint holds every RTF filter's modal form, computed when it
            was saved (an export sets it), so that loading it skips the O(n^3) conversion
            (models/rtf.py, "Stored form").
        short_conv_width: causal depthwise conv width before the gating.
        implicit_order, implicit_bands: width and positional bands of the implicit filter MLP.
        attn_layers: layer indices that use causal softmax attention instead of Hyena.
        n_head: attention heads (attention layers only).
        mlp_ratio: MLP hidden width / d_model.
        layer_norm_eps, dropout, initializer_range: as usual (GPT-2 style init, std 0.02, residual
            projections scaled by 1 / sqrt(2 n_layer)).
    """

    model_type = "hyena_rtf"
    # The names Hugging Face tools look for. max_position_embeddings is the trained length: lm-eval,
    # the perplexity recipes and pipelines size their windows from it (the model runs longer
    # inputs too, see models/rtf.py, but was not trained on them).
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "l_max",
    }

    def __init__(
        self,
        vocab_size: int = 50277,
        pad_vocab_size_multiple: int = 64,
        d_model: int = 768,
        n_layer: int = 12,
        l_max: int = 2048,
        filter: FilterKind = "rtf",
        state_size: int = 64,
        num_a: int | None = None,
        state_sizes: list[int] | None = None,
        filter_heads: int | None = None,
        multi_hyena_heads: int | None = None,
        rtf_init: RTFInit = "xavier",
        rtf_constraint: RTFConstraint = "l1_montel",
        rtf_kernel_dtype: DtypeName = "float32",
        recurrent_dtype: DtypeName = "float32",
        stored_recurrence: bool = False,
        short_conv_width: int = 3,
        implicit_order: int = 64,
        implicit_bands: int = 8,
        attn_layers: list[int] | None = None,
        n_head: int = 12,
        mlp_ratio: int = 4,
        layer_norm_eps: float = 1e-5,
        dropout: float = 0.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.pad_vocab_size_multiple = pad_vocab_size_multiple
        self.d_model = d_model
        self.n_layer = n_layer
        self.l_max = l_max
        self.filter = filter
        self.state_size = state_size
        self.num_a = num_a
        self.state_sizes = None if state_sizes is None else [int(n) for n in state_sizes]
        self.filter_heads = filter_heads
        self.multi_hyena_heads = multi_hyena_heads
        self.rtf_init = rtf_init
        self.rtf_constraint = rtf_constraint
        self.rtf_kernel_dtype = rtf_kernel_dtype
        self.recurrent_dtype = recurrent_dtype
        self.stored_recurrence = stored_recurrence
        self.short_conv_width = short_conv_width
        self.implicit_order = implicit_order
        self.implicit_bands = implicit_bands
        self.attn_layers = sorted(int(i) for i in (attn_layers or []))
        self.n_head = n_head
        self.mlp_ratio = mlp_ratio
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings
        self.check()

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    def state_size_of(self, layer_idx: int) -> int:
        """The RTF order of layer `layer_idx`."""
        return self.state_size if self.state_sizes is None else self.state_sizes[layer_idx]

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent hyper-parameter."""
        for name in (  # first: the rules below compute with them
            "vocab_size",
            "pad_vocab_size_multiple",
            "d_model",
            "n_layer",
            "l_max",
            "state_size",
            "short_conv_width",
            "implicit_order",
            "n_head",
            "mlp_ratio",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")  # config.json: "128", 16.5
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not isinstance(self.stored_recurrence, bool):
            raise ValueError(f"stored_recurrence must be true or false, got {self.stored_recurrence!r}")
        for name, choices in choice_fields(type(self)).items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        bad = [i for i in self.attn_layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"attn_layers {bad} out of range for n_layer={self.n_layer}")
        if self.attn_layers and self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.filter_heads and self.d_model % self.filter_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by filter_heads ({self.filter_heads})")
        if self.state_sizes is not None and len(self.state_sizes) != self.n_layer:
            raise ValueError(f"state_sizes has {len(self.state_sizes)} entries for n_layer={self.n_layer}")
        for n in [self.state_size] + (self.state_sizes or []) if self.filter == "rtf" else []:
            check_order(n, self.l_max)
        if self.multi_hyena_heads is not None and (self.multi_hyena_heads < 1 or self.d_model % self.multi_hyena_heads):
            raise ValueError(
                f"multi_hyena_heads ({self.multi_hyena_heads}) must be >= 1 and divide d_model ({self.d_model})"
            )
        filters = self.multi_hyena_heads or self.filter_heads or self.d_model  # long filters per layer
        if self.num_a is not None and (self.num_a < 1 or filters % self.num_a):
            raise ValueError(f"num_a ({self.num_a}) must be >= 1 and divide the {filters} filters of a layer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.initializer_range < 0 or self.layer_norm_eps <= 0:
            raise ValueError(
                f"initializer_range must be >= 0 and layer_norm_eps > 0, got {self.initializer_range} "
                f"and {self.layer_norm_eps}"
            )


def choice_fields(config_cls: type) -> dict[str, tuple]:
    """{parameter: allowed values} for every `Literal`-typed parameter of config_cls.__init__: the
    one statement of each choice: `check` applies it here, and the training config's model section
    carries the same Literal types, checked as the YAML loads (training/config.py)."""
    hints = get_type_hints(config_cls.__init__)
    return {name: get_args(hint) for name, hint in hints.items() if get_origin(hint) is Literal}


def config_from_preset(name: str, **overrides) -> HyenaRTFConfig:
    """HyenaRTFConfig of a preset in PRESETS, with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return HyenaRTFConfig(**{**PRESETS[name], **overrides})
