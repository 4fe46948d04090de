import ArgumentParser
import BridgeCore
import ControlClient
import EmulatedGuests
import Foundation
import LinuxIO

/// `make soak`: the release daemon in its own process under churn — traffic
/// with IOTLB updates and invalidates for every buffer, VM2 and VM1
/// reconnecting, control queries — sampled every second. Fails when the
/// daemon's RSS, fds or mappings grow without bound, or when anything is
/// left once both guests are gone.
struct SoakBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "soak",
        abstract: "Soak the release daemon (own process) with traffic, IOTLB churn, VM1/VM2 reconnects and control queries; sample RSS, fds and mappings every second; fail on unbounded growth or leftovers."
    )

    @Option(help: "Seconds to run.")
    var seconds: Int = 600

    @Option(help: "The daemon to run.")
    var daemon: String = ".build/release/vhost-pci-bridged"

    @Flag(help: "Print one JSON object instead of the report.")
    var json = false

    struct Sample: Codable { var t: Int; var rssKiB: Int; var fds: Int; var mappings: Int; var packets: Int }

    static func rssKiB(_ pid: Int32) -> Int { procStatusKiB(pid, "VmRSS:") }

    static func fdCount(_ pid: Int32) -> Int {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []).count
    }

    func mappings(_ dir: String) -> Int {
        guard let c = try? ControlClient(path: "\(dir)/control.sock"),
              case .ok(let details)? = try? c.call(.show(name: "soak"), expecting: BridgeDetails.self).reply else { return -1 }
        return details.counters.mappings
    }

    func run() throws {
        guard FileManager.default.isExecutableFile(atPath: daemon) else { throw ValidationError("\(daemon) is not built: swift build -c release") }
        let dir = "/tmp/vpb-soak-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let yaml = "runtime-directory: \(dir)\ncontrol-socket: \(dir)/control.sock\nlog-level: error\nbridges:\n"
            + "  - name: soak\n    vhost-user-socket: \(dir)/vm1.sock\n    peer-socket: \(dir)/vm2.sock\n    bar-size: 64G\n    mode: iommu\n    revocation-deadline-ms: 2000\n"
        try yaml.write(toFile: "\(dir)/config.yaml", atomically: true, encoding: .utf8)
        let (p, stdin) = try launchChild(daemon, ["--config", "\(dir)/config.yaml"], log: "\(dir)/daemon.log")
        defer { p.terminate(); finishChild(p, stdin) }
        for _ in 0..<500 where !FileManager.default.fileExists(atPath: "\(dir)/vm1.sock") { usleep(10_000) }
        let pid = p.processIdentifier
        usleep(200_000)
        let idle = Sample(t: 0, rssKiB: Self.rssKiB(pid), fds: Self.fdCount(pid), mappings: mappings(dir), packets: 0)

        var samples: [Sample] = []
        var vm1Config = VM1Configuration()
        vm1Config.iommu = .iommu
        vm1Config.eagerBufferMaps = true // an update and an invalidate for every buffer
        var vm2 = try EmulatedVM2(peerSocketPath: "\(dir)/vm2.sock")
        var vm1 = try EmulatedVM1(socketPath: "\(dir)/vm1.sock", configuration: vm1Config)
        try vm1.start()
        let clock = ContinuousClock()
        let start = clock.now
        var nextSample = 1, packets = 0, vm1Reconnects = 0, vm2Reconnects = 0, queries = 0, incomplete = 0
        while start.duration(to: clock.now) < .seconds(seconds) {
            let r = try vm1.runTraffic(count: 200, sizes: [64, 1500, 9000])
            packets += r.verified
            if !r.completed { incomplete += 1 }
            let elapsed = Int(start.duration(to: clock.now) / .seconds(1))
            if let c = try? ControlClient(path: "\(dir)/control.sock"), (try? c.call(.status, expecting: DaemonStatus.self)) != nil { queries += 1 }
            if elapsed >= nextSample {
                samples.append(Sample(t: elapsed, rssKiB: Self.rssKiB(pid), fds: Self.fdCount(pid), mappings: mappings(dir), packets: packets))
                nextSample = elapsed + 1
                if !json, elapsed % 30 == 0 {
                    FileHandle.standardError.write(Data("soak: \(elapsed) s, \(packets) packets, RSS \(samples.last!.rssKiB) KiB, fds \(samples.last!.fds)\n".utf8))
                }
                if elapsed % 10 == 5 { vm2.stop(); vm2 = try EmulatedVM2(peerSocketPath: "\(dir)/vm2.sock"); vm2Reconnects += 1 }
                if elapsed % 15 == 7 {
                    vm1.disconnect()
                    vm1 = try EmulatedVM1(socketPath: "\(dir)/vm1.sock", configuration: vm1Config)
                    try vm1.start()
                    vm1Reconnects += 1
                }
            }
        }
        vm1.disconnect()
        vm2.stop()
        for _ in 0..<200 where Self.fdCount(pid) > idle.fds { usleep(10_000) }
        usleep(200_000)
        let end = Sample(t: seconds, rssKiB: Self.rssKiB(pid), fds: Self.fdCount(pid), mappings: mappings(dir), packets: packets)

        // Growth: the last quarter against the second (the first is warm-up).
        func quarter(_ q: Int) -> ArraySlice<Sample> {
            let n = samples.count / 4
            return n == 0 ? samples[...] : samples[(q * n)..<min(samples.count, (q + 1) * n)]
        }
        let (early, late) = (quarter(1), quarter(3))
        // Medians for what traffic moves up and down (RSS, live mappings),
        // maxima for fds (any step up that stays is a leak).
        func median(_ v: [Int]) -> Int { v.isEmpty ? 0 : v.sorted()[v.count / 2] }
        let rssEarly = median(early.map(\.rssKiB)), rssLate = median(late.map(\.rssKiB))
        let fdsEarly = early.map(\.fds).max() ?? 0, fdsLate = late.map(\.fds).max() ?? 0
        let mapEarly = median(early.map(\.mappings)), mapLate = median(late.map(\.mappings))
        var failures: [String] = []
        if rssLate > rssEarly + max(4096, rssEarly / 20) { failures.append("RSS grew from \(rssEarly) to \(rssLate) KiB") }
        if fdsLate > fdsEarly + 2 { failures.append("fds grew from \(fdsEarly) to \(fdsLate)") }
        if mapLate > mapEarly + 64 { failures.append("mappings grew from \(mapEarly) to \(mapLate)") }
        if end.fds != idle.fds { failures.append("\(end.fds) fds after both guests left, \(idle.fds) before they came") }
        if end.mappings != 0 { failures.append("\(end.mappings) mappings left after VM1 left") }
        if packets == 0 { failures.append("no traffic") }

        struct Report: Codable {
            var seconds: Int; var packets: Int; var vm1Reconnects: Int; var vm2Reconnects: Int; var controlQueries: Int
            var incompleteRounds: Int; var idle: Sample; var end: Sample; var samples: [Sample]; var failures: [String]
        }
        let report = Report(seconds: seconds, packets: packets, vm1Reconnects: vm1Reconnects, vm2Reconnects: vm2Reconnects,
                            controlQueries: queries, incompleteRounds: incomplete, idle: idle, end: end, samples: samples, failures: failures)
        if json {
            try printJSON(report)
        } else {
            print("soak: \(seconds) s, \(packets) packets verified, \(vm1Reconnects) VM1 and \(vm2Reconnects) VM2 reconnects, \(queries) control queries, \(incomplete) rounds cut by a reconnect")
            print("            start (idle)   end (guests gone)")
            print(String(format: "RSS KiB     %-14d %d", idle.rssKiB, end.rssKiB))
            print(String(format: "fds         %-14d %d", idle.fds, end.fds))
            print(String(format: "mappings    %-14d %d", idle.mappings, end.mappings))
            print("RSS  " + Self.sparkline(samples.map(\.rssKiB)) + "  \(samples.map(\.rssKiB).min() ?? 0)–\(samples.map(\.rssKiB).max() ?? 0) KiB")
            print("fds  " + Self.sparkline(samples.map(\.fds)) + "  \(samples.map(\.fds).min() ?? 0)–\(samples.map(\.fds).max() ?? 0)")
            print("maps " + Self.sparkline(samples.map(\.mappings)) + "  \(samples.map(\.mappings).min() ?? 0)–\(samples.map(\.mappings).max() ?? 0)")
            print(failures.isEmpty ? "soak: PASSED" : "soak: FAILED: " + failures.joined(separator: "; "))
        }
        if !failures.isEmpty { throw ExitCode(1) }
    }

    /// One character per sample (at most 60, averaged), low to high.
    static func sparkline(_ values: [Int]) -> String {
        guard let lo = values.min(), let hi = values.max(), !values.isEmpty else { return "" }
        let bars = Array("▁▂▃▄▅▆▇█")
        let step = max(1, values.count / 60)
        return stride(from: 0, to: values.count, by: step).map { i -> Character in
            let chunk = values[i..<min(values.count, i + step)]
            let v = chunk.reduce(0, +) / chunk.count
            return hi == lo ? bars[0] : bars[min(bars.count - 1, (v - lo) * (bars.count - 1) / (hi - lo))]
        }.map(String.init).joined()
    }
}
