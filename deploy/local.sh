#!/usr/bin/env bash
# Rehearses a Flower deployment on one machine, secured as a real one should be: one SuperLink and N SuperNodes on
# 127.0.0.1 (node i holds partition-id i, that is client i), with TLS from a CA made for this rehearsal and SuperNode
# authentication (a key pair per node, each public key registered with the SuperLink; any other node is refused),
# then `python main.py <options> --engine deployment` runs on them through `flwr run`, writing the run folder at
# --out. Every process started here is stopped by PID at the end, whatever happens, and the exit status is the run's.
# Connection settings and credentials live in a temporary $FLWR_HOME, not in the repo.
#
#   deploy/local.sh --nodes 4 -- -c ./utils/conf.json --set no_models=4 --out runs/deployed
#
# --nodes N       SuperNodes to start: one per client, so N must equal the config's no_models
# --port P        the SuperLink's port: its Fleet, Control and Runtime APIs (default 8000)
# --node-port P   the first SuperNode's Runtime API port; node i uses P + i (default 9094)
#
# Before anything starts, the options are checked (N against the config main.py resolves from MAIN_OPTIONS, ports
# numbers and distinct) and every port must be free on 127.0.0.1; after each start, the process listening on its port
# must be the one started. Any of these failing is one `error:` line and exit status 2.
set -euo pipefail
# a model or data of the user's own ("package.module:function") imports from the folder this was started in, as
# main.py's does: the nodes' ClientApps inherit the path
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cd "$(dirname "$0")/.."
usage="usage: deploy/local.sh --nodes N [--port P] [--node-port P] -- MAIN_OPTIONS"
status=2
fail() {  # one line, exit status 2; what was started is stopped on the way out
  echo "error: $*" >&2
  status=2
  exit 2
}
is_port() { [[ $1 =~ ^[1-9][0-9]{0,4}$ ]] && [ "$1" -le 65535 ]; }

nodes="" port=8000 node_port=9094
while [ $# -gt 0 ]; do
  case $1 in
    --nodes|--port|--node-port)
      [ $# -ge 2 ] && [[ $2 != --* ]] || fail "$1 needs a value ($usage)"
      case $1 in --nodes) nodes=$2 ;; --port) port=$2 ;; --node-port) node_port=$2 ;; esac
      shift 2 ;;
    --) shift; break ;;
    *) fail "unknown option $1 ($usage)" ;;
  esac
done
[[ $nodes =~ ^[1-9][0-9]{0,3}$ ]] || fail "give the number of SuperNodes with --nodes N (one per client), got '$nodes'"
is_port "$port" || fail "--port must be a port number from 1 to 65535, got '$port'"
is_port "$node_port" && is_port $((node_port + nodes - 1)) \
  || fail "--node-port must be a port number, and $nodes nodes must fit below 65536 (node i: it + i), got '$node_port'"
if [ "$port" -ge "$node_port" ] && [ "$port" -lt $((node_port + nodes)) ]; then
  fail "--port $port is also SuperNode $((port - node_port))'s port (--node-port $node_port + i): choose distinct ports"
fi
for tool in flower-superlink flower-supernode flwr python; do
  command -v $tool > /dev/null || fail "$tool not found: activate the environment setup.sh installed into"
done
command -v ss > /dev/null || command -v lsof > /dev/null || fail "neither ss nor lsof found: they tell who listens"

# the config main.py resolves from these options (a resumed run: the one it started with): one node per client
set +e
plan=$(python main.py "$@" --engine deployment --superlink local-rehearsal --dry-run)
code=$?
set -e
[ $code -eq 0 ] || exit $code  # main.py said why in one line
{
  read -r out
  while IFS=$'\t' read -r clients folder; do
    [ "$clients" = "$nodes" ] \
      || fail "--nodes $nodes, but the run in $folder has no_models=$clients: start one SuperNode per client"
  done
} <<< "$plan"
main_options=("$@")
given_out=false
for option in "$@"; do [[ $option == --out || $option == --out=* ]] && given_out=true; done
$given_out || main_options+=(--out "$out")  # the folder chosen now, so that the command that continues names it

listeners() {  # one line per socket listening on TCP port $1: its address, then the PIDs holding it (? if not shown)
  if command -v ss > /dev/null; then
    ss -ltnpH "sport = :$1" | while read -r _ _ _ address _ process; do
      local pids
      pids=$(grep -o 'pid=[0-9]*' <<< "$process" | cut -d= -f2 | tr '\n' ' ')
      echo "${address/#\*:/[::]:} ${pids:-?}"  # ss writes [::] as * when it takes IPv4 too
    done
  else  # lsof writes any wildcard as *, and its family apart
    { lsof -nP -iTCP:"$1" -sTCP:LISTEN -F ptn || true; } | awk '/^p/ { pid = substr($0, 2) } /^t/ { family = $0 }
      /^n/ { address = substr($0, 2); sub(/^\*:/, family == "tIPv6" ? "[::]:" : "0.0.0.0:", address)
             print address, pid }'
  fi
}

# every port is free (the SuperLink's one port serves its Fleet, Control and Runtime APIs in Flower 1.42)
busy=$(python - "$port" $(seq "$node_port" $((node_port + nodes - 1))) <<'EOF'
import socket, sys
for port in sys.argv[1:]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: a lingering connection is fine
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError as e:
            print(port, (e.strerror or str(e)).lower())
            break
EOF
)
if [ -n "$busy" ]; then
  taken=${busy%% *}
  [ "$taken" = "$port" ] && what="the SuperLink (--port)" || what="SuperNode $((taken - node_port)) (--node-port)"
  held=$(listeners "$taken")
  [ -n "$held" ] || fail "cannot use 127.0.0.1:$taken for $what: ${busy#* }; nothing was started"
  holders=""  # at the addresses they listen on: one on 0.0.0.0:P or [::]:P takes 127.0.0.1:P too
  while read -r address owners; do holders+="${holders:+, }$address (process ${owners// /, })"; done <<< "$held"
  fail "cannot use 127.0.0.1:$taken for $what: ${busy#* }, by $holders; nothing was started"
fi

export FLWR_TELEMETRY_ENABLED=0
unset FLWR_INTERNAL_GRPC_CONTROL_API FLWR_INTERNAL_GRPC_FLEET_API  # Flower's legacy gRPC APIs: more ports, unchecked
# the nodes' ClientApp processes share this machine's cores: idle OpenMP threads that spin for work would take CPU
# from the others (two 2-thread trainings at once ran 6.3 s each on 2 cores, 4.3 s waiting passively); what is
# computed does not change
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
FLWR_HOME=$(mktemp -d -t fedsparse-flower.XXXXXX)
export FLWR_HOME
credentials=$FLWR_HOME/credentials
mkdir "$FLWR_HOME/logs" "$credentials"

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
saved() {  # whether the run folder (or, for a sweep, one of its runs) holds a checkpoint to resume from
  local checkpoint
  for checkpoint in "$out/checkpoint.pt" "$out"/*/checkpoint.pt; do [ -e "$checkpoint" ] && return 0; done
  return 1
}
finish() {
  stop_all
  rm -rf "$credentials"  # made for this rehearsal only
  if [ $status -eq 0 ]; then rm -rf "$FLWR_HOME"; else echo "deploy: Flower's logs are in $FLWR_HOME/logs" >&2; fi
  if { [ $status -eq 130 ] || [ $status -eq 143 ]; } && saved; then  # the SuperLink is gone: a new rehearsal continues
    local again=("${main_options[@]}")
    [[ " ${again[*]} " == *" --resume "* ]] || again+=(--resume)
    echo "deploy: continue on a new rehearsal with:" \
         "deploy/local.sh --nodes $nodes --port $port --node-port $node_port -- $(printf '%q ' "${again[@]}")" >&2
  fi
}
trap finish EXIT
trap 'status=130; exit 130' INT
trap 'status=143; exit 143' TERM

await_listening() {  # until process $2 listens on port $1; if anyone else does, stop: it is not ours to talk to
  local port=$1 pid=$2 name=$3 log=$4 held ours address owners owner
  for _ in $(seq 150); do
    held=$(listeners "$port")
    if [ -n "$held" ]; then
      ours=" $pid $(descendants "$pid" | tr '\n' ' ')"
      while read -r address owners; do
        for owner in $owners; do
          [[ $ours == *" $owner "* ]] \
            || fail "$address is held by process $owner, not by $name started here (PID $pid); stopped everything"
        done
      done <<< "$held"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || fail "$name exited at start: $(tail -n 4 "$log" | tr -s ' \n' ' ' | cut -c 1-300)"
    sleep 0.2
  done
  fail "$name did not listen on 127.0.0.1:$port within 30 s (its log: $log)"
}

python deploy/credentials.py "$credentials" "$nodes"
tls=(--ssl-ca-certfile "$credentials/ca.crt" --ssl-certfile "$credentials/server.pem"
     --ssl-keyfile "$credentials/server.key")
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local-rehearsal"

[superlink.local-rehearsal]
address = "127.0.0.1:$port"
root-certificates = "$credentials/ca.crt"
EOF

# each in a session of its own, so that Ctrl-C reaches main.py (which stops the run) and not them
setsid flower-superlink --host 127.0.0.1 --port "$port" "${tls[@]}" --enable-supernode-auth \
  --disable-runtime-dependency-installation > "$FLWR_HOME/logs/superlink.log" 2>&1 &
started+=($!)
await_listening "$port" $! "the SuperLink" "$FLWR_HOME/logs/superlink.log"
for i in $(seq 0 $((nodes - 1))); do  # the nodes admitted: these keys, and no others
  log=$FLWR_HOME/logs/register-$i.log
  flwr supernode register "$credentials/node-$i.pub" local-rehearsal > "$log" 2>&1 \
    || fail "the SuperLink did not register SuperNode $i's key: $(tail -n 3 "$log" | tr -s ' \n' ' ' | cut -c 1-300)"
done
for i in $(seq 0 $((nodes - 1))); do
  setsid flower-supernode --superlink "127.0.0.1:$port" --root-certificates "$credentials/ca.crt" \
    --auth-supernode-private-key "$credentials/node-$i.key" --host 127.0.0.1 --port $((node_port + i)) "${tls[@]}" \
    --node-config "partition-id=$i num-partitions=$nodes" > "$FLWR_HOME/logs/supernode-$i.log" 2>&1 &
  started+=($!)
done
for i in $(seq 0 $((nodes - 1))); do
  await_listening $((node_port + i)) "${started[i + 1]}" "SuperNode $i" "$FLWR_HOME/logs/supernode-$i.log"
done

set +e
python main.py "${main_options[@]}" --engine deployment --superlink local-rehearsal
status=$?
exit $status
