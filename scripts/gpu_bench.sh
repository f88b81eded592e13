#!/usr/bin/env bash
# GPU checks and benchmarks for a ~1B-parameter bf16 MoE (configs/gpu_1b.py) on the NVIDIA GPUs of this host:
#   0. scripts/gpu_oracle.py: the layer against the oracle on the GPU (every grouped-matmul kernel
#      this host has), and each kernel at the 1B widths against ragged_dot
#   1. moe-bench layer at the 1B config's widths (d=2048, expert d_ff=1408), bf16, capacity and
#      dropless dispatch, dropless once with jax.lax.ragged_dot and once with the grouped-matmul
#      kernel "auto" picks (tokamax's when installed); ragged_all_to_all when the expert axis
#      spans >= 2 GPUs; each case also profiled once, its device time by named stage
#   2. moe-bench train: the 1B MoE, all 16 layers, vs the same model with every block dense,
#      tokens/s and MFU (against a bf16 matmul peak timed in the same run and against the spec sheet)
#
#   scripts/gpu_bench.sh [OUT_DIR]          # default OUT_DIR: runs/gpu_bench
#   QUICK=1 scripts/gpu_bench.sh [OUT_DIR]  # about 5 minutes on one H200: E 8,64 at 8192 tokens,
#                                           # no expert-count sweep in the training benchmark
#   WHEELS=DIR scripts/gpu_bench.sh         # first install tokamax offline from wheels in DIR
#                                           # (pip download 'tokamax' --python-version 3.12 --only-binary=:all: -d DIR)
#
# Needs a Python with JAX for CUDA and this project's dependencies (PYTHON, default python3);
# nothing is downloaded. The data is the running Python's standard library (byte tokenizer), so
# only the speed is meaningful, not the loss. About 12 minutes on one H200.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${1:-runs/gpu_bench}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
bench() { "$py" -c 'import sys; from train.cli import bench_main; sys.exit(bench_main())' "$@"; }

read -r ngpu kind < <("$py" -c 'import jax; d = jax.devices(); print(len(d), d[0].platform)')
if [[ $kind != gpu ]]; then
  echo "gpu_bench.sh: JAX sees no GPU (platform: $kind); install a CUDA build of JAX" >&2
  exit 2
fi
ep=$(( ngpu >= 8 ? 8 : ngpu ))
if [[ -n ${WHEELS:-} ]] && ! "$py" -c 'import tokamax' 2>/dev/null; then
  "$py" -m pip install --quiet --no-index --find-links "$WHEELS" tokamax
fi
kernel=$("$py" -c 'from moe.grouped_matmul import resolve; import jax; print(resolve("auto", jax.default_backend()))')
if [[ ${QUICK:-0} == 1 ]]; then
  layer_experts=8,64 layer_tokens=8192 train_experts=8 repeats=3
else
  layer_experts=8,64,128 layer_tokens=8192,32768 train_experts=8,16,32 repeats=5
fi
echo "== $ngpu GPU(s); expert axis $ep; grouped matmul: $kernel; output in $out"
"$py" -c 'import jax; print(jax.__version__, jax.devices())'

echo "== oracle on the GPU"
"$py" scripts/gpu_oracle.py || echo "gpu_bench.sh: some oracle cases failed (above); benchmarking anyway" >&2

echo "== layer: d=2048, expert d_ff=1408, bf16, top-1 and top-2, capacity and dropless"
bench layer --data 1 --expert "$ep" --d_model 2048 --d_ff 1408 --dtype bfloat16 --seq_len 2048 \
  --experts "$layer_experts" --tokens_per_device "$layer_tokens" --experts_per_token 1,2 --dropless \
  --grouped_matmul "ragged_dot$([[ $kernel != ragged_dot ]] && echo ",$kernel")" \
  --stages --repeats "$repeats" --iters 5 --markdown --json "$out/layer.json" --plot "$out/layer.png"

echo "== train: configs/gpu_1b.py (16 layers) vs all-dense, bf16, 8 sequences of 2048 per GPU, no accumulation"
bench train --config configs/gpu_1b.py --dense_config auto --experts "$train_experts" --steps 5 --repeats "$repeats" \
  --peak_size 8192 --json "$out/train.json" \
  --config.mesh.data=-1 --config.mesh.expert="$ep" --config.train.batch_size=$(( 8 * ngpu )) \
  --config.train.grad_accum_steps=1 --config.train.seq_len=2048 --config.data.tokenizer=byte --config.data.max_bytes=20000000
