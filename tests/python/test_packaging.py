"""Packaging: the raw layer without PyTorch, one definition of each raw call, and a library
that depends on no cuBLAS and no build-machine path."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import llama3_kernels as l3k
from llama3_kernels import raw
from llama3_kernels.ops import attention, linear, rmsnorm, rope, swiglu

# Makes `import torch` fail in the child, as in an environment where torch is not installed.
_HIDE_TORCH = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
"""

# The checks the child runs, shared with tools/check_wheel.sh.
_CHILD = Path(__file__).with_name("no_torch_check.py")


def test_import_without_torch(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(_HIDE_TORCH))
    package_root = Path(l3k.__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(package_root), env.get("PYTHONPATH", "")])
    env["L3K_LIBRARY"] = l3k.library_path()
    r = subprocess.run([sys.executable, str(_CHILD)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines()[-1:] == ["ok"], r.stdout + r.stderr


def test_raw_calls_defined_once():
    for module in (attention, linear, rmsnorm, rope, swiglu):
        for name in dir(module):
            if name.endswith(("_into", "_workspace_size")) and callable(getattr(module, name)):
                assert getattr(module, name) is getattr(raw, name), f"{module.__name__}.{name}"
                assert getattr(l3k, name) is getattr(raw, name), name


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed")
def test_library_needs_no_cublas_nor_runpath():
    out = subprocess.run(["readelf", "-d", l3k.library_path()], capture_output=True, text=True, check=True).stdout
    needed = [line for line in out.splitlines() if "(NEEDED)" in line]
    assert not [n for n in needed if "cublas" in n.lower()], needed
    assert "RUNPATH" not in out and "(RPATH)" not in out, out


def test_report_header_names_library_and_gpu():
    """The pytest header a CI log starts with: which library, with or without CUDA, and whether a GPU is seen."""
    import torch

    from conftest import pytest_report_header

    lib, gpu = pytest_report_header(None)
    assert l3k.library_path() in lib and l3k.__version__ in lib, lib
    assert f"CUDA kernels: {'yes' if l3k.has_cuda() else 'no'}" in lib, lib
    assert ("sees no GPU" in gpu) == (not torch.cuda.is_available()), gpu
    assert ("CUDA cases skipped" in gpu) == (not torch.cuda.is_available()), gpu
