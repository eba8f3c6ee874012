#!/usr/bin/env bash
# The main job, on a fresh machine: install, prepare the embedded default corpus, train the
# default config (a few minutes on 2 CPU cores), evaluate, export an HF checkpoint, generate.
#
#   bash scripts/main.sh                      # everything with configs/default.yaml
#   bash scripts/main.sh train.max_steps=50   # extra arguments are train.py overrides
#
# Rerunning is cheap: setup and data preparation skip what is already done, and training resumes
# from (or, when finished, re-exports) the latest checkpoint in runs/default.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
stamp() { echo "[main] $1 ($(( $(date +%s) - t0 )) s since start)"; }

bash scripts/setup.sh
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export HF_HUB_OFFLINE=1  # everything is local; never wait on the network
DATA=data/default
RUN=runs/default
HF=$RUN/hf
stamp "setup done"

# 1. The embedded default corpus (Python standard-library sources) and a BPE trained on it.
$PY -m data_prep.prepare --out "$DATA" --no-progress
stamp "data ready in $DATA"

# 2. Train. Prints the unigram-baseline perplexity of the validation tokens and the model's; at
#    the end it exports the final checkpoint (full fp32 weights + tokenizer) to $HF. Stopped by
#    SIGTERM / Ctrl-C it saves a checkpoint and exits 143 / 130, so `set -e` ends the job here
#    instead of evaluating a stale export; rerun to resume.
$PY train.py --config configs/default.yaml data.dir="$DATA" train.out_dir="$RUN" \
  checkpoint.export_dir="$HF" logging.progress_bar=false "$@"
stamp "trained; HF checkpoint in $HF"

# 3. Evaluate the exported checkpoint on the validation split (perplexity, bits per byte).
$PY evaluate_lm.py "$HF" --data "$DATA" --output "$RUN/eval.json"
stamp "evaluated ($RUN/eval.json)"

# 4. The same export on demand, from the run's latest checkpoint (works for any engine, ZeRO too).
$PY train.py export "$RUN" "$RUN/hf_on_demand"
stamp "re-exported the latest checkpoint to $RUN/hf_on_demand"

# 5. A sample through the O(1)-per-token recurrent decoder.
$PY generate.py "$HF" --prompt "def parse_args(argv=None):" --max-new-tokens 80 --temperature 0.7 --top-k 40 --seed 0
echo
stamp "main job finished"
