#!/usr/bin/env bash
# Train the denoiser on one machine with one GPU and no network, in steps of at most MINUTES
# minutes that resume from each other's outputs (docs/training.md: "Training on a GPU").
#
#   scripts/gpu_train.sh STEP [STEP ...]        steps: setup distill shallow full measure pack, or all
#
# Inputs (environment):
#   WORK      work folder on the machine's disk (default: ./gpu-work); every step reads and writes here
#   MODEL     the backbone: a .gguf file or a Hugging Face folder (default: WORK/model.gguf, joined
#             from WORK/model.gguf.part* by `setup` when the file came in pieces)
#   OUT       where `pack` puts the checkpoints, cut into files of at most PART_MB MiB (default: WORK/out)
#   MINUTES   time limit of one step (default: 9); run the same step again to go on
#   ROWS      self-distilled rows to reach (default: 40000); DISTILL_BATCH rows per batch (default: 256)
#   SHALLOW_CONFIG, FULL_CONFIG   training presets (default: configs/gpu-shallow.yaml, configs/gpu-full.yaml)
#   TRAIN_FLAGS (both runs), SHALLOW_FLAGS, FULL_FLAGS, DISTILL_FLAGS, MEASURE_FLAGS   extra flags (the
#             CPU dry run in the tests makes everything tiny with them)
#   PY        the Python that holds PyTorch (default: python3)
# Wheels of packages the machine lacks (gguf; transformers at the version pinned in pyproject.toml)
# go in WORK/wheels; `setup` installs them without the network.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-$PWD/gpu-work}"
MODEL="${MODEL:-$WORK/model.gguf}"
OUT="${OUT:-$WORK/out}"
MINUTES="${MINUTES:-9}"
ROWS="${ROWS:-40000}"
DISTILL_BATCH="${DISTILL_BATCH:-256}"
PART_MB="${PART_MB:-16}"
SHALLOW_CONFIG="${SHALLOW_CONFIG:-$REPO/configs/gpu-shallow.yaml}"
FULL_CONFIG="${FULL_CONFIG:-$REPO/configs/gpu-full.yaml}"
PY="${PY:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
mkdir -p "$WORK" "$OUT"
tt() { "$PY" -m twotower.cli "$@"; }
say() { printf '[gpu_train %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

step_setup() {
  if compgen -G "$WORK/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install --no-index --no-deps -q "$WORK"/wheels/*.whl
  fi
  if [ ! -e "$MODEL" ] && compgen -G "$MODEL.part*" > /dev/null; then
    cat "$MODEL".part* > "$MODEL.tmp" && mv "$MODEL.tmp" "$MODEL"
  fi
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  case "$MODEL" in *.gguf) tt convert "$MODEL" ;; esac  # dequantise once into the safetensors cache
}

step_distill() {
  tt distill --model "$MODEL" --out "$WORK/data" --rows "$ROWS" --batch-size "$DISTILL_BATCH" \
    --max-minutes "$MINUTES" ${DISTILL_FLAGS:-}
}

train_with() {  # config, run folder, extra flags
  tt train --config "$1" --model "$MODEL" --data "$WORK/data" --out "$2" --max-minutes "$MINUTES" ${TRAIN_FLAGS:-} $3
}

step_shallow() { train_with "$SHALLOW_CONFIG" "$WORK/shallow" "${SHALLOW_FLAGS:-}"; }
step_full() { train_with "$FULL_CONFIG" "$WORK/full" "${FULL_FLAGS:-}"; }

latest() {  # the final checkpoint of a run, else its latest one
  if [ -d "$1/final" ]; then echo "$1/final"; else echo "$1/$(cat "$1/latest")"; fi
}

step_measure() {
  for run in shallow full; do
    [ -d "$WORK/$run" ] || continue
    tt bench --model "$(latest "$WORK/$run")" --modes diffusion,verify --batch-sizes 1,8 --no-llama-cpp \
      --out "$WORK/bench-$run.json" ${MEASURE_FLAGS:-}
  done
}

step_pack() {
  for run in shallow full; do
    [ -d "$WORK/$run" ] || continue
    "$PY" "$REPO/scripts/parts.py" split "$(latest "$WORK/$run")" --out "$OUT/$run" --max-mb "$PART_MB"
    cp "$WORK/$run/log.jsonl" "$OUT/$run-log.jsonl"
  done
  for f in "$WORK"/bench-*.json; do [ -e "$f" ] && cp "$f" "$OUT/"; done
  say "pack: $(find "$OUT" -type f | wc -l) files in $OUT; join a checkpoint with: python scripts/parts.py reassemble DIR --out CHECKPOINT"
}

[ $# -ge 1 ] || { sed -n '2,20p' "$0"; exit 2; }
steps=("$@")
[ "${steps[0]}" = all ] && steps=(setup distill shallow full measure pack)
for s in "${steps[@]}"; do
  case "$s" in
    setup|distill|shallow|full|measure|pack) say "step $s"; "step_$s" ;;
    *) echo "unknown step $s (setup distill shallow full measure pack all)" >&2; exit 2 ;;
  esac
done
