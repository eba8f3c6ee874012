"""Export a training checkpoint (any engine) as a Hugging Face folder.

    python train.py export CKPT_OR_RUN_DIR OUT_DIR [--dtype bfloat16]

The model is rebuilt from the checkpoint's effective config.yaml, filled with the full float32
weights (`load_fp32_state_dict`: DeepSpeed ZeRO checkpoints are reconstructed from their
per-rank partitions) and written by `models.export.save_hf_checkpoint` together with the
checkpoint's tokenizer.json. The result loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from training import checkpoint as ckpt


def model_from_checkpoint(ckpt_dir: str):
    """(HyenaRTFForCausalLM with the checkpoint's fp32 weights, its config)."""
    from models.configuration_hyena_rtf import HyenaRTFConfig
    from models.modeling_hyena_rtf import HyenaRTFForCausalLM

    cfg = OmegaConf.load(os.path.join(ckpt_dir, ckpt.CONFIG_FILE))
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "preset" and v is not None}
    config = HyenaRTFConfig(**kwargs)
    model = HyenaRTFForCausalLM(config)
    state = ckpt.load_fp32_state_dict(ckpt_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied LM head may be stored under one of its two names only; anything else is a real mismatch.
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{ckpt_dir}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), config


def export_checkpoint(path: str, out_dir: str, dtype: Optional[torch.dtype] = None, verify: bool = True) -> Path:
    """Write the HF folder of checkpoint `path` (or of the latest checkpoint of run folder `path`).

    The checkpoint is verified against its manifest first (CheckpointError naming the bad file);
    `verify=False` only for a checkpoint this process has just written or verified itself.
    """
    from models.export import save_hf_checkpoint

    ckpt_dir = ckpt.resolve_checkpoint(path)
    if verify:
        ckpt.verify_checkpoint(ckpt_dir)
    model, _ = model_from_checkpoint(ckpt_dir)
    tok = os.path.join(ckpt_dir, ckpt.TOKENIZER_FILE)
    return save_hf_checkpoint(model, tok if os.path.isfile(tok) else None, out_dir, dtype=dtype)
