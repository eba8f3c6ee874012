"""Atomic, resumable checkpoints.

Layout (one folder per checkpoint, under OUT_DIR/checkpoints/):

    step_00000300/
        model.pt, optimizer.pt          single/DDP engine: full fp32 weights and AdamW state
        deepspeed/, latest              DeepSpeed engine: its own files (ZeRO partitions per rank)
        rng_rank{R}.pt                  python / numpy / torch (/ cuda) RNG states of rank R
        config.yaml                     the effective training config (everything resolved)
        tokenizer.json                  so a checkpoint exports on its own
        trainer_state.json              step, tokens, skipped steps ... (written last)

Atomicity: everything is written into `.tmp-step_X/`, flushed to disk, and only then renamed to
`step_X/` (a rename within one directory is atomic on POSIX). A process killed at any moment leaves
either the complete new folder or none, next to the previous checkpoints; leftovers named `.tmp-*`
are deleted at the next start. Old checkpoints are first renamed to `.trash-*` and then deleted,
so a kill during pruning cannot leave a half-deleted `step_*` folder either. Multi-node runs need
OUT_DIR on a filesystem all nodes share (DeepSpeed writes one optimizer partition per rank).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str) -> List[Tuple[int, str]]:
    """Complete checkpoints under `root` as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> Optional[str]:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run folder (OUT_DIR) meaning its latest checkpoint."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    for root in (os.path.join(path, CHECKPOINTS), path):
        latest = latest_checkpoint(root)
        if latest:
            return latest
    raise FileNotFoundError(f"no complete checkpoint at {path} (expected {STATE_FILE} or {CHECKPOINTS}/step_*/)")


def cleanup_partial(root: str) -> None:
    """Delete leftovers of interrupted saves/prunes (call on rank 0 before training)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------


def rng_state() -> Dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def _fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    engine,
    root: str,
    step: int,
    trainer_state: Dict,
    config_yaml: str,
    tokenizer_file: Optional[str],
    keep_last: int,
) -> str:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, ".tmp-" + step_dir_name(step))
    if engine.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    engine.barrier()
    engine.save(tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{engine.rank}.pt"))
    engine.barrier()  # every rank's files are in tmp
    if engine.is_main:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(config_yaml)
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, os.path.join(tmp, TOKENIZER_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(trainer_state, f, indent=2)
        _fsync_tree(tmp)
        trash = os.path.join(root, ".trash-" + step_dir_name(step))
        if os.path.exists(final):  # re-saving a step (a resumed run that stops where it resumed)
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(trash, ignore_errors=True)
        prune(root, keep_last)
    engine.barrier()
    return final


def prune(root: str, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints; older ones go to .trash-* first, then away."""
    for _, path in list_checkpoints(root)[:-keep_last]:
        trash = os.path.join(root, ".trash-" + os.path.basename(path))
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def read_trainer_state(ckpt_dir: str) -> Dict:
    with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
        return json.load(f)


def load_checkpoint(engine, ckpt_dir: str) -> Dict:
    """Collective: restores engine (model + optimizer) and this rank's RNG state; returns trainer_state.

    A rank without an RNG file (resuming with more processes than saved) keeps its seeded state.
    """
    engine.load(ckpt_dir)
    rng_file = os.path.join(ckpt_dir, f"rng_rank{engine.rank}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return read_trainer_state(ckpt_dir)


def load_fp32_state_dict(ckpt_dir: str) -> Dict[str, torch.Tensor]:
    """Full float32 model weights of a checkpoint from any engine (DeepSpeed: ZeRO reconstruction)."""
    from training.engine import DS_TAG, TorchEngine

    model_file = os.path.join(ckpt_dir, TorchEngine.MODEL_FILE)
    if os.path.isfile(model_file):
        state = torch.load(model_file, map_location="cpu", weights_only=True)
    elif os.path.isdir(os.path.join(ckpt_dir, DS_TAG)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=DS_TAG)
    else:
        raise FileNotFoundError(f"{ckpt_dir}: neither {TorchEngine.MODEL_FILE} nor a {DS_TAG}/ folder")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
