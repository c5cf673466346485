#!/usr/bin/env bash
# One prepared GPU session (not part of `make test`): the `gpu` tests, then the GPU benchmarks, each step
# bounded in time and logged, so that one short lease of a GPU machine gives every number at once.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to ./gpu-out
#
# On a machine whose python3 already has CUDA torch but lacks some of kscale's pure-Python dependencies,
# put their wheels (and optionally a tarball of a trimmed Ray) in .whl/: they are installed into a private
# folder first (see docs/largest.md, "GPU checks"). Steps, in order of value:
#   1. pytest -m gpu: CUDA extraction == CPU, async copies == sync store, one GPU per Ray actor,
#      torch random features == numpy;
#   2. bench/rf_throughput.py on CUDA (issue 10: >= 20x the 2-core CPU figure at D=4096, d=128);
#   3. bench/extract_throughput.py, Qwen2.5-VL-7B shapes, batch 8 (issue 15: ratio <= 1.05, >= 20k tok/s);
#   4. bench/extract_overhead.py on CUDA (the CPU benchmark's model and settings);
#   5. bench/extract_throughput.py, 72B layer shapes, first 8 layers.
set -uo pipefail
OUT_DIR=${1:-${OUT:-gpu-out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
export KSCALE_CACHE=${KSCALE_CACHE:-/tmp/kscale-cache}
WHEELS=${KSCALE_WHEELS:-.whl}
if [ -d "$WHEELS" ]; then
  site=/tmp/kscale-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl \
    || { echo "wheel install failed"; exit 1; }
  if [ -f "$WHEELS/ray-trim.tar.xz" ]; then tar -xJf "$WHEELS/ray-trim.tar.xz" -C "$site" || exit 1; fi
  export PYTHONPATH="$site:$PWD"
else
  export PYTHONPATH="$PWD"
fi

step() {  # step NAME SECONDS CMD...: run CMD with a time limit, log to OUT_DIR/NAME.log, never stop the session
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$secs" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
  grep -v -e WARNING -e "it/s]" "$OUT_DIR/$name.log" | tail -n 25
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers, zarr, dask; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__, 'zarr', zarr.__version__, 'dask', dask.__version__)"
step gpu_tests 180 "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --timeout=200 \
  tests/integration/test_gpu.py tests/unit/analysis/test_analysis_streaming.py
step rf_throughput 60 "$PY" bench/rf_throughput.py --backends torch --n 1000000 --repeats 3
step throughput_7b 150 "$PY" bench/extract_throughput.py --model 7b --batch 8 --repeats 3
step overhead_cuda 60 "$PY" bench/extract_overhead.py --device cuda --repeats 5
step throughput_72b_8layers 110 "$PY" bench/extract_throughput.py --model 72b --layers 8 --batch 8 --repeats 2
echo "logs in $OUT_DIR"
