#!/bin/sh
# Prints, as a Markdown section, the sizes of what `make deb` built in DIR:
# each package and what it installs that is large (the binaries, the
# libraries). `make bench` adds it to docs/benchmarks.md.
#   sh packaging/deb/sizes.sh DIR
set -eu
dir=${1:?usage: packaging/deb/sizes.sh DIR}
cd "$(dirname "$0")/../.."
. packaging/deb/common.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
row() { awk -v f="$1" -v b="$2" -v g="$3" 'BEGIN { printf "| %s | %d | %.1f | %.1f | %s |\n", f, b, b / 1000000, b / 1048576, g }'; }
echo "### Package sizes (\`make deb\`: static Swift runtime, no Foundation)"
echo
echo "| file | bytes | MB | MiB | goal (issue 24) |"
echo "|---|---:|---:|---:|---|"
for p in vhost-pci-bridge libvhost-pci-device1 libvhost-pci-device-dev; do
  deb="$dir/${p}_${version}_$arch.deb"
  [ -f "$deb" ] || { echo "sizes: no $deb (make deb)" >&2; exit 1; }
  goal="—"; [ "$p" = vhost-pci-bridge ] && goal="≤ 10 MB"
  row "$(basename "$deb")" "$(stat -c %s "$deb")" "$goal"
  dpkg-deb -x "$deb" "$tmp/root"
done
for f in "$tmp"/root/usr/bin/* "$tmp"/root/usr/lib/*/libvhost-pci-device.so.1 "$tmp"/root/usr/lib/*/libvhost-pci-device.a; do
  goal="—"; case "$f" in */usr/bin/*) goal="≤ 15 MB" ;; esac
  row "${f#"$tmp/root"}" "$(stat -c %s "$f")" "$goal"
done
