#!/usr/bin/env bash
# Sync against none, interleaved (`make bench-e2e`'s last part): PAIRS pairs of the
# batched saturation run (benches/e2e.sh's first: 128 requests per frame, 64 frames in
# flight per connection), each run against a fresh server with a fresh log, the two
# durabilities alternating (none first in odd pairs, sync first in even ones). On a
# virtual machine a one-core server's saturation rate moved by 15% and more between
# runs minutes apart, more than the gap being measured; a single pair then says as much
# about the minute as about the log. Prints each run's throughput, server CPU and steal,
# each pair's ratio, and at the end their median and the ratio of the sums.
#
# Usage: benches/pairs.sh BIN_DIR. Environment: PAIRS (5), E2E_PAIR_SECONDS (5),
# E2E_PAIR_WARMUP (1), and what benches/e2e.sh reads (SERVER_CPU, DRIVER_CPU, E2E_SKUS,
# CERTS, E2E_CONFIG, SNAPSHOT_SOURCE).
set -euo pipefail

bin=${1:?usage: benches/pairs.sh BIN_DIR}
pairs=${PAIRS:-5}
seconds=${E2E_PAIR_SECONDS:-5}
warmup=${E2E_PAIR_WARMUP:-1}
out=$(mktemp -t stockplane-pairs.XXXXXX.txt)
trap 'rm -f "$out"' EXIT

# One run: prints its lines of interest, and leaves its throughput in $rate.
run() {
  local durability=$1
  if ! DURABILITY=$durability E2E_PHASES=batched E2E_SECONDS=$seconds E2E_WARMUP=$warmup \
    "$(dirname "$0")/e2e.sh" "$bin" >"$out" 2>&1; then
    echo "the $durability run failed:"
    cat "$out"
    exit 1
  fi
  rate=$(awk '/^throughput:/ { print $2; exit }' "$out")
  [ -n "$rate" ] || { echo "the $durability run printed no throughput:"; cat "$out"; exit 1; }
  echo "  $durability: $rate requests/s"
  grep -E '^(server CPU|stolen by|server WAL)' "$out" | sed 's/^/    /'
}

echo "$pairs pairs, each run ${seconds} s after ${warmup} s of warm-up against a fresh server"
ratios=()
sum_none=0
sum_sync=0
for pair in $(seq "$pairs"); do
  echo "pair $pair:"
  if [ $((pair % 2)) -eq 1 ]; then order=(none sync); else order=(sync none); fi
  for durability in "${order[@]}"; do
    run "$durability"
    if [ "$durability" = none ]; then none=$rate; else sync=$rate; fi
  done
  ratio=$(awk -v s="$sync" -v n="$none" 'BEGIN { printf "%.1f", 100 * s / n }')
  echo "  sync / none: $ratio%"
  ratios+=("$ratio")
  sum_none=$((sum_none + none))
  sum_sync=$((sum_sync + sync))
done
median=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
overall=$(awk -v s="$sum_sync" -v n="$sum_none" 'BEGIN { printf "%.1f", 100 * s / n }')
echo "sync / none over $pairs interleaved pairs: ${ratios[*]/%/%}; median $median%; all sync requests over all none requests: $overall%"
