#!/bin/sh
# Builds OUT (libvhost-pci-device.a) from a SwiftPM build of the shared
# library (the product vhost-pci-device in BUILD_DIR, e.g. .build/debug):
# a C program links it with `pkg-config --static --libs vhost-pci-device`
# and needs no Swift toolchain.
#
# The archive holds one relocatable object: the library's own objects, the
# Swift runtime's section registration (swiftrt.o, which nothing references,
# so an archive member would never be pulled in) and the members of the
# static Swift runtime they need. Every symbol but the vpd_* API is made
# local, so the copy of the Swift runtime inside cannot clash with the
# application's own symbols (or another library's Swift runtime).
#   sh packaging/lib/static-lib.sh BUILD_DIR OUT
set -eu
build=${1:?usage: packaging/lib/static-lib.sh BUILD_DIR OUT}
out=${2:?usage: packaging/lib/static-lib.sh BUILD_DIR OUT}
objects="$build/vhost-pci-device.product/Objects.LinkFileList"
[ -f "$objects" ] || { echo "static-lib: no $objects (swift build --product vhost-pci-device)"; exit 1; }
resources=$(swift -print-target-info | sed -n 's/.*"runtimeResourcePath": "\(.*\)".*/\1/p')
static="${resources%/swift}/swift_static/linux"
[ -f "$static/x86_64/swiftrt.o" ] || [ -f "$static/$(uname -m)/swiftrt.o" ] || { echo "static-lib: no static Swift runtime in $static"; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# Objects.LinkFileList names one object per line, quoted when it must be.
sed -e 's/^"\(.*\)"$/\1/' "$objects" > "$stage/objects"
# shellcheck disable=SC2046 # one word per object path (paths without spaces)
ld -r -o "$stage/vhost-pci-device.o" $(cat "$stage/objects") "$static/$(uname -m)/swiftrt.o" -L"$static" \
  --start-group -lswiftCore -lswift_Concurrency -lswiftSynchronization -lswiftGlibc -lswiftDispatch -ldispatch \
  -lBlocksRuntime -lFoundationEssentials -l_FoundationCShims -l_FoundationCollections -lswift_StringProcessing \
  -lswift_RegexParser -lswiftSwiftOnoneSupport -lswift_Builtin_float --end-group
objcopy --wildcard --keep-global-symbol='vpd_*' --strip-debug --remove-section=.comment \
  --remove-section=.note "$stage/vhost-pci-device.o"
undefined=$(nm -u "$stage/vhost-pci-device.o" | awk '{ print $2 }' | grep -v -e '^__start_' -e '^__stop_' | grep -c '^\$s' || true)
[ "$undefined" -eq 0 ] || { nm -u "$stage/vhost-pci-device.o" | grep '\$s' | head; echo "static-lib: $undefined Swift symbols left undefined"; exit 1; }
rm -f "$out"
ar rcsD "$out" "$stage/vhost-pci-device.o"
echo "static-lib: $out ($(stat -c %s "$out") bytes)"
