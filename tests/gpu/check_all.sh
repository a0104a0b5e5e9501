#!/usr/bin/env bash
# On the lent GPU: install HEAD's snapshot, the whole pytest suite on CUDA, compute-sanitizer
# (memcheck, racecheck) on each op's small workload, then the benchmark suites named in $SUITES.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
src=$(bash tests/gpu/build.sh) || exit 1
cd $src
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
python3 -m pytest -q tests/python 2>&1 | tee $OUT/pytest.log | tail -4
for w in ${SANITIZE-sanitize_rmsnorm sanitize_rope_swiglu sanitize_attention}; do
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 python3 tests/gpu/$w.py > $OUT/$w-$tool.log 2>&1
    echo "$w $tool: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/$w-$tool.log | tail -1)"
  done
done
for s in ${SUITES:-}; do
  python3 -m llama3_kernels.bench --suite $s --out $OUT/$s 2>&1 | grep -v '^\[bench\] (' | tee -a $OUT/bench.log
done
