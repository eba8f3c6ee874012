"""Training side of Hyena-RTF (used by train.py; never imported by the exported model code).

config      typed dataclass schema + YAML presets + dot-list overrides, batch arithmetic
data        per-step micro-batches from data_prep, validation batches, unigram baseline
optim       AdamW parameter groups (RTF group: own lr, no weight decay), warmup + cosine
engine      single process / torch DDP / DeepSpeed ZeRO 1-2 behind one interface
checkpoint  atomic checkpoints, keep-last-K, resume (model, optimizer, RNG, step)
metrics     metrics.jsonl, TensorBoard, tokens/s, MFU
export      checkpoint -> Hugging Face folder (full fp32 weights, ZeRO-aware)
trainer     the loop tying them together
"""
