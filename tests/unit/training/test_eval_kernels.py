"""The trainer's evaluation (training/engine.py `Engine.eval_sums`) measures the model training
differentiates, and builds no recurrent form for it.

Outside training, a no-grad forward convolves with the taps of the filters' modal form (models/rtf.py),
which the first such forward after every weight change builds: the roots of every denominator,
O(n^3) per filter, seconds per evaluation at the 125m preset. An evaluation during training runs
under `training_route()` instead and convolves with the FFT kernel that training differentiates.
"""

from __future__ import annotations

from unittest import mock

import torch
from support.train_utils import TINY

import models.rtf as rtf
from models.configuration_hyena_rtf import HyenaRTFConfig
from models.modeling_hyena_rtf import HyenaRTFForCausalLM
from models.rtf import fft_condition
from training.config import load_config, resolve_batch
from training.dist_env import DistEnv
from training.engine import TorchEngine, lm_loss_terms
from training.optim import make_optimizer, param_groups


def test_evaluation_uses_the_training_kernels_and_builds_no_recurrence():
    """eval_sums: no root finding (`poles_of` counted), and the loss sum of a forward with gradients on
    (the same FFT kernels, the same arithmetic: equal). The recurrent form a no-grad forward uses
    elsewhere gives the same loss up to the float32 FFT kernel's rounding, eps32 kappa relative per
    tap (kappa, the filters' FFT conditioning, asserted below 100 for these Montel-constrained
    filters), through two layers and a softmax: 1e-4 relative leaves a wide margin."""
    torch.manual_seed(0)
    model = HyenaRTFForCausalLM(HyenaRTFConfig(vocab_size=512, d_model=32, n_layer=2, l_max=64, state_size=4))
    opt = make_optimizer(param_groups(model, 1e-3, 1e-3, 0.1), betas=(0.9, 0.95), eps=1e-8)
    plan = resolve_batch(load_config(None, [*TINY]).train, 1)
    engine = TorchEngine(model, opt, plan, torch.device("cpu"), "fp32", DistEnv(0, 0, 1, "none"), grad_clip=1.0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (2, 65), generator=g) for _ in range(2)]

    calls = []
    real = rtf.poles_of
    with mock.patch.object(rtf, "poles_of", lambda a: calls.append(a.shape[0]) or real(a)):
        total, count = engine.eval_sums(batches)
        assert calls == [] and count == 2 * 2 * 64
        model.eval()
        with torch.enable_grad():
            trained = sum(float(lm_loss_terms(model, b)[0]) for b in batches)
        assert total == trained
        with torch.no_grad():  # the inference route: the modal form, built here
            inference = sum(float(lm_loss_terms(model, b)[0]) for b in batches)
        assert calls
    filters = [m for m in model.modules() if isinstance(m, rtf.RTF)]
    assert max(float(fft_condition(f.denominator().double().detach(), f.fft_len).max()) for f in filters) < 100
    assert abs(inference - total) <= 1e-4 * abs(total)
