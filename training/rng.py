"""RNG states of one process (python, numpy, torch, cuda): seeded at the start of a run, and saved
in every checkpoint as a file that loads without unpickling.

The file is `torch.save` of a flat dict holding only tensors, ints, floats, strings and None, read
back with `torch.load(weights_only=True)`: torch's restricted unpickler, which builds tensors and
plain containers and refuses any other global. A crafted file can therefore fail to load, but
cannot run code (the old format pickled numpy's state tuple and needed weights_only=False).

    python  random.getstate() = (version, 625 ints: 624 Mersenne Twister words + index, gauss_next)
    numpy   np.random.get_state() = ("MT19937", 624 uint32 keys, pos, has_gauss, cached_gaussian)
    cuda    the generator state of this process's current CUDA device only (key `cuda_current`)

Each process drives one GPU (its LOCAL_RANK), so its file holds that GPU's state and nothing about
the GPUs of other processes: the file restores wherever the process sees at least one GPU, also
on a resume with one GPU per task (SLURM, Kubernetes) or on a smaller node. Files of the earlier
layout hold the states of every GPU the process could see (key `cuda`, a list); they restore the
first min(saved, visible) of them, so their own device's state is kept on the same layout and a
resume on fewer devices no longer fails.
"""

from __future__ import annotations

import pickle
import random

import numpy as np
import torch

FORMAT = "hyena-rtf-rng/1"


class RngFileError(ValueError):
    """The file is not an RNG state this module wrote (or was altered); the message says why."""


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (model init; data order has its own)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    version, words, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "format": FORMAT,
        "python_version": int(version),
        "python_words": torch.tensor(words, dtype=torch.int64),
        "python_gauss_next": gauss_next,
        "numpy_name": str(name),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_current"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python_words"].tolist()), state["python_gauss_next"]))
    np.random.set_state(
        (
            state["numpy_name"],
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return  # a CPU resume of a GPU run: nothing to put the CUDA state into
    if "cuda_current" in state:
        torch.cuda.set_rng_state(state["cuda_current"], torch.cuda.current_device())
    elif "cuda" in state:  # the earlier layout: one state per device the saving process saw
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


def save_rng(path: str) -> None:
    torch.save(rng_state(), path)


def load_rng(path: str) -> None:
    """Restore this process's RNG states from `path`; RngFileError if it is not such a file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RngFileError(f"{path}: not a plain tensor file, refused without unpickling it ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RngFileError(f"{path}: not an RNG state file of format {FORMAT}")
    try:
        set_rng_state(state)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise RngFileError(f"{path}: malformed RNG state ({type(e).__name__}: {e})") from None
