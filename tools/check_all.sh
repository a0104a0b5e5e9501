#!/usr/bin/env bash
# On an H100 machine: install the tree (tools/build.sh), the whole pytest suite on CUDA,
# compute-sanitizer (memcheck, racecheck) on each op's small workload, then benchmark suites.
#   SANITIZE="..."  workloads to sanitize (empty: none)      SUITES="..."  bench suites (e.g. "all")
#   PYTEST_TIMEOUT  seconds for pytest (default 300)
source "$(dirname "$0")/gpu_prelude.sh" # strict mode, absolute $OUT, install, cd to the source
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
timeout ${PYTEST_TIMEOUT:-300} python3 -m pytest -q tests/python --ignore=tests/python/test_distributed.py 2>&1 \
  | tee $OUT/pytest.log | tail -4
for w in ${SANITIZE-sanitize_rmsnorm sanitize_rope_swiglu sanitize_attention sanitize_kv_cache}; do
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 python3 tools/$w.py > $OUT/$w-$tool.log 2>&1
    echo "$w $tool: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/$w-$tool.log | tail -1)"
  done
done
for s in ${SUITES:-}; do
  python3 -m llama3_kernels.bench --suite $s --out $OUT/$s 2>&1 | tee -a $OUT/bench.log | grep -v '^\[bench\] ('
done
