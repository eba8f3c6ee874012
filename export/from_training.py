"""Export a training checkpoint (any engine) as a Hugging Face folder.

    python train.py export CKPT_OR_RUN_DIR OUT_DIR [--dtype bfloat16]

The model is rebuilt from the checkpoint's effective config.yaml, filled with the full float32
weights (`load_fp32_state_dict`: DeepSpeed ZeRO checkpoints are reconstructed from their
per-rank partitions) and written by `export.folder.save_hf_checkpoint` together with the
checkpoint's tokenizer.json. The result loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`; a model.arch=gpt_neox run
gives a plain transformers folder (no code in it, no trust_remote_code needed).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from export.folder import check_export_target, save_hf_checkpoint
from training import checkpoint as ckpt
from training.config import DEFAULT_ARCH, RESERVED, instantiate, model_config
from utils.atomic import NotReplaceableError


def model_from_checkpoint(ckpt_dir: str):
    """(the model with the checkpoint's fp32 weights, its config): HyenaRTFForCausalLM, or
    GPTNeoXForCausalLM for a model.arch=gpt_neox run (checkpoints older than `arch` are Hyena-RTF)."""
    cfg = OmegaConf.load(os.path.join(ckpt_dir, ckpt.CONFIG_FILE))
    section = OmegaConf.to_container(cfg.model, resolve=True)
    kwargs = {k: v for k, v in section.items() if k not in RESERVED and v is not None}
    config = model_config(section.get("arch") or DEFAULT_ARCH, kwargs)
    model = instantiate(config)
    state = ckpt.load_fp32_state_dict(ckpt_dir)
    missing, unexpected = model.load_state_dict(state)
    # A tied LM head may be stored under one of its two names only; anything else is a real mismatch.
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{ckpt_dir}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), config


def check_export_destination(out_dir: str, source: str, overwrite: bool = False) -> None:
    """Raise NotReplaceableError (one line) unless `out_dir` may receive an export from `source`
    (a run folder, its checkpoints folder, or one checkpoint). Whatever `overwrite` says, never:
    `source` itself, a folder that contains it, or anything in the checkpoints folder it names
    (training/checkpoint.py `checkpoints_root`). A folder beside the checkpoints (OUT_DIR/hf) is
    fine. Otherwise as export.folder.check_export_target."""
    out, src = Path(os.path.realpath(out_dir)), Path(os.path.realpath(source))
    ckpt_root = Path(os.path.realpath(ckpt.checkpoints_root(source)))
    if out == src or out in src.parents or out == ckpt_root or ckpt_root in out.parents:
        raise NotReplaceableError(
            f"export folder {out_dir} would replace or be written into {source} or its "
            "checkpoints; choose an output path outside them"
        )
    check_export_target(out, overwrite)


def run_export_dir(cfg: DictConfig) -> str:
    """Where a run exports at its end: checkpoint.export_dir, by default OUT_DIR/hf."""
    return cfg.checkpoint.export_dir or os.path.join(cfg.train.out_dir, "hf")


def check_run_export_dir(cfg: DictConfig) -> None:
    """The end-of-run export may replace an earlier export, never the run folder, its
    checkpoints, or a folder that contains the run (NotReplaceableError)."""
    check_export_destination(run_export_dir(cfg), cfg.train.out_dir)


def export_checkpoint(
    path: str, out_dir: str, dtype: torch.dtype | None = None, verify: bool = True, overwrite: bool = False
) -> Path:
    """Write the HF folder of checkpoint `path` (or of the latest checkpoint of run folder `path`).

    The destination is checked first (`check_export_destination`), then the checkpoint against
    its manifest (CheckpointError naming the bad file); `verify=False` only for a checkpoint this
    process has just written or verified itself. overwrite: replace a non-export folder.
    """
    check_export_destination(out_dir, path, overwrite)
    ckpt_dir = ckpt.resolve_checkpoint(path)
    if verify:
        ckpt.verify_checkpoint(ckpt_dir)
    model, _ = model_from_checkpoint(ckpt_dir)
    tok = os.path.join(ckpt_dir, ckpt.TOKENIZER_FILE)
    return save_hf_checkpoint(model, tok if os.path.isfile(tok) else None, out_dir, dtype=dtype, overwrite=overwrite)
