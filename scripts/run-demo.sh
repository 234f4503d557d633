#!/usr/bin/env bash
# `make run`: starts the data plane on this machine (every core, development certificates,
# the defaults of dataplane/dataplane.toml), waits until it is ready, runs the example
# checkout client against it (it creates a small demo catalog with the control
# certificate, then reserves, commits and releases carts with the checkout certificate),
# shows a few of the server's metrics, and stops the server, whatever happens.
set -euo pipefail

LISTEN=${LISTEN:-127.0.0.1:7400}
ADMIN=${ADMIN:-127.0.0.1:7401}
CERTS=${CERTS:-target/certs}
LOG=target/dataplane-run.log

[ -f "$CERTS/ca.pem" ] || target/release/dataplane certs --dir "$CERTS"

target/release/dataplane serve --certs "$CERTS" --listen "$LISTEN" --admin-listen "$ADMIN" >"$LOG" 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT

# Ready when /readyz answers 200 (or give up after 30 s, showing the server's log).
http_get() { exec 3<>"/dev/tcp/${ADMIN%:*}/${ADMIN#*:}" && printf 'GET %s HTTP/1.1\r\nHost: x\r\n\r\n' "$1" >&3 && cat <&3; }
for _ in $(seq 300); do
  if ! kill -0 $server 2>/dev/null; then echo "the data plane stopped:"; cat "$LOG"; exit 1; fi
  if http_get /readyz 2>/dev/null | head -1 | grep -q ' 200 '; then break; fi
  sleep 0.1
done
echo "== data plane ready on $LISTEN (metrics on http://$ADMIN/metrics, log in $LOG)"

target/release/examples/checkout --addr "$LISTEN" --certs "$CERTS"

sleep 1.2  # cores publish their counters every second
echo
echo "== a few of the data plane's metrics"
http_get /metrics | grep -E '^stockplane_(requests_total|replies_total|connections|live_holds)' | sort | head -40
