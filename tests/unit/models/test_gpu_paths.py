"""The model's CUDA-only paths, chosen on the CPU: each is switched on for the CPU by setting its
device list, counted (the path was taken), and compared in float64 with the path the CPU takes.

    short conv     F.conv1d (cuDNN's depthwise kernel) instead of w shifted multiply-adds
    LM head        a GEMM over every (padded) row of the weight, then the padding columns dropped
    attention      flash-attn whenever q is half precision (under bf16 autocast x is float32)

Tolerances: each pair computes the same sums in another order, float64: an error of a few eps64
times the size of the terms; 1e-12 of the largest value leaves room for the d-term dot products
(d <= 128 here) and the layers they pass through.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import attention, hyena, modeling_hyena_rtf
from models.configuration_hyena_rtf import HyenaRTFConfig
from models.modeling_hyena_rtf import HyenaRTFForCausalLM

RTOL = 1e-12


def tiny(**kw) -> HyenaRTFForCausalLM:
    torch.manual_seed(0)
    config = HyenaRTFConfig(vocab_size=101, d_model=32, n_layer=2, state_size=4, l_max=64, n_head=4, **kw)
    return HyenaRTFForCausalLM(config).double()


def loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    # atol relative to the largest value: an entry near zero has no relative accuracy of its own
    torch.testing.assert_close(la, lb, rtol=RTOL, atol=RTOL * lb.abs().max().item())
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=RTOL * y.abs().max().item())


def test_the_short_conv_runs_as_one_depthwise_conv_on_cuda_and_agrees(monkeypatch):
    model, ids = tiny(), torch.randint(0, 101, (2, 40))
    reference = loss_and_grads(model, ids)
    calls = []
    real = F.conv1d

    def spy(x, w, b=None, *args, **kw):
        calls.append(tuple(w.shape))
        return real(x, w, b, *args, **kw)

    monkeypatch.setattr(hyena, "CONV1D_DEVICES", ("cpu",))
    monkeypatch.setattr(F, "conv1d", spy)
    assert_same(loss_and_grads(model, ids), reference)
    assert calls == [(96, 1, 3)] * 2  # one depthwise (3d, 1, w) convolution per Hyena layer


def test_the_lm_head_multiplies_by_the_padded_rows_on_cuda_and_agrees(monkeypatch):
    model, ids = tiny(), torch.randint(0, 101, (2, 40))
    reference = loss_and_grads(model, ids)
    rows = []
    real = F.linear

    def spy(x, w, b=None):
        rows.append(w.shape[0])
        return real(x, w, b)

    monkeypatch.setattr(modeling_hyena_rtf, "PADDED_HEAD_DEVICES", ("cpu",))
    monkeypatch.setattr(F, "linear", spy)
    got = loss_and_grads(model, ids)
    assert_same(got, reference)
    assert got[0].shape[-1] == 101
    assert model.config.padded_vocab_size == 128 and 128 in rows  # the head's GEMM had every row


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_flash_attention_is_chosen_by_the_dtype_of_q(monkeypatch, precision):
    """Training under bf16 autocast feeds attention a float32 x (the LayerNorm's output) and gets a
    bf16 q from the projection: flash-attn must be used then, and never for float32 q."""
    used = []

    def fake_flash(q, k, v, causal):  # (B, T, h, hd), as flash_attn_func takes them
        used.append(q.dtype)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return y.transpose(1, 2)

    monkeypatch.setattr(attention, "flash_attn_func", fake_flash)
    monkeypatch.setattr(attention, "FLASH_DEVICES", ("cpu",))
    torch.manual_seed(0)
    config = HyenaRTFConfig(vocab_size=101, d_model=32, n_layer=2, state_size=4, l_max=64, n_head=4, attn_layers=[1])
    model, ids = HyenaRTFForCausalLM(config), torch.randint(0, 101, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(input_ids=ids, labels=ids).loss.backward()
    assert used == ([torch.bfloat16] if precision == "bf16" else [])
