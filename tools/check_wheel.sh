#!/usr/bin/env bash
# Checks of the built wheel as a user without the build machine gets it:
#  1. it holds one libl3k.so, whose dependencies name no cuBLAS and whose RUNPATH
#     points nowhere (readelf), and which resolves with an empty LD_LIBRARY_PATH (ldd);
#  2. its platform tag: the highest GLIBC_ symbol version the library needs, and the libraries
#     it needs outside the manylinux policy's list, are printed; a manylinux_X_Y tag must cover
#     both (glibc <= X.Y, no library outside the list), else the check fails;
#  3. in a fresh venv without PyTorch, `import llama3_kernels` works and a raw op
#     runs on NumPy arrays, and the torch-level names say they need torch;
#  4. where the library has CUDA: has_cuda() is true there too.
#
# Usage: bash tools/check_wheel.sh [WHEEL]   (default: build a CPU-only wheel into build/check-wheel)
#   L3K_CUDA=ON bash tools/check_wheel.sh    builds the wheel with the CUDA kernels instead
#   L3K_CHECK_WHEEL_DIR=DIR                  where the wheel and its build go (default build/check-wheel);
#                                            the build is kept per L3K_CUDA value, apart from `pip install .`'s
set -euo pipefail
cd "$(dirname "$0")/.."
out=${L3K_CHECK_WHEEL_DIR:-build/check-wheel}
mkdir -p "$out"
if [ $# -ge 1 ]; then
  wheel=$1
else
  rm -f "$out"/llama3_kernels-*.whl
  SKBUILD_BUILD_DIR="$out/build-cuda-${L3K_CUDA:-OFF}" SKBUILD_CMAKE_DEFINE="L3K_CUDA=${L3K_CUDA:-OFF}" \
    pip wheel . --no-deps -w "$out" -q
  wheel=$(ls "$out"/llama3_kernels-*.whl)
fi
echo "wheel: $wheel"

fail() { echo "FAIL: $*" >&2; exit 1; }

# 1. The library inside the wheel.
libs=$(python3 -c "import sys, zipfile; print('\n'.join(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if 'libl3k' in n))" "$wheel")
[ "$libs" = "llama3_kernels/libl3k.so" ] || fail "expected one llama3_kernels/libl3k.so in the wheel, found: $libs"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llama3_kernels/libl3k.so', sys.argv[2])" "$wheel" "$tmp"
lib=$tmp/llama3_kernels/libl3k.so
dyn=$(readelf -d "$lib")
echo "$dyn" | grep -E 'NEEDED|RPATH|RUNPATH' || true
if echo "$dyn" | grep -q 'NEEDED.*cublas'; then fail "libl3k.so links cuBLAS"; fi
if echo "$dyn" | grep -qE 'R(UN)?PATH'; then fail "libl3k.so has an RPATH/RUNPATH"; fi
if env -u LD_LIBRARY_PATH ldd "$lib" | grep -q 'not found'; then
  env -u LD_LIBRARY_PATH ldd "$lib"
  fail "libl3k.so has unresolved dependencies"
fi

# 2. The platform tag against what the library needs.  The libraries are the manylinux policy's
#    (auditwheel's manylinux-policy.json, manylinux_2_17 and later) plus the dynamic loader.
readelf -V "$lib" > "$tmp/versions"
python3 - "$wheel" "$tmp/versions" "$dyn" <<'PY' || fail "platform tag"
import re, sys, zipfile

wheel, versions, dyn = sys.argv[1], open(sys.argv[2]).read(), sys.argv[3]
manylinux_libs = {
    "libgcc_s.so.1", "libstdc++.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libc.so.6", "libnsl.so.1",
    "libutil.so.1", "libpthread.so.0", "libresolv.so.2", "libX11.so.6", "libXext.so.6", "libXrender.so.1",
    "libICE.so.6", "libSM.so.6", "libGL.so.1", "libgobject-2.0.so.0", "libgthread-2.0.so.0", "libglib-2.0.so.0",
    "libexpat.so.1", "libz.so.1", "libatomic.so.1", "libanl.so.1", "ld-linux-x86-64.so.2",
}
z = zipfile.ZipFile(wheel)
meta = next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))
platforms = {line.split("-")[-1] for line in z.read(meta).decode().splitlines() if line.startswith("Tag: ")}
glibc = max((tuple(map(int, v.split("."))) for v in re.findall(r"Name: GLIBC_([0-9.]+)", versions)), default=(0,))
outside = sorted(set(re.findall(r"\(NEEDED\).*\[(.+)\]", dyn)) - manylinux_libs)
need = "GLIBC_" + ".".join(map(str, glibc))
print(f"platform tag: {', '.join(sorted(platforms))}; the library needs {need}, "
      f"and outside the manylinux libraries: {', '.join(outside) or 'none'}")
bad = []
for tag in platforms:
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", tag)
    if tag.startswith("manylinux") and not m:
        bad.append(f"{tag}: only the PEP 600 form manylinux_X_Y_x86_64 is checked")
    elif m and glibc > (int(m[1]), int(m[2])):
        bad.append(f"{tag} promises glibc {m[1]}.{m[2]}, the library needs {need}")
    elif m and outside:
        bad.append(f"{tag}, but the library needs {', '.join(outside)}, which manylinux does not provide")
for b in bad:
    print("FAIL:", b, file=sys.stderr)
sys.exit(1 if bad else 0)
PY

# 3. A venv with NumPy and no PyTorch (the wheel's own dependencies are skipped: torch is one).
venv=$tmp/venv
python3 -m venv "$venv"
"$venv/bin/pip" install -q numpy
"$venv/bin/pip" install -q --no-deps "$wheel"
env -u LD_LIBRARY_PATH "$venv/bin/python" tests/python/no_torch_check.py
echo "check_wheel: all checks passed"
