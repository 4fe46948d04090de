#!/bin/sh
# Builds OUT (libvhost-pci-device.a) from a SwiftPM build of the shared
# library (the product vhost-pci-device in BUILD_DIR, e.g. .build/debug):
# a C or C++ program links it with `pkg-config --libs vhost-pci-device-static`
# and needs no Swift toolchain.
#
# The archive holds one relocatable object: the library's own objects, the
# Swift runtime's section registration (swiftrt.o, which nothing references,
# so an archive member would never be pulled in) and the members of the
# static Swift runtime they need. COMDAT groups are dissolved (a program's
# own copy of, say, a libstdc++ template must not discard ours while our
# code points at it), then every symbol but the vpd_* API is made local, so
# the application's symbols cannot clash with the Swift runtime inside. One
# Swift runtime per executable: a Swift program, or a second library built
# this way, would see this one's metadata too (swiftrt.o's section bounds
# are the executable's).
#   sh packaging/lib/static-lib.sh BUILD_DIR OUT    (SWIFT names the toolchain's swift)
set -eu
build=${1:?usage: packaging/lib/static-lib.sh BUILD_DIR OUT}
out=${2:?usage: packaging/lib/static-lib.sh BUILD_DIR OUT}
objects="$build/vhost-pci-device.product/Objects.LinkFileList"
[ -f "$objects" ] || { echo "static-lib: no $objects (swift build --product vhost-pci-device)"; exit 1; }
info=$("${SWIFT:-swift}" -print-target-info)
resources=$(echo "$info" | sed -n 's/.*"runtimeResourcePath": "\(.*\)".*/\1/p')
arch=$(echo "$info" | sed -n 's/.*"unversionedTriple": "\([^-]*\)-.*/\1/p' | head -1)
static="${resources%/swift}/swift_static/linux"
[ -f "$static/$arch/swiftrt.o" ] || { echo "static-lib: no static Swift runtime for $arch in $static"; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# Objects.LinkFileList is a response file (one object per line, quoted
# when it must be), which ld reads itself.
ld -r --force-group-allocation -o "$stage/vhost-pci-device.o" @"$objects" "$static/$arch/swiftrt.o" -L"$static" \
  --start-group -lswiftCore -lswift_Concurrency -lswiftSynchronization -lswiftGlibc -lswiftDispatch -ldispatch \
  -lBlocksRuntime -lFoundationEssentials -l_FoundationCShims -l_FoundationCollections -lswift_StringProcessing \
  -lswift_RegexParser -lswiftSwiftOnoneSupport -lswift_Builtin_float --end-group
objcopy --wildcard --keep-global-symbol='vpd_*' --strip-debug --remove-section=.comment \
  --remove-section=.note "$stage/vhost-pci-device.o"
groups=$(readelf -g "$stage/vhost-pci-device.o" | grep -c '^COMDAT group' || true)
[ "$groups" -eq 0 ] || { echo "static-lib: $groups COMDAT groups left in the object"; exit 1; }
undefined=$(nm -u "$stage/vhost-pci-device.o" | awk '{ print $2 }' | grep -v -e '^__start_' -e '^__stop_' | grep -c '^\$s' || true)
[ "$undefined" -eq 0 ] || { nm -u "$stage/vhost-pci-device.o" | grep '\$s' | head; echo "static-lib: $undefined Swift symbols left undefined"; exit 1; }
rm -f "$out"
ar rcsD "$out" "$stage/vhost-pci-device.o"
echo "static-lib: $out ($(stat -c %s "$out") bytes)"
