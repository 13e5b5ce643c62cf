#!/usr/bin/env bash
# The one GPU check: the compile check's table, the GPU-marked tests, then the benchmark
# sweep, table printed last.
# Runs on a bare GPU machine that has torch, triton, pytest and pytest-benchmark
# installed and no network, from a copy of the working tree:
#     bash benchmarks/device_check.sh          # results in $OUT (default benchmarks/out)
# Budget: compile check <= 240 s (the three ops, about 270 sm_90 variants: about 5 min in one process on the
# development machine, so well inside on 8), tests <= 200 s, benchmarks <= 240 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"

# fastadapter.kernels is the kernels/ folder: without an install, link it into the package.
[ -e fastadapter/kernels ] || ln -s ../kernels fastadapter/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python - <<'PY' | tee "$OUT/versions.txt"
import platform, torch, triton
print(f"date: {__import__('datetime').date.today()}")
print(f"gpu: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}")
import fastadapter
print("available_backends:", fastadapter.available_backends())
PY

echo "== compile check (every triton launch, sm_90, every config the pruners keep; no GPU needed)"
timeout 240 python -m tests.gpu_compile tests.test_adapter tests.test_adapter_layernorm tests.test_adapter_rmsnorm tests.test_mixed_adapter \
    --target 90 --jobs "$(( $(nproc) > 8 ? 8 : $(nproc) ))" --json "$OUT/compile.json" 2>&1 | tail -25 | tee "$OUT/compile.txt"
compile_rc=${PIPESTATUS[0]}

echo "== GPU tests"
FASTADAPTER_AUTOTUNE=0 timeout 200 python -m pytest -q -m gpu tests/test_adapter.py tests/test_op.py tests/test_hf.py \
    tests/test_mixed_adapter.py tests/test_adapter_rmsnorm.py -p no:cacheprovider \
    --junitxml="$OUT/gpu-tests.xml" -o addopts="" -rfEs 2>&1 | tail -60 | tee "$OUT/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}

echo "== benchmarks"
FASTADAPTER_BENCH=${FASTADAPTER_BENCH:-sweep} timeout 240 python -m pytest -q benchmarks -p no:cacheprovider \
    --benchmark-json="$OUT/gpu.json" -o addopts="" 2>&1 | tail -15
bench_rc=${PIPESTATUS[0]}

echo "== results (compile rc=$compile_rc, tests rc=$tests_rc, benchmarks rc=$bench_rc)"
cat "$OUT/versions.txt"
python benchmarks/report.py "$OUT/gpu.json" | tee "$OUT/gpu.md"
[ "$compile_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
