#!/usr/bin/env bash
# Build the C ABI fuzz target (fuzz/fuzz_abi.c) and run it:
#
#   bash fuzz/run.sh                       # 60 s of fuzzing from the seeds in fuzz/corpus
#   bash fuzz/run.sh -max_total_time=600   # libFuzzer flags are passed on
#   bash fuzz/run.sh build/fuzz/crash-...  # replay one input (a file argument)
#
# The library is built by CMake (CPU only, no OpenMP) with clang's coverage
# instrumentation, ASan and UBSan; the target links it.  New inputs go to
# build/fuzz/corpus, crashes to build/fuzz/ (fuzz/corpus is only read).
# Needs clang with the libFuzzer runtime (Debian: apt-get install clang libclang-rt-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
CC=${FUZZ_CC:-clang}
B=build/fuzz
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
mkdir -p "$B"
LOG="$B/build.log"

cmake -S . -B "$B/lib" -DL3K_CUDA=OFF -DBUILD_TESTING=OFF -DCMAKE_C_COMPILER="$CC" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON \
  "-DCMAKE_C_FLAGS=-fsanitize=fuzzer-no-link $SAN -Wno-unknown-pragmas" > "$LOG" 2>&1 \
  || { cat "$LOG"; exit 1; }
cmake --build "$B/lib" --target l3k -j "${FUZZ_JOBS:-2}" >> "$LOG" 2>&1 || { cat "$LOG"; exit 1; }
"$CC" -g -O1 -fsanitize=fuzzer $SAN -Wall -Wextra -Icapi fuzz/fuzz_abi.c -L"$B/lib" -ll3k \
  -Wl,-rpath,"$PWD/$B/lib" -o "$B/fuzz_abi" >> "$LOG" 2>&1 || { cat "$LOG"; exit 1; }
rm -f "$LOG"

# One file argument: replay it.
if [ $# -ge 1 ] && [ -f "$1" ]; then
  exec "$B/fuzz_abi" "$@"
fi
mkdir -p "$B/corpus"
exec "$B/fuzz_abi" "$B/corpus" fuzz/corpus -max_len=512 -timeout=20 -rss_limit_mb=4096 \
  -artifact_prefix="$B/" -print_final_stats=1 -max_total_time=60 "$@"
