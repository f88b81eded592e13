#!/usr/bin/env bash
# Start NPROC local processes of one multi-process JAX job, DEVICES_PER_PROC CPU devices each.
#
#   scripts/launch_local.sh NPROC DEVICES_PER_PROC [moe-train args...]
#   scripts/launch_local.sh 2 4 --config=configs/default.py --workdir=runs/2x4
#
# Every process gets --coordinator_address=127.0.0.1:<free port> --num_processes --process_id and
# --cpu_devices. Output lines are prefixed with the process index. Ctrl-C (or SIGTERM) is
# forwarded to every process; those still running LAUNCH_GRACE_S seconds later (default 60:
# time for a preemption checkpoint) are killed. If any process fails, the others are stopped and
# the launcher exits with that process's status. MOE_CMD overrides the command (default: moe-train; e.g.
# MOE_CMD=moe-eval, or MOE_CMD="python -m train").
set -uo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ || ! $2 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NPROC DEVICES_PER_PROC [moe-train args...]" >&2
  exit 2
fi
nproc=$1
devices=$2
shift 2
cmd=${MOE_CMD:-moe-train}
python=${PYTHON:-python3}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

pgids=()
stop_all() {  # $1: signal
  for pg in "${pgids[@]}"; do kill "-$1" -- "-$pg" 2>/dev/null; done
}
shutdown() {  # $1: signal to forward, $2: exit status; kill what outlives the grace period
  stop_all "$1"
  local deadline=$((SECONDS + ${LAUNCH_GRACE_S:-60})) pg alive
  while ((SECONDS < deadline)); do
    alive=0
    for pg in "${pgids[@]}"; do kill -0 -- "-$pg" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.2
  done
  stop_all KILL
  wait 2>/dev/null
  exit "$2"
}
trap 'shutdown INT 130' INT
trap 'shutdown TERM 143' TERM

for ((i = 0; i < nproc; i++)); do
  # each process in its own process group (setsid), so that stopping it stops its pipeline too; the
  # prefixing sed ignores TERM and INT and ends with its input, so a process's last lines (its reason
  # for stopping) still come through when the launcher stops it
  setsid bash -c 'set -o pipefail; '"$cmd"' "$@" 2>&1 | { trap "" TERM INT; exec sed -u "s/^/['"$i"'] /"; }' _ "$@" \
    --cpu_devices="$devices" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$nproc" --process_id="$i" &
  pgids+=($!)
done

# Poll rather than block in `wait -n`: bash runs a trap only between commands, and a signal that
# lands while `wait -n` is being entered can wait for a child to exit (it could take minutes).
# A short foreground sleep bounds how late Ctrl-C or SIGTERM is acted on.
running=("${pgids[@]}")
status=0
while ((${#running[@]})); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    wait "$pid"
    rc=$?
    if [[ $rc -ne 0 ]]; then
      echo "launch_local: a process exited with status $rc; stopping the others" >&2
      status=$rc
      stop_all TERM
      sleep 2
      stop_all KILL
      wait 2>/dev/null
      exit "$status"
    fi
  done
  running=("${still[@]}")
  ((${#running[@]})) && sleep 0.2
done
wait 2>/dev/null
exit "$status"
