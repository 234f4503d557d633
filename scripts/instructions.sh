#!/usr/bin/env bash
# Instructions per reserve+commit pair of the engine and of the plain-map baseline,
# counted by valgrind's callgrind over the measured part of `engine_profile` (batches
# archived and validated beforehand, as in the criterion benchmark). Unlike throughput on
# a shared host, which moves by tens of percent from day to day, these counts repeat
# exactly for the same binary and inputs, so a change to the engine's cost shows as is.
#
# Usage: scripts/instructions.sh BIN  (the release `engine_profile` example). Environment:
# SKUS (1000000), BATCHES (2000 batches of 128 pairs). Installs valgrind when missing and
# run as root (apt-get). Prints a header (date, machine, commit, commands) and one line a case.
set -euo pipefail

bin=${1:?usage: scripts/instructions.sh target/release/examples/engine_profile}
skus=${SKUS:-1000000}
batches=${BATCHES:-2000}
if ! command -v valgrind >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
  else
    echo "valgrind is missing: install it (apt-get install valgrind)" >&2
    exit 1
  fi
fi

echo "# stockplane engine: instructions per reserve+commit pair (callgrind)"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
echo "commit: ${STOCKPLANE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
echo "$(valgrind --version); $skus SKUs, 10000 live holds, $batches batches of 128 pairs per case"
echo "command per case: valgrind --tool=callgrind --toggle-collect='*engine_profile::measured*' $bin POPULARITY LINES $skus $batches TARGET"
echo
printf '%-8s %-8s %5s %16s %18s\n' target keys lines instructions 'per pair'
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for case in "engine zipf 1" "engine uniform 1" "engine zipf 5" "engine uniform 5" "plain zipf 1" "plain uniform 1" "plain uniform 5"; do
  read -r target popularity lines <<<"$case"
  log="$out/$target-$popularity-$lines.log"
  valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" --toggle-collect='*engine_profile::measured*' \
    "$bin" "$popularity" "$lines" "$skus" "$batches" "$target" >"$log" 2>&1 || { cat "$log"; exit 1; }
  collected=$(sed -nE 's/.*Collected : ([0-9]+).*/\1/p' "$log")
  [ -n "$collected" ] || { echo "no instruction count for $case:"; cat "$log"; exit 1; }
  pairs=$((batches * 128))
  printf '%-8s %-8s %5s %16s %18s\n' "$target" "$popularity" "$lines" "$collected" \
    "$(awk -v c="$collected" -v p="$pairs" 'BEGIN { printf "%.1f", c / p }')"
done
