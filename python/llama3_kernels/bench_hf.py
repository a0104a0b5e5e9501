"""A Hugging Face LlamaForCausalLM training step on the library's block against the same model
unpatched, in PyTorch eager (SDPA attention) and under torch.compile.

    python -m llama3_kernels.bench_hf [--out bench_out] [--reps 10] [--no-compile]

On a GPU: 4 decoder layers of LLaMA-3-8B sizes (hidden 4096, intermediate 14336, 32/8 heads,
vocab 32000), bf16, batch 2, seq 2048, random weights.  One step is the forward with labels
(the loss over the vocabulary included) and the backward; the optimizer is not timed.  Medians
of CUDA-event timings; tokens/s; the peak memory a step allocates above the weights (gradients
included, as each step starts with none).  The three run one after another in one process, on
one model: unpatched eager, the compiled unpatched model, then the model patched with
``llama3_kernels.hf.apply_to_llama``.  Without a GPU, a tiny float32 config times the CPU
reference path: a check that the benchmark runs, not results.  Prints a table, writes JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .bench import bench_arguments, print_head, start_run, transformers_version

CPU_NOTE = "CPU reference timings, not results: a tiny float32 config on the C reference kernels"


def model_shape(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int, vocab: int) -> dict:
    """A model's sizes under LlamaConfig's names."""
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=layers,
        vocab_size=vocab,
    )


def run_shape(batch: int, seq: int, **sizes) -> dict:
    """model_shape's sizes with the batch and sequence length of a step."""
    return {**model_shape(**sizes), "batch": batch, "seq": seq}


GPU_CONFIG = run_shape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=4, vocab=32000, batch=2, seq=2048)
CPU_CONFIG = run_shape(hidden=256, intermediate=688, heads=4, kv_heads=2, layers=2, vocab=1000, batch=2, seq=128)


def build_model(shape: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **{k: v for k, v in shape.items() if k not in ("batch", "seq")},
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    with torch.device(device):  # initialised where it runs (seconds, not minutes, at 8B layer sizes)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).train()


def training_step(model, ids):
    """One forward with labels and its backward, from no gradients."""
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss

    return step


def extra_peak_bytes(step, device) -> int | None:
    """Peak memory one step allocates above what is held before it (the weights)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def main(argv=None) -> int:
    ap = bench_arguments(
        __doc__, "bench_hf.json", "timed steps per contender (default 20 GPU, 5 CPU)", "skip the torch.compile peer"
    )
    args = ap.parse_args(argv)

    from . import hf

    run = start_run("bench_hf", CPU_NOTE, args, (20, 5), (3, 1), {"transformers": transformers_version("bench_hf")})
    gpu, device, dtype, timer = run.gpu, run.device, run.dtype, run.timer
    shape = GPU_CONFIG if gpu else CPU_CONFIG

    torch.manual_seed(0)
    model = build_model(shape, device, dtype)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), device=device)
    tokens = shape["batch"] * shape["seq"]
    results: dict[str, dict] = {}

    def measure(label: str, step) -> None:
        loss = step().item()  # also the first warmup (and the compile)
        ms = timer(step)
        results[label] = {
            "median_ms": ms,
            "tokens_per_s": tokens / (ms * 1e-3),
            "extra_peak_bytes": extra_peak_bytes(step, device),
            "first_loss": loss,
        }
        run.log(f"{label}: {ms:.2f} ms, {tokens / (ms * 1e-3):,.0f} tokens/s, loss {loss:.4f}")

    measure("eager (SDPA)", training_step(model, ids))
    if not args.no_compile:
        measure("torch.compile", training_step(torch.compile(model), ids))
    with hf.patched(model):
        measure("llama3_kernels", training_step(model, ids))

    print()
    print_head(
        f"LlamaForCausalLM training step (forward with loss + backward): {shape['num_hidden_layers']} layers, "
        f"hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
        f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, vocab {shape['vocab_size']}, "
        f"{str(dtype).replace('torch.', '')}, batch {shape['batch']}, seq {shape['seq']}",
        f"{'contender':<16} {'median':>11} {'tokens/s':>12} {'extra peak':>12} {'first loss':>11}",
        None if gpu else CPU_NOTE,
    )
    for label, r in results.items():
        mem = r["extra_peak_bytes"]
        mem = f"{mem / 2**30:>8.2f} GiB" if mem is not None else f"{'-':>12}"
        print(f"{label:<16} {r['median_ms']:>8.2f} ms {r['tokens_per_s']:>12,.0f} {mem} {r['first_loss']:>11.4f}")
    ours = results["llama3_kernels"]["median_ms"]
    if gpu:
        for peer in ("eager (SDPA)", "torch.compile"):
            if peer in results:
                print(f"llama3_kernels / {peer}: {ours / results[peer]['median_ms']:.2f}x")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        **run.header(),
        "config": {
            **shape,
            "dtype": str(dtype).replace("torch.", ""),
            "attn_implementation": "sdpa",
            "rope_scaling": "llama3",
        },
        "step": "forward with labels (loss over the vocabulary) + backward, gradients set to None before each",
        "timing": (
            f"median of {timer.reps} steps, CUDA events, L2 evicted before each"
            if gpu
            else f"median of {timer.reps} steps, perf_counter"
        ),
        "results": results,
    }
    path = out / "bench_hf.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"\n[bench_hf] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
