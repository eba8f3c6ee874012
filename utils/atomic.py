"""Atomic outputs: a file or a folder appears under its final name complete, or not at all.

Why: whoever reads an output (training, evaluation, the up-to-date check of a rerun) must never
see half of one, and a run that fails or is killed must never have destroyed the previous good
output. The recipe is the same everywhere: write under a temporary name *beside* the target (same
folder, hence same file system, so that the rename is one step and never a copy), flush it to
disk (fsync), rename it onto the target, and fsync the folder so that the rename itself survives
a power cut.

* ``AtomicFile`` / ``write_text`` / ``write_bytes``: one file.
* ``replace_dir``: a whole folder, built in a staging folder beside the target and swapped in at
  the end; the old folder is removed only after the new one has taken its place.
* ``check_replaceable``: refuses to clobber a folder that is not an output of the expected kind,
  recognised by a marker file (e.g. a manifest) that only that kind of output contains.
* ``locked``: an exclusive lock for building a target; ``remove_stale``: clears what killed runs
  left beside it.

Every temporary name is ``.<target name>.<pid>-<random hex>.partial``: hidden, unique per writer,
and recognisable, so that leftovers of killed runs can be told apart from anything else. The
module knows nothing about data preparation; checkpoints and exports can use it as it is.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

SUFFIX = ".partial"


class NotReplaceableError(FileExistsError):
    """The target exists and is not an output this program may replace (one-line message)."""


def named(e: OSError, path: str | os.PathLike) -> OSError:
    """``e`` if it names a file, else the same error naming ``path``: a failed ``write()`` or
    ``fsync()`` (full disk, I/O error) names none, and a message must say which file it was."""
    if e.filename is not None or e.errno is None:
        return e
    return OSError(e.errno, e.strerror, str(path))


def temp_path(target: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``target`` (see the module docstring for its form)."""
    t = Path(target)
    return t.with_name(f".{t.name}.{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}")


def _temp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.\d+-[0-9a-f]{{8}}{re.escape(SUFFIX)}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes the entries of folder ``path`` (a rename into it) durable. Best effort: some
    platforms and file systems cannot open or fsync a folder, and then there is nothing to do."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A file written under a temporary name beside ``path`` and renamed onto ``path`` by
    ``commit()`` (after an fsync), or deleted by ``abort()``. ``self.file`` is the open file
    object (for writers that want one, e.g. ``torch.save``); ``write()`` names the file in its
    errors. As a context manager it commits on success and aborts on any exception, so that
    ``with AtomicFile(p) as af: af.write(...)`` either replaces ``p`` whole or leaves it as it
    was. The file is created exclusively (mode "x") with the usual permissions (umask applies)."""

    def __init__(self, path: str | os.PathLike, mode: str = "wb", encoding: str | None = None):
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.file = open(self.tmp, mode.replace("w", "x"), encoding=encoding)
        self.done = False

    def write(self, data) -> None:
        """``self.file.write(data)``; an error names the file."""
        try:
            self.file.write(data)
        except OSError as e:
            raise named(e, self.tmp) from e

    def commit(self) -> Path:
        """Flush, fsync, rename onto the final name; returns it. An error names the file."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise named(e, self.tmp) from e
        except BaseException:
            self.abort()
            raise
        self.done = True
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file; the final name is not touched."""
        if self.done:
            return
        self.done = True
        try:
            self.file.close()
        except OSError:  # a full disk fails the close as well; the file is going anyway
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replaces ``path`` with ``data`` atomically (temporary file, fsync, rename)."""
    with AtomicFile(path, "wb") as af:
        af.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replaces ``path`` with the UTF-8 ``text`` atomically (temporary file, fsync, rename)."""
    with AtomicFile(path, "w", encoding="utf-8") as af:
        af.write(text)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps the entries ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so
    that ``b`` is never missing. False where the platform or file system cannot do it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(staging: Path, target: Path) -> None:
    """Puts the folder ``staging`` at ``target`` and removes what was there. A missing or empty
    target is replaced by a plain rename. Otherwise the two are exchanged in one step where the
    system can; elsewhere the old target is first renamed aside, so that a crash between the two
    renames leaves it complete under its temporary name rather than lost."""
    try:
        os.rename(staging, target)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _exchange(staging, target):
        old = staging
    else:
        old = temp_path(target)
        os.rename(target, old)
        os.rename(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(old)


@contextmanager
def replace_dir(target: str | os.PathLike):
    """Yields a new, empty staging folder beside ``target``. When the block ends normally the
    staging folder takes ``target``'s place (see ``_swap_in``) and the old ``target`` is removed;
    when it raises, the staging folder is removed and ``target`` is left exactly as it was.

    The caller decides whether ``target`` may be replaced (``check_replaceable``) and keeps other
    writers away (``locked``). A symlinked ``target`` is resolved: the folder it points to is
    replaced and the link is kept. Needs room for the old and the new folder at once."""
    target = Path(os.path.realpath(target))
    staging = temp_path(target)
    os.mkdir(staging)
    try:
        yield staging
        fsync_dir(staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_replaceable(
    target: str | os.PathLike,
    *,
    marker: str,
    kind: str,
    is_kind: Callable[[Path], bool] = Path.is_file,
    owned: Callable[[str], bool] = lambda name: True,
    overwrite: bool = False,
) -> None:
    """Raises ``NotReplaceableError`` unless ``target`` may be replaced by a new output of
    ``kind``: it does not exist; or it is a folder whose entries are all temporaries or lock
    files (``*.partial``, ``.lock``: what an interrupted run leaves); or it holds the file
    ``marker`` for which ``is_kind(path)`` is true and every entry's name passes ``owned`` (so
    that no file the program did not write is deleted with it). ``overwrite=True`` accepts any
    folder. A target that is not a folder is always refused."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise NotReplaceableError(f"{target} exists and is not a folder; choose another output path")
    if overwrite:
        return
    names = sorted(os.listdir(target))
    if all(n.endswith(SUFFIX) or n == ".lock" for n in names):
        return
    hint = "pass --overwrite to replace it with everything in it, or choose another output path"
    if not is_kind(target / marker):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise NotReplaceableError(f"{target} is not empty ({shown}) and is not a {kind} (no valid {marker}); {hint}")
    foreign = [n for n in names if not owned(n)]
    if foreign:
        raise NotReplaceableError(
            f"{target} is a {kind} but also holds files it did not write ({', '.join(foreign[:5])}); {hint}"
        )


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of ``target``: beside it, because ``replace_dir`` swaps the folder itself
    (a lock file inside would be a different file before and after the swap)."""
    t = Path(os.path.realpath(target))
    return t.with_name(f".{t.name}.lock")


@contextmanager
def locked(target: str | os.PathLike):
    """Holds an exclusive lock on ``target`` (``flock`` on ``lock_path(target)``) for the block,
    so that concurrent builders of one target run one after the other. The lock file stays after
    use: deleting it would let a waiter lock a file that a newcomer no longer sees. Without
    ``fcntl`` (Windows) there is no lock and callers must not build one target concurrently."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path(target), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def remove_stale(target: str | os.PathLike) -> list[Path]:
    """Deletes the temporaries of ``target`` that killed runs left beside it (names of the form
    in the module docstring, files or folders) and returns them. Only call it while holding
    ``locked(target)``, else it may delete the temporaries of a run still in progress."""
    t = Path(os.path.realpath(target))
    pat = _temp_pattern(t.name)
    gone = []
    for p in t.parent.iterdir() if t.parent.is_dir() else ():
        if pat.fullmatch(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            gone.append(p)
    return gone
