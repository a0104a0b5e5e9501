# Sourced (not run) by the GPU drivers beside it: check_all.sh, decode_check.sh, final_check.sh,
# host_check.sh, run_distributed.sh.  Strict mode, unbuffered Python, $OUT made absolute (default
# /tmp/out) and exported, the tree installed by tools/build.sh, and the working directory left at
# the installed source (the repository, or the unpacked .snap/src.tar), which is also in $src.
# With L3K_LIBRARY naming a built library, nothing is installed: the package is imported from
# python/ in the repository and loads that library.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${L3K_LIBRARY:-}" ] && [ -f "$L3K_LIBRARY" ]; then
  src=$PWD; export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
else
  src=$(bash tools/build.sh) || exit 1 # pip-installs the tree (sm_90a only); prints its dir
fi
cd "$src"
