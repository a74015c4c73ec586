#!/usr/bin/env bash
# The GPU suite of issue 15: one script, under 8 minutes on one H100/H200.
#
#   1. HVP cost per mode on ResNet-18 (CIFAR stem, 1024 samples in one micro-batch, fp32, TF32 off, K = 1
#      and 4, one repeat): benchmarks/hvp_cost.py
#   2. the peers table on the GPU, 1 seed: benchmarks/spectrum_vs_peers.py --device cuda
#   3. HessianSpectrumCallback against the epoch it observes, configs/cifar_bs2048.yaml (resnet18,
#      batch 2048, bf16-mixed, GPU-resident) on random CIFAR-shaped data: benchmarks/callback_overhead.py.
#      top-1 with the config's 4096 analysis samples; the light full analysis (top-5, smallest
#      eigenvalue, trace to 5 %, 2 x 32 density) on 256 samples, as measured on the CPU.
#   4. training throughput, ResNet-18 bf16 GPU-resident, hessian-train vs Lightning vs a plain
#      loop: benchmarks/train_throughput.py
#
# Sizes and limits from its first run (NVIDIA H200, 2026-11-30, benchmarks/RESULTS.md): a float32
# product over 1024 ResNet-18 samples takes 0.5-0.7 s there, so the first version's sizes (4096
# samples and K up to 32 for the HVP cost, 3 seeds of the peers, the full analysis on 1024 samples,
# whose trace alone took 138 s) ran past their limits. The sizes above were measured (steps 1, 2, 3
# top-1 and 4) or are estimated from those products (3, full: about 115 products of ~0.15 s, twice).
#
# Every step's output goes into one folder, $OUT if set (the device machine's), else
# runs/gpu_suite/: env.txt (nvidia-smi, the card, versions), one .log per step,
# spectrum_vs_peers.json, hvp_cost.json (GPU run) and summary.txt (status and seconds per step). Each step has a
# time limit (seconds, STEP_LIMIT_<step> overrides) so that one slow step cannot push the suite past
# 8 minutes; a step that fails or times out is recorded and the suite goes on.
#
#   bash benchmarks/gpu_suite.sh                    # on the GPU machine
#   bash benchmarks/gpu_suite.sh --smoke            # everything on the CPU, tiny sizes, well under a minute
#   bash benchmarks/gpu_suite.sh --download-wheels  # here: the peers as wheels into .whl/ for the GPU machine
#
# The GPU machine has python3 with torch, Lightning, SciPy, but not the peers: carry them as wheels
# (--download-wheels; .whl/ is git-ignored, carry it). The suite installs .whl/*.whl into
# /tmp/site when present. Python: $PYTHON, else .venv/bin/python, else python3.
set -u -o pipefail

smoke=0
download=0
for argument in "$@"; do
    case "$argument" in
        --smoke) smoke=1 ;;
        --download-wheels) download=1 ;;
        -h | --help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $argument (try --help)" >&2; exit 2 ;;
    esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2
if [ -n "${PYTHON:-}" ]; then
    python=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then
    python=$repo/.venv/bin/python
else
    python=python3
fi

# The peers (the `bench` extra) and what they need beyond the GPU machine's image; all pure Python.
wheels=(pyhessian==0.1 curvlinops-for-pytorch==3.0.1 hessian-eigenthings==1.0.0a5 backpack-for-pytorch==1.7.1
    einconv==0.1.0 unfoldNd==0.2.3 linear_operator==0.6.1 opt-einsum==3.4.0)
if [ "$download" = 1 ]; then
    mkdir -p "$repo/.whl"
    exec "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$repo/.whl" "${wheels[@]}"
fi

out=${OUT:-$repo/runs/gpu_suite}
mkdir -p "$out"
summary=$out/summary.txt
: >"$summary"
export PYTHONUNBUFFERED=1
if [ "$smoke" = 0 ] && compgen -G "$repo/.whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$repo"/.whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}

if [ "$smoke" = 1 ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES=""
    device=cpu
    accelerator=cpu
else
    device=cuda
    accelerator=gpu
fi

# ------------------------------------------------------------------------------------ environment
{
    echo "gpu_suite.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) smoke=$smoke python=$python"
    if command -v nvidia-smi >/dev/null; then
        echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
        nvidia-smi
    else
        echo "card: none (nvidia-smi not found)"
    fi
    "$python" - <<'PY'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print("torch sees:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
from importlib.metadata import PackageNotFoundError, version
for name in ("pytorch-lightning", "pyhessian", "curvlinops-for-pytorch", "hessian-eigenthings"):
    try:
        print(f"{name} {version(name)}")
    except PackageNotFoundError:
        print(f"{name} not installed")
PY
} >"$out/env.txt" 2>&1

# run_step NAME LIMIT_SECONDS LOG COMMAND...: run with a time limit, append to LOG, record in summary.txt
failures=0
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local override="STEP_LIMIT_${name//-/_}"
    limit=${!override:-$limit}
    local began=$SECONDS status
    echo "\$ $*" >>"$log"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    status=$?
    local took=$((SECONDS - began))
    case $status in
        0) echo "$name: ok, ${took} s" >>"$summary" ;;
        124 | 137) echo "$name: TIMEOUT after ${took} s (limit $limit s), partial output in $(basename "$log")" >>"$summary"; failures=$((failures + 1)) ;;
        *) echo "$name: FAILED (exit $status) after ${took} s, see $(basename "$log")" >>"$summary"; failures=$((failures + 1)) ;;
    esac
    echo "[gpu_suite] $(tail -1 "$summary")"
}

# ----------------------------------------------------------------------- 1. HVP cost on ResNet-18
if [ -f benchmarks/hvp_cost.py ]; then
    if [ "$smoke" = 1 ]; then
        run_step hvp_cost 300 "$out/hvp_cost.log" "$python" benchmarks/hvp_cost.py --smoke --device cpu
    else
        # TF32 off in cuBLAS/cuDNN whatever the script sets (fp32 products, design.md: TF32)
        # K = 1 and 4 for all four modes, one timed repeat; "auto"'s own choice is skipped to stay
        # inside the suite's 8 minutes.
        NVIDIA_TF32_OVERRIDE=0 run_step hvp_cost 100 "$out/hvp_cost.log" \
            "$python" benchmarks/hvp_cost.py --model resnet18 --samples 1024 --micro-batch-size 1024 --device cuda \
            --ks 1 4 --repeats 1 --no-auto-choice --json "$out/hvp_cost.json"
    fi
else
    echo "hvp_cost: SKIPPED, benchmarks/hvp_cost.py not found" >>"$summary"
fi

# -------------------------------------------------------------------------- 2. the peers on the GPU
if [ "$smoke" = 1 ]; then
    run_step spectrum_vs_peers 300 "$out/spectrum_vs_peers.log" "$python" benchmarks/spectrum_vs_peers.py --smoke \
        --models mlp --seeds 1 --device cpu --json "$out/spectrum_vs_peers.json"
else
    NVIDIA_TF32_OVERRIDE=0 run_step spectrum_vs_peers 120 "$out/spectrum_vs_peers.log" \
        "$python" benchmarks/spectrum_vs_peers.py --device cuda --seeds 1 --json "$out/spectrum_vs_peers.json"
fi

# ------------------------------------------------------- 3. callback overhead, cifar_bs2048.yaml, bf16
overhead=(benchmarks/callback_overhead.py --config configs/cifar_bs2048.yaml --dataset cifar_random --epochs 2)
if [ "$smoke" = 1 ]; then
    small=(--num-samples 256 --arch lenet5 --batch-size 64 --accelerator cpu --limit-train-batches 2
        --analysis-samples 64 --analysis-batch-size 64 --trace-max-probes 24 --density-steps 8)
    run_step callback_overhead 300 "$out/callback_overhead.log" "$python" "${overhead[@]}" "${small[@]}"
else
    run_step callback_overhead_top1 75 "$out/callback_overhead.log" "$python" "${overhead[@]}" --num-samples 50000 --analyses top-1
    run_step callback_overhead_full 110 "$out/callback_overhead.log" "$python" "${overhead[@]}" --num-samples 50000 --analyses full \
        --analysis-samples 256 --trace-rel-tol 0.05 --density-probes 2 --density-steps 32
fi

# --------------------------------------------------------------- 4. training throughput, ResNet-18 bf16
if [ "$smoke" = 1 ]; then
    run_step train_throughput 300 "$out/train_throughput.log" "$python" benchmarks/train_throughput.py --dataset cifar_random \
        --arch lenet5 --batch-size 64 --num-samples 256 --precision bf16-mixed --gpu-resident --accelerator cpu --epochs 1 --repeats 1
else
    run_step train_throughput 55 "$out/train_throughput.log" "$python" benchmarks/train_throughput.py --dataset cifar_random \
        --arch resnet18 --batch-size 2048 --num-samples 50000 --precision bf16-mixed --gpu-resident --accelerator $accelerator \
        --epochs 2 --repeats 2
fi

echo "[gpu_suite] results in $out (device $device):"
cat "$summary"
[ "$failures" = 0 ]
