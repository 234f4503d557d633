#!/usr/bin/env bash
# Chooses the CPUs of the benchmarks that pin a data plane and a driver: prints
#   SERVER_CPU DRIVER_CPU why
# The server goes on the CPU that takes the interrupts of the disk holding DIR (the WAL's
# disk), the driver on the first other CPU. Why: the kernel finishes a write where the
# disk's completion interrupt lands (for example the per-CPU worker that finishes an
# O_DSYNC write there); a busy load generator on that CPU delays it until the scheduler's
# next tick (about 4 ms here, HZ=250), and a sync round that waits 4 ms instead of 0.1 ms
# is the data plane's latency under low load. A disk with one queue per CPU (NVMe)
# completes on the CPU that asked, and any choice does; this machine's virtio disk has
# one queue, its interrupt on one CPU.
#
# Usage: benches/cpus.sh [DIR]   (DIR defaults to .). Falls back to "0 1" when the
# interrupt cannot be found (no /sys, a device without MSI interrupts, one CPU).
set -uo pipefail

dir=${1:-.}
cpus=$(nproc 2>/dev/null || echo 1)
fallback() {
  echo "0 $((cpus > 1 ? 1 : 0)) (defaults: $1)"
  exit 0
}

source=$(df --output=source "$dir" 2>/dev/null | tail -1)
[ -b "$source" ] || fallback "$dir is not on a block device"
block=/sys/class/block/$(basename "$(readlink -f "$source")")
# A partition's interrupts are its disk's.
[ -e "$block/partition" ] && block=$(dirname "$(readlink -f "$block")")
device=$(readlink -f "$block/device" 2>/dev/null) || fallback "no device behind $block"
while [ "$device" != / ] && [ ! -d "$device/msi_irqs" ]; do
  device=$(dirname "$device")
done
[ -d "$device/msi_irqs" ] || fallback "no MSI interrupts for $(basename "$block")"

# The disk's busiest interrupt (its request queue, not its config vector).
best= best_count=-1
for irq in $(ls "$device/msi_irqs"); do
  count=$(awk -v irq="$irq:" '$1 == irq { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s }' /proc/interrupts)
  if [ -n "$count" ] && [ "$count" -gt "$best_count" ]; then
    best=$irq best_count=$count
  fi
done
[ -n "$best" ] || fallback "no interrupt counts for $(basename "$block")"
affinity=$(cat "/proc/irq/$best/effective_affinity_list" 2>/dev/null || cat "/proc/irq/$best/smp_affinity_list" 2>/dev/null)
server=${affinity%%[,-]*}
[[ "$server" =~ ^[0-9]+$ ]] && [ "$server" -lt "$cpus" ] || fallback "interrupt $best has no single CPU"
driver=0
[ "$server" -eq 0 ] && driver=$((cpus > 1 ? 1 : 0))
name=$(awk -v irq="$best:" '$1 == irq { print $NF }' /proc/interrupts)
echo "$server $driver (CPU $server takes interrupt $best, $name, of $(basename "$block"), the disk under $dir)"
