"""`assert_greedy` (tests/support/helpers.py), the check behind every greedy-decoding test: it must
accept the argmax and a token within the rounding tie of it, and refuse anything further below,
with the repetition penalty applied as Hugging Face applies it. Checked on a scripted model whose
logits at each position are fixed numbers, so the cases are exact."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from support.helpers import GREEDY_TIE_EPS, assert_greedy

VOCAB = 6


class Scripted(torch.nn.Module):
    """logits[b, t] = table[t] for every row b (float32), whatever the ids: (B, T) -> (B, T, V)."""

    dtype = torch.float32

    def __init__(self, table: list[list[float]]):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)

    def forward(self, ids, attention_mask=None, use_cache=False):
        assert use_cache is False  # the reference is the parallel forward, no cache
        return SimpleNamespace(logits=self.table[: ids.shape[1]].expand(ids.shape[0], -1, -1))


def model_with(step: list[float]) -> Scripted:
    """Prompt of 2 tokens; the logits at position 1 choose the first new token."""
    return Scripted([[0.0] * VOCAB, step, [0.0] * VOCAB])


def test_the_argmax_passes_and_a_clear_runner_up_fails():
    model = model_with([8.0, 7.99, 0, 0, 0, 0])  # a gap of 1e-2: far outside the tie (2e-4 here)
    assert_greedy(model, torch.tensor([[3, 4, 0]]), 2)
    with pytest.raises(AssertionError, match=r"row 0 new token 0: 1 .* where 0 has 8"):
        assert_greedy(model, torch.tensor([[3, 4, 1]]), 2)


def test_a_token_within_the_rounding_tie_passes_either_way():
    tie = GREEDY_TIE_EPS * torch.finfo(torch.float32).eps * 8.0
    below = float(torch.tensor(8.0 - tie / 4, dtype=torch.float32))  # a float32 number inside the tie
    model = model_with([8.0, below, 0, 0, 0, 0])
    assert_greedy(model, torch.tensor([[3, 4, 0], [3, 4, 1]]), 2)


def test_the_repetition_penalty_is_applied_to_tokens_already_seen():
    """Token 0 has the larger logit but is in the prompt: penalty 2 halves it (6 -> 3 < 5), so token
    1 is the greedy choice with the penalty and token 0 without; a negative logit is multiplied."""
    model = model_with([6.0, 5.0, -1.0, -1.5, -9, -9])
    penalised = torch.tensor([[0, 2, 1]])
    assert_greedy(model, penalised, 2, penalty=2.0)
    with pytest.raises(AssertionError):
        assert_greedy(model, penalised, 2)
    assert_greedy(model, torch.tensor([[0, 2, 0]]), 2)
    # Seen 0 and 1, negative: -1 * 2 = -2 and -1.8 * 2 = -3.6, below unseen 2's -1.5 (dividing would
    # have made 0 the choice at -0.5).
    model = model_with([-1.0, -1.8, -1.5, -9, -9, -9])
    assert_greedy(model, torch.tensor([[0, 1, 2]]), 2, penalty=2.0)
    with pytest.raises(AssertionError):
        assert_greedy(model, torch.tensor([[0, 1, 0]]), 2, penalty=2.0)
