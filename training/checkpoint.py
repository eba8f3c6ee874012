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
        trainer_state.json              step, tokens, skipped steps, checkpoint id, parent ...
        stamp.json                      the run's stamp: run id, checkpoint id, parent (written first)
        manifest.json                   size and SHA-256 of every other file (written last)

Atomicity: everything is written into `.tmp-step_X/`, flushed to disk, and only then renamed to
`step_X/` (a rename within one directory is atomic on POSIX). A process killed at any moment leaves
either the complete new folder or none, next to the previous checkpoints. Old checkpoints are first
renamed to `.trash-step_X-ID/` and then deleted, so a kill during pruning cannot leave a
half-deleted `step_*` folder either. Multi-node runs need OUT_DIR on a filesystem all nodes share
(DeepSpeed writes one optimizer partition per rank; checked at start by
training/dist_env.py:check_shared_out_dir). The manifest's digests are computed in shares by all
ranks (`shared_digests`) and written by rank 0. This is the recipe of utils/atomic.py (stage
beside, fsync, rename, fsync the folder), with one difference: the staging name is derived from the
step, not random, because every rank must find the same folder to write its files into.

Ownership: the stamp. The first file of every staging folder is stamp.json: the run id of the run
folder (OUT_DIR/.hyena-rtf-run.json, training/runlock.py), a random checkpoint id, the step, the
parent checkpoint's id and a save counter. It stays in the checkpoint (listed in its manifest, also
recorded in trainer_state.json) and in the trash folder (it is deleted last). An entry under
checkpoints/ belongs to the run only if its stamp carries the run id and the entry has the exact
name the run gave it (`step_X`, `.tmp-step_X`, `.trash-step_X-ID` for that stamp's step and id).
Only such entries are ever deleted or renamed; leftovers `.tmp-*` / `.trash-*` of the run are
removed at the next start. Anything else there is the user's, whatever its name: it is left alone
with a warning, and a run refuses to start (one line) when such an entry holds a name the run may
save under (`step_X` or `.tmp-step_X` past the step it starts from). A second Ctrl-C during a save
(training/preemption.py) abandons the staging folder, stamped, for the next start to remove.
Checkpoints of versions before the stamp are read (resume=PATH, export) but never deleted.
Inside a checkpoint the run deletes only what it wrote there: the files its manifest lists, then
the manifest and the stamp. A file or folder a user stored in a checkpoint (eval.json, notes)
survives its pruning: the folder keeps its name, without the stamp (so it is the user's from then
on), and a warning names what was kept. A checkpoint whose manifest is unreadable is not pruned.

Lineage. Each checkpoint names its parent: the checkpoint its run resumed from, or the one the same
run saved before. Following parents from the checkpoint saved last (highest save counter) gives the
run folder's current line. `checkpoint.resume=auto` takes the newest checkpoint of that line that
verifies (skipping bad ones with a warning), never one of another line; pruning
(`checkpoint.keep_last`) keeps the newest `keep_last` checkpoints of the line that ends in the one
just saved, and deletes only older checkpoints of that same line. Hence a corrupt checkpoint that a
resume skipped is never what is kept, the newest intact checkpoint is never deleted, and the
checkpoint the run resumed from goes only once a newer one of its line exists. When a save meets a
checkpoint of another line under its name (one that resume skipped as corrupt, or an abandoned
one), that one is renamed aside to `step_X.abandoned-ID/`, never deleted.

Branching back is explicit and keeps everything: `checkpoint.resume=PATH` naming an older
checkpoint (of this folder or another) or `checkpoint.resume=none`, in a folder whose line goes
further, starts a new line from there, announced by a warning line. Its checkpoints name PATH's as
their parent, so its pruning never touches the old line, and since its saves are the latest, plain
reruns (`resume=auto`) follow the new line, never silently the abandoned one. The old line's
checkpoints stay where they are until the new line saves the same step; then the old one is renamed
aside as above. To keep the two lines in separate folders instead, branch into a new folder:
`train.out_dir=NEW checkpoint.resume=PATH`.

Verification (`verify_checkpoint`), before anything in a checkpoint is loaded, on resume and on
export: the files of manifest.json must be on disk with its sizes and SHA-256 digests, and no file
that a load could pick up may have been added (DeepSpeed loads every `*_optim_states.pt` it finds
in its sub-folder, and the loaders open model.pt, rng_rank{R}.pt ... by name: `could_be_loaded`).
Other added files (a user's eval.json or notes beside the weights) are ignored: they cannot change
what is loaded. What that guarantees: what is loaded is byte for byte what its save wrote, with no
file missing, truncated, altered or slipped in, at the moment of the check. What it does not: the manifest is not
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

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from training.engine import DS_TAG, Engine, TorchEngine
from training.preemption import deferred
from training.rng import RngFileError, load_rng, save_rng
from training.runlock import read_run_id
from utils.atomic import fsync_dir, write_text
from utils.logs import get_logger

log = get_logger("train")

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "hyena-rtf-checkpoint/1"
STAMP_FILE = "stamp.json"
STAMP_FORMAT = "hyena-rtf-checkpoint-stamp/1"
_STEP_RE = re.compile(r"^step_(\d+)$")
_STAGING_RE = re.compile(r"^\.tmp-step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, altered or incompatible; the message names the file."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root` as (step, path), oldest first, recognised by name, for
    reading (runs of earlier versions, tools); what a run may prune is `own_checkpoints`."""
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
    """A checkpoint folder, or a run folder (OUT_DIR, or its checkpoints/) meaning its latest
    checkpoint: the newest of its current line when the run folder is stamped, else (a run of an
    earlier version) the highest step. CheckpointError naming `path` (as `key=path` when it came
    from config key `key`) when there is none."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    for run_dir, root in ((path, os.path.join(path, CHECKPOINTS)), (os.path.dirname(os.path.abspath(path)), path)):
        run_id = read_run_id(run_dir)
        if run_id is None:
            latest = latest_checkpoint(root)
        else:
            line = current_line(root, run_id)
            latest = line[0].path if line else None
        if latest:
            return latest
    where = f"{key}={path}" if key else path
    if not os.path.exists(path):
        raise CheckpointError(f"{where}: no such checkpoint or run folder")
    raise CheckpointError(f"no complete checkpoint at {where} (expected {STATE_FILE} or {CHECKPOINTS}/step_*/)")


def checkpoints_root(path: str) -> str:
    """The checkpoints folder that `path` names, read as resolve_checkpoint reads it: the folder
    holding the checkpoint `path` (or the latest one of the run folder `path`, or of the checkpoints
    folder `path`), else PATH/checkpoints (a run folder that has saved nothing yet). Decided by what
    the folders hold, never by their names."""
    try:
        return os.path.dirname(os.path.abspath(resolve_checkpoint(path)))
    except CheckpointError:
        return os.path.join(path, CHECKPOINTS)


# --------------------------------------------------------------------------------------------
# Stamps, ownership and lineage
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stamped:
    """A checkpoint folder of the run: `step_X` carrying the run's stamp for step X."""

    path: str
    step: int
    checkpoint_id: str
    parent: str | None  # checkpoint id of the parent (it may live in another run folder)
    seq: int  # save counter of the run folder: higher was saved later


def new_stamp(run_id: str | None, step: int, parent: dict | None) -> dict:
    """The stamp of a checkpoint about to be saved (the save adds the counter `seq`). parent:
    {"checkpoint_id", "step", "path"} of the checkpoint it continues, None for a fresh start."""
    return {
        "format": STAMP_FORMAT,
        "run_id": run_id,
        "checkpoint_id": secrets.token_hex(8),
        "step": step,
        "parent": parent,
    }


def read_stamp(folder: str) -> dict | None:
    """The stamp in `folder` (a real folder, not a link), None when it has none or an invalid one."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        return None
    try:
        with open(os.path.join(folder, STAMP_FILE)) as f:
            stamp = json.load(f)
        ok = stamp["format"] == STAMP_FORMAT and isinstance(stamp["step"], int) and isinstance(stamp["seq"], int)
        ok = ok and isinstance(stamp["run_id"], str) and isinstance(stamp["checkpoint_id"], str)
        return stamp if ok else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _parent_id(stamp: dict) -> str | None:
    parent = stamp.get("parent")
    return parent.get("checkpoint_id") if isinstance(parent, dict) else None


def _stamp_of_run(path: str, run_id: str | None) -> dict | None:
    stamp = read_stamp(path)
    return stamp if stamp is not None and run_id is not None and stamp["run_id"] == run_id else None


def _trash_name(stamp: dict) -> str:
    return f".trash-{step_dir_name(stamp['step'])}-{stamp['checkpoint_id']}"


def _own_leftover(path: str, run_id: str | None) -> bool:
    """A staging or trash folder this run folder's runs made: stamped, under the exact name given."""
    stamp = _stamp_of_run(path, run_id)
    name = os.path.basename(path)
    return stamp is not None and name in (".tmp-" + step_dir_name(stamp["step"]), _trash_name(stamp))


def own_checkpoints(root: str, run_id: str | None) -> list[Stamped]:
    """The run's checkpoints under `root` (stamped with `run_id`, named for their step), oldest first."""
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        stamp = _stamp_of_run(path, run_id) if m else None
        if stamp is not None and stamp["step"] == int(m.group(1)):
            found.append(Stamped(path, stamp["step"], stamp["checkpoint_id"], _parent_id(stamp), stamp["seq"]))
    return sorted(found, key=lambda c: (c.step, c.seq))


def line_of(tip: Stamped, checkpoints: list[Stamped]) -> list[Stamped]:
    """`tip` and its ancestors among `checkpoints`, newest first (parents followed by id)."""
    by_id = {c.checkpoint_id: c for c in checkpoints}
    line, seen, c = [], set(), tip
    while c is not None and c.checkpoint_id not in seen:
        line.append(c)
        seen.add(c.checkpoint_id)
        c = by_id.get(c.parent) if c.parent else None
    return line


def current_line(root: str, run_id: str | None) -> list[Stamped]:
    """The run folder's current line, newest first: the checkpoint saved last and its ancestors."""
    own = own_checkpoints(root, run_id)
    return line_of(max(own, key=lambda c: (c.seq, c.step)), own) if own else []


def _remove_owned(path: str) -> None:
    """Delete a stamped staging folder whole, with its stamp last, so that an interruption
    anywhere leaves it recognisable (and removed at the next start). Only for `.tmp-step_X`
    folders, which have no manifest yet (it is written last): the run created the folder a moment
    ago under a hidden name and everything in it is the save's. Failures are warnings: the run
    goes on."""
    try:
        for name in os.listdir(path):
            if name != STAMP_FILE:
                p = os.path.join(path, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
        os.unlink(os.path.join(path, STAMP_FILE))
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning(f"warning: could not delete {path}: {e.strerror} ({e.filename}); delete it by hand")


def _manifest_files(ckpt_dir: str) -> list[str] | None:
    """The relative paths manifest.json lists (only plain paths inside the folder), or None when
    it is missing or unreadable."""
    try:
        with open(os.path.join(ckpt_dir, MANIFEST_FILE)) as f:
            listed = json.load(f)["files"]
        rels = list(listed) if isinstance(listed, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if rels is None:
        return None
    # a forged or damaged entry must not name a file outside the folder
    return [r for r in rels if isinstance(r, str) and not os.path.isabs(r) and ".." not in r.split("/")]


def _discard_trash(trash: str, name: str) -> None:
    """Delete what the run wrote in a pruned checkpoint, now at `trash` (`.trash-step_X-ID`): the
    files its manifest lists (and the sub-folders they leave empty), then manifest.json, then the
    stamp, last, so that an interruption leaves it recognisable and finished at the next start.
    What the run did not write (a user's notes or evaluation stored beside the weights) stays:
    the folder then goes back to its name `name` (step_X), without the stamp, so it is the user's
    from then on, and a warning names what was kept. A trash folder without a manifest is one
    whose removal was interrupted after the manifest went: only the stamp is left of the run's.
    Failures are warnings: the run goes on."""
    try:
        for rel in _manifest_files(trash) or []:
            if rel == STAMP_FILE:  # listed too, but deleted last
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(trash, rel))
            parent = os.path.dirname(rel)
            while parent:  # the run's sub-folders (deepspeed/) go once empty, never a user's file
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(trash, parent))
                parent = os.path.dirname(parent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(trash, MANIFEST_FILE))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(trash, STAMP_FILE))
        kept = sorted(os.listdir(trash))
        if not kept:
            os.rmdir(trash)
            return
        folder = os.path.join(os.path.dirname(trash), name)
        if not os.path.lexists(folder):
            os.rename(trash, folder)
        where = "" if os.path.isdir(folder) and not os.path.lexists(trash) else f" (now {trash})"
        log.warning(
            f"warning: pruned checkpoint {folder} but kept the folder{where}: it holds files the run did not "
            f"write ({', '.join(kept)}); only the checkpoint's own files were deleted"
        )
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning(f"warning: could not delete {trash}: {e.strerror} ({e.filename}); delete it by hand")


def cleanup_partial(root: str, run_id: str | None) -> None:
    """Delete this run folder's leftovers of interrupted saves and prunes (rank 0, before
    training): `.tmp-*` / `.trash-*` entries carrying the run's stamp under the name it gave
    them. Anything else is left (see `foreign_entries`)."""
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        path = os.path.join(root, name)
        if name.startswith(".tmp-") and _own_leftover(path, run_id):
            _remove_owned(path)
        elif name.startswith(".trash-") and _own_leftover(path, run_id):
            _discard_trash(path, step_dir_name(_stamp_of_run(path, run_id)["step"]))


def foreign_entries(root: str, run_id: str | None, start_step: int) -> list[str]:
    """Entries under `root` that carry no stamp of this run (the user's, left as they are), for a
    run that starts from `start_step`. CheckpointError (one line) when one of them holds a name
    the run may save under: `step_X` or `.tmp-step_X` with X > start_step (a stamped folder of the
    run under a name that is not its own counts as the user's copy)."""
    foreign = []
    own = {c.path for c in own_checkpoints(root, run_id)}
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        path = os.path.join(root, name)
        m = _STEP_RE.match(name) or _STAGING_RE.match(name)
        if m and int(m.group(1)) > start_step and path not in own:
            stamp_file = os.path.join(path, STAMP_FILE)
            if os.path.isfile(stamp_file) and read_stamp(path) is None:  # a damaged stamp is no proof either way
                raise CheckpointError(
                    f"{stamp_file} is unreadable or damaged, so {path} cannot be told to be this run's checkpoint; "
                    f"it is in the way of the checkpoints this run saves: move it out of {root} (train.py never "
                    f"deletes or renames what it cannot prove it wrote)"
                )
            raise CheckpointError(
                f"{path} is not a checkpoint of this run (it carries no {STAMP_FILE} of it) and is in the way "
                f"of the checkpoints this run saves; move it out of {root} (train.py never deletes or renames "
                f"what it did not write)"
            )
        if _stamp_of_run(path, run_id) is None:
            foreign.append(path)
    return foreign


def _set_aside(final: str, run_id: str | None) -> str:
    """Rename the run's checkpoint `final` (of another line: skipped as corrupt, or abandoned),
    which a save of the same step meets, to `step_X.abandoned-ID`; returns the new path."""
    stamp = _stamp_of_run(final, run_id)
    if stamp is None or os.path.basename(final) != step_dir_name(stamp["step"]):
        raise CheckpointError(
            f"cannot save checkpoint {final}: a folder of that name that this run did not write appeared during "
            f"the run; move it away, then rerun to resume"
        )
    aside = f"{final}.abandoned-{stamp['checkpoint_id']}"
    if os.path.lexists(aside):  # a rename onto an empty folder would replace it: not ours to replace
        raise CheckpointError(f"cannot save checkpoint {final}: {aside} is in the way; move it away, then rerun")
    os.rename(final, aside)
    log.warning(
        f"warning: {final} belonged to a line of checkpoints this run does not continue; kept as {aside} "
        f"(delete it when you no longer need it)"
    )
    return aside


def _write_stamp(folder: str, stamp: dict) -> None:
    with open(os.path.join(folder, STAMP_FILE), "x") as f:
        f.write(json.dumps(stamp, indent=1))
        f.flush()
        os.fsync(f.fileno())


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


def write_manifest(ckpt_dir: str, digests: dict[str, str] | None = None) -> None:
    """manifest.json: size and SHA-256 of every file of the checkpoint (call after all are written).
    `digests` (relative path -> hex SHA-256), where given, are taken as computed (by `shared_digests`),
    the other files are hashed here."""
    rels = _files(ckpt_dir)
    known = digests or {}
    todo = [r for r in rels if r not in known]
    hashed = {**known, **dict(zip(todo, _digests(ckpt_dir, todo)))}
    files = {r: {"bytes": os.path.getsize(os.path.join(ckpt_dir, r)), "sha256": hashed[r]} for r in rels}
    with open(os.path.join(ckpt_dir, MANIFEST_FILE), "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, f, indent=1)


def hash_shares(sizes: list[int], world_size: int) -> list[int]:
    """The rank that hashes each file (by index): largest files first, each to the rank with the
    fewest bytes so far (the lowest rank on ties). A pure function of the listing, so every rank
    computes the same shares without a message."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def _listing_key(ckpt_dir: str, rels: list[str]) -> int:
    """52 bits of a digest of (path, size) of every file: equal on ranks that see the same listing."""
    text = "\n".join(f"{r}\t{os.path.getsize(os.path.join(ckpt_dir, r))}" for r in rels)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 12


def shared_digests(engine: Engine, ckpt_dir: str) -> dict[str, str]:
    """Collective: the SHA-256 of every file in ckpt_dir (manifest excepted), each hashed by one
    rank (`hash_shares`), assembled on rank 0 (the other ranks get {}). Call it once every rank's
    files are written and flushed.

    Two all-reduces: the first checks that every rank lists the same files with the same sizes
    (max and min of a digest of the listing); where they differ (a filesystem whose listing lags),
    rank 0 hashes everything itself, as before; the second sums the digests, each row filled in by
    its one hashing rank and zero elsewhere, so the sum is exact."""
    rels = _files(ckpt_dir)
    if engine.world_size == 1:
        return dict(zip(rels, _digests(ckpt_dir, rels)))
    key = _listing_key(ckpt_dir, rels)
    agree = engine.all_reduce_(
        torch.tensor([len(rels), key, -len(rels), -key], dtype=torch.int64), torch.distributed.ReduceOp.MAX
    )
    n_max, key_max, n_min, key_min = agree.tolist()
    if (n_max, key_max) != (-n_min, -key_min):
        return {}  # write_manifest hashes them all on rank 0
    owner = hash_shares([os.path.getsize(os.path.join(ckpt_dir, r)) for r in rels], engine.world_size)
    mine = [r for r, o in zip(rels, owner) if o == engine.rank]
    table = torch.zeros(len(rels), 32, dtype=torch.int64)
    index = {r: i for i, r in enumerate(rels)}
    for r, h in zip(mine, _digests(ckpt_dir, mine)):
        table[index[r]] = torch.tensor(list(bytes.fromhex(h)), dtype=torch.int64)
    table = engine.all_reduce_(table)
    if not engine.is_main:
        return {}
    return {r: bytes(row).hex() for r, row in zip(rels, table.cpu().tolist())}


# Files a checkpoint of any engine holds at its top level, which the loaders open by name.
_CHECKPOINT_NAMES = frozenset(
    {STATE_FILE, CONFIG_FILE, TOKENIZER_FILE, STAMP_FILE, "model.pt", "optimizer.pt", "zero_full_state.pt", "latest"}
)


def could_be_loaded(rel: str) -> bool:
    """Whether a file at `rel` (relative, '/'-separated) inside a checkpoint could be read by a
    resume or an export if it were there: anything under the DeepSpeed sub-folder (DeepSpeed globs
    it, e.g. every `*_optim_states.pt`), a top-level file with a name a checkpoint's own files
    have (`rng_rank{R}.pt` of a rank the saving run did not have included), or any torch file.
    Other files a user adds (eval.json, NOTES.txt, a folder of results) cannot change what is
    loaded, so verification ignores them instead of treating the checkpoint as corrupt."""
    top, _, rest = rel.partition("/")
    if rest:
        return top == DS_TAG
    return top in _CHECKPOINT_NAMES or top.endswith(".pt")


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
        if rel not in listed and could_be_loaded(rel):
            raise CheckpointError(
                f"{os.path.join(ckpt_dir, rel)} is not part of the checkpoint (not in {MANIFEST_FILE}) and would be "
                f"loaded with it; move it out of {ckpt_dir}"
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
    stamp: dict,
) -> str:
    """Collective: every rank calls it. Returns the final checkpoint path.

    stamp: `new_stamp(...)` for this checkpoint (used on rank 0). After the save, rank 0 prunes
    the line that ends in it to `keep_last` checkpoints (see the module docstring).

    A write that fails (full or read-only disk) raises CheckpointError naming the checkpoint and
    the reason, after removing the partial folder; the previous checkpoints are untouched."""
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, ".tmp-" + step_dir_name(step))
    try:
        return _save_checkpoint(engine, root, step, trainer_state, config_yaml, tokenizer_file, keep_last, stamp)
    except OSError as e:
        if engine.is_main and (read_stamp(tmp) or {}).get("checkpoint_id") == stamp["checkpoint_id"]:
            _remove_owned(tmp)  # ours, and it frees the space it took
        where = f" ({e.filename})" if e.filename else ""
        raise CheckpointError(
            f"cannot write checkpoint {final}: {e.strerror or e}{where}; the previous checkpoints in {root} are intact"
        ) from None


def _save_checkpoint(engine, root, step, trainer_state, config_yaml, tokenizer_file, keep_last, stamp) -> str:
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, ".tmp-" + step_dir_name(step))
    run_id = stamp["run_id"]
    if engine.is_main:
        os.makedirs(root, exist_ok=True)
        if os.path.lexists(tmp):  # an earlier attempt of this run, or someone else's folder
            if not _own_leftover(tmp, run_id):
                raise CheckpointError(
                    f"cannot save checkpoint {final}: {tmp} is in the way and was not written by this run; "
                    f"move it away, then rerun to resume"
                )
            _remove_owned(tmp)
        own = own_checkpoints(root, run_id)
        stamp = {**stamp, "seq": 1 + max((c.seq for c in own), default=0)}
        with deferred():  # the staging folder never exists without its stamp
            os.mkdir(tmp)
            _write_stamp(tmp, stamp)
        # The small files first, so that every file but the manifest exists at the barrier below.
        write_text(os.path.join(tmp, CONFIG_FILE), config_yaml)
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, os.path.join(tmp, TOKENIZER_FILE))
        write_text(os.path.join(tmp, STATE_FILE), json.dumps(trainer_state, indent=2))
    engine.barrier()
    engine.save(tmp)
    save_rng(os.path.join(tmp, f"rng_rank{engine.rank}.pt"))
    engine.barrier()  # every rank's files are in tmp
    # Every rank hashes its share of the files (rank 0 alone took as long as reading the whole
    # checkpoint, ~36 GB at 1.3b, while the others waited).
    digests = shared_digests(engine, tmp)
    if engine.is_main:
        write_manifest(tmp, digests)
        _fsync_tree(tmp)
        with deferred():
            if os.path.lexists(final):  # a checkpoint of another line (training/resume.py)
                _set_aside(final, run_id)
            os.replace(tmp, final)
            fsync_dir(root)
        saved = Stamped(final, step, stamp["checkpoint_id"], _parent_id(stamp), stamp["seq"])
        prune(root, run_id, saved, keep_last)
    engine.barrier()
    return final


def prune(root: str, run_id: str | None, saved: Stamped, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints of the line that ends in `saved` (the checkpoint
    just written, so intact); the line's older ones go to `.trash-step_X-ID` first, then what the
    run wrote in them (what their manifest lists) away (`_discard_trash`). Checkpoints of other
    lines (a corrupt one that resume skipped, an abandoned one), anything without the run's stamp,
    and a checkpoint whose manifest is unreadable (the run could not tell its files from the
    user's) are never pruned."""
    for c in line_of(saved, own_checkpoints(root, run_id))[keep_last:]:
        trash = os.path.join(root, f".trash-{os.path.basename(c.path)}-{c.checkpoint_id}")
        if os.path.lexists(trash):  # not a name the run gave: leave both
            continue
        if _manifest_files(c.path) is None:
            log.warning(
                f"warning: not pruning {c.path}: its {MANIFEST_FILE} is missing or unreadable, so the files the run "
                f"wrote cannot be told from others; delete it by hand when you no longer need it"
            )
            continue
        with deferred():
            os.rename(c.path, trash)
        _discard_trash(trash, os.path.basename(c.path))


def read_trainer_state(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
        return json.load(f)


def load_checkpoint(engine: Engine, ckpt_dir: str) -> dict:
    """Collective: restores engine (model + optimizer) and this rank's RNG state; returns trainer_state.
    The optimizer's hyper-parameters stay the config's, each changed one logged (`Engine.restore`).

    Call it on a checkpoint `verify_checkpoint` accepted. A rank without an RNG file (resuming with
    more processes than saved) keeps its seeded state; the engine re-partitions what it must
    (`trainer_state["world_size"]` is the number of processes that saved).
    """
    state = read_trainer_state(ckpt_dir)
    for change in engine.restore(ckpt_dir, state.get("world_size", engine.world_size)):
        log.info(f"{change} (the config's value applies from here on)")
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
