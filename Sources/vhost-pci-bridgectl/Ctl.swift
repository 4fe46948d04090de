import ArgumentParser
import BridgeCore
import ControlClient
import Foundation

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
    func call(_ request: [String: Any], evenWithJSON: Bool = false) throws -> Any? {
        let response: [String: Any]
        do {
            let client = try ControlClient(path: socket)
            response = try client.call(request)
        } catch {
            FileHandle.standardError.write(Data("vhost-pci-bridgectl: \(error)\n".utf8))
            throw ExitCode(2)
        }
        if json, let data = try? JSONSerialization.data(withJSONObject: response, options: [.sortedKeys, .prettyPrinted]) {
            print(String(decoding: data, as: UTF8.self))
        }
        guard response["ok"] as? Bool == true else {
            let e = response["error"] as? [String: Any]
            FileHandle.standardError.write(Data("vhost-pci-bridgectl: \(e?["code"] as? String ?? "error"): \(e?["message"] as? String ?? "refused")\n".utf8))
            throw ExitCode(1)
        }
        return json && !evenWithJSON ? nil : response["result"]
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Daemon status: uptime, bridges, sessions.")
    @OptionGroup var common: Common
    func run() throws {
        if let r = try common.call(["command": "status"]) as? [String: Any] { print(Render.keyValues(r), terminator: "") }
    }
}

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "One line per bridge.")
    @OptionGroup var common: Common
    func run() throws {
        if let r = try common.call(["command": "list"]) as? [[String: Any]] { print(Render.list(r), terminator: "") }
    }
}

struct Show: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Everything about one bridge.")
    @OptionGroup var common: Common
    @Argument(help: "Bridge name.") var name: String
    func run() throws {
        guard var r = try common.call(["command": "show", "name": name]) as? [String: Any] else { return }
        let config = r.removeValue(forKey: "config") as? [String: Any]
        let session = r.removeValue(forKey: "session") as? [String: Any]
        print(Render.keyValues(r), terminator: "")
        if let config { print("\nconfig:\n" + Render.keyValues(config), terminator: "") }
        if let session { print("\nsession:\n" + Render.keyValues(session), terminator: "") }
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
        var spec: [String: Any] = ["name": name, "bar-size": barSize, "mode": mode]
        if let vhostUserSocket { spec["vhost-user-socket"] = vhostUserSocket }
        if let peerSocket { spec["peer-socket"] = peerSocket }
        if let vm2 { spec["vm2"] = vm2 }
        if let dmaWindow { spec["dma-window"] = dmaWindow }
        if !staticWindows.isEmpty { spec["static-windows"] = staticWindows }
        if let notifications { spec["notifications"] = notifications }
        if try common.call(["command": "create", "bridge": spec]) != nil { print("created \(name)") }
    }
}

struct Destroy: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Stop a bridge: revoke everything from VM2, end the sessions, free the BAR.")
    @OptionGroup var common: Common
    @Argument(help: "Bridge name.") var name: String
    func run() throws { if try common.call(["command": "destroy", "name": name]) != nil { print("destroyed \(name)") } }
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
        if let r = try common.call(["command": "map", "name": name, "bus": bus, "gpa": gpa, "length": length, "perm": perm]) as? [String: Any] {
            print("\(name): \(r["result"] as? String ?? "done")")
        }
    }
}

struct UnmapCmd: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "unmap", abstract: "Revoke a bus range (VM2 acknowledges before this returns).")
    @OptionGroup var common: Common
    @Argument(help: "Bridge name.") var name: String
    @Option(help: "Bus address.") var bus: String
    @Option(help: "Length.") var length: String
    func run() throws {
        if let r = try common.call(["command": "unmap", "name": name, "bus": bus, "length": length]) as? [String: Any] {
            print("\(name): \(r["result"] as? String ?? "done")")
        }
    }
}

struct Freeze: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Static mode: freeze the BAR; every later change is refused and counted.")
    @OptionGroup var common: Common
    @Argument(help: "Bridge name.") var name: String
    func run() throws { if try common.call(["command": "freeze", "name": name]) != nil { print("\(name): frozen") } }
}

struct Stats: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Counters per bridge.")
    @OptionGroup var common: Common
    @Argument(help: "Bridge name (all when omitted).") var name: String?
    func run() throws {
        var request: [String: Any] = ["command": "stats"]
        if let name { request["name"] = name }
        guard let r = try common.call(request) else { return }
        if let one = r as? [String: Any] { print(Render.keyValues(one), terminator: "") }
        if let all = r as? [[String: Any]] { print(Render.stats(all), terminator: "") }
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
        guard let r = try common.call(["command": "metrics"]) as? [String: Any] else { return }
        let text = r["text"] as? String ?? ""
        guard let output else { print(text, terminator: ""); return }
        do {
            try Data(text.utf8).write(to: URL(fileURLWithPath: output), options: .atomic)
        } catch {
            FileHandle.standardError.write(Data("vhost-pci-bridgectl: cannot write \(output): \(error.localizedDescription)\n".utf8))
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
        let r = try common.call(["command": "reload"], evenWithJSON: true) as? [String: Any]
        if !common.json, let r { print(Render.keyValues(r), terminator: "") }
        if let failed = r?["failed"] as? [String: Any], !failed.isEmpty {
            let text = failed.keys.sorted().map { "\($0): \(failed[$0] ?? "")" }.joined(separator: "; ")
            FileHandle.standardError.write(Data("vhost-pci-bridgectl: reload: not every bridge started: \(text)\n".utf8))
            throw ExitCode(1)
        }
    }
}

struct LogLevel: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "log-level", abstract: "Change the log level now.")
    @OptionGroup var common: Common
    @Argument(help: "trace, debug, info, notice, warning, error or critical.") var level: String
    func run() throws {
        if let r = try common.call(["command": "log-level", "level": level]) as? [String: Any] { print("log level: \(r["logLevel"] as? String ?? level)") }
    }
}
