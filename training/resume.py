"""Which checkpoint a run resumes from, and whether it may: chosen and verified by rank 0 before
anything in it is loaded, the choice shared with every rank, then checked against the config.

checkpoint.resume=auto takes the newest checkpoint of OUT_DIR/checkpoints that passes
`verify_checkpoint` (training/checkpoint.py), warning about each newer one it skips and naming its
bad file (a truncated or altered file, e.g. after a disk fault or an interrupted copy); the run then
retrains the steps after it. checkpoint.resume=PATH takes that one or fails.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from training import checkpoint as ckpt
from training.checkpoint import CheckpointError


def _candidates(cfg: DictConfig, ckpt_root: str) -> List[str]:
    """Checkpoints to try, best first; the same list on every rank (OUT_DIR is shared)."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return []
    if mode == "auto":
        return [path for _, path in reversed(ckpt.list_checkpoints(ckpt_root))]
    return [ckpt.resolve_checkpoint(mode, key="checkpoint.resume")]


def find_resume(cfg: DictConfig, ckpt_root: str, engine) -> Optional[str]:
    """Collective. The checkpoint to resume from (None: start from scratch).

    Only rank 0 reads and hashes the files; it sends the index of its choice, so the ranks cannot
    disagree, and a refusal reaches every rank (none is left waiting in a collective).
    """
    candidates = _candidates(cfg, ckpt_root)
    if not candidates:
        return None
    choice, error = -1, None
    if engine.is_main:
        choice, error = _first_intact(candidates, fallback=cfg.checkpoint.resume == "auto", ckpt_root=ckpt_root)
    picked, failed = engine.all_reduce_sum([choice + 1.0 if engine.is_main else 0.0, float(error is not None)])
    if failed:
        raise error or CheckpointError(f"rank 0 refused {candidates[0]} (its message says why)")
    return candidates[int(picked) - 1]


def _first_intact(candidates: List[str], fallback: bool, ckpt_root: str):
    """(index of the first candidate that verifies, None) or (-1, CheckpointError). With `fallback`
    a bad checkpoint is skipped with a warning naming the bad file; without, it is the error."""
    for i, path in enumerate(candidates):
        try:
            ckpt.verify_checkpoint(path)
            return i, None
        except CheckpointError as e:
            if not fallback:
                return -1, e
            print(f"[train] warning: skipping checkpoint {path}: {e}", file=sys.stderr)
    return -1, CheckpointError(f"no intact checkpoint in {ckpt_root} (each one is listed above with what is wrong); "
                               f"move them away or set checkpoint.resume=none to start over")


def check_resume_compatible(cfg: DictConfig, ckpt_dir: str, state: Dict, global_batch: int, engine_kind: str) -> None:
    """Refuse a checkpoint this run cannot continue (other engine family, model or sequence length).

    single and ddp checkpoints are the same files (full weights and optimizer state); DeepSpeed's
    are ZeRO partitions only DeepSpeed reads, so the two families cannot resume each other.
    """
    saved_ds, now_ds = state.get("engine") == "deepspeed", engine_kind == "deepspeed"
    if saved_ds and not now_ds:
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: it was written by the DeepSpeed engine; resume it under the deepspeed "
            f"launcher (`deepspeed train.py ...`) or with train.engine=deepspeed, or set checkpoint.resume=none")
    if now_ds and not saved_ds:
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: it was written by the {state.get('engine')} engine, and this run uses "
            f"DeepSpeed; resume it with python train.py / torchrun, or set checkpoint.resume=none")
    saved = OmegaConf.load(os.path.join(ckpt_dir, ckpt.CONFIG_FILE))
    for key in saved.model:
        if key != "preset" and saved.model[key] != cfg.model.get(key):
            raise CheckpointError(
                f"cannot resume from {ckpt_dir}: it was trained with model.{key}={saved.model[key]}, "
                f"this config gives {cfg.model.get(key)}. Use another train.out_dir or checkpoint.resume=none"
            )
    if saved.data.seq_len != cfg.data.seq_len:
        raise CheckpointError(f"cannot resume from {ckpt_dir}: data.seq_len was {saved.data.seq_len}, now {cfg.data.seq_len}")
    if state["global_batch_size"] != global_batch or state["seed"] != cfg.train.seed:
        print(
            f"[train] warning: resuming with global batch {global_batch} / seed {cfg.train.seed} (checkpoint: "
            f"{state['global_batch_size']} / {state['seed']}); the data order differs from the original run",
            file=sys.stderr,
        )
