import ArgumentParser
import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import Logging
import VhostUser

/// IOTLB update → ack and invalidate → ack through a live bridge with VM2
/// connected and acknowledging, each against a plain request/reply round trip
/// on the same socket measured in the same run.
struct IOTLBBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "iotlb",
        abstract: "IOTLB update and invalidate round trips (VM2 connected, synchronous revocation) versus a plain request/reply, in one run."
    )

    @Option(help: "Round trips measured per kind (after a 10 % warm-up).")
    var rounds: Int = 5_000

    @Flag(help: "Print one JSON object instead of Markdown.")
    var json = false

    @Option(help: "VM2's engine keeps polling this many microseconds after its last work (a revocation included), as a polling data plane does; 0: it sleeps at once.")
    var vm2PollUs: Int = 1000

    @Flag(help: "VM2 without the revocation channel (MAP/UNMAP and ACK on the socket, a version-1 peer).")
    var socketOnly = false

    struct Stats: Codable {
        var p50Microseconds: Double
        var p99Microseconds: Double
        var meanMicroseconds: Double
    }

    struct Result: Codable {
        var rounds: Int
        var plainRequestReply: Stats
        var update: Stats
        var invalidate: Stats
        var updateRatio: Double
        var invalidateRatio: Double
        var vm2UnmapsApplied: Int
        var revocationTimeouts: Int
        /// Voluntary context switches per round trip over every thread of the run
        /// (VM1, the bridge and peer threads, VM2), counted in a separate
        /// untimed pass: the hand-offs each kind costs.
        var switchesPerPlain: Double
        var switchesPerUpdate: Double
        var switchesPerInvalidate: Double
        /// The goals' names (issue 22): the same counts.
        var updateSwitches: Double
        var invalidateSwitches: Double
        /// How VM2 took revocations: "channel" or "socket"; how long it polls.
        var revocationPath: String
        var vm2PollMicroseconds: Int
        /// The daemon's waits for a channel ack that slept, and WAKEs sent.
        var channelSleeps: Int
        var channelWakes: Int
        /// The same, by thread name (threads under 0.05 per round trip left out).
        var switchesByThread: [String: [String: Double]]
    }

    static func stats(_ samples: [Duration]) -> Stats {
        let us = samples.map { $0 / .microseconds(1) }.sorted()
        func at(_ q: Double) -> Double { us.isEmpty ? 0 : us[min(us.count - 1, Int(Double(us.count) * q))] }
        return Stats(p50Microseconds: at(0.5), p99Microseconds: at(0.99), meanMicroseconds: us.reduce(0, +) / Double(max(1, us.count)))
    }

    func run() throws {
        guard rounds > 0 else { throw ValidationError("--rounds must be positive") }
        Signals.ignoreBrokenPipe()
        let dir = FileManager.default.temporaryDirectory.path
        let path = "\(dir)/vpb-bench-iotlb-\(getpid()).sock", peerPath = "\(dir)/vpb-bench-iotlb-\(getpid())-vm2.sock"
        var logger = Logger(label: "bench")
        logger.logLevel = .critical
        let space = AddressSpaceConfiguration(barSize: 64 << 30, mode: .iommu)
        let bridge = try Bridge(BridgeSettings(name: "iotlb", socketPath: path, peerSocketPath: peerPath,
                                               backend: BackendConfiguration(bridgeName: "iotlb", addressSpace: space),
                                               revocationDeadlineMilliseconds: 2000), logger: logger)
        let thread = try JoinableThread(name: "bridge") { bridge.serve() }
        defer { bridge.stop(); thread.join() }
        var vm2Config = VM2Configuration()
        vm2Config.pollFor = .microseconds(max(0, vm2PollUs))
        vm2Config.sharedRevocations = !socketOnly
        let vm2 = try EmulatedVM2(peerSocketPath: peerPath, configuration: vm2Config)
        defer { vm2.stop() }
        let handshake = ContinuousClock.now.advanced(by: .seconds(5))
        while !(vm2.statistics.ready && bridge.statistics.peer.ready), ContinuousClock.now < handshake { Sleep.for(.milliseconds(1)) }
        guard vm2.statistics.ready else { throw ValidationError("VM2 did not finish its handshake") }
        var c = VM1Configuration()
        c.iommu = .iommu
        let vm1 = try EmulatedVM1(socketPath: path, configuration: c)
        defer { vm1.disconnect() }
        try vm1.start()
        guard let iommu = vm1.iommu else { throw ValidationError("VM1 has no IOMMU") }

        // The three round trips, timed below and counted after.
        func plainRequest() throws { _ = try vm1.frontend.getU64(.getFeatures) }
        func grant() throws -> BusAddress {
            try iommu.map(GuestPhysicalAddress(0x200_0000), length: 4096, permission: .readWrite, eager: true)
        }
        let warm = max(1, rounds / 10)
        let clock = ContinuousClock()
        var plain: [Duration] = [], update: [Duration] = [], invalidate: [Duration] = []
        plain.reserveCapacity(rounds); update.reserveCapacity(rounds); invalidate.reserveCapacity(rounds)
        // Each kind in a run of its own, so every round trip starts from the
        // state the same kind left (interleaved, a plain request found the
        // bridge thread still awake after an invalidate and looked cheaper).
        for i in 0..<(warm + rounds) {
            let p = try clock.measure { try plainRequest() }
            if i >= warm { plain.append(p) }
        }
        var mapped: [BusAddress] = []
        mapped.reserveCapacity(warm + rounds)
        for i in 0..<(warm + rounds) {
            var iova = BusAddress(0)
            let u = try clock.measure { iova = try grant() }
            mapped.append(iova)
            if i >= warm { update.append(u) }
        }
        for (i, iova) in mapped.enumerated() {
            let v = try clock.measure { try iommu.unmap(iova) }
            if i >= warm { invalidate.append(v) }
        }
        // Untimed: thread switches per round trip, one kind at a time.
        let counted = min(rounds, 1000)
        var byThread: [String: [String: Double]] = [:]
        func switches(_ kind: String, _ body: () throws -> Void) rethrows -> Double {
            let before = voluntarySwitchesByThread()
            try body()
            let after = voluntarySwitchesByThread()
            var perThread: [String: Double] = [:]
            for (name, n) in after { perThread[name] = Double(n - (before[name] ?? 0)) / Double(counted) }
            byThread[kind] = perThread.filter { $0.value >= 0.05 }
            return perThread.values.reduce(0, +)
        }
        var iovas: [BusAddress] = []
        let plainSwitches = try switches("plain") { for _ in 0..<counted { try plainRequest() } }
        let updateSwitches = try switches("update") { for _ in 0..<counted { iovas.append(try grant()) } }
        let invalidateSwitches = try switches("invalidate") { for iova in iovas { try iommu.unmap(iova) } }

        let base = Self.stats(plain), up = Self.stats(update), inv = Self.stats(invalidate)
        let result = Result(rounds: rounds, plainRequestReply: base, update: up, invalidate: inv,
                            updateRatio: up.p50Microseconds / max(base.p50Microseconds, 0.001),
                            invalidateRatio: inv.p50Microseconds / max(base.p50Microseconds, 0.001),
                            vm2UnmapsApplied: vm2.statistics.unmapsApplied,
                            revocationTimeouts: bridge.statistics.peer.revocationTimeouts,
                            switchesPerPlain: plainSwitches, switchesPerUpdate: updateSwitches, switchesPerInvalidate: invalidateSwitches,
                            updateSwitches: updateSwitches, invalidateSwitches: invalidateSwitches,
                            revocationPath: socketOnly ? "socket" : "channel", vm2PollMicroseconds: max(0, vm2PollUs),
                            channelSleeps: bridge.statistics.peer.channelSleeps, channelWakes: bridge.statistics.peer.channelWakes,
                            switchesByThread: byThread)
        if json {
            try printJSON(result)
            return
        }
        func row(_ name: String, _ s: Stats, _ ratio: String, _ switches: Double) -> String {
            String(format: "| %@ | %.1f | %.1f | %.1f | %@ | %.2f |", name, s.p50Microseconds, s.p99Microseconds, s.meanMicroseconds, ratio, switches)
        }
        print("### IOTLB round trips (`vhost-pci-bench iotlb`, \(rounds) each, VM2 connected and acking)\n")
        print("Each kind runs on its own (a warm-up of 10 %, then the rounds timed), the updates mapping one page each at a fresh IOVA and the invalidates unmapping them. Thread switches are the voluntary context switches of every thread of the run (VM1, the bridge thread, the peer thread that reads VM2's socket, VM2's threads), counted in a separate untimed pass of \(counted) round trips per kind: each is a thread blocking so that another can run, the hand-offs a round trip costs.\n")
        print("| round trip | p50 µs | p99 µs | mean µs | p50 / plain | thread switches per round trip |")
        print("|---|---:|---:|---:|---:|---:|")
        print(row("plain request/reply (GET_FEATURES)", base, "1.00×", plainSwitches))
        print(row("IOTLB update → ack (MAP to VM2)", up, String(format: "%.2f×", result.updateRatio), updateSwitches))
        print(row("IOTLB invalidate → ack (UNMAP, VM2 acks)", inv, String(format: "%.2f×", result.invalidateRatio), invalidateSwitches))
        for kind in ["plain", "update", "invalidate"] {
            let parts = (byThread[kind] ?? [:]).sorted { $0.value > $1.value }.map { String(format: "%@ %.2f", $0.key, $0.value) }
            print("\(kind == "plain" ? "\nBy thread, per round trip — " : "")\(kind): \(parts.joined(separator: ", "))\(kind == "invalidate" ? "." : ";")")
        }
        print("\nVM2 applied \(result.vm2UnmapsApplied) UNMAPs through the \(result.revocationPath) (VM2 polls \(result.vm2PollMicroseconds) µs after its last work); revocation timeouts: \(result.revocationTimeouts); the daemon's ack waits that slept: \(result.channelSleeps), WAKEs sent: \(result.channelWakes).")
    }
}
