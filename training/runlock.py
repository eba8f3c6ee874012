"""One training run per run folder: an exclusive lock on OUT_DIR/.run.lock held for the whole run.

Two runs in one `train.out_dir` would interleave: the second resumes from the first's checkpoint
while the first keeps writing, and both append to metrics.jsonl. The main process (rank 0 under
DDP / DeepSpeed; the other ranks never touch the lock, so they cannot wait on it) takes
`fcntl.flock(LOCK_EX | LOCK_NB)` on the lock file before loading any data and keeps it until the
run returns; a second run fails at once with the holder's PID and host, which the holder writes
into the file. The kernel drops the lock when its process dies (SIGKILL included), so there is no
stale lock to clean up; the file itself stays, unlocked. If rank 0 of a multi-process run fails
here, the launcher (torchrun, deepspeed) ends the other ranks, which are still waiting for rank 0
in the rendezvous.

What it guards. Two runs on the same host: always. Runs on different hosts sharing OUT_DIR: only
where the filesystem makes flock cluster-wide. Linux NFS clients turn flock into byte-range locks
held by the NFS server (cluster-wide, unless mounted with `local_lock=flock` or `local_lock=all`);
Lustre only with the `flock` mount option (`localflock` locks per node); some FUSE and object-store
mounts keep locks per node or refuse them. Where the filesystem refuses the lock (ENOLCK,
EOPNOTSUPP) the run goes on with a warning, unguarded.

The run stamp. A run folder is this program's only if it holds OUT_DIR/.hyena-rtf-run.json, which
`claim_run_dir` writes when a run creates the folder (or finds it empty): the format name and a
random run id. Every checkpoint, staging and trash folder the run writes carries the same id
(training/checkpoint.py), and only entries carrying it are ever deleted or renamed. A folder that
holds anything else and no stamp is someone else's: a run refuses it, before touching it (not even
the lock file is created). A run of a version older than the stamp continues in a new folder:
`train.out_dir=NEW checkpoint.resume=OLD/checkpoints/step_N`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import time

from training.config import ConfigError
from utils.atomic import fsync_dir
from utils.logs import get_logger

log = get_logger("train")
LOCK_FILE = ".run.lock"
RUN_STAMP = ".hyena-rtf-run.json"
RUN_FORMAT = "hyena-rtf-run/1"


class RunLockedError(RuntimeError):
    """The run folder is locked by another run; the message names its PID and host."""


class RunLock:
    """Context manager holding the lock on `out_dir` (which must exist) while the block runs."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"train.out_dir '{self.out_dir}' is in use by another run: PID {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} holds {self.path}; wait for it to end or use another train.out_dir"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning(
                f"warning: cannot lock {self.path} ({e.strerror}): this filesystem does not support flock, "
                f"so a second run in this train.out_dir would not be refused"
            )
            return
        # Written only once the lock is ours, so whoever fails to get it reads the holder.
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # The file is kept: deleting it would let a third run lock a new file while a second still
        # waits on the old one. Emptied first, so it never names a process that no longer holds it.
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):  # the holder is between truncate and write
        return {}


def read_run_id(out_dir: str) -> str | None:
    """The run id of the stamp in `out_dir`, None when there is no valid stamp."""
    try:
        with open(os.path.join(out_dir, RUN_STAMP)) as f:
            stamp = json.load(f)
        run_id = stamp["run_id"]
        if stamp["format"] == RUN_FORMAT and isinstance(run_id, str) and run_id:
            return run_id
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def claim_run_dir(out_dir: str) -> str:
    """The run id of `out_dir`, creating the folder and its stamp when it is missing or empty.

    ConfigError (one line naming the folder) when it holds anything but is not stamped; it is then
    left exactly as it was. OSError when it cannot be created or written (the caller names it)."""
    run_id = read_run_id(out_dir)
    if run_id:
        return run_id
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        names = sorted(os.listdir(out_dir))
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ConfigError(
            f"train.out_dir '{out_dir}' is not empty ({shown}) and was not created by train.py (it has no "
            f"{RUN_STAMP}); a run never writes into someone else's folder: choose a new or empty train.out_dir "
            f"(to continue a run of an earlier version: train.out_dir=NEW checkpoint.resume=OLD/checkpoints/step_N)"
        )
    os.makedirs(out_dir, exist_ok=True)
    stamp = {"format": RUN_FORMAT, "run_id": secrets.token_hex(8), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        # O_EXCL: of two runs starting in one empty folder, one writes the stamp and both use it
        # (the run lock then admits one of them); the content is complete before it is closed.
        fd = os.open(os.path.join(out_dir, RUN_STAMP), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return claim_run_dir(out_dir)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(stamp) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(out_dir)
    return stamp["run_id"]
