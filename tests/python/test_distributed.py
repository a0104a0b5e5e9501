"""torch.distributed over TritonLlama3Block, on CPU with gloo (the multi-GPU wiring, minus the GPUs).

Runs python/llama3_kernels/examples/train_llama.py as CI would run it on two GPUs, but with
two CPU processes: ``torchrun --standalone --nproc_per_node 2`` in DDP and in FSDP2 mode,
and ``--mode single`` on the same global batch.  Float32 losses of the distributed runs must
match the single-process run step by step, and the TritonLlama3Block model must match the
TorchLlama3Block model built from the same weights.

Kept small for CI's two cores: dim 64, 2 layers, 4 steps, one OpenMP thread a process;
each torchrun launch costs a few seconds, mostly importing torch.  Every run happens
once (module fixture) and the assertions share them.  L3K_SKIP_DISTRIBUTED=1 skips it.
The subprocesses get this process's environment, with the directory this test imported
llama3_kernels from put first on PYTHONPATH, so they run the same package: pip-installed
(CI) or from the checkout with PYTHONPATH/L3K_LIBRARY.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama3_kernels
from llama3_kernels.examples.train_llama import build_model, synthetic_batch

pytestmark = [
    pytest.mark.skipif(os.environ.get("L3K_SKIP_DISTRIBUTED") == "1", reason="L3K_SKIP_DISTRIBUTED=1"),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]

STEPS = 4
MODEL = [
    "--dim",
    "64",
    "--hidden",
    "192",
    "--layers",
    "2",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--vocab",
    "128",
    "--seq",
    "16",
    "--batch",
    "4",
    "--lr",
    "3e-3",
    "--seed",
    "3",
]
CONFIG = dict(vocab=128, dim=64, hidden=192, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=16)
TIMEOUT = 180
GLOO_EXIT_ABORT = "terminate called without an active exception"
# float32: the ranks' gradients are averaged in another order than one process sums them,
# and AdamW's first steps (update ~ lr * sign(g)) amplify it; measured differences ~1e-6.
LOSS_TOL = dict(rtol=1e-4, atol=1e-4)


def _env() -> dict:
    env = dict(os.environ)
    pkg_parent = str(Path(llama3_kernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if env.get("L3K_LIBRARY"):
        env["L3K_LIBRARY"] = str(Path(env["L3K_LIBRARY"]).resolve())
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores: no oversubscribed OpenMP spinning
    env.pop("WORLD_SIZE", None)
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    return env


def _train(tmp: Path, name: str, mode: str, block: str = "triton") -> dict:
    out = tmp / f"{name}.json"
    args = [
        "-m",
        "llama3_kernels.examples.train_llama",
        "--mode",
        mode,
        "--block",
        block,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--steps",
        str(STEPS),
        "--out",
        str(out),
        *MODEL,
    ]
    if mode == "single":
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    for _attempt in range(2):
        try:
            p = subprocess.run(cmd, env=_env(), cwd=tmp, capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{name}: no result in {TIMEOUT} s\n{(e.stdout or '')[-3000:]}\n{(e.stderr or '')[-3000:]}")
        # gloo's worker threads have been seen (rarely, before the example freed the process
        # group's holders first) to abort at interpreter exit: one retry for that, only.
        if p.returncode == 0 or GLOO_EXIT_ABORT not in p.stderr:
            break
    if p.returncode != 0 or not out.exists():
        raise AssertionError(
            f"{name}: {' '.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-6000:]}"
        )
    return json.loads(out.read_text())


def _fsdp2_available() -> str | None:
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"FSDP2 (torch.distributed.fsdp.fully_shard) is not in torch {torch.__version__}: {e}"
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("distributed")
    r = {
        "single": _train(tmp, "single", "single"),
        "single_torch": _train(tmp, "single_torch", "single", "torch"),
        "ddp": _train(tmp, "ddp", "ddp"),
    }
    why = _fsdp2_available()
    r["fsdp2"] = _train(tmp, "fsdp2", "fsdp2") if why is None else why
    return r


def _close(a, b, what, **tol):
    torch.testing.assert_close(
        torch.tensor(a, dtype=torch.float64),
        torch.tensor(b, dtype=torch.float64),
        msg=lambda m: f"{what}: {m}",
        **(tol or LOSS_TOL),
    )


def _check_against_single(run: dict, single: dict, mode: str):
    assert run["mode"] == mode and run["world_size"] == 2 and run["local_batch"] == 2
    assert len(run["losses"]) == STEPS
    _close(run["losses"], single["losses"], f"{mode} losses vs single")
    _close(run["grad_norm"], single["grad_norm"], f"{mode} last gradient norm vs single")
    # checksums of ~1e4 parameter elements after STEPS AdamW updates
    _close(run["param_sum"], single["param_sum"], f"{mode} parameter sum", rtol=0, atol=1e-3)
    _close(run["param_abs_sum"], single["param_abs_sum"], f"{mode} parameter |sum|", rtol=1e-6, atol=0)
    assert len(run["per_rank"]) == 2 and all(r["tokens_per_s"] > 0 for r in run["per_rank"])


def test_single_learns(runs):
    s = runs["single"]
    assert s["world_size"] == 1 and len(s["losses"]) == STEPS
    assert all(torch.isfinite(torch.tensor(s["losses"])))
    assert s["losses"][-1] < s["losses"][0]  # the synthetic bigram chain is learnable


def test_ddp_matches_single(runs):
    _check_against_single(runs["ddp"], runs["single"], "ddp")
    assert runs["ddp"]["per_rank"][0]["local_param_numel"] == runs["ddp"]["param_numel"]  # replicated


def test_fsdp2_matches_single(runs):
    if isinstance(runs["fsdp2"], str):
        pytest.skip(runs["fsdp2"])
    f = runs["fsdp2"]
    _check_against_single(f, runs["single"], "fsdp2")
    # sharded: each rank holds about half of the parameters
    for r in f["per_rank"]:
        assert r["local_param_numel"] < 0.6 * f["param_numel"], r


def test_triton_block_matches_torch_block_training(runs):
    a, b = runs["single"], runs["single_torch"]
    assert a["param_numel"] == b["param_numel"]
    _close(a["losses"], b["losses"], "triton vs torch block losses", rtol=1e-5, atol=1e-5)
    _close(a["grad_norm"], b["grad_norm"], "triton vs torch block last gradient norm", rtol=1e-4, atol=1e-6)
    _close(a["param_abs_sum"], b["param_abs_sum"], "triton vs torch parameter |sum|", rtol=1e-6, atol=0)


def test_triton_block_matches_torch_block_step():
    """In process: the same weights give the same logits and gradients through both blocks."""
    torch.manual_seed(0)
    models = {k: build_model(7, k, **CONFIG) for k in ("triton", "torch")}
    tokens = synthetic_batch(0, 3, 16, CONFIG["vocab"], seed=7)
    grads = {}
    for k, m in models.items():
        logits = m(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CONFIG["vocab"]), tokens[:, 1:].reshape(-1))
        loss.backward()
        grads[k] = (logits.detach(), loss.detach(), {n: p.grad for n, p in m.named_parameters()})
    (lt, st, gt), (lr, sr, gr) = grads["triton"], grads["torch"]
    torch.testing.assert_close(lt, lr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st, sr, atol=1e-6, rtol=1e-6)
    tri = models["triton"]
    for i in range(len(tri.layers)):  # fused parameters vs the torch block's separate ones
        p = f"layers.{i}."
        torch.testing.assert_close(
            gt[p + "qkv_weight"], torch.cat([gr[p + f"attn_{n}.weight"] for n in "qkv"]), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            gt[p + "gate_up_weight"],
            torch.cat([gr[p + "mlp_gate.weight"], gr[p + "mlp_up.weight"]]),
            atol=1e-5,
            rtol=1e-4,
        )
        for mine, theirs in (
            ("o_weight", "attn_o.weight"),
            ("down_weight", "mlp_down.weight"),
            ("norm1_weight", "norm1_weight"),
            ("norm2_weight", "norm2_weight"),
        ):
            torch.testing.assert_close(gt[p + mine], gr[p + theirs], atol=1e-5, rtol=1e-4)
    for n in ("embed.weight", "norm.weight", "lm_head.weight"):
        torch.testing.assert_close(gt[n], gr[n], atol=1e-5, rtol=1e-4)
