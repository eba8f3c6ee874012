"""Perplexity at an equal training budget: model variants trained side by side and scored on the same
windows, with seed statistics (`python -m benchmarks.quality`)."""
