#!/usr/bin/env bash
# The whole test suite; GPU cases run where a GPU is.
#  1. The C ABI tests (ctest, CPU path), Release build.
#  2. The same C tests built with ASan and UBSan (clang, else gcc): an access
#     outside a buffer, a leak or any undefined behaviour fails them.
#  3. A short run of the C ABI fuzz target (fuzz/fuzz_abi.c, libFuzzer with ASan
#     and UBSan) from its seed corpus, where clang has libFuzzer.
#  4. The Python parity tests (pytest) against the installed package.
#
# Usage: bash tests/run.sh [pytest arguments]
#   L3K_FUZZ_TIME=60     seconds of fuzzing (0: replay the seed corpus only)
#   L3K_FUZZ_ONLY=a,b    fuzz only these entry points (name prefixes, e.g. rope,linear)
#   L3K_REQUIRE_FUZZ=1   fail instead of skipping the fuzz run where clang lacks libFuzzer
# The fuzz target on its own, for longer runs or to replay a crash: bash fuzz/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

# Configure and build one CPU-only C test tree quietly (the log only on failure).
build_ctest() {
  local dir=$1; shift
  cmake -S . -B "$dir" -DL3K_CUDA=OFF -DBUILD_TESTING=ON "$@" > "$dir.log" 2>&1 \
    || { cat "$dir.log"; exit 1; }
  cmake --build "$dir" -j "$jobs" >> "$dir.log" 2>&1 || { cat "$dir.log"; exit 1; }
  rm -f "$dir.log"
}
mkdir -p build

# 1. C tests: a CPU-only build of the same sources is enough (they exercise the
#    CPU path) and keeps nvcc out of this step.
build_ctest build/ctest -DCMAKE_BUILD_TYPE=Release
(cd build/ctest && ctest --output-on-failure -j "$jobs")

# 2. The C tests under the sanitizers.
san_cc=$(command -v clang || command -v gcc)
san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
build_ctest build/ctest-san -DCMAKE_C_COMPILER="$san_cc" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  "-DCMAKE_C_FLAGS=$san" "-DCMAKE_EXE_LINKER_FLAGS=$san" "-DCMAKE_SHARED_LINKER_FLAGS=$san"
echo "C tests under ASan + UBSan ($(basename "$san_cc")):"
(cd build/ctest-san && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --output-on-failure -j "$jobs")

# 3. The fuzz target: the seeds, then L3K_FUZZ_TIME seconds of new inputs.
fuzz_time=${L3K_FUZZ_TIME:-60}
if command -v clang >/dev/null &&
   echo 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { return 0; }' |
     clang -fsanitize=fuzzer -x c - -o build/fuzz-probe >/dev/null 2>&1; then
  rm -f build/fuzz-probe
  if [ "$fuzz_time" -gt 0 ]; then fuzz_flags=(-max_total_time="$fuzz_time"); else fuzz_flags=(-runs=0); fi
  echo "Fuzzing the C ABI (${fuzz_time} s):"
  FUZZ_JOBS=$jobs bash fuzz/run.sh "${fuzz_flags[@]}" > build/fuzz.log 2>&1 \
    || { tail -n 80 build/fuzz.log; echo "fuzzing failed: the full log is build/fuzz.log" >&2; exit 1; }
  grep -E '^(stat::number_of_executed_units|stat::new_units_added|Done)' build/fuzz.log || true
elif [ "${L3K_REQUIRE_FUZZ:-0}" = 1 ]; then
  echo "clang with libFuzzer is needed for the fuzz run (Debian: apt-get install clang libclang-rt-dev)" >&2
  exit 1
else
  echo "clang with libFuzzer not found: fuzz run skipped" >&2
fi

# 4. Python tests; exit code 5 ("no tests collected") is a failure, not a pass.
set +e
python3 -m pytest -q -ra tests/python "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
