#!/usr/bin/env bash
# A private PostgreSQL cluster for `make run`, `make test` and the control plane's tests.
#
#   scripts/pg.sh start [DIR]    initdb (first time) and start; prints the DATABASE_URL
#   scripts/pg.sh url [DIR]      prints the DATABASE_URL of a running cluster
#   scripts/pg.sh stop [DIR]     stops the cluster (only ours: the one whose data is in DIR)
#   scripts/pg.sh restart [DIR]  stops and starts it on the same port
#
# DIR defaults to target/pg. The cluster listens on 127.0.0.1 on a free port (kept in
# DIR/port so a restart keeps it) and on a unix socket in DIR/sock, trusts local
# connections, and never touches a server this script did not start. The server programs
# come from the system's PostgreSQL (`pg_config --bindir`); when they are missing and we
# are root, the OS package `postgresql` is installed with apt-get. PostgreSQL refuses to
# run as root, so as root the cluster belongs to the `postgres` user.
set -euo pipefail

cmd=${1:-}
dir=${2:-target/pg}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
data=$dir/data
sock=$dir/sock
log=$dir/postgres.log

die() { echo "pg.sh: $*" >&2; exit 1; }

bindir() {
  local b=""
  if command -v pg_config >/dev/null; then b=$(pg_config --bindir); fi
  if [ -z "$b" ] || [ ! -x "$b/initdb" ]; then
    for c in /usr/lib/postgresql/*/bin; do [ -x "$c/initdb" ] && b=$c; done
  fi
  if [ -z "$b" ] || [ ! -x "$b/initdb" ]; then
    [ "$(id -u)" = 0 ] || die "PostgreSQL's server programs are missing: install the OS package postgresql"
    echo "pg.sh: installing PostgreSQL (apt-get install postgresql)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 \
      || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2; } \
      || die "apt-get could not install postgresql"
    for c in /usr/lib/postgresql/*/bin; do [ -x "$c/initdb" ] && b=$c; done
    [ -x "$b/initdb" ] || die "no initdb after installing postgresql"
  fi
  echo "$b"
}

# Runs a server program as the cluster's owner: ourselves, or `postgres` when we are root.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

free_port() {
  python3 - <<'EOF' 2>/dev/null || echo $((20000 + RANDOM % 20000))
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
EOF
}

url() { echo "postgres://postgres@127.0.0.1:$(cat "$dir/port")/postgres"; }

running() { [ -f "$data/postmaster.pid" ] && as_owner "$B/pg_ctl" -D "$data" status >/dev/null 2>&1; }

start() {
  if [ ! -f "$data/PG_VERSION" ]; then
    mkdir -p "$data" "$sock"
    if [ "$(id -u)" = 0 ]; then
      chown -R postgres: "$dir"
      # The owner must reach DIR through every parent folder.
      p=$dir; while [ "$p" != / ]; do chmod o+x "$p" 2>/dev/null || true; p=$(dirname "$p"); done
    fi
    as_owner "$B/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  fi
  [ -f "$dir/port" ] || free_port >"$dir/port"
  if running; then url; return; fi
  local port; port=$(cat "$dir/port")
  # The books are the system of record: fsync and synchronous commit stay on. The drain
  # writes hundreds of thousands of ledger rows a second: checkpoints come every 4 GB of
  # WAL (max_wal_size) rather than every gigabyte.
  as_owner "$B/pg_ctl" -D "$data" -l "$log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$sock -c max_connections=200 -c shared_buffers=256MB -c max_wal_size=4GB" \
    start >/dev/null || { tail -20 "$log" >&2; die "postgres did not start (log: $log)"; }
  url
}

stop() {
  if [ -f "$data/PG_VERSION" ] && running; then
    as_owner "$B/pg_ctl" -D "$data" -m fast -w stop >/dev/null
  fi
}

B=$(bindir)
case "$cmd" in
  start) start ;;
  url) running || die "no cluster running in $dir"; url ;;
  stop) stop ;;
  restart) stop; start ;;
  *) echo "usage: scripts/pg.sh start|url|stop|restart [DIR]" >&2; exit 2 ;;
esac
