"""The presets of benchmarks/quality/run.py: what each trains on, how long, with which learning rates,
and what each run is scored on.

Every variant of a preset trains the same number of tokens (max_steps x global batch x seq_len), on
the same prepared data, with the same schedule, from the same train.py config file plus the
preset's overrides; only the variant's model overrides (benchmarks/variants.py) and the learning
rate differ. The RTF parameters keep their own lr (optim.rtf_lr, the RTF paper's 1e-3) in every
run; the sweep is over optim.lr, the lr of everything else (the whole Transformer).

cpu          the built-in corpus (Python standard-library sources, the byte-level BPE of 8192 tokens
             that `python -m data_prep.prepare --out data/default` trains), the default
             model (d 128, 4 layers, seq 256, batch 8), 300 steps = 614,400 tokens a run; scored on
             the first 50,000 tokens of the validation split. Sized for the 2-core machine, two runs
             at a time on one thread each: measured on 2026-12-04 with the machine shared (load
             average 4 to 9), a run took 4 to 17 minutes (0.7k to 2.7k tokens/s) and the 30 runs
             about 2 hours; an idle machine, 3 to 4 times faster per thread, should need about 1.
english-cpu  English prose: the Pile sample (WikiText-2 validation articles and Tiny Shakespeare
             chunks) and Tiny Shakespeare again as one text (so Shakespeare is seen twice), with a
             byte-level BPE of 4096 tokens trained on it by data_prep. Not the GPT-2 tokenizer: at
             d 128 its 50,257 rows would be 6.4M parameters (8x the rest of the model) and most of
             the compute, and most of its tokens would hardly occur in 3.4 MB of text. Same model
             and budget as cpu; scored on the validation split, the first 50,000 tokens of
             WikiText-2 test (never trained on) and the first 500 LAMBADA examples. Measured on
             2026-12-05 with --jobs 1 (load average about 2): 3k (MultiHyena) to 6k tokens/s a run, the 30 runs in
             67 minutes.
gpu-125m     the 125m preset (configs/pile_125m.yaml: d 768, 12 layers, seq 2048, bf16) on a Pile
             folder given by --data, 4000 steps of 64 sequences (262M tokens a run). MultiHyena uses
             96 heads there (heads of 8 channels, as 16 heads at the CPU width 128: 16 heads at
             d 768 would filter 48 x 48 products per head, 36,864 channels a layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import REPO
from data_prep.prepare import prepare

SHARED = REPO.parent / "shared" / "data"  # the real data of this workplace (../shared/data)
WIKITEXT2 = SHARED / "wikitext2_raw_test.raw"
LAMBADA = SHARED / "lambada_test.jsonl"
PILE_TOKENIZER = SHARED / "20B_tokenizer.json"


class PresetError(ValueError):
    """A preset that cannot run as asked (missing data, a missing --data); the message is one line."""


# What every quality run sets (a preset's overrides come after, and may change them): evaluation is
# ours (evaluation/scoring.py) after the run, so train.py evaluates only at the end; a checkpoint every 100
# steps lets a killed run resume.
RUN_OVERRIDES = (
    "train.eval_every=0",
    "checkpoint.every=100",
    "checkpoint.keep_last=1",
    "logging.log_every=10",
    "logging.progress_bar=false",
    "logging.unigram_baseline=false",
)


@dataclass(frozen=True)
class Preset:
    name: str
    config: Path  # train.py --config
    overrides: tuple[str, ...]  # train.py overrides shared by every run (budget, schedule, device)
    lrs: tuple[float, ...]  # optim.lr grid of the sweep
    seeds: tuple[int, ...] = (0, 1, 2)  # the sweep runs on the first
    variant_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per-variant knobs
    eval_max_tokens: int | None = 50_000  # per evaluation set
    lambada_examples: int | None = None  # None: no LAMBADA
    jobs: int = 1  # train.py runs at a time
    threads: int = 1  # OMP threads of each run (0: leave torch's default)
    device: str = "cpu"  # where the exports are scored

    def data_dir(self, out: Path, data: Path | None) -> Path:
        """The prepared data folder, prepared first when needed (data_prep's up-to-date check makes
        a rerun instant). `data`: the --data argument."""
        if self.name in ("cpu", "english-cpu") and data is not None:
            return _prepared(data)
        if self.name == "cpu":
            target = REPO / "data" / "default"
            prepare(None, target, verbose=False)  # what scripts/main.sh runs
            return target
        if self.name == "english-cpu":
            inputs = [SHARED / "pile_sample.jsonl.zst", SHARED / "tinyshakespeare_input.txt"]
            missing = [str(p) for p in inputs if not p.is_file()]
            if missing:
                raise PresetError(f"the english-cpu preset needs {', '.join(missing)}")
            target = out / "data"
            prepare([str(p) for p in inputs], target, vocab_size=4096, val_fraction=0.05, verbose=False)
            return target
        if data is None:
            raise PresetError(f"the {self.name} preset needs --data: a data_prep folder or Pile *.jsonl.zst shards")
        if (data / "manifest.json").is_file():
            return data
        if not PILE_TOKENIZER.is_file():
            raise PresetError(f"--data {data} is not prepared, and {PILE_TOKENIZER} (to prepare it) is missing")
        target = out / "data"
        prepare([str(data)], target, tokenizer=str(PILE_TOKENIZER), verbose=False)
        return target

    def eval_sets(self, data_dir: Path) -> list[tuple[str, Path]]:
        """(name, path) of what each export is scored on; the first is the one the lr is chosen by."""
        sets = [("val", data_dir)]
        if self.name != "cpu" and WIKITEXT2.is_file():
            sets.append(("wikitext2", WIKITEXT2))
        return sets

    def lambada(self) -> Path | None:
        return LAMBADA if self.lambada_examples and LAMBADA.is_file() else None


def _prepared(data: Path) -> Path:
    if not (data / "manifest.json").is_file():
        raise PresetError(f"--data {data} is not a data_prep folder (no manifest.json)")
    return data


CPU_BUDGET = (
    "train.max_steps=300",  # 300 x 8 x 256 = 614,400 tokens a run
    "schedule.warmup_steps=30",
    "data.eval_samples=32",
    "train.device=cpu",
)

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        config=REPO / "configs" / "default.yaml",
        overrides=CPU_BUDGET,
        # From the default model's 3e-3 up by factors of 2: in a first sweep (1.5e-3, 3e-3, 6e-3)
        # rtf16 was best at the top (val ppl 75.7, 60.0, 53.5), as short runs favour large steps.
        lrs=(3e-3, 6e-3, 1.2e-2),
        jobs=2,
    ),
    "english-cpu": Preset(
        name="english-cpu",
        config=REPO / "configs" / "default.yaml",
        overrides=CPU_BUDGET,
        lrs=(3e-3, 6e-3, 1.2e-2),
        lambada_examples=500,
        jobs=2,
    ),
    "gpu-125m": Preset(
        name="gpu-125m",
        config=REPO / "configs" / "pile_125m.yaml",
        overrides=(
            "train.max_steps=4000",  # 4000 x 64 x 2048 = 262M tokens a run
            "train.global_batch_size=64",
            "schedule.warmup_steps=400",
            "data.eval_samples=256",
            "train.precision=bf16",
            "train.device=cuda",
            "checkpoint.every=500",  # 1.5 GB of weights and AdamW state each
        ),
        lrs=(3e-4, 6e-4, 1.2e-3),  # a factor 2 either side of GPT-3 125M's 6e-4
        variant_overrides={"multihyena": ("model.multi_hyena_heads=96",)},
        eval_max_tokens=1_000_000,
        lambada_examples=5153,
        threads=0,
        device="cuda",
    ),
}
