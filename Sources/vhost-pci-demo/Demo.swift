import ArgumentParser
import BridgeCore
import Foundation

@main
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vhost-pci-demo",
        abstract: "The vhost-pci bridge in action: the daemon, an emulated VM1 and an emulated VM2 as three processes.",
        version: BuildInfo.version,
        subcommands: [Run.self, Walkthrough.self],
        defaultSubcommand: Run.self
    )
}

/// Where the sibling executables are (the directory of this one).
func siblingExecutable(_ name: String) -> String {
    let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    return URL(fileURLWithPath: me).deletingLastPathComponent().appendingPathComponent(name).path
}

/// Unbuffered stdout, so the lines interleave correctly with the guests' progress.
func say(_ text: String) {
    FileHandle.standardOutput.write(Data((text + "\n").utf8))
}

struct DemoError: Error, CustomStringConvertible {
    var description: String
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Start vhost-pci-bridged, vhost-pci-guest vm2 and vhost-pci-guest vm1; move packets VM1 → VM2 → VM1 in place; print a summary."
    )

    @Option(help: "Packets in the 1500-byte phases.")
    var packets: Int = 20_000

    @Option(help: "Packets in the 64 KiB phase.")
    var largePackets: Int = 4_000

    @Option(help: "BAR size of the demo bridge.")
    var barSize: String = "64G"

    struct VM1Summary: Decodable {
        struct Traffic: Decodable { var sent: Int; var received: Int; var verified: Int; var corrupt: Int; var seconds: Double; var completed: Bool }
        var traffic: Traffic
        var packetsPerSecond: Double
        var gigabitsPerSecond: Double
        var iotlbUpdatesSent: Int
        var iotlbInvalidatesSent: Int
    }

    struct VM2Summary: Decodable {
        var packetsReceived: Int
        var packetsVerified: Int
        var packetsCorrupt: Int
        var packetsSent: Int
        var descriptorsRefused: Int
        var mapsApplied: Int
        var unmapsApplied: Int
    }

    struct Phase {
        var title: String
        var mode: String
        var count: Int
        var size: Int
    }

    func start(_ name: String, _ arguments: [String], stdout: Pipe? = nil) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: siblingExecutable(name))
        p.arguments = arguments
        if let stdout { p.standardOutput = stdout }
        try p.run()
        return p
    }

    @Option(help: "The daemon's config file (the demo runs its two bridges, demo-identity and demo-iommu).")
    var config: String = "config/vhost-pci-bridged.yaml"

    func run() throws {
        let dir = "/tmp/vhost-pci-demo-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        guard FileManager.default.fileExists(atPath: config) else { throw DemoError(description: "no config at \(config) (run from the repository, or pass --config)") }
        let phases = [
            Phase(title: "identity, 1500 B", mode: "identity", count: packets, size: 1500),
            Phase(title: "identity, 64 KiB", mode: "identity", count: largePackets, size: 65536),
            Phase(title: "iommu, 1500 B", mode: "iommu", count: packets / 4, size: 1500),
        ]
        say("vhost-pci-bridge demo: daemon + emulated VM1 + emulated VM2, three processes, packets moved in place through the BAR\n")
        // One daemon runs both bridges of the config; its sockets go to a scratch runtime directory.
        let daemon = try start("vhost-pci-bridged", ["--config", config, "--runtime-directory", dir, "--log-level", "warning"])
        defer {
            if daemon.isRunning { daemon.terminate() }
            daemon.waitUntilExit()
        }
        say("vhost-pci-bridged --config \(config) --runtime-directory \(dir)")
        var rows: [(Phase, VM1Summary, VM2Summary)] = []
        for phase in phases {
            let vhost = "\(dir)/demo-\(phase.mode)-vm1.sock", peer = "\(dir)/demo-\(phase.mode)-vm2.sock"
            say("[\(phase.title)] vhost-pci-guest vm2 --peer-socket \(peer) & vhost-pci-guest vm1 --socket-path \(vhost) --mode \(phase.mode)")
            let vm2Out = Pipe(), vm1Out = Pipe()
            let vm2 = try start("vhost-pci-guest", ["vm2", "--peer-socket", peer, "--duration", "120",
                                                    "--until-packets", "\(phase.count)", "--json"], stdout: vm2Out)
            let vm1 = try start("vhost-pci-guest", ["vm1", "--socket-path", vhost, "--mode", phase.mode, "--count", "\(phase.count)",
                                                    "--sizes", "\(phase.size)", "--dma-window", "4G:64G", "--progress", "--json"], stdout: vm1Out)
            let vm1Data = vm1Out.fileHandleForReading.readDataToEndOfFile()
            vm1.waitUntilExit()
            let vm2Data = vm2Out.fileHandleForReading.readDataToEndOfFile()
            vm2.waitUntilExit()
            guard let a = try? JSONDecoder().decode(VM1Summary.self, from: vm1Data),
                  let b = try? JSONDecoder().decode(VM2Summary.self, from: vm2Data) else {
                throw DemoError(description: "phase '\(phase.title)': a guest failed (vm1 exit \(vm1.terminationStatus), vm2 exit \(vm2.terminationStatus))")
            }
            rows.append((phase, a, b))
        }
        // The operator's view of the same daemon.
        let ctl = Process()
        ctl.executableURL = URL(fileURLWithPath: siblingExecutable("vhost-pci-bridgectl"))
        ctl.arguments = ["stats", "--socket", "\(dir)/control.sock"]
        say("\nvhost-pci-bridgectl stats:")
        if (try? ctl.run()) != nil { ctl.waitUntilExit() }
        daemon.terminate()
        say("\n| phase | packets | VM2 verified in place | echoed into VM1 RX | VM1 verified | corrupt | refused | packets/s | Gb/s |")
        say("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        var ok = true
        for (p, a, b) in rows {
            ok = ok && a.traffic.completed && a.traffic.corrupt == 0 && b.packetsCorrupt == 0
            say(String(format: "| %@ | %d | %d | %d | %d | %d | %d | %.0f | %.2f |", p.title, p.count, b.packetsVerified, b.packetsSent,
                         a.traffic.verified, a.traffic.corrupt + b.packetsCorrupt, b.descriptorsRefused, a.packetsPerSecond, a.gigabitsPerSecond))
        }
        say("\n\(ok ? "All packets verified in place by VM2 and echoed back intact." : "Some packets were lost or corrupted.")")
        if !ok { throw ExitCode(1) }
    }
}
