"""Which checkpoint a run resumes from, and whether it may: chosen and verified by rank 0 before
anything in it is loaded, the choice shared with every rank, then checked against the config.

checkpoint.resume=auto takes the newest checkpoint of the run folder's current line (training/
checkpoint.py: the checkpoint saved last and its ancestors) that passes `verify_checkpoint`,
warning about each newer one it skips and naming its bad file (a truncated or altered file, e.g.
after a disk fault or an interrupted copy); the run then retrains the steps after it.
checkpoint.resume=PATH takes that one or fails; checkpoint.resume=none starts from scratch. Either
of them, when it is not the latest checkpoint of the current line, starts a branch: a new line that
plain reruns follow from then on, announced by a warning; the old line is kept (training/
checkpoint.py, "Lineage").

Collectives. Every rank enters every collective here whatever it found: a rank that fails a
check (a checkpoint it cannot read, a path it cannot resolve) still joins the all-reduce that
shares the outcome, and then every rank raises. A rank that returned or raised before a
collective its peers entered would pair its next collective with theirs: a hang, or ranks that
silently disagree.

Rank 0 also removes the run's leftover staging and trash folders and looks at what else is under
checkpoints/: entries without the run's stamp are left alone with a warning, or refused when they
hold a name the run would save under (`checkpoint.foreign_entries`).
"""

from __future__ import annotations

import hashlib
import os

from omegaconf import DictConfig, OmegaConf

from training import checkpoint as ckpt
from training.checkpoint import CheckpointError
from training.zero_elastic import FULL_STATE_FILE, has_full_state
from utils.logs import get_logger

log = get_logger("train")

_NONE, _EXPLICIT = 0.0, 1.0  # codes of rank 0's choice; step s of the run folder is 2 + s


def find_resume(cfg: DictConfig, ckpt_root: str, engine, run_id: str | None) -> str | None:
    """Collective. The checkpoint to resume from (None: start from scratch).

    Only rank 0 reads stamps and hashes files (run_id: the run folder's, known on rank 0); it
    sends a code for its choice, so the ranks cannot disagree, and a refusal reaches every rank
    (none is left waiting in a collective). Every rank resolves an explicit PATH itself; one
    that cannot still joins the all-reduce, and every rank refuses.
    """
    mode = cfg.checkpoint.resume
    explicit = None
    code, error = _NONE, None
    if mode not in ("auto", "none"):
        if os.path.realpath(mode) == os.path.realpath(cfg.train.out_dir):
            mode = "auto"  # the run folder itself: its latest checkpoint, i.e. what auto takes
        else:
            try:
                explicit = ckpt.resolve_checkpoint(mode, key="checkpoint.resume")
            except CheckpointError as e:
                error = e
    if engine.is_main and error is None:
        try:
            path = _choose(mode, explicit, ckpt_root, run_id)
            start = 0 if path is None else ckpt.read_trainer_state(path)["step"]
            for entry in ckpt.foreign_entries(ckpt_root, run_id, start):
                log.warning(f"warning: {entry} is not a checkpoint of this run (it has no stamp of it): left as it is")
            if path is not None:
                code = _EXPLICIT if explicit is not None else 2.0 + start
        except CheckpointError as e:
            error = e
    code, failed = engine.all_reduce_sum([code if engine.is_main else 0.0, float(error is not None)])
    if failed:
        raise error or CheckpointError("another rank refused to resume (its message says why)")
    if code == _NONE:
        return None
    return explicit if code == _EXPLICIT else os.path.join(ckpt_root, ckpt.step_dir_name(int(code) - 2))


def check_resume(cfg: DictConfig, path: str, engine, global_batch: int, data_id: dict) -> tuple[dict, dict]:
    """Collective. (trainer_state, stamp) of checkpoint `path` (the same on every rank, from
    `find_resume`) after `check_resume_compatible` and `check_same_data` passed on every rank.

    Each rank reads the checkpoint itself; a failure on any rank (CheckpointError, or OSError for a
    file it cannot read) is shared by one all-reduce that every rank enters, then raised on every
    rank, before any rank starts the engine's collective load."""
    saved, stamp, error = {}, {}, None
    try:
        saved = ckpt.read_trainer_state(path)
        stamp = ckpt.read_stamp(path) or {}  # none in a checkpoint of an earlier version
        check_resume_compatible(cfg, path, saved, global_batch, engine.kind, engine.world_size)
        check_same_data(path, saved, data_id, cfg.data.dir)
    except CheckpointError as e:
        error = e
    except (OSError, ValueError, KeyError) as e:
        error = CheckpointError(f"cannot resume from {path} on rank {engine.rank}: {e}")
    (failed,) = engine.all_reduce_sum([float(error is not None)])
    if failed:
        raise error or CheckpointError(f"another rank cannot resume from {path} (its message says why)")
    return saved, stamp


def _first_intact(line: list[ckpt.Stamped]) -> ckpt.Stamped | None:
    """The newest checkpoint of `line` (newest first) that verifies; each one skipped is a warning
    naming its bad file."""
    for c in line:
        try:
            ckpt.verify_checkpoint(c.path)
            return c
        except CheckpointError as e:
            log.warning(f"warning: skipping checkpoint {c.path}: {e}")
    return None


def _choose(mode: str, explicit: str | None, ckpt_root: str, run_id: str | None) -> str | None:
    """Rank 0: the checkpoint to resume from (verified), None for a fresh start, or CheckpointError.
    Anything but the latest checkpoint of the folder's current line starts a branch: said in one
    warning line; nothing is moved or deleted for it (training/checkpoint.py, "Lineage")."""
    line = ckpt.current_line(ckpt_root, run_id)
    if mode == "auto":
        current = _first_intact(line)
        if line and current is None:
            raise CheckpointError(
                f"no intact checkpoint in {ckpt_root} (each one is listed above with what is wrong); "
                f"move them away or set checkpoint.resume=none to start over"
            )
        return current.path if current else None
    if explicit is not None:
        ckpt.verify_checkpoint(explicit)
    if line and (explicit is None or os.path.realpath(explicit) != os.path.realpath(line[0].path)):
        origin = "from scratch" if explicit is None else f"from {explicit}"
        log.warning(
            f"warning: checkpoint.resume={mode} branches off: this run starts a new line of checkpoints {origin}, "
            f"and plain reruns follow it; the line that ends in {line[0].path} stays, except that a checkpoint of "
            f"it is renamed step_X.abandoned-ID when this line saves its step"
        )
    return explicit


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
