"""Training side of Hyena-RTF (used by train.py; never imported by the exported model code).

config      typed dataclass schema + YAML presets + dot-list overrides, batch arithmetic
data        per-step micro-batches from data_prep, validation batches, unigram baseline
optim       AdamW parameter groups (RTF group: own lr, no weight decay), warmup + cosine
engine      single process / torch DDP / DeepSpeed ZeRO 1-2 behind one interface
zero_elastic DeepSpeed checkpoints' full optimizer state, re-split to resume on another world size
checkpoint  atomic checkpoints with a SHA-256 manifest, keep-last-K, load (model, optimizer, RNG, step)
rng         RNG states as plain tensors (loaded without unpickling)
resume      which checkpoint to resume (verified, with fallback), config / engine / data checks
runlock     one run per train.out_dir (flock on OUT_DIR/.run.lock)
model_schema the config's model section, derived from HyenaRTFConfig.__init__
metrics     metrics.jsonl, TensorBoard, tokens/s, MFU
export      checkpoint -> Hugging Face folder (full fp32 weights, ZeRO-aware)
trainer     the loop tying them together
"""
