"""Which Hyena-RTF checkpoints vLLM can serve, decided from config.json alone (no vLLM import), and the
plugin's logger."""

from __future__ import annotations

import logging

# Under vLLM's logger, whose handler and level vLLM sets up (VLLM_LOGGING_LEVEL): a logger of our own
# name would have no handler in a vLLM process, and its INFO lines would be dropped.
log = logging.getLogger("vllm.plugins.hyena_rtf")


def refusal(config, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> str | None:
    """Why this checkpoint cannot be served, in one line, or None.

    Served: RTF and modal long filters (their modal state has a fixed size), Hyena and MultiHyena
    mixers, attention layers. Refused: implicit filters, whose exact decoding state is the whole
    input history (distil them into RTFs first), and more than one tensor- or pipeline-parallel
    worker (the plugin keeps the whole model on one); a model with no Hyena layer (all attention:
    vLLM's state-space scheduling needs at least one state layer) and a short convolution of width 1
    (no window to keep: vLLM cannot page a state of zero columns)."""
    if config.filter == "implicit":
        return (
            "this Hyena-RTF checkpoint has implicit long filters, whose decoding state grows with the "
            "sequence: distil them into RTF filters first (python distill.py CKPT OUT --order 16), then serve OUT"
        )
    if all(i in config.attn_layers for i in range(config.n_layer)):
        return (
            "every layer of this checkpoint is attention (attn_layers): it has no Hyena layer, and the plugin "
            "serves models with at least one; serve it as a plain Transformer instead"
        )
    if config.short_conv_width < 2:
        return (
            "short_conv_width 1 leaves the short convolution no window to keep between tokens, and vLLM cannot "
            "page a state of zero columns: serve checkpoints with short_conv_width >= 2"
        )
    if tensor_parallel > 1 or pipeline_parallel > 1:
        return "Hyena-RTF serving runs on one worker: use tensor_parallel_size=1 and pipeline_parallel_size=1"
    return None


def refuse(reason: str) -> None:
    """Log the refusal as one line of its own (vLLM wraps the error in its own traceback: of its
    configuration check, or of the engine's start when the weights decide), then raise it."""
    log.error("cannot serve this checkpoint: %s", reason)
    raise ValueError(reason)


def unstable_refusal(layer_idx: int, radius: float) -> str:
    """The one-line reason for a layer whose filters have a pole on or outside the unit circle,
    which only the weights tell (so it is found as they load, after the configuration check)."""
    return (
        f"layer {layer_idx}: RTF filters have poles on or outside the unit circle (max |pole| = {radius:.4f}), "
        "so their recurrent form diverges, and vLLM decodes through it alone; retrain with "
        "rtf_constraint='l1_montel', or distil the checkpoint (python distill.py CKPT OUT --order 16) and serve OUT"
    )
