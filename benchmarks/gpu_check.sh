#!/usr/bin/env bash
# Everything issue 7 (and docs/benchmarks.md) still owes on a GPU, as one prepared call.
#
# Here, once (CPU machine, repo root): gather what the GPU machine lacks into .gpu/ (ignored):
# SmolLM2's tokenizer files (the tiny test models need only those; its 98 MB GGUF does not
# travel) and a calibration text for moe_scaling.py.
#     bash benchmarks/gpu_check.sh prepare [CALIBRATION_TEXT]
# There, in one device call (carry .gpu; about 9 minutes; results under $OUT):
#     bash benchmarks/gpu_check.sh
# Each step has its own time limit, so a slow one cannot eat the others' time. $OUT gets:
# device.txt (nvidia-smi, torch, triton, nvcc), tests.txt (CUDA C++ kernel tests; quantize,
# validate, coverage and imatrix on cuda against the CPU), triton_tests.txt (the Triton kernel
# tests, compiled, on the GPU), kernel_speed.md/.json (docs/benchmarks.md's
# table), moe_scaling.md (quantize on the GPU: time, peak RSS and GPU memory against the plan),
# gemv_sweep.md/.json (the Triton GEMV's tilings at M = 1: the best per shape against the default).
set -u
cd "$(dirname "$0")/.."
GPU_DIR=.gpu

if [ "${1:-}" = prepare ]; then
  text="${2:-../shared/data/wikitext-2/wiki.valid.tokens}"
  mkdir -p "$GPU_DIR"
  python -c "import shutil, sys
from maverick_quant.sources import smollm2_hf_dir
folder = smollm2_hf_dir()
for name in ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'):
    if (folder / name).is_file():
        shutil.copy(folder / name, sys.argv[1])" "$GPU_DIR"
  head -c 2000000 "$text" > "$GPU_DIR/calibration.txt"
  du -sh "$GPU_DIR"
  exit 0
fi

OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
[ -f "$GPU_DIR/tokenizer.json" ] || { echo "$GPU_DIR/tokenizer.json missing: run 'bash $0 prepare' here and carry $GPU_DIR" >&2; exit 2; }
export PYTHONPATH=. MAVERICK_QUANT_TOKENIZER_DIR="$GPU_DIR"

step() {  # step SECONDS NAME COMMAND...: run with a time limit, output to $OUT/NAME, say how it ended
  local limit=$1 name=$2; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name" 2>&1
  echo "$name: exit $? after $((SECONDS - started)) s (limit $limit s)" | tee -a "$OUT/steps.txt"
}

{ date -u; nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; nvcc --version; } > "$OUT/device.txt" 2>&1
step 150 tests.txt python3 -m pytest -q -rs tests/test_kernels_cuda.py tests/test_devices.py
# the Triton tests with the kernels compiled and run on the GPU (here they run in the interpreter)
step 100 triton_tests.txt env TRITON_INTERPRET=0 python3 -m pytest -q -rs tests/test_kernels_triton.py
step 140 kernel_speed.md python3 benchmarks/kernel_speed.py --json "$OUT/kernel_speed.json"
step 100 moe_scaling.md python3 benchmarks/moe_scaling.py --work /tmp/mq-moe --device cuda --shapes 8x2 128x2 \
  --tokenizer "$GPU_DIR" --text "$GPU_DIR/calibration.txt"
step 60 gemv_sweep.md python3 benchmarks/kernel_speed.py --sweep-gemv --json "$OUT/gemv_sweep.json"
tail -n 3 "$OUT/tests.txt" "$OUT/triton_tests.txt"
tail -n 40 "$OUT/kernel_speed.md" "$OUT/moe_scaling.md" "$OUT/gemv_sweep.md"
