import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import Logging
import Testing
import TestSupport
import VhostUser

/// The real front ends and how to get them.
enum Peers {
    static let testpmd = "/usr/bin/dpdk-testpmd"
    static let qemu = "/usr/bin/qemu-system-x86_64"
    /// Set by `.ci/run` (where `make interop-deps` installed every peer): a
    /// missing peer then fails its scenarios instead of skipping them.
    static var required: Bool { ProcessInfo.processInfo.environment["VPB_REQUIRE_PEERS"] == "1" }
    static var hasTestpmd: Bool { required || FileManager.default.isExecutableFile(atPath: testpmd) }
    static var hasQEMU: Bool { required || FileManager.default.isExecutableFile(atPath: qemu) }
    static let testpmdMissing = "dpdk-testpmd is not installed: apt-get install dpdk-dev"
    static let qemuMissing = "qemu-system-x86_64 is not installed: apt-get install --no-install-recommends qemu-system-x86"
    static var hasLinuxGuest: Bool { required || (hasQEMU && LinuxGuest.isBuilt) }
    static let linuxGuestMissing = "QEMU or the Linux guest is missing: " + LinuxGuest.missing
}

let GiB: UInt64 = 1 << 30

/// Interop scenarios run one at a time: each uses both cores.
@Suite(.serialized) struct Interop {}

/// A real front end running as a child process; stdin stays open (testpmd
/// exits on EOF), output goes to a file removed afterwards.
typealias External = GuestProcess

extension GuestProcess {
    convenience init(_ executable: String, _ arguments: [String], name: String) throws {
        try self.init(executable, arguments, log: "/tmp/vpb-interop-\(getpid())-\(name).log", keepsLog: false)
    }

    /// Graceful stop: EOF on stdin (testpmd prints its statistics and exits), then SIGTERM.
    func stop() { finish() }
}

/// testpmd; `extra` goes after its own options (`-i`: interactive, run
/// under `stdbuf -oL` so what a command prints reaches the log at once,
/// not when testpmd exits).
func testpmd(_ socket: String, mode: String, name: String, server: Bool = false, queues: Int = 1, extra: [String] = []) throws -> External {
    let arguments = [
        "-l", "0,1", "--no-huge", "-m", "256", "--no-pci", "--file-prefix=\(name)",
        server ? "--vdev=net_vhost0,iface=\(socket),queues=\(queues)" : "--vdev=net_virtio_user0,path=\(socket),queues=\(queues)",
        "--", "--total-num-mbufs=16384", "--forward-mode=\(mode)", "--rxq=\(queues)", "--txq=\(queues)", "--auto-start",
    ] + extra
    if extra.contains("-i") {
        return try External("/usr/bin/stdbuf", ["-oL", Peers.testpmd] + arguments, name: name)
    }
    return try External(Peers.testpmd, arguments, name: name)
}

/// The C examples of libvhost-pci-device (`make c-examples`, which `make
/// interop` runs first), and what they print.
enum CExamples {
    static let directory = FileManager.default.currentDirectoryPath + "/.build/c-vm2"
    static let counter = directory + "/vpd-counter"
    static let forwarder = directory + "/vpd-forwarder"
    static var built: Bool { Peers.required || FileManager.default.isExecutableFile(atPath: counter) }
    static let missing = "the C examples are not built: make c-examples"

    /// The numbers of the last line starting with `prefix` (e.g.
    /// "vpd-counter: total "), in order.
    static func numbers(_ output: String, after prefix: String) -> [UInt64]? {
        guard let line = output.split(separator: "\n").last(where: { $0.hasPrefix(prefix) }) else { return nil }
        return line.dropFirst(prefix.count).split(whereSeparator: { !$0.isNumber }).compactMap { UInt64($0) }
    }
}

/// Sends QMP commands to QEMU (`-qmp unix:PATH,server=on,wait=off`).
func qmp(_ path: String, _ commands: [String]) throws {
    let s = try UnixSocket.connect(path: path)
    func line() throws -> String {
        var out: [UInt8] = []
        while out.last != 10 {
            let m = try s.receive(maxBytes: 1, maxFDs: 0)
            if m.bytes.isEmpty { break }
            out += m.bytes
        }
        return String(decoding: out, as: UTF8.self)
    }
    _ = try line() // greeting
    for c in ["qmp_capabilities"] + commands {
        try s.send(Array("{\"execute\": \"\(c)\"}\n".utf8))
        var reply = try line()
        while reply.contains("\"event\"") { reply = try line() } // skip events
    }
}

func qemu(_ socket: String, iommu: Bool, name: String, chardevOptions: String = "", qmpPath: String? = nil, queues: Int = 1) throws -> External {
    var args = ["-machine", "q35,accel=tcg", "-m", "256",
                "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
                "-chardev", "socket,id=c0,path=\(socket)\(chardevOptions)",
                "-netdev", "vhost-user,id=n0,chardev=c0" + (queues > 1 ? ",queues=\(queues)" : "")]
    if iommu { args += ["-device", "intel-iommu"] }
    let mq = queues > 1 ? ",mq=on,vectors=\(2 * queues + 2)" : ""
    args += ["-device", (iommu ? "virtio-net-pci,netdev=n0,iommu_platform=on,disable-legacy=on" : "virtio-net-pci,netdev=n0") + mq,
             "-display", "none", "-nodefaults", "-monitor", "none"]
    if let qmpPath { args += ["-qmp", "unix:\(qmpPath),server=on,wait=off"] }
    return try External(Peers.qemu, args, name: name)
}

/// "RX-packets: N" (or TX) from testpmd's final statistics.
func testpmdCount(_ output: String, _ field: String) -> Int? {
    guard let range = output.range(of: "Accumulated forward statistics") ?? output.range(of: "Forward statistics") else { return nil }
    let tail = output[range.upperBound...]
    guard let f = tail.range(of: "\(field): ") else { return nil }
    return Int(tail[f.upperBound...].prefix { $0.isNumber })
}

/// A bridge on its own thread with a VM2 attached.
final class InteropBridge {
    let bridge: Bridge
    let thread: JoinableThread
    let path: String
    let peerPath: String

    init(_ name: String, mode: BridgeMode, client: Bool = false, path: String? = nil) throws {
        self.path = path ?? "/tmp/vpb-interop-\(getpid())-\(name).sock"
        peerPath = "/tmp/vpb-interop-\(getpid())-\(name)-peer.sock"
        let logger = quietLogger("interop")
        var settings = BridgeSettings(name: name, socketPath: self.path, peerSocketPath: peerPath,
                                      backend: BackendConfiguration(bridgeName: name,
                                                                    addressSpace: AddressSpaceConfiguration(barSize: 64 * GiB, mode: mode)),
                                      revocationDeadlineMilliseconds: 2000)
        settings.client = client
        let bridge = try Bridge(settings, logger: logger)
        self.bridge = bridge
        thread = try JoinableThread(name: "interop-bridge") { bridge.serve() }
    }

    func stop() {
        bridge.stop()
        thread.join()
    }
}

#if canImport(Glibc)
import Glibc
#endif
