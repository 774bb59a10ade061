#!/usr/bin/env bash
# Rehearses a Flower deployment on one machine: one SuperLink and N SuperNodes on 127.0.0.1 (node i holds
# partition-id i, that is client i), then `python main.py <options> --engine deployment` runs on them through
# `flwr run`, writing the run folder at --out. Every process started here is stopped by PID at the end, whatever
# happens, and the exit status is the run's. Connection settings live in a temporary $FLWR_HOME, not in the repo.
#
#   deploy/local.sh --nodes 4 -- -c ./utils/conf.json --set no_models=4 --out runs/deployed
#
# --nodes N       SuperNodes to start: one per client, so N must equal the config's no_models
# --port P        the SuperLink's port (default 8000)
# --node-port P   the first SuperNode's Runtime API port; node i uses P + i (default 9094)
set -euo pipefail
cd "$(dirname "$0")/.."
nodes="" port=8000 node_port=9094
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) nodes=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --node-port) node_port=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (usage: deploy/local.sh --nodes N [--port P] [--node-port P] -- MAIN_OPTIONS)" >&2
       exit 2 ;;
  esac
done
if ! [[ $nodes =~ ^[1-9][0-9]*$ ]]; then
  echo "error: give the number of SuperNodes with --nodes N (one per client)" >&2
  exit 2
fi
for tool in flower-superlink flower-supernode flwr; do
  command -v $tool > /dev/null || { echo "error: $tool not found: activate the environment setup.sh installed into" >&2; exit 2; }
done

export FLWR_TELEMETRY_ENABLED=0
# the nodes' ClientApp processes share this machine's cores: idle OpenMP threads that spin for work would take CPU
# from the others (two 2-thread trainings at once ran 6.3 s each on 2 cores, 4.3 s waiting passively); what is
# computed does not change
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
FLWR_HOME=$(mktemp -d -t fedsparse-flower.XXXXXX)
export FLWR_HOME
mkdir "$FLWR_HOME/logs"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local-rehearsal"

[superlink.local-rehearsal]
address = "127.0.0.1:$port"
insecure = true
EOF

started=()
descendants() {  # the PIDs of a process's children, grandchildren, ...
  local child
  for child in $(pgrep -P "$1" || true); do echo "$child"; descendants "$child"; done
}
stop_all() {
  local pids=() pid
  for pid in "${started[@]}"; do pids+=("$pid" $(descendants "$pid")); done
  [ ${#pids[@]} -eq 0 ] && return
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do  # up to 10 s to exit cleanly, then SIGKILL
    kill -0 "${pids[@]}" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}
status=1
main_options=()
finish() {
  stop_all
  if [ $status -eq 0 ]; then rm -rf "$FLWR_HOME"; else echo "deploy: Flower's logs are in $FLWR_HOME/logs" >&2; fi
  if [ $status -eq 130 ] || [ $status -eq 143 ]; then  # the SuperLink named above is gone: a new rehearsal continues
    local again=("${main_options[@]}")
    [[ " ${again[*]} " == *" --resume "* ]] || again+=(--resume)
    echo "deploy: continue on a new rehearsal with: deploy/local.sh --nodes $nodes -- $(printf '%q ' "${again[@]}")" >&2
  fi
}
trap finish EXIT
trap 'status=130; exit 130' INT
trap 'status=143; exit 143' TERM

# each in a session of its own, so that Ctrl-C reaches main.py (which stops the run) and not them
setsid flower-superlink --insecure --host 127.0.0.1 --port "$port" --disable-runtime-dependency-installation \
  > "$FLWR_HOME/logs/superlink.log" 2>&1 &
started+=($!)
for _ in $(seq 100); do (exec 3<> "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
for i in $(seq 0 $((nodes - 1))); do
  setsid flower-supernode --insecure --superlink "127.0.0.1:$port" --port $((node_port + i)) \
    --node-config "partition-id=$i num-partitions=$nodes" > "$FLWR_HOME/logs/supernode-$i.log" 2>&1 &
  started+=($!)
done

main_options=("$@")
set +e
python main.py "$@" --engine deployment --superlink local-rehearsal
status=$?
exit $status
