#!/usr/bin/env bash
# The calibration run of `make bench-e2e`: the same driver and settings as its first run
# (saturate, 128 requests per frame, 64 frames in flight per connection) against the null
# server (src/bin/null_server.rs: QUIC and framing on quinn, no engine), pinned to the
# server's CPU. Its throughput is what the protocol alone allows on this host today, so a
# report can tell a slow host from a slow data plane. Then an open loop at NULL_RATE
# requests/s with the settings of the data plane's half-load run (16 connections, 16
# frames in flight): its tail is what the driver, QUIC and the host add to any server's,
# for a server that does nothing. The server is killed when the script ends, whatever
# happened.
#
# Usage: SERVER_CPU=n DRIVER_CPU=m benches/null.sh BIN_DIR (the release `null_server` and
# `stockplane-e2e`; `make bench-e2e` sets the CPUs from benches/cpus.sh). Environment also:
# E2E_SECONDS (10), E2E_WARMUP (2), E2E_SKUS (100000), CERTS (target/certs), NULL_RATE
# (1000000, about half the data plane's batched saturation on this host).
set -euo pipefail

bin=${1:?usage: SERVER_CPU=n DRIVER_CPU=m benches/null.sh BIN_DIR}
server_cpu=${SERVER_CPU:?SERVER_CPU: the CPU to pin the null server to}
driver_cpu=${DRIVER_CPU:?DRIVER_CPU: the CPU to pin the driver to}
certs=${CERTS:-target/certs}
log=$(mktemp -t stockplane-null-server.XXXXXX.log)

taskset -c "$server_cpu" "$bin/null_server" --certs "$certs" --listen 127.0.0.1:0 >"$log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do
  grep -q '^serving on' "$log" && break
  kill -0 "$server_pid" 2>/dev/null || { echo "the null server exited:"; cat "$log"; exit 1; }
  sleep 0.1
done
addr=$(sed -nE 's/^serving on (.*)/\1/p' "$log")
[ -n "$addr" ] || { echo "the null server did not start:"; cat "$log"; exit 1; }
echo "null server: QUIC on $addr, pid $server_pid, CPU $server_cpu (command: taskset -c $server_cpu $bin/null_server --certs $certs)"
driver=(taskset -c "$driver_cpu" "$bin/stockplane-e2e" --server "$addr" --certs "$certs" --seconds "${E2E_SECONDS:-10}"
  --warmup-seconds "${E2E_WARMUP:-2}" --skus "${E2E_SKUS:-100000}" --server-pid "$server_pid")
"${driver[@]}" --batch 128 --frames-in-flight 64
echo
"${driver[@]}" --skip-setup --mode rate --rate "${NULL_RATE:-1000000}" --batch 128 --connections 16 --frames-in-flight 16
