#!/bin/sh
# Checks the unit with systemd's own tools: `systemd-analyze verify` must be
# silent and `systemd-analyze security --offline=true` must rate it <= 2.0.
# Usage: systemd/check.sh PATH-TO-vhost-pci-bridged
set -eu
binary=${1:?usage: systemd/check.sh PATH-TO-vhost-pci-bridged}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# verify checks that ExecStart and ExecReload exist: point them at the build.
sed "s|/usr/local/bin/|$(cd "$(dirname "$binary")" && pwd)/|g" \
    "$here/vhost-pci-bridged.service" > "$tmp/vhost-pci-bridged.service"
out=$(systemd-analyze verify "$tmp/vhost-pci-bridged.service" 2>&1) || { echo "$out"; echo "systemd-analyze verify: FAILED"; exit 1; }
if [ -n "$out" ]; then echo "$out"; echo "systemd-analyze verify: warnings (must be clean)"; exit 1; fi
echo "systemd-analyze verify: clean"
score=$(systemd-analyze security --offline=true "$tmp/vhost-pci-bridged.service" 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
[ -n "$score" ] || { echo "systemd-analyze security: no score"; exit 1; }
echo "systemd-analyze security --offline=true: exposure $score (must be <= 2.0)"
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }'
