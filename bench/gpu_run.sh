#!/usr/bin/env bash
# `make bench-gpu`: one run on a GPU machine without network. Unpacks the bundle that travelled
# beside the working tree (make gpu-bundle: bench/gpu_bundle.py), checks it before any timing,
# then runs bench/gpu.py on it; the JSON of both and the log go to $OUT.
#
#   bash bench/gpu_run.sh [bench/gpu.py options]       e.g. --budget-s 400 --skip adapters
#
# Environment: GPU_BUNDLE (default build/gpu-bundle), GPU_WORK (build/gpu-run: unpacked bundle,
# base, work), OUT (default build/bench), PYTHON (default python3: the machine's, with its CUDA
# torch). The same script runs on a CPU with a bundle for this Python (tests/test_bench_scripts.py).
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=${GPU_BUNDLE:-build/gpu-bundle}
work=${GPU_WORK:-build/gpu-run}
out=${OUT:-build/bench}
py=${PYTHON:-python3}
mkdir -p "$out"
log="$out/gpu-run.log"
export PYTHONUNBUFFERED=1
export AVATARFORGE_BUILD=${AVATARFORGE_BUILD:-$work/build}
expect=()
if command -v nvidia-smi >/dev/null 2>&1; then expect=(--expect-cuda); fi

"$py" bench/gpu_bundle.py unpack "$bundle" "$work" 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "[gpu_run] unpack failed" | tee -a "$log"; exit 3; }
"$py" bench/gpu_bundle.py check "$work" "${expect[@]}" --json "$out/gpu-check.json" 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || echo "[gpu_run] a check failed: the measurements that need it say so" | tee -a "$log"
"$py" bench/gpu.py --bundle "$work" --out-dir "$out" "$@" 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
