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
    worker (the plugin keeps the whole model on one)."""
    if config.filter == "implicit":
        return (
            "this Hyena-RTF checkpoint has implicit long filters, whose decoding state grows with the "
            "sequence: distil them into RTF filters first (python distill.py CKPT OUT --order 16), then serve OUT"
        )
    if tensor_parallel > 1 or pipeline_parallel > 1:
        return "Hyena-RTF serving runs on one worker: use tensor_parallel_size=1 and pipeline_parallel_size=1"
    return None
