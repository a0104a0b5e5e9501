#!/usr/bin/env bash
# On the lent GPU: install the committed tree (carried as .snap/src.tar when present)
# with pip; only sm_90a is compiled there to save device time.  Prints the source dir.
set -uo pipefail
OUT=${OUT:-/tmp/out}
src=$PWD
if [ -f .snap/src.tar ]; then
  src=/tmp/l3k-src; rm -rf $src; mkdir -p $src; tar -xf .snap/src.tar -C $src
fi
cd $src
SKBUILD_CMAKE_DEFINE="L3K_CUDA_GENCODE=-gencode=arch=compute_90a,code=sm_90a" \
  python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/pip.log 2>&1 || { tail -30 $OUT/pip.log >&2; exit 1; }
echo $src
