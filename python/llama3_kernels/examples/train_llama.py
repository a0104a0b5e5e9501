"""Train a small LLaMA-style model on TritonLlama3Block, on one process or with torch.distributed.

    # one process (the reference for the distributed runs: the same global batch)
    python -m llama3_kernels.examples.train_llama --mode single --steps 20 --out single.json
    # two processes: DistributedDataParallel, or FSDP2 (fully_shard each block, then the root)
    torchrun --standalone --nproc_per_node 2 -m llama3_kernels.examples.train_llama \
        --mode ddp --steps 20 --device cuda --dtype bfloat16 --out ddp.json

Each step draws a fixed global batch of synthetic token sequences (seeded: the same on
every rank and in every mode); rank r trains on rows [r*B/W, (r+1)*B/W).  The model is
embedding -> N blocks -> final RMSNorm -> LM head, with next-token cross-entropy.
``--block triton`` uses TritonLlama3Block and the library's RMSNorm; ``--block torch``
uses the pure-PyTorch TorchLlama3Block and torch.nn.RMSNorm.  Both start from the same
weights (one seeded state dict in the tutorial's parameter names, loaded into either), so
their losses can be compared step by step.

Rank 0 writes JSON: the per-step loss (mean over ranks = the global batch's loss), the
gradient norm of the last step, parameter checksums after the last step, and steps/s and
tokens/s of every rank (steps after --warmup).  CPU runs use gloo, CUDA runs NCCL with
each rank on cuda:LOCAL_RANK.  NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before anything can initialise NCCL

import argparse
import gc
import json
import math
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from llama3_kernels import RMSNorm, TorchLlama3Block, TritonLlama3Block, llama3_rope_cos_sin

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TinyLlama(nn.Module):
    """Embedding, ``n_layers`` LLaMA-3 blocks, final RMSNorm, LM head (no weight tying).

    block="triton": TritonLlama3Block and the library's RMSNorm; block="torch":
    TorchLlama3Block and torch.nn.RMSNorm.  State dicts in the tutorial's names (the torch
    model's) load into both: TritonLlama3Block folds attn_q/k/v and mlp_gate/up into its
    fused parameters."""

    def __init__(
        self,
        vocab: int,
        dim: int,
        hidden: int,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        block: str = "triton",
        max_seq: int = 2048,
        theta: float = 500000.0,
        eps: float = 1e-5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if block not in ("triton", "torch"):
            raise ValueError(f"TinyLlama: block {block!r}, expected 'triton' or 'torch'")
        kw = dict(device=device, dtype=dtype)
        self.vocab, self.block_kind = vocab, block
        self.embed = nn.Embedding(vocab, dim, **kw)
        cls = TritonLlama3Block if block == "triton" else TorchLlama3Block
        self.layers = nn.ModuleList(cls(dim, hidden, n_heads, n_kv_heads, eps=eps, **kw) for _ in range(n_layers))
        self.norm = RMSNorm(dim, eps, **kw) if block == "triton" else nn.RMSNorm(dim, eps=eps, **kw)
        self.lm_head = nn.Linear(dim, vocab, bias=False, **kw)
        cos, sin = llama3_rope_cos_sin(max_seq, dim // n_heads, theta, device=device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        if s > self.cos.shape[0]:
            raise ValueError(f"TinyLlama: sequence length {s} past max_seq {self.cos.shape[0]}")
        x = self.embed(tokens)
        cos, sin = self.cos[:s], self.sin[:s]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def reference_state_dict(seed: int, **config) -> dict[str, torch.Tensor]:
    """The initial weights for `seed`: a torch-block TinyLlama built on CPU in float32
    (nn.Linear's default init), in the tutorial's parameter names."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyLlama(**config, block="torch").state_dict()


def build_model(seed: int, block: str, device=None, dtype=None, **config) -> TinyLlama:
    model = TinyLlama(**config, block=block, device=device, dtype=dtype)
    model.load_state_dict(reference_state_dict(seed, **config))
    return model


def synthetic_batch(step: int, batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    """(batch, seq + 1) int64 tokens for `step`, the same on every rank and in every mode:
    a noisy affine bigram chain t[i+1] = (5 t[i] + 3) mod vocab, with 10% of the tokens
    drawn at random instead, so the loss has something to learn."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    noise = torch.randint(vocab, (batch, seq + 1), generator=g)
    keep = torch.rand(batch, seq + 1, generator=g) >= 0.1
    out = torch.empty(batch, seq + 1, dtype=torch.long)
    out[:, 0] = noise[:, 0]
    for i in range(seq):
        out[:, i + 1] = torch.where(keep[:, i + 1], (5 * out[:, i] + 3) % vocab, noise[:, i + 1])
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded parameters and gradients) as its full local tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def total_grad_norm(params) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return float(_full(norm))


def param_checksums(params) -> tuple[float, float]:
    """Sum and sum of |.| of every parameter element in float64 (independent of how the
    weights are fused or sharded, so triton- and torch-block models compare)."""
    s = a = 0.0
    for p in params:
        t = _full(p.detach()).double()
        s += t.sum().item()
        a += t.abs().sum().item()
    return s, a


def setup(args):
    """(rank, world, local_rank, device); initialises the process group unless --mode single."""
    if args.mode == "single":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("--mode single runs on one process, not under torchrun with several")
        rank, world = 0, 1
        local = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        if "RANK" not in os.environ:
            raise SystemExit(f"--mode {args.mode} runs under torchrun (RANK/WORLD_SIZE/LOCAL_RANK unset)")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if args.mode != "single":
        import torch.distributed as dist

        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kw)
    return rank, world, local, device


def wrap(model: nn.Module, args, device, world: int) -> nn.Module:
    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # the RoPE tables are constant buffers: no broadcast each step
        return DDP(model, device_ids=ids, broadcast_buffers=False)
    if args.mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=args.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=args.reshard_after_forward)
        return model
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mode", choices=("single", "ddp", "fsdp2"), default="single")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1, help="steps left out of steps/s and tokens/s")
    p.add_argument("--block", choices=("triton", "torch"), default="triton")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="parameters and activations (the loss is computed in float32)",
    )
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=None, help="MLP width (default 8/3 dim, multiple of 32)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences a step, over all ranks)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-reshard-after-forward",
        dest="reshard_after_forward",
        action="store_false",
        help="FSDP2: keep the blocks' gathered weights from forward to backward",
    )
    p.add_argument("--out", default=None, help="JSON file written by rank 0")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.hidden is None:
        args.hidden = 32 * math.ceil(8 * args.dim / 3 / 32)
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    rank, world, local, device = setup(args)
    dist = None
    if args.mode != "single":
        import torch.distributed as dist
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not a multiple of the world size {world}")
    dtype = DTYPES[args.dtype]
    config = dict(
        vocab=args.vocab,
        dim=args.dim,
        hidden=args.hidden,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        max_seq=args.seq,
    )
    model = build_model(args.seed, args.block, device=device, dtype=dtype, **config)
    model = wrap(model, args, device, world)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    local_batch = args.batch // world
    rows = slice(rank * local_batch, (rank + 1) * local_batch)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    warmup = args.warmup if args.steps > args.warmup else 0
    # every step's shard of the global batch, made before the clock starts
    data = [
        synthetic_batch(step, args.batch, args.seq, args.vocab, args.seed)[rows].to(device)
        for step in range(args.steps)
    ]
    losses, grad_norm, t0 = [], float("nan"), time.perf_counter()
    for step in range(args.steps):
        if step == warmup:
            sync()
            t0 = time.perf_counter()
        tokens = data[step]
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        last = step == args.steps - 1
        if args.clip > 0:  # returns the norm before clipping
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            grad_norm = float(_full(norm)) if last else grad_norm
        elif last:
            grad_norm = total_grad_norm(model.parameters())
        opt.step()
        losses.append(loss.detach())
    sync()
    elapsed = time.perf_counter() - t0
    timed = args.steps - warmup

    loss_t = torch.stack(losses).float() if losses else torch.zeros(0, device=device)
    if dist is not None:  # the mean over ranks of equal shards is the global batch's loss
        dist.all_reduce(loss_t)
        loss_t /= world
    psum, pabs = param_checksums(model.parameters())
    # FSDP2's parameters are DTensors: each rank holds a shard (to_local) of the whole (numel)
    numel = sum(p.numel() for p in model.parameters())
    local_numel = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    mine = dict(
        rank=rank,
        device=str(device),
        steps_per_s=timed / elapsed if elapsed > 0 else None,
        tokens_per_s=timed * local_batch * args.seq / elapsed if elapsed > 0 else None,
        seconds=elapsed,
        timed_steps=timed,
        local_param_numel=local_numel,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )
    per_rank = [mine]
    if dist is not None:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)

    result = None
    if rank == 0:
        tps = [r["tokens_per_s"] for r in per_rank if r["tokens_per_s"]]
        sps = [r["steps_per_s"] for r in per_rank if r["steps_per_s"]]
        result = dict(
            mode=args.mode,
            block=args.block,
            device=device.type,
            dtype=args.dtype,
            world_size=world,
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            torch=torch.__version__,
            config=dict(config, seq=args.seq),
            global_batch=args.batch,
            local_batch=local_batch,
            steps=args.steps,
            warmup=warmup,
            lr=args.lr,
            seed=args.seed,
            reshard_after_forward=args.reshard_after_forward if args.mode == "fsdp2" else None,
            nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"),
            losses=loss_t.tolist(),
            grad_norm=grad_norm,
            param_sum=psum,
            param_abs_sum=pabs,
            param_numel=numel,
            steps_per_s=sum(sps) / len(sps) if sps else None,
            tokens_per_s_per_rank=sum(tps) / len(tps) if tps else None,
            tokens_per_s_total=sum(tps) if tps else None,
            per_rank=per_rank,
        )
        print(
            f"[train_llama] {args.mode} x{world} {args.block} {device.type} {args.dtype}: "
            f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}, grad norm {grad_norm:.6g}, "
            f"{result['steps_per_s'] or 0:.2f} steps/s, {result['tokens_per_s_per_rank'] or 0:.0f} tokens/s a rank",
            flush=True,
        )
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    if dist is not None:
        # DDP's reducer and FSDP2's state hold the process group; free them (cycles included)
        # before destroying it, so no gloo worker thread is left to die at interpreter exit
        # (seen as "terminate called without an active exception", SIGABRT, on CPU).
        dist.barrier()
        del model, opt, data, losses
        gc.collect()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
