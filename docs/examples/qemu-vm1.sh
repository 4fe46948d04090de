#!/bin/sh
# VM1 for the bridge "net0" in iommu mode, as QEMU's own command line: shared
# memfd memory (the daemon maps it), a vIOMMU with device-IOTLB, the
# vhost-user socket as a reconnecting client (QEMU reconnects after a daemon
# restart), two queue pairs. For an identity-mode bridge drop the
# intel-iommu device and iommu_platform/ats. Extra arguments go to QEMU.
# `make interop` runs this very file against a daemon (with QEMU_ACCEL=tcg).
exec qemu-system-x86_64 -accel "${QEMU_ACCEL:-kvm}" -machine q35 -m 4G \
  -object memory-backend-memfd,id=mem,size=4G,share=on -numa node,memdev=mem \
  -device intel-iommu,intremap=off,caching-mode=on,device-iotlb=on \
  -chardev socket,id=vpb0,path="${SOCKET:-/run/vhost-pci-bridged/net0-vm1.sock}",reconnect=1 \
  -netdev vhost-user,id=net0,chardev=vpb0,queues=2 \
  -device virtio-net-pci,netdev=net0,mq=on,vectors=6,disable-legacy=on,iommu_platform=on,ats=on \
  "$@"
