"""Which checkpoints the vLLM plugin refuses, decided from config.json alone, before any engine starts
(serving/servable.py has no vLLM import, so this runs in the main environment)."""

from __future__ import annotations

import pytest
from support.helpers import tiny_config

from serving.servable import refusal


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"filter": "implicit"}, "distil them into RTF filters first"),
        ({"attn_layers": [0, 1]}, "has no Hyena layer"),  # vLLM died on the first request
        ({"short_conv_width": 1}, "short_conv_width 1"),  # vLLM failed to page a zero-column state
    ],
)
def test_unservable_checkpoints_are_refused_in_one_line(fields, reason):
    why = refusal(tiny_config(**fields))
    assert why is not None and reason in why and "\n" not in why, why


@pytest.mark.parametrize("fields", [{}, {"attn_layers": [1]}, {"multi_hyena_heads": 4}, {"short_conv_width": 2}])
def test_servable_checkpoints_pass(fields):
    assert refusal(tiny_config(**fields)) is None
    assert "one worker" in refusal(tiny_config(**fields), tensor_parallel=2)
