#!/usr/bin/env python3
"""Live migration of the Linux guest (interop/linux-guest) whose virtio-net is
served by a vhost-user back end: the DPDK reference.

    source QEMU (TCG)      <-vhost-user->  testpmd A (net_vhost0, 5tswap: echoes the guest's datagrams)
        |  migrate (QMP), RAM + device state over a unix socket
    destination QEMU (TCG, -incoming)  <-vhost-user->  testpmd B (same arguments)

The guest runs in vpb.mode=both: for --seconds it sends UDP datagrams (its own
"VPBG" format, from and to port 9999, to 10.0.0.2) and counts/checks what
arrives on port 9999: testpmd in 5tswap echoes every datagram back, so the
guest sees its own sequence numbers and reports what the switch-over lost.
Once the guest's receiver has run --migrate-after seconds the script migrates
it, polls query-migrate until completed, quits the source and waits for the
guest's report on the destination's console (the serial console moves with the
guest: the report is on the destination QEMU's stdout).

Prints one summary line (status, total/setup/down time, the guest's report) and
exits 0 when the migration completed and the guest reported from the
destination. Everything runs in a temporary directory (kept with --keep);
every child is killed at the end; each step has a timeout.

    python3 interop/migration/migrate-dpdk.py [--iommu] [--seconds 20] [--migrate-after 5]
        [--size 512] [--vhost-debug] [--keep]

Needs qemu-system-x86_64, dpdk-testpmd and the built guest (.build/linux-guest,
or $VPB_LINUX_GUEST). No KVM, no hugepages, no root.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = os.environ.get("VPB_LINUX_GUEST", os.path.join(HERE, "..", "..", ".build", "linux-guest"))
GUEST_MAC = "52:54:00:00:00:01"


def qemu_args(sock, qmp, iommu, seconds, size, incoming=None):
    """The QEMU line of LinuxGuest.qemuArguments (q35 TCG, 256 MiB shared
    memfd, vhost-user virtio-net on INTx), guest in both mode, plus a QMP
    socket and, on the destination, -incoming. Source and destination must
    have identical device arguments."""
    device = f"virtio-net-pci,netdev=n0,mac={GUEST_MAC},romfile=,vectors=0"
    append = f"console=ttyS0 panic=-1 loglevel=4 vpb.count=0 vpb.size={size} vpb.seconds={seconds} vpb.mode=both"
    args = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "256",
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c0"]
    if iommu:
        args += ["-device", "intel-iommu"]
        device += ",iommu_platform=on,disable-legacy=on"
        append += " intel_iommu=on iommu.strict=1"
    args += ["-device", device, "-kernel", os.path.join(GUEST, "vmlinuz"), "-initrd", os.path.join(GUEST, "initrd.cpio.gz"),
             "-append", append, "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio", "-display", "none",
             "-qmp", f"unix:{qmp},server=on,wait=off"]
    if incoming:
        args += ["-incoming", incoming]
    return args


def testpmd_args(name, sock, iommu, size, debug, mode):
    """DPDK's vhost back end (server: it creates the socket). 5tswap (the
    default) echoes each of the guest's datagrams back with MACs, IPs and
    ports swapped: 10.0.0.2:9999 -> 10.0.0.1:9999, the port the guest sends
    from and counts on, so the guest checks its own sequence numbers across
    the migration. txonly sends its own UDP frames to the guest's port 9999
    (counted as "other") but never takes what the guest sends: the guest's
    transmit queue fills and its sender blocks (NETDEV WATCHDOG)."""
    args = ["dpdk-testpmd", "-l", "0,1", "--main-lcore", "1", "--no-huge", "-m", "256", "--no-pci",
            f"--file-prefix={name}", f"--vdev=net_vhost0,iface={sock},queues=1" + (",iommu-support=1" if iommu else "")]
    if debug:
        args += ["--log-level=lib.vhost.config:debug"]
    args += ["--", "--total-num-mbufs=16384", "--auto-start", f"--forward-mode={mode}", f"--txpkts={14 + 20 + 8 + size}",
             f"--eth-peer=0,{GUEST_MAC}", "--tx-ip=10.0.0.2,10.0.0.1", "--tx-udp=9999,9999"]
    return args


class QMP:
    def __init__(self, path, timeout=30):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        self.s.settimeout(timeout)
        self.f = self.s.makefile("rwb")
        self.events = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            line = self.f.readline()
            if not line:
                raise EOFError("QMP closed")
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def cmd(self, name, **arguments):
        req = {"execute": name}
        if arguments:
            req["arguments"] = arguments
        self.f.write(json.dumps(req).encode() + b"\n")
        self.f.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']}")
        return reply["return"]


def testpmd_stats(path):
    """RX-packets, TX-packets, TX-dropped of port 0 from testpmd's exit
    statistics (what it took from the guest, gave it, and could not give it:
    the guest's receive ring was full or, under a vIOMMU, a buffer's
    translation was missing)."""
    text = open(path, errors="replace").read()
    block = text.split("Forward statistics for port 0")[-1]
    def n(key):
        m = re.search(key + r":\s+(\d+)", block)
        return int(m.group(1)) if m else -1
    return n("RX-packets"), n("TX-packets"), n("TX-dropped")


def wait_for(path, text, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(path, errors="replace") as f:
                if text in f.read():
                    return True
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iommu", action="store_true", help="intel-iommu, iommu_platform=on, guest iommu.strict=1, testpmd iommu-support=1")
    ap.add_argument("--seconds", type=float, default=20, help="guest traffic (both ways) duration, guest time")
    ap.add_argument("--migrate-after", type=float, default=5, help="seconds of traffic before migrating")
    ap.add_argument("--size", type=int, default=512, help="UDP payload bytes (both directions)")
    ap.add_argument("--max-bandwidth", type=int, default=1 << 30, help="migrate-set-parameters max-bandwidth, bytes/s (QEMU 7.2 default: 32 MiB/s)")
    ap.add_argument("--downtime-limit", type=int, default=300, help="migrate-set-parameters downtime-limit, ms")
    ap.add_argument("--forward-mode", default="5tswap", help="testpmd's forwarding mode: 5tswap (echo; default), txonly, macswap, rxonly...")
    ap.add_argument("--vhost-debug", action="store_true", help="testpmd --log-level=lib.vhost.config:debug (vhost-user messages in the testpmd logs)")
    ap.add_argument("--incoming", choices=["unix", "tcp"], default="unix", help="migration channel: unix socket or tcp:127.0.0.1:PORT")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    ap.add_argument("--timeout", type=float, default=240, help="whole-run limit, seconds")
    a = ap.parse_args()

    for tool in ("qemu-system-x86_64", "dpdk-testpmd"):
        if not shutil.which(tool):
            sys.exit(f"migrate-dpdk: needs {tool}")
    for f in ("vmlinuz", "initrd.cpio.gz"):
        if not os.path.exists(os.path.join(GUEST, f)):
            sys.exit(f"migrate-dpdk: the guest is not built ({GUEST}): sh interop/linux-guest/build.sh")

    d = tempfile.mkdtemp(prefix="vpb-migrate-")
    children = []
    logs = {}

    def spawn(name, args):
        log = open(os.path.join(d, name + ".log"), "wb")
        logs[name] = log.name
        p = subprocess.Popen(args, stdin=subprocess.PIPE if name.startswith("testpmd") else subprocess.DEVNULL,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        children.append((name, p))
        return p

    def cleanup():
        for name, p in reversed(children):
            if p.poll() is None:
                try:
                    if p.stdin:
                        p.stdin.close()  # testpmd: EOF on stdin quits it cleanly
                except OSError:
                    pass
        for name, p in reversed(children):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for prefix in (tag + "a", tag + "b"):  # testpmd's runtime directories (--file-prefix)
            shutil.rmtree(os.path.join("/var/run/dpdk", prefix), ignore_errors=True)

    def fail(msg):
        cleanup()
        print(f"migrate-dpdk: FAILED: {msg} (logs in {d})", file=sys.stderr)
        sys.exit(1)

    tag = f"vpbmig{os.getpid()}"
    signal.signal(signal.SIGALRM, lambda *_: fail("whole-run timeout"))
    signal.alarm(int(a.timeout))
    t0 = time.time()
    sock_a, sock_b = os.path.join(d, "a.sock"), os.path.join(d, "b.sock")
    qmp_a, qmp_b = os.path.join(d, "qmp-a.sock"), os.path.join(d, "qmp-b.sock")
    if a.incoming == "unix":
        uri = "unix:" + os.path.join(d, "mig.sock")
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            uri = f"tcp:127.0.0.1:{probe.getsockname()[1]}"

    spawn("testpmd-a", testpmd_args(tag + "a", sock_a, a.iommu, a.size, a.vhost_debug, a.forward_mode))
    spawn("testpmd-b", testpmd_args(tag + "b", sock_b, a.iommu, a.size, a.vhost_debug, a.forward_mode))
    for s in (sock_a, sock_b):
        deadline = time.time() + 30
        while not os.path.exists(s):
            if time.time() > deadline:
                fail(f"testpmd did not create {s}")
            time.sleep(0.05)
    src = spawn("qemu-src", qemu_args(sock_a, qmp_a, a.iommu, a.seconds, a.size))
    dst = spawn("qemu-dst", qemu_args(sock_b, qmp_b, a.iommu, a.seconds, a.size, incoming=uri))
    qs, qd = QMP(qmp_a), QMP(qmp_b)
    # Capabilities: none needed for vhost-user (QEMU turns dirty logging on in
    # the back end itself: VHOST_USER_SET_LOG_BASE + VHOST_F_LOG_ALL). Events
    # on both sides for the timeline; the bandwidth cap of QEMU 7.2 (32 MiB/s)
    # lifted so that 256 MiB does not take 8 s.
    for q in (qs, qd):
        q.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    qs.cmd("migrate-set-parameters", **{"max-bandwidth": a.max_bandwidth, "downtime-limit": a.downtime_limit})

    if not wait_for(logs["qemu-src"], "vpb-receiving on", 120):
        fail("the guest did not start its receiver on the source")
    t_traffic = time.time()
    boot = t_traffic - t0
    time.sleep(a.migrate_after)
    t_mig = time.time()
    qs.cmd("migrate", uri=uri)
    info = {}
    while True:
        info = qs.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        if time.time() - t_mig > 120:
            fail(f"migration still {info.get('status')} after 120 s")
        time.sleep(0.05)
    t_done = time.time()
    # QEMU sets "completed" before it fills in total-time and downtime (the
    # migration thread computes them just after): a query right at the switch
    # can read 0 for both. Ask again once it has settled.
    time.sleep(0.5)
    info = qs.cmd("query-migrate")
    status = info.get("status")
    if status != "completed":
        fail(f"migration {status}: {info}")
    dst_status = qd.cmd("query-status")
    qs.cmd("quit")
    # The guest's report, now on the destination's console.
    if not wait_for(logs["qemu-dst"], "vpb-guest done", a.seconds + 120):
        fail("no report from the guest on the destination")
    t_report = time.time()
    try:
        dst.wait(timeout=30)  # the guest powers off: -no-reboot ends QEMU
    except subprocess.TimeoutExpired:
        pass
    cleanup()
    signal.alarm(0)

    out = open(logs["qemu-dst"], errors="replace").read()
    report = [l.strip() for l in out.splitlines() if l.startswith("vpb-")]
    src_out = open(logs["qemu-src"], errors="replace").read()
    ram = info.get("ram", {})
    ra, ta, da = testpmd_stats(logs["testpmd-a"])
    rb, tb, db = testpmd_stats(logs["testpmd-b"])
    m = re.search(r"vpb-guest tx_packets (\d+)", out)
    guest_tx = int(m.group(1)) if m else -1
    print(f"migrate-dpdk: {'iommu strict' if a.iommu else 'no iommu'}: status {status}, destination {dst_status.get('status')}, "
          f"total-time {info.get('total-time')} ms, downtime {info.get('downtime')} ms, setup-time {info.get('setup-time')} ms, "
          f"ram transferred {ram.get('transferred', 0) >> 20} MiB in {ram.get('dirty-sync-count')} passes, "
          f"boot {boot:.1f} s, migrate call to completed {t_done - t_mig:.2f} s, run {t_report - t0:.1f} s; "
          f"testpmd A rx {ra} tx {ta} tx-dropped {da}, B rx {rb} tx {tb} tx-dropped {db}, "
          f"guest tx lost {guest_tx - ra - rb if guest_tx >= 0 else '?'}; "
          f"guest (on the destination): " + " | ".join(report))
    sys.stdout.flush()
    if os.environ.get("VPB_MIGRATE_VERBOSE"):
        print("--- source console ---\n" + src_out + "\n--- destination console ---\n" + out)
    if a.keep:
        print(f"logs in {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)
    ok = "vpb-guest done" in out and any(l.startswith("vpb-received") for l in report)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
