#!/usr/bin/env bash
# Starts the local 3-node JetStream cluster (n1.conf, n2.conf, n3.conf beside this script) and
# keeps it running until Ctrl-C or SIGTERM, which stops all three nodes.
#
#   deploy/nats-cluster/start.sh [DIR]     DIR holds the store dirs and logs
#                                          (default .tools/nats-cluster under the repository)
#
# Clients: nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224
# Monitoring: http://127.0.0.1:8222 (n1), :8223 (n2), :8224 (n3)
# The nats-server binary is the one scripts/nats-server prints (it installs a pinned one when
# none is found). A node that stops is reported and the others keep running, so failover can
# be tried by killing one node (its pid is printed at start).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dir="${1:-$root/.tools/nats-cluster}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
bin="$("$root/scripts/nats-server")"

pids=()
# shellcheck disable=SC2329 # called by the EXIT trap
stop() {
  trap - EXIT INT TERM
  if ((${#pids[@]})); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Status code of GET http://127.0.0.1:PORT/PATH, or 000 when nothing answers. Plain bash so the
# script needs no curl.
http_status() {
  local port=$1 path=$2 line
  exec 3<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null || { echo 000; return; }
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$path" >&3
  IFS=' ' read -r _ line _ <&3 || line=000
  exec 3<&-
  echo "${line:-000}"
}

for node in n1 n2 n3; do
  # Each node runs from DIR, so the relative store_dir of its file lands in DIR/<node>.
  (cd "$dir" && exec "$bin" -c "$here/$node.conf" >"$dir/$node.log" 2>&1) &
  pids+=($!)
done
echo "started nats-server $("$bin" --version | awk '{print $2}') n1 n2 n3 (pids ${pids[*]}); data and logs in $dir" >&2

# /healthz answers 200 only once JetStream is up and the node knows the meta leader, i.e. the
# cluster has formed. Meta leader election needs a quorum (2 of 3), so allow a while.
for port in 8222 8223 8224; do
  for _ in $(seq 1 300); do
    [[ "$(http_status "$port" /healthz)" == 200 ]] && continue 2
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || { echo "a node exited during start-up; see $dir/n*.log" >&2; exit 1; }
    done
    sleep 0.1
  done
  echo "node with monitoring port $port not healthy after 30 s; see $dir/n*.log" >&2
  exit 1
done
echo "cluster ready: nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224 (Ctrl-C stops it)" >&2

# Keep running until Ctrl-C. A node that exits (killed to try failover, or crashed) is
# reported; the other two keep the cluster, and its quorum, alive.
declare -A names=(["${pids[0]}"]=n1 ["${pids[1]}"]=n2 ["${pids[2]}"]=n3)
while ((${#names[@]})); do
  status=0
  done_pid=""
  wait -n -p done_pid "${!names[@]}" || status=$?
  [[ -n "$done_pid" ]] || break
  echo "${names[$done_pid]} exited (status $status); see $dir/${names[$done_pid]}.log" >&2
  unset "names[$done_pid]"
done
echo "all nodes exited" >&2
exit 1
