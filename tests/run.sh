#!/usr/bin/env bash
# The whole test suite: the C ABI tests (ctest, CPU path) and the Python parity
# tests (pytest) against the installed package.  GPU cases run where a GPU is.
set -euo pipefail
cd "$(dirname "$0")/.."

# C tests: a CPU-only build of the same sources is enough (they exercise the CPU path)
# and keeps nvcc out of this step.
cmake -S . -B build/ctest -DL3K_CUDA=OFF -DBUILD_TESTING=ON -DCMAKE_BUILD_TYPE=Release > build-ctest.log 2>&1 \
  || { cat build-ctest.log; exit 1; }
cmake --build build/ctest -j "$(nproc)" >> build-ctest.log 2>&1 || { cat build-ctest.log; exit 1; }
rm -f build-ctest.log
(cd build/ctest && ctest --output-on-failure -j "$(nproc)")

# Python tests; exit code 5 ("no tests collected") is a failure, not a pass.
set +e
python3 -m pytest -q -ra tests/python "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
