"""The training run: config -> data -> model -> engine -> loop -> checkpoints -> HF export.

`run(cfg)` is what `python train.py`, `torchrun ... train.py` and `deepspeed ... train.py` execute
in every process. Per step s (counting from 0) each process

    1. sets every group's lr to peak_lr * f(s)                 (training/optim.py)
    2. takes its micro-batches of step s                      (training/data.py: pure function of s)
    3. runs forward/backward/step through the engine          (training/engine.py)

then the main process logs, and every process joins periodic evaluation and checkpointing. A
resumed run restores model, optimizer, RNG states and s from the checkpoint; nothing else is
needed because data order and schedule are functions of s.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from hyena_rtf.training import checkpoint as ckpt
from hyena_rtf.training.config import (
    ConfigError,
    check_optional_packages,
    fill_model_section,
    resolve_batch,
    resolve_model_kwargs,
    to_yaml,
)
from hyena_rtf.training.data import (
    check_sizes,
    check_token_ids,
    eval_batches,
    open_split,
    step_micro_batches,
    unigram_perplexity,
)
from hyena_rtf.training.engine import (
    DeepSpeedEngine,
    Engine,
    TorchEngine,
    choose_device,
    choose_engine,
    deepspeed_config,
    detect_env,
    ensure_single_process_env,
)
from hyena_rtf.training.metrics import MetricsLogger, peak_flops, train_flops_per_token
from hyena_rtf.training.optim import check_rtf_fp32, lr_factor, make_optimizer, param_groups, set_lr
from hyena_rtf.training.resume import check_resume_compatible, check_same_data, data_fingerprint, find_resume
from hyena_rtf.training.runlock import RunLock
from hyena_rtf.utils.atomic import NotReplaceableError, write_text


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite steps)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _model_classes():
    from hyena_rtf.models.configuration_hyena_rtf import HyenaRTFConfig, count_parameters
    from hyena_rtf.models.modeling_hyena_rtf import HyenaRTFForCausalLM

    return HyenaRTFConfig, HyenaRTFForCausalLM, count_parameters


class _Stop:
    """SIGTERM/SIGINT ask for a checkpoint at the end of the current step (cluster pre-emption).

    `signum` is the first signal received; the run then ends with exit code 128 + signum (143 for
    SIGTERM, 130 for SIGINT, the shell's convention) so that `set -e` scripts and schedulers see
    an interrupted run, not a finished one.
    """

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): no handler
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def build_engine(cfg: DictConfig, model, plan, device, env, kind: str) -> Engine:
    o = cfg.optim
    groups = param_groups(model, o.lr, o.rtf_lr, o.weight_decay)
    optimizer = make_optimizer(groups, betas=(o.beta1, o.beta2), eps=o.eps)
    if kind == "deepspeed":
        extra = OmegaConf.to_container(cfg.train.deepspeed, resolve=True)
        ds_cfg = deepspeed_config(plan, cfg.train.zero_stage, cfg.train.precision, o.grad_clip, extra)
        return DeepSpeedEngine(model, optimizer, plan, device, cfg.train.precision, env, ds_cfg)
    return TorchEngine(model, optimizer, plan, device, cfg.train.precision, env, o.grad_clip)


def export_dir_of(cfg: DictConfig) -> str:
    return cfg.checkpoint.export_dir or os.path.join(cfg.train.out_dir, "hf")


def check_export_target_of_run(cfg: DictConfig) -> None:
    """The end-of-run export may replace an earlier export, never the run folder, its
    checkpoints, or a folder that contains the run (NotReplaceableError)."""
    from hyena_rtf.training.export import check_export_destination

    check_export_destination(export_dir_of(cfg), cfg.train.out_dir)


def run(cfg: DictConfig) -> dict:
    """Train as configured; returns a summary dict (also on the non-main ranks).

    summary["signal"] is the number of the signal that stopped the run after its checkpoint was
    saved (the same on every rank), None when it ran to train.max_steps or train.stop_after_steps.
    The main process holds the run lock of train.out_dir (training/runlock.py) throughout.
    """
    t_start = time.time()
    check_optional_packages(cfg)
    out_dir = cfg.train.out_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"train.out_dir '{out_dir}' is an existing file, not a folder")
    if cfg.checkpoint.export_at_end:  # a bad export folder must fail now, not after the last step
        try:
            check_export_target_of_run(cfg)
        except NotReplaceableError as e:
            raise ConfigError(f"checkpoint.export_dir: {e}") from None
    env = detect_env()
    if env.rank != 0:
        return _run(cfg, env, t_start)
    lock = RunLock(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock.acquire()
    except OSError as e:  # read-only or full disk, no permission: say which folder, in one line
        raise ConfigError(f"train.out_dir '{out_dir}' cannot be created or written: {e.strerror}") from None
    try:
        return _run(cfg, env, t_start)
    finally:
        lock.release()


def _run(cfg: DictConfig, env, t_start: float) -> dict:
    kind = choose_engine(cfg.train.engine, env)
    if kind == "deepspeed" and env.launcher == "none":
        ensure_single_process_env()
        env = detect_env()
    device = choose_device(cfg.train.device, env.local_rank)
    plan = resolve_batch(cfg.train, env.world_size)
    main = env.rank == 0
    say = (lambda *a: print("[train]", *a, flush=True)) if main else (lambda *a: None)

    # ---- data and model ------------------------------------------------------------------
    train_ds = open_split(cfg.data.dir, "train", cfg.data.seq_len)
    val_ds = open_split(cfg.data.dir, "val", cfg.data.seq_len)
    check_sizes(train_ds, val_ds, plan, cfg.data.seq_len)
    HyenaRTFConfig, HyenaRTFForCausalLM, count_parameters = _model_classes()
    kwargs = resolve_model_kwargs(cfg.model, train_ds.vocab_size, cfg.data.seq_len)
    try:
        model_config = HyenaRTFConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid model configuration: {e}") from None
    if cfg.data.seq_len <= model_config.state_size:
        # The RTF kernel zero-pads its state_size + 1 denominator coefficients to the training
        # length; a shorter length would silently cut them off.
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} must be greater than model.state_size={model_config.state_size}"
        )
    fill_model_section(cfg, model_config)
    seed_everything(cfg.train.seed)
    model = HyenaRTFForCausalLM(model_config).to(device)  # float32 parameters in every mode
    n_params = count_parameters(model_config)
    engine = build_engine(cfg, model, plan, device, env, kind)
    check_rtf_fp32(engine.module)

    out_dir = cfg.train.out_dir
    ckpt_root = os.path.join(out_dir, ckpt.CHECKPOINTS)
    if main:
        ckpt.cleanup_partial(ckpt_root)
        write_text(os.path.join(out_dir, "config.yaml"), to_yaml(cfg))
        if kind == "deepspeed":
            import json

            write_text(os.path.join(out_dir, "ds_config.json"), json.dumps(engine.ds_config, indent=2))
    say(
        f"engine {engine.kind} | {env.world_size} process(es) on {device.type} | {cfg.train.precision} | "
        f"{n_params / 1e6:.2f}M parameters | global batch {plan.global_batch_size} = micro "
        f"{plan.micro_batch_size} x accum {plan.grad_accum_steps} x world {plan.world_size} | seq_len "
        f"{cfg.data.seq_len} | {train_ds.num_samples} train / {val_ds.num_samples} val sequences"
    )

    # ---- resume ----------------------------------------------------------------------------
    state = {"step": 0, "tokens": 0, "nonfinite_steps": 0}
    data_id = data_fingerprint(train_ds)
    resume_from = find_resume(cfg, ckpt_root, engine)
    if resume_from is not None:
        saved_state = ckpt.read_trainer_state(resume_from)
        check_resume_compatible(cfg, resume_from, saved_state, plan.global_batch_size, engine.kind, env.world_size)
        check_same_data(resume_from, saved_state, data_id, cfg.data.dir)
        state.update(ckpt.load_checkpoint(engine, resume_from))
        saved_world = saved_state.get("world_size", env.world_size)
        resized = (
            ""
            if saved_world == env.world_size
            else (
                f" with a different world size: saved by {saved_world} process(es), resumed on {env.world_size}"
                + (" (ZeRO partitions re-split from zero_full_state.pt)" if engine.kind == "deepspeed" else "")
            )
        )
        say(f"resumed from {resume_from} at step {state['step']}{resized}")
    start_step = state["step"]
    run_nonfinite = 0  # counted per process lifetime: the limit guards this run, not the history

    tb_dir = os.path.join(out_dir, "tensorboard") if cfg.logging.tensorboard else None
    metrics = MetricsLogger(os.path.join(out_dir, "metrics.jsonl"), main, tb_dir)
    metrics.truncate_after(start_step)

    val_batches = eval_batches(val_ds, cfg.data.eval_samples, plan.micro_batch_size, env.rank, env.world_size)
    check_token_ids(val_batches, val_ds, "validation batches")
    unigram_ppl = None
    if main and cfg.logging.unigram_baseline:
        unigram_ppl, n_counted = unigram_perplexity(
            train_ds, val_ds, cfg.data.eval_samples, cfg.logging.unigram_max_train_samples
        )
        say(f"unigram baseline (add-one, {n_counted} train tokens): val perplexity {unigram_ppl:.2f}")

    def evaluate(step: int) -> float:
        loss_sum, n_tok = engine.eval_sums(val_batches)
        val_loss = loss_sum / n_tok
        ppl = math.exp(min(val_loss, 700.0))
        metrics.log({"kind": "eval", "step": step, "val_loss": val_loss, "val_ppl": ppl, "val_tokens": int(n_tok)})
        extra = f" (unigram baseline {unigram_ppl:.2f})" if unigram_ppl else ""
        say(f"step {step}: val loss {val_loss:.4f} | val ppl {ppl:.2f}{extra}")
        return val_loss

    def save(step: int) -> str:
        trainer_state = {
            **state,
            "step": step,
            "engine": engine.kind,
            "world_size": env.world_size,
            "global_batch_size": plan.global_batch_size,
            "seed": cfg.train.seed,
            "data": data_id,
        }
        path = ckpt.save_checkpoint(
            engine, ckpt_root, step, trainer_state, to_yaml(cfg), train_ds.tokenizer_file, cfg.checkpoint.keep_last
        )
        say(f"saved checkpoint {path}")
        return path

    # ---- loop ------------------------------------------------------------------------------
    tokens_per_step = plan.global_batch_size * cfg.data.seq_len
    n_attn = len(model_config.attn_layers or [])
    flops_tok = train_flops_per_token(n_params, n_attn, model_config.d_model, cfg.data.seq_len)
    peak = peak_flops(device)
    decay_steps = cfg.schedule.decay_steps or cfg.train.max_steps
    stop_at = min(cfg.train.max_steps, cfg.train.stop_after_steps or cfg.train.max_steps)
    stopper = _Stop()
    stopper.install()
    progress = None
    if main and cfg.logging.progress_bar:
        from tqdm import tqdm

        progress = tqdm(
            total=cfg.train.max_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0
        )
    write = progress.write if progress is not None else print
    window = {"loss": 0.0, "n": 0, "t": time.time(), "steps": 0}
    last_ckpt, val_loss, step, stop_signal = None, None, start_step, None
    try:
        while step < stop_at:
            factor = lr_factor(step, cfg.schedule.warmup_steps, decay_steps, cfg.schedule.min_lr_ratio)
            set_lr(engine.param_groups, factor)
            micro_batches = step_micro_batches(train_ds, cfg.train.seed, step, plan, env.rank)
            check_token_ids(micro_batches, train_ds, f"the batch of step {step + 1}")
            result = engine.train_step(micro_batches)
            step += 1
            state["step"] = step
            state["tokens"] += tokens_per_step
            window["steps"] += 1
            if result.applied:
                window["loss"] += result.loss
                window["n"] += 1
            else:
                state["nonfinite_steps"] += 1
                run_nonfinite += 1
                if main:
                    write(
                        f"[train] step {step}: non-finite loss/gradient (loss {result.loss}, grad norm "
                        f"{result.grad_norm}); step skipped ({run_nonfinite}/{cfg.train.max_nonfinite_steps})"
                    )
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{result.loss:.3f}", refresh=False)

            too_many = run_nonfinite >= cfg.train.max_nonfinite_steps
            if step % cfg.logging.log_every == 0 or step == stop_at or too_many:
                elapsed = time.time() - window["t"]
                tps = tokens_per_step * window["steps"] / max(elapsed, 1e-9)
                groups = {g.get("name"): g["lr"] for g in engine.param_groups}
                rec = {
                    "kind": "train",
                    "step": step,
                    "loss": window["loss"] / window["n"] if window["n"] else float("nan"),
                    "lr": groups.get("decay", groups.get("no_decay")),
                    "rtf_lr": groups.get("rtf"),
                    "grad_norm": result.grad_norm,
                    "tokens": state["tokens"],
                    "tokens_per_s": tps,
                    "skipped_steps": state["nonfinite_steps"],
                    "elapsed_s": time.time() - t_start,
                }
                if peak:
                    rec["mfu"] = tps * flops_tok / (peak * env.world_size)
                    rec["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                metrics.log(rec)
                if main and progress is None:
                    write(
                        f"[train] step {step} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                        f"grad norm {result.grad_norm if result.grad_norm is None else round(result.grad_norm, 3)} | "
                        f"{tps:,.0f} tok/s"
                    )
                window = {"loss": 0.0, "n": 0, "t": time.time(), "steps": 0}

            if too_many:
                raise TrainingError(
                    f"stopping at step {step}: {run_nonfinite} non-finite steps (limit "
                    f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}). The model is diverging: lower "
                    f"optim.lr / optim.rtf_lr, lengthen schedule.warmup_steps, or check the data. The last "
                    f"checkpoint is {last_ckpt or ckpt.latest_checkpoint(ckpt_root) or 'none'}"
                )

            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                val_loss = evaluate(step)
            periodic = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
            # Every rank stops at the same step, also those the signal did not reach; SIGTERM wins
            # when ranks got different signals (a scheduler's pre-emption is the one to report).
            got_term, got_int = engine.all_reduce_sum(
                [float(stopper.signum == signal.SIGTERM), float(stopper.signum == signal.SIGINT)]
            )
            stop_now = got_term > 0 or got_int > 0
            if periodic or stop_now or step == stop_at:
                last_ckpt = save(step)
            if stop_now:
                stop_signal = signal.SIGTERM if got_term > 0 else signal.SIGINT
                say(f"stopped by {stop_signal.name}: checkpoint saved at step {step}; rerun the same command to resume")
                break
    finally:
        stopper.restore()
        if progress is not None:
            progress.close()

    summary = {
        "step": step,
        "checkpoint": last_ckpt,
        "nonfinite_steps": state["nonfinite_steps"],
        "unigram_ppl": unigram_ppl,
        "signal": int(stop_signal) if stop_signal else None,
    }
    if step >= cfg.train.max_steps:
        val_loss = evaluate(step)
        summary["val_loss"], summary["val_ppl"] = val_loss, math.exp(min(val_loss, 700.0))
        if unigram_ppl:
            say(f"final val perplexity {summary['val_ppl']:.2f} vs unigram baseline {unigram_ppl:.2f}")
        last_ckpt = last_ckpt or resume_from  # a rerun of a finished run trains no step
        if cfg.checkpoint.export_at_end:
            export_dir = export_dir_of(cfg)
            if main:
                from hyena_rtf.training.export import export_checkpoint

                export_checkpoint(last_ckpt, export_dir, verify=False)  # saved or verified by this run
                say(f"exported HF checkpoint to {export_dir}")
            summary["export_dir"] = export_dir
            engine.barrier()
    elif stop_signal is None:
        say(f"stopped after step {step} as configured (train.stop_after_steps); rerun without it to resume")
    summary["wall_s"] = time.time() - t_start
    say(f"done in {summary['wall_s']:.1f}s")
    metrics.close()
    engine.close()
    return summary
