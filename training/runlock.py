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
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

from hyena_rtf.utils.logs import get_logger

log = get_logger("train")
LOCK_FILE = ".run.lock"


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
