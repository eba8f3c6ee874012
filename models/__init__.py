"""Hyena-RTF models. The files that `modeling_hyena_rtf.py` imports are exported as Hugging Face
custom code, so they import nothing from the training code and only each other, relatively.

Importing this package also registers the architecture with transformers' Auto classes, so a process
that has the project on its path loads exported checkpoints with `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM` and `AutoTokenizer` without running the code stored in the checkpoint folder
(no `trust_remote_code`, no prompt).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import HyenaRTFCache, StaticHyenaRTFCache
from .configuration_hyena_rtf import PRESETS, HyenaRTFConfig, config_from_preset
from .modeling_hyena_rtf import HyenaRTFForCausalLM, HyenaRTFModel
from .rtf import RTF

AutoConfig.register(HyenaRTFConfig.model_type, HyenaRTFConfig, exist_ok=True)
AutoModel.register(HyenaRTFConfig, HyenaRTFModel, exist_ok=True)
AutoModelForCausalLM.register(HyenaRTFConfig, HyenaRTFForCausalLM, exist_ok=True)

__all__ = [
    "PRESETS",
    "HyenaRTFConfig",
    "config_from_preset",
    "HyenaRTFCache",
    "StaticHyenaRTFCache",
    "HyenaRTFForCausalLM",
    "HyenaRTFModel",
    "RTF",
]
