"""Which checkpoint a run resumes from, and whether it may: chosen and verified by rank 0 before
anything in it is loaded, the choice shared with every rank, then checked against the config.

checkpoint.resume=auto takes the newest checkpoint of OUT_DIR/checkpoints that passes
`verify_checkpoint` (training/checkpoint.py), warning about each newer one it skips and naming its
bad file (a truncated or altered file, e.g. after a disk fault or an interrupted copy); the run then
retrains the steps after it. checkpoint.resume=PATH takes that one or fails.
"""

from __future__ import annotations

import hashlib
import os

from omegaconf import DictConfig, OmegaConf

from hyena_rtf.training import checkpoint as ckpt
from hyena_rtf.training.checkpoint import CheckpointError
from hyena_rtf.training.zero_elastic import FULL_STATE_FILE, has_full_state
from hyena_rtf.utils.logs import get_logger

log = get_logger("train")


def _candidates(cfg: DictConfig, ckpt_root: str) -> list[str]:
    """Checkpoints to try, best first; the same list on every rank (OUT_DIR is shared)."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return []
    if mode == "auto":
        return [path for _, path in reversed(ckpt.list_checkpoints(ckpt_root))]
    return [ckpt.resolve_checkpoint(mode, key="checkpoint.resume")]


def find_resume(cfg: DictConfig, ckpt_root: str, engine) -> str | None:
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


def _first_intact(candidates: list[str], fallback: bool, ckpt_root: str):
    """(index of the first candidate that verifies, None) or (-1, CheckpointError). With `fallback`
    a bad checkpoint is skipped with a warning naming the bad file; without, it is the error."""
    for i, path in enumerate(candidates):
        try:
            ckpt.verify_checkpoint(path)
            return i, None
        except CheckpointError as e:
            if not fallback:
                return -1, e
            log.warning(f"warning: skipping checkpoint {path}: {e}")
    return -1, CheckpointError(
        f"no intact checkpoint in {ckpt_root} (each one is listed above with what is wrong); "
        f"move them away or set checkpoint.resume=none to start over"
    )


_SPLIT_KEYS = ("tokens", "bin_bytes", "idx_bytes", "bin_sha256", "idx_sha256")  # most telling first


def data_fingerprint(ds) -> dict:
    """What the run's token stream depends on, recorded in every checkpoint (trainer_state["data"]):
    the SHA-256 of the tokenizer file as it is on disk, and from data_prep's manifest.json the
    per-split token counts, file sizes and digests (those it records). A dataset prepared again
    with another tokenizer of the same vocabulary size changes the first; other shards, the rest."""
    with open(ds.tokenizer_file, "rb") as f:
        tokenizer_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    splits = {
        name: {k: getattr(sp, k) for k in _SPLIT_KEYS if getattr(sp, k) is not None}
        for name, sp in sorted(ds.manifest.splits.items())
    }
    return {"tokenizer_sha256": tokenizer_sha256, "vocab_size": ds.vocab_size, "splits": splits}


def check_same_data(ckpt_dir: str, state: dict, now: dict, data_dir: str) -> None:
    """Refuse to resume on data other than the checkpoint's: the batches of step s would differ."""
    saved = state.get("data")
    if saved is None:
        log.warning(f"warning: {ckpt_dir} records no data fingerprint; cannot check that data.dir is unchanged")
        return
    changes = []
    if saved["tokenizer_sha256"] != now["tokenizer_sha256"]:
        changes.append(
            f"the tokenizer file differs (SHA-256 {saved['tokenizer_sha256'][:12]}... then, "
            f"{now['tokenizer_sha256'][:12]}... now)"
        )
    if saved["vocab_size"] != now["vocab_size"]:
        changes.append(f"vocab_size {saved['vocab_size']} then, {now['vocab_size']} now")
    short = lambda v: v[:12] + "..." if isinstance(v, str) and len(v) > 16 else v  # noqa: E731 (digests)
    for name in sorted(set(saved["splits"]) | set(now["splits"])):
        a, b = saved["splits"].get(name, {}), now["splits"].get(name, {})
        changes += [
            f"{name} split {k} {short(a.get(k))} then, {short(b.get(k))} now"
            for k in _SPLIT_KEYS
            if a.get(k) != b.get(k)
        ]
    if changes:
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: the data in data.dir={data_dir} is not what it was trained on: "
            f"{'; '.join(changes[:3])}{' ...' if len(changes) > 3 else ''}. Use the original data, another "
            f"train.out_dir, or checkpoint.resume=none"
        )


def check_resume_compatible(
    cfg: DictConfig, ckpt_dir: str, state: dict, global_batch: int, engine_kind: str, world_size: int
) -> None:
    """Refuse a checkpoint this run cannot continue (other engine family, model or sequence length,
    a DeepSpeed checkpoint without the full state that another world size needs).

    single and ddp checkpoints are the same files (full weights and optimizer state); DeepSpeed's
    are ZeRO partitions only DeepSpeed reads, so the two families cannot resume each other.
    """
    saved_ds, now_ds = state.get("engine") == "deepspeed", engine_kind == "deepspeed"
    if saved_ds and not now_ds:
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: it was written by the DeepSpeed engine; resume it under the deepspeed "
            f"launcher (`deepspeed train.py ...`) or with train.engine=deepspeed, or set checkpoint.resume=none"
        )
    if now_ds and not saved_ds:
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: it was written by the {state.get('engine')} engine, and this run uses "
            f"DeepSpeed; resume it with python train.py / torchrun, or set checkpoint.resume=none"
        )
    saved_world = state.get("world_size", world_size)
    if now_ds and saved_world != world_size and not has_full_state(ckpt_dir):
        raise CheckpointError(
            f"cannot resume from {ckpt_dir} on {world_size} process(es): it was saved by {saved_world} and has no "
            f"{FULL_STATE_FILE} (it predates elastic resume), so its ZeRO partitions cannot be re-split; "
            f"resume it on {saved_world} process(es)"
        )
    saved = OmegaConf.load(os.path.join(ckpt_dir, ckpt.CONFIG_FILE))
    for key in saved.model:
        if key != "preset" and saved.model[key] != cfg.model.get(key):
            raise CheckpointError(
                f"cannot resume from {ckpt_dir}: it was trained with model.{key}={saved.model[key]}, "
                f"this config gives {cfg.model.get(key)}. Use another train.out_dir or checkpoint.resume=none"
            )
    if saved.data.seq_len != cfg.data.seq_len:
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: data.seq_len was {saved.data.seq_len}, now {cfg.data.seq_len}"
        )
    if state["global_batch_size"] != global_batch or state["seed"] != cfg.train.seed:
        log.warning(
            f"warning: resuming with global batch {global_batch} / seed {cfg.train.seed} (checkpoint: "
            f"{state['global_batch_size']} / {state['seed']}); the data order differs from the original run"
        )
