"""The vLLM plugin: registers Hyena-RTF with vLLM when vLLM starts.

pyproject.toml names `register` under the entry-point group `vllm.general_plugins`; vLLM calls it in
every process it starts (front end and engine core) before it reads a model's config. vLLM's model
code is not imported here: the model class is registered by its import path and loaded only when a
Hyena-RTF checkpoint is served.

    register()   - transformers learns the "hyena_rtf" config type (so no trust_remote_code),
                 - vLLM learns that the config's l_max is no length limit,
                 - vLLM maps the architecture "HyenaRTFForCausalLM" (config.json's) to
                   serving/vllm_model.py, and
                 - checks the checkpoint when vLLM checks its configuration (`ServingConfig`):
                   a refusal is logged as one line and raised before any engine process starts
                   (vLLM then prints its configuration traceback, the reason at its end), and the
                   per-request state is sized as for vLLM's own state-space models.
"""

from __future__ import annotations

from models import HyenaRTFConfig  # importing it registers the config with transformers' AutoConfig

from .servable import refusal, refuse

ARCHITECTURE = "HyenaRTFForCausalLM"
MODEL_CLASS = "serving.vllm_model:HyenaRTFForCausalLM"


def register() -> None:
    """vLLM's plugin hook (idempotent)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils.model_arch_config_convertor import MODEL_ARCH_CONFIG_CONVERTORS

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, serving_config())
    MODEL_ARCH_CONFIG_CONVERTORS.setdefault(HyenaRTFConfig.model_type, length_free_convertor())


def serving_config():
    """vLLM's per-architecture configuration hook for Hyena-RTF (a class, built on first use so
    that importing this module needs no vLLM)."""
    from vllm.model_executor.models.config import MambaModelConfig

    class ServingConfig(MambaModelConfig):
        """MambaModelConfig sizes the state cache (and, with prefix caching, one state per block)
        for attention-free models, which vLLM otherwise leaves unset; hybrids get it as well."""

        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            reason = refusal(model_config.hf_config)
            if reason:
                refuse(reason)

        @classmethod
        def verify_and_update_config(cls, vllm_config) -> None:
            parallel = vllm_config.parallel_config
            reason = refusal(
                vllm_config.model_config.hf_config, parallel.tensor_parallel_size, parallel.pipeline_parallel_size
            )
            if reason:
                refuse(reason)
            super().verify_and_update_config(vllm_config)

    return ServingConfig


def length_free_convertor():
    """How vLLM reads the config's architecture, except the length: config.json's l_max (which
    transformers' tools see as max_position_embeddings) is the trained length, not a limit, since
    the modal recurrence continues the filters exactly past it. vLLM would cap max_model_len there;
    with no length it takes the --max-model-len given (or its default, 2048)."""
    from vllm.transformers_utils.model_arch_config_convertor import ModelArchConfigConvertorBase

    class LengthFreeConvertor(ModelArchConfigConvertorBase):
        def derive_max_model_len_and_key(self) -> tuple[float, str | None]:
            return float("inf"), None

    return LengthFreeConvertor
