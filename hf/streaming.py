"""Streaming detokenization: write the text of a growing token sequence as it grows, in O(1) per token.

Decoding the whole sequence again for every new token costs O(length) per token. `Streamer` decodes
only a window of recent tokens and writes the part of the window's text that no later token can
change. What it writes, end() included, is exactly `tokenizer.decode(all ids, skip_special_tokens=True)`.

Why a plain "decode the new token alone" is not enough, and what the window does about it:

- Byte-level BPE (GPT-2, GPT-NeoX) splits a multi-byte UTF-8 character over several tokens. The
  text of an incomplete sequence at the end is U+FFFD (one per sequence for lossy UTF-8, one per
  byte for SentencePiece's byte fallback: at most 3), which the next token may turn into the real
  character: trailing U+FFFD (up to 3) are held back.
- SentencePiece's byte fallback renders a run of byte tokens (<0xE6><0x97><0xA5>) as one piece of
  UTF-8, and the whole run as U+FFFD per byte as long as it is not valid: a later byte can turn
  characters already shown back into U+FFFD. The text of a trailing run of byte tokens is held back
  until a token that is not a byte ends it.
- SentencePiece-style decoders drop the leading space of the first token, so the text of a
  concatenation is not the concatenation of the texts. The window keeps `CONTEXT` tokens that were
  already written before the new ones, and only the text after them is written.
- Space clean-up (transformers' `clean_up_tokenization_spaces`, the WordPiece decoder's `cleanup`)
  deletes a space when the next tokens turn out to be ".", "n't", "'s", ... (chained rules reach
  6 characters back, " n ' t" -> "n't"). For such tokenizers the text from the first space among
  the last `CLEANUP_REACH` characters is held back until enough follows it.
- Special tokens, which decode(skip_special_tokens=True) removes before decoding (two byte runs
  around one are one run), are left out of the window, and so is a token that renders as nothing
  after some text, so a run of them cannot grow it. (A first token that renders as nothing is kept:
  a decoder that strips the first leading space may strip it from the next token instead.)

Work per token: one decode of at most 2 * CONTEXT + 1 tokens, and every CONTEXT tokens one decode
of CONTEXT tokens to move the window, whatever the length of the sequence (with byte fallback, plus
the length of the current run of byte tokens, a few tokens per character).
"""

from __future__ import annotations

import re
import sys

REPLACEMENT = "\ufffd"  # what decoders write for an incomplete or invalid UTF-8 sequence
MAX_PENDING_BYTES = 3  # an incomplete UTF-8 sequence has at most 3 bytes, each at most one U+FFFD
CONTEXT = 8  # tokens of already-written text the window keeps before the new ones
CLEANUP_REACH = 8  # characters a space clean-up rule (or a chain of them) may span
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # the tokens a byte-fallback decoder turns into bytes


def decoder_state(tokenizer) -> str:
    """The fast tokenizer's decoder as JSON text ("" without one)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    state = decoder.__getstate__() if decoder is not None else b""
    return state.decode() if isinstance(state, bytes) else str(state)


def cleans_up_spaces(tokenizer) -> bool:
    """Whether `tokenizer.decode` may delete a space between tokens after the fact: transformers'
    clean-up is on, or the fast tokenizer's decoder has its own `cleanup`."""
    return bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)) or '"cleanup":true' in decoder_state(
        tokenizer
    )


def special_ids(tokenizer) -> set[int]:
    """The ids decode(skip_special_tokens=True) drops: the named special tokens and the added tokens
    the fast tokenizer marks special."""
    ids = set(getattr(tokenizer, "all_special_ids", []))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids |= {i for i, added in backend.get_added_tokens_decoder().items() if added.special}
    return ids


class Streamer:
    """Writes the text of one row as its tokens arrive: put(token_id) for each, then end().

    window:    the recent token ids (CONTEXT already written ones, then the newer ones);
    text:      decode(window); written: how many of its characters are out;
    run_start: where in `text` the trailing run of byte tokens starts (byte fallback), or None.
    """

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.cleanup = cleans_up_spaces(tokenizer)
        self.byte_fallback = "ByteFallback" in decoder_state(tokenizer)
        self.special = special_ids(tokenizer)
        self.window: list[int] = []
        self.text, self.written, self.run_start = "", 0, None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def held(self, text: str) -> int:
        """How many characters at the end of `text` a later token may still change."""
        n = len(text) - len(text.rstrip(REPLACEMENT))
        hold = min(n, MAX_PENDING_BYTES)  # earlier U+FFFD are followed by more than 3 bytes: final
        if self.cleanup:
            tail = text[-(CLEANUP_REACH - 1) :]
            if " " in tail:
                hold = max(hold, len(tail) - tail.index(" "))
        if self.run_start is not None:
            hold = max(hold, len(text) - self.run_start)
        return hold

    def is_byte(self, token_id: int) -> bool:
        return self.byte_fallback and BYTE_PIECE.fullmatch(self.tokenizer.convert_ids_to_tokens(token_id) or "")

    def put(self, token_id: int) -> None:
        if token_id in self.special:
            return
        text = self.decode([*self.window, token_id])
        if self.window and text == self.text and not text.endswith(REPLACEMENT):
            return  # renders as nothing after other text (the first token may still shape the start)
        if not self.is_byte(token_id):
            self.run_start = None
        elif self.run_start is None:
            self.run_start = len(self.text)
        self.window.append(token_id)
        self.text = text
        self._write(len(text) - self.held(text))
        if len(self.window) > 2 * CONTEXT:
            self._slide()

    def end(self) -> None:
        """Write what was held back (the sequence is complete) and start afresh."""
        self._write(len(self.text))
        self.window, self.text, self.written, self.run_start = [], "", 0, None

    def _write(self, upto: int) -> None:
        if upto > self.written:
            self.out.write(self.text[self.written : upto])
            self.out.flush()
            self.written = upto

    def _slide(self) -> None:
        """Drop all but the last CONTEXT tokens, if those alone reproduce the unwritten text and the
        character before it (then nothing still to be written depends on the dropped ones);
        otherwise try again at the next token."""
        keep = self.window[-CONTEXT:]
        text = self.decode(keep)
        tail = len(self.text) - self.written + 1
        if len(text) >= tail and text[-tail:] == self.text[-tail:]:
            shift = len(self.text) - len(text)
            self.window, self.text, self.written = keep, text, self.written - shift
            if self.run_start is not None:
                self.run_start -= shift
