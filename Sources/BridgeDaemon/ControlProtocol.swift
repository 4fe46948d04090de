import BridgeCore
import LinuxIO
import Logging
import VhostUser

@_exported import ControlWire

extension DaemonController {
    /// Handles one request line; never throws, always answers.
    public func handle(line: String,
                       reloadConfig: () -> Result<DaemonConfig, ControlError> = { .failure(ControlError("no-config", "the daemon was not started with --config")) }) -> String {
        do {
            return try run(ControlRequest.decode(line: line).get(), reloadConfig: reloadConfig)
        } catch {
            return ControlProtocol.response(error: error)
        }
    }

    private func run(_ request: ControlRequest, reloadConfig: () -> Result<DaemonConfig, ControlError>) throws(ControlError) -> String {
        switch request {
        case .status:
            let all = bridgeNames.compactMap { try? bridge($0).statistics }
            return ControlProtocol.response(ok: DaemonStatus(
                version: ControlProtocol.version, uptimeSeconds: uptimeSeconds, bridges: all.count,
                vm1Sessions: all.filter(\.activeSession).count, vm2Connected: all.filter(\.peer.connected).count,
                logLevel: config.logLevel.rawValue, controlSocket: config.controlSocket, pid: Int(Signals.processID),
                createdBridges: createdBridgeNames, stateFile: createdBridges?.path ?? "",
                lastError: lastError ?? "", buildVersion: BuildInfo.version))
        case .list:
            return ControlProtocol.response(ok: bridgeNames.compactMap { name -> BridgeSummary? in
                guard let c = bridgeConfig(name), let b = try? bridge(name) else { return nil }
                let s = b.statistics
                return BridgeSummary(name: name, mode: c.addressSpace.mode.rawValue, barSize: c.addressSpace.barSize,
                                     vhostUserSocket: c.vhostUserSocket, peerSocket: c.peerSocket ?? "", vm2: c.vm2,
                                     vm1Connected: s.activeSession, vm2Connected: s.peer.connected,
                                     mappings: s.session?.mappings ?? 0, bytesMapped: s.session?.mappedBytes ?? 0)
            })
        case .show(let name):
            guard let c = bridgeConfig(name) else { throw ControlError("unknown-bridge", "no bridge named \(name)") }
            let s = try bridge(name).statistics
            let settings = BridgeDetails.Settings(
                barSize: c.addressSpace.barSize, mode: c.addressSpace.mode.rawValue,
                dmaWindow: c.addressSpace.dmaWindow?.description ?? "", staticWindows: c.addressSpace.staticWindows.map(\.description),
                notifications: c.notifications.rawValue, revocationDeadlineMs: c.revocationDeadlineMilliseconds,
                maxMappings: c.addressSpace.maxMappings, vhostUserSocket: c.vhostUserSocket,
                peerSocket: c.peerSocket ?? "", vm2: c.vm2, client: c.client, cpuAffinity: c.cpuAffinity)
            let session = s.session.map { v in
                BridgeDetails.Session(regions: v.regions, mappings: v.mappings, bytesMapped: v.mappedBytes,
                                      startedRings: v.startedRings, enabledRings: v.enabledRings, frozen: v.frozen,
                                      features: v.ackedFeatures.map { "0x" + String($0, radix: 16) } ?? "",
                                      protocolFeatures: v.protocolFeatures.description, dirtyLogging: v.dirtyLogging ? true : nil)
            }
            return ControlProtocol.response(ok: BridgeDetails(counters: counters(name, s), config: settings, session: session))
        case .create(let spec):
            let b: BridgeConfig
            do { b = try DaemonConfig.bridge(.mapping(spec), key: "bridge", runtimeDirectory: config.runtimeDirectory) } catch {
                throw ControlError("invalid", error.description)
            }
            let kept = try createFromClient(b, spec: ControlProtocol.encode(spec))
            return ControlProtocol.response(ok: CreatedBridge(created: b.name, persistent: kept))
        case .destroy(let name):
            try destroy(name)
            return ControlProtocol.response(ok: DestroyedBridge(destroyed: name))
        case .map(let name, let arguments):
            let b = try bridge(name)
            let a = try arguments.resolved()
            return try perform(.map(bus: a.bus, gpa: a.gpa, length: a.length, permission: a.permission), on: b, named: name)
        case .unmap(let name, let arguments):
            let b = try bridge(name)
            let a = try arguments.resolved()
            return try perform(.unmap(bus: a.bus, length: a.length), on: b, named: name)
        case .freeze(let name):
            return try perform(.freeze, on: try bridge(name), named: name)
        case .stats(let name?):
            return ControlProtocol.response(ok: counters(name, try bridge(name).statistics))
        case .stats(nil):
            return ControlProtocol.response(ok: bridgeNames.compactMap { n in (try? bridge(n).statistics).map { counters(n, $0) } })
        case .metrics:
            return ControlProtocol.response(ok: MetricsText(text: metricsText()))
        case .reload:
            return ControlProtocol.response(ok: try reload(from: reloadConfig).get())
        case .logLevel(let text):
            guard let level = Logger.Level(rawValue: text) else {
                throw ControlError("bad-request", "'\(text)' is not one of trace, debug, info, notice, warning, error, critical")
            }
            setLogLevel(level)
            return ControlProtocol.response(ok: LogLevelSet(logLevel: level.rawValue))
        }
    }

    private func perform(_ command: BridgeCommand, on b: Bridge, named name: String) throws(ControlError) -> String {
        switch b.perform(command) {
        case .success(let text): return ControlProtocol.response(ok: BridgeOperation(bridge: name, result: text))
        case .failure(let e):
            switch e {
            case .noSession: throw ControlError("no-session", e.description)
            case .refused(let reason, let rule): throw ControlError("refused", "[\(rule)] " + reason.replacing("[\(rule)] ", with: ""))
            case .failed, .timedOut: throw ControlError("failed", e.description)
            }
        }
    }

    func counters(_ name: String, _ s: BridgeStatistics) -> BridgeCounters {
        var c = BridgeCounters(name: name)
        c.sessionsServed = s.sessionsServed
        c.vm1Connected = s.activeSession
        c.requests = s.requests
        c.iotlbUpdates = s.iotlbUpdates
        c.iotlbInvalidates = s.iotlbInvalidates
        c.iotlbMisses = s.iotlbMissesSent
        c.refusals = s.refusals
        c.vm2Connected = s.peer.connected
        c.vm2Connections = s.peer.connections
        c.mapsSent = s.peer.mapsSent
        c.unmapsSent = s.peer.unmapsSent
        c.revocationTimeouts = s.peer.revocationTimeouts
        c.vm2ProtocolErrors = s.peer.protocolErrors
        c.acceptFailures = s.acceptFailures
        c.slowestRevocationMicroseconds = s.peer.slowestRevocationMicroseconds
        c.translationsGranted = s.peer.translationsGranted
        c.translationsRefused = s.peer.translationsRefused
        c.vm2Refusals = s.peer.refusals
        c.notifications = s.notificationMode.rawValue
        c.relayEngine = s.relayEngine?.rawValue ?? ""
        c.kicksRelayed = s.kicksRelayed
        c.callsRelayed = s.callsRelayed
        c.notificationsDropped = s.notificationsDropped
        c.notificationsCoalesced = s.notificationsCoalesced
        c.mappings = s.session?.mappings ?? 0
        c.bytesMapped = s.session?.mappedBytes ?? 0
        return c
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
