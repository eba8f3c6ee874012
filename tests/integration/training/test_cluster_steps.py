"""Step hygiene for GPU clusters, checked on the CPU (issue 21):

- one host read and one all-reduce per optimizer step, whatever the accumulation: the loss stays
  on the device, and the trainer's stop flags ride on the step's own all-reduce;
- the reported loss is the same float64 sum as before (compared with an independent sum);
- the next step's batches are prefetched by a thread, pinned only for a CUDA device, in the same
  order, and the thread is gone when a run ends or fails;
- only the rank that writes zero_full_state.pt copies the full ZeRO state to the host, and the
  checkpoint files are hashed in shares over the ranks;
- tokens/s leaves out evaluation and checkpoint time (a fake clock).

What is counted: `engine.read_host` (the one device-to-host read of a step) and
`torch.distributed.all_reduce` (in a one-process gloo group that the engine is told to use), or
`Engine.all_reduce_` for DeepSpeed, whose one-process engine has no group to reduce over.
"""

from __future__ import annotations

import datetime
import threading
import time

import deepspeed
import pytest
import torch
import torch.distributed as dist
from support.train_utils import TINY, free_port, in_process_deepspeed

from training import engine as engine_mod
from training import metrics, zero_elastic
from training.checkpoint import hash_shares
from training.config import load_config
from training.data import StepPrefetcher, pin_for
from training.engine import Engine, TorchEngine, lm_loss
from training.metrics import LogWindow, read_metrics
from training.trainer import Trainer, run

ACCUM = 4  # micro 4 x accumulation 4: global batch 16 on one process


def tiny_cfg(corpus, out, *extra):
    return load_config(
        None, [*TINY, "train.global_batch_size=16", f"data.dir={corpus}", f"train.out_dir={out}", *extra]
    )


@pytest.fixture
def one_process_group(monkeypatch):
    """A one-process gloo group that the engine reduces over (Engine.distributed() says yes), so
    that its collectives are real torch.distributed calls that can be counted."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    monkeypatch.setattr(Engine, "distributed", lambda self: True)
    yield
    if dist.is_initialized():  # the run's engine.close() normally destroys it
        dist.destroy_process_group()


def test_one_loss_read_and_one_all_reduce_per_step(corpus, tmp_path, monkeypatch, one_process_group):
    """Steps 1-4 of a run with accumulation 4 (no evaluation or checkpoint in between): between
    the starts of two steps, exactly one `read_host` and one `dist.all_reduce`. Before, every
    micro-batch's loss was read (4 per step) and the stop flags had an all-reduce of their own."""
    events: list[str] = []
    real_reduce, real_read, real_step = dist.all_reduce, engine_mod.read_host, Trainer._train_step

    def counting_reduce(*a, **k):
        events.append("all_reduce")
        return real_reduce(*a, **k)

    def counting_read(t):
        events.append("read")
        return real_read(t)

    def marking_step(self, *a, **k):
        events.append(f"step {self.counters.step}")
        return real_step(self, *a, **k)

    monkeypatch.setattr(dist, "all_reduce", counting_reduce)
    monkeypatch.setattr(engine_mod, "read_host", counting_read)
    monkeypatch.setattr(Trainer, "_train_step", marking_step)
    cfg = tiny_cfg(corpus, tmp_path / "run", "train.eval_every=0", "checkpoint.every=0", "train.stop_after_steps=5")
    run(cfg)
    starts = [events.index(f"step {s}") for s in range(5)]
    for s in range(4):  # step 5 is followed by the stop's checkpoint
        between = events[starts[s] + 1 : starts[s + 1]]
        assert between == ["all_reduce", "read"], f"step {s + 1}: {between}"


def test_the_step_loss_is_the_float64_sum_it_was(monkeypatch):
    """TorchEngine: the reported loss is sum_i float(loss_i) / accum, the micro-batch losses (as
    the engine computed them, recorded here) summed in float64 in their order: what the former
    host-side sum gave, bit for bit."""
    from models.configuration_hyena_rtf import HyenaRTFConfig
    from models.modeling_hyena_rtf import HyenaRTFForCausalLM
    from training.config import resolve_batch
    from training.dist_env import DistEnv
    from training.optim import make_optimizer, param_groups

    torch.manual_seed(0)
    model = HyenaRTFForCausalLM(HyenaRTFConfig(vocab_size=512, d_model=32, n_layer=2, l_max=64, state_size=4))
    opt = make_optimizer(param_groups(model, 1e-3, 1e-3, 0.1), betas=(0.9, 0.95), eps=1e-8)
    plan = resolve_batch(load_config(None, [*TINY, "train.global_batch_size=16"]).train, 1)
    eng = TorchEngine(model, opt, plan, torch.device("cpu"), "fp32", DistEnv(0, 0, 1, "none"), grad_clip=1.0)
    losses = []
    monkeypatch.setattr(
        engine_mod, "lm_loss", lambda m, b: (lambda loss: losses.append(loss.item()) or loss)(lm_loss(m, b))
    )
    for _ in range(3):
        losses.clear()
        result = eng.train_step([torch.randint(0, 512, (4, 65)) for _ in range(ACCUM)])
        expected = 0.0
        for loss in losses:
            expected += loss
        assert len(losses) == ACCUM and result.loss == expected / ACCUM
        assert result.signals == []


def test_deepspeed_one_read_one_reduce_per_step_and_writer_only_host_copies(monkeypatch):
    """DeepSpeed (one in-process rank, ZeRO 1, accumulation 2): one `read_host` and one
    `all_reduce_` per step, the signals summed; then the full state: a non-writing rank makes no
    host copy (no `.cpu()` at all) and gets no tensors, the writer copies each group's weights and
    moments (and the step count) once. Before, every rank copied everything to the host."""
    monkeypatch.setattr(deepspeed.utils.groups, "_WORLD_GROUP", None)  # see test_cluster_numerics.py
    eng = in_process_deepspeed(monkeypatch, "fp32", zero_stage=1)
    try:
        reads, reduces = [], []
        real_read, real_reduce = engine_mod.read_host, Engine.all_reduce_
        monkeypatch.setattr(engine_mod, "read_host", lambda t: reads.append(1) or real_read(t))
        monkeypatch.setattr(
            Engine, "all_reduce_", lambda self, *a, **k: reduces.append(1) or real_reduce(self, *a, **k)
        )
        for step in range(3):
            result = eng.train_step([torch.randint(0, 512, (4, 65)) for _ in range(2)], lambda: [1.0, 0.0])
            assert result.signals == [1.0, 0.0] and result.applied
            assert len(reads) == len(reduces) == step + 1

        copies, cpu_calls = [], []
        real_host, real_cpu = zero_elastic._to_host, torch.Tensor.cpu
        monkeypatch.setattr(zero_elastic, "_to_host", lambda t: copies.append(t.numel()) or real_host(t))
        monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: cpu_calls.append(1) or real_cpu(self, *a, **k))
        other = eng.full_state.state_dict(writer=False)
        assert copies == [] and cpu_calls == []
        assert other["fp32"] == {} and other["scalars"] == []
        assert all(by_name == {} for by_name in other["state"].values())
        writer = eng.full_state.state_dict(writer=True)
        n_groups = len(eng.full_state.group_names)
        # per group: the fp32 weights, exp_avg and exp_avg_sq (full size), and its step count
        assert len(copies) == 4 * n_groups
        assert set(writer["fp32"]) == set(dict(eng.module.named_parameters()))
        assert set(writer["state"]) == {"exp_avg", "exp_avg_sq"}
    finally:
        eng.close()


def test_hash_shares_balance_the_bytes_and_give_every_file_one_rank():
    """Largest first, each to the least-loaded rank: 10 -> 0, 8 -> 1, 3 -> 1, 1 -> 0, 1 -> 0, 0 -> 1."""
    sizes = [10, 1, 1, 8, 3, 0]
    assert hash_shares(sizes, 2) == [0, 0, 0, 1, 1, 1]  # 12 and 11 bytes
    assert hash_shares(sizes, 1) == [0] * len(sizes)
    assert sorted(hash_shares([5] * 8, 4)) == [0, 0, 1, 1, 2, 2, 3, 3]


# ---- prefetch ---------------------------------------------------------------------------------


def test_pinned_memory_only_for_cuda():
    assert pin_for(torch.device("cuda", 3)) is True
    assert pin_for(torch.device("cuda")) is True
    assert pin_for(torch.device("cpu")) is False


def test_the_prefetch_thread_pins_when_asked(monkeypatch):
    """With pin (a CUDA device) each batch goes through pin_memory in the thread; without, none."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self.shape) or self)
    make = lambda s: [torch.full((2, 3), s), torch.full((2, 3), -s)]  # noqa: E731
    p = StepPrefetcher(make, 0, 2, pin=True)
    assert [b.tolist() for b in p.get(0)] == [b.tolist() for b in make(0)]
    p.get(1)
    p.close()
    assert len(pinned) == 4
    pinned.clear()
    p = StepPrefetcher(make, 0, 2, pin=False)
    p.get(0), p.get(1)
    p.close()
    assert pinned == []


def test_prefetch_keeps_the_order_and_raises_at_the_failing_step():
    def make(step):
        if step == 5:
            raise ValueError("bad shard")
        return [torch.tensor([step, m]) for m in range(3)]

    p = StepPrefetcher(make, 3, 9)
    try:
        for s in (3, 4):
            assert [b.tolist() for b in p.get(s)] == [[s, m] for m in range(3)]
        with pytest.raises(ValueError, match="bad shard"):
            p.get(5)
    finally:
        p.close()
    assert not p._thread.is_alive()


def test_close_releases_a_thread_blocked_on_the_full_queue():
    p = StepPrefetcher(lambda s: [torch.zeros(1)], 0, 1000)
    time.sleep(0.3)  # step 0 in the queue, step 1 waiting for room
    t0 = time.monotonic()
    p.close()
    assert not p._thread.is_alive() and time.monotonic() - t0 < 2.0


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "step-prefetch" and t.is_alive()]


def test_runs_leave_no_prefetch_thread_behind(corpus, tmp_path, monkeypatch):
    """A run stopped by train.stop_after_steps, and one whose step raises, end with the thread
    gone (closed in train_loop's finally), and a run trains on the batches step_micro_batches
    gives (the thread changes where they are read, not which)."""
    from training.data import step_micro_batches

    seen = []
    real = TorchEngine.train_step

    def recording(self, micro_batches, signals=None):
        seen.append([b.clone() for b in micro_batches])
        return real(self, micro_batches, signals)

    monkeypatch.setattr(TorchEngine, "train_step", recording)
    cfg = tiny_cfg(corpus, tmp_path / "stop", "train.stop_after_steps=3", "train.eval_every=0")
    assert run(cfg)["step"] == 3
    assert _prefetch_threads() == []
    from data_prep.dataset import PackedDataset
    from training.config import resolve_batch

    ds, plan = PackedDataset(str(corpus), "train", 64), resolve_batch(cfg.train, 1)
    for step, got in enumerate(seen):
        want = step_micro_batches(ds, cfg.train.seed, step, plan, 0)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))

    calls = []

    def failing(self, micro_batches, signals=None):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom at step 2")
        return real(self, micro_batches, signals)

    monkeypatch.setattr(TorchEngine, "train_step", failing)
    with pytest.raises(RuntimeError, match="boom at step 2"):
        run(tiny_cfg(corpus, tmp_path / "fail", "train.eval_every=0"))
    assert _prefetch_threads() == []


# ---- throughput windows ---------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_log_window_leaves_out_excluded_time(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(metrics, "now", clock)
    w = LogWindow()
    w.add(1.0, True)
    clock.t += 2.0
    w.exclude("eval", 5.0)
    clock.t += 5.0
    w.add(1.0, True)
    assert w.tokens_per_s(100) == 100.0  # 2 steps in 7 s, 5 of them evaluating
    assert (w.excluded("eval"), w.excluded("checkpoint"), w.excluded()) == (5.0, 0.0, 5.0)


def test_eval_and_checkpoint_time_is_not_training_time(corpus, tmp_path, monkeypatch):
    """A fake clock: every step takes 1 s, every evaluation and checkpoint 50 s. Every train record
    reports exactly one step's tokens per second, and the 50 s in eval_s / checkpoint_s of the
    window they fell into. Before, the windows after an
    evaluation or checkpoint showed 1/51 of the rate."""
    clock = FakeClock()
    monkeypatch.setattr(metrics, "now", clock)
    real_step, real_eval, real_save = TorchEngine.train_step, Trainer.evaluate, Trainer.save

    def step(self, *a, **k):
        clock.t += 1.0
        return real_step(self, *a, **k)

    def evaluate(self, s):
        clock.t += 50.0
        return real_eval(self, s)

    def save(self, s):
        clock.t += 50.0
        return real_save(self, s)

    monkeypatch.setattr(TorchEngine, "train_step", step)
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    monkeypatch.setattr(Trainer, "save", save)
    out = tmp_path / "run"
    run(tiny_cfg(corpus, out, "train.eval_every=2", "checkpoint.every=3", "train.max_steps=6"))
    recs = read_metrics(str(out / "metrics.jsonl"))
    tokens_per_step = 16 * 64
    assert [r["tokens_per_s"] for r in recs] == [tokens_per_step] * 6
    # step s's record covers what happened after step s - 1: eval after 2 and 4, saves after 3
    assert [r["eval_s"] for r in recs] == [0, 0, 50.0, 0, 50.0, 0]
    assert [r["checkpoint_s"] for r in recs] == [0, 0, 0, 50.0, 0, 0]
