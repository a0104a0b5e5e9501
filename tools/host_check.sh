#!/usr/bin/env bash
# On an H100 machine: install, the CUDA GEMM, block and torch.library tests, memcheck of the GEMM tuning and plan
# cache, the host-overhead probe, and the block benchmark at the tutorial's test shape (the
# host-bound one). Every step has its own time limit; logs under $OUT.
source "$(dirname "$0")/gpu_prelude.sh" # strict mode, absolute $OUT, install, cd to the source
timeout ${TEST_T:-240} python3 -m pytest -q -x tests/python/test_linear.py tests/python/test_block.py tests/python/test_library.py -k cuda \
  2>&1 | tee $OUT/pytest.log | tail -2
timeout ${SAN_T:-150} compute-sanitizer --tool memcheck --print-limit 20 python3 tools/sanitize_linear.py \
  > $OUT/memcheck_linear.log 2>&1; echo "memcheck rc=$?: $(grep -E 'ERROR SUMMARY|done' $OUT/memcheck_linear.log | tr '\n' ' ')"
timeout ${HOST_T:-60} python3 tools/host_overhead.py 2>&1 | tee $OUT/host_overhead.log
timeout ${BENCH_T:-200} python3 -m llama3_kernels.bench --suite block --configs "tutorial test" \
  --out $OUT/bench_tt 2>&1 | tee $OUT/bench_tt.log | grep -v '^\[bench\] (' | tail -14
