#!/usr/bin/env bash
# GPU checks and benchmarks for a ~1B-parameter bf16 MoE (configs/gpu_1b.py) on the NVIDIA GPUs of this host:
#   install: with WHEELS=DIR, tokamax and everything it imports, from the wheels in DIR only
#   probe:   the devices JAX sees, and the grouped-matmul kernel "auto" picks (tokamax's when installed)
#   oracle:  scripts/gpu_oracle.py: the layer against the oracle on the GPU (every grouped-matmul kernel
#            this host has), and each kernel at the 1B widths against ragged_dot
#   layer:   moe-bench layer at the 1B config's widths (d=2048, expert d_ff=1408), bf16, capacity and
#            dropless dispatch, dropless once with jax.lax.ragged_dot and once with the grouped-matmul
#            kernel "auto" picks; ragged_all_to_all when the expert axis spans >= 2 GPUs; each case
#            also profiled once, its device time by named stage
#   train:   moe-bench train: the 1B MoE, all 16 layers, vs the same model with every block dense,
#            tokens/s and MFU (against a bf16 matmul peak timed in the same run and against the spec sheet)
#
#   scripts/gpu_bench.sh [OUT_DIR]          # default OUT_DIR: runs/gpu_bench; about 12 minutes on one H200
#   QUICK=1 scripts/gpu_bench.sh [OUT_DIR]  # E 8,64 at 8192 tokens, no expert-count sweep in training;
#                                           # the step limits add up to 9 minutes (8 without WHEELS)
#   QUICK=smoke scripts/gpu_bench.sh        # tiny widths and models: the whole pipeline in a minute or two
#   GPU_BENCH_ALLOW_CPU=1 scripts/gpu_bench.sh  # run on a host without a GPU (always at smoke sizes)
#   STEPS=oracle,train scripts/gpu_bench.sh     # only these steps (probe always runs); the rest: skipped
#   WHEELS=DIR scripts/gpu_bench.sh         # first install tokamax offline; fill DIR on a host with an index:
#     pip download tokamax xprof -d DIR --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64
#   (jaxlib, xprof, numpy, duckdb and others publish manylinux_2_27/2_28 wheels only, so manylinux2014
#   alone does not resolve; the installed jax and jaxlib stay pinned, and a failed install leaves the
#   ragged_dot path)
#
# Each step runs under its own time limit (seconds; INSTALL_S, PROBE_S, ORACLE_S, LAYER_S, TRAIN_S
# override the defaults below, 0 = none), its output shown and kept in OUT_DIR/<step>.log. A step
# that fails or times out is recorded and the next one still runs. OUT_DIR/summary.json gathers every
# step's status (ok, failed, timeout, skipped), exit code, seconds and, for a failure, its last log
# lines, with the figures: the probe, the oracle's pass count, layer.json and train.json (see
# scripts/bench_summary.py). It is rewritten after every step and once more at the end, also when the
# script is interrupted. Exits 0 when no step failed or timed out, else 1 (also when interrupted).
# <STEP>_CMD (e.g. ORACLE_CMD='exit 3') runs that bash command in place of the step (for tests;
# GPU_BENCH_OUT names OUT_DIR there); the probe's command must print "probe: N PLATFORM KERNEL".
#
# Needs a Python with JAX for CUDA and this project's dependencies (PYTHON, default python3);
# nothing is downloaded. The data is the running Python's standard library (byte tokenizer), so
# only the speed is meaningful, not the loss.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
out=${1:-runs/gpu_bench}
mode=${QUICK:-0}
if ! mkdir -p "$out"; then
  echo "gpu_bench.sh: cannot create $out" >&2
  exit 2
fi
export GPU_BENCH_OUT=$out
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
all_steps=(install probe oracle layer train)
plan=$(IFS=,; echo "${all_steps[*]}")
grace=5  # seconds between the TERM at a step's limit and a KILL

case $mode in
  1) limits=(60 45 105 150 180) ;;
  smoke) limits=(60 60 300 300 300) ;;
  *) limits=(60 60 180 420 600) ;;
esac
install_s=${INSTALL_S:-${limits[0]}} probe_s=${PROBE_S:-${limits[1]}} oracle_s=${ORACLE_S:-${limits[2]}}
layer_s=${LAYER_S:-${limits[3]}} train_s=${TRAIN_S:-${limits[4]}}

tmp=$(mktemp -d) || exit 2
rm -f "$out/steps.tsv" "$out/summary.json"
bad=0 current= current_limit= child= start= interrupted= finished= meta=()

record() {  # name status rc start end limit note
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "${7//[$'\t\n']/ }" >>"$out/steps.tsv"
}

summarize() {  # extra arguments for scripts/bench_summary.py
  local args=("$out" --steps "$plan" "${meta[@]}" "$@")
  "$py" scripts/bench_summary.py "${args[@]}" 2>/dev/null || python3 scripts/bench_summary.py "${args[@]}"
}

skip() {  # name reason
  echo "== $1: skipped ($2)"
  record "$1" skipped "" "" "" "" "$2"
  summarize --quiet
}

wanted() {  # name: whether STEPS asks for it (the probe always runs)
  [[ -z ${STEPS:-} || $1 == probe || ,$STEPS, == *",$1,"* ]]
}

past_limit() {  # start end limit: whether end - start reached a limit > 0
  awk -v s="$1" -v e="$2" -v l="$3" 'BEGIN { exit !(l + 0 > 0 && e - s >= l + 0) }'
}

# run_step NAME LIMIT_S COMMAND...: the command under `timeout`, its output to the terminal and to
# OUT_DIR/NAME.log; NAME_CMD in the environment replaces the command. Sets step_rc.
run_step() {
  local name=$1 limit=$2 status fifo="$tmp/$1.fifo" var teepid end
  shift 2
  var=${name^^}_CMD
  if [[ -n ${!var:-} ]]; then
    set -- bash -c "${!var}"
  fi
  echo "== $name (limit ${limit} s)"
  current=$name start=$(date +%s.%N) current_limit=$limit
  record "$name" running "" "$start" "" "$limit" ""
  summarize --quiet
  if rm -f "$fifo" && mkfifo "$fifo"; then
    tee "$out/$name.log" <"$fifo" &
    teepid=$!
  else  # no pipe: the log only
    fifo=$out/$name.log teepid=
  fi
  timeout --kill-after="$grace" "$limit" "$@" >"$fifo" 2>&1 &
  child=$!
  wait "$child"
  step_rc=$?
  child=
  [[ -n $teepid ]] && wait "$teepid"
  end=$(date +%s.%N)
  if (( step_rc == 0 )); then
    status=ok
  elif (( step_rc == 124 )) || { (( step_rc == 137 )) && past_limit "$start" "$end" "$limit"; }; then
    status=timeout  # 124: stopped at the limit; 137: killed when TERM did not stop it
  else
    status=failed
  fi
  [[ $status == ok ]] || bad=1
  record "$name" "$status" "$step_rc" "$start" "$end" "$limit" ""
  current=
  echo "== $name: $status (exit code $step_rc)"
  summarize --quiet
}

finish() {
  [[ -n $finished ]] && return
  finished=1
  echo "== summary"
  if [[ -n $interrupted ]]; then
    summarize --final --interrupted "$interrupted"
  else
    summarize --final
  fi
  rm -rf "$tmp"
}

on_signal() {  # SIGNAL NUMBER: stop the running step, record it, write the summary
  trap '' INT TERM HUP
  interrupted=SIG$1
  echo "gpu_bench.sh: interrupted by SIG$1" >&2
  if [[ -n $child ]]; then
    kill -TERM "$child" 2>/dev/null
    wait "$child"
    wait
  fi
  if [[ -n $current ]]; then
    record "$current" failed "$((128 + $2))" "$start" "$(date +%s.%N)" "$current_limit" "interrupted by SIG$1"
  fi
  bad=1
  exit 1
}
trap finish EXIT
trap 'on_signal INT 2' INT
trap 'on_signal TERM 15' TERM
trap 'on_signal HUP 1' HUP

IFS=, read -ra asked <<<"${STEPS:-}"
for name in "${asked[@]}"; do
  [[ " ${all_steps[*]} " == *" $name "* ]] || echo "gpu_bench.sh: STEPS: no step $name (steps: $plan)" >&2
done

# install
if ! wanted install; then
  skip install "not in STEPS"
elif [[ -z ${WHEELS:-} && -z ${INSTALL_CMD:-} ]]; then
  skip install "WHEELS not set"
elif [[ -z ${INSTALL_CMD:-} ]] && timeout 60 "$py" -c 'import tokamax' 2>/dev/null; then
  skip install "tokamax already imports"
else
  "$py" -c 'from importlib.metadata import version as v; print("jax==" + v("jax")); print("jaxlib==" + v("jaxlib"))' \
    >"$tmp/pins.txt" 2>/dev/null || : >"$tmp/pins.txt"
  run_step install "$install_s" "$py" -m pip install --isolated --no-index --find-links "${WHEELS:-}" \
    --constraint "$tmp/pins.txt" tokamax xprof
fi

# probe
probe='
import json, sys
import jax
devices = jax.devices()
print(jax.__version__, devices, flush=True)
info = {"jax": jax.__version__, "device_kind": devices[0].device_kind, "python": sys.version.split()[0]}
try:
    import tokamax
    from importlib.metadata import version
    info["tokamax"] = version("tokamax")
except Exception as e:
    info["tokamax"], info["tokamax_error"] = None, f"{type(e).__name__}: {e}"
kernel = "ragged_dot"
try:
    from moe.grouped_matmul import resolve
    kernel = resolve("auto", jax.default_backend())
except Exception as e:
    info["grouped_matmul_error"] = f"{type(e).__name__}: {e}"
print("probe:", len(devices), devices[0].platform, kernel, json.dumps(info))
'
run_step probe "$probe_s" "$py" -c "$probe"
ngpu= kind= kernel=
read -r _ ngpu kind kernel _ < <(grep -E '^probe: ' "$out/probe.log" 2>/dev/null | tail -n 1)
reason=
if [[ ! $ngpu =~ ^[0-9]+$ || -z $kind || -z $kernel ]]; then
  reason="the probe reported no devices (exit code $step_rc)"
elif [[ $kind != gpu && -z ${GPU_BENCH_ALLOW_CPU:-} ]]; then
  reason="JAX sees no GPU (platform: $kind); install a CUDA build of JAX, or set GPU_BENCH_ALLOW_CPU=1"
fi
if [[ -n $reason ]]; then
  echo "gpu_bench.sh: $reason" >&2
  if (( step_rc == 0 )); then
    record probe failed "$step_rc" "$start" "$(date +%s.%N)" "$probe_s" "$reason"
  fi
  bad=1
  for name in oracle layer train; do
    skip "$name" "$reason"
  done
  exit 1
fi
if [[ $kind != gpu ]]; then
  mode=smoke
  export JAX_PLATFORMS=${JAX_PLATFORMS:-$kind}
fi
ep=$(( ngpu >= 8 ? 8 : ngpu ))
gmm=ragged_dot
[[ $kernel != ragged_dot ]] && gmm+=",$kernel"
meta=(--meta "mode=$mode" --meta "devices=$ngpu" --meta "platform=$kind" --meta "expert_axis=$ep"
      --meta "grouped_matmul=$kernel")
case $mode in 1) sizes=quick ;; smoke) sizes=smoke ;; *) sizes=full ;; esac
echo "== $ngpu $kind device(s); expert axis $ep; grouped matmul: $kernel; $sizes sizes; output in $out"

case $mode in
  1) layer_experts=8,64 layer_tokens=8192 train_experts=8 repeats=3 ;;
  smoke) layer_experts=8 layer_tokens=128 train_experts=8 repeats=1 ;;
  *) layer_experts=8,64,128 layer_tokens=8192,32768 train_experts=8,16,32 repeats=5 ;;
esac
bench=("$py" -c 'import sys; from train.cli import bench_main; sys.exit(bench_main())')
if [[ $mode == smoke ]]; then
  oracle_args=(--shape 256,128,64)
  layer_widths=(--d_model 64 --d_ff 64 --seq_len 64 --iters 1)
  train_args=(--steps 1 --peak_size 256 --config.model.num_layers=2 --config.model.d_model=64
              --config.model.num_heads=2 --config.model.d_ff=128 --config.model.moe.expert_d_ff=64
              --config.model.vocab_size=512 --config.train.batch_size=$(( 2 * ngpu )) --config.train.seq_len=64
              --config.data.max_bytes=200000)
else
  oracle_args=()
  layer_widths=(--d_model 2048 --d_ff 1408 --seq_len 2048 --iters 5)
  train_args=(--steps 5 --peak_size 8192 --config.train.batch_size=$(( 8 * ngpu )) --config.train.seq_len=2048
              --config.data.max_bytes=20000000)
fi

# oracle
if wanted oracle; then
  run_step oracle "$oracle_s" "$py" scripts/gpu_oracle.py "${oracle_args[@]}"
else
  skip oracle "not in STEPS"
fi

# layer: top-1 and top-2, capacity and dropless, bf16
if wanted layer; then
  rm -f "$out/layer.json" "$out/layer.png"
  run_step layer "$layer_s" "${bench[@]}" layer --data 1 --expert "$ep" --dtype bfloat16 "${layer_widths[@]}" \
    --experts "$layer_experts" --tokens_per_device "$layer_tokens" --experts_per_token 1,2 --dropless \
    --grouped_matmul "$gmm" --stages --repeats "$repeats" --markdown --cpu_devices "$ngpu" \
    --json "$out/layer.json" --plot "$out/layer.png"
else
  skip layer "not in STEPS"
fi

# train: configs/gpu_1b.py (16 layers) vs all-dense, bf16, 8 sequences of 2048 per GPU, no accumulation
if wanted train; then
  rm -f "$out/train.json"
  run_step train "$train_s" "${bench[@]}" train --config configs/gpu_1b.py --dense_config auto \
    --experts "$train_experts" --repeats "$repeats" --cpu_devices "$ngpu" --json "$out/train.json" \
    --config.mesh.data=-1 --config.mesh.expert="$ep" --config.train.grad_accum_steps=1 \
    --config.data.tokenizer=byte "${train_args[@]}"
else
  skip train "not in STEPS"
fi

exit "$bad"
