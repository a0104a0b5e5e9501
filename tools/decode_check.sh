#!/usr/bin/env bash
# On an H100/H200 machine: the decoding path in one go.  Install (or L3K_LIBRARY), then the decode
# tests (KV cache, GreedyDecoder, the C generation example) while compute-sanitizer racecheck
# runs the KV-cache workload, memcheck after, then bench_decode (attention, the layer step,
# generate()).  Every step has its own time limit (seconds): TEST_T, RACE_T, MEM_T, BENCH_T.
source "$(dirname "$0")/gpu_prelude.sh" # strict mode, absolute $OUT, install, cd to the source
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
timeout ${TEST_T:-150} python3 -m pytest -q -rfE -p no:cacheprovider tests/python/test_kv_cache.py \
  tests/python/test_greedy_generate.py tests/python/test_c_generate.py > $OUT/pytest_decode.log 2>&1 &
tests=$!
for tool in racecheck memcheck; do
  limit=$([ $tool = racecheck ] && echo ${RACE_T:-150} || echo ${MEM_T:-90})
  timeout $limit compute-sanitizer --tool $tool --error-exitcode 9 python3 tools/sanitize_kv_cache.py \
    > $OUT/sanitize_kv_cache-$tool.log 2>&1
  echo "sanitize_kv_cache $tool: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/sanitize_kv_cache-$tool.log | tail -1)"
done
wait $tests
echo "decode tests: $(tail -1 $OUT/pytest_decode.log)"
grep -E '^(FAILED|ERROR)' $OUT/pytest_decode.log
timeout ${BENCH_T:-200} python3 -m llama3_kernels.bench_decode --out $OUT/bench_decode 2>&1 \
  | tee $OUT/bench_decode.log | grep -v '^\['
