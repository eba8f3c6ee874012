"""Scoring the finished runs of benchmarks/quality/run.py: each export with evaluate_lm.py's code
(evaluation/scoring.py: perplexity and bits per byte over sliding windows, LAMBADA), and what train.py's
metrics.jsonl says of the run."""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.quality.presets import Preset
from benchmarks.variants import parameter_count
from evaluation.scoring import (
    check_vocabulary,
    lambada_metrics,
    lambada_windows,
    load_config,
    load_documents,
    load_model,
    perplexity_metrics,
    start_token_id,
)
from hf.loading import load_tokenizer
from training.metrics import read_metrics

BATCH = 8  # windows per forward


class Scorer:
    """Scores the exports of one preset on its evaluation sets, with windows of the training length
    (stride = context: disjoint windows). The documents are read and tokenized once: every run of a
    preset has the tokenizer of the same prepared data."""

    def __init__(self, preset: Preset, eval_sets: list[tuple[str, Path]], context_length: int):
        self.preset, self.eval_sets, self.context = preset, eval_sets, context_length
        self.documents: dict[str, list] = {}

    def score(self, export: Path) -> dict:
        """{"parameters", "eval": {set: perplexity, bits_per_byte, tokens, bytes}, "lambada"} of an
        export folder."""
        model = load_model(export, "float32", self.preset.device)
        tokenizer = load_tokenizer(export)
        start = start_token_id(tokenizer, load_config(export))
        scores = {}
        for name, path in self.eval_sets:
            if name not in self.documents:
                self.documents[name] = load_documents(path, tokenizer, max_tokens=self.preset.eval_max_tokens)
            check_vocabulary(path, self.documents[name], model, model.config)
            ctx = self.context
            metrics = perplexity_metrics(self.documents[name], model, start, ctx, ctx, BATCH, "parallel", name)
            scores[name] = {k: metrics[k] for k in ("perplexity", "bits_per_byte", "tokens", "bytes")}
        lambada = None
        if self.preset.lambada() is not None:
            if "lambada" not in self.documents:
                self.documents["lambada"] = lambada_windows(
                    self.preset.lambada(), tokenizer, self.context, self.preset.lambada_examples
                )
            lambada = lambada_metrics(self.documents["lambada"], model, BATCH, "parallel")
        return {"diverged": False, "parameters": parameter_count(model), "eval": scores, "lambada": lambada}

    def unscored(self) -> dict:
        """The same keys for a run that diverged: no export, so no score (null; never chosen)."""
        empty = {"perplexity": None, "bits_per_byte": None, "tokens": 0, "bytes": 0}
        return {
            "diverged": True,
            "parameters": None,
            "eval": {n: dict(empty) for n, _ in self.eval_sets},
            "lambada": None,
        }


def training_record(metrics_jsonl: Path) -> dict:
    """What train.py logged: tokens trained, tokens/s (median over the logging windows after the
    first, which holds the warm-up), its own final validation perplexity, the loss curve."""
    train, evals = read_metrics(str(metrics_jsonl)), read_metrics(str(metrics_jsonl), "eval")
    rates = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
    return {
        "tokens": train[-1]["tokens"] if train else 0,
        "tokens_per_s": statistics.median(rates) if rates else 0.0,
        "train_val_ppl": evals[-1]["val_ppl"] if evals else None,
        "curve": {"step": [r["step"] for r in train], "loss": [r["loss"] for r in train]},
    }
