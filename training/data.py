"""Training-side data access: open the prepared splits with clear errors, cut each optimizer step
into per-process micro-batches, build the validation batches, and the unigram baseline.

Which sequences a step trains on. A step's global batch is split into S = world_size *
grad_accum_steps "slots" of micro_batch_size sequences; process r runs slots r*A .. r*A + A - 1
(A = grad_accum_steps) and slot k is

    data_prep.dataset.get_batch(ds, seed, step, rank=k, world_size=S, batch_size=micro_batch_size)

a pure function of its arguments. So a step's sequences depend only on (seed, step, S, micro):
two processes without accumulation and one process accumulating two micro-batches train on the
same sequences, and resuming at step s needs no sampler state.

Prefetch (`StepPrefetcher`): a background thread reads the micro-batches of the next step from the
memmaps while the current step computes, one step ahead. The batches are the same pure function of
the step, so the order and values are unchanged; only where and when they are read moves.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable

import numpy as np
import torch

from data_prep.dataset import PackedDataset, get_batch
from training.config import BatchPlan


class DataError(RuntimeError):
    """The prepared data is missing, incomplete or too small for the configured run."""


def prepare_hint(data_dir: str) -> str:
    return f"prepare it first, e.g. `python -m data_prep.prepare --out {data_dir}` (see scripts/main.sh)"


def open_split(data_dir: str, split: str, seq_len: int):
    """PackedDataset for one split, turning a missing/incomplete folder into a DataError."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory '{data_dir}' does not exist (data.dir); {prepare_hint(data_dir)}")
    try:
        return PackedDataset(data_dir, split, seq_len)
    except (FileNotFoundError, KeyError) as e:  # not prepared, or its preparation did not finish
        reason = str(e.args[0]) if e.args else str(e)  # (a KeyError's str() would quote the message)
        hint = "" if "data_prep" in reason else f"; {prepare_hint(data_dir)}"  # said once, or not at all
        raise DataError(f"cannot open the '{split}' split of '{data_dir}': {reason}{hint}") from None
    except (ValueError, OSError) as e:  # prepared, but too small, altered or unreadable: the message says which
        raise DataError(f"cannot use the '{split}' split of '{data_dir}': {e}") from None


def check_sizes(train_ds, val_ds, plan: BatchPlan, seq_len: int) -> None:
    """One optimizer step needs global_batch_size distinct training sequences; evaluation needs one."""
    need = plan.global_batch_size
    if train_ds.num_samples < need:
        raise DataError(
            f"too few tokens for one batch: the train split holds {train_ds.num_samples} sequences of "
            f"seq_len + 1 = {seq_len + 1} tokens, one step needs global_batch_size = {need} "
            f"({need * (seq_len + 1)} tokens). Use more data or lower data.seq_len / train.micro_batch_size"
        )
    if val_ds.num_samples < 1:
        raise DataError(f"too few tokens for one batch: the val split holds no full sequence of {seq_len + 1} tokens")


def check_token_ids(batches: list[torch.Tensor], ds, what: str) -> None:
    """DataError if a token id is outside the tokenizer's vocabulary (shards from another tokenizer,
    or corrupt). Checked on the batches actually used: a max over them is cheap next to a forward
    pass, where such an id would index past the embedding or silently train a padding row."""
    top = max(int(b.max()) for b in batches) if batches else -1
    if top >= ds.vocab_size:
        raise DataError(
            f"{what} of the '{ds.split}' split of {ds.data_dir} hold token id {top}, outside the tokenizer's "
            f"vocabulary of {ds.vocab_size} (data.dir): the token shards do not match tokenizer.json; "
            "prepare the data again"
        )


def step_micro_batches(ds, seed: int, step: int, plan: BatchPlan, rank: int) -> list[torch.Tensor]:
    """This rank's grad_accum_steps micro-batches of `step`, each LongTensor (micro, seq_len + 1)."""
    slots = plan.world_size * plan.grad_accum_steps
    first = rank * plan.grad_accum_steps
    return [get_batch(ds, seed, step, first + m, slots, plan.micro_batch_size) for m in range(plan.grad_accum_steps)]


def pin_for(device: torch.device) -> bool:
    """Whether host batches bound for `device` are read into pinned (page-locked) memory: on CUDA,
    where a pinned source lets `.to(device, non_blocking=True)` copy asynchronously (a pageable
    one makes the copy wait for the host); never on the CPU, where pinning costs and copies are
    no-ops."""
    return device.type == "cuda"


class StepPrefetcher:
    """The micro-batches of steps `start`, `start + 1`, ... (`make(step)`), built by a background
    thread at most one step ahead of the step being trained (a queue of one step).

    `get(step)` returns that step's batches, in order; an exception `make` raised for it is raised
    there, in the caller's thread, when that step is reached (never earlier). `close()` stops the
    thread and waits for it (bounded); call it in a `finally` so that an error or a signal in the
    loop leaves no thread behind. The thread is a daemon as well: it can never keep the process
    alive at exit.

    With `pin` (see `pin_for`) each batch is copied into pinned memory by the thread, off the
    training thread; the engines' `.to(device, non_blocking=True)` then copies asynchronously.
    """

    _POLL_S = 0.1  # how often a blocked thread checks whether it was told to stop

    def __init__(self, make: Callable[[int], list[torch.Tensor]], start: int, stop: int, pin: bool = False):
        self._make = make
        self._pin = pin
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(start, stop), name="step-prefetch", daemon=True)
        self._thread.start()

    def _work(self, start: int, stop: int) -> None:
        for step in range(start, stop):
            try:
                batches = self._make(step)
                if self._pin:
                    batches = [b.pin_memory() for b in batches]
                item = (step, batches, None)
            except BaseException as e:  # handed to the training thread, raised at its step
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=self._POLL_S)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def get(self, step: int) -> list[torch.Tensor]:
        """The batches of `step`, which must be the next one in order."""
        while True:
            try:
                got, batches, error = self._queue.get(timeout=self._POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"the batch prefetch thread ended before step {step + 1}") from None
        if got != step:
            raise RuntimeError(f"batch prefetch out of order: step {got + 1} delivered, {step + 1} expected")
        if error is not None:
            raise error
        return batches

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread: it finishes the step it is reading (one memmap read) and exits."""
        self._stop.set()
        while True:  # free the queue's slot, so a put in progress returns
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout)


def eval_indices(ds, eval_samples: int | None) -> np.ndarray:
    """The fixed validation sequences: the first `eval_samples` (all when None)."""
    n = ds.num_samples if eval_samples is None else min(eval_samples, ds.num_samples)
    return np.arange(n)


def eval_batches(ds, eval_samples: int | None, batch_size: int, rank: int, world_size: int) -> list[torch.Tensor]:
    """This rank's share (every world_size-th sequence) of the validation set, in batches."""
    idx = eval_indices(ds, eval_samples)[rank::world_size]
    out = []
    for start in range(0, len(idx), batch_size):
        rows = [np.asarray(ds[int(i)], dtype=np.int64) for i in idx[start : start + batch_size]]
        out.append(torch.from_numpy(np.stack(rows)))
    return out


def unigram_perplexity(train_ds, val_ds, eval_samples: int | None, max_train_samples: int | None) -> tuple[float, int]:
    """Perplexity of an add-one-smoothed unigram model on the validation targets.

        p(w) = (c(w) + 1) / (N + V),    ppl = exp(-(1/M) sum_{val targets y} log p(y))

    c counts the target tokens (positions 1..seq_len) of the first `max_train_samples` training
    sequences (all when None), N = sum c, V = vocab_size; the validation targets are exactly those
    the validation loss is measured on. Returns (ppl, number of train tokens counted).
    """
    vocab = train_ds.vocab_size
    n_train = train_ds.num_samples if max_train_samples is None else min(max_train_samples, train_ds.num_samples)
    counts = np.zeros(vocab, dtype=np.int64)
    for i in range(n_train):
        counts += np.bincount(np.asarray(train_ds[i][1:]), minlength=vocab)[:vocab]
    logp = np.log(counts + 1.0) - math.log(counts.sum() + vocab)
    nll, m = 0.0, 0
    for i in eval_indices(val_ds, eval_samples):
        y = np.asarray(val_ds[int(i)][1:])
        nll -= float(logp[y].sum())
        m += y.size
    return math.exp(nll / m), int(counts.sum())
