#!/usr/bin/env bash
# The shipped default: a tiny MaskGIT-VQGAN + RAR trained on scikit-learn's digits with the project's own scripts.
#   make tiny-digits             # writes outputs/tiny-digits/package (~15 min on 2 CPU cores)
#   make tiny-digits INSTALL=1   # and replaces the shipped default src/rar_hf/pretrained/tiny-digits with it
# Environment: OUT (work folder), PACKAGE_DIR (final pipeline), INSTALL=1 (package into the shipped default),
# ANNEAL=annealed|raster (raster: the r = 0 twin that benchmarks/digits_quality.py compares with), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-outputs/tiny-digits}
PACKAGE_DIR=${PACKAGE_DIR:-$OUT/package}
REPLACE=()
if [ "${INSTALL:-0}" = 1 ]; then
  PACKAGE_DIR=src/rar_hf/pretrained/tiny-digits
  REPLACE=(--replace_shipped)
fi
ANNEAL=${ANNEAL:-annealed}
RAR_STEPS=${RAR_STEPS:-3000}
SEED=0
start=$(date +%s)

if [ "$ANNEAL" = "annealed" ]; then
  # The paper's best schedule in proportion: random orders for the first half, annealed to raster by 3/4.
  anneal=(--anneal_start $((RAR_STEPS / 2)) --anneal_end $((RAR_STEPS * 3 / 4)))
else
  anneal=(--anneal_start 0 --anneal_end 0)
fi

# 1. Data: 1,437 training / 360 held-out digits as 32x32 RGB parquet shards.
[ -f "$OUT/data/data/train-00000-of-00001.parquet" ] || $PYTHON -m rar_hf.data.digits --output_dir "$OUT/data" --image_size 32 --seed $SEED

# 2. Tokenizer: down-sampling 4, 256 codes, 8x8 = 64 tokens per digit (reused by the raster twin).
[ -f "$OUT/vqgan/config.json" ] || $PYTHON examples/train_vqgan.py --dataset_name "$OUT/data" --resolution 32 \
  --model_config examples/tiny_digits/vqgan_config.json --train_batch_size 64 --max_train_steps 500 \
  --learning_rate 1e-3 --lr_warmup_steps 20 --codebook_restart_steps 100 --logging_steps 50 \
  --checkpointing_steps 250 --validation_split test --seed $SEED --output_dir "$OUT/vqgan" --report_to none \
  --resume_from_checkpoint latest

# 3. Pre-tokenise the training split (centre crop only: digits must not be mirrored).
[ -d "$OUT/tokens/data" ] || $PYTHON examples/pretokenize.py --dataset_name "$OUT/data" --vqvae "$OUT/vqgan" \
  --resolution 32 --augmentation center --num_shards 1 --batch_size 256 --output_dir "$OUT/tokens"

# 4. The generator, with the annealed random-order schedule (or raster only).
$PYTHON examples/train_rar.py --pretokenized_dataset "$OUT/tokens" --vqvae "$OUT/vqgan" --resolution 32 \
  --model_config examples/tiny_digits/rar_config.json --train_batch_size 64 --max_train_steps $RAR_STEPS \
  --learning_rate 1e-3 --lr_warmup_steps 200 --weight_decay 0.03 "${anneal[@]}" --class_dropout_prob 0.1 \
  --logging_steps 100 --checkpointing_steps 1000 --checkpoints_total_limit 1 --report_to none --seed $SEED \
  --resume_from_checkpoint latest \
  --output_dir "$OUT/rar-$ANNEAL"

# 5. Measure it and package it with its model card.
$PYTHON benchmarks/digits_quality.py --model "$OUT/rar-$ANNEAL" --output_json "$OUT/quality-$ANNEAL.json"
$PYTHON examples/tiny_digits/package_pipeline.py --pipeline "$OUT/rar-$ANNEAL" --output_dir "$PACKAGE_DIR" ${REPLACE[@]+"${REPLACE[@]}"} \
  --quality_json "$OUT/quality-$ANNEAL.json" --seconds $(( $(date +%s) - start ))
