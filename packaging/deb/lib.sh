#!/bin/sh
# Builds the packages of libvhost-pci-device (docs/device-api.md), from
# `make install-lib` into /usr (libraries in /usr/lib/MULTIARCH):
#   OUTDIR/libvhost-pci-device1_VERSION_ARCH.deb     the shared library
#   OUTDIR/libvhost-pci-device-dev_VERSION_ARCH.deb  header, static library,
#       pkg-config files, the .so link, device-api.md and the C examples
# Called by packaging/deb/build.sh (make deb).
#   sh packaging/deb/lib.sh OUTDIR
set -eu
out=${1:?usage: packaging/deb/lib.sh OUTDIR}
cd "$(dirname "$0")/../.."
. packaging/deb/common.sh
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

make -s install-lib DESTDIR="$stage/all" PREFIX=/usr LIBDIR="/usr/lib/$multiarch" INCLUDEDIR=/usr/include VERSION="$version" \
  > "$stage/build.log" 2>&1 || { cat "$stage/build.log"; fail "building libvhost-pci-device failed"; }
libdir="usr/lib/$multiarch"
lib="$stage/libvhost-pci-device1"
dev="$stage/libvhost-pci-device-dev"
install -d "$lib/$libdir" "$dev/$libdir" "$dev/usr/share/doc/libvhost-pci-device-dev/examples"
mv "$stage/all/$libdir/libvhost-pci-device.so.1" "$lib/$libdir/"
chmod 0644 "$lib/$libdir/libvhost-pci-device.so.1" # Debian's mode for a shared library
mv "$stage/all/$libdir/libvhost-pci-device.so" "$stage/all/$libdir/libvhost-pci-device.a" "$stage/all/$libdir/pkgconfig" "$dev/$libdir/"
mv "$stage/all/usr/include" "$dev/usr/include"
install -m 0644 docs/device-api.md "$dev/usr/share/doc/libvhost-pci-device-dev/device-api.md"
install -m 0644 examples/c-vm2/counter.c examples/c-vm2/forwarder.c "$dev/usr/share/doc/libvhost-pci-device-dev/examples/"
leftover=$(find "$stage/all" -type f -o -type l)
[ -z "$leftover" ] || fail "install-lib installed what no package holds: $leftover"

depends=$(shlib_depends "$stage" libvhost-pci-device1 "$lib/$libdir/libvhost-pci-device.so.1")
for p in libvhost-pci-device1 libvhost-pci-device-dev; do
  doc="$stage/$p/usr/share/doc/$p"
  install -d "$doc"
  install -m 0644 packaging/deb/copyright "$doc/copyright"
  gzip -9n -c packaging/deb/changelog > "$doc/changelog.gz"
done
control_and_sums "$lib" packaging/deb/control-lib "$depends"
control_and_sums "$dev" packaging/deb/control-dev "$depends"
# The shared library's package says which package provides its SONAME, and
# has ldconfig run.
echo "libvhost-pci-device 1 libvhost-pci-device1 (>= $version)" > "$lib/DEBIAN/shlibs"
# Its symbols file: what it exports (the vpd_* calls at version node
# VHOST_PCI_DEVICE_1, packaging/lib/vhost-pci-device.map), each since this
# version.
exports=$(nm -D --defined-only "$lib/$libdir/libvhost-pci-device.so.1" | awk '$2 ~ /^[A-Z]$/ { print $3 }' | LC_ALL=C sort)
extra=$(echo "$exports" | grep -v -e '^vpd_[a-z0-9_]*@@VHOST_PCI_DEVICE_1$' -e '^VHOST_PCI_DEVICE_1$' || true)
[ -z "$extra" ] || fail "the shared library exports more than the vpd_* calls: $(echo "$extra" | head -5)"
exported=$(echo "$exports" | sed -n 's/^\(vpd_[a-z0-9_]*\)@@.*/\1/p')
declared=$(sed -n 's/^[a-z].*[ *]\(vpd_[a-z0-9_]*\)(.*/\1/p' Sources/CVhostPCIDevice/include/vhost_pci_device.h | LC_ALL=C sort)
[ "$exported" = "$declared" ] || fail "the shared library's exports differ from the header's calls: exported $(echo $exported), declared $(echo $declared)"
{ echo "libvhost-pci-device.so.1 libvhost-pci-device1 #MINVER#"
  echo "* Build-Depends-Package: libvhost-pci-device-dev"
  echo "$exports" | sed -e 's/@@/@/' -e "s/\$/ $version/" -e 's/^VHOST_PCI_DEVICE_1 /VHOST_PCI_DEVICE_1@VHOST_PCI_DEVICE_1 /' -e 's/^/ /'
} > "$lib/DEBIAN/symbols"
echo "activate-noawait ldconfig" > "$lib/DEBIAN/triggers"
for p in libvhost-pci-device1 libvhost-pci-device-dev; do
  build_deb "$stage/$p" "$out/${p}_${version}_${arch}.deb"
done
report_size "$lib/$libdir/libvhost-pci-device.so.1"
report_size "$dev/$libdir/libvhost-pci-device.a"
