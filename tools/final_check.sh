#!/usr/bin/env bash
# On an H100 machine, when GPU time is short: install, the CUDA attention and block tests, and the
# LLaMA-3-8B layer benchmark without the torch.compile peers. Every step has its own time limit.
source "$(dirname "$0")/gpu_prelude.sh" # strict mode, absolute $OUT, install, cd to the source
timeout ${ATTN_T:-45} python3 -m pytest -q -x tests/python/test_attention.py -k cuda 2>&1 | tee $OUT/pytest_attn.log | tail -2
timeout ${BENCH_T:-70} python3 -m llama3_kernels.bench --suite block --configs llama3-8b --no-compile --reps 20 \
  --out $OUT/bench 2>&1 | tee $OUT/bench.log | grep -v '^\[bench\] (' | tail -12
timeout ${BLOCK_T:-40} python3 -m pytest -q -x tests/python/test_block.py -k cuda 2>&1 | tee $OUT/pytest_block.log | tail -2
