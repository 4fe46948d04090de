import BridgeCore
import Foundation
import LinuxIO
import Logging
import VhostUser

/// The control socket's protocol (docs/operating.md): one JSON object per
/// line each way. Request `{"command": "...", ...}`; response
/// `{"version": 1, "ok": true, "result": ...}` or
/// `{"version": 1, "ok": false, "error": {"code": "...", "message": "..."}}`.
public enum ControlProtocol {
    public static let version = 1
    /// Longest request line accepted; longer ones get an error and are discarded.
    public static let maximumLine = 65_536
    public static let commands = ["status", "list", "show", "create", "destroy", "map", "unmap", "freeze", "stats", "metrics", "reload", "log-level"]

    public static func response(ok result: Any) -> String {
        encode(["version": version, "ok": true, "result": result])
    }

    public static func response(error: ControlError) -> String {
        encode(["version": version, "ok": false, "error": ["code": error.code, "message": error.message]])
    }

    static func encode(_ object: Any) -> String {
        guard JSONSerialization.isValidJSONObject(object),
              let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else {
            return #"{"error":{"code":"internal","message":"unencodable response"},"ok":false,"version":1}"#
        }
        return String(decoding: data, as: UTF8.self)
    }
}

extension DaemonController {
    /// Handles one request line; never throws, always answers.
    public func handle(line: String,
                       reloadConfig: () -> Result<DaemonConfig, ControlError> = { .failure(ControlError("no-config", "the daemon was not started with --config")) }) -> String {
        guard line.utf8.count <= ControlProtocol.maximumLine else {
            return ControlProtocol.response(error: ControlError("too-long", "request of \(line.utf8.count) bytes exceeds \(ControlProtocol.maximumLine)"))
        }
        guard let data = line.data(using: .utf8), let object = try? JSONSerialization.jsonObject(with: data),
              let request = object as? [String: Any] else {
            return ControlProtocol.response(error: ControlError("bad-json", "the request is not a JSON object"))
        }
        if let v = request["version"] as? Int, v != ControlProtocol.version {
            return ControlProtocol.response(error: ControlError("version", "protocol version \(v) is not supported (this daemon speaks \(ControlProtocol.version))"))
        }
        guard let command = request["command"] as? String else {
            return ControlProtocol.response(error: ControlError("bad-request", "missing \"command\""))
        }
        do {
            return ControlProtocol.response(ok: try run(command, request, reloadConfig: reloadConfig))
        } catch {
            return ControlProtocol.response(error: error)
        }
    }

    private func string(_ r: [String: Any], _ key: String) throws(ControlError) -> String {
        guard let v = r[key] as? String, !v.isEmpty else { throw ControlError("bad-request", "missing \"\(key)\"") }
        return v
    }

    private func number(_ r: [String: Any], _ key: String) throws(ControlError) -> UInt64 {
        if let n = r[key] as? NSNumber, n.int64Value >= 0 { return n.uint64Value }
        if let s = r[key] as? String, let v = parseByteSize(s) { return v }
        throw ControlError("bad-request", "\"\(key)\" must be a number or a size such as 0x1000 or 4K")
    }

    private func run(_ command: String, _ r: [String: Any], reloadConfig: () -> Result<DaemonConfig, ControlError>) throws(ControlError) -> Any {
        switch command {
        case "status":
            let all = bridgeNames.compactMap { try? bridge($0).statistics }
            return ["version": ControlProtocol.version, "uptimeSeconds": uptimeSeconds, "bridges": all.count,
                    "vm1Sessions": all.filter(\.activeSession).count, "vm2Connected": all.filter(\.peer.connected).count,
                    "logLevel": config.logLevel.rawValue, "controlSocket": config.controlSocket, "pid": Int(getpid()),
                    "createdBridges": createdBridgeNames, "stateFile": createdBridges?.path ?? "",
                    "lastError": lastError ?? "", "buildVersion": BuildInfo.version] as [String: Any]
        case "list":
            return bridgeNames.compactMap { name -> [String: Any]? in
                guard let c = bridgeConfig(name), let b = try? bridge(name) else { return nil }
                let s = b.statistics
                return ["name": name, "mode": c.addressSpace.mode.rawValue, "barSize": c.addressSpace.barSize,
                        "vhostUserSocket": c.vhostUserSocket, "peerSocket": c.peerSocket ?? "", "vm2": c.vm2,
                        "vm1Connected": s.activeSession, "vm2Connected": s.peer.connected,
                        "mappings": s.session?.mappings ?? 0, "bytesMapped": s.session?.mappedBytes ?? 0]
            }
        case "show":
            let name = try string(r, "name")
            guard let c = bridgeConfig(name) else { throw ControlError("unknown-bridge", "no bridge named \(name)") }
            let s = try bridge(name).statistics
            var out = statisticsObject(name, s)
            out["config"] = ["barSize": c.addressSpace.barSize, "mode": c.addressSpace.mode.rawValue,
                             "dmaWindow": c.addressSpace.dmaWindow?.description ?? "",
                             "staticWindows": c.addressSpace.staticWindows.map(\.description),
                             "notifications": c.notifications.rawValue, "revocationDeadlineMs": c.revocationDeadlineMilliseconds,
                             "maxMappings": c.addressSpace.maxMappings, "vhostUserSocket": c.vhostUserSocket,
                             "peerSocket": c.peerSocket ?? "", "vm2": c.vm2, "client": c.client, "cpuAffinity": c.cpuAffinity] as [String: Any]
            if let v = s.session {
                out["session"] = ["regions": v.regions, "mappings": v.mappings, "bytesMapped": v.mappedBytes,
                                  "startedRings": v.startedRings, "enabledRings": v.enabledRings, "frozen": v.frozen,
                                  "features": v.ackedFeatures.map { "0x" + String($0, radix: 16) } ?? "",
                                  "protocolFeatures": v.protocolFeatures.description] as [String: Any]
            }
            return out
        case "create":
            guard let spec = r["bridge"] as? [String: Any] else { throw ControlError("bad-request", "missing \"bridge\" object") }
            let b: BridgeConfig
            do { b = try DaemonConfig.bridge(spec, key: "bridge", runtimeDirectory: config.runtimeDirectory) } catch {
                throw ControlError("invalid", error.description)
            }
            let json = (try? JSONSerialization.data(withJSONObject: spec, options: [.sortedKeys])).map { String(decoding: $0, as: UTF8.self) }
            let kept = try createFromClient(b, spec: json)
            return ["created": b.name, "persistent": kept] as [String: Any]
        case "destroy":
            let name = try string(r, "name")
            try destroy(name)
            return ["destroyed": name]
        case "map", "unmap", "freeze":
            let name = try string(r, "name")
            let b = try bridge(name)
            let cmd: BridgeCommand
            switch command {
            case "map":
                let permText = (r["perm"] as? String) ?? "rw"
                let perm: Permission
                switch permText {
                case "r": perm = .read
                case "w": perm = .write
                case "rw": perm = .readWrite
                default: throw ControlError("bad-request", "\"perm\" must be r, w or rw")
                }
                cmd = .map(bus: BusAddress(try number(r, "bus")), gpa: GuestPhysicalAddress(try number(r, "gpa")),
                           length: try number(r, "length"), permission: perm)
            case "unmap":
                cmd = .unmap(bus: BusAddress(try number(r, "bus")), length: try number(r, "length"))
            default:
                cmd = .freeze
            }
            switch b.perform(cmd) {
            case .success(let text): return ["bridge": name, "result": text]
            case .failure(let e):
                switch e {
                case .noSession: throw ControlError("no-session", e.description)
                case .refused(let reason, let rule): throw ControlError("refused", "[\(rule)] " + reason.replacingOccurrences(of: "[\(rule)] ", with: ""))
                case .failed, .timedOut: throw ControlError("failed", e.description)
                }
            }
        case "stats":
            if let name = r["name"] as? String {
                return statisticsObject(name, try bridge(name).statistics)
            }
            return bridgeNames.compactMap { n in (try? bridge(n).statistics).map { statisticsObject(n, $0) } }
        case "metrics":
            return ["text": metricsText()]
        case "reload":
            let report = try reload(from: reloadConfig).get()
            return ["added": report.added, "removed": report.removed, "needsRestart": report.needsRestart,
                    "failed": report.failed, "logLevel": report.logLevel] as [String: Any]
        case "log-level":
            let text = try string(r, "level")
            guard let level = Logger.Level(rawValue: text) else {
                throw ControlError("bad-request", "'\(text)' is not one of trace, debug, info, notice, warning, error, critical")
            }
            setLogLevel(level)
            return ["logLevel": level.rawValue]
        default:
            throw ControlError("unknown-command", "'\(command)' is not one of \(ControlProtocol.commands.joined(separator: ", "))")
        }
    }

    func statisticsObject(_ name: String, _ s: BridgeStatistics) -> [String: Any] {
        ["name": name, "sessionsServed": s.sessionsServed, "vm1Connected": s.activeSession, "requests": s.requests,
         "iotlbUpdates": s.iotlbUpdates, "iotlbInvalidates": s.iotlbInvalidates, "iotlbMisses": s.iotlbMissesSent,
         "refusals": s.refusals, "vm2Connected": s.peer.connected, "vm2Connections": s.peer.connections,
         "mapsSent": s.peer.mapsSent, "unmapsSent": s.peer.unmapsSent, "revocationTimeouts": s.peer.revocationTimeouts,
         "vm2ProtocolErrors": s.peer.protocolErrors, "acceptFailures": s.acceptFailures,
         "slowestRevocationMicroseconds": s.peer.slowestRevocationMicroseconds, "translationsGranted": s.peer.translationsGranted,
         "translationsRefused": s.peer.translationsRefused, "vm2Refusals": s.peer.refusals,
         "notifications": s.notificationMode.rawValue, "relayEngine": s.relayEngine?.rawValue ?? "", "kicksRelayed": s.kicksRelayed, "callsRelayed": s.callsRelayed,
         "notificationsDropped": s.notificationsDropped, "notificationsCoalesced": s.notificationsCoalesced,
         "mappings": s.session?.mappings ?? 0, "bytesMapped": s.session?.mappedBytes ?? 0]
    }

    /// Prometheus text exposition (version 0.0.4).
    public func metricsText() -> String {
        var families: [(name: String, help: String, type: String, samples: [String])] = []
        func family(_ name: String, _ help: String, _ type: String, _ samples: [String]) {
            families.append(("vhost_pci_" + name, help, type, samples))
        }
        let all = bridgeNames.compactMap { n in (try? bridge(n).statistics).map { (n, $0) } }
        func per(_ value: (BridgeStatistics) -> String) -> [String] { all.map { "{bridge=\"\($0.0)\"} \(value($0.1))" } }
        family("bridge_mappings", "Live mappings in the bridge's BAR.", "gauge", per { "\($0.session?.mappings ?? 0)" })
        family("build_info", "The daemon's version (value always 1).", "gauge", ["{version=\"\(BuildInfo.version)\"} 1"])
        family("bridge_mapped_bytes", "Bytes of VM1 memory visible in the BAR.", "gauge", per { "\($0.session?.mappedBytes ?? 0)" })
        family("bridge_vm1_connected", "1 while a VM1 front end is connected.", "gauge", per { $0.activeSession ? "1" : "0" })
        family("bridge_vm2_connected", "1 while a VM2 is connected.", "gauge", per { $0.peer.connected ? "1" : "0" })
        family("bridge_sessions_total", "VM1 sessions that ended.", "counter", per { "\($0.sessionsServed)" })
        family("bridge_iotlb_updates_total", "IOTLB updates applied.", "counter", per { "\($0.iotlbUpdates)" })
        family("bridge_iotlb_invalidates_total", "IOTLB invalidates applied.", "counter", per { "\($0.iotlbInvalidates)" })
        family("bridge_iotlb_misses_total", "IOTLB misses raised toward VM1.", "counter", per { "\($0.iotlbMissesSent)" })
        family("bridge_refusals_total", "Requests refused, by rule.", "counter",
               all.flatMap { (n, s) in (s.refusals.merging(s.peer.refusals.mapKeys { "vm2-" + $0 }) { $0 + $1 })
                   .sorted { $0.key < $1.key }.map { "{bridge=\"\(n)\",rule=\"\($0.key)\"} \($0.value)" } })
        family("bridge_notifications_relayed_total", "Vring notifications relayed, by direction.", "counter",
               all.flatMap { (n, s) in ["{bridge=\"\(n)\",direction=\"kick\"} \(s.kicksRelayed)", "{bridge=\"\(n)\",direction=\"call\"} \(s.callsRelayed)"] })
        family("bridge_notifications_dropped_total", "Notifications dropped because the other side was gone.", "counter", per { "\($0.notificationsDropped)" })
        family("bridge_revocation_timeouts_total", "VM2s disconnected for missing the revocation deadline.", "counter", per { "\($0.peer.revocationTimeouts)" })
        family("bridge_accept_failures_total", "accept() failures for lack of fds or memory (each pauses accepting).", "counter", per { "\($0.acceptFailures)" })
        family("mapping_budget_used", "Mappings held by all bridges of the process.", "gauge", [" \(MappingBudget.process.used)"])
        family("mapping_budget_limit", "Mappings all bridges may hold together (from vm.max_map_count).", "gauge", [" \(MappingBudget.process.total)"])
        family("bridge_vm2_protocol_errors_total", "VM2 connections ended for a protocol error.", "counter", per { "\($0.peer.protocolErrors)" })
        family("bridge_revocation_duration_seconds", "Wait for VM2's acknowledgement of each revocation.", "histogram",
               all.flatMap { (n, s) in s.peer.revocationLatency.samples(labels: "bridge=\"\(n)\"") })
        family("bridge_iotlb_handling_duration_seconds", "Each IOTLB message from VM1, received to answered (an invalidate includes VM2's ack).", "histogram",
               all.flatMap { (n, s) in s.peer.iotlbLatency.samples(labels: "bridge=\"\(n)\"") })
        family("bridge_translations_total", "VM2 translation requests, by result.", "counter",
               all.flatMap { (n, s) in ["{bridge=\"\(n)\",result=\"granted\"} \(s.peer.translationsGranted)", "{bridge=\"\(n)\",result=\"refused\"} \(s.peer.translationsRefused)"] })
        var out = ""
        for f in families {
            out += "# HELP \(f.name) \(f.help)\n# TYPE \(f.name) \(f.type)\n"
            for sample in f.samples { out += f.name + sample + "\n" }
        }
        return out
    }
}

extension Dictionary {
    fileprivate func mapKeys(_ transform: (Key) -> Key) -> [Key: Value] {
        Dictionary(uniqueKeysWithValues: map { (transform($0.key), $0.value) })
    }
}
