import ArgumentParser
import BridgeCore
import ControlClient
import FoundationEssentials
import LinuxIO

/// Exit codes: 0 done; 1 the daemon refused the request (its error is
/// printed); 2 the daemon could not be reached or answered nonsense.
@main
struct Ctl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vhost-pci-bridgectl",
        abstract: "Operate a running vhost-pci-bridged through its control socket.",
        discussion: "Exit status: 0 done, 1 the daemon refused the request, 2 the daemon could not be reached.",
        version: BuildInfo.version,
        subcommands: [Status.self, List.self, Show.self, Create.self, Destroy.self, MapCmd.self, UnmapCmd.self, Freeze.self,
                      Stats.self, Metrics.self, Reload.self, LogLevel.self]
    )
}

struct Common: ParsableArguments {
    @Option(help: "The daemon's control socket.")
    var socket: String = "/run/vhost-pci-bridged/control.sock"

    @Flag(help: "Print the daemon's JSON response instead of a table.")
    var json = false

    /// Sends the request; prints errors; returns the result on success (with
    /// --json, after printing the response, only when `evenWithJSON`).
    func call<Result: Decodable>(_ request: ControlRequest, _: Result.Type = Result.self, evenWithJSON: Bool = false) throws -> Result? {
        let reply: ControlReply<Result>, line: String
        do {
            let client = try ControlClient(path: socket)
            (reply, line) = try client.call(request, expecting: Result.self)
        } catch {
            Files.writeStandardError("vhost-pci-bridgectl: \(error)\n")
            throw ExitCode(2)
        }
        if json, let response = try? JSONDecoder().decode(ConfigValue.self, from: Data(line.utf8)),
           let text = ControlProtocol.encode(response, pretty: true) {
            print(text)
        }
        switch reply {
        case .refused(let e):
            Files.writeStandardError("vhost-pci-bridgectl: \(e.code): \(e.message)\n")
            throw ExitCode(1)
        case .ok(let result):
            return json && !evenWithJSON ? nil : result
        }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Daemon status: uptime, bridges, sessions.")
    @OptionGroup var common: Common
    func run() throws {
        if let r = try common.call(.status, DaemonStatus.self) { print(Render.keyValues(r), terminator: "") }
    }
}

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "One line per bridge.")
    @OptionGroup var common: Common
    func run() throws {
        if let r = try common.call(.list, [BridgeSummary].self) { print(Render.list(r), terminator: "") }
    }
}

struct Show: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Everything about one bridge.")
    @OptionGroup var common: Common
    @Argument(help: "Bridge name.") var name: String
    func run() throws {
        guard let r = try common.call(.show(name: name), BridgeDetails.self) else { return }
        print(Render.keyValues(r.counters), terminator: "")
        print("\nconfig:\n" + Render.keyValues(r.config), terminator: "")
        if let session = r.session { print("\nsession:\n" + Render.keyValues(session), terminator: "") }
    }
}

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create and start a bridge (validated like a config file entry).")
    @OptionGroup var common: Common
    @Argument(help: "Bridge name.") var name: String
    @Option(help: "BAR size (power of two).") var barSize: String
    @Option(help: "identity, iommu or static.") var mode: String = "identity"
    @Option(help: "vhost-user socket path.") var vhostUserSocket: String?
    @Option(help: "Peer (VM2) socket path.") var peerSocket: String?
    @Option(help: "VM2 name (for the BAR budget).") var vm2: String?
    @Option(help: "DMA window BASE:LIMIT.") var dmaWindow: String?
    @Option(name: .customLong("static-window"), help: "Static window BASE:LIMIT (repeatable).") var staticWindows: [String] = []
    @Option(help: "relay, relay-sqpoll or passthrough.") var notifications: String?
    func run() throws {
        var spec: [String: ConfigValue] = ["name": .string(name), "bar-size": .string(barSize), "mode": .string(mode)]
        if let vhostUserSocket { spec["vhost-user-socket"] = .string(vhostUserSocket) }
        if let peerSocket { spec["peer-socket"] = .string(peerSocket) }
        if let vm2 { spec["vm2"] = .string(vm2) }
        if let dmaWindow { spec["dma-window"] = .string(dmaWindow) }
        if !staticWindows.isEmpty { spec["static-windows"] = .list(staticWindows.map(ConfigValue.string)) }
        if let notifications { spec["notifications"] = .string(notifications) }
        if try common.call(.create(bridge: spec), CreatedBridge.self) != nil { print("created \(name)") }
    }
}

struct Destroy: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Stop a bridge: revoke everything from VM2, end the sessions, free the BAR.")
    @OptionGroup var common: Common
    @Argument(help: "Bridge name.") var name: String
    func run() throws { if try common.call(.destroy(name: name), DestroyedBridge.self) != nil { print("destroyed \(name)") } }
}

struct MapCmd: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "map", abstract: "Map VM1 guest-physical memory at a bus address (static windows).")
    @OptionGroup var common: Common
    @Argument(help: "Bridge name.") var name: String
    @Option(help: "Bus address (BAR offset), e.g. 0x100000.") var bus: String
    @Option(help: "VM1 guest-physical address.") var gpa: String
    @Option(help: "Length, e.g. 2M.") var length: String
    @Option(help: "r, w or rw.") var perm: String = "rw"
    func run() throws {
        let arguments = MapArguments(bus: .text(bus), gpa: .text(gpa), length: .text(length), permission: perm)
        if let r = try common.call(.map(name: name, arguments), BridgeOperation.self) { print("\(name): \(r.result)") }
    }
}

struct UnmapCmd: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "unmap", abstract: "Revoke a bus range (VM2 acknowledges before this returns).")
    @OptionGroup var common: Common
    @Argument(help: "Bridge name.") var name: String
    @Option(help: "Bus address.") var bus: String
    @Option(help: "Length.") var length: String
    func run() throws {
        if let r = try common.call(.unmap(name: name, UnmapArguments(bus: .text(bus), length: .text(length))), BridgeOperation.self) {
            print("\(name): \(r.result)")
        }
    }
}

struct Freeze: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Static mode: freeze the BAR; every later change is refused and counted.")
    @OptionGroup var common: Common
    @Argument(help: "Bridge name.") var name: String
    func run() throws { if try common.call(.freeze(name: name), BridgeOperation.self) != nil { print("\(name): frozen") } }
}

struct Stats: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Counters per bridge.")
    @OptionGroup var common: Common
    @Argument(help: "Bridge name (all when omitted).") var name: String?
    func run() throws {
        if let name {
            if let one = try common.call(.stats(name: name), BridgeCounters.self) { print(Render.keyValues(one), terminator: "") }
        } else if let all = try common.call(.stats(name: nil), [BridgeCounters].self) {
            print(Render.stats(all), terminator: "")
        }
    }
}

struct Metrics: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Prometheus text exposition of every bridge's metrics.",
        discussion: "With --output, the file is replaced atomically (a temporary file renamed over it), as node_exporter's textfile collector needs; the shipped vhost-pci-bridged-metrics.timer runs this every 15 s."
    )
    @OptionGroup var common: Common
    @Option(help: "Write the exposition to this file (atomically) instead of standard output, e.g. /var/lib/prometheus/node-exporter/vhost-pci-bridged.prom.")
    var output: String?
    func run() throws {
        guard let text = try common.call(.metrics, MetricsText.self)?.text else { return }
        guard let output else { print(text, terminator: ""); return }
        do {
            try Files.writeAtomically(output, Array(text.utf8))
        } catch {
            Files.writeStandardError("vhost-pci-bridgectl: cannot write \(output): \(error)\n")
            throw ExitCode(1)
        }
    }
}

struct Reload: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Re-read the config file: add and remove bridges, apply the log level; report what needs a restart.",
        discussion: "Waits for the daemon to finish. Exits 1 when the daemon refused the file (it keeps running the old config) or a new bridge failed to start: the unit's ExecReload runs this, so 'systemctl reload' fails too."
    )
    @OptionGroup var common: Common
    func run() throws {
        let r = try common.call(.reload, ReloadReport.self, evenWithJSON: true)
        if !common.json, let r { print(Render.keyValues(r), terminator: "") }
        if let failed = r?.failed, !failed.isEmpty {
            let text = failed.keys.sorted().map { "\($0): \(failed[$0] ?? "")" }.joined(separator: "; ")
            Files.writeStandardError("vhost-pci-bridgectl: reload: not every bridge started: \(text)\n")
            throw ExitCode(1)
        }
    }
}

struct LogLevel: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "log-level", abstract: "Change the log level now.")
    @OptionGroup var common: Common
    @Argument(help: "trace, debug, info, notice, warning, error or critical.") var level: String
    func run() throws {
        if let r = try common.call(.logLevel(level), LogLevelSet.self) { print("log level: \(r.logLevel)") }
    }
}
