#!/bin/sh
# Builds the Linux guest for `make interop` and `vhost-pci-bench linux-guest`:
# Debian's cloud kernel and an initramfs of busybox-static, the virtio modules
# and udp-sender. Needs apt (Debian's packages are downloaded, not installed),
# gcc and the static libc. Output: OUT/vmlinuz and OUT/initrd.cpio.gz.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../.build/linux-guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.cpio.gz" ] && [ "$out/initrd.cpio.gz" -nt "$here/init" ] \
   && [ "$out/initrd.cpio.gz" -nt "$here/udp-sender.c" ] && [ "$out/initrd.cpio.gz" -nt "$here/udp-receiver.c" ]; then
  echo "linux guest: up to date in $out"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
kernel=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9].*\)/\1/p' | head -1)
[ -n "$kernel" ] || { echo "linux guest: no linux-image-cloud-amd64 in apt (run apt-get update)" >&2; exit 1; }
apt-get download "$kernel" busybox-static >/dev/null 2>&1 || { apt-get update -qq && apt-get download "$kernel" busybox-static >/dev/null; }
for d in *.deb; do dpkg-deb -x "$d" pkg; done
mkdir -p rootfs/bin rootfs/modules rootfs/proc rootfs/sys rootfs/dev
cp pkg/bin/busybox rootfs/bin/busybox
ln -s busybox rootfs/bin/sh
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net; do
  f=$(find pkg/lib/modules -name "$m.ko" -o -name "$m.ko.xz" | head -1)
  [ -n "$f" ] || { echo "linux guest: module $m not found in $kernel" >&2; exit 1; }
  case "$f" in *.xz) xz -dc "$f" > "rootfs/modules/$m.ko" ;; *) cp "$f" "rootfs/modules/$m.ko" ;; esac
done
gcc -O2 -static -o rootfs/udp-sender "$here/udp-sender.c"
gcc -O2 -static -o rootfs/udp-receiver "$here/udp-receiver.c"
cp "$here/init" rootfs/init
chmod +x rootfs/init
(cd rootfs && find . | ../pkg/bin/busybox cpio -o -H newc 2>/dev/null | gzip -9) > "$out/initrd.cpio.gz"
cp pkg/boot/vmlinuz-* "$out/vmlinuz"
echo "linux guest: $kernel + busybox in $out"
