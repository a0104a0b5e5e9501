"""Shared fixtures and the tolerances every parity test uses (stated once, here).

Tolerances compare against a float32 (or float64) PyTorch reference computed
from the same rounded inputs, as max |out - ref| <= atol + rtol * |ref|.
"""

import pytest
import torch

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    """Which library the tests load, and whether its CUDA cases can run here (for CI logs)."""
    try:
        import llama3_kernels as l3k

        has_cuda = l3k.has_cuda()
        lib = f"llama3_kernels {l3k.__version__}: {l3k.library_path()}, CUDA kernels: {'yes' if has_cuda else 'no'}"
    except Exception as e:  # the tests report it too; the header still says what was found
        lib, has_cuda = f"llama3_kernels: not loaded ({type(e).__name__}: {e})", False
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        gpu = f"torch {torch.__version__} sees {n} GPU(s): {torch.cuda.get_device_name(0)}"
        cases = "CUDA cases run" if has_cuda else "CUDA cases run and fail: the library was built without CUDA"
    else:
        gpu = f"torch {torch.__version__} sees no GPU (CUDA {torch.version.cuda or 'not built'})"
        cases = "CUDA cases skipped"
    return [lib, f"{gpu}; {cases}"]


def assert_close(out, ref, dtype=None, scale=1.0, what=""):
    """Compare in float32 with the dtype's tolerance (scaled for long reductions)."""
    tol = TOL[dtype or out.dtype]
    torch.testing.assert_close(
        out.float(), ref.float(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale, msg=lambda m: f"{what}: {m}"
    )


def poison(t):
    """Fill an output with NaN so that any element the kernel fails to write fails the test."""
    return t.fill_(float("nan"))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random data for every test, reported on failure to reproduce it."""
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    yield seed
