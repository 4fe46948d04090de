import ArgumentParser
import BridgeCore
import EmulatedGuests
import Foundation
import LinuxIO

struct ScaleBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scale",
        abstract: "The daemon (release build, its own process) with many bridges with large BARs and many live mappings in one: RSS, VMAs, vm.max_map_count headroom, setup and teardown time, against the same daemon idle with one bridge."
    )

    @Option(help: "Bridges in the daemon.")
    var bridges: Int = 16

    @Option(help: "BAR size of each bridge.")
    var barSize: String = "1T"

    @Option(help: "Live IOTLB mappings made in the first bridge (one 4 KiB page each, none adjacent in VM1's memory).")
    var mappings: Int = 100_000

    @Option(help: "The daemon to run.")
    var daemon: String = ".build/release/vhost-pci-bridged"

    @Option(help: "What the daemon is, for the table's heading (e.g. \"the packaged daemon\").")
    var label: String?

    @Flag(help: "Print one JSON object instead of Markdown.")
    var json = false

    struct Sample: Codable { var rssKiB: Int; var rssAnonKiB: Int; var vmas: Int }

    static func sample(_ pid: Int32) -> Sample {
        // /proc files read whole only by reading to EOF (String(contentsOfFile:) stops early).
        let maps = FileHandle(forReadingAtPath: "/proc/\(pid)/maps").map { h in
            defer { try? h.close() }
            return h.readDataToEndOfFile().reduce(0) { $0 + ($1 == 10 ? 1 : 0) }
        } ?? -1
        return Sample(rssKiB: procStatusKiB(pid, "VmRSS:"), rssAnonKiB: procStatusKiB(pid, "RssAnon:"), vmas: maps)
    }

    struct Result: Codable {
        var bridges: Int
        var barSize: String
        var mappings: Int
        var maxMapCount: Int
        var oneBridgeIdle: Sample
        var idle: Sample
        var loaded: Sample
        var setupSeconds: Double
        var mapSeconds: Double
        var teardownSeconds: Double
    }

    /// Starts the daemon with `count` bridges; returns it and how long until every socket was there.
    func start(_ count: Int, dir: String) throws -> (Process, Double) {
        var yaml = "runtime-directory: \(dir)\ncontrol-socket: \(dir)/control.sock\nlog-level: error\nbridges:\n"
        for i in 0..<count {
            yaml += "  - name: b\(i)\n    vhost-user-socket: \(dir)/b\(i)-vm1.sock\n    peer-socket: \(dir)/b\(i)-vm2.sock\n"
            yaml += "    bar-size: \(barSize)\n    mode: iommu\n    max-mappings: \(i == 0 ? mappings + 1000 : 1024)\n"
        }
        try yaml.write(toFile: "\(dir)/config.yaml", atomically: true, encoding: .utf8)
        // From a cold page cache, as after a boot: a binary just written
        // (built, copied, installed) is mapped in larger pieces, and its
        // resident size would say more about the copy than the daemon.
        try Files.dropCachedPages(daemon)
        let clock = ContinuousClock(), t0 = clock.now
        let (p, _) = try launchChild(daemon, ["--config", "\(dir)/config.yaml"], log: "\(dir)/daemon-\(count).log")
        let sockets = (0..<count).map { "\(dir)/b\($0)-vm1.sock" } + ["\(dir)/control.sock"]
        while !sockets.allSatisfy({ FileManager.default.fileExists(atPath: $0) }) {
            guard p.isRunning, t0.duration(to: clock.now) < .seconds(60) else { throw ValidationError("the daemon did not start") }
            usleep(1000)
        }
        return (p, t0.duration(to: clock.now) / .seconds(1))
    }

    func stop(_ p: Process) -> Double {
        let clock = ContinuousClock(), t0 = clock.now
        p.terminate()
        p.waitUntilExit()
        return t0.duration(to: clock.now) / .seconds(1)
    }

    func run() throws {
        guard FileManager.default.isExecutableFile(atPath: daemon) else { throw ValidationError("\(daemon) is not built: swift build -c release") }
        let dir = "/tmp/vpb-scale-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // Each mapping is ~2 VMAs and the daemon splits the budget among its
        // bridges (each guaranteed total / (n + 1)): raise vm.max_map_count for
        // the run, and put it back.
        let path = "/proc/sys/vm/max_map_count"
        let original = Int(((try? String(contentsOfFile: path, encoding: .utf8)) ?? "65530").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 65530
        let needed = (mappings + 1000) * 2 * (bridges + 1) + 8192
        if needed > original { try "\(needed)\n".write(toFile: path, atomically: false, encoding: .utf8) }
        defer { if needed > original { try? "\(original)\n".write(toFile: path, atomically: false, encoding: .utf8) } }
        let maxMapCount = max(needed, original)

        let (one, _) = try start(1, dir: dir)
        usleep(200_000)
        let oneIdle = Self.sample(one.processIdentifier)
        _ = stop(one)
        for f in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] where f.hasSuffix(".sock") { unlink("\(dir)/\(f)") }

        let (p, setup) = try start(bridges, dir: dir)
        usleep(200_000)
        let idle = Self.sample(p.processIdentifier)
        var vm1Config = VM1Configuration()
        vm1Config.iommu = .iommu
        vm1Config.eagerBufferMaps = true
        let vm1 = try EmulatedVM1(socketPath: "\(dir)/b0-vm1.sock", configuration: vm1Config)
        try vm1.start()
        guard let iommu = vm1.iommu else { throw ValidationError("VM1 has no IOMMU") }
        let clock = ContinuousClock(), t0 = clock.now
        let pages = vm1.ram.size / 4096
        for i in 0..<mappings {
            // Every other page of VM1's RAM, wrapping: no two mappings merge.
            let gpa = GuestPhysicalAddress(UInt64((2 * i) % Int(pages)) * 4096 + UInt64((2 * i) / Int(pages) % 2) * 4096)
            _ = try iommu.map(gpa, length: 4096, permission: .read, eager: true)
            if !json, i % 20_000 == 0 { FileHandle.standardError.write(Data("scale: \(i) mappings…\n".utf8)) }
        }
        let mapSeconds = t0.duration(to: clock.now) / .seconds(1)
        let loaded = Self.sample(p.processIdentifier)
        let teardown = stop(p)
        vm1.disconnect()
        let r = Result(bridges: bridges, barSize: barSize, mappings: mappings, maxMapCount: maxMapCount, oneBridgeIdle: oneIdle,
                       idle: idle, loaded: loaded, setupSeconds: setup, mapSeconds: mapSeconds, teardownSeconds: teardown)
        if json {
            try printJSON(["scale": r])
            return
        }
        print("### Scale\(label.map { ", \($0)" } ?? "") (`vhost-pci-bench scale`: \(bridges) bridges of \(barSize), \(mappings) live IOTLB mappings in one)\n")
        print("The daemon\(label == nil ? " (`\(daemon)`)" : "") in its own process, started from a cold page cache (its binary's pages dropped first, as after a boot), configured from a file; VM1 (emulated, IOMMU) sends one acked IOTLB update per mapping. `vm.max_map_count` raised to \(maxMapCount) for the run (each mapping is about two VMAs and each of the \(bridges) bridges is guaranteed 1/\(bridges + 1) of the budget).\n")
        print("| state | RSS MiB | of which anonymous MiB | VMAs | VMA headroom |")
        print("|---|---:|---:|---:|---:|")
        for (name, s) in [("1 bridge, idle (baseline)", oneIdle), ("\(bridges) bridges, idle", idle), ("\(bridges) bridges, \(mappings) mappings", loaded)] {
            print(String(format: "| %@ | %.1f | %.1f | %d | %d |", name, Double(s.rssKiB) / 1024, Double(s.rssAnonKiB) / 1024, s.vmas, maxMapCount - s.vmas))
        }
        print(String(format: "\nSetup (start → every socket listening): %.3f s. %d mappings: %.2f s (%.1f µs each, acked). Teardown with them live (SIGTERM → exit): %.3f s. RSS per live mapping: %.0f bytes.",
                     setup, mappings, mapSeconds, mapSeconds * 1e6 / Double(mappings), teardown,
                     Double(loaded.rssKiB - idle.rssKiB) * 1024 / Double(mappings)))
    }
}
