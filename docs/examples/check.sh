#!/bin/sh
# Checks the deployment recipes in docs/examples against the real tools.
#   sh docs/examples/check.sh xml              libvirt's schema (virt-xml-validate)
#   sh docs/examples/check.sh qemu DAEMON      QEMU runs qemu-vm1.sh (TCG, paused) against
#                                              the daemon; the vhost-user negotiation
#                                              completes with nothing refused
set -eu
here=$(cd "$(dirname "$0")" && pwd)
case "${1:?usage: check.sh xml | qemu PATH-TO-vhost-pci-bridged}" in
xml)
  virt-xml-validate "$here/libvirt-vm1.xml" domain
  ;;
qemu)
  daemon=${2:?the daemon binary}
  tmp=$(mktemp -d)
  trap 'kill $dpid 2>/dev/null || true; rm -rf "$tmp"' EXIT
  "$daemon" --socket-path "$tmp/net0-vm1.sock" --name net0 --bar-size 64G --mode iommu \
    --peer-socket "$tmp/vm2.sock" --log-level info 2> "$tmp/daemon.log" &
  dpid=$!
  for _ in $(seq 100); do [ -S "$tmp/net0-vm1.sock" ] && break; sleep 0.1; done
  QEMU_ACCEL=tcg SOCKET="$tmp/net0-vm1.sock" timeout 15 "$here/qemu-vm1.sh" -S -display none -nodefaults \
    -monitor none -serial none > "$tmp/qemu.log" 2>&1 &
  qpid=$!
  for _ in $(seq 150); do grep -q "front end connected" "$tmp/daemon.log" && break; sleep 0.1; done
  sleep 2   # the negotiation of every queue pair
  kill $qpid 2>/dev/null || true
  wait $qpid 2>/dev/null || true
  for _ in $(seq 50); do grep -q "session ended" "$tmp/daemon.log" && break; sleep 0.1; done
  if grep -v "terminating on signal" "$tmp/qemu.log" | grep -q .; then cat "$tmp/qemu.log"; echo "qemu-vm1.sh: QEMU refused the line"; exit 1; fi
  line=$(grep "session ended" "$tmp/daemon.log") || { cat "$tmp/daemon.log"; echo "qemu-vm1.sh: QEMU never talked to the daemon"; exit 1; }
  requests=$(echo "$line" | sed -n 's/.*; \([0-9]*\) requests, \([0-9]*\) refused.*/\1/p')
  refused=$(echo "$line" | sed -n 's/.*; \([0-9]*\) requests, \([0-9]*\) refused.*/\2/p')
  [ "${requests:-0}" -ge 10 ] && [ "${refused:-1}" -eq 0 ] || { cat "$tmp/daemon.log"; echo "qemu-vm1.sh: negotiation incomplete"; exit 1; }
  echo "qemu-vm1.sh: QEMU negotiated with the daemon ($requests vhost-user requests, none refused)"
  ;;
*) echo "usage: check.sh xml | qemu PATH-TO-vhost-pci-bridged"; exit 2 ;;
esac
