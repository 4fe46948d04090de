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
version=$(sed -n 's/.*static let version = "\(.*\)".*/\1/p' Sources/BridgeCore/BuildInfo.swift)
arch=$(dpkg --print-architecture)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
max_deb=$((10 << 20))
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB, %.1f MiB", b / 1000000, b / 1048576 }'; }
fail() { echo "make deb: $*"; exit 1; }

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

# What the shared library needs, for its Depends.
mkdir -p "$stage/src/debian"
printf 'Source: vhost-pci-bridge\n\nPackage: libvhost-pci-device1\nArchitecture: any\n' > "$stage/src/debian/control"
(cd "$stage/src" && dpkg-shlibdeps -O -e"$lib/$libdir/libvhost-pci-device.so.1") > "$stage/shlibs" 2> "$stage/shlibs.err" \
  || { cat "$stage/shlibs.err"; fail "dpkg-shlibdeps failed"; }
depends=$(sed -n 's/^shlibs:Depends=//p' "$stage/shlibs")
case "$depends" in *libc6*) ;; *) fail "no libc6 in the library's computed Depends ('$depends')" ;; esac

for p in libvhost-pci-device1 libvhost-pci-device-dev; do
  pkg="$stage/$p"
  doc="$pkg/usr/share/doc/$p"
  install -d "$doc" "$pkg/DEBIAN"
  install -m 0644 packaging/deb/copyright "$doc/copyright"
  gzip -9n -c packaging/deb/changelog > "$doc/changelog.gz"
  template=packaging/deb/control-lib
  [ "$p" = libvhost-pci-device1 ] || template=packaging/deb/control-dev
  size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
  sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@DEPENDS@/$depends/" -e "s/@SIZE@/$size/" "$template" > "$pkg/DEBIAN/control"
  (cd "$pkg" && find . -type f ! -path './DEBIAN/*' -printf '%P\n' | LC_ALL=C sort | xargs md5sum > DEBIAN/md5sums)
done
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
find "$stage/libvhost-pci-device1" "$stage/libvhost-pci-device-dev" -path '*/DEBIAN/*' -type f -exec chmod 0644 {} +
find "$stage/libvhost-pci-device1" "$stage/libvhost-pci-device-dev" -type d -exec chmod 0755 {} +
mkdir -p "$out"
for p in libvhost-pci-device1 libvhost-pci-device-dev; do
  deb="$out/${p}_${version}_${arch}.deb"
  fakeroot dpkg-deb --build -Zxz "$stage/$p" "$deb" >/dev/null
  bytes=$(stat -c %s "$deb")
  [ "$bytes" -le "$max_deb" ] || fail "$deb is $bytes bytes, more than the limit of $max_deb ($(mb "$max_deb"))"
  echo "built $deb ($bytes bytes, $(mb "$bytes"))"
done
for f in "$lib/$libdir/libvhost-pci-device.so.1" "$dev/$libdir/libvhost-pci-device.a"; do
  bytes=$(stat -c %s "$f")
  echo "make deb: $(basename "$f"): $bytes bytes ($(mb "$bytes"))"
  if grep -a -q -e icudt -e _ZN6icu_ -e NSRegularExpression "$f"; then fail "$(basename "$f") links ICU (Foundation)"; fi
done
