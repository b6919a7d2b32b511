#!/usr/bin/env bash
# Issue 23 on one GPU, as one prepared run that ends within 8 minutes (run from the repository root):
#
#   bash benchmarks/gpu.sh                              # on the GPU machine: everything below
#   bash benchmarks/gpu.sh --dry-run                    # print the commands only
#   PRESET=tiny DEVICE=cpu bash benchmarks/gpu.sh       # the same run on CPU with a tiny model (seconds)
#
# What it runs (benchmarks/run_all.py --grid gpu, RAR-XL with random weights, guidance 4.0 pow 1.5, median of 2 timed
# runs after a short warm-up, in order of priority, one process each under its own timeout; none starts after BUDGET
# seconds, so one slow row cannot sink the run):
#   1. bfloat16, dynamic cache, eager, 128 and 256 images (tokens only), and a per-step profile at 128
#   2. bfloat16, static cache + generate's own torch.compile (reduce-overhead: CUDA graphs), 128 images, its profile
#      and compile counters (graphs, graph breaks, CUDA-graph skips)
#   3. float32 with TF32 against the official sampler's cost structure (float32, PyTorch defaults) at 128 images, in
#      one process: the official run gets its own warm-up and repeat counts, so it finishes
#   4. one image: plain and Jacobi decoding (windows 8 and 16)
#   5. RARPipeline with decoding (bfloat16 generator, float32 tokenizer) at 16 and 128 images, split into sampling,
#      decoding and conversion, against generate() alone and a bfloat16 decode
#   6. with BEFORE_SRC: row 1 at 128 images and its profile on the older rar_hf in that folder ("before")
#   7. the previous grid's eager row as it was (guidance 2.0, full warm-up; it gave 25.6 images/s where the same path
#      ran at 45.2 in another session's process: the two rows side by side say whether settings or process explain it)
#   8-11. static cache eager; one image with static cache + compile; float32 without TF32; RAR-B bf16 training step
#
# Packages. The GPU image has torch but an older transformers and no diffusers: the run needs transformers 5.24.0 and
# diffusers 0.42.1, carried as wheels in .whl/ (ignored by git) and installed here into $WHEEL_SITE. Get them, on a
# machine with pip, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl transformers==5.24.0 diffusers==0.42.1
# (both are pure-Python wheels; their other requirements are in the image: huggingface_hub >= 1.32, tokenizers 0.23,
# safetensors 0.8, regex, typer, Pillow, requests, filelock). The run stops at once, saying what is missing, if the
# versions it imports are not these (ALLOW_OTHER_VERSIONS=1 runs anyway and says so in the results).
#
# Before/after. To profile the code before a change too, put the older package beside the tree and carry it:
#   echo /.before/ >> .git/info/exclude; mkdir -p .before && git archive <commit> src/rar_hf | tar -x -C .before
# (BEFORE_SRC defaults to .before/src when that folder exists).
#
# Results. Everything is written to OUT_DIR: $OUT when set (the device machine brings it back), else a fresh temporary
# folder for PRESET=tiny, else outputs/gpu-run-<time> (ignored by git). results-gpu.md there holds the card, the
# versions, the tables and the command of every row (also when the rows are cut short); a run on a GPU without $OUT
# also appends it to benchmarks/results-gpu.md (runs are appended, never overwritten). After a run on the device
# machine, append the results-gpu.md it brought back to benchmarks/results-gpu.md, and quote its numbers in
# benchmarks/README.md.
#
# Environment: PRESET (rar-xl), TRAIN_PRESET (rar-b), DEVICE (cuda), BUDGET (420 s for the rows), PYTHON
# (.venv/bin/python if present, else python3), EXTRA (more arguments for every row), BEFORE_SRC, WHEEL_DIR (.whl), WHEEL_SITE
# (/tmp/rar-hf-site), ALLOW_OTHER_VERSIONS.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
PRESET=${PRESET:-rar-xl}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-420}
EXTRA=${EXTRA:-}
WHEEL_SITE=${WHEEL_SITE:-/tmp/rar-hf-site}
TRANSFORMERS_VERSION=5.24.0
DIFFUSERS_VERSION=0.42.1
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${BEFORE_SRC:-}" && -d .before/src/rar_hf ]]; then BEFORE_SRC=.before/src; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

GRID_ARGS=(--grid gpu --preset "$PRESET" --device "$DEVICE" --budget "$BUDGET")
if [[ "$PRESET" == "tiny" ]]; then
  # Wiring check: small batches, 4 tokens, one timed run, every row in one process (no per-row timeout or peak
  # memory), torch.compile turned into a no-op (compile rows run eagerly: they test the flags, not compilation, which
  # takes minutes on CPU).
  TRAIN_PRESET=${TRAIN_PRESET:-tiny}
  GRID_ARGS+=(--batch_sizes 4 8 --num_tokens 4 --profile_steps 4 --in_process)
  EXTRA="--repeats 1 --threads 1 $EXTRA"
  export TORCHDYNAMO_DISABLE=1
fi
GRID_ARGS+=(--train_preset "${TRAIN_PRESET:-rar-b}")
[[ -n "${BEFORE_SRC:-}" ]] && GRID_ARGS+=(--before_src "$BEFORE_SRC")
[[ -n "$EXTRA" ]] && GRID_ARGS+=(--extra "$EXTRA")
WHEELS=("${WHEEL_DIR:-.whl}"/*.whl)
[[ -e "${WHEELS[0]}" ]] || WHEELS=()
INSTALL=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WHEEL_SITE")

if [[ "$DRY_RUN" == 1 ]]; then
  [[ ${#WHEELS[@]} -gt 0 ]] && echo "${INSTALL[*]} ${WHEELS[*]}   # then PYTHONPATH=$WHEEL_SITE:..."
  exec "$PYTHON" benchmarks/run_all.py "${GRID_ARGS[@]}" --output results-gpu.md --dry-run
fi

if [[ -n "${OUT:-}" ]]; then OUT_DIR=$OUT
elif [[ "$PRESET" == "tiny" ]]; then OUT_DIR=$(mktemp -d -t rar-hf-gpu-tiny.XXXXXX)
else OUT_DIR=outputs/gpu-run-$(date -u +%Y%m%dT%H%M%SZ)
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-run.log"
exec > >(tee -a "$LOG") 2>&1
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')
echo "== rar-hf GPU run, $STARTED; writing to $OUT_DIR"

# 1. Packages: the carried wheels, then the versions the run needs.
if [[ ${#WHEELS[@]} -gt 0 ]]; then
  echo "== installing ${WHEELS[*]} into $WHEEL_SITE"
  "${INSTALL[@]}" "${WHEELS[@]}" || { echo "FAILED: pip could not install the carried wheels ${WHEELS[*]}"; exit 2; }
  export PYTHONPATH="$PWD/src:$WHEEL_SITE${PYTHONPATH#"$PWD/src"}"
fi
"$PYTHON" - "$TRANSFORMERS_VERSION" "$DIFFUSERS_VERSION" > "$OUT_DIR/environment.txt" <<'PY'
import importlib.metadata, os, platform, subprocess, sys
want = {"transformers": sys.argv[1], "diffusers": sys.argv[2]}
problems = []
for name, version in want.items():
    try:
        module = __import__(name)
        have = module.__version__
    except Exception as error:  # noqa: BLE001  (any import failure is the same message)
        have, module = f"not importable ({type(error).__name__}: {error})", None
    if have != version:
        problems.append(f"{name} {version} is needed, found {have}")
if problems and os.environ.get("ALLOW_OTHER_VERSIONS") != "1":
    print("FAILED: " + "; ".join(problems) + ". Carry the wheels in .whl/ (see the top of benchmarks/gpu.sh: "
          f"pip download ... transformers=={want['transformers']} diffusers=={want['diffusers']}), or set "
          "ALLOW_OTHER_VERSIONS=1.", file=sys.stderr)
    sys.exit(2)
import torch
sys.path.insert(0, "benchmarks")
from generate import ensure_rar_hf
ensure_rar_hf()
import rar_hf.modeling_rar  # noqa: F401
lines = [f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
         f"{torch.backends.cudnn.version()}), " + ", ".join(f"{n} {__import__(n).__version__}" for n in
         ("transformers", "diffusers", "accelerate", "numpy") if importlib.util.find_spec(n))]
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    lines.append(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, compute capability "
                 f"{p.major}.{p.minor}; TF32 matmul default {torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 "
                 f"{torch.backends.cudnn.allow_tf32}")
else:
    lines.append(f"no GPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           timeout=10)
    lines.append(f"rar-hf commit {commit.stdout.strip() or 'unknown (no git here)'}"
                 + (" with local changes" if dirty.stdout.strip() else ""))
except (OSError, subprocess.SubprocessError):
    lines.append("rar-hf commit unknown (no git here)")
if problems:
    lines.append("NOTE: other package versions than the pinned ones (ALLOW_OTHER_VERSIONS=1): " + "; ".join(problems))
print("\n".join(lines))
PY
status=$?
[[ $status -ne 0 ]] && exit $status
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv,noheader >> "$OUT_DIR/environment.txt"
cat "$OUT_DIR/environment.txt"

# 2. The rows, then the results file (also when the rows are cut short).
assemble() {
  {
    echo "## GPU run of $STARTED"
    echo
    sed 's/^/- /' "$OUT_DIR/environment.txt"
    echo "- command: \`PRESET=$PRESET DEVICE=$DEVICE BUDGET=$BUDGET${BEFORE_SRC:+ BEFORE_SRC=$BEFORE_SRC} bash benchmarks/gpu.sh\`"
    echo
    cat "$OUT_DIR/table.md" 2>/dev/null || echo "(no row finished)"
  } > "$OUT_DIR/results-gpu.md"
  if [[ -z "${OUT:-}" && "$PRESET" != "tiny" ]]; then
    { echo; cat "$OUT_DIR/results-gpu.md"; } >> benchmarks/results-gpu.md
    echo "== appended to benchmarks/results-gpu.md"
  fi
  echo "== results: $OUT_DIR/results-gpu.md"
}
trap assemble EXIT
echo "== rows (budget ${BUDGET} s)"
# Outer guard in case the runner itself hangs: the budget + the row running when it ends + a margin.
timeout --kill-after=10 $((BUDGET + 40)) "$PYTHON" benchmarks/run_all.py "${GRID_ARGS[@]}" \
  --output "$OUT_DIR/table.md" --json_output "$OUT_DIR/results-gpu.json"
status=$?
[[ $status -ne 0 ]] && echo "run_all exited with status $status (rows written so far are kept)"
exit $status
