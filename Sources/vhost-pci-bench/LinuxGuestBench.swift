import ArgumentParser
import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import Logging
import VhostUser

struct LinuxGuestBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "linux-guest",
        abstract: "A Linux guest (QEMU TCG) sending UDP through the bridge to VM2, and receiving what VM2 sends it, versus the same guest and QEMU line against DPDK's vhost back end (testpmd rxonly / txonly), with and without intel-iommu strict (needs QEMU, dpdk-testpmd and make interop-deps)."
    )

    @Option(help: "send (the guest sends, VM2 receives), receive (VM2 sends, the guest receives) or both.")
    var direction: String = "both"

    @Option(help: "Seconds the guest sends per run.")
    var seconds: Double = 5

    @Option(help: "UDP payload bytes per datagram.")
    var size: Int = 512

    @Option(help: "Milliseconds VM2 polls after its last work before sleeping on kicks.")
    var pollMs: Int = 100

    @Option(help: "Microseconds the bridge thread spins on VM2's ack in the revocation channel before it sleeps (the bridge's revocation-spin-us).")
    var revocationSpinUs: Int = 50

    @Flag(help: "VM2 without the revocation channel (UNMAP and ACK on the socket).")
    var socketOnly = false

    @Option(help: "Which runs: none, strict or both.")
    var viommu: String = "both"

    @Flag(help: "Print one JSON object instead of Markdown.")
    var json = false

    static let qemu = "/usr/bin/qemu-system-x86_64"
    static let testpmd = "/usr/bin/dpdk-testpmd"

    /// Runs QEMU with the guest until it reports; returns the report.
    func runGuest(socket: String, iommu: Bool, log: String, receive: Bool = false) throws -> LinuxGuest.Report {
        let (p, _) = try launchChild(Self.qemu, LinuxGuest.qemuArguments(socket: socket, iommu: iommu, count: 0, size: size, seconds: seconds,
                                                                         receive: receive),
                                     log: log)
        defer { if p.isRunning { p.terminate() }; p.waitUntilExit() }
        let deadline = ContinuousClock.now.advanced(by: .seconds(seconds + 120))
        while ContinuousClock.now < deadline {
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            if let r = LinuxGuest.report(in: text) { return r }
            if !p.isRunning { break }
            usleep(50_000)
        }
        throw ValidationError("the guest did not report; QEMU said: \((try? String(contentsOfFile: log, encoding: .utf8))?.suffix(800) ?? "")")
    }

    struct BridgeRun: Codable {
        var report: LinuxGuest.Report; var vm2Verified: Int; var misses: Int; var invalidates: Int
        /// Seconds the bridge thread spent handling IOTLB messages (receipt to reply), and of those waiting for VM2's acks.
        var iotlbSeconds: Double; var revocationWaitSeconds: Double; var revocations: UInt64
        /// Seconds VM2's device thread waited for translations it asked for,
        /// and of those QEMU took to answer the bridge's IOTLB misses.
        var vm2TranslationWaitSeconds: Double
        var missAnswerSeconds: Double
    }

    /// Through the bridge to VM2 on the engine (verifying every datagram, polling).
    func throughBridge(iommu: Bool, dir: String) throws -> BridgeRun {
        try withBridgeAndVM2(iommu: iommu, dir: dir, name: "lg", vm2: { _ in }) { bridge, vm2 in
            let report = try runGuest(socket: "\(dir)/vm1.sock", iommu: iommu, log: "\(dir)/bridge-qemu.log")
            usleep(100_000)
            let s = bridge.statistics
            return BridgeRun(report: report, vm2Verified: vm2.statistics.packetsVerified, misses: s.iotlbMissesSent, invalidates: s.iotlbInvalidates,
                             iotlbSeconds: s.peer.iotlbLatency.sum, revocationWaitSeconds: s.peer.revocationLatency.sum,
                             revocations: s.peer.revocationLatency.count, vm2TranslationWaitSeconds: vm2.statistics.translationWaitSeconds,
                             missAnswerSeconds: s.peer.missAnswerLatency.sum)
        }
    }

    /// A bridge (iommu or identity) with this run's settings and a VM2 on
    /// the engine (`vm2` adjusts its configuration), for the time of `body`.
    func withBridgeAndVM2<R>(iommu: Bool, dir: String, name: String, vm2 adjust: (inout VM2Configuration) -> Void,
                             _ body: (Bridge, EmulatedVM2) throws -> R) throws -> R {
        var logger = Logger(label: "bench")
        logger.logLevel = .critical
        var settings = BridgeSettings(name: name, socketPath: "\(dir)/vm1.sock", peerSocketPath: "\(dir)/vm2.sock",
                                      backend: BackendConfiguration(bridgeName: name,
                                                                    addressSpace: AddressSpaceConfiguration(barSize: 64 << 30, mode: iommu ? .iommu : .identity)),
                                      revocationDeadlineMilliseconds: 2000)
        settings.revocationSpinMicroseconds = max(0, revocationSpinUs)
        let bridge = try Bridge(settings, logger: logger)
        let server = try JoinableThread(name: "bench-bridge") { bridge.serve() }
        defer { bridge.stop(); server.join() }
        var config = VM2Configuration()
        config.echo = false
        config.pollFor = .milliseconds(pollMs)
        config.sharedRevocations = !socketOnly
        adjust(&config)
        let vm2 = try EmulatedVM2(peerSocketPath: "\(dir)/vm2.sock", configuration: config)
        defer { vm2.stop() }
        return try body(bridge, vm2)
    }

    /// Against DPDK's vhost back end (testpmd rxonly, iommu-support=1 under a vIOMMU).
    func throughDPDK(iommu: Bool, dir: String) throws -> LinuxGuest.Report {
        try againstDPDK(iommu: iommu, dir: dir, name: "lg-bench", testpmd: ["--forward-mode=rxonly"], receive: false)
    }

    /// The guest against testpmd (`testpmd`: its forwarding arguments) on
    /// DPDK's vhost back end.
    func againstDPDK(iommu: Bool, dir: String, name: String, testpmd arguments: [String], receive: Bool) throws -> LinuxGuest.Report {
        let sock = "\(dir)/\(name).sock"
        let (p, stdin) = try launchChild(Self.testpmd, [
            "-l", "0,1", "--main-lcore", "1", "--no-huge", "-m", "256", "--no-pci", "--file-prefix=\(name)",
            "--vdev=net_vhost0,iface=\(sock),queues=1\(iommu ? ",iommu-support=1" : "")",
            "--", "--total-num-mbufs=16384", "--auto-start",
        ] + arguments, log: "\(dir)/\(name)-testpmd.log")
        defer { finishChild(p, stdin) }
        for _ in 0..<500 where !FileManager.default.fileExists(atPath: sock) { usleep(10_000) }
        return try runGuest(socket: sock, iommu: iommu, log: "\(dir)/\(name)-qemu.log", receive: receive)
    }

    /// VM2 sends the guest datagrams in its own format, as fast as the
    /// guest offers receive buffers; the guest counts and checks them.
    func receiveThroughBridge(iommu: Bool, dir: String) throws -> (report: LinuxGuest.Report, translationWaitSeconds: Double, missAnswerSeconds: Double) {
        try withBridgeAndVM2(iommu: iommu, dir: dir, name: "lg-rx", vm2: { config in
            config.dataPath = .count
            config.generateFrames = Int.max
            config.generatedFrame = LinuxGuest.datagramFrame(size: size)
        }) { bridge, vm2 in
            let report = try runGuest(socket: "\(dir)/vm1.sock", iommu: iommu, log: "\(dir)/bridge-rx-qemu.log", receive: true)
            return (report, vm2.statistics.translationWaitSeconds, bridge.statistics.peer.missAnswerLatency.sum)
        }
    }

    /// DPDK's vhost back end in txonly, its frames addressed to the guest's
    /// port (same size), against the same guest.
    func receiveThroughDPDK(iommu: Bool, dir: String) throws -> LinuxGuest.Report {
        try againstDPDK(iommu: iommu, dir: dir, name: "lg-bench-rx", testpmd: [
            "--forward-mode=txonly", "--txpkts=\(14 + 20 + 8 + size)", "--eth-peer=0,\(LinuxGuest.guestMAC)",
            "--tx-ip=10.0.0.2,10.0.0.1", "--tx-udp=\(LinuxGuest.port),\(LinuxGuest.port)",
        ], receive: true)
    }

    struct ReceiveRow: Codable {
        var iommu: Bool
        var bridgePps: Double
        var dpdkPps: Double
        var ratio: Double
        var bridgeReceived: Int
        var bridgeValid: Int
        var bridgeCorrupt: Int
        var dpdkReceived: Int
        var bridgeDmarFaults: Int
        var dpdkDmarFaults: Int
        /// µs per datagram received: VM2's data path waiting for
        /// translations of the guest's receive buffers, and of that QEMU
        /// answering the bridge's IOTLB misses.
        var vm2TranslationWaitMicrosecondsPerDatagram: Double
        var qemuMissAnswerMicrosecondsPerDatagram: Double
    }

    struct Row: Codable {
        var iommu: Bool
        var bridgePps: Double
        var dpdkPps: Double
        var ratio: Double
        var bridgeMissesPerDatagram: Double
        var vm2Verified: Int
        var guestSent: Int
        var bridgeDmarFaults: Int
        var dpdkDmarFaults: Int
        /// Per datagram the guest sent, through the bridge: µs between datagrams
        /// (1 / rate), µs the bridge thread spent on IOTLB messages, and µs of
        /// those waiting for VM2 to acknowledge a revocation.
        var bridgeMicrosecondsPerDatagram: Double
        var bridgeIOTLBMicrosecondsPerDatagram: Double
        var bridgeRevocationWaitMicrosecondsPerDatagram: Double
        var revocationsPerDatagram: Double
        /// µs per datagram VM2's data path stood still waiting for a translation.
        var vm2TranslationWaitMicrosecondsPerDatagram: Double
        /// µs per datagram between the bridge's IOTLB miss and QEMU's update.
        var qemuMissAnswerMicrosecondsPerDatagram: Double
        var dpdkMicrosecondsPerDatagram: Double
    }

    func run() throws {
        guard FileManager.default.isExecutableFile(atPath: Self.qemu), FileManager.default.isExecutableFile(atPath: Self.testpmd) else {
            throw ValidationError("needs qemu-system-x86_64 and dpdk-testpmd: make interop-deps")
        }
        guard LinuxGuest.isBuilt else { throw ValidationError(LinuxGuest.missing) }
        let dir = "/tmp/vpb-lg-bench-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        guard ["send", "receive", "both"].contains(direction) else { throw ValidationError("--direction is send, receive or both") }
        var rows: [Row] = []
        var receiveRows: [ReceiveRow] = []
        for iommu in (viommu == "none" ? [false] : viommu == "strict" ? [true] : [false, true]) where direction != "send" {
            FileHandle.standardError.write(Data("linux-guest: receive, \(iommu ? "intel-iommu strict" : "no vIOMMU"), through the bridge…\n".utf8))
            let (b, translationWait, missAnswer) = try receiveThroughBridge(iommu: iommu, dir: dir)
            FileHandle.standardError.write(Data("linux-guest: receive, \(iommu ? "intel-iommu strict" : "no vIOMMU"), DPDK's vhost back end…\n".utf8))
            let d = try receiveThroughDPDK(iommu: iommu, dir: dir)
            guard b.corrupt == 0, b.received > 0, d.received > 0 else {
                throw ValidationError("receive, \(iommu ? "strict" : "no vIOMMU"): the guest received \(b.received) from VM2 (\(b.corrupt) corrupt) and \(d.received) from DPDK")
            }
            receiveRows.append(ReceiveRow(iommu: iommu, bridgePps: b.receivedPerSecond, dpdkPps: d.receivedPerSecond,
                                          ratio: d.receivedPerSecond > 0 ? b.receivedPerSecond / d.receivedPerSecond : 0,
                                          bridgeReceived: b.received, bridgeValid: b.valid, bridgeCorrupt: b.corrupt, dpdkReceived: d.received,
                                          bridgeDmarFaults: b.dmarFaults, dpdkDmarFaults: d.dmarFaults,
                                          vm2TranslationWaitMicrosecondsPerDatagram: b.received > 0 ? translationWait * 1e6 / Double(b.received) : 0,
                                          qemuMissAnswerMicrosecondsPerDatagram: b.received > 0 ? missAnswer * 1e6 / Double(b.received) : 0))
        }
        for iommu in (viommu == "none" ? [false] : viommu == "strict" ? [true] : [false, true]) where direction != "receive" {
            FileHandle.standardError.write(Data("linux-guest: \(iommu ? "intel-iommu strict" : "no vIOMMU"), through the bridge…\n".utf8))
            let b = try throughBridge(iommu: iommu, dir: dir)
            FileHandle.standardError.write(Data("linux-guest: \(iommu ? "intel-iommu strict" : "no vIOMMU"), DPDK's vhost back end…\n".utf8))
            let d = try throughDPDK(iommu: iommu, dir: dir)
            rows.append(Row(iommu: iommu, bridgePps: b.report.packetsPerSecond, dpdkPps: d.packetsPerSecond,
                            ratio: d.packetsPerSecond > 0 ? b.report.packetsPerSecond / d.packetsPerSecond : 0,
                            bridgeMissesPerDatagram: b.report.sent > 0 ? Double(b.misses) / Double(b.report.sent) : 0,
                            vm2Verified: b.vm2Verified, guestSent: b.report.sent,
                            bridgeDmarFaults: b.report.dmarFaults, dpdkDmarFaults: d.dmarFaults,
                            bridgeMicrosecondsPerDatagram: b.report.packetsPerSecond > 0 ? 1e6 / b.report.packetsPerSecond : 0,
                            bridgeIOTLBMicrosecondsPerDatagram: b.report.sent > 0 ? b.iotlbSeconds * 1e6 / Double(b.report.sent) : 0,
                            bridgeRevocationWaitMicrosecondsPerDatagram: b.report.sent > 0 ? b.revocationWaitSeconds * 1e6 / Double(b.report.sent) : 0,
                            revocationsPerDatagram: b.report.sent > 0 ? Double(b.revocations) / Double(b.report.sent) : 0,
                            vm2TranslationWaitMicrosecondsPerDatagram: b.report.sent > 0 ? b.vm2TranslationWaitSeconds * 1e6 / Double(b.report.sent) : 0,
                            qemuMissAnswerMicrosecondsPerDatagram: b.report.sent > 0 ? b.missAnswerSeconds * 1e6 / Double(b.report.sent) : 0,
                            dpdkMicrosecondsPerDatagram: d.packetsPerSecond > 0 ? 1e6 / d.packetsPerSecond : 0))
        }
        if json {
            struct Output: Codable { var linuxGuest: [Row]; var linuxGuestReceive: [ReceiveRow] }
            try printJSON(Output(linuxGuest: rows, linuxGuestReceive: receiveRows))
            return
        }
        if !receiveRows.isEmpty {
            print("### Linux guest receiving (`vhost-pci-bench linux-guest`, \(seconds) s per run, \(size)-byte UDP payloads)\n")
            print("The same guest counts the UDP datagrams that arrive on its port for \(seconds) s from the first: from VM2 (the `DeviceEngine` writing a datagram in the guest's own format into every receive buffer the guest offers, as fast as it offers them; the guest checks every byte) versus from DPDK's vhost back end (testpmd txonly, its frames addressed to the guest). Under strict mode the guest maps every receive buffer and unmaps it once used: each costs VM2 a translation and an invalidate. Datagrams/s as the guest measured them.\n")
            print("| vIOMMU | from VM2 through the bridge, datagrams/s | from DPDK's back end, datagrams/s | bridge / DPDK | received from VM2 (valid, corrupt) | received from DPDK | DMAR faults (bridge, DPDK) | µs per datagram VM2 waited for translations | of which QEMU answering the miss |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in receiveRows {
                print(String(format: "| %@ | %.0f | %.0f | %.2f× | %d (%d, %d) | %d | %d, %d | %.1f | %.1f |", r.iommu ? "intel-iommu, strict" : "none",
                             r.bridgePps, r.dpdkPps, r.ratio, r.bridgeReceived, r.bridgeValid, r.bridgeCorrupt, r.dpdkReceived,
                             r.bridgeDmarFaults, r.dpdkDmarFaults, r.vm2TranslationWaitMicrosecondsPerDatagram, r.qemuMissAnswerMicrosecondsPerDatagram))
            }
            if !rows.isEmpty { print("") }
        }
        guard !rows.isEmpty else { return }
        print("### Linux guest (`vhost-pci-bench linux-guest`, \(seconds) s per run, \(size)-byte UDP payloads)\n")
        print("Debian's cloud kernel under QEMU TCG (same QEMU line for both back ends) sends UDP as fast as it can: through the bridge to VM2 on the `DeviceEngine` (checking every byte of every datagram in place), versus DPDK's vhost back end (testpmd rxonly, `iommu-support=1` under the vIOMMU). Guest datagrams/s as the guest measured them. Strict mode unmaps every buffer after use: each datagram costs an IOTLB miss and an invalidate, and the bridge revokes each one synchronously through VM2.\n")
        print("| vIOMMU | through the bridge, datagrams/s | DPDK back end, datagrams/s | bridge / DPDK | IOTLB misses per datagram (bridge) | VM2 verified / guest sent | DMAR faults (bridge, DPDK) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows {
            print(String(format: "| %@ | %.0f | %.0f | %.2f× | %.2f | %d / %d | %d, %d |", r.iommu ? "intel-iommu, strict" : "none",
                         r.bridgePps, r.dpdkPps, r.ratio, r.bridgeMissesPerDatagram, r.vm2Verified, r.guestSent, r.bridgeDmarFaults, r.dpdkDmarFaults))
        }
        print("\nWhere a datagram's time goes through the bridge: the bridge thread's own clock around each IOTLB message (receipt to reply, the daemon's `iotlb` latency histogram) and, inside it, the wait for VM2 to acknowledge a revocation (`revocation` histogram), per datagram the guest sent; and, on VM2's side, how long its data path stood still waiting for a translation it asked for (TRANSLATE sent → TRANSLATE_REPLY read: the peer thread, the bridge thread, the IOTLB miss to QEMU and QEMU's update, and back), and of that the part QEMU took to answer the miss (the bridge's miss sent → the next IOTLB update received).\n")
        print("| vIOMMU | µs per datagram, bridge | of which handling IOTLB messages | of which waiting for VM2's ack | revocations per datagram | VM2 waiting for translations | of which QEMU answering the miss | µs per datagram, DPDK |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows {
            print(String(format: "| %@ | %.1f | %.1f | %.1f | %.2f | %.1f | %.1f | %.1f |", r.iommu ? "intel-iommu, strict" : "none", r.bridgeMicrosecondsPerDatagram,
                         r.bridgeIOTLBMicrosecondsPerDatagram, r.bridgeRevocationWaitMicrosecondsPerDatagram, r.revocationsPerDatagram,
                         r.vm2TranslationWaitMicrosecondsPerDatagram, r.qemuMissAnswerMicrosecondsPerDatagram, r.dpdkMicrosecondsPerDatagram))
        }
    }
}
