#!/usr/bin/env bash
# A 2-layer draft model for speculative decoding with the shipped tiny-digits pipeline (4 layers): the same tokens
# (pre-tokenised with the shipped tokenizer), raster order only, 1,500 steps (~5 min on 2 CPU cores).
#   bash examples/tiny_digits/train_draft.sh      # writes outputs/draft/rar-draft-2l (2.8 MB, not shipped)
#   python benchmarks/speculative.py --draft outputs/draft/rar-draft-2l
# A 1-layer draft (cheaper per step, accepts less): LAYERS=1 bash examples/tiny_digits/train_draft.sh  # rar-draft-1l
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-outputs/draft}
VQVAE=src/rar_hf/pretrained/tiny-digits/vqvae
SEED=0
LAYERS=${LAYERS:-2}
case $LAYERS in
  2) CONFIG=examples/tiny_digits/rar_draft_config.json ;;
  1) CONFIG=examples/tiny_digits/rar_draft_1l_config.json ;;
  *) echo "LAYERS must be 1 or 2, got $LAYERS" >&2; exit 2 ;;
esac

[ -f "$OUT/data/data/train-00000-of-00001.parquet" ] || $PYTHON -m rar_hf.data.digits --output_dir "$OUT/data" --image_size 32 --seed $SEED
[ -d "$OUT/tokens/data" ] || $PYTHON examples/pretokenize.py --dataset_name "$OUT/data" --vqvae "$VQVAE" \
  --resolution 32 --augmentation center --num_shards 1 --batch_size 256 --output_dir "$OUT/tokens"
# Raster order only: the draft proposes the target's raster-order tokens, so it needs no other order.
$PYTHON examples/train_rar.py --pretokenized_dataset "$OUT/tokens" --vqvae "$VQVAE" --resolution 32 \
  --model_config "$CONFIG" --train_batch_size 64 --max_train_steps 1500 \
  --learning_rate 1e-3 --lr_warmup_steps 200 --weight_decay 0.03 --anneal_start 0 --anneal_end 0 \
  --class_dropout_prob 0.1 --logging_steps 250 --checkpointing_steps 1500 --checkpoints_total_limit 1 \
  --report_to none --seed $SEED --output_dir "$OUT/rar-draft-${LAYERS}l"
