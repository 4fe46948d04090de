import ArgumentParser
import BridgeCore
import EmulatedGuests
import Foundation
import LinuxIO

@main
struct Guest: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vhost-pci-guest",
        abstract: "Run an emulated guest as its own process: VM1 (a virtio-net driver behind a vhost-user front end) or VM2 (the vhost-pci device side).",
        version: BuildInfo.version,
        subcommands: [VM1Command.self, VM2Command.self, MapLimitCommand.self, WithoutIOURingCommand.self]
    )
}

/// Retries `body` until it stops throwing or `seconds` pass (sockets that are
/// not there yet while the other processes start).
func retrying<T>(for seconds: Double, _ body: () throws -> T) throws -> T {
    let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int(seconds * 1000)))
    while true {
        do { return try body() } catch {
            if ContinuousClock.now >= deadline { throw error }
            usleep(20_000)
        }
    }
}

func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}

func stderr(_ text: String) {
    FileHandle.standardError.write(Data(text.utf8))
}

struct VM1Command: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm1",
        abstract: "Emulated VM1: connects to a bridge's vhost-user socket like QEMU, sends test packets, and checks the echoes VM2 writes back."
    )

    @Option(help: "The bridge's vhost-user socket.")
    var socketPath: String

    @Option(help: "identity (no vIOMMU) or iommu (a vIOMMU: buffers are mapped by IOVA).")
    var mode: String = "identity"

    @Option(help: "Packets to send.")
    var count: Int = 10_000

    @Option(help: "Comma-separated packet sizes in bytes, cycled (16 to 65536).")
    var sizes: String = "64,1500,65536"

    @Option(help: "Guest RAM size.")
    var ram: String = "256M"

    @Option(help: "IOVA window BASE:LIMIT for the IOMMU driver (iommu mode).")
    var dmaWindow: String = "4G:64G"

    @Flag(help: "QEMU-like IOTLB: no updates until the back end raises a miss (iommu mode).")
    var lazy = false

    @Flag(help: "Do not wait for echoes (a VM2 that only receives).")
    var noEcho = false

    @Option(help: "Seconds to keep retrying the connection.")
    var wait: Double = 10

    @Flag(help: "Print one JSON summary on stdout.")
    var json = false

    @Flag(help: "Print a live progress line on stderr.")
    var progress = false

    func validate() throws {
        guard mode == "identity" || mode == "iommu" else { throw ValidationError("--mode: '\(mode)' is not identity or iommu") }
        guard count >= 0 else { throw ValidationError("--count must be >= 0") }
        guard parseByteSize(ram) != nil else { throw ValidationError("--ram: '\(ram)' is not a size") }
        guard BusWindow(parsing: dmaWindow) != nil else { throw ValidationError("--dma-window: '\(dmaWindow)' is not BASE:LIMIT") }
        let list = sizes.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !list.isEmpty, list.allSatisfy({ ($0 ?? 0) >= 16 && ($0 ?? 0) <= 65536 }) else {
            throw ValidationError("--sizes: give sizes from 16 to 65536, e.g. 64,1500")
        }
    }

    struct Summary: Encodable {
        var role = "vm1"
        var mode: String
        var traffic: TrafficResult
        var packetsPerSecond: Double
        var gigabitsPerSecond: Double
        var iotlbUpdatesSent: Int
        var iotlbInvalidatesSent: Int
        var iotlbMissesAnswered: Int
        var messages: [String]
    }

    func run() throws {
        var config = VM1Configuration()
        config.ramSize = parseByteSize(ram) ?? config.ramSize
        config.iommu = mode == "iommu" ? .iommu : .none
        config.eagerBufferMaps = !lazy
        if let w = BusWindow(parsing: dmaWindow) { config.dmaWindow = w }
        let vm1 = try retrying(for: wait) { try EmulatedVM1(socketPath: socketPath, configuration: config) }
        defer { vm1.disconnect() }
        try vm1.start()
        let list = sizes.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        let result = try vm1.runTraffic(count: count, sizes: list, expectEcho: !noEcho, progress: { r in
            guard progress else { return }
            let rate = r.seconds > 0 ? Double(r.received) / r.seconds : 0
            stderr(String(format: "\rVM1: sent %d, echoed %d, verified %d, corrupt %d, %.0f pkt/s   ", r.sent, r.received, r.verified, r.corrupt, rate))
        })
        if progress { stderr("\n") }
        let pps = result.seconds > 0 ? Double(noEcho ? result.sent : result.verified) / result.seconds : 0
        let bits = Double(noEcho ? result.bytesSent : result.bytesReceived) * 8
        let summary = Summary(mode: mode, traffic: result, packetsPerSecond: pps,
                              gigabitsPerSecond: result.seconds > 0 ? bits / result.seconds / 1e9 : 0,
                              iotlbUpdatesSent: vm1.iommu?.updatesSent ?? 0, iotlbInvalidatesSent: vm1.iommu?.invalidatesSent ?? 0,
                              iotlbMissesAnswered: vm1.iommu?.missesAnswered ?? 0,
                              messages: Array(Set(vm1.frontend.sent.map(\.description))).sorted())
        _ = try? vm1.stopDevice()
        if json {
            try printJSON(summary)
        } else {
            print("VM1 (\(mode)): sent \(result.sent), echoed \(result.received), verified \(result.verified), corrupt \(result.corrupt) in \(String(format: "%.2f", result.seconds)) s — \(String(format: "%.0f", summary.packetsPerSecond)) pkt/s, \(String(format: "%.2f", summary.gigabitsPerSecond)) Gb/s")
        }
        if !result.completed { throw ExitCode(1) }
    }
}

struct VM2Command: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm2",
        abstract: "Emulated VM2: connects to a bridge's peer socket, maps VM1's memory into its BAR, and serves VM1's virtio-net rings in place."
    )

    @Option(help: "The bridge's peer socket.")
    var peerSocket: String

    @Option(help: "Run this many seconds, then print the summary and exit.")
    var duration: Double = 10

    @Option(help: "Exit early once this many packets (or real frames) were received.")
    var untilPackets: Int?

    @Flag(help: "Do not echo packets back into VM1's RX buffers.")
    var noEcho = false

    @Option(help: "What the device does with frames VM1 transmits: verify (test packets, echoed unless --no-echo), count (read every frame's headers in place, a sink) or forward (write each frame into VM1's RX buffers of the same queue pair).")
    var mode: VM2DataPath = .verify

    @Option(help: "Poll the queues this many microseconds after the last work before sleeping on kicks (VM1 is told not to kick while VM2 polls); 0 waits for kicks only.")
    var pollUs: Int = 0

    @Flag(help: "Never acknowledge MAP/UNMAP (to see the daemon disconnect a stuck VM2).")
    var noAck = false

    @Option(help: "Seconds to keep retrying the connection.")
    var wait: Double = 10

    @Flag(help: "Print one JSON summary on stdout.")
    var json = false

    func validate() throws {
        guard duration > 0 else { throw ValidationError("--duration must be > 0") }
        guard pollUs >= 0, pollUs <= 10_000_000 else { throw ValidationError("--poll-us must be in 0...10000000") }
    }

    func run() throws {
        var config = VM2Configuration()
        config.echo = !noEcho
        config.acknowledges = !noAck
        config.dataPath = mode
        config.pollFor = .microseconds(pollUs)
        let vm2 = try retrying(for: wait) { try EmulatedVM2(peerSocketPath: peerSocket, configuration: config) }
        let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int(duration * 1000)))
        while ContinuousClock.now < deadline, !vm2.isFinished {
            if let n = untilPackets {
                let s = vm2.statistics
                if s.packetsReceived >= n { break }
            }
            usleep(10_000)
        }
        let stats = vm2.statistics
        vm2.stop()
        if json {
            try printJSON(stats)
        } else {
            print("VM2: received \(stats.packetsReceived) (\(stats.packetsVerified) verified, \(stats.packetsCorrupt) corrupt, \(stats.framesValid) Ethernet frames), \(mode == .forward ? "forwarded" : "echoed") \(stats.packetsSent), refused descriptors \(stats.descriptorsRefused), maps \(stats.mapsApplied), unmaps \(stats.unmapsApplied)")
        }
    }
}

extension VM2DataPath: ExpressibleByArgument {}
