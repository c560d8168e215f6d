#!/usr/bin/env bash
# The GPU check of the real recipe's training path (<= 8 minutes on one H100/H200; no network needed).
#   bash experiments/gpu_check/run.sh            # every visible GPU; results in experiments/gpu_check/results/
# Uses the project's .venv if there is one, else `python`; installs nothing. See README.md beside this file.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT_DIR=experiments/gpu_check/results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "${NGPU:-0}" -lt 1 ]; then
  echo "no CUDA device visible: run the CPU rehearsal instead:" >&2
  echo "  $PY -m torch.distributed.run --nproc_per_node 2 experiments/gpu_check/gpu_check.py --tiny" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/nvidia_smi.csv" 2>&1 || true
"$PY" -c "import torch, importlib.util as u; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
print('flash_attn', u.find_spec('flash_attn') is not None, 'vllm', u.find_spec('vllm') is not None)" \
  | tee "$OUT_DIR/environment.txt"
timeout 360 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" \
  experiments/gpu_check/gpu_check.py --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/train.log"
train_rc=${PIPESTATUS[0]}
timeout 150 "$PY" experiments/gpu_check/gpu_check.py --vllm-smoke --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/vllm.log"
if [ -n "${OUT:-}" ]; then cp "$OUT_DIR"/*.log "$OUT_DIR"/*.txt "$OUT_DIR"/*.csv "$OUT" 2>/dev/null || true; fi
echo "training check exit code: $train_rc; results in $OUT_DIR"
exit "$train_rc"
