"""Atomic outputs: a file or a folder appears under its final name complete, or not at all; and an
output folder is replaced only when a stamp inside it proves this program wrote it.

Why: whoever reads an output (training, evaluation, the up-to-date check of a rerun) must never
see half of one, and a run that fails or is killed must never have destroyed the previous good
output. The recipe is the same everywhere: write under a temporary name *beside* the target (same
folder, hence same file system, so that the rename is one step and never a copy), flush it to
disk (fsync), rename it onto the target, and fsync the folder so that the rename itself survives
a power cut.

Ownership is decided by a stamp, never by a name. Every folder that ``replace_dir`` builds holds
the file ``OWNER`` (``.hyena-rtf-output.json``), written by this module: the kind of output, a
random id, and either the exact temporary name the folder was created under (while it is being
built, or once it is on its way out) or the name and size of every file the program put in it
(once complete). So:

* a folder may be replaced only if it is absent, empty, or stamped as an output of the expected
  kind and holding nothing but the files its stamp lists (``check_replaceable``); anything else is
  the user's, whatever it is called: a ``thesis.tex.partial``, a ``finetune.py`` beside an export;
* a leftover beside a target is deleted only if it is a folder whose stamp names exactly the
  temporary name it has (``remove_stale``): a user's file or folder called ``.T.123-abcd.partial``
  is kept;
* ``overwrite=True`` is the user's explicit consent to replace a folder whatever it holds (the
  CLIs' ``--overwrite``); it never lifts ``check_apart``: an output is never one of the inputs,
  inside one, or a folder that contains one.

Errors: ``NotReplaceableError`` (the target is not ours to replace, or is an input) and
``OutputError`` (the target cannot be written: read-only or missing folder, full disk, a file
removed meanwhile) are one-line messages naming the path; ``OutputError`` is a
``NotReplaceableError``, so that every caller that reports refusals as a user error (exit status
2) reports these the same way. ``check_writable`` finds an unwritable target before the long work.

* ``AtomicFile`` / ``write_text`` / ``write_bytes``: one file.
* ``replace_dir``: a whole folder, built in a stamped staging folder beside the target and
  swapped in at the end; the old folder is removed only after the new one has taken its place.
* ``locked``: an exclusive lock for building a target.

Every temporary name is ``.<target name>.<pid>-<random hex>.partial``: hidden and unique per
writer. The module knows nothing about data preparation; checkpoints and exports use it as it is.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

SUFFIX = ".partial"
# The stamp file of every folder replace_dir builds (see the module docstring).
OWNER = ".hyena-rtf-output.json"
OWNER_FORMAT = "hyena-rtf-output/1"
OVERWRITE_HINT = "pass --overwrite to replace it with everything in it, or choose another output path"


class NotReplaceableError(FileExistsError):
    """The target exists and is not an output this program may replace, or it is one of the
    inputs (one-line message)."""


class OutputError(NotReplaceableError):
    """An output cannot be written: a read-only or missing folder, a full disk, permission
    denied, a file removed by someone else meanwhile (one-line message naming the path). A
    ``NotReplaceableError`` so that callers that report refusals as user errors (exit status 2)
    report these too."""


def named(e: OSError, path: str | os.PathLike) -> OSError:
    """``e`` if it names a file, else the same error naming ``path``: a failed ``write()`` or
    ``fsync()`` (full disk, I/O error) names none, and a message must say which file it was."""
    if e.filename is not None or e.errno is None:
        return e
    return OSError(e.errno, e.strerror, str(path))


def output_error(e: OSError, target: str | os.PathLike, what: str = "") -> OutputError:
    """The one-line ``OutputError`` for ``e``, raised while writing ``target`` (``what``: e.g.
    "the export"); it names the file that failed when ``e`` does."""
    reason = e.strerror or str(e) or type(e).__name__
    where = f" ({e.filename})" if e.filename is not None and str(e.filename) != str(target) else ""
    return OutputError(f"cannot write {what + ' ' if what else ''}{target}: {reason}{where}")


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
        self.path = file_target(path)
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


def file_target(path: str | os.PathLike) -> Path:
    """The path a file output is renamed onto: ``path``, or the file a symlink at ``path`` points to
    (the link is kept, as a user who made it expects). ``OutputError`` (one line) for an empty path
    and for an existing target that is not a regular file (a folder, a device such as /dev/null or
    /dev/stdout, a FIFO, a socket): a rename would put a file in its place (for root, in place of a
    system device), so no ``--overwrite`` lifts this. Call it before the long work too."""
    if not os.fspath(path):
        raise OutputError("the output path is empty (an unset variable?); name a file")
    real = Path(os.path.realpath(path))
    if real.exists() and not real.is_file():
        what = "a folder" if real.is_dir() else "not a regular file (a device, FIFO or socket)"
        shown = f"{path} (-> {real})" if Path(path).is_symlink() else str(path)
        raise OutputError(f"cannot write {shown}: it is {what}; name a file")
    return real


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replaces ``path`` with ``data`` atomically (temporary file, fsync, rename)."""
    with AtomicFile(path, "wb") as af:
        af.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replaces ``path`` with the UTF-8 ``text`` atomically (temporary file, fsync, rename)."""
    with AtomicFile(path, "w", encoding="utf-8") as af:
        af.write(text)


# ----------------------------------------------------------------------------- the stamp


def is_json_report(path: str | os.PathLike, kind: str) -> bool:
    """Whether the file `path` is a JSON report a program of this project wrote: an object whose
    "kind" field is `kind` (the stamp a report carries in itself). Anything else at that path (a
    user's file, another program's report) is not ours to replace without --overwrite."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("kind") == kind


def read_stamp(folder: str | os.PathLike, kind: str | None = None) -> dict | None:
    """The stamp of ``folder`` (a real folder, not a link to one, holding a valid ``OWNER``
    file of the kind ``kind`` when given), else None. Valid: a JSON object of our format with
    a ``kind``, an ``id``, and ``files`` (name -> size, None for a folder) and/or ``staging``."""
    folder = Path(folder)
    try:
        if folder.is_symlink() or not folder.is_dir():
            return None
        stamp = json.loads((folder / OWNER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("format") != OWNER_FORMAT:
        return None
    if not isinstance(stamp.get("kind"), str) or not isinstance(stamp.get("id"), str):
        return None
    files, staging = stamp.get("files"), stamp.get("staging")
    if files is not None and not (
        isinstance(files, dict) and all(v is None or isinstance(v, int) for v in files.values())
    ):
        return None
    if staging is not None and not isinstance(staging, str):
        return None
    if kind is not None and stamp["kind"] != kind:
        return None
    return stamp


def _write_stamp(folder: Path, stamp: dict) -> None:
    write_text(folder / OWNER, json.dumps(stamp, sort_keys=True, indent=1) + "\n")


def _entry_size(path: Path) -> int | None:
    """What a stamp records of an entry: a regular file's size, None for anything else."""
    st = os.lstat(path)
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _listed(stamp: dict, path: Path) -> bool:
    """Whether the entry ``path`` is one the stamp lists, as it was written (same type and
    size: a file the user put in its place, or changed since, is not the program's)."""
    files = stamp.get("files") or {}
    if path.name not in files:
        return False
    try:
        return _entry_size(path) == files[path.name]
    except OSError:
        return False


def stamped_files(folder: str | os.PathLike, kind: str) -> list[str]:
    """The names the stamp of ``folder`` lists as written by the program ([] if unstamped)."""
    stamp = read_stamp(folder, kind)
    return sorted((stamp or {}).get("files") or {})


# ----------------------------------------------------------------------------- checks


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_replaceable(
    target: str | os.PathLike, *, kind: str, also_owned: tuple[str, ...] = (), overwrite: bool = False
) -> None:
    """Raises ``NotReplaceableError`` (one line naming the folder and what is in the way)
    unless ``target`` may be replaced by a new output of ``kind``: it does not exist; or it is an
    empty folder; or it holds a stamp of ``kind`` and nothing but the stamp and the files the
    stamp lists, unchanged in type and size, plus the names in ``also_owned`` (files a caller
    writes beside the output and has itself recognised by their content). ``overwrite=True``
    accepts any folder. A target that is not a folder is always refused. Names play no part: an
    unstamped folder holding only ``*.partial`` files is the user's. Nor does ``overwrite`` lift
    ``check_not_workplace``."""
    check_not_workplace(target)
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise NotReplaceableError(f"{target} exists and is not a folder; choose another output path")
    if overwrite:
        return
    names = sorted(os.listdir(target))
    if not names:
        return
    stamp = read_stamp(os.path.realpath(target), kind)
    if stamp is None:
        other = read_stamp(os.path.realpath(target))
        what = f"it is a {other['kind']}" if other else f"no stamp {OWNER} of one"
        raise NotReplaceableError(
            f"{target} is not empty ({_shown(names)}) and is not a {kind} ({what}); {OVERWRITE_HINT}"
        )
    foreign = [n for n in names if n != OWNER and n not in also_owned and not _listed(stamp, target / n)]
    if foreign:
        raise NotReplaceableError(
            f"{target} is a {kind} but also holds files it did not write ({_shown(foreign)}); {OVERWRITE_HINT}"
        )


def check_not_workplace(target: str | os.PathLike) -> None:
    """``NotReplaceableError`` (one line) for an output folder path that is empty (an unset shell
    variable: it would mean the current folder) or that is, or contains, the current working
    directory, the home folder or the file-system root, resolved through symlinks. Replacing such a
    folder would delete the user's working tree, whatever ``--overwrite`` says."""
    if not os.fspath(target):
        raise NotReplaceableError("the output folder path is empty (an unset variable?); name a folder")
    real = _real(target)
    try:
        cwd = [(_real(os.getcwd()), "the current folder")]
    except FileNotFoundError:  # the current folder was deleted: nothing of it left to protect
        cwd = []
    for place, what in [*cwd, (_real("~"), "your home folder")]:
        if real == place or real in place.parents:
            holds = "is" if real == place else "contains"
            raise NotReplaceableError(f"{target} {holds} {what} ({place}); choose an output folder of its own")
    if real == real.parent:
        raise NotReplaceableError(f"{target} is the file-system root; choose an output folder of its own")


def check_writable(target: str | os.PathLike, what: str = "output") -> None:
    """Raises ``OutputError`` (one line) when ``target`` (a file or folder to be created or
    replaced beside its siblings) cannot be written: the nearest existing folder above it is
    not writable, or is not a folder; or ``target`` is a folder that cannot be emptied (it would
    be replaced, and its old files could then not be removed). Call it before the long
    work. Root passes every permission check (not a read-only file system); a write can still
    fail later, full disk included, and callers turn that into an ``OutputError`` too."""
    target = Path(os.path.abspath(target))
    parent = next((p for p in target.parents if os.path.lexists(p)), None)
    if parent is None or not parent.is_dir():
        raise OutputError(f"cannot write {what} {target}: {parent or target.parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {target}: {parent} is not writable")
    if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise OutputError(f"cannot replace {what} {target}: it is not writable")


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def check_apart(output: str | os.PathLike, inputs, flag: str = "--out") -> None:
    """Raises ``NotReplaceableError`` (one line) when ``output`` is one of ``inputs`` (files or
    folders), inside one of them, or a folder that contains one, all compared after resolving
    symlinks (``realpath``). Whatever ``--overwrite`` says: replacing the output would delete
    the input, and an output inside an input folder would be read back as input next time.
    ``flag`` names the output in the message (``--out``; "" for the path alone)."""
    out = _real(output)
    for inp in inputs:
        src = _real(inp)
        if out == src:
            relation = "is the input"
        elif src in out.parents:
            relation = "is inside the input"
        elif out in src.parents:
            relation = "contains the input"
        else:
            continue
        named = f"{flag} {output}" if flag else str(output)
        raise NotReplaceableError(f"{named} {relation} {inp}; choose an output path apart from the inputs")


# ----------------------------------------------------------------------------- replacing a folder


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


def _mark_outgoing(old: Path, name: str) -> None:
    """Records in ``old``'s stamp (if it is ours) the temporary name it is about to take, so that
    if a crash leaves it there, ``remove_stale`` knows it for the program's and clears it. A
    folder without our stamp (replaced by consent, ``overwrite``) is left unmarked: kept if left."""
    stamp = read_stamp(old)
    if stamp is not None:
        _write_stamp(old, {**stamp, "staging": name})


def _swap_in(staging: Path, target: Path) -> None:
    """Puts the folder ``staging`` at ``target`` and removes what was there. A missing or empty
    target is replaced by a plain rename. Otherwise the two are exchanged in one step where the
    system can; elsewhere the old target is first renamed aside, so that a crash between the two
    renames leaves it complete under its temporary name rather than lost. The old folder is
    removed last, best effort: a failure there (a file in it that cannot be deleted) leaves it
    under its stamped temporary name, which the next build clears, and the new output is in place."""
    try:
        os.rename(staging, target)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    _mark_outgoing(target, staging.name)
    if _exchange(staging, target):
        old = staging
    else:
        old = temp_path(target)
        _mark_outgoing(target, old.name)
        os.rename(target, old)
        os.rename(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def replace_dir(target: str | os.PathLike, kind: str):
    """Yields a new, empty staging folder beside ``target``, stamped at once as a ``kind`` under
    construction (its stamp records its exact temporary name). When the block ends normally the
    stamp is completed with every entry of the staging folder (name and size), the staging
    folder takes ``target``'s place (see ``_swap_in``) and the old ``target`` is removed; when it
    raises (KeyboardInterrupt included), the staging folder is removed and ``target`` is left as
    it was.

    The caller decides whether ``target`` may be replaced (``check_replaceable``) and keeps other
    writers away (``locked``). A symlinked ``target`` is resolved: the folder it points to is
    replaced and the link is kept. Needs room for the old and the new folder at once."""
    check_not_workplace(target)  # again, at the one place that deletes: whatever its caller checked
    target = Path(os.path.realpath(target))
    staging = temp_path(target)
    os.mkdir(staging)
    try:
        stamp = {"format": OWNER_FORMAT, "kind": kind, "id": secrets.token_hex(16), "staging": staging.name}
        _write_stamp(staging, stamp)
        yield staging
        files = {p.name: _entry_size(p) for p in staging.iterdir() if p.name != OWNER}
        _write_stamp(staging, {**stamp, "staging": None, "files": files})
        fsync_dir(staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of ``target``: beside it, because ``replace_dir`` swaps the folder itself
    (a lock file inside would be a different file before and after the swap)."""
    t = Path(os.path.realpath(target))
    return t.with_name(f".{t.name}.lock")


@contextmanager
def locked(target: str | os.PathLike):
    """Holds an exclusive lock on ``target`` (``flock`` on ``lock_path(target)``) for the block,
    so that concurrent builders of one target run one after the other. The lock file stays after
    use: deleting it would let a waiter lock a file that a newcomer no longer sees (and an
    existing file of that name is only opened for appending, never changed). Without ``fcntl``
    (Windows) there is no lock and callers must not build one target concurrently."""
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


def remove_stale(target: str | os.PathLike, kind: str) -> list[Path]:
    """Deletes what killed runs building ``target`` left beside it, and returns it: only folders
    whose name has the temporary form of the module docstring *and* whose stamp, of ``kind``,
    records exactly that name. Anything else of that form (a user's file or folder, an unmarked
    folder) is kept. Only call it while holding ``locked(target)``, else it may delete the
    staging folder of a run still in progress."""
    t = Path(os.path.realpath(target))
    pat = _temp_pattern(t.name)
    gone = []
    for p in t.parent.iterdir() if t.parent.is_dir() else ():
        if not pat.fullmatch(p.name):
            continue
        stamp = read_stamp(p, kind)
        if stamp is not None and stamp.get("staging") == p.name:
            shutil.rmtree(p)
            gone.append(p)
    return gone
