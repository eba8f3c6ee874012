"""Atomic, resumable checkpoints.

Layout (one folder per checkpoint, under OUT_DIR/checkpoints/):

    step_00000300/
        model.pt, optimizer.pt          single/DDP engine: full fp32 weights and AdamW state
        deepspeed/, latest              DeepSpeed engine: its own files (ZeRO partitions per rank)
        zero_full_state.pt              DeepSpeed engine: full fp32 weights and AdamW state, to resume
                                        on another number of processes (training/zero_elastic.py)
        rng_rank{R}.pt                  RNG states of rank R, tensors only (training/rng.py)
        config.yaml                     the effective training config (everything resolved)
        tokenizer.json                  so a checkpoint exports on its own
        trainer_state.json              step, tokens, skipped steps ...
        manifest.json                   size and SHA-256 of every other file (written last)

Atomicity: everything is written into `.tmp-step_X/`, flushed to disk, and only then renamed to
`step_X/` (a rename within one directory is atomic on POSIX). A process killed at any moment leaves
either the complete new folder or none, next to the previous checkpoints; leftovers named `.tmp-*`
are deleted at the next start. Old checkpoints are first renamed to `.trash-*` and then deleted,
so a kill during pruning cannot leave a half-deleted `step_*` folder either. Multi-node runs need
OUT_DIR on a filesystem all nodes share (DeepSpeed writes one optimizer partition per rank).
This is the recipe of utils/atomic.py (stage beside, fsync, rename, fsync the folder), with
one difference: the staging name is derived from the step, not random, because every rank must
find the same folder to write its files into.

Verification (`verify_checkpoint`), before anything in a checkpoint is loaded, on resume and on
export: the files on disk must be exactly those of manifest.json, with its sizes and SHA-256
digests. What that guarantees: the checkpoint is byte for byte what its save wrote, with no file
missing, truncated, altered or added (DeepSpeed loads every `*_optim_states.pt` it finds, so an
added file would be loaded too), at the moment of the check. What it does not: the manifest is not
signed, so whoever can write the folder can also rewrite manifest.json to match crafted files; it
tells a corrupt or partial checkpoint from a complete one, not a forged one from a genuine one.
Against forgery: files this code loads itself go through torch's restricted unpickler
(`weights_only=True`: model.pt, optimizer.pt, rng_rank*.pt, zero_full_state.pt), which cannot run
code; DeepSpeed's own files (resume with the DeepSpeed engine, also on another world size, where
it still reads its module file; export of a ZeRO checkpoint) are loaded by DeepSpeed with full
unpickling (it offers no weights_only option), so load only DeepSpeed checkpoints whose folder
nobody else could write. A file changed after the check (a race) is not caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import torch

from hyena_rtf.training.engine import DS_TAG, Engine, TorchEngine
from hyena_rtf.training.rng import RngFileError, load_rng, save_rng
from hyena_rtf.utils.atomic import fsync_dir, write_text

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "hyena-rtf-checkpoint/1"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, altered or incompatible; the message names the file."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str) -> list[tuple[int, str]]:
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


def latest_checkpoint(root: str) -> str | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(path: str, key: str | None = None) -> str:
    """A checkpoint folder, or a run folder (OUT_DIR) meaning its latest checkpoint. CheckpointError
    naming `path` (as `key=path` when it came from config key `key`) when there is none."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    for root in (os.path.join(path, CHECKPOINTS), path):
        latest = latest_checkpoint(root)
        if latest:
            return latest
    where = f"{key}={path}" if key else path
    if not os.path.exists(path):
        raise CheckpointError(f"{where}: no such checkpoint or run folder")
    raise CheckpointError(f"no complete checkpoint at {where} (expected {STATE_FILE} or {CHECKPOINTS}/step_*/)")


def cleanup_partial(root: str) -> None:
    """Delete leftovers of interrupted saves/prunes (call on rank 0 before training)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def _files(ckpt_dir: str) -> list[str]:
    """Every file under ckpt_dir except the manifest, as sorted '/'-separated relative paths."""
    out = []
    for dirpath, _, names in os.walk(ckpt_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), ckpt_dir).replace(os.sep, "/")
            if rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digests(ckpt_dir: str, rels: list[str]) -> list[str]:
    # hashlib releases the GIL on large reads: threads hash the (per-rank) files in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda r: _sha256(os.path.join(ckpt_dir, r)), rels))


def write_manifest(ckpt_dir: str) -> None:
    """manifest.json: size and SHA-256 of every file of the checkpoint (call after all are written)."""
    rels = _files(ckpt_dir)
    files = {
        r: {"bytes": os.path.getsize(os.path.join(ckpt_dir, r)), "sha256": h}
        for r, h in zip(rels, _digests(ckpt_dir, rels))
    }
    with open(os.path.join(ckpt_dir, MANIFEST_FILE), "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, f, indent=1)


def verify_checkpoint(ckpt_dir: str) -> None:
    """Raise CheckpointError naming the first file that differs from manifest.json (see the module
    docstring for what this guarantees). Sizes are compared before any digest is computed."""
    path = os.path.join(ckpt_dir, MANIFEST_FILE)
    try:
        with open(path) as f:
            manifest = json.load(f)
        listed = manifest["files"]
        assert manifest["format"] == MANIFEST_FORMAT and isinstance(listed, dict)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing: the checkpoint is incomplete or predates verified checkpoints"
        ) from None
    except (ValueError, KeyError, TypeError, AssertionError, OSError):
        raise CheckpointError(f"{path} is not a valid checkpoint manifest") from None
    on_disk = _files(ckpt_dir)
    for rel in on_disk:
        if rel not in listed:
            raise CheckpointError(
                f"{os.path.join(ckpt_dir, rel)} is not part of the checkpoint (not in {MANIFEST_FILE})"
            )
    for rel, rec in listed.items():
        f = os.path.join(ckpt_dir, rel)
        if rel not in on_disk:
            raise CheckpointError(f"{f} is missing (listed in {MANIFEST_FILE})")
        if os.path.getsize(f) != rec["bytes"]:
            raise CheckpointError(
                f"{f} has {os.path.getsize(f)} bytes, {rec['bytes']} were written (truncated or altered)"
            )
    rels = sorted(listed)
    for rel, h in zip(rels, _digests(ckpt_dir, rels)):
        if h != listed[rel]["sha256"]:
            raise CheckpointError(
                f"{os.path.join(ckpt_dir, rel)} does not match the SHA-256 recorded at save time (altered)"
            )


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def _fsync_tree(path: str) -> None:
    """Flush every file below `path` and every folder's entries: the files the engines wrote
    (DeepSpeed's on every rank) go through their own writers, so they are synced here at once."""
    for dirpath, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)


def save_checkpoint(
    engine: Engine,
    root: str,
    step: int,
    trainer_state: dict,
    config_yaml: str,
    tokenizer_file: str | None,
    keep_last: int,
) -> str:
    """Collective: every rank calls it. Returns the final checkpoint path.

    A write that fails (full or read-only disk) raises CheckpointError naming the checkpoint and
    the reason, after removing the partial folder; the previous checkpoints are untouched."""
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, ".tmp-" + step_dir_name(step))
    try:
        return _save_checkpoint(engine, root, step, trainer_state, config_yaml, tokenizer_file, keep_last, final, tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # ours, and it frees the space it took
        where = f" ({e.filename})" if e.filename else ""
        raise CheckpointError(
            f"cannot write checkpoint {final}: {e.strerror or e}{where}; the previous checkpoints in {root} are intact"
        ) from None


def _save_checkpoint(engine, root, step, trainer_state, config_yaml, tokenizer_file, keep_last, final, tmp) -> str:
    if engine.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    engine.barrier()
    engine.save(tmp)
    save_rng(os.path.join(tmp, f"rng_rank{engine.rank}.pt"))
    engine.barrier()  # every rank's files are in tmp
    if engine.is_main:
        write_text(os.path.join(tmp, CONFIG_FILE), config_yaml)
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, os.path.join(tmp, TOKENIZER_FILE))
        write_text(os.path.join(tmp, STATE_FILE), json.dumps(trainer_state, indent=2))
        write_manifest(tmp)
        _fsync_tree(tmp)
        trash = os.path.join(root, ".trash-" + step_dir_name(step))
        if os.path.exists(final):  # re-saving a step (a resumed run that stops where it resumed)
            os.replace(final, trash)
        os.replace(tmp, final)
        fsync_dir(root)
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


def read_trainer_state(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
        return json.load(f)


def load_checkpoint(engine: Engine, ckpt_dir: str) -> dict:
    """Collective: restores engine (model + optimizer) and this rank's RNG state; returns trainer_state.

    Call it on a checkpoint `verify_checkpoint` accepted. A rank without an RNG file (resuming with
    more processes than saved) keeps its seeded state; the engine re-partitions what it must
    (`trainer_state["world_size"]` is the number of processes that saved).
    """
    state = read_trainer_state(ckpt_dir)
    engine.load(ckpt_dir, state.get("world_size", engine.world_size))
    rng_file = os.path.join(ckpt_dir, f"rng_rank{engine.rank}.pt")
    if os.path.isfile(rng_file):
        try:
            load_rng(rng_file)
        except RngFileError as e:
            raise CheckpointError(str(e)) from None
    return state


def load_fp32_state_dict(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """Full float32 model weights of a checkpoint from any engine (DeepSpeed: ZeRO reconstruction)."""
    model_file = os.path.join(ckpt_dir, TorchEngine.MODEL_FILE)
    if os.path.isfile(model_file):
        state = torch.load(model_file, map_location="cpu", weights_only=True)
    elif os.path.isdir(os.path.join(ckpt_dir, DS_TAG)):
        # Only a ZeRO checkpoint needs deepspeed, an optional package that is slow to import.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=DS_TAG)
    else:
        raise FileNotFoundError(f"{ckpt_dir}: neither {TorchEngine.MODEL_FILE} nor a {DS_TAG}/ folder")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
