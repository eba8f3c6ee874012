"""Training side of Hyena-RTF (used by train.py; never imported by the exported model code).

config      YAML -> typed config -> model: schema (Literal choices), presets, dot-list overrides, the
            model section derived from HyenaRTFConfig, model.arch (Hyena-RTF or GPT-NeoX) and its
            mapping, every check before data is opened, batch arithmetic
dist_env    launcher, rank and world size from the environment; engine and device choice
data        per-step micro-batches from data_prep, validation batches, unigram baseline
optim       AdamW parameter groups (RTF group: own lr, no weight decay), warmup + cosine
engine      single process / torch DDP / DeepSpeed ZeRO 1-2 behind one interface
build       the run's model and engine from its config (filters checked float32)
zero_elastic DeepSpeed checkpoints' full optimizer state, re-split to resume on another world size
checkpoint  atomic checkpoints with a SHA-256 manifest, keep-last-K, load (model, optimizer, RNG, step)
rng         seeding, and RNG states as plain tensors (loaded without unpickling)
resume      which checkpoint to resume (verified, with fallback), config / engine / data checks
runlock     one run per train.out_dir (flock on OUT_DIR/.run.lock)
preemption  SIGTERM / SIGINT: checkpoint at the end of the step, then stop
metrics     metrics.jsonl, TensorBoard, tokens/s, MFU
export      checkpoint -> Hugging Face folder (full fp32 weights, ZeRO-aware)
trainer     the run: setup, loop, finish (the `Trainer`), and the run lock around it
"""
