"""Metrics: JSONL file, optional TensorBoard, throughput and model-FLOPs utilisation.

metrics.jsonl holds one JSON object per line, two kinds:

    {"kind": "train", "step": 120, "loss": 3.41, "lr": ..., "rtf_lr": ..., "grad_norm": ...,
     "tokens": ..., "tokens_per_s": ..., "eval_s": 0.0, "checkpoint_s": 0.0, "skipped_steps": 0,
     "elapsed_s": ..., ["mfu": ...]}
    {"kind": "eval", "step": 200, "val_loss": 3.2, "val_ppl": 24.5, "val_tokens": ...}

`tokens_per_s` (and `mfu`, derived from it) measure training steps only: the seconds the window
spent in evaluation and checkpointing are taken out of it and reported on their own as `eval_s`
and `checkpoint_s` in the record of the window they fell into (eval records hold no times, so
that a resumed run's file stays identical to an uninterrupted one's), so that throughput does not
dip in every window that holds one.

`loss` is the mean over the steps of its logging window (the step's own loss when
logging.log_every = 1); Python's float repr round-trips, so losses read back are bit-exact.
On resume the file is cut back to the resumed step, so an interrupted-and-resumed run leaves the
same file as an uninterrupted one; the records cut are kept in metrics.set_aside.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from utils.atomic import write_text

# Dense bf16 tensor-core peak per GPU (no 2:4 sparsity), from the vendors' datasheets, which
# mostly print the sparse figure: dense is half of it. MFU is always reported against this peak,
# also for fp32 runs (which then show how much they leave unused). Matched in order against the
# upper-cased CUDA device name: each row's words must all appear in it, so a variant's row comes
# before its family's ("H100 NVL" before "H100", "GB200" before "B200", "L40S" before "L40"/"L4").
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("GB200",), 2.5e15),  # Grace Blackwell superchip GPU: 5 PFLOPS sparse
    (("B200",), 2.25e15),  # HGX B200: 4.5 PFLOPS sparse
    (("B100",), 1.75e15),  # 3.5 PFLOPS sparse
    (("H200", "NVL"), 835.5e12),  # 1,671 TFLOPS sparse
    (("H200",), 989.5e12),  # 1,979 sparse, as H100 SXM (GH200 as well)
    (("H100", "NVL"), 835.5e12),  # 1,671 sparse (the datasheet's pair figure, 3,958, is two GPUs)
    (("H100", "PCIE"), 756.5e12),  # 1,513 sparse
    (("H100",), 989.5e12),  # SXM: 1,979 sparse
    (("H800", "PCIE"), 756.5e12),  # the H100 PCIe's compute
    (("H800",), 989.5e12),  # SXM: the H100 SXM's compute (less NVLink and FP64)
    (("H20",), 148e12),
    (("A100",), 312e12),  # SXM and PCIe alike
    (("A800",), 312e12),  # the A100's compute
    (("A10G",), 70e12),  # AWS's A10 variant
    (("A10",), 125e12),  # 250 sparse
    (("L40S",), 362e12),  # 733 sparse
    (("L40",), 181e12),  # 362 sparse
    (("L4",), 121e12),  # 242 sparse
    (("V100",), 125e12),  # fp16 tensor cores (no bf16)
)


def peak_flops_for_name(device_name: str) -> float | None:
    """Dense bf16 peak of the GPU called `device_name` (torch.cuda.get_device_name), or None."""
    name = device_name.upper()
    for words, flops in PEAK_BF16_FLOPS:
        if all(w in name for w in words):
            return flops
    return None


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of a CUDA device, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def train_flops_per_token(n_params: int, n_attn_layers: int, d_model: int, seq_len: int) -> float:
    """Model FLOPs per trained token: 6 N (forward 2 N, backward 4 N per parameter) plus
    causal attention's score/value matmuls, 6 * 2 * d * T / 2 per attention layer.

    The FFT long convolutions cost O(d T log T) and are left out (on a 125M model at T 2048 they
    are a few percent of 6 N), so MFU is a slight under-estimate for Hyena layers.
    """
    return 6.0 * n_params + 6.0 * n_attn_layers * d_model * seq_len


def now() -> float:
    """The clock of the throughput windows (a module function, so tests can replace it)."""
    return time.time()


@dataclass
class LogWindow:
    """The steps since the last train record; a record's `loss` is `mean_loss()`, its
    `tokens_per_s` the window's training tokens over its wall time less `excluded()` (the time
    `exclude` was told of: evaluation and checkpoints, by kind)."""

    loss_sum: float = 0.0  # over the applied (finite) steps
    applied: int = 0
    steps: int = 0
    started: float = field(default_factory=lambda: now())
    paused: dict[str, float] = field(default_factory=dict)  # seconds not spent training, by kind

    def add(self, loss: float, applied: bool) -> None:
        self.steps += 1
        if applied:
            self.loss_sum += loss
            self.applied += 1

    def mean_loss(self) -> float:
        """nan when every step of the window was skipped."""
        return self.loss_sum / self.applied if self.applied else float("nan")

    def exclude(self, kind: str, seconds: float) -> None:
        """Take `seconds` spent on `kind` ("eval", "checkpoint") out of the training time."""
        self.paused[kind] = self.paused.get(kind, 0.0) + seconds

    def excluded(self, kind: str | None = None) -> float:
        return sum(self.paused.values()) if kind is None else self.paused.get(kind, 0.0)

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return tokens_per_step * self.steps / max(now() - self.started - self.excluded(), 1e-9)


class MetricsLogger:
    """Writes metrics.jsonl (and TensorBoard events when asked) on the main rank only."""

    def __init__(self, path: str, enabled: bool, tensorboard_dir: str | None = None):
        self.path = path
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if tensorboard_dir:
            try:  # here, not at the top: tensorboard is an optional package, needed only when asked for
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "logging.tensorboard=true needs the tensorboard package: pip install tensorboard"
                ) from e
            self.tb = SummaryWriter(tensorboard_dir)

    @property
    def set_aside_path(self) -> str:
        """Where records cut from the file are kept (`truncate_after`): metrics.set_aside.jsonl."""
        return self.path.removesuffix(".jsonl") + ".set_aside.jsonl"

    def truncate_after(self, step: int) -> None:
        """Cut records of steps > `step` from the file: steps a run interrupted after its last
        checkpoint will train again, or the steps of the line a run branching off an older
        checkpoint leaves (checkpoint.resume=PATH; that line's checkpoints are kept too). Nothing is
        lost: the cut records are appended to `set_aside_path` first."""
        if not self.enabled:
            return
        kept, cut = [], []
        if os.path.isfile(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill
                        continue
                    line = line if line.endswith("\n") else line + "\n"
                    (kept if rec.get("step", 0) <= step else cut).append(line)
        if cut:
            with open(self.set_aside_path, "a") as f:
                f.write("".join(cut))
                f.flush()
                os.fsync(f.fileno())
        write_text(self.path, "".join(kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        # Non-finite floats are not valid JSON: write them as the strings "nan" / "inf".
        clean = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            prefix = "eval" if record.get("kind") == "eval" else "train"
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "kind") and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str, kind: str = "train") -> list:
    """Records of one kind from a metrics.jsonl file (for tests and plots)."""
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]
