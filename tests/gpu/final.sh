#!/usr/bin/env bash
# On the lent GPU: install HEAD's snapshot, the whole pytest suite on CUDA, then every benchmark suite.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
src=$(bash tests/gpu/build.sh) || exit 1
cd $src
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
timeout ${PYTEST_TIMEOUT:-240} python3 -m pytest -q tests/python --ignore=tests/python/test_distributed.py 2>&1 | tee $OUT/pytest.log | tail -4
python3 -m llama3_kernels.bench --suite ${SUITE:-all} --out $OUT 2>&1 | tee $OUT/bench.log | grep -v '^\[bench\] (' | grep -v 'forward\|backward' 
