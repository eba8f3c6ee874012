"""Synthetic capability tasks, generated in code: multi-query associative recall (MQAR), selective
copying, and the copying task of the RTF paper.

Every task samples a `Batch` of `inputs` (B, T) token ids and `targets` (B, T), aligned with the
inputs: targets[b, t] is what the model's output at position t (logits[b, t], which has seen
inputs[b, : t + 1] only) must be, and IGNORE (-100, the project's loss convention) where nothing
is scored. The loss and the accuracy are taken over the scored positions only. The answer at a
scored position is always a function of inputs[b, : t + 1], and never appears in the inputs at or
after t: a causal model can only answer by remembering it.

Every task owns disjoint vocabulary ranges (listed by `ranges()`), so that a token's role can be
read from its id alone. Sampling is a pure function of the torch.Generator given: the same seed
gives the same batches.

- MQAR (Arora et al., "Zoology", 2023): N key-value pairs `k1 v1 k2 v2 ... kN vN` open the
  sequence (N distinct keys, N distinct values); then every key is queried exactly once, in the
  rest of the sequence, and the output at the query position must be the value that followed that
  key in the prefix. As in Zoology, the query region holds (T - 2N) / 2 even slots; key i goes to
  slot g_i, drawn without replacement with P(g) proportional to (g + 1)^(a - 1) (a = 0.01: most
  queries come soon after the prefix, some much later, as repeated bigrams do in text), and the
  positions not holding a query are random filler tokens. One deviation: the filler tokens come
  from their own vocabulary range (Zoology draws them from the whole vocabulary), so every
  occurrence of a key after the prefix is a query and the answer is unambiguous.
- Copying (S4's copying task, as used by the RTF paper's Table 2): M data tokens, then L blanks,
  then M marker tokens; at the j-th marker the output must be the j-th data token. The data sit
  at positions 0 .. M - 1, so every answer lies exactly M + L steps back: a pure delay.
- Selective copying (the same task with `selective=True`, as in the Mamba paper): the M data
  tokens are scattered, in order, at random positions of the first M + L, blanks elsewhere;
  the delay varies, so a fixed (time-invariant) filter cannot do it alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

IGNORE = -100  # targets of unscored positions (the project's loss skips them)


@dataclass(frozen=True)
class Batch:
    """inputs (B, T) int64 token ids; targets (B, T) int64, IGNORE where not scored."""

    inputs: torch.Tensor
    targets: torch.Tensor


@dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall (see the module docstring).

    Vocabulary: keys [0, num_keys), values [num_keys, num_keys + num_values), filler tokens after
    them (num_filler of them). Needs seq_len >= 4 num_pairs (one query slot per key at least).
    """

    seq_len: int = 256
    num_pairs: int = 16
    num_keys: int = 128
    num_values: int = 128
    num_filler: int = 64
    power_a: float = 0.01

    def __post_init__(self):
        if self.num_pairs < 1 or self.seq_len < 4 * self.num_pairs or self.seq_len % 2:
            raise ValueError(
                f"MQAR needs an even seq_len >= 4 num_pairs, got seq_len={self.seq_len}, num_pairs={self.num_pairs}"
            )
        if self.num_keys < self.num_pairs or self.num_values < self.num_pairs:
            raise ValueError(f"MQAR needs num_keys and num_values >= num_pairs ({self.num_pairs})")
        if self.num_filler < 1 or not 0 < self.power_a <= 1:
            raise ValueError("MQAR needs num_filler >= 1 and power_a in (0, 1]")

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + self.num_filler

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Half-open id range of each token role."""
        k, v = self.num_keys, self.num_values
        return {"key": (0, k), "value": (k, k + v), "filler": (k + v, self.vocab_size)}

    def params(self) -> dict:
        return {"task": "mqar", **asdict(self), "vocab_size": self.vocab_size}

    def slot_probabilities(self) -> torch.Tensor:
        """P(g) for the (T - 2N) / 2 query slots g = 0, 1, ...: proportional to (g + 1)^(a - 1)."""
        slots = (self.seq_len - 2 * self.num_pairs) // 2
        p = torch.arange(1, slots + 1, dtype=torch.float64) ** (self.power_a - 1)
        return p / p.sum()

    def sample(self, batch: int, gen: torch.Generator) -> Batch:
        B, N, T = batch, self.num_pairs, self.seq_len
        (k0, _), (v0, _), (f0, f1) = self.ranges().values()
        # N distinct keys and N distinct values per sequence: the first N of a random permutation.
        keys = torch.rand(B, self.num_keys, generator=gen).argsort(-1)[:, :N] + k0
        values = torch.rand(B, self.num_values, generator=gen).argsort(-1)[:, :N] + v0
        slots = torch.multinomial(self.slot_probabilities().expand(B, -1), N, replacement=False, generator=gen)
        inputs = torch.randint(f0, f1, (B, T), generator=gen)
        inputs[:, 0 : 2 * N : 2], inputs[:, 1 : 2 * N : 2] = keys, values
        query_pos = 2 * N + 2 * slots  # (B, N): where key i is asked for
        inputs.scatter_(1, query_pos, keys)
        targets = torch.full((B, T), IGNORE, dtype=torch.long).scatter_(1, query_pos, values)
        return Batch(inputs, targets)


@dataclass(frozen=True)
class Copying:
    """Copying (selective=False) or selective copying (selective=True); see the module docstring.

    Vocabulary (S4's layout): blank 0, data symbols 1 .. num_symbols, marker num_symbols + 1.
    seq_len = 2 num_tokens + num_blank.
    """

    num_tokens: int = 16
    num_blank: int = 224
    num_symbols: int = 16
    selective: bool = False

    def __post_init__(self):
        if self.num_tokens < 1 or self.num_blank < 0 or self.num_symbols < 2:
            raise ValueError("Copying needs num_tokens >= 1, num_blank >= 0 and num_symbols >= 2")
        if self.selective and self.num_blank < 1:
            raise ValueError("selective copying needs num_blank >= 1 (somewhere to scatter the data)")

    @property
    def seq_len(self) -> int:
        return 2 * self.num_tokens + self.num_blank

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 2

    def ranges(self) -> dict[str, tuple[int, int]]:
        s = self.num_symbols
        return {"blank": (0, 1), "data": (1, s + 1), "marker": (s + 1, s + 2)}

    def params(self) -> dict:
        task = "selective_copying" if self.selective else "copying"
        return {"task": task, **asdict(self), "seq_len": self.seq_len, "vocab_size": self.vocab_size}

    def sample(self, batch: int, gen: torch.Generator) -> Batch:
        B, M, region = batch, self.num_tokens, self.num_tokens + self.num_blank
        data = torch.randint(1, self.num_symbols + 1, (B, M), generator=gen)
        if self.selective:  # M distinct positions of the data region, in increasing order
            positions = torch.rand(B, region, generator=gen).argsort(-1)[:, :M].sort(-1).values
        else:
            positions = torch.arange(M).expand(B, M)
        inputs = torch.zeros(B, self.seq_len, dtype=torch.long)
        inputs[:, :region].scatter_(1, positions, data)
        inputs[:, region:] = self.num_symbols + 1
        targets = torch.full_like(inputs, IGNORE)
        targets[:, region:] = data
        return Batch(inputs, targets)


def make_task(params: dict) -> MQAR | Copying:
    """The task a `params()` dict describes (the inverse of `params`, for result files)."""
    fields = dict(params)
    task = fields.pop("task")
    fields.pop("vocab_size", None)
    if task == "mqar":
        return MQAR(**fields)
    fields.pop("seq_len", None)
    if task in ("copying", "selective_copying"):
        return Copying(**{**fields, "selective": task == "selective_copying"})
    raise ValueError(f"unknown task {task!r}")
