"""The interface every long filter implements, and the memo its derived forms share.

A long filter maps (B, C, T) to (B, C, T) by a causal convolution whose kernel it owns:

    kernel(T)                 (channels, T): the taps, tap 0 carrying the feed-through; what the
                              parallel forward convolves with (models/fftconv.py)
    recurrence(dtype, check)  the recurrent form, an object with
                                finite_state               True when the state has a fixed size
                                init_state(B, device)      the zero state
                                response(x, T) -> y        the outputs of state x over the next T
                                                           steps with no input, (B, C, T)
                                advance(u, x=None) -> x'   the state after a chunk u (B, C, T) from x
                                                           (or from zero: the prefill)
                                step(u, x) -> (y, x')      one token u (B, C); a finite state is
                                                           written in place (x' is x)
                              A chunk from a state is three terms: its outputs are the convolution
                              with kernel(T), as in the parallel forward, plus response(x, T); the
                              state after it is advance(u, x). Every operator (models/hyena.py,
                              models/multihyena.py, serving/hyena_mixer.py) composes them that way.
                              dtype: the state's real dtype (a layer may promote it, see modal.py);
                              check: "error" | "warn" | "none", what to do with a filter whose
                              recurrence would diverge
    forward("kernel", T), forward("recurrence", dtype, check)
                              the two above as a call of the module: what the operators use, so
                              that module hooks run around every read of the parameters
                              (accelerate's offload hooks put them in place only during a call)
    store_recurrence()        keep what building the recurrent form computed in the module's
                              state, so that a checkpoint saved next loads without computing it
                              again (an export calls it; only a kind whose build is costly, the
                              RTF's O(n^3) roots, stores anything)
    own_optimizer_group       True: its parameters get their own lr and no weight decay
    training_route()          (a context) kernel(T) is the one training differentiates, with or
                              without gradients: the trainer's evaluations run in it
    from_config(config, layer_idx, channels, num_filters)   the constructor the registry calls

The registry of kinds is models/filters.py. Adding a kind is a file with a LongFilter subclass and
one line there.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

from .precision import Float32Parameters

_TRAINING_ROUTE = contextvars.ContextVar("hyena_rtf_training_route", default=False)


@contextlib.contextmanager
def training_route() -> Iterator[None]:
    """Inside it, a filter's kernel(T) for T up to its training length is the one training
    differentiates, with or without gradients: what an evaluation during training measures
    (training/engine.py). For an RTF that is the FFT kernel, so such an evaluation builds no
    recurrent form (an O(n^3) conversion each time the weights have changed)."""
    token = _TRAINING_ROUTE.set(True)
    try:
        yield
    finally:
        _TRAINING_ROUTE.reset(token)


def in_training_route() -> bool:
    """Whether `training_route()` is active here."""
    return _TRAINING_ROUTE.get()


class LongFilter(Float32Parameters):
    """Base class: the shared helpers. Subclasses set `channels`, `num_filters` and implement
    `kernel`, `recurrence` and `from_config`."""

    own_optimizer_group = False
    finite_state = True  # the recurrent state has a fixed size (the implicit filter's history does not)
    layer_idx: int | None = None  # set by from_config; names the layer in warnings
    channels: int
    num_filters: int

    @classmethod
    def from_config(cls, config, layer_idx: int, channels: int, num_filters: int | None) -> LongFilter:
        raise NotImplementedError

    def kernel(self, T: int) -> torch.Tensor:
        raise NotImplementedError

    def recurrence(self, dtype: torch.dtype = torch.float32, check: str = "error"):
        raise NotImplementedError

    def store_recurrence(self) -> None:
        """Nothing to store: this kind's recurrent form is cheap to build from its parameters."""

    def forward(self, what: str, *args):
        """self(what, *args) = self.kernel(*args) or self.recurrence(*args), inside the module's call."""
        if what == "kernel":
            return self.kernel(*args)
        if what == "recurrence":
            return self.recurrence(*args)
        raise ValueError(f"a long filter computes 'kernel' or 'recurrence', not {what!r}")

    # ---- helpers ------------------------------------------------------------------------------
    def where(self) -> str:
        """'layer i: ' for messages, when the layer is known."""
        return "" if self.layer_idx is None else f"layer {self.layer_idx}: "

    def compute_dtype(self) -> torch.dtype:
        """float64 for float64 parameters, else float32 (bf16 / fp16 are never a kernel's dtype)."""
        return torch.float64 if next(self.parameters()).dtype == torch.float64 else torch.float32

    def needs_grad(self) -> bool:
        """Whether autograd would differentiate the kernel: the differentiable route must be taken."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        """Filter-level tensor (num_filters, ...) -> channel-level (channels, ...)."""
        return t.repeat_interleave(self.channels // self.num_filters, dim=0)

    def memo(self, key, build: Callable):
        """build(), memoised under `key` until the parameters change. Keyed on the parameter values
        themselves: optimizers (DeepSpeed ZeRO among them) may write through `.data`, which changes
        neither the version counter nor the address."""
        params = [p.detach() for p in self.parameters()]
        state = self.__dict__.get("_memo")
        fresh = (
            state is not None
            and len(state[0]) == len(params)
            and all(m.device == p.device and m.dtype == p.dtype and torch.equal(m, p) for m, p in zip(state[0], params))
        )
        if not fresh:
            state = ([p.clone() for p in params], {})
            self.__dict__["_memo"] = state
        if key not in state[1]:
            with torch.no_grad():
                state[1][key] = build()
        return state[1][key]

    def memo_taps(self, T: int, taps: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """taps(T) (rows, T), memoised like `memo`. The taps of a shorter length are a prefix of a
        longer one's, so only the longest computed so far is kept."""
        held = self.memo("taps", lambda: [None])
        if held[0] is None or held[0].shape[-1] < T:
            with torch.no_grad():
                held[0] = taps(T)
        return held[0][..., :T]
