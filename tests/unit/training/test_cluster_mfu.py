"""The dense bf16 peak MFU is reported against, looked up by the CUDA device name (vendor
datasheets, no sparsity): variants are told apart from their family."""

from __future__ import annotations

import pytest
import torch

from training import metrics
from training.metrics import peak_flops, peak_flops_for_name

NAMES = {
    "NVIDIA H100 80GB HBM3": 989.5e12,  # SXM
    "NVIDIA H100 PCIe": 756.5e12,
    "NVIDIA H100 NVL": 835.5e12,  # was given the SXM's peak
    "NVIDIA H800": 989.5e12,  # had no MFU
    "NVIDIA H800 PCIe": 756.5e12,
    "NVIDIA H200": 989.5e12,
    "NVIDIA H200 NVL": 835.5e12,
    "NVIDIA GH200 480GB": 989.5e12,
    "NVIDIA H20": 148e12,
    "NVIDIA B200": 2.25e15,  # had no MFU
    "NVIDIA GB200": 2.5e15,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A10G": 70e12,
    "NVIDIA A10": 125e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "Tesla V100-SXM2-32GB": 125e12,
}


@pytest.mark.parametrize(("name", "flops"), NAMES.items())
def test_peak_by_device_name(name, flops):
    assert peak_flops_for_name(name) == flops


def test_unknown_gpus_and_the_cpu_have_no_peak(monkeypatch):
    assert peak_flops_for_name("NVIDIA GeForce GT 710") is None
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 NVL")
    assert peak_flops(torch.device("cuda", 0)) == 835.5e12


def test_every_row_is_reachable():
    """No row is shadowed by an earlier one: its own words find it."""
    for words, flops in metrics.PEAK_BF16_FLOPS:
        assert peak_flops_for_name("NVIDIA " + " ".join(words)) == flops, words
