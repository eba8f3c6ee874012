"""The training run: config -> data -> model -> engine -> loop -> checkpoints -> HF export.

`run(cfg)` is what `python train.py`, `torchrun ... train.py` and `deepspeed ... train.py` execute
in every process. Per step s (counting from 0) each process

    1. sets every group's lr to peak_lr * f(s)                 (training/optim.py)
    2. takes its micro-batches of step s                      (training/data.py: pure function of s,
                                                               read one step ahead by a thread)
    3. runs forward/backward/step through the engine          (training/engine.py: one all-reduce
                                                               and one host read per step, which
                                                               also carry the stop signals)

then the main process logs, and every process joins periodic evaluation and checkpointing.
Multi-process runs first check that every process sees the same train.out_dir (dist_env.py). A
resumed run restores model, optimizer, RNG states and s from the checkpoint; nothing else is
needed because data order and schedule are functions of s.

A `Trainer` holds one process's run in three phases: `setup()` (data, model, engine, resume),
`train_loop()` (the steps) and `finish()` (final evaluation, export, summary).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data_prep.dataset import PackedDataset
from data_prep.layout import MANIFEST
from export.from_training import check_run_export_dir, export_checkpoint, run_export_dir
from training import checkpoint as ckpt
from training import metrics as metrics_clock
from training.build import build_engine, build_model
from training.config import BatchPlan, ConfigError, attention_shape, check_optional_packages, resolve_batch, to_yaml
from training.data import (
    StepPrefetcher,
    check_sizes,
    check_token_ids,
    eval_batches,
    open_split,
    pin_for,
    step_micro_batches,
    unigram_perplexity,
)
from training.dist_env import (
    DistEnv,
    check_shared_out_dir,
    choose_device,
    choose_engine,
    detect_env,
    ensure_single_process_env,
)
from training.engine import DeepSpeedEngine, Engine, StepResult
from training.metrics import LogWindow, MetricsLogger, peak_flops, train_flops_per_token
from training.optim import lr_factor, set_lr
from training.preemption import StopRequest
from training.resume import check_resume, data_fingerprint, find_resume
from training.runlock import RunLock, claim_run_dir
from utils.atomic import OVERWRITE_HINT, NotReplaceableError, write_text
from utils.logs import ROOT, get_logger, setup_logging

log = get_logger("train")


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite steps)."""


@dataclass
class Counters:
    """What one run segment hands to the next through trainer_state.json."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen, all processes
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient, over the whole history


class Trainer:
    """One process's part of a run. Every rank runs `setup()`, `train_loop()` and `finish()`
    (they contain collectives); only the main rank writes the run's files and logs."""

    kind: str  # "single" | "ddp" | "deepspeed"
    device: torch.device
    plan: BatchPlan
    train_ds: PackedDataset
    val_ds: PackedDataset
    n_params: int
    engine: Engine
    ckpt_root: str
    data_id: dict  # data fingerprint recorded in every checkpoint (training/resume.py)
    metrics: MetricsLogger
    val_batches: list[torch.Tensor]
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None  # None: no MFU (CPU, unknown GPU)

    def __init__(self, cfg: DictConfig, env: DistEnv, t_start: float, run_id: str | None = None):
        self.cfg = cfg
        self.env = env
        self.t_start = t_start
        self.run_id = run_id  # the run folder's stamp (training/runlock.py); known on the main rank
        self.counters = Counters()
        self.run_nonfinite = 0  # counted per process lifetime: the limit guards this run, not the history
        self.resume_from: str | None = None
        self.last_ckpt: str | None = None
        self.parent: dict | None = None  # the checkpoint the next one continues (its lineage)
        self.saving: dict | None = None  # the stamp of the checkpoint being written
        self.stop_signal: signal.Signals | None = None
        self.unigram_ppl: float | None = None

    @property
    def main(self) -> bool:
        return self.env.rank == 0

    def run(self) -> dict:
        """setup, train_loop, finish; a second signal (training/preemption.py) or a Ctrl-C before
        the loop's handlers are in place ends it at once with one log line: see `interrupted`."""
        try:
            self.setup()
            self.train_loop()
            return self.finish()
        except KeyboardInterrupt as e:
            return self.interrupted(getattr(e, "signum", signal.SIGINT))

    def rerun(self, change: str = "") -> str:
        """How to go on from the checkpoint just saved (`change`: what else the command must drop).
        The same command does only when it resumes from the run folder's latest
        (checkpoint.resume=auto): with resume=PATH it would branch off PATH again, setting aside
        what this run saved; with resume=none it would start over."""
        resume = self.cfg.checkpoint.resume
        changes = [c for c in (change, "" if resume == "auto" else f"with checkpoint.resume=auto (not {resume})") if c]
        return f"rerun {' and '.join(changes)} to resume" if changes else "rerun the same command to resume"

    def interrupted(self, signum: int) -> dict:
        """One log line on what was interrupted and what a rerun resumes from; the summary with
        `signal` set, so that train.py exits 128 + signum (130 for SIGINT, 143 for SIGTERM)."""
        sig = signal.Signals(signum)
        last = self.last_ckpt or self.resume_from
        resume = f"{self.rerun()} from {last}" if last else "nothing was saved"
        if self.saving is not None:
            step, path = self.saving["step"], os.path.join(self.ckpt_root, ckpt.step_dir_name(self.saving["step"]))
            stamp = ckpt.read_stamp(path) if self.main else None
            if stamp is not None and stamp["checkpoint_id"] == self.saving["checkpoint_id"]:  # it got published
                resume = f"{self.rerun()} from {path}"
                what = "it was complete"
            else:
                what = "that checkpoint is incomplete and is removed at the next start"
            log.warning(
                f"stopped at once by a second {sig.name} while saving the checkpoint of step {step}: {what}; {resume}"
            )
        else:
            log.warning(f"stopped at once by {sig.name} at step {self.counters.step}, without a checkpoint; {resume}")
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        return {
            "step": self.counters.step,
            "checkpoint": self.last_ckpt,
            "nonfinite_steps": self.counters.nonfinite_steps,
            "unigram_ppl": self.unigram_ppl,
            "signal": int(sig),
            "wall_s": time.time() - self.t_start,
        }

    # ---- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before the first step: engine kind, device and batch split; data; model and
        engine; the run's files; resume; metrics and validation batches."""
        cfg = self.cfg
        self.kind = choose_engine(cfg.train.engine, self.env)
        if self.kind == "deepspeed" and self.env.launcher == "none":
            ensure_single_process_env()
            self.env = detect_env()
        self.device = choose_device(cfg.train.device, self.env.local_rank)
        self.plan = resolve_batch(cfg.train, self.env.world_size)
        self.train_ds = open_split(cfg.data.dir, "train", cfg.data.seq_len)
        self.val_ds = open_split(cfg.data.dir, "val", cfg.data.seq_len)
        check_sizes(self.train_ds, self.val_ds, self.plan, cfg.data.seq_len)
        model = build_model(cfg, self.train_ds.vocab_size, self.device, self.kind, self.env)
        self.n_params = model.num_parameters()  # tied head and embedding counted once
        n_attn, width = attention_shape(model.config)
        self.flops_per_token = train_flops_per_token(self.n_params, n_attn, width, cfg.data.seq_len)
        self.peak_flops = peak_flops(self.device)
        self.tokens_per_step = self.plan.global_batch_size * cfg.data.seq_len
        self.engine = build_engine(cfg, model, self.plan, self.device, self.env, self.kind)
        # The first collective of the run after the engine's own: before anything reads or writes
        # checkpoints, which every rank must find in the same folder.
        check_shared_out_dir(cfg.train.out_dir, self.engine)
        self.ckpt_root = os.path.join(cfg.train.out_dir, ckpt.CHECKPOINTS)
        if os.path.lexists(self.ckpt_root) and not os.path.isdir(self.ckpt_root):  # found now, not at the first save
            raise ckpt.CheckpointError(
                f"{self.ckpt_root} is not a folder, so no checkpoint could be saved; move it away or choose "
                "another train.out_dir"
            )
        if self.main:  # the run's own leftovers only: stamped staging and trash folders
            ckpt.cleanup_partial(self.ckpt_root, self.run_id)
        log.info(self._banner())
        self._resume()  # may refuse: nothing of the run folder is rewritten before it
        if self.main:
            self._write_run_files()
        self._open_metrics_and_eval()

    def _banner(self) -> str:
        plan, cfg = self.plan, self.cfg
        return (
            f"engine {self.engine.kind} | {self.env.world_size} process(es) on {self.device.type} | "
            f"{cfg.train.precision} | {cfg.model.arch} | {self.n_params / 1e6:.2f}M parameters | "
            f"global batch {plan.global_batch_size} "
            f"= micro {plan.micro_batch_size} x accum {plan.grad_accum_steps} x world {plan.world_size} | seq_len "
            f"{cfg.data.seq_len} | {self.train_ds.num_samples} train / {self.val_ds.num_samples} val sequences"
        )

    def _open_metrics_and_eval(self) -> None:
        """metrics.jsonl cut back to the resumed step; this rank's validation batches; the unigram
        baseline (main rank)."""
        cfg, out_dir = self.cfg, self.cfg.train.out_dir
        tb_dir = os.path.join(out_dir, "tensorboard") if cfg.logging.tensorboard else None
        self.metrics = MetricsLogger(os.path.join(out_dir, "metrics.jsonl"), self.main, tb_dir)
        self.metrics.truncate_after(self.counters.step)
        micro, rank, world = self.plan.micro_batch_size, self.env.rank, self.env.world_size
        self.val_batches = eval_batches(self.val_ds, cfg.data.eval_samples, micro, rank, world)
        check_token_ids(self.val_batches, self.val_ds, "validation batches")
        if self.main and cfg.logging.unigram_baseline:
            self.unigram_ppl, n_counted = unigram_perplexity(
                self.train_ds, self.val_ds, cfg.data.eval_samples, cfg.logging.unigram_max_train_samples
            )
            log.info(f"unigram baseline (add-one, {n_counted} train tokens): val perplexity {self.unigram_ppl:.2f}")

    def _write_run_files(self) -> None:
        """Main rank: the effective config (and DeepSpeed's)."""
        out_dir = self.cfg.train.out_dir
        write_text(os.path.join(out_dir, "config.yaml"), to_yaml(self.cfg))
        if isinstance(self.engine, DeepSpeedEngine):
            write_text(os.path.join(out_dir, "ds_config.json"), json.dumps(self.engine.ds_config, indent=2))

    def _resume(self) -> None:
        """Collective: load the checkpoint `find_resume` picks, after checking it fits this run."""
        self.data_id = data_fingerprint(self.train_ds)
        self.resume_from = path = find_resume(self.cfg, self.ckpt_root, self.engine, self.run_id)
        if path is None:  # the same on every rank (find_resume): none skips a collective below
            return
        saved, stamp = check_resume(self.cfg, path, self.engine, self.plan.global_batch_size, self.data_id)
        self.parent = {"checkpoint_id": stamp.get("checkpoint_id"), "step": saved["step"], "path": path}
        world = self.env.world_size
        loaded = ckpt.load_checkpoint(self.engine, path)
        self.counters = Counters(loaded["step"], loaded.get("tokens", 0), loaded.get("nonfinite_steps", 0))
        saved_world = saved.get("world_size", world)
        resized = ""
        if saved_world != world:
            resized = f" with a different world size: saved by {saved_world} process(es), resumed on {world}"
            if self.engine.kind == "deepspeed":
                resized += " (ZeRO partitions re-split from zero_full_state.pt)"
        log.info(f"resumed from {path} at step {self.counters.step}{resized}")

    # ---- loop ------------------------------------------------------------------------------

    def train_loop(self) -> None:
        """Steps up to train.stop_after_steps / train.max_steps, or to the step a signal arrived in."""
        cfg = self.cfg
        stop_at = min(cfg.train.max_steps, cfg.train.stop_after_steps or cfg.train.max_steps)
        if self.counters.step >= stop_at and self.main:  # a rerun with a smaller max_steps, say: not silent
            log.warning(
                f"the run is already at step {self.counters.step}, not below step {stop_at} "
                "(train.max_steps / train.stop_after_steps): nothing to train; the checkpoint of step "
                f"{self.counters.step} stays the latest"
            )
        stopper = StopRequest()
        stopper.install()
        bar = None
        if self.main and cfg.logging.progress_bar:
            bar = tqdm(
                total=cfg.train.max_steps, initial=self.counters.step, desc="train", dynamic_ncols=True, mininterval=1.0
            )
        # The bar and the log share stderr: log lines go through tqdm.write so the bar stays whole.
        on_bar = logging_redirect_tqdm([logging.getLogger(ROOT)]) if bar is not None else contextlib.nullcontext()
        window = LogWindow()
        # The batches of the coming steps are read by a thread, one step ahead (training/data.py).
        make = lambda s: step_micro_batches(self.train_ds, cfg.train.seed, s, self.plan, self.env.rank)  # noqa: E731
        prefetch = StepPrefetcher(make, self.counters.step, stop_at, pin=pin_for(self.device))
        try:
            with on_bar:
                while self.counters.step < stop_at:
                    result = self._train_step(prefetch, stopper)
                    step = self.counters.step
                    window.add(result.loss, result.applied)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{result.loss:.3f}", refresh=False)
                    too_many = self.run_nonfinite >= cfg.train.max_nonfinite_steps
                    if step % cfg.logging.log_every == 0 or step == stop_at or too_many:
                        self._log_train(window, result, console=bar is None)
                        window = LogWindow()
                    if too_many:
                        raise TrainingError(
                            f"stopping at step {step}: {self.run_nonfinite} non-finite steps (limit "
                            f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}). The model is diverging: "
                            f"lower optim.lr / optim.rtf_lr, lengthen schedule.warmup_steps, or check the data. The "
                            f"last checkpoint is {self.last_ckpt or ckpt.latest_checkpoint(self.ckpt_root) or 'none'}"
                        )
                    # Evaluation and checkpoint time is not training time: taken out of the
                    # throughput window (logged as eval_s / checkpoint_s with its record).
                    if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                        t0 = metrics_clock.now()
                        self.evaluate(step)
                        window.exclude("eval", metrics_clock.now() - t0)
                    t0 = metrics_clock.now()
                    stop = self._save_or_stop(result, stop_at)
                    window.exclude("checkpoint", metrics_clock.now() - t0)
                    if stop:
                        break
        finally:
            prefetch.close()
            stopper.restore()
            if bar is not None:
                bar.close()

    def _train_step(self, prefetch: StepPrefetcher, stopper: StopRequest) -> StepResult:
        """Optimizer step s = counters.step: schedule, this rank's micro-batches, the engine's step.
        The stop flags ride on the step's all-reduce: `result.signals` is (ranks that got SIGTERM,
        ranks that got SIGINT), read just before that reduce."""
        cfg, step = self.cfg, self.counters.step
        sched = cfg.schedule
        factor = lr_factor(step, sched.warmup_steps, sched.decay_steps or cfg.train.max_steps, sched.min_lr_ratio)
        set_lr(self.engine.param_groups, factor)
        micro_batches = prefetch.get(step)
        check_token_ids(micro_batches, self.train_ds, f"the batch of step {step + 1}")

        def signals() -> list[float]:
            return [float(stopper.signum == signal.SIGTERM), float(stopper.signum == signal.SIGINT)]

        result = self.engine.train_step(micro_batches, signals)
        self.counters.step += 1
        self.counters.tokens += self.tokens_per_step
        if not result.applied:
            self.counters.nonfinite_steps += 1
            self.run_nonfinite += 1
            if self.main:  # a warning passes the other ranks' quiet log too
                log.warning(
                    f"step {step + 1}: non-finite loss/gradient (loss {result.loss}, grad norm {result.grad_norm}); "
                    f"step skipped ({self.run_nonfinite}/{cfg.train.max_nonfinite_steps})"
                )
        return result

    def _log_train(self, window: LogWindow, result: StepResult, console: bool) -> None:
        """One train record of metrics.jsonl for the window; a log line too when `console`.
        tokens_per_s (and mfu) leave out the window's evaluation and checkpoint time."""
        step = self.counters.step
        tps = window.tokens_per_s(self.tokens_per_step)
        lrs = {g.get("name"): g["lr"] for g in self.engine.param_groups}
        rec = {
            "kind": "train",
            "step": step,
            "loss": window.mean_loss(),
            "lr": lrs.get("decay", lrs.get("no_decay")),
            "rtf_lr": lrs.get("rtf"),
            "grad_norm": result.grad_norm,
            "tokens": self.counters.tokens,
            "tokens_per_s": tps,
            "eval_s": window.excluded("eval"),
            "checkpoint_s": window.excluded("checkpoint"),
            "skipped_steps": self.counters.nonfinite_steps,
            "elapsed_s": time.time() - self.t_start,
        }
        if self.peak_flops:
            rec["mfu"] = tps * self.flops_per_token / (self.peak_flops * self.env.world_size)
            rec["max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        self.metrics.log(rec)
        if console:
            norm = result.grad_norm if result.grad_norm is None else round(result.grad_norm, 3)
            log.info(f"step {step} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | grad norm {norm} | {tps:,.0f} tok/s")

    def _save_or_stop(self, result: StepResult, stop_at: int) -> bool:
        """After every step: checkpoint (collective) when one is due or a signal reached any rank;
        True when that signal ends the run. The signals were summed over ranks by the step's own
        all-reduce (`_train_step`), so this adds no collective of its own; a signal that arrives
        after that reduce is seen, on every rank alike, at the next step's."""
        step = self.counters.step
        periodic = self.cfg.checkpoint.every and step % self.cfg.checkpoint.every == 0
        # Every rank stops at the same step, also those the signal did not reach; SIGTERM wins
        # when ranks got different signals (a scheduler's pre-emption is the one to report).
        got_term, got_int = result.signals
        stop_now = got_term > 0 or got_int > 0
        if periodic or stop_now or step == stop_at:
            self.last_ckpt = self.save(step)
        if stop_now:
            self.stop_signal = sig = signal.SIGTERM if got_term > 0 else signal.SIGINT
            log.info(f"stopped by {sig.name}: checkpoint saved at step {step}; {self.rerun()}")
        return stop_now

    def evaluate(self, step: int) -> float:
        """Collective: the mean token loss over the validation batches of all ranks, logged."""
        loss_sum, n_tok = self.engine.eval_sums(self.val_batches)
        val_loss = loss_sum / n_tok
        ppl = math.exp(min(val_loss, 700.0))
        self.metrics.log({"kind": "eval", "step": step, "val_loss": val_loss, "val_ppl": ppl, "val_tokens": int(n_tok)})
        extra = f" (unigram baseline {self.unigram_ppl:.2f})" if self.unigram_ppl else ""
        log.info(f"step {step}: val loss {val_loss:.4f} | val ppl {ppl:.2f}{extra}")
        return val_loss

    def save(self, step: int) -> str:
        """Collective: the checkpoint of `step` (training/checkpoint.py); returns its folder. Its
        parent is the checkpoint this run saved before, or resumed from."""
        stamp = ckpt.new_stamp(self.run_id, step, self.parent)
        trainer_state = {
            **asdict(self.counters),
            "step": step,
            "engine": self.engine.kind,
            "world_size": self.env.world_size,
            "global_batch_size": self.plan.global_batch_size,
            "seed": self.cfg.train.seed,
            "data": self.data_id,
            "checkpoint_id": stamp["checkpoint_id"],
            "parent": self.parent,
        }
        tokenizer, keep = self.train_ds.tokenizer_file, self.cfg.checkpoint.keep_last
        self.saving = stamp
        path = ckpt.save_checkpoint(
            self.engine, self.ckpt_root, step, trainer_state, to_yaml(self.cfg), tokenizer, keep, stamp
        )
        self.saving = None
        self.parent = {"checkpoint_id": stamp["checkpoint_id"], "step": step, "path": path}
        log.info(f"saved checkpoint {path}")
        return path

    # ---- finish ----------------------------------------------------------------------------

    def finish(self) -> dict:
        """Final evaluation and export when train.max_steps is reached; the summary (see `run`)."""
        cfg, step = self.cfg, self.counters.step
        summary = {
            "step": step,
            "checkpoint": self.last_ckpt,
            "nonfinite_steps": self.counters.nonfinite_steps,
            "unigram_ppl": self.unigram_ppl,
            "signal": int(self.stop_signal) if self.stop_signal else None,
        }
        if step >= cfg.train.max_steps:
            val_loss = self.evaluate(step)
            summary["val_loss"], summary["val_ppl"] = val_loss, math.exp(min(val_loss, 700.0))
            if self.unigram_ppl:
                log.info(f"final val perplexity {summary['val_ppl']:.2f} vs unigram baseline {self.unigram_ppl:.2f}")
            if cfg.checkpoint.export_at_end:
                export_dir = run_export_dir(cfg)
                if self.main:
                    last = self.last_ckpt or self.resume_from  # a rerun of a finished run trains no step
                    export_checkpoint(last, export_dir, verify=False)  # saved or verified by this run
                    log.info(f"exported HF checkpoint to {export_dir}")
                summary["export_dir"] = export_dir
                self.engine.barrier()
        elif self.stop_signal is None:
            log.info(
                f"stopped after step {step} as configured (train.stop_after_steps); "
                f"{self.rerun('without train.stop_after_steps')}"
            )
        summary["wall_s"] = time.time() - self.t_start
        log.info(f"done in {summary['wall_s']:.1f}s")
        self.metrics.close()
        self.engine.close()
        return summary


def run(cfg: DictConfig) -> dict:
    """Train as configured; returns a summary dict (also on the non-main ranks): step, checkpoint
    (the last one saved, None if none), nonfinite_steps, unigram_ppl, signal, wall_s, and after
    the last step val_loss, val_ppl and (when exported) export_dir.

    summary["signal"] is the number of the signal that stopped the run after its checkpoint was
    saved (the same on every rank), None when it ran to train.max_steps or train.stop_after_steps.
    The main process holds the run lock of train.out_dir (training/runlock.py) throughout.
    """
    t_start = time.time()
    env = detect_env()
    setup_logging(quiet=env.rank != 0)
    check_optional_packages(cfg)
    check_path_lengths(cfg)
    out_dir = cfg.train.out_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"train.out_dir '{out_dir}' is an existing file, not a folder")
    if cfg.checkpoint.export_at_end:  # a bad export folder must fail now, not after the last step
        try:
            check_run_export_dir(cfg)
        except NotReplaceableError as e:  # train.py takes no --overwrite: the choice is another folder
            reason = str(e).replace(OVERWRITE_HINT, "move it away, or set checkpoint.export_dir to another folder")
            raise ConfigError(f"checkpoint.export_dir: {reason}") from None
    # Data not prepared: refused before the run folder is made (open_split raises the one-line
    # DataError for a missing folder or manifest; prepared data is opened and checked in setup).
    if not os.path.isfile(os.path.join(cfg.data.dir, MANIFEST)):
        open_split(cfg.data.dir, "train", cfg.data.seq_len)
    if env.rank != 0:
        return Trainer(cfg, env, t_start).run()
    lock = RunLock(out_dir)
    try:
        run_id = claim_run_dir(out_dir)  # refuses a folder the program did not create, untouched
        lock.acquire()
    except OSError as e:  # read-only or full disk, no permission: say which folder, in one line
        raise ConfigError(f"train.out_dir '{out_dir}' cannot be created or written: {e.strerror}") from None
    try:
        return Trainer(cfg, env, t_start, run_id).run()
    finally:
        lock.release()


def check_path_lengths(cfg: DictConfig) -> None:
    """ConfigError naming the key when a path setting has a component longer than the file
    system's NAME_MAX (255 bytes almost everywhere) or is longer than PATH_MAX: checked before any
    work, because the OSError would otherwise come from whichever call first touches it."""
    paths = {"train.out_dir": cfg.train.out_dir, "checkpoint.export_dir": cfg.checkpoint.export_dir}
    if cfg.checkpoint.resume not in ("auto", "none"):
        paths["checkpoint.resume"] = cfg.checkpoint.resume
    for key, value in paths.items():
        if not value:
            continue
        path = os.path.abspath(value)
        anchor = path
        while not os.path.isdir(anchor):  # the limits of the file system that would hold it
            anchor = os.path.dirname(anchor)
        name_max, path_max = _path_limit(anchor, "PC_NAME_MAX", 255), _path_limit(anchor, "PC_PATH_MAX", 4096)
        for part in path.split(os.sep):
            if len(os.fsencode(part)) > name_max:
                raise ConfigError(
                    f"{key}: the folder name '{part[:24]}...' is {len(os.fsencode(part))} bytes long; the file system "
                    f"allows at most {name_max} bytes per name"
                )
        if len(os.fsencode(path)) >= path_max:
            raise ConfigError(f"{key}: the path is {len(os.fsencode(path))} bytes long; at most {path_max - 1} fit")


def _path_limit(folder: str, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default
