#!/bin/sh
# Builds OUTDIR/vhost-pci-bridge_VERSION_ARCH.deb: what `make install` installs
# (PREFIX=/usr), from a release build with the Swift runtime linked in
# statically, so the package needs no Swift toolchain. Dependencies come
# from dpkg-shlibdeps; no maintainer scripts (the unit is not enabled by the
# package: docs/operating.md).
#   sh packaging/deb/build.sh OUTDIR
set -eu
out=${1:?usage: packaging/deb/build.sh OUTDIR}
cd "$(dirname "$0")/../.."
root=$(pwd)
version=$(sed -n 's/.*static let version = "\(.*\)".*/\1/p' Sources/BridgeCore/BuildInfo.swift)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for p in vhost-pci-bridged vhost-pci-bridgectl generate-manual; do
  # The exit status, not a pipeline's last command: a failed build must not
  # package a stale binary.
  if ! swift build -c release --static-swift-stdlib --build-path .build-static --product "$p" > "$stage/build.log" 2>&1; then
    cat "$stage/build.log"; echo "make deb: building $p failed"; exit 1
  fi
  tail -1 "$stage/build.log"
done
pkg="$stage/pkg"
make -s install-files DESTDIR="$pkg" PREFIX=/usr SYSCONFDIR=/etc UNITDIR=/lib/systemd/system QEMU_DISCOVERY_DIR=/usr/share/qemu/vhost-user \
  RELEASE_DIR=.build-static/release MANUAL_TOOL=.build-static/release/generate-manual >/dev/null
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$pkg"/usr/bin/*
doc="$pkg/usr/share/doc/vhost-pci-bridge"
install -m 0644 packaging/deb/copyright "$doc/copyright"
gzip -9n -c packaging/deb/changelog > "$doc/changelog.gz"
install -d "$pkg/usr/share/lintian/overrides"
install -m 0644 packaging/deb/lintian-overrides "$pkg/usr/share/lintian/overrides/vhost-pci-bridge"
# dpkg-shlibdeps wants a debian/control to read: a minimal one.
mkdir -p "$stage/src/debian"
printf 'Source: vhost-pci-bridge\n\nPackage: vhost-pci-bridge\nArchitecture: any\n' > "$stage/src/debian/control"
(cd "$stage/src" && dpkg-shlibdeps -O -e"$pkg/usr/bin/vhost-pci-bridged" -e"$pkg/usr/bin/vhost-pci-bridgectl") > "$stage/shlibs" 2> "$stage/shlibs.err" \
  || { cat "$stage/shlibs.err"; echo "make deb: dpkg-shlibdeps failed"; exit 1; }
depends=$(sed -n 's/^shlibs:Depends=//p' "$stage/shlibs")
case "$depends" in *libc6*) ;; *) echo "make deb: no libc6 in the computed Depends ('$depends')"; exit 1 ;; esac
install -d "$pkg/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@DEPENDS@/$depends/" -e "s/@SIZE@/$size/" \
  packaging/deb/control > "$pkg/DEBIAN/control"
echo /etc/vhost-pci-bridged.yaml > "$pkg/DEBIAN/conffiles"
(cd "$pkg" && find . -type f ! -path './DEBIAN/*' -printf '%P\n' | LC_ALL=C sort | xargs md5sum > DEBIAN/md5sums)
chmod 0644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/conffiles" "$pkg/DEBIAN/md5sums"
find "$pkg" -type d -exec chmod 0755 {} +
mkdir -p "$out"
deb="$out/vhost-pci-bridge_${version}_${arch}.deb"
fakeroot dpkg-deb --build -Zxz "$pkg" "$deb" >/dev/null
echo "built $deb ($(du -h "$deb" | cut -f1); Depends: $depends)"
