"""Serving Hyena-RTF checkpoints with vLLM (continuous batching, chunked prefill, prefix caching,
the OpenAI-compatible server).

    vllm_plugin.py   the entry point vLLM calls at start-up: registers the architecture
    vllm_model.py    the vLLM model: the project's blocks, weights read by name, attention via vLLM
    hyena_mixer.py   a Hyena / MultiHyena layer whose short-conv window and modal filter state live
                     in vLLM's state cache: batched decode steps, exact prefill from any state
    servable.py      which checkpoints can be served, and the one-line reason for those that cannot
    host_memory.py   on CPU, glibc's malloc told to keep freed blocks for reuse (as tcmalloc would)

Nothing here is imported by the rest of the project; vLLM is imported only when vLLM loads the plugin.
"""
