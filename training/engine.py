"""Execution engines: one process, torch DDP (torchrun), DeepSpeed ZeRO 1/2.

All engines expose the same small interface used by the trainer:

    result = engine.train_step(micro_batches)   # one optimizer step over grad_accum_steps micro-batches
    loss_sum, n_tokens = engine.eval_sums(batches)
    engine.save(dir) / engine.load(dir, saved_world_size)   # collective: every rank calls them

`micro_batches` is this rank's list of LongTensor (micro_batch_size, seq_len + 1). The loss of a
micro-batch is the mean token cross-entropy, computed in float32 from the logits:

    loss = mean_{b,t} -log softmax(logits[b, t])[x[b, t + 1]]

For a Hyena-RTF model the logits are never built whole: the model's forward(skip_logits=True)
takes the loss from the hidden states and the head in blocks of rows (models/chunked_loss.py), so
neither the forward nor the backward holds the (B, T, V) float32 logits (3.3 GB for 8 x 2048
tokens at a 50k vocabulary, as much again for their gradient). Other models (gpt_neox) go through
their logits.

All micro-batches have the same size, so the step loss reported (and optimised) is the plain mean
over the global batch, identical for any split into processes and accumulation steps.

One host read and one collective per step. The loss of each micro-batch stays on the device,
summed in float64 (the order and precision of the former host-side sum, so the reported loss is
bit-identical); at the end of the step one all-reduce carries the step's mean loss together with
the caller's per-step `signals` (the trainer's stop flags), and one `read_host` brings the reduced
values and the gradient norm back to the host. A host read is a device synchronisation: one per
micro-batch stalled the GPU queue once per micro-batch.

Non-finite steps: when any rank's loss or the global gradient norm is non-finite the optimizer
step is skipped and the gradients are dropped, consistently on every rank (the flag is
all-reduced). Under DeepSpeed the ZeRO optimizer performs the skip itself: it checks the global
gradient norm of the (float32) gradients and reports it through `was_step_applied()`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from models.long_filter import training_route
from models.modeling_hyena_rtf import HyenaRTFForCausalLM, next_token_nll
from training.config import BatchPlan, check_deepspeed_extra
from training.dist_env import DistEnv
from training.optim import apply_settings, config_settings
from training.zero_elastic import ZeroFullState, group_param_names

# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DeepSpeed's engine (both keep it as `.module`)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def lm_loss_terms(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies in float32, number of tokens) for batch (B, T + 1)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    if isinstance(unwrapped(model), HyenaRTFForCausalLM):
        # Called through the wrapper (DDP's and DeepSpeed's forward prepare the gradient reduction
        # and apply autocast). The targets are aligned already (shift_labels); num_items_in_batch=1
        # makes the returned loss the sum itself (a division by 1 is exact).
        out = model(input_ids=inputs, shift_labels=targets, skip_logits=True, num_items_in_batch=1, use_cache=False)
        return out.loss, targets.numel()
    out = model(input_ids=inputs, use_cache=False)  # scoring: no recurrent prefill, in eval mode too
    logits = out.logits if hasattr(out, "logits") else out
    # Logits beyond the tokenizer's vocabulary are padding; targets never index them, so a plain
    # cross-entropy over the padded width is the right loss (they only add to the normaliser).
    return next_token_nll(logits, targets), targets.numel()


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    loss_sum, n = lm_loss_terms(model, batch)
    return loss_sum / n


def strict_fp32_requested(strict_fp32: bool = False) -> bool:
    """Strict float32 matmuls asked for: by the caller, or by NVIDIA_TF32_OVERRIDE=0 (NVIDIA's own
    switch, which turns TF32 off inside cuBLAS/cuDNN whatever torch asks for)."""
    return strict_fp32 or os.environ.get("NVIDIA_TF32_OVERRIDE") == "0"


def configure_tf32(device: torch.device, precision: str, strict_fp32: bool = False) -> bool | None:
    """Whether float32 matmuls and convolutions of an fp32 run use TF32 tensor cores; sets torch's
    flags accordingly and returns the choice, or None where nothing was touched.

    On CUDA with precision fp32, TF32 is on unless strict float32 is asked for (`strict_fp32`, or
    NVIDIA_TF32_OVERRIDE=0): torch's default leaves float32 matmuls on the plain float32 units,
    ~15x below bf16 on Ampere and later GPUs, while TF32 keeps float32 range and storage and rounds
    the products' inputs to 10 mantissa bits (bf16 keeps 7). Strict runs set both flags off (cuDNN
    convolutions default to TF32). bf16 runs and every CPU run keep torch's defaults: CPU numerics
    stay bit-identical. The legacy `allow_tf32` flags are set, not `fp32_precision`: on torch >= 2.9
    they update the new flags too, while the reverse makes later reads of the legacy flags raise.
    """
    if device.type != "cuda" or precision != "fp32":
        return None
    enabled = not strict_fp32_requested(strict_fp32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled


def read_host(t: torch.Tensor) -> list[float]:
    """The one place a training step reads device values back to the host (a synchronisation on
    CUDA): the 1-D tensor as Python floats."""
    return t.tolist()


# What a caller hands `train_step` to be summed over ranks with the step's loss: a function,
# called once per step just before the all-reduce, so that it sees flags set during the step.
Signals = Callable[[], Sequence[float]]


@dataclass
class StepResult:
    loss: float  # mean over the global batch (nan/inf if non-finite on any rank)
    grad_norm: float | None  # global L2 norm before clipping
    applied: bool  # False when the step was skipped (non-finite)
    signals: list[float] = field(default_factory=list)  # the caller's signals, summed over ranks


class Engine:
    """Common state and collectives. Subclasses set `optimizer` and implement train_step/save/load."""

    kind = "base"
    optimizer: torch.optim.Optimizer  # the torch AdamW, or DeepSpeed's ZeRO optimizer around it

    def __init__(
        self,
        model: nn.Module,
        plan: BatchPlan,
        device: torch.device,
        precision: str,
        env: DistEnv,
        strict_fp32: bool = False,
    ):
        self.module = model
        self.plan = plan
        self.device = device
        self.precision = precision
        self.env = env
        self.tf32 = configure_tf32(device, precision, strict_fp32)  # None: torch's defaults kept

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def autocast(self):
        """bf16 autocast for matmuls with float32 parameters (the model computes its RTF kernels in
        float32 itself); nothing for fp32. DeepSpeed's forward applies the same autocast from its
        `torch_autocast` section; evaluation calls the bare module and so uses this one."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.world_size > 1

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Sum a few floats over ranks (float64, so token counts stay exact)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        if self.distributed():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_reduce_(self, t: torch.Tensor, op=None) -> torch.Tensor:
        """Reduce `t` over ranks in place (SUM unless `op`), on the device the backend moves
        (see `_comm_device`); returns the reduced tensor, on that device."""
        t = t.to(self._comm_device())
        if self.distributed():
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
        return t

    def _reduce_step(
        self, loss_total: torch.Tensor, accum: int, signals: Signals | None, grad_norm: torch.Tensor | None = None
    ) -> tuple[float, float | None, list[float]]:
        """The step's one all-reduce and one host read: (mean loss over the global batch, this
        rank's grad norm or None, the signals summed over ranks).

        loss_total: float64 sum of the micro-batch losses on the device. The loss is divided by
        `accum` before the reduce and by the world size after it, as the host-side path did, so
        the float64 results are the same bits. The grad norm is identical on every rank (after
        DDP's reduce, or DeepSpeed's global norm), so it joins the read, not the reduce.
        """
        flags = torch.tensor(list(signals()) if signals is not None else [], dtype=torch.float64)
        comm = self._comm_device()
        t = self.all_reduce_(torch.cat([(loss_total / accum).reshape(1).to(comm), flags.to(comm)]))
        if grad_norm is not None:
            t = torch.cat([t, grad_norm.detach().to(comm, torch.float64).reshape(1)])
        values = read_host(t)
        loss_sum, sums = values[0], values[1 : 1 + len(flags)]
        norm = values[-1] if grad_norm is not None else None
        return loss_sum / self.world_size, norm, sums

    def barrier(self) -> None:
        if self.distributed():
            dist.barrier()

    def _comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo moves CPU tensors.
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    @torch.no_grad()
    def eval_sums(self, batches: list[torch.Tensor]) -> tuple[float, float]:
        """(sum of token losses, number of tokens) over this rank's batches, summed over ranks, with
        the long filters' training kernels (`training_route`: no recurrent form is built for it)."""
        was_training = self.module.training
        self.module.eval()
        total, count = 0.0, 0
        for batch in batches:
            with self.autocast(), training_route():
                s, n = lm_loss_terms(self.module, batch.to(self.device, non_blocking=True))
            total += float(s)
            count += n
        self.module.train(was_training)
        total, count = self.all_reduce_sum([total, count])
        return total, count

    @property
    def param_groups(self) -> list[dict]:
        """The optimizer's groups, where `set_lr` writes each step's lr. Under DeepSpeed these are
        its ZeRO optimizer's groups, which keep the keys of ours (`name`, `peak_lr`)."""
        return self.optimizer.param_groups

    def train_step(self, micro_batches: list[torch.Tensor], signals: Signals | None = None) -> StepResult:
        """One optimizer step over this rank's micro-batches. `signals()`, when given, is called
        once before the step's all-reduce; its values come back summed over ranks in
        `StepResult.signals`."""
        raise NotImplementedError

    def save(self, ckpt_dir: str) -> None:
        raise NotImplementedError

    def load(self, ckpt_dir: str, saved_world_size: int) -> None:
        """Restore model and optimizer from ckpt_dir, saved by `saved_world_size` processes."""
        raise NotImplementedError

    def settings(self) -> dict[str, float]:
        """The optimizer settings this engine took from the config, by config key (`config_settings`)."""
        return config_settings(self.param_groups)

    def apply_settings(self, settings: dict[str, float]) -> None:
        apply_settings(self.param_groups, settings)

    def restore(self, ckpt_dir: str, saved_world_size: int) -> list[str]:
        """Collective: `load`, then the config's optimizer settings again. Loading an optimizer
        state brings back the hyper-parameters it was saved with (lr, the schedule's `peak_lr`,
        weight decay, betas, eps; DeepSpeed also its gradient clipping), but a resume with new
        values (a lower lr after a loss spike) must train with them, as its config.yaml records.
        The moments and step counts stay as loaded. Returns one line per value that changed:
        "optim.lr: checkpoint 0.003 -> config 1e-05"."""
        wanted = self.settings()
        self.load(ckpt_dir, saved_world_size)
        saved = self.settings()
        self.apply_settings(wanted)
        return [f"{k}: checkpoint {saved[k]:g} -> config {v:g}" for k, v in wanted.items() if saved.get(k) != v]

    def close(self) -> None:
        """Leave the process group together: a rank that tears down its gloo connections while a
        peer is still finishing the last collective can leave that peer waiting forever."""
        if dist.is_available() and dist.is_initialized():
            if self.world_size > 1:
                dist.barrier()
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Single process and torch DDP
# --------------------------------------------------------------------------------------------


# The DistributedDataParallel wrappers of closed engines, kept until the process ends (TorchEngine.close).
_CLOSED_DDP: list[nn.Module] = []


class TorchEngine(Engine):
    """Plain PyTorch: one process, or DistributedDataParallel when launched with several."""

    MODEL_FILE = "model.pt"
    OPTIM_FILE = "optimizer.pt"

    def __init__(self, model, optimizer, plan, device, precision, env, grad_clip: float, strict_fp32: bool = False):
        super().__init__(model, plan, device, precision, env, strict_fp32)
        self.kind = "ddp" if env.world_size > 1 else "single"
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        if env.world_size > 1:
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            ids = [device.index] if device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.wrapped = model

    def close(self) -> None:
        """Leaves the process group (Engine.close) but never frees the DDP wrapper: its reducer holds
        the last reference to the gloo group, and freeing it destroys the group with the GIL held.
        That destructor waits for gloo's worker threads, and a worker that is freeing a finished
        collective's tensors needs the GIL while holding the lock the destructor waits on: rank 1 of
        a two-process torchrun run hung there forever after its last step (torch 2.13; gdb showed
        the main thread in ~ProcessGroupGloo under the reducer's deallocation and a gloo worker in
        take_gil). So the wrapper lives as long as the process, and a launched train.py ends with
        os._exit (train.py), which runs no destructor."""
        super().close()
        if self.wrapped is not self.module:
            _CLOSED_DDP.append(self.wrapped)

    def train_step(self, micro_batches, signals=None):
        self.module.train()
        accum = len(micro_batches)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro_batches):
            last = i == accum - 1
            # DDP all-reduces gradients in backward; skip that for all but the last micro-batch.
            sync = contextlib.nullcontext() if last or self.wrapped is self.module else self.wrapped.no_sync()
            with sync:
                with self.autocast():
                    loss = lm_loss(self.wrapped, batch.to(self.device, non_blocking=True))
                (loss / accum).backward()
            loss_total += loss.detach().double()  # stays on the device: no read per micro-batch
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        # Gradients are identical on every rank after DDP's all-reduce, so is this norm.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        loss, grad_norm, sums = self._reduce_step(loss_total, accum, signals, norm)
        applied = math.isfinite(loss) and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, applied, sums)

    def save(self, ckpt_dir):
        # Replicas are identical: rank 0 writes the full fp32 weights and optimizer state.
        if self.is_main:
            torch.save(self.module.state_dict(), os.path.join(ckpt_dir, self.MODEL_FILE))
            torch.save(self.optimizer.state_dict(), os.path.join(ckpt_dir, self.OPTIM_FILE))

    def load(self, ckpt_dir, saved_world_size):
        # Full replicas: any number of processes reads the same two files.
        model_file = os.path.join(ckpt_dir, self.MODEL_FILE)
        if not os.path.isfile(model_file):
            raise RuntimeError(
                f"{ckpt_dir} has no {self.MODEL_FILE}: it was not written by the single/ddp engine "
                f"(DeepSpeed checkpoints resume with train.engine=deepspeed)"
            )
        state = torch.load(model_file, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state)
        optim = torch.load(os.path.join(ckpt_dir, self.OPTIM_FILE), map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(optim)


# --------------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------------

DS_TAG = "deepspeed"  # sub-folder of a checkpoint holding DeepSpeed's files


# Elements per gradient-reduction and parameter all-gather bucket: 50M (200 MB of float32). DeepSpeed's
# default, 5e8 (2 GB), puts a 125M model's whole gradient in one bucket, so nothing of it overlaps
# the backward pass, and reserves 2 GB per bucket per GPU; tens of millions of elements already
# run NCCL at full bandwidth (train.deepspeed may still set other sizes).
DS_BUCKET_ELEMENTS = 50_000_000


def deepspeed_config(plan: BatchPlan, zero_stage: int, precision: str, grad_clip: float, extra: dict) -> dict:
    """The DeepSpeed JSON, derived from the training config (never kept by hand).

    bf16 uses DeepSpeed's `torch_autocast` section, not its `bf16` section: `bf16` casts every
    parameter to bfloat16 (RTF coefficients included), autocast keeps parameters and optimizer
    state float32 and runs the matmuls in bfloat16. Gradients are reduced in float32, as DDP
    reduces them: `lower_precision_safe_modules: []`, because by default DeepSpeed marks every
    Linear/Conv parameter (the tied embedding/head included) for a bfloat16 reduction.

    ZeRO stage 2 reduces (reduce-scatters) the gradients at every micro-batch, so it overlaps that
    communication with the backward pass (`overlap_comm`); stage 1 reduces once per step, at the
    accumulation boundary. Buckets hold DS_BUCKET_ELEMENTS elements.

    `extra` (train.deepspeed) is deep-merged last, but may not touch the batch keys, precision casts
    or ZeRO stage (`check_deepspeed_extra`).
    """
    zero = {
        "stage": zero_stage,
        "reduce_bucket_size": DS_BUCKET_ELEMENTS,
        "allgather_bucket_size": DS_BUCKET_ELEMENTS,
    }
    if zero_stage == 2:
        zero["overlap_comm"] = True
    cfg = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # our own logger reports progress
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    check_deepspeed_extra(extra, zero_stage)

    def merge(dst: dict, src: dict) -> dict:
        for k, v in src.items():
            dst[k] = merge(dict(dst.get(k, {})), v) if isinstance(v, dict) and isinstance(dst.get(k), dict) else v
        return dst

    return merge(cfg, extra)


def init_deepspeed_distributed(device: torch.device) -> None:
    # deepspeed is imported only where the DeepSpeed engine runs: it is an optional package, and
    # importing it costs seconds (it probes its ops and accelerators) that other engines never need.
    import deepspeed

    if device.type == "cpu":
        # The shared-memory comm op is JIT-compiled on first use (~30 s); gloo does the job on CPU.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stage 1/2 around a torch AdamW client optimizer. Checkpoints are DeepSpeed's
    own files plus the full optimizer state (training/zero_elastic.py), so that they also resume
    on another number of processes; on the saved number, DeepSpeed's own load runs unchanged."""

    kind = "deepspeed"

    def __init__(self, model, optimizer, plan, device, precision, env, ds_config: dict, strict_fp32: bool = False):
        super().__init__(model, plan, device, precision, env, strict_fp32)
        import deepspeed  # optional and slow to import: see init_deepspeed_distributed

        init_deepspeed_distributed(device)
        self.ds_config = ds_config
        names = group_param_names(model, optimizer)  # before DeepSpeed swaps in its flat partitions
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.full_state = ZeroFullState(self.ds, names)

    def train_step(self, micro_batches, signals=None):
        if len(micro_batches) != self.ds.gradient_accumulation_steps():
            raise RuntimeError("micro-batch count differs from DeepSpeed's gradient_accumulation_steps")
        self.ds.train()
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in micro_batches:
            loss = lm_loss(self.ds, batch.to(self.device, non_blocking=True))
            self.ds.backward(loss)  # scales by 1/accum itself
            self.ds.step()  # applies the update only at the accumulation boundary
            loss_total += loss.detach().double()  # stays on the device: no read per micro-batch
        norm = self.ds.get_global_grad_norm()  # a tensor or a float, depending on DeepSpeed's path
        on_device = norm if torch.is_tensor(norm) else None
        loss, dev_norm, sums = self._reduce_step(loss_total, len(micro_batches), signals, on_device)
        grad_norm = dev_norm if on_device is not None else (float(norm) if norm is not None else None)
        applied = bool(self.ds.was_step_applied())
        return StepResult(loss, grad_norm, applied, sums)

    def settings(self):
        """The groups' settings and the gradient clipping, which DeepSpeed's ZeRO load also takes
        from the checkpoint (its `clip_grad`)."""
        clip = getattr(self.optimizer, "clip_grad", None)  # ZeRO 1/2 optimizers have it
        return {**super().settings(), **({"optim.grad_clip": clip} if clip is not None else {})}

    def apply_settings(self, settings):
        super().apply_settings(settings)
        if "optim.grad_clip" in settings:
            self.optimizer.clip_grad = settings["optim.grad_clip"]

    def save(self, ckpt_dir):
        self.ds.save_checkpoint(ckpt_dir, tag=DS_TAG)
        self.full_state.save(ckpt_dir)  # what a resume on another world size needs (zero_elastic.py)

    def load(self, ckpt_dir, saved_world_size):
        if not os.path.isdir(os.path.join(ckpt_dir, DS_TAG)):
            raise RuntimeError(
                f"{ckpt_dir} has no {DS_TAG}/ folder: it was not written by the DeepSpeed engine "
                f"(use train.engine=single or ddp to resume it)"
            )
        if saved_world_size != self.world_size:
            self.full_state.load_resized(ckpt_dir, DS_TAG)
            return
        path, _ = self.ds.load_checkpoint(
            ckpt_dir, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")
