#!/usr/bin/env bash
# On a machine with two or more GPUs: torch.distributed over
# TritonLlama3Block with python/llama3_kernels/examples/train_llama.py.
#
#   1. cross-device check: a block on cuda:1 while the current device is cuda:0 gives what it
#      gives on cuda:0 (the library's per-device cuBLASLt handle and GEMM workspace)
#   2. bf16 parity: --mode single vs DDP vs FSDP2 on NGPU GPUs, the same global batch; losses
#      must agree step by step within bf16 rounding (the library's attention takes 16-bit dtypes
#      on CUDA; tests/python/test_distributed.py checks float32 parity to 1e-6 on the CPU)
#   3. throughput in bf16: DDP and FSDP2, triton vs torch blocks, steps/s and tokens/s a GPU
#
# Run:  bash tools/run_distributed.sh    (from any directory; results under $OUT)
# Knobs: NGPU (default: every visible GPU, at least 2), STEPS, WARMUP, and the bf16 model:
# DIM HIDDEN LAYERS HEADS KV_HEADS VOCAB SEQ BATCH (BATCH is the global batch: BATCH/NGPU a GPU).
# NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 here and in the example itself.
export NCCL_NVLS_ENABLE=0
source "$(dirname "$0")/gpu_prelude.sh" # strict mode, absolute $OUT, install, cd to the source
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader
have=$(python3 -c "import torch; print(torch.cuda.device_count())")
NGPU=${NGPU:-$have}
if [ "$NGPU" -lt 2 ]; then echo "run_distributed.sh: needs at least 2 GPUs, found $have" >&2; exit 1; fi
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"

launch() {  # launch NAME ARGS...: one torchrun (or plain python for --mode single), JSON in $OUT/NAME.json
  local name=$1; shift
  local runner=(torchrun --standalone --nproc_per_node "$NGPU")
  [[ " $* " == *" --mode single "* ]] && runner=(python3)
  "${runner[@]}" -m llama3_kernels.examples.train_llama --device cuda --out "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc $(grep '^\[train_llama\]' "$OUT/$name.log" | tail -1)"
  [ $rc -eq 0 ] || grep -m 5 -E "Error|error:" "$OUT/$name.log"
}

stage() { [[ " ${STAGES:-1 2 3} " == *" $1 "* ]]; }   # STAGES="2": the parity runs alone

# ---- 1. a block on cuda:1 while cuda:0 is current ------------------------------------------
stage 1 && python3 - <<'EOF' 2>&1 | tee "$OUT/cross_device.log"
import os
import torch
from llama3_kernels import TritonLlama3Block, llama3_rope_cos_sin
devices = os.environ.get("CROSS_DEVICES", "cuda:0 cuda:1").split()   # "cpu cpu": a dry run
torch.manual_seed(0)
weights = TritonLlama3Block(1024, 2816, 8, 4, dtype=torch.bfloat16).state_dict()
res = {}
for dev in devices:
    if torch.cuda.is_available():
        torch.cuda.set_device(0)                   # the current device stays cuda:0 throughout
    blk = TritonLlama3Block(1024, 2816, 8, 4, device=dev, dtype=torch.bfloat16)
    blk.load_state_dict(weights)
    x = torch.randn(2, 256, 1024, generator=torch.Generator().manual_seed(1)).to(dev, torch.bfloat16)
    x.requires_grad_()
    cos, sin = llama3_rope_cos_sin(256, 128, device=dev)
    y = blk(x, cos, sin)
    y.float().square().mean().backward()
    with torch.no_grad():
        y_inf = blk(x, cos, sin)                   # the one-call inference path
    if torch.cuda.is_available():
        torch.cuda.synchronize(dev)
        assert torch.cuda.current_device() == 0
    res[dev] = [t.detach().float().cpu() for t in (y, y_inf, x.grad, blk.qkv_weight.grad, blk.down_weight.grad)]
a_dev, b_dev = devices
for name, a, b in zip(("out", "inference out", "dx", "d_qkv", "d_down"), res[a_dev], res[b_dev]):
    d = (a - b).abs().max().item()
    print(f"cross-device {name}: max |{a_dev} - {b_dev}| = {d:.3g}")
    assert d <= 1e-2 * max(1.0, a.abs().max().item()), name
print("cross-device: OK")
EOF

# ---- 2. bf16 parity: single vs DDP vs FSDP2 --------------------------------------------------
SMALL=(--dtype bfloat16 --steps 8 --dim 256 --hidden 704 --layers 2 --heads 4 --kv-heads 2
       --vocab 1024 --seq 128 --batch $((4 * NGPU)) --seed 1)
if stage 2; then
launch parity_single --mode single "${SMALL[@]}"
launch parity_ddp --mode ddp "${SMALL[@]}"
launch parity_fsdp2 --mode fsdp2 "${SMALL[@]}"
launch parity_single_torch --mode single --block torch "${SMALL[@]}"
python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
ref = json.load(open(f"{out}/parity_single.json"))
for name in ("parity_ddp", "parity_fsdp2", "parity_single_torch"):
    try:
        r = json.load(open(f"{out}/{name}.json"))
    except OSError:
        print(f"{name}: no result"); continue
    d = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
    print(f"{name} vs parity_single: max relative loss difference {d:.3g}, grad norm {r['grad_norm']:.6g} "
          f"vs {ref['grad_norm']:.6g}  {'OK' if d < 5e-3 else 'MISMATCH'} (bf16 tolerance 5e-3)")
EOF
fi

# ---- 3. bf16 throughput: DDP and FSDP2, triton vs torch blocks ---------------------------------
STEPS=${STEPS:-30}; WARMUP=${WARMUP:-5}
BIG=(--dtype bfloat16 --steps "$STEPS" --warmup "$WARMUP" --dim "${DIM:-2048}" --hidden "${HIDDEN:-5632}"
     --layers "${LAYERS:-4}" --heads "${HEADS:-16}" --kv-heads "${KV_HEADS:-8}" --vocab "${VOCAB:-32000}"
     --seq "${SEQ:-2048}" --batch "${BATCH:-$((4 * NGPU))}" --lr 1e-4)
if stage 3; then
for mode in ddp fsdp2; do
  for block in triton torch; do
    launch "${mode}_${block}_bf16" --mode $mode --block $block "${BIG[@]}"
  done
done
python3 - "$OUT" <<'EOF'
import glob, json, os, sys
print(f"{'run':22s} {'GPUs':>4s} {'steps/s':>8s} {'tok/s/GPU':>10s} {'peak GiB':>8s}  first -> last loss")
for f in sorted(glob.glob(f"{sys.argv[1]}/*_bf16.json")):
    r = json.load(open(f))
    mem = max(x["peak_memory_bytes"] or 0 for x in r["per_rank"]) / 2**30
    print(f"{os.path.basename(f)[:-5]:22s} {r['world_size']:4d} {r['steps_per_s']:8.2f} "
          f"{r['tokens_per_s_per_rank']:10.0f} {mem:8.1f}  {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}")
EOF
fi
