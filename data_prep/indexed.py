"""Megatron / GPT-NeoX "MMapIndexedDataset" token shards: a ``PREFIX.bin`` + ``PREFIX.idx`` pair.

Written from the public description of the layout, so that pre-tokenized Pile shards made by
Megatron-LM or GPT-NeoX can be read, and shards written here can be read by those tools.

``PREFIX.bin``: the token ids of every sequence, back to back, little-endian, one fixed dtype.

``PREFIX.idx`` (all integers little-endian)::

    offset  size          field
    0       9             magic  b"MMIDIDX\\x00\\x00"
    9       8   uint64    version (always 1)
    17      1   uint8     dtype code (table ``DTYPE_CODES`` below)
    18      8   uint64    S = number of sequences
    26      8   uint64    D = number of entries of doc_idx (documents + 1)
    34      4*S int32     sizes[S]     tokens in each sequence
    ...     8*S int64     pointers[S]  byte offset of each sequence in PREFIX.bin
    ...     8*D int64     doc_idx[D]   index of the first sequence of each document, then S

This project writes one sequence per document (its tokens followed by the end-of-document token),
so ``doc_idx = [0, 1, ..., S]``. Readers here accept any doc_idx (Megatron may put several
sequences, e.g. sentences, in one document).

Dtype codes 1-8 are the ones Megatron and GPT-NeoX define. The layout has no unsigned 32-bit code;
code 9 = uint32 is this project's extension, used only for vocabularies above 65,536 tokens when
``uint32`` is asked for (``int32``, code 4, is the Megatron-readable choice for those).
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from utils import atomic

from .layout import MANIFEST
from .manifest import Manifest, ManifestError, SplitInfo

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D -> 34 bytes

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
    9: np.dtype(np.uint32),  # extension, see module docstring
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}
TOKEN_DTYPES = ("uint16", "uint32", "int32")  # the dtypes the writer offers
_BLOCK = 1 << 22  # entries per block when scanning or writing an index


class IndexFormatError(ValueError):
    """A .idx/.bin pair that does not follow the layout (names the file and what was wrong)."""


def dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in _CODE_OF:
        raise IndexFormatError(f"dtype {dt} has no code in the indexed-dataset layout")
    return _CODE_OF[dt]


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


class IndexedWriter:
    """Streams documents into ``PREFIX.bin``/``PREFIX.idx`` under temporary names.

    Nothing carries a final name until ``finalize()``: the .bin and .idx are written as
    ``atomic.AtomicFile`` temporaries and renamed only once complete (the .bin first, then the
    .idx), so an interrupted run never leaves a pair that looks complete. Memory stays constant:
    the per-document sizes are spilled to a third temporary file instead of a Python list,
    because the real Pile has ~2e8 documents. Write errors (a full disk) name the file.
    """

    def __init__(self, prefix: str | os.PathLike, dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.code = dtype_code(self.dtype)
        self._bin = atomic.AtomicFile(bin_path(self.prefix))
        self._sizes_tmp = atomic.temp_path(f"{self.prefix}.sizes")
        try:
            self._sizes = open(self._sizes_tmp, "xb")
        except BaseException:
            self._bin.abort()
            raise
        self._bin_hash = hashlib.sha256()
        self.num_docs = 0
        self.num_tokens = 0
        self.closed = False

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: ``tokens`` is their ids back to back, ``lengths`` (int) per document."""
        if len(lengths) == 0:
            return
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError("lengths do not add up to the number of tokens")
        if lengths.min() <= 0 or lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("document lengths must be in [1, 2**31 - 1] tokens")
        data = tokens.tobytes()
        self._bin.write(data)
        self._bin_hash.update(data)
        try:
            self._sizes.write(lengths.astype("<i4").tobytes())
        except OSError as e:
            raise atomic.named(e, self._sizes_tmp) from e
        self.num_docs += len(lengths)
        self.num_tokens += tokens.size

    def finalize(self) -> dict:
        """Write the .idx, rename both files to their final names; returns sizes and checksums."""
        try:
            self._sizes.close()
        except OSError as e:
            raise atomic.named(e, self._sizes_tmp) from e
        n = self.num_docs
        idx_hash = hashlib.sha256()
        idx = atomic.AtomicFile(idx_path(self.prefix))
        try:

            def put(b: bytes):
                idx.write(b)
                idx_hash.update(b)

            put(_HEADER.pack(MAGIC, VERSION, self.code, n, n + 1))
            sizes = np.memmap(self._sizes_tmp, dtype="<i4", mode="r") if n else np.zeros(0, "<i4")
            for s in range(0, n, _BLOCK):  # blocks keep memory flat however many documents
                put(np.asarray(sizes[s : s + _BLOCK]).tobytes())
            offset = 0
            for s in range(0, n, _BLOCK):
                block = np.asarray(sizes[s : s + _BLOCK], dtype=np.int64) * self.dtype.itemsize
                ptr = np.cumsum(block) - block + offset
                offset += int(block.sum())
                put(ptr.astype("<i8").tobytes())
            for s in range(0, n + 1, _BLOCK):
                put(np.arange(s, min(s + _BLOCK, n + 1), dtype="<i8").tobytes())
            del sizes
            self._bin.commit()
            idx.commit()
        except BaseException:
            idx.abort()
            raise
        os.unlink(self._sizes_tmp)
        self.closed = True
        return {
            "documents": n,
            "tokens": self.num_tokens,
            "bin_bytes": bin_path(self.prefix).stat().st_size,
            "idx_bytes": idx_path(self.prefix).stat().st_size,
            "bin_sha256": self._bin_hash.hexdigest(),
            "idx_sha256": idx_hash.hexdigest(),
        }

    def abort(self) -> None:
        """Close and delete the temporary files (used when a run fails)."""
        self._bin.abort()
        try:
            self._sizes.close()
        except OSError:  # a full disk can fail the close too; the file is deleted anyway
            pass
        self._sizes_tmp.unlink(missing_ok=True)
        self.closed = True


class IndexedDataset:
    """Read-only view of a ``PREFIX.bin``/``.idx`` pair through memory maps.

    Attributes: ``dtype``, ``sizes`` (int32[S]), ``pointers`` (int64[S]), ``doc_idx`` (int64[D]),
    ``num_tokens``. ``self[i]`` is sequence i as a numpy array of ``dtype``; ``tokens`` is the whole
    .bin as one flat array (valid because sequences are stored back to back, which is checked).
    """

    def __init__(
        self,
        prefix: str | os.PathLike,
        expected: SplitInfo | None = None,
        manifest: str | os.PathLike | None = None,
        verify: bool = True,
        check_manifest: bool = True,
    ):
        """Opens and checks the pair; a pair that does not fit together raises a one-line
        ``IndexFormatError`` naming both files, since training on the wrong tokens is silent.

        Checked: the header; the .idx size; the .bin size equals the index's token count times
        the dtype size (an index of another dataset, or a cut .bin, fails here); and, in one pass
        over the index unless ``verify=False``, sizes >= 0, each sequence starting where the
        previous one ends, and doc_idx non-decreasing from 0 to S. ``expected``: a manifest's
        ``SplitInfo`` for this pair (its ``tokens``, ``documents``, ``sequences``, ``bin_bytes``
        and ``idx_bytes``, those it records, must match), read from the file ``manifest``; when
        not given, a ``manifest.json`` beside the files whose splits name this prefix is used, if
        there is one (``check_manifest=False``: none is looked for). ``verify=False`` is for
        reopening a pair already verified (DataLoader workers): the token count then comes from
        the last pointer instead of a scan.
        """
        self.prefix = Path(prefix)
        ip, bp = idx_path(self.prefix), bin_path(self.prefix)
        for p in (ip, bp):
            if not p.is_file():
                raise FileNotFoundError(f"indexed dataset file missing: {p}")
        with open(ip, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise IndexFormatError(f"{ip}: truncated header ({len(head)} of {_HEADER.size} bytes)")
        magic, version, code, n_seq, n_doc = _HEADER.unpack(head)
        if magic != MAGIC:
            raise IndexFormatError(f"{ip}: not an MMIDIDX index (magic {magic!r})")
        if version != VERSION:
            raise IndexFormatError(f"{ip}: unsupported index version {version}")
        if code not in DTYPE_CODES:
            raise IndexFormatError(f"{ip}: unknown dtype code {code}")
        self.dtype = DTYPE_CODES[code]
        need = _HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc
        have = ip.stat().st_size
        if have != need:
            raise IndexFormatError(
                f"{ip}: {have} bytes, expected {need} for {n_seq} sequences "
                f"and {n_doc} doc_idx entries (truncated or corrupt)"
            )
        off = _HEADER.size
        self.sizes = np.memmap(ip, dtype="<i4", mode="r", offset=off, shape=(n_seq,)) if n_seq else np.zeros(0, "<i4")
        off += 4 * n_seq
        self.pointers = (
            np.memmap(ip, dtype="<i8", mode="r", offset=off, shape=(n_seq,)) if n_seq else np.zeros(0, "<i8")
        )
        off += 8 * n_seq
        self.doc_idx = np.memmap(ip, dtype="<i8", mode="r", offset=off, shape=(n_doc,)) if n_doc else np.zeros(0, "<i8")
        self.num_sequences = int(n_seq)
        self.num_documents = max(int(n_doc) - 1, 0)
        # Sequences back to back (first at 0): Megatron and GPT-NeoX always write them this way,
        # and the flat token view depends on it.
        if n_seq and int(self.pointers[0]) != 0:
            raise IndexFormatError(
                f"{ip}: the first sequence starts at byte {int(self.pointers[0])} of {bp}, not 0 (corrupt index)"
            )
        if verify:
            self.num_tokens = self._scan(ip, bp)
        else:
            self.num_tokens = (int(self.pointers[-1]) // self.dtype.itemsize + int(self.sizes[-1])) if n_seq else 0
        nbytes = self.num_tokens * self.dtype.itemsize
        bin_bytes = bp.stat().st_size
        if bin_bytes != nbytes:
            why = "truncated .bin" if bin_bytes < nbytes else "the .bin holds more: an index of another dataset?"
            raise IndexFormatError(
                f"{ip} and {bp} do not match: the index describes "
                f"{self.num_tokens} {self.dtype} tokens = {nbytes} bytes, the "
                f".bin has {bin_bytes} bytes ({why})"
            )
        if expected is None and check_manifest:
            expected, manifest = _manifest_entry(self.prefix)
        if expected is not None:
            self._check_expected(expected, manifest, ip, bp, bin_bytes, have)
        self._bin_file = bp
        self._tokens = None

    def _scan(self, ip: Path, bp: Path) -> int:
        """One pass over the index in blocks: sizes >= 0, pointers = the running byte offset of
        the sizes, doc_idx non-decreasing from 0 to S. Returns the number of tokens (int64
        arithmetic, so the full Pile's 3e11 cannot overflow)."""
        item, n = self.dtype.itemsize, self.num_sequences
        offset = 0
        for s in range(0, n, _BLOCK):
            nbytes = np.asarray(self.sizes[s : s + _BLOCK], dtype=np.int64) * item
            want = np.cumsum(nbytes) - nbytes + offset
            got = np.asarray(self.pointers[s : s + _BLOCK])
            if nbytes.min() < 0 or not np.array_equal(got, want):
                i = int(np.argmax((nbytes < 0) | (got != want)))
                raise IndexFormatError(
                    f"{ip}: sequence {s + i} (size {int(nbytes[i]) // item}) starts at byte "
                    f"{int(got[i])} of {bp}, but the sizes before it end at {int(want[i])} "
                    "(corrupt index: sizes and pointers disagree)"
                )
            offset += int(nbytes.sum())
        prev = 0
        for s in range(0, len(self.doc_idx), _BLOCK):
            d = np.asarray(self.doc_idx[s : s + _BLOCK])
            if d[0] < prev or (d.size > 1 and np.diff(d).min() < 0):
                raise IndexFormatError(f"{ip}: doc_idx decreases near entry {s} (corrupt index for {bp})")
            prev = int(d[-1])
        if len(self.doc_idx) and (int(self.doc_idx[0]) != 0 or prev != n):
            raise IndexFormatError(
                f"{ip}: doc_idx runs from {int(self.doc_idx[0])} to {prev}, "
                f"not from 0 to the {n} sequences (corrupt index for {bp})"
            )
        return offset // item

    def _check_expected(self, expected: SplitInfo, manifest, ip, bp, bin_bytes: int, idx_bytes: int):
        have = {
            "tokens": self.num_tokens,
            "documents": self.num_documents,
            "sequences": self.num_sequences,
            "bin_bytes": bin_bytes,
            "idx_bytes": idx_bytes,
        }
        want = {k: getattr(expected, k) for k in have}
        diffs = [f"{k} {v} (manifest: {want[k]})" for k, v in have.items() if want[k] is not None and want[k] != v]
        if diffs:
            raise IndexFormatError(f"{ip} and {bp} do not match {manifest or 'the manifest'}: {', '.join(diffs)}")

    @property
    def tokens(self) -> np.ndarray:
        """All tokens of the .bin as one flat memory-mapped array (opened on first use)."""
        if self._tokens is None:
            if self.num_tokens == 0:
                self._tokens = np.zeros(0, self.dtype)
            else:
                self._tokens = np.memmap(self._bin_file, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.num_sequences <= i < self.num_sequences:
            raise IndexError(f"sequence {i} out of range [0, {self.num_sequences})")
        i %= self.num_sequences
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.sizes[i])])

    def document(self, d: int) -> np.ndarray:
        """All tokens of document d (its sequences concatenated)."""
        lo, hi = int(self.doc_idx[d]), int(self.doc_idx[d + 1])
        if hi <= lo:
            return np.zeros(0, self.dtype)
        start = int(self.pointers[lo]) // self.dtype.itemsize
        end = int(self.pointers[hi - 1]) // self.dtype.itemsize + int(self.sizes[hi - 1])
        return np.asarray(self.tokens[start:end])


def _manifest_entry(prefix: Path) -> tuple[SplitInfo | None, Path | None]:
    """The split of a ``manifest.json`` beside ``prefix`` that names it, and that file; (None,
    None) where there is none. A manifest that is unreadable or invalid (``Manifest.read``) is
    ignored here: this pair may be read without it, and whoever reads the manifest reports on it."""
    path = prefix.parent / MANIFEST
    try:
        splits = Manifest.read(path).splits
    except (OSError, ManifestError):
        return None, None
    me = prefix.resolve()
    for entry in splits.values():
        where = Path(entry.prefix)
        if (where if where.is_absolute() else path.parent / where).resolve() == me:
            return entry, path
    return None, None


# The name Megatron-LM and GPT-NeoX use for this reader (evaluate_lm.py imports it by that name).
MMapIndexedDataset = IndexedDataset
