#!/bin/sh
# Checks the package `make deb` built in DIR: lintian reports no error or
# warning; it installs into a scratch root with dpkg (no chroot, no
# maintainer scripts); the installed files are exactly packaging/deb/files.txt;
# the installed unit passes `systemd-analyze verify` and the security check;
# the installed binaries run (--version) without a Swift toolchain on the
# library path; the discovery file names the installed daemon.
#   sh packaging/deb/check.sh DIR
set -eu
dir=${1:?usage: packaging/deb/check.sh DIR}
cd "$(dirname "$0")/../.."
version=$(sed -n 's/.*static let version = "\(.*\)".*/\1/p' Sources/BridgeCore/BuildInfo.swift)
deb="$dir/vhost-pci-bridge_${version}_$(dpkg --print-architecture).deb"
[ -f "$deb" ] || { echo "deb-check: FAILED: no $deb (make deb)"; exit 1; }
fail() { echo "deb-check: FAILED: $*"; exit 1; }

lintian --allow-root --fail-on error,warning --tag-display-limit 0 "$deb" || fail "lintian"
echo "deb-check: lintian clean (no errors, no warnings)"

root=$(mktemp -d)
pids=""
# Whatever this started is stopped when it ends, however it ends.
trap 'for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done; rm -rf "$root"' EXIT
# The daemon honours STATE_DIRECTORY (bridges made with create are kept
# there); these runs keep nothing outside the scratch root.
unset STATE_DIRECTORY
# Starts the installed daemon on the scratch root's production config and
# waits until its control socket answers (it exists at bind, before listen).
start_daemon() {
  "$root/usr/bin/vhost-pci-bridged" --config "$root/etc/vhost-pci-bridged.yaml" --runtime-directory "$root/run" \
    --control-socket "$root/run/c.sock" 2> "$root/daemon.log" &
  pid=$!
  pids="$pids $pid"
  for _ in $(seq 100); do
    "$root/usr/bin/vhost-pci-bridgectl" list --socket "$root/run/c.sock" > /dev/null 2>&1 && return 0
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
  done
  cat "$root/daemon.log"; fail "the installed daemon did not answer on its control socket"
}
# Stops it (SIGTERM) and fails unless it exits 0 within 30 s.
stop_daemon() {
  kill -TERM $pid
  for _ in $(seq 300); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  kill -0 $pid 2>/dev/null && { kill -KILL $pid; cat "$root/daemon.log"; fail "the daemon did not stop within 30 s of SIGTERM"; }
  wait $pid || { cat "$root/daemon.log"; fail "the daemon did not stop cleanly"; }
}
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates"
: > "$root/var/lib/dpkg/status"
: > "$root/var/lib/dpkg/available"
# --force-depends: the scratch root has no libc; dpkg still unpacks and
# configures, and the binaries run with the host's libraries.
dpkg --root="$root" --log=/dev/null --force-depends --force-not-root -i "$deb" > "$root/dpkg.log" 2>&1 || { cat "$root/dpkg.log"; fail "dpkg -i into a scratch root"; }
dpkg --root="$root" -L vhost-pci-bridge | while read -r f; do [ -d "$root$f" ] || echo "$f"; done | LC_ALL=C sort > "$root/files"
diff -u packaging/deb/files.txt "$root/files" || fail "the installed files differ from packaging/deb/files.txt"
echo "deb-check: installed $(wc -l < "$root/files") files, as listed"

for b in vhost-pci-bridged vhost-pci-bridgectl; do
  got=$(env -u LD_LIBRARY_PATH "$root/usr/bin/$b" --version) || fail "$b --version"
  [ "$got" = "$version" ] || fail "$b --version printed '$got', not $version"
  ldd "$root/usr/bin/$b" | grep -q libswiftCore && fail "$b links the Swift runtime dynamically"
done
echo "deb-check: both binaries run and print $version"

# Man pages and completions come from the argument parser: they name the
# options --help names.
zcat "$root/usr/share/man/man1/vhost-pci-bridged.1.gz" | grep -q -- "-cpu-affinity" || fail "the daemon's man page lacks --cpu-affinity"
zcat "$root/usr/share/man/man1/vhost-pci-bridgectl.1.gz" | grep -q "reload" || fail "the CLI's man page lacks reload"
grep -q -- "--state-directory" "$root/usr/share/bash-completion/completions/vhost-pci-bridged" || fail "bash completion"
grep -q "state-directory" "$root/usr/share/zsh/vendor-completions/_vhost-pci-bridged" || fail "zsh completion"
grep -q "state-directory" "$root/usr/share/fish/vendor_completions.d/vhost-pci-bridged.fish" || fail "fish completion"
man -l "$root/usr/share/man/man1/vhost-pci-bridged.1.gz" > /dev/null 2>&1 || fail "man cannot render the daemon's page"
echo "deb-check: man pages and completions name the current options"

[ "$("$root/usr/bin/vhost-pci-bridged" --print-capabilities)" = '{"type": "net"}' ] || fail "--print-capabilities"
grep -q '"binary": "/usr/bin/vhost-pci-bridged"' "$root/usr/share/qemu/vhost-user/50-vhost-pci-bridged.json" || fail "discovery file binary path"
grep -q '"type": "net"' "$root/usr/share/qemu/vhost-user/50-vhost-pci-bridged.json" || fail "discovery file type"
start_daemon
listed=$("$root/usr/bin/vhost-pci-bridgectl" list --socket "$root/run/c.sock" --json) || fail "the installed CLI reaching the installed daemon"
stop_daemon
echo "$listed" | tr -d ' \n' | grep -q '"result":\[\]' || fail "the production config starts bridges: $listed"
echo "deb-check: the production config runs with no bridge; the CLI reaches the daemon"

unit="$root/lib/systemd/system/vhost-pci-bridged.service"
grep -q "^ExecStart=/usr/bin/vhost-pci-bridged --config /etc/vhost-pci-bridged.yaml$" "$unit" || fail "ExecStart in the installed unit"
grep -q "^ExecReload=/usr/bin/vhost-pci-bridgectl reload$" "$unit" || fail "ExecReload in the installed unit"
if command -v systemd-analyze > /dev/null; then
  sed "s|/usr/bin/|$root/usr/bin/|g" "$unit" > "$root/check.service"
  out=$(systemd-analyze verify "$root/check.service" 2>&1) || fail "systemd-analyze verify: $out"
  [ -z "$out" ] || fail "systemd-analyze verify: $out"
  echo "deb-check: the installed unit verifies clean"
else
  echo "deb-check: systemd-analyze is not installed: the unit's verify SKIPPED (apt-get install systemd)"
fi

# libvhost-pci-device1 and libvhost-pci-device-dev: lintian clean; installed
# beside the daemon's package, exactly packaging/deb/lib-files.txt; the C
# examples build from the installed header with the installed pkg-config
# files (the counter against the shared library, the forwarder against the
# static one) and serve VM2 of a bridge the installed daemon runs.
arch=$(dpkg --print-architecture)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
libdebs="$dir/libvhost-pci-device1_${version}_$arch.deb $dir/libvhost-pci-device-dev_${version}_$arch.deb"
# shellcheck disable=SC2086 # two paths without spaces
lintian --allow-root --fail-on error,warning --tag-display-limit 0 $libdebs || fail "lintian on the library's packages"
echo "deb-check: the library's packages are lintian clean"
# shellcheck disable=SC2086
dpkg --root="$root" --log=/dev/null --force-depends --force-not-root -i $libdebs > "$root/dpkg.log" 2>&1 || { cat "$root/dpkg.log"; fail "dpkg -i of the library's packages"; }
for p in libvhost-pci-device1 libvhost-pci-device-dev; do
  dpkg --root="$root" -L $p | while read -r f; do [ -d "$root$f" ] || echo "$f"; done
done | sed "s|/$multiarch/|/MULTIARCH/|" | LC_ALL=C sort > "$root/lib-files"
diff -u packaging/deb/lib-files.txt "$root/lib-files" || fail "the library's installed files differ from packaging/deb/lib-files.txt"
readelf -d "$root/usr/lib/$multiarch/libvhost-pci-device.so.1" | grep -q 'SONAME.*\[libvhost-pci-device\.so\.1\]' || fail "the shared library's SONAME"
ldd "$root/usr/lib/$multiarch/libvhost-pci-device.so.1" | grep -q libswift && fail "the shared library links the Swift runtime dynamically"
echo "deb-check: installed $(wc -l < "$root/lib-files") library files, as listed"
export PKG_CONFIG_LIBDIR="$root/usr/lib/$multiarch/pkgconfig"
pc="--define-variable=libdir=$root/usr/lib/$multiarch --define-variable=includedir=$root/usr/include"
examples="$root/usr/share/doc/libvhost-pci-device-dev/examples"
# shellcheck disable=SC2046,SC2086 # pkg-config prints flags; $pc is two options
cc -std=c11 -O2 -Wall -Wextra -Werror -o "$root/vpd-counter" "$examples/counter.c" $(pkg-config $pc --cflags --libs vhost-pci-device) \
  || fail "the counter does not build with pkg-config vhost-pci-device"
# shellcheck disable=SC2046,SC2086
cc -std=c11 -O2 -Wall -Wextra -Werror -o "$root/vpd-forwarder" "$examples/forwarder.c" $(pkg-config $pc --cflags --libs vhost-pci-device-static) \
  || fail "the forwarder does not build with pkg-config vhost-pci-device-static"
ldd "$root/vpd-forwarder" | grep -q -e libvhost-pci-device -e libswift && fail "the statically linked forwarder loads a shared library of ours"
# shellcheck disable=SC2046,SC2086
g++ -std=c++17 -O0 -Wall -Werror -o "$root/vpd-link-check" packaging/lib/link-check.cc $(pkg-config $pc --cflags --libs vhost-pci-device-static) \
  || fail "a C++ program does not link with the static library"
"$root/vpd-link-check" > /dev/null || fail "the C++ program linked with the static library did not run"
unset PKG_CONFIG_LIBDIR
start_daemon
"$root/usr/bin/vhost-pci-bridgectl" create capi --socket "$root/run/c.sock" --bar-size 1G \
  --vhost-user-socket "$root/run/capi-vm1.sock" --peer-socket "$root/run/capi-vm2.sock" > /dev/null \
  || { cat "$root/daemon.log"; fail "creating a bridge for the C examples"; }
for e in counter forwarder; do
  # timeout: a stop that hangs fails here (exit 124) instead of stalling.
  LD_LIBRARY_PATH="$root/usr/lib/$multiarch" timeout -k 5 60 "$root/vpd-$e" "$root/run/capi-vm2.sock" > "$root/$e.out" 2>&1 &
  c=$!
  pids="$pids $c"
  for _ in $(seq 100); do grep -q "connected to" "$root/$e.out" && break; kill -0 $c 2>/dev/null || break; sleep 0.1; done
  kill -TERM $c 2>/dev/null || true
  status=0; wait $c || status=$?
  { grep -q "connected to" "$root/$e.out" && [ $status -eq 0 ]; } || { cat "$root/$e.out"; fail "vpd-$e did not serve the bridge's VM2 (exit $status)"; }
done
stop_daemon
echo "deb-check: the C examples build from the installed packages (shared and static) and serve a bridge's VM2; a C++ program links the static library"
