#!/bin/sh
# Builds OUTDIR/vhost-pci-bridge_VERSION_ARCH.deb: what `make install` installs
# (PREFIX=/usr), from a release build with the Swift runtime linked in
# statically, so the package needs no Swift toolchain; then the library's
# two packages (packaging/deb/lib.sh). Dependencies come
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
# Size limits, and what they guard: no Foundation in what the package installs
# (ICU's data alone is 30 MB). A binary that links swift-argument-parser
# carries FoundationEssentials and the Swift runtime: 13.4 MB for a hello
# world built like this; the daemon is about 15.2 MB (14.5 MiB).
max_binary=$((15 << 20))
max_deb=$((10 << 20))
# Smaller binaries, for this build only (an executable is the whole link
# unit): public symbols may be internalized and each function gets its own
# section, so --gc-sections drops the library code the binary never calls
# (Swift otherwise marks every public symbol as used); lld packs the
# relative relocations (DT_RELR: glibc 2.36, Debian 12) and exports nothing.
lean="-Xswiftc -Xfrontend -Xswiftc -internalize-at-link -Xswiftc -Xfrontend -Xswiftc -function-sections
  -Xswiftc -use-ld=lld -Xlinker -z -Xlinker pack-relative-relocs -Xlinker --no-export-dynamic"
for p in vhost-pci-bridged vhost-pci-bridgectl generate-manual; do
  # The exit status, not a pipeline's last command: a failed build must not
  # package a stale binary.
  # shellcheck disable=SC2086 # $lean is a list of flags
  if ! swift build -c release --static-swift-stdlib --build-path .build-static $lean --product "$p" > "$stage/build.log" 2>&1; then
    cat "$stage/build.log"; echo "make deb: building $p failed"; exit 1
  fi
  tail -1 "$stage/build.log"
done
pkg="$stage/pkg"
make -s install-files DESTDIR="$pkg" PREFIX=/usr SYSCONFDIR=/etc UNITDIR=/lib/systemd/system QEMU_DISCOVERY_DIR=/usr/share/qemu/vhost-user \
  RELEASE_DIR=.build-static/release MANUAL_TOOL=.build-static/release/generate-manual >/dev/null
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$pkg"/usr/bin/*
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB, %.1f MiB", b / 1000000, b / 1048576 }'; }
for b in "$pkg"/usr/bin/*; do
  name=$(basename "$b")
  bytes=$(stat -c %s "$b")
  echo "make deb: $name: $bytes bytes ($(mb "$bytes"))"
  if grep -a -q -e icudt -e _ZN6icu_ -e NSRegularExpression "$b"; then
    echo "make deb: $name links ICU (Foundation): the packaged binaries must link FoundationEssentials at most"; exit 1
  fi
  [ "$bytes" -le "$max_binary" ] || { echo "make deb: $name is $bytes bytes, more than the limit of $max_binary ($(mb "$max_binary"))"; exit 1; }
done
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
# Packed relative relocations need glibc 2.36 (the version GLIBC_ABI_DT_RELR,
# which names no symbol, so dpkg-shlibdeps does not count it).
if readelf -V "$pkg"/usr/bin/* | grep -q GLIBC_ABI_DT_RELR; then
  depends=$(echo "$depends" | sed -E 's/libc6 \(>= 2\.([0-9]|[12][0-9]|3[0-5])(\.[0-9]+)*\)/libc6 (>= 2.36)/')
fi
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
bytes=$(stat -c %s "$deb")
[ "$bytes" -le "$max_deb" ] || { echo "make deb: $deb is $bytes bytes, more than the limit of $max_deb ($(mb "$max_deb"))"; exit 1; }
echo "built $deb ($bytes bytes, $(mb "$bytes"); Depends: $depends)"
sh packaging/deb/lib.sh "$out"
