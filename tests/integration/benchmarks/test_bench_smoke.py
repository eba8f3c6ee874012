"""Smoke tests of the speed benchmarks (benchmarks/train/throughput.py, benchmarks/decode/run.py) at toy
sizes, so that they cannot rot: every configuration gets its row, the derived figures (ratios,
summary, first-token split) are computed from the rows, the guards skip with a reason, bad
arguments are one line and exit status 2. Nothing here asserts a timing."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import benchmarks.decode.run as decode
import benchmarks.train.throughput as train_throughput
from models import config_from_preset
from models.modeling_hyena_rtf import HyenaRTFForCausalLM

TINY = ["--device", "cpu", "--preset", "tiny", "--d-model", "32", "--vocab-size", "256"]


@pytest.fixture(scope="module")
def throughput(tmp_path_factory):
    out = tmp_path_factory.mktemp("tt") / "tt.json"
    argv = TINY + ["--lengths", "32,64", "--tokens-per-step", "128", "--warmup", "1", "--steps", "2"]
    assert train_throughput.main(argv + ["--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_train_throughput_has_a_row_per_model_and_length(throughput):
    out, result = throughput
    rows = {(r["model"], r["length"]): r for r in result["rows"]}
    assert set(rows) == {(m, T) for m in train_throughput.MODELS for T in (32, 64)}
    for (_, T), r in rows.items():
        assert r["status"] == "ok"
        assert r["batch"] == 128 // T
        assert r["tokens_per_step"] == 128
        assert r["steps_timed"] == 2
        assert r["tokens_per_s"] == pytest.approx(128 / r["step_s"], rel=1e-12)
        assert r["peak_memory_gb"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert result["machine"]["date"]
    assert result["machine"]["torch"] == torch.__version__


def test_train_throughput_ratios_come_from_the_rows(throughput):
    _, result = throughput
    rows = {(r["model"], r["length"]): r for r in result["rows"]}
    ratios = {(e["model"], e["length"]): e for e in result["ratios"]}
    assert set(ratios) == {(m, T) for m in ("hyena_rtf", "hyena_implicit") for T in (32, 64)}
    for (m, T), e in ratios.items():
        want = rows[(m, T)]["tokens_per_s"] / rows[("gpt_neox", T)]["tokens_per_s"]
        assert e["tokens_per_s_vs_gpt_neox"] == pytest.approx(want, rel=1e-12)
        want = rows[(m, T)]["peak_memory_gb"] / rows[("gpt_neox", T)]["peak_memory_gb"]
        assert e["peak_memory_vs_gpt_neox"] == pytest.approx(want, rel=1e-12)


def test_train_throughput_markdown_is_read_from_the_json(throughput, capsys):
    out, result = throughput
    assert train_throughput.main(["--markdown", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 64 | 2 |" in text
    ratio = next(e for e in result["ratios"] if (e["model"], e["length"]) == ("hyena_rtf", 64))
    assert f"{ratio['tokens_per_s_vs_gpt_neox']:.2f}x" in text


def test_matmul_flops_are_what_a_training_step_multiplies():
    """6 N tokens (N = matmul_params) against torch's FLOP counter over the forward and backward of
    the Hyena model, where every matmul is a Linear layer: exact, integer counts."""
    model = HyenaRTFForCausalLM(config_from_preset("tiny", vocab_size=100, d_model=16, l_max=24))
    ids = torch.randint(0, 100, (2, 24))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False).logits.sum().backward()
    matmul_ops = {"mm", "addmm", "bmm"}
    counted = sum(n for op, n in counter.get_flop_counts()["Global"].items() if op.__name__ in matmul_ops)
    assert counted == 6 * train_throughput.matmul_params(model) * ids.numel()


def test_train_throughput_guards_skip_with_a_reason(tmp_path):
    """A budget of a microsecond: the first length runs (nothing to predict from), the second is
    predicted over budget. A memory limit of a kilobyte: everything is skipped before running."""
    argv = TINY + ["--lengths", "32,64", "--tokens-per-step", "64", "--steps", "1", "--models", "hyena_rtf,gpt_neox"]
    assert train_throughput.main(argv + ["--budget-s", "1e-6", "--out", str(tmp_path / "a.json")]) == 0
    rows = {(r["model"], r["length"]): r for r in json.loads((tmp_path / "a.json").read_text())["rows"]}
    assert rows[("hyena_rtf", 32)]["status"] == rows[("gpt_neox", 32)]["status"] == "ok"
    assert rows[("hyena_rtf", 64)]["status"] == "skipped"
    assert "predicted" in rows[("hyena_rtf", 64)]["reason"]
    assert train_throughput.main(argv + ["--max-memory-gb", "1e-6", "--out", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert len(rows) == 4
    assert all(r["status"] == "skipped" and "estimated peak" in r["reason"] for r in rows)


def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_throughput.main(["--models", "hyena_rtf,gpt3"])
    assert e.value.code == 2
    assert "--models" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train_throughput.main(["--lengths", "64", "--tokens-per-step", "32"])
    assert e.value.code == 2
    assert "--lengths" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        decode.main(["--methods", "hyena_rtf_recurrent,nope"])
    assert e.value.code == 2
    assert "--methods" in capsys.readouterr().err
    for module in (train_throughput, decode):
        assert module.main(["--markdown", "--out", str(tmp_path / "missing.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert "missing.json" in err[0]


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoding(tmp_path_factory):
    out = tmp_path_factory.mktemp("dec") / "dec.json"
    argv = TINY + ["--prompt-lengths", "16,32", "--batch-sizes", "1,2", "--new-tokens", "3"]
    argv += ["--methods", ",".join(decode.METHODS), "--compile-backend", "eager", "--out", str(out)]
    assert decode.main(argv) == 0
    return out, json.loads(out.read_text())


def test_decode_has_a_row_per_method_batch_and_prompt(decoding):
    out, result = decoding
    rows = {(r["method"], r["batch"], r["prompt_len"]): r for r in result["rows"]}
    assert set(rows) == {(m, b, p) for m in decode.METHODS for b in (1, 2) for p in (16, 32)}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["first_token_ms"] == pytest.approx(r["recurrence_build_ms"] + r["prefill_ms"], rel=1e-12)
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] / (r["per_token_ms"] / 1e3), rel=1e-12)
    for key, r in rows.items():  # the recurrence is built (and timed) only where there is one
        assert (r["recurrence_build_ms"] > 0) == (key[0] in ("hyena_rtf_recurrent", "hyena_rtf_compiled"))
    assert "compile_s" in rows[("hyena_rtf_compiled", 1, 16)]
    assert out.with_suffix(".png").stat().st_size > 0


def test_decode_cache_sizes_constant_for_rtf_growing_for_the_others(decoding):
    """Cache bytes are deterministic: RTF's state does not depend on the prompt (and the static
    cache holds the same tensors), GPT-NeoX's keys and the implicit filter's history grow with it."""
    _, result = decoding
    cache = {(r["method"], r["batch"], r["prompt_len"]): r["cache_mb"] for r in result["rows"]}
    for b in (1, 2):
        assert cache[("hyena_rtf_recurrent", b, 16)] == cache[("hyena_rtf_recurrent", b, 32)] > 0
        assert cache[("hyena_rtf_compiled", b, 32)] == cache[("hyena_rtf_recurrent", b, 32)]
        assert cache[("gpt_neox_kv", b, 32)] > cache[("gpt_neox_kv", b, 16)]
        assert cache[("hyena_implicit", b, 32)] > cache[("hyena_implicit", b, 16)]


def test_decode_summary_comes_from_the_rows(decoding, capsys):
    out, result = decoding
    rows = {(r["method"], r["batch"], r["prompt_len"]): r for r in result["rows"]}
    s = result["summary"]
    assert len(s["recurrent_vs_gpt_neox"]) == 8  # two RTF methods x two batches x two prompts
    for e in s["recurrent_vs_gpt_neox"]:
        key = (e["batch"], e["prompt_len"])
        want = rows[(e["method"], *key)]["decode_tokens_per_s"] / rows[("gpt_neox_kv", *key)]["decode_tokens_per_s"]
        assert e["tokens_per_s_ratio"] == pytest.approx(want, rel=1e-12)
    for e in s["compiled_vs_eager"]:
        key = (e["batch"], e["prompt_len"])
        want = rows[("hyena_rtf_recurrent", *key)]["per_token_ms"] / rows[("hyena_rtf_compiled", *key)]["per_token_ms"]
        assert e["speedup"] == pytest.approx(want, rel=1e-12)
    flat = {(e["method"], e["batch"]): e for e in s["latency_flatness"]}
    assert len(flat) == 2 * len(decode.METHODS)
    e = flat[("gpt_neox_kv", 2)]
    want = rows[("gpt_neox_kv", 2, 32)]["per_token_ms"] / rows[("gpt_neox_kv", 2, 16)]["per_token_ms"]
    assert e["ratio"] == pytest.approx(want, rel=1e-12)
    assert decode.main(["--markdown", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"| hyena_rtf_compiled | 2 | {rows[('hyena_rtf_compiled', 2, 16)]['per_token_ms']:.2f} |" in text


def test_decode_memory_guard_skips_with_a_reason(tmp_path):
    out = tmp_path / "d.json"
    argv = TINY + ["--prompt-lengths", "16", "--batch-sizes", "1", "--new-tokens", "2"]
    assert (
        decode.main(
            argv + ["--methods", "gpt_neox_kv,hyena_rtf_recurrent", "--max-memory-gb", "1e-6", "--out", str(out)]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2
    assert all(r["status"] == "skipped" and "estimated" in r["reason"] for r in rows)


def test_hf_generate_counts_what_each_generate_call_feeds(tmp_path):
    """benchmarks/hf_generate.py through generate() as users call it: every cached method (ours and
    GPT-NeoX's) feeds the prompt once and then one position per step, use_cache=False feeds the
    whole sequence every step, and the Hyena-RTF methods decode the same tokens."""
    from benchmarks import hf_generate

    argv = ["--preset", "tiny", "--vocab-size", "300", "--batch-size", "2", "--prompt-length", "24"]
    argv += ["--new-tokens", "5", "--repeats", "1", "--out-dir", str(tmp_path)]
    assert hf_generate.main(argv) == 0
    (path,) = tmp_path.glob("hf_generate_cpu_b2_p24_transformers-*.json")
    result = json.loads(path.read_text())
    assert result["same_tokens"] is True
    rows = result["methods"]
    assert set(rows) == set(hf_generate.METHODS)
    for method in ("generate_cached", "generate_static", "recurrent_loop", "gpt_neox_generate"):
        assert rows[method]["fed_positions"] == [24, 1, 1, 1, 1], method
    assert rows["generate_no_cache"]["fed_positions"] == [24, 25, 26, 27, 28]
    base = rows["gpt_neox_generate"]["decode_tokens_per_s"]
    assert rows["recurrent_loop"]["decode_tokens_per_s_vs_gpt_neox"] == pytest.approx(
        rows["recurrent_loop"]["decode_tokens_per_s"] / base, rel=1e-12
    )
    assert (tmp_path / "hf_generate_cpu_b2_p24.png").stat().st_size > 0


def test_serve_summary_takes_medians_over_interleaved_rounds():
    """benchmarks/serve.py's summary (the vLLM runs themselves need .venv-vllm and minutes): each
    method's median round by wall time, the ratio of medians, each round's own ratio, the spread."""
    import benchmarks.serve as serve

    def run(method, repeat, seconds):
        return {
            "method": method,
            "prompt_length": 8,
            "repeat": repeat,
            "seconds": seconds,
            "output_tokens_per_s": 64 / seconds,
        }

    runs = [run("vllm_hyena", 0, 2.0), run("vllm_gpt_neox", 0, 10.0), run("vllm_gpt_neox", 1, 12.0)]
    runs += [run("vllm_hyena", 1, 4.0), run("vllm_hyena", 2, 3.0), run("vllm_gpt_neox", 2, 8.0)]
    hyena, neox = serve.summarise(runs, ["vllm_hyena", "vllm_gpt_neox"], [8], ["default"])
    assert (hyena["seconds"], neox["seconds"], hyena["rounds"]) == (3.0, 10.0, 3)
    assert "repeat" not in hyena
    assert hyena["tokens_per_s_range"] == [16.0, 32.0]
    assert hyena["tokens_per_s_vs_vllm_gpt_neox"] == round(10.0 / 3.0, 2)
    assert hyena["per_round_vs_vllm_gpt_neox"] == [5.0, 3.0, round(8.0 / 3.0, 2)]
    assert neox["per_round_vs_vllm_gpt_neox"] == [1.0, 1.0, 1.0]
    even = serve.summarise(runs[:4], ["vllm_hyena"], [8], ["default"])[0]  # two rounds: the slower of the two
    assert even["seconds"] == 4.0
    # Each allocator setting is compared with GPT-NeoX under the same setting only.
    other = [
        {**r, "malloc": "hugepages", "seconds": r["seconds"] / 2, "output_tokens_per_s": 2 * r["output_tokens_per_s"]}
        for r in runs
    ]
    rows = serve.summarise(runs + other, ["vllm_hyena", "vllm_gpt_neox"], [8], ["default", "hugepages"])
    assert [(r["malloc"], r["method"]) for r in rows[2:]] == [
        ("hugepages", "vllm_hyena"),
        ("hugepages", "vllm_gpt_neox"),
    ]
    assert rows[2]["seconds"] == 1.5 and rows[2]["tokens_per_s_vs_vllm_gpt_neox"] == round(10.0 / 3.0, 2)
