#!/bin/sh
# Checks the units with systemd's own tools: `systemd-analyze verify` must be
# silent for each, and `systemd-analyze security --offline=true` must rate
# each service <= 2.0.
# Usage: systemd/check.sh PATH-TO-vhost-pci-bridged (vhost-pci-bridgectl beside it)
set -eu
binary=${1:?usage: systemd/check.sh PATH-TO-vhost-pci-bridged}
here=$(cd "$(dirname "$0")" && pwd)
bindir=$(cd "$(dirname "$binary")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# verify checks that ExecStart and ExecReload exist: point them at the build.
for unit in vhost-pci-bridged.service vhost-pci-bridged-metrics.service vhost-pci-bridged-metrics.timer; do
  sed "s|/usr/local/bin/|$bindir/|g" "$here/$unit" > "$tmp/$unit"
done
for unit in vhost-pci-bridged.service vhost-pci-bridged-metrics.service vhost-pci-bridged-metrics.timer; do
  out=$(cd "$tmp" && systemd-analyze verify "$tmp/$unit" 2>&1) || { echo "$out"; echo "systemd-analyze verify $unit: FAILED"; exit 1; }
  if [ -n "$out" ]; then echo "$out"; echo "systemd-analyze verify $unit: warnings (must be clean)"; exit 1; fi
  echo "systemd-analyze verify $unit: clean"
done
for unit in vhost-pci-bridged.service vhost-pci-bridged-metrics.service; do
  score=$(systemd-analyze security --offline=true "$tmp/$unit" 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
  [ -n "$score" ] || { echo "systemd-analyze security $unit: no score"; exit 1; }
  echo "systemd-analyze security --offline=true $unit: exposure $score (must be <= 2.0)"
  awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || exit 1
done
