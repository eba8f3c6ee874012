"""Scoring causal language models on documents: perplexity, bits per byte and LAMBADA, shared by
evaluate_lm.py, distill.py's report and the quality benchmarks (scoring.py)."""
