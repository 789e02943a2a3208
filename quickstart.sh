#!/usr/bin/env bash
# AltTrain quick start: SmolLM2-135M-Instruct on CPU, offline, in 7-20 minutes on 2 cores (README.md).
#   1. evaluate the untrained model on the held-out part of data/ (harmful, benign, benign-but-scary,
#      GSM-style math)
#   2. train it with AltTrain on data/train.jsonl
#   3. evaluate again, and print the before/after table (README's: eval.py --compare)
# Re-running continues where it stopped (evaluation answers and training checkpoints are kept).
# Outputs, under $OUT (default out/quickstart): before/ and after/ (answers, results.json), run/ (the adapter),
# compare.md (the table). DTYPE=fp32 bash quickstart.sh forces fp32; OUT=folder bash quickstart.sh writes elsewhere.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/quickstart}
# --dtype auto: bf16 on CPUs with AMX, or AVX512-BF16 where a matmul probe finds it faster; else fp32. DTYPE=fp32: fp32.
DTYPE=${DTYPE:-auto}
TEST="data/test_harmful.jsonl data/test_benign.jsonl data/test_benign_scary.jsonl data/math_gsm_style.jsonl"
# keywords judge: offline refusal-phrase heuristic (Qwen3Guard needs a download). All held-out prompts:
# 40 harmful, 20 plain benign, 20 benign-but-scary, 20 math. Batch 40: each set in one batch (the same
# answers as batch 20 and 16, and faster on 2 cores: results/quickstart.md, Determinism).
EVAL="--judge keywords --max-new-tokens 160 --math-max-new-tokens 256 --batch-size 40 --dtype $DTYPE"
# CPU settings, not the paper's recipe: plain LoRA (4-bit only saves memory we have), a high learning rate
# and 2 epochs instead of 1e-5 x 15, no gradient checkpointing (a 135M model fits without it, and it costs
# recomputation). LoRA r=16 on all seven projections of all layers, as in the paper. Every query of
# data/train.jsonl (309 harmful + 339 benign) with its own assessment sentence (the `ha` column;
# --ha-model template: no model is asked to write assessments, a row without one would get a template).
# --ha-weight 20: the assessment's tokens count 20x in the loss (the verdict is a few tokens of each example);
# not the paper's recipe. What it changed, and the seed noise around it: results/recipe_sweep.md.
TRAIN="--model smollm2-135m --data data/train.jsonl --n-harmful all --n-benign all --ha-model template
       --no-quant --optim adamw --no-grad-ckpt --lr 2e-3 --epochs 2 --batch-size 8 --ha-weight 20 --save-every 20
       --dtype $DTYPE"
start=$(date +%s)

python eval.py --model smollm2-135m --bench $TEST $EVAL --out "$OUT/before"
if [ ! -f "$OUT/run/adapter_model.safetensors" ]; then
  resume=""; [ -f "$OUT/run/alttrain_config.json" ] && resume="--resume"
  python alttrain.py $TRAIN --out "$OUT/run" $resume
fi
python eval.py --ckpt "$OUT/run" --bench $TEST $EVAL --out "$OUT/after"

echo
echo "== AltTrain quick start: before (A) vs after (B), keyword judge (a heuristic) =="
python eval.py --compare "$OUT/before/results.json" "$OUT/after/results.json" | tee "$OUT/compare.md"
echo "wall time: $(( $(date +%s) - start )) s; answers and results.json in $OUT/{before,after}/, the adapter in" \
     "$OUT/run/, this table in $OUT/compare.md"
