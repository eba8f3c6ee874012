"""Independent references and instruments shared by the model tests (numpy float64, no code
under test)."""

from __future__ import annotations

import numpy as np
import torch
from torch.overrides import TorchFunctionMode


def np_causal_conv(u: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Naive O(T^2) causal convolution, u (B, C, T), k (C, T): y_t = sum_{s<=t} k_s u_{t-s}."""
    T = u.shape[-1]
    y = np.zeros(u.shape)
    for t in range(T):
        y[..., t] = (k[:, : t + 1][:, ::-1] * u[..., : t + 1]).sum(-1)
    return y


class FFTSpy(TorchFunctionMode):
    """Records (function name, dtype of the first tensor argument) of every torch.fft call made
    under it, however torch.fft was imported."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, torch.dtype]] = []

    @property
    def dtypes(self) -> list[torch.dtype]:
        return [d for _, d in self.calls]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if "fft" in name and args and isinstance(args[0], torch.Tensor):
            self.calls.append((name, args[0].dtype))
        return func(*args, **(kwargs or {}))


def train_tiny_tokenizer(path) -> str:
    """A byte-level BPE of about 300 tokens with `<|endoftext|>`, trained on a few generated English
    sentences and written to `path` (a tokenizers JSON file); returns the path as a string. Lets the
    Hugging Face tests run without the shared real tokenizers, with a vocabulary small enough that
    a tiny model's embedding costs nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = ("the cat dog sat on a mat and ran to house tree big small red blue quick lazy fox jumps over "
             "def return class import for in if else while print self value list").split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=12)) + "." for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.save(str(path))
    return str(path)
