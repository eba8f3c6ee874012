"""RNG files across device layouts: a process restores its own CUDA generator whatever number of
GPUs the saving process saw (training/rng.py). CUDA is faked: the torch.cuda functions rng.py
calls are replaced by a few generators that, like torch's, raise IndexError past the last device."""

from __future__ import annotations

import pytest
import torch

from training import rng


class FakeCuda:
    """`count` CUDA devices, each with a generator state (a distinct uint8 tensor), `current` the
    device this process uses; an index past the last device raises IndexError as torch's
    `default_generators[idx]` does."""

    def __init__(self, count: int, current: int = 0):
        self.states = [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(count)]
        self.current = current

    def _index(self, device) -> int:
        if isinstance(device, torch.device):
            device = device.index
        if device is None or device == "cuda":
            return self.current
        return int(device)

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def get_rng_state_all(self):
        return [s.clone() for s in self.states]

    def set_rng_state(self, state, device="cuda"):
        self.states[self._index(device)] = state.clone()

    def set_rng_state_all(self, states):
        for i, s in enumerate(states):
            self.set_rng_state(s, i)

    def install(self, monkeypatch) -> FakeCuda:
        for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.states))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        return self


def test_a_file_saved_by_a_process_on_gpu_3_of_8_restores_on_a_process_that_sees_one(monkeypatch, tmp_path):
    path = str(tmp_path / "rng.pt")
    saver = FakeCuda(8, current=3).install(monkeypatch)
    rng.save_rng(path)
    loaded = torch.load(path, weights_only=True)
    assert "cuda" not in loaded  # no states of the GPUs other processes drive
    assert torch.equal(loaded["cuda_current"], saver.states[3])

    resumer = FakeCuda(1).install(monkeypatch)
    rng.load_rng(path)
    assert torch.equal(resumer.states[0], saver.states[3])


def test_an_earlier_file_with_8_device_states_restores_on_one_device(monkeypatch, tmp_path):
    """The earlier layout (every visible device's state, key `cuda`) loads on a process that sees
    fewer devices: the first min(saved, visible) states are restored, no IndexError."""
    path = str(tmp_path / "rng.pt")
    state = rng.rng_state()  # host generators only: no CUDA here
    eight = [torch.full((16,), 100 + i, dtype=torch.uint8) for i in range(8)]
    torch.save({**state, "cuda": eight}, path)

    one = FakeCuda(1).install(monkeypatch)
    rng.load_rng(path)
    assert torch.equal(one.states[0], eight[0])

    # On the same layout it was written on, each device gets its own state back, as before.
    again = FakeCuda(8).install(monkeypatch)
    rng.load_rng(path)
    assert all(torch.equal(a, b) for a, b in zip(again.states, eight))


def test_cpu_only_resume_of_a_gpu_file_restores_the_host_generators(monkeypatch, tmp_path):
    path = str(tmp_path / "rng.pt")
    FakeCuda(2, current=1).install(monkeypatch)
    torch.manual_seed(7)
    rng.save_rng(path)
    expected = torch.rand(3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(8)
    rng.load_rng(path)
    assert torch.equal(torch.rand(3), expected)


def test_a_malformed_device_state_list_is_a_file_error(monkeypatch, tmp_path):
    path = str(tmp_path / "rng.pt")
    torch.save({**rng.rng_state(), "cuda": 3}, path)
    FakeCuda(1).install(monkeypatch)
    with pytest.raises(rng.RngFileError, match="malformed"):
        rng.load_rng(path)
