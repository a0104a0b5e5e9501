"""The raw layer where PyTorch is not installed: `import llama3_kernels` works, raw calls run on
NumPy arrays, and the torch-level names say they need PyTorch.

Run as a script by test_packaging.py (torch hidden from the child) and by tools/check_wheel.sh
(a venv with the wheel and no torch).  Prints what it found, then "ok" as its last line.
"""

import importlib.util
import sys

import numpy as np

import llama3_kernels as l3k

try:
    torch_spec = importlib.util.find_spec("torch")
except ModuleNotFoundError:  # hidden by a meta path finder
    torch_spec = None
assert torch_spec is None, "this check needs an environment without torch"
assert "torch" not in sys.modules

x = np.random.default_rng(0).standard_normal((5, 123)).astype(np.float32)
w = np.linspace(0.5, 1.5, 123, dtype=np.float32)
y, rstd = np.full_like(x, np.nan), np.full(5, np.nan, np.float32)
l3k.rmsnorm_forward_into(x, w, 1e-5, y, rstd)
ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w
assert np.abs(y - ref).max() < 1e-5, np.abs(y - ref).max()
g, u = x[:, :61].copy(), x[:, 61:122].copy()
a = np.full_like(g, np.nan)
l3k.swiglu_forward_into(g, u, a)
assert np.abs(a - g / (1 + np.exp(-g)) * u).max() < 1e-5
assert l3k.version() == tuple(int(v) for v in l3k.__version__.split("."))
assert isinstance(l3k.has_cuda(), bool) and l3k.library_path()
for name in ("Llama3Block", "rms_norm"):
    try:
        getattr(l3k, name)
    except ImportError as e:
        assert "needs PyTorch" in str(e), e
    else:
        raise AssertionError(f"{name} without torch should raise ImportError")
print(
    f"no torch: llama3_kernels {l3k.__version__} from {l3k.library_path()}, has_cuda={l3k.has_cuda()}, "
    "rmsnorm_forward_into and swiglu_forward_into on NumPy ok"
)
print("ok")
