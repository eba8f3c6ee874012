"""Hyena-RTF models. Everything in this package is exported as Hugging Face custom code, so it
imports nothing from the training code and only relative imports between its own files."""

from .configuration_hyena_rtf import PRESETS, HyenaRTFConfig, config_from_preset, count_parameters
from .modeling_hyena_rtf import HyenaRTFCache, HyenaRTFForCausalLM, HyenaRTFModel
from .rtf import RTF

__all__ = ["PRESETS", "HyenaRTFConfig", "config_from_preset", "count_parameters", "HyenaRTFCache",
           "HyenaRTFForCausalLM", "HyenaRTFModel", "RTF"]
