#!/usr/bin/env bash
# The control plane's sync benchmark (`make bench-sync`): a one-core data plane pinned to
# SERVER_CPU, the benchmark (the control plane's drain and pusher, in process) pinned to
# DRIVER_CPU, and PostgreSQL, when it is the private cluster this project started
# (target/pg), pinned as each run says. Four runs, each on a fresh data plane and a
# fresh database:
#   1. drain: SYNC_LINES committed cart lines drained into PostgreSQL, one transaction
#      at a time, PostgreSQL on DRIVER_CPU;
#   2. the same with SYNC_WRITERS (2) transactions in flight, PostgreSQL on SYNC_PG_CPUS;
#   3. bootstrap: SYNC_SKUS SKUs pushed from PostgreSQL into an empty data plane,
#      PostgreSQL on DRIVER_CPU;
#   4. rebootstrap: the same SKUs, drained by the books from an earlier life of the data
#      plane, told again to a data plane that restarted empty (a new epoch).
# Prints everything on stdout; the Makefile tees it into perf-reports/.
#
# Usage: benches/sync.sh BIN_DIR (with the release `dataplane` and `sync` binaries).
set -euo pipefail

bin=${1:?usage: benches/sync.sh BIN_DIR}
# Defaults: the data plane on the CPU that takes the disk's interrupts (benches/cpus.sh).
read -r default_server default_driver _ < <("$(dirname "$0")/cpus.sh" .)
server_cpu=${SERVER_CPU:-$default_server}
driver_cpu=${DRIVER_CPU:-$default_driver}
certs=${CERTS:-target/certs}
lines=${SYNC_LINES:-2000000}
skus=${SYNC_SKUS:-1000000}
writers=${SYNC_WRITERS:-2}
# The CPUs of the private PostgreSQL in the concurrent drain run (a taskset list).
pg_cpus=${SYNC_PG_CPUS:-0-1}
config=benches/sync.toml

if [ -n "${DATABASE_URL:-}" ]; then
  cluster=$DATABASE_URL
  echo "PostgreSQL: $cluster (not pinned: not started by this project)"
  pin_postgres() { :; }
else
  cluster=$(scripts/pg.sh start target/pg)
  echo "PostgreSQL: $cluster (the private cluster under target/pg)"
  # New backends fork from the postmaster and inherit its CPUs.
  pin_postgres() { taskset -a -p -c "$1" "$(head -1 target/pg/data/postmaster.pid)" >/dev/null; }
fi
echo "PostgreSQL settings: $(psql "$cluster" -Atc "select string_agg(name || '=' || setting, ', ') from pg_settings where name in ('fsync','synchronous_commit','shared_buffers','wal_level','max_wal_size')")"

server_pid=
log=
data=
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -INT "$server_pid"
    wait "$server_pid" || true
  fi
  [ -n "$data" ] && rm -rf "$data"
  [ -n "$log" ] && rm -f "$log"
  server_pid=
}
trap stop_server EXIT

# Starts a fresh one-core data plane; sets $addr.
start_server() {
  log=$(mktemp -t stockplane-sync-server.XXXXXX.log)
  data=$(mktemp -d -p target sync-data.XXXXXX)
  local server=(taskset -c "$server_cpu" "$bin/dataplane" serve --config "$config" --cores 1 --cpu-first "$server_cpu"
    --certs "$certs" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --data-dir "$data")
  echo "server command: ${server[*]}"
  "${server[@]}" >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 300); do
    grep -q '^serving on' "$log" && break
    kill -0 "$server_pid" 2>/dev/null || { echo "the server exited:"; cat "$log"; exit 1; }
    sleep 0.1
  done
  addr=$(sed -E 's/^serving on ([^ ]+) .*/\1/' <<<"$(grep -m1 '^serving on' "$log")")
}

# A fresh database for each run; the previous runs' (millions of rows each) are dropped
# first, so that the cluster does not grow with every benchmark.
fresh_database() {
  local name="bench_sync_$(date +%s%N)" old
  for old in $(psql "$cluster" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'bench\_sync\_%'"); do
    psql "$cluster" -qc "DROP DATABASE IF EXISTS $old WITH (FORCE)"
  done
  psql "$cluster" -qc "CREATE DATABASE $name"
  echo "${cluster%/*}/$name"
}

echo "server config ($config, over dataplane/dataplane.toml's defaults):"
grep -Ev '^\s*(#|$)' "$config" | sed 's/^/  /'
echo

status=0
# The drain twice: one transaction at a time with PostgreSQL on the driver's CPU, then
# SYNC_WRITERS concurrent transactions with PostgreSQL on SYNC_PG_CPUS (during the drain
# the data plane only answers journal reads, so its CPU is mostly free).
for run in "1 $driver_cpu" "$writers $pg_cpus"; do
  set -- $run
  pin_postgres "$2"
  start_server
  echo "=== drain: $lines committed lines into PostgreSQL, $1 transaction(s) in flight, PostgreSQL on CPUs $2"
  taskset -c "$driver_cpu" "$bin/sync" --dataplane "$addr" --certs "$certs" --database-url "$(fresh_database)" \
    drain --lines "$lines" --writers "$1" || status=1
  stop_server
  echo
done

pin_postgres "$driver_cpu"
start_server
echo "=== bootstrap: $skus SKUs from PostgreSQL into an empty data plane"
taskset -c "$driver_cpu" "$bin/sync" --dataplane "$addr" --certs "$certs" --database-url "$(fresh_database)" \
  bootstrap --skus "$skus" || status=1
stop_server
echo

start_server
echo "=== rebootstrap: $skus SKUs from books drained from an earlier life of a data plane that restarted empty"
taskset -c "$driver_cpu" "$bin/sync" --dataplane "$addr" --certs "$certs" --database-url "$(fresh_database)" \
  rebootstrap --skus "$skus" || status=1
stop_server
exit "$status"
