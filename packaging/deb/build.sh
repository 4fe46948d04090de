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
. packaging/deb/common.sh
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# A binary that links swift-argument-parser carries FoundationEssentials and
# the Swift runtime: 13.4 MB for a hello world built like this; the daemon
# is about 15.3 MB (14.6 MiB).
max_binary=$((15 << 20))
# Smaller binaries, for this build only (an executable is the whole link
# unit): public symbols may be internalized and each function gets its own
# section, so --gc-sections drops the library code the binary never calls
# (Swift otherwise marks every public symbol as used); lld packs the
# relative relocations (DT_RELR: glibc 2.36, Debian 12) and exports nothing.
lean="-Xswiftc -Xfrontend -Xswiftc -internalize-at-link -Xswiftc -Xfrontend -Xswiftc -function-sections
  -Xswiftc -use-ld=lld -Xlinker -z -Xlinker pack-relative-relocs -Xlinker --no-export-dynamic"
# libstdc++ linked in statically too: the Swift runtime calls a few of its
# functions (strings, a hash table, operator new, __cxa_demangle). Loaded as
# a shared library it kept about 1 MiB of each process resident (its symbol
# tables, read when it is relocated) for 74 KB of code. The runtime's
# `-lstdc++` finds the archive first in this directory (a -L ahead of GCC's).
cxx="$PWD/.build-static/static-libstdc++"
mkdir -p "$cxx"
archive=$(cc -print-file-name=libstdc++.a)
[ -f "$archive" ] || fail "no libstdc++.a (libstdc++-12-dev, which g++ installs: make check-deps)"
ln -sf "$archive" "$cxx/libstdc++.a"
lean="$lean -Xswiftc -L$cxx"
# And libgcc's unwinder (libgcc_eh) rather than libgcc_s.so: one shared
# library less to load and relocate (about 0.1 MiB resident), 25 KB of code.
lean="$lean -Xswiftc -Xclang-linker -Xswiftc -static-libgcc"
for p in vhost-pci-bridged vhost-pci-bridgectl generate-manual; do
  # The exit status, not a pipeline's last command: a failed build must not
  # package a stale binary.
  # shellcheck disable=SC2086 # $lean is a list of flags
  if ! swift build -c release --static-swift-stdlib --build-path .build-static $lean --product "$p" > "$stage/build.log" 2>&1; then
    cat "$stage/build.log"; fail "building $p failed"
  fi
  tail -1 "$stage/build.log"
done
pkg="$stage/pkg"
make -s install-files DESTDIR="$pkg" PREFIX=/usr SYSCONFDIR=/etc UNITDIR=/lib/systemd/system QEMU_DISCOVERY_DIR=/usr/share/qemu/vhost-user \
  RELEASE_DIR=.build-static/release MANUAL_TOOL=.build-static/release/generate-manual >/dev/null
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$pkg"/usr/bin/*
for b in "$pkg"/usr/bin/*; do
  if readelf -d "$b" | grep -Eq 'NEEDED.*(libstdc\+\+|libgcc_s)'; then fail "$(basename "$b") loads libstdc++.so or libgcc_s.so: it should have them linked in"; fi
  report_size "$b"
  [ "$bytes" -le "$max_binary" ] || fail "$(basename "$b") is $bytes bytes, more than the limit of $max_binary ($(mb "$max_binary"))"
done
doc="$pkg/usr/share/doc/vhost-pci-bridge"
install -m 0644 packaging/deb/copyright "$doc/copyright"
gzip -9n -c packaging/deb/changelog > "$doc/changelog.gz"
install -d "$pkg/usr/share/lintian/overrides"
install -m 0644 packaging/deb/lintian-overrides "$pkg/usr/share/lintian/overrides/vhost-pci-bridge"
depends=$(shlib_depends "$stage" vhost-pci-bridge "$pkg/usr/bin/vhost-pci-bridged" "$pkg/usr/bin/vhost-pci-bridgectl")
# Packed relative relocations need glibc 2.36 (the version GLIBC_ABI_DT_RELR,
# which names no symbol, so dpkg-shlibdeps does not count it).
if readelf -V "$pkg"/usr/bin/* | grep -q GLIBC_ABI_DT_RELR; then
  depends=$(echo "$depends" | sed -E 's/libc6 \(>= 2\.([0-9]|[12][0-9]|3[0-5])(\.[0-9]+)*\)/libc6 (>= 2.36)/')
fi
install -d "$pkg/DEBIAN"
echo /etc/vhost-pci-bridged.yaml > "$pkg/DEBIAN/conffiles"
control_and_sums "$pkg" packaging/deb/control "$depends"
build_deb "$pkg" "$out/vhost-pci-bridge_${version}_${arch}.deb" "Depends: $depends"
sh packaging/deb/lib.sh "$out"
