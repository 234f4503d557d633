#!/usr/bin/env bash
# `make run`: the whole system on this machine.
#
#  1. PostgreSQL: the cluster DATABASE_URL names, or a private one under target/pg
#     (scripts/pg.sh: initdb from the system's binaries, installed with apt-get if missing);
#  2. the data plane on every core (development certificates, dataplane/dataplane.toml);
#  3. the control plane (migrations, the back-office API on http://127.0.0.1:7500, the
#     drain and the pusher), with a demo admin token;
#  4. a demo catalog seeded through the API: a location, three SKUs, 10 units each
#     ("set on hand to 10", which the control plane turns into deltas);
#  5. the example checkout client (carts reserved, committed, released; an
#     over-reservation; a retried reserve) against the data plane;
#  6. the sales drained into PostgreSQL, the books, and `control-plane reconcile`;
#  7. a few metrics; both services stop, whatever happens. PostgreSQL keeps running
#     (scripts/pg.sh stop stops it).
set -euo pipefail

LISTEN=${LISTEN:-127.0.0.1:7400}
ADMIN=${ADMIN:-127.0.0.1:7401}
CP_LISTEN=${CP_LISTEN:-127.0.0.1:7500}
CERTS=${CERTS:-target/certs}
BIN=${BIN:-target/release}
DP_LOG=target/dataplane-run.log
CP_LOG=target/control-plane-run.log
TOKEN=${STOCKPLANE_ADMIN_TOKEN:-demo-admin-token-$(date +%s%N)}
export STOCKPLANE_ADMIN_TOKEN=$TOKEN

if [ -z "${DATABASE_URL:-}" ]; then
  DATABASE_URL=$(scripts/pg.sh start target/pg)
fi
export DATABASE_URL
echo "== PostgreSQL: $DATABASE_URL"

[ -f "$CERTS/ca.pem" ] || "$BIN/dataplane" certs --dir "$CERTS"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# Waits until $1/readyz answers 200, or gives up after 60 s showing log $3 of pid $2.
wait_ready() {
  for _ in $(seq 600); do
    if ! kill -0 "$2" 2>/dev/null; then echo "it stopped:"; cat "$3"; exit 1; fi
    if curl -fsS "$1/readyz" >/dev/null 2>&1; then return; fi
    sleep 0.1
  done
  echo "not ready after 60 s:"; tail -30 "$3"; exit 1
}

"$BIN/dataplane" serve --certs "$CERTS" --listen "$LISTEN" --admin-listen "$ADMIN" >"$DP_LOG" 2>&1 &
pids+=($!)
wait_ready "http://$ADMIN" "${pids[-1]}" "$DP_LOG"
echo "== data plane ready on $LISTEN (metrics on http://$ADMIN/metrics, log in $DP_LOG)"

"$BIN/control-plane" serve --listen "$CP_LISTEN" --dataplane "$LISTEN" --certs "$CERTS" >"$CP_LOG" 2>&1 &
pids+=($!)
wait_ready "http://$CP_LISTEN" "${pids[-1]}" "$CP_LOG"
echo "== control plane ready on http://$CP_LISTEN (OpenAPI at /openapi.json, log in $CP_LOG)"

api() {  # api METHOD PATH [JSON]: prints the status and the body
  local method=$1 path=$2 body=${3:-}
  curl -sS -X "$method" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
    ${body:+-d "$body"} -w ' -> %{http_code}\n' "http://$CP_LISTEN$path"
}

echo
echo "== the demo catalog, through the back-office API (a rerun answers 409 for what exists)"
api POST /v1/locations '{"id": 1, "name": "demo warehouse"}'
run=$(date +%s%N)
for sku in 1001 1002 1003; do
  api POST /v1/skus "{\"sku\": $sku, \"name\": \"demo sku $sku\", \"backorder_limit\": 0}"
  api PUT "/v1/stock/$sku/1" "{\"idempotency_key\": \"demo-$run-$sku\", \"on_hand\": 10, \"reason\": \"make run\"}"
done

echo
echo "== waiting for the data plane to hold 10 units of each demo SKU"
for sku in 1001 1002 1003; do
  for _ in $(seq 300); do
    if api GET "/v1/skus/$sku/availability" | grep -q '"on_hand":10[,}]'; then break; fi
    sleep 0.1
  done
  api GET "/v1/skus/$sku/availability"
done

echo
"$BIN/examples/checkout" --addr "$LISTEN" --certs "$CERTS" --catalog-ready

echo
echo "== the books in PostgreSQL once the sales are drained (cart A: 2 x 1001, 1 x 1002)"
for _ in $(seq 100); do
  if api GET "/v1/sales?sku=1001&limit=5" | grep -q hold_id; then break; fi
  sleep 0.1
done
api GET "/v1/sales?sku=1001&limit=5"
for sku in 1001 1002 1003; do api GET "/v1/skus/$sku/books"; done

echo
echo "== control-plane reconcile (exit 0: the books and the data plane agree to the unit)"
"$BIN/control-plane" reconcile --dataplane "$LISTEN" --certs "$CERTS" | head -40

echo
echo "== a few of the metrics"
sleep 1.2  # the data plane's cores publish their counters every second
curl -sS "http://$ADMIN/metrics" | grep -E '^stockplane_(requests_total|connections|live_holds)' | sort | head -20
curl -sS "http://$CP_LISTEN/metrics" | grep -E '^stockplane_cp_(drained_entries_total|drained_position|upserts_total|adjustments_applied_total)' | sort | head -20
