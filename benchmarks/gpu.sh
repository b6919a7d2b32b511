#!/usr/bin/env bash
# GPU benchmark of rar-hf on one GPU, sized to finish within 8 minutes on one H100 (run from the repository root):
#
#   bash benchmarks/gpu.sh                              # RAR-XL sampling grid + RAR-B bf16 training step
#   bash benchmarks/gpu.sh --dry-run                    # print the commands only
#   PRESET=tiny DEVICE=cpu bash benchmarks/gpu.sh       # wiring check on CPU with a tiny model (about a minute)
#
# Sampling (random weights, guidance scale 2.0 so CFG doubles the batch, all 256 tokens, median of 3 after a warm-up):
# RAR-XL at batch 128 and 256, bfloat16 and float32, dynamic vs static KV cache, eager vs torch.compile (with the static
# cache, generate's own compilation, mode reduce-overhead = CUDA graphs), the official sampler's cost structure at the
# paper's Table 5 setting (float32, batch 128); then a RAR-B bf16 training step. The goal is >= 100 images/s for RAR-XL
# in bfloat16. Configurations run in priority order (benchmarks/run_all.py --grid gpu), one process each, each under
# its own timeout (its process group is killed), and none starts after BUDGET seconds (default 450), so one slow
# configuration cannot sink the run. The table is printed and written to $OUT/results-gpu.md (+ .json), or to
# benchmarks/results-gpu.md when $OUT is unset, after every configuration.
#
# Installs nothing. The device image has torch and transformers but no diffusers: the generate benchmark imports
# neither the pipeline nor the VQ model (diffusers) unless --decode is given, so these rows exclude VQ decoding to
# pixels (Table 5 of the paper includes it; decoding is timed separately by generate.py --decode where diffusers
# exists). rar_hf is used from ./src (PYTHONPATH), not installed.
#
# Environment: PRESET (rar-xl), TRAIN_PRESET (rar-b), DEVICE (cuda), BUDGET (450 s), PYTHON (.venv/bin/python if
# present, else python3), EXTRA (more arguments for every configuration, e.g. "--tf32").
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=${DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
PRESET=${PRESET:-rar-xl}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-450}
EXTRA=${EXTRA:-}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR=${OUT:-benchmarks}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

GRID_ARGS=(--grid gpu --preset "$PRESET" --device "$DEVICE" --budget "$BUDGET")
if [[ "$PRESET" == "tiny" ]]; then
  # Wiring check: small batches, 4 tokens, one timed run, all configurations in one process (no per-configuration
  # timeout or peak memory), torch.compile turned into a no-op (compile rows then run eagerly: they test the flags,
  # not compilation, which takes minutes on CPU).
  TRAIN_PRESET=${TRAIN_PRESET:-tiny}
  GRID_ARGS+=(--batch_sizes 4 8 --num_tokens 4 --in_process)
  EXTRA="--repeats 1 --threads 1 $EXTRA"
  export TORCHDYNAMO_DISABLE=1
fi
GRID_ARGS+=(--train_preset "${TRAIN_PRESET:-rar-b}" --output "$OUT_DIR/results-gpu.md" --json_output "$OUT_DIR/results-gpu.json")
[[ -n "$EXTRA" ]] && GRID_ARGS+=(--extra "$EXTRA")

if [[ "$DRY_RUN" == 1 ]]; then
  exec "$PYTHON" benchmarks/run_all.py "${GRID_ARGS[@]}" --dry-run
fi

echo "== environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" - <<'PY' || { echo "rar_hf's model cannot be imported with $PYTHON (needs torch and transformers)"; exit 1; }
import importlib.util, sys
sys.path.insert(0, "benchmarks")
import torch, transformers
from generate import ensure_rar_hf
ensure_rar_hf()  # the package root imports the pipeline (diffusers); the benchmarks only need the model modules
import rar_hf.modeling_rar, rar_hf.data.collator
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"cuda available: {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
if importlib.util.find_spec("diffusers") is None:
    print("diffusers is not installed: rows exclude VQ decoding to pixels (generate.py --decode needs it)")
PY

echo "== grid (budget ${BUDGET} s)"
# Outer guard in case the runner itself hangs: budget + the longest per-configuration overrun + margin.
timeout --kill-after=15 $((BUDGET + 60)) "$PYTHON" benchmarks/run_all.py "${GRID_ARGS[@]}"
status=$?
if [[ $status -ne 0 ]]; then
  echo "run_all exited with status $status; rows written so far:"
  cat "$OUT_DIR/results-gpu.md" 2>/dev/null
fi
echo "== saved to $OUT_DIR/results-gpu.md"
exit $status
