#!/usr/bin/env bash
# Install the tree with pip for the GPU scripts beside this one: the repository this script
# lives in, or the source snapshot .snap/src.tar (a tarball of a commit) when present.  Only
# sm_90a is compiled, to save build time.  Prints the source dir; pip's log goes to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
src=$PWD
if [ -f .snap/src.tar ]; then
  src=/tmp/l3k-src; rm -rf $src; mkdir -p $src; tar -xf .snap/src.tar -C $src
fi
cd $src
SKBUILD_CMAKE_DEFINE="L3K_CUDA_GENCODE=-gencode=arch=compute_90a,code=sm_90a" \
  python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/pip.log 2>&1 || { tail -30 $OUT/pip.log >&2; exit 1; }
echo $src
