"""Tokenizers for data prep: load any Hugging Face tokenizer, or train a byte-level BPE.

Everything is reduced to a ``tokenizers.Tokenizer`` plus the exact JSON text that is saved as
``DIR/tokenizer.json`` (loadable later with ``tokenizers.Tokenizer.from_file`` or
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``). The manifest records the sha256 of
that file; when a ``tokenizer.json`` file is given, its bytes are kept unchanged, so the hash is
the one published for it (e.g. GPT-NeoX-20B).

Token dtypes: uint16 holds ids 0..65535, so it is chosen when the vocabulary (added tokens
included) has at most 65,536 entries, else uint32 (see ``indexed.py`` for the int32 option).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .layout import TOKENIZER
from .manifest import TokenizerInfo

if TYPE_CHECKING:  # the annotation of hf_tokenizer only; see there why the import is not at the top
    import transformers

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
TRAINED_SPECIALS = ("<|endoftext|>", "<|padding|>")  # ids 0 and 1, as in GPT-NeoX-20B


class TokenizerError(ValueError):
    pass


class LoadedTokenizer:
    """A tokenizer ready for data prep. ``json_text`` is what gets saved as tokenizer.json."""

    def __init__(self, tok, json_text: str, source: str, eos_token: str, trained: bool):
        self.tok = tok
        self.json_text = json_text
        self.source = source
        self.trained = trained
        self.eos_token = eos_token
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise TokenizerError(f"end-of-document token {eos_token!r} is not in the vocabulary of {source}")
        self.eos_id = int(eos_id)
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.sha256 = hashlib.sha256(json_text.encode("utf-8")).hexdigest()

    def describe(self) -> TokenizerInfo:
        """The manifest's record of this tokenizer (saved in DIR as ``layout.TOKENIZER``)."""
        return TokenizerInfo(
            source=self.source,
            file=TOKENIZER,
            sha256=self.sha256,
            vocab_size=self.vocab_size,
            eos_token=self.eos_token,
            eos_id=self.eos_id,
            trained_here=self.trained,
        )


def _pick_eos(tok, requested: str | None, hinted: str | None, source: str) -> str:
    if requested:
        return requested
    if hinted and tok.token_to_id(hinted) is not None:
        return hinted
    for cand in EOS_CANDIDATES:
        if tok.token_to_id(cand) is not None:
            return cand
    raise TokenizerError(
        f"no end-of-document token found in {source} (tried {', '.join(EOS_CANDIDATES)}); pass eos_token / --eos-token"
    )


def _read_file(p: Path) -> tuple[Tokenizer, str]:
    """The tokenizer in the tokenizers JSON file ``p`` and the file's exact text; TokenizerError
    (one line naming the file) for an unreadable, binary or malformed file."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(
            f"{p}: not a tokenizers JSON file (binary, not UTF-8 text: {e.reason} at byte {e.start})"
        ) from e
    except OSError as e:
        raise TokenizerError(f"{p}: cannot read the tokenizer file: {e.strerror}") from e
    try:
        return Tokenizer.from_str(text), text
    except Exception as e:
        raise TokenizerError(f"{p}: not a tokenizers JSON file: {e}") from e


def load_data_tokenizer(spec: str, eos_token: str | None = None) -> LoadedTokenizer:
    """``spec``: a tokenizer.json file, a folder (with tokenizer.json, or anything
    ``AutoTokenizer`` loads), or a Hugging Face hub name (needs network unless cached)."""
    p = Path(os.path.expanduser(spec))
    if p.is_dir() and (p / TOKENIZER).is_file():
        p = p / TOKENIZER
    if p.is_file():
        tok, text = _read_file(p)
        source = str(p.resolve())
        return LoadedTokenizer(tok, text, source, _pick_eos(tok, eos_token, None, source), False)
    if not p.exists() and _is_path(spec):  # a mistyped path: say so, without a hub lookup
        raise TokenizerError(f"{spec}: no such tokenizer file or folder")
    try:
        # Imported here: transformers takes seconds to import, and only hub names need it (every
        # spawned tokenizer worker imports this module).
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(spec)
    except Exception as e:
        raise TokenizerError(
            f"cannot load tokenizer {spec!r} (not a file, a folder, or a reachable hub name): {e}"
        ) from e
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"{spec!r} has no fast (tokenizers) backend; convert it first")
    text = backend.to_str()
    tok = Tokenizer.from_str(text)
    return LoadedTokenizer(tok, text, spec, _pick_eos(tok, eos_token, hf.eos_token, spec), False)


def hf_tokenizer(
    tokenizer_file: str | os.PathLike, eos_token: str | None = None
) -> transformers.PreTrainedTokenizerFast:
    """The ``transformers.PreTrainedTokenizerFast`` of a tokenizers JSON file, as a model trained
    on data_prep's shards expects it: the end-of-text token chosen exactly as ``load_data_tokenizer``
    chooses it for the shards (``eos_token``, else the first of ``EOS_CANDIDATES`` in the
    vocabulary; TokenizerError if none is), ``pad_token`` = that token when the file defines no
    padding token (batched generation needs one), and model inputs ``input_ids`` and
    ``attention_mask`` only (no ``token_type_ids``: the model takes none)."""
    # Imported here: transformers takes seconds to import and data preparation never needs it.
    from transformers import PreTrainedTokenizerFast

    p = Path(tokenizer_file)
    tok, _ = _read_file(p)
    eos = _pick_eos(tok, eos_token, None, str(p))
    if tok.token_to_id(eos) is None:
        raise TokenizerError(f"end-of-document token {eos!r} is not in the vocabulary of {p}")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=["input_ids", "attention_mask"])
    hf.eos_token = eos
    if hf.pad_token is None:
        hf.pad_token = eos
    return hf


def _is_path(spec: str) -> bool:
    """Whether ``spec`` can only be a path, not a hub name (``name`` or ``org/name``, which
    never start with "/", "." or "~", have at most one "/" and do not end in ".json")."""
    return (
        spec.startswith(("/", ".", "~"))
        or spec.endswith(".json")
        or spec.count("/") > 1
        or os.sep != "/"
        and os.sep in spec
    )


def piece_spans(text: str, size: int):
    """``(start, end)`` spans that cut ``text`` into pieces of at most ``size`` characters, to
    be tokenized one after the other: a tokenizer's working memory grows with its input (about
    150 bytes per character for a byte-level BPE: 7.7 GB for one 50 MB document), and nothing
    bounds the size of one document. A text of at most ``size`` characters is one piece.

    A cut goes just before a single space with a non-space character on each side (the last one
    in the second half of the piece). Tokenizers treat such a space as the start of the next
    word (the byte-level BPE regex `` ?\\p{L}+``, Metaspace's "▁", whitespace and BERT
    splitting), so the tokens of the pieces, put together, are exactly those of the whole text;
    tested for GPT-NeoX-20B, GPT-2, the BPE trained here, Metaspace BPEs, WordLevel on
    whitespace and BERT WordPiece. The exceptions, where tokens next to a cut can differ from
    the whole text's (e.g. one token of the whole text becomes two): a second half of a piece
    without such a space (base64, a DNA sequence, a long run of blanks) is cut at exactly
    ``size`` characters; and a tokenizer that looks at its whole input (a Strip normalizer, a
    ByteLevel pre-tokenizer without its regex, an added token containing a single space).
    """
    if size < 1:
        raise ValueError(f"piece size must be >= 1 character, got {size}")
    start, n = 0, len(text)
    while n - start > size:
        end = cut = start + size
        lo = start + size // 2
        p = text.rfind(" ", lo, end)
        while p > lo:
            if not text[p - 1].isspace() and not text[p + 1].isspace():
                cut = p
                break
            p = text.rfind(" ", lo, p)
        yield start, cut
        start = cut
    yield start, n


def check_vocab_size(vocab_size: int) -> None:
    """Raises TokenizerError if ``train_bpe`` cannot make a vocabulary of this size (callers
    check it before reading any corpus)."""
    min_vocab = 256 + len(TRAINED_SPECIALS)
    if vocab_size < min_vocab:
        raise TokenizerError(
            f"vocab_size {vocab_size} is below the {min_vocab} needed for the 256 bytes and the special tokens"
        )


def train_bpe(texts, vocab_size: int) -> LoadedTokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization, no normalizer, so decoding gives back the
    exact text) trained on the iterable ``texts``. Special tokens: ``<|endoftext|>`` = 0
    (end of document) and ``<|padding|>`` = 1. The result is deterministic for the same texts."""
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TRAINED_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    text = tok.to_str()
    return LoadedTokenizer(
        Tokenizer.from_str(text),
        text,
        f"byte-level BPE trained here (vocab_size={vocab_size})",
        TRAINED_SPECIALS[0],
        True,
    )


def choose_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """Token dtype for the shards; a clear error when the vocabulary does not fit."""
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    if requested not in ("uint16", "uint32", "int32"):
        raise TokenizerError(f"token dtype must be auto, uint16, uint32 or int32, not {requested!r}")
    dt = np.dtype(requested)
    if vocab_size - 1 > np.iinfo(dt).max:
        raise TokenizerError(
            f"a vocabulary of {vocab_size} tokens does not fit {dt} (largest id {np.iinfo(dt).max}); use a wider dtype"
        )
    return dt
