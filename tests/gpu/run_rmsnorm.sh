#!/usr/bin/env bash
# On the lent GPU: build from the committed tree, GPU parity tests, sanitizers, benchmark.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
# Build what is committed: a `git archive HEAD` tarball carried as .snap/src.tar
# when the working tree holds other people's unfinished files.
src=$PWD
if [ -f .snap/src.tar ]; then
  src=/tmp/l3k-src; rm -rf $src; mkdir -p $src; tar -xf .snap/src.tar -C $src
fi
cd $src
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/pip.log 2>&1 || { tail -30 $OUT/pip.log; exit 1; }
python3 -m pytest -q -x tests/python ${PYTEST_ARGS:-} 2>&1 | tee $OUT/pytest.log | tail -5
for tool in memcheck racecheck synccheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 python3 tests/gpu/sanitize_rmsnorm.py > $OUT/sanitize-$tool.log 2>&1
  echo "compute-sanitizer $tool: rc=$? $(grep -E 'ERROR SUMMARY' $OUT/sanitize-$tool.log | tail -1)"
done
python3 -m llama3_kernels.bench --suite rmsnorm --out $OUT 2>&1 | tee $OUT/bench.log | grep -v '^\[bench\] (' 
