import BridgeCore
import FoundationEssentials
import LinuxIO
import Logging
import VhostUser

/// All the bridges of one daemon, created from the config or at run time,
/// and everything the control socket can ask about them.
public final class DaemonController: Sendable {
    struct Entry: Sendable {
        var config: BridgeConfig
        var bridge: Bridge
        var thread: JoinableThread
    }
    private struct State {
        var config: DaemonConfig
        var bridges: [String: Entry] = [:]
        var order: [String] = []
        /// Bridges made with `create`, in order: name and the request's
        /// bridge object as JSON, exactly what the state file keeps.
        var created: [CreatedBridges.Entry] = []
        /// The state file could not be read nor moved aside: never overwrite it.
        var stateFileSetAside = false
        /// Inherited connection fds already handed to a bridge.
        var inheritedServed: Set<Int32> = []
        var lastError: String?
    }
    private let state: Locked<State>
    private let logger: Logger
    /// Where `create`d bridges are kept across reloads and restarts; nil:
    /// they live until the daemon exits.
    public let createdBridges: CreatedBridges?
    private let inheritedSessionEnded: @Sendable () -> Void
    private let notify: @Sendable ([String]) -> Void
    public let startTime = ContinuousClock.now
    public static let protocolVersion = 1

    /// `inheritedSessionEnded` runs when a bridge serving an inherited
    /// connection (`--fd`) has finished its one session.
    /// `notify` receives sd_notify lines (RELOADING=1, READY=1, STATUS=).
    public init(config: DaemonConfig, logger: Logger, createdBridges: CreatedBridges? = nil,
                inheritedSessionEnded: @escaping @Sendable () -> Void = {},
                notify: @escaping @Sendable ([String]) -> Void = { _ in }) {
        state = Locked(State(config: config))
        self.logger = logger
        self.createdBridges = createdBridges
        self.inheritedSessionEnded = inheritedSessionEnded
        self.notify = notify
        JournalLogHandler.level.withLock { $0 = config.logLevel }
    }

    public var config: DaemonConfig { state.withLock { $0.config } }
    public var bridgeNames: [String] { state.withLock { $0.order } }
    /// Names of the bridges made with `create` (kept by reloads).
    public var createdBridgeNames: [String] { state.withLock { $0.created.map(\.name) } }

    /// The last thing that went wrong at daemon level (a bridge that did not
    /// start, a refused reload or create), for STATUS= and `status`.
    public var lastError: String? { state.withLock { $0.lastError } }

    public func noteError(_ text: String) {
        state.withLock { $0.lastError = text }
        logger.error("\(text)")
    }

    /// The running log level (`log-level` changes it until the next reload).
    public func setLogLevel(_ level: Logger.Level) {
        JournalLogHandler.level.withLock { $0 = level }
        state.withLock { $0.config.logLevel = level }
    }

    /// Serialises everything that starts, stops or persists bridges
    /// (create, destroy, reload, start, stop): control connections run on
    /// threads of their own, and a name check, a budget check and the start
    /// must be one step. Never taken inside `state`'s lock.
    private let operations = Locked(0)

    /// Creates and starts every bridge of the config; returns the failures.
    @discardableResult
    public func startConfiguredBridges() -> [String: String] {
        operations.withLock { _ in
            var failed: [String: String] = [:]
            for b in config.bridges {
                do throws(ControlError) { try start(b) } catch { failed[b.name] = error.message }
            }
            return failed
        }
    }

    private func start(_ b: BridgeConfig) throws(ControlError) {
        var inherited: UnixSocket?
        if let fd = b.inheritedConnection {
            // The inherited connection is served once: its fd number is not
            // ours after that session (a reload must not adopt it again).
            let first = state.withLock { $0.inheritedServed.insert(fd).inserted }
            guard first else { throw ControlError("inherited-fd", "bridge \(b.name): the inherited connection (fd \(fd)) was already served") }
            inherited = UnixSocket(adopting: OwnedFileDescriptor(adopting: fd), kind: .stream)
        }
        let bridge: Bridge
        do { bridge = try Bridge(b.settings, logger: logger) } catch {
            try? inherited?.fd.close()
            throw ControlError("bridge-failed", "\(error)")
        }
        let thread: JoinableThread
        let ended = inheritedSessionEnded
        do {
            thread = try JoinableThread(name: "bridge-\(b.name)") { [inherited] in
                bridge.serve(connection: inherited)
                // VM1 ended the one session (not an operator's destroy or
                // the daemon stopping): the back-end convention is to exit.
                if inherited != nil, !bridge.wasStopped { ended() }
            }
        } catch {
            bridge.stop()
            try? inherited?.fd.close()
            throw ControlError("bridge-failed", "\(error)")
        }
        state.withLock { s in
            s.bridges[b.name] = Entry(config: b, bridge: bridge, thread: thread)
            if !s.order.contains(b.name) { s.order.append(b.name) }
            if !s.config.bridges.contains(where: { $0.name == b.name }) { s.config.bridges.append(b) }
        }
        logger.notice("bridge \(b.name) started (\(b.addressSpace.mode), BAR \(ByteCount(b.addressSpace.barSize)))")
    }

    /// `create`: validated against every other bridge (names, sockets, VM2 budget) first.
    public func create(_ b: BridgeConfig) throws(ControlError) {
        try operations.withLock { (_: inout Int) throws(ControlError) in try createLocked(b) }
    }

    private func createLocked(_ b: BridgeConfig) throws(ControlError) {
        guard !bridgeNames.contains(b.name) else { throw ControlError("exists", "bridge \(b.name) already exists") }
        var next = config
        next.bridges.removeAll { $0.name == b.name }
        next.bridges.append(b)
        do { try next.validate() } catch { throw ControlError("invalid", error.description) }
        try start(b)
    }

    /// `create` from a control client: its sockets must be inside the
    /// runtime directory or `socket-directories` (the config file, written by
    /// root, may name any path). With a state file, `spec` (the request's
    /// bridge object as JSON) is kept there, so the bridge survives reloads
    /// and restarts until it is destroyed; returns whether it was kept.
    @discardableResult
    public func createFromClient(_ b: BridgeConfig, spec: String? = nil) throws(ControlError) -> Bool {
        try operations.withLock { (_: inout Int) throws(ControlError) -> Bool in
            try checkClientSockets(b)
            try createLocked(b)
            state.withLock { s in
                s.created.removeAll { $0.name == b.name } // an entry that never came back is replaced
                s.created.append(CreatedBridges.Entry(name: b.name, spec: spec ?? "{}"))
            }
            guard createdBridges != nil, spec != nil, !state.withLock({ $0.stateFileSetAside }) else { return false }
            do { try saveCreated() } catch {
                try? stop(b.name)
                state.withLock { $0.created.removeAll { $0.name == b.name } }
                throw ControlError("state", "bridge \(b.name) was not kept: \(error)")
            }
            return true
        }
    }

    /// Writes the current list (callers hold `operations`, so saves never
    /// interleave and the file always ends as the latest list).
    private func saveCreated() throws(ConfigError) {
        guard let createdBridges, !state.withLock({ $0.stateFileSetAside }) else { return }
        try createdBridges.save(state.withLock { $0.created })
    }

    /// A control client's bridge may put its sockets only in the runtime
    /// directory or `socket-directories`.
    private func checkClientSockets(_ b: BridgeConfig) throws(ControlError) {
        let allowed = [config.runtimeDirectory] + config.socketDirectories
        for (key, path) in [("vhost-user-socket", b.vhostUserSocket), ("peer-socket", b.peerSocket)] {
            if let path, let reason = SocketPathPolicy.refusal(path, allowed: allowed) {
                throw ControlError("invalid", "bridge.\(key): \(reason)")
            }
        }
    }

    /// At start: the bridges of the state file, each checked like the
    /// `create` that made it. Returns the failures; they stay in the file
    /// (the operator's intent is not dropped because a socket path is busy
    /// once) until destroyed. A file that cannot be read is moved aside
    /// (`….unreadable`), so the next `create` does not overwrite it.
    @discardableResult
    public func startCreatedBridges() -> [String: String] {
        guard let createdBridges else { return [:] }
        return operations.withLock { _ in
            let entries: [CreatedBridges.Entry]
            do { entries = try createdBridges.load() } catch {
                let aside = createdBridges.path + ".unreadable-\(Int(Date.now.timeIntervalSince1970))"
                let moved = (try? Files.rename(createdBridges.path, to: aside)) != nil
                if !moved { state.withLock { $0.stateFileSetAside = true } } // then never overwrite it
                noteError("\(error)\(moved ? " (moved to \(aside))" : "; created bridges are not kept until it is fixed")")
                return [createdBridges.path: "\(error)"]
            }
            var failed: [String: String] = [:]
            for entry in entries {
                state.withLock { $0.created.append(entry) }
                do {
                    let b = try createdBridges.bridge(entry, runtimeDirectory: config.runtimeDirectory)
                    try checkClientSockets(b)
                    try createLocked(b)
                } catch {
                    failed[entry.name] = "\(error)"
                    noteError("created bridge \(entry.name) did not start: \(error)")
                }
            }
            return failed
        }
    }

    /// `destroy`: ends the bridge's sessions (revoking everything from VM2)
    /// and frees its BAR; a created bridge leaves the state file too — also
    /// one that did not come back at start and so is not running.
    public func destroy(_ name: String) throws(ControlError) {
        try operations.withLock { (_: inout Int) throws(ControlError) in
            let listed = state.withLock { $0.created.contains { $0.name == name } }
            do throws(ControlError) { try stop(name) } catch {
                guard listed else { throw error }
            }
            guard listed else { return }
            state.withLock { $0.created.removeAll { $0.name == name } }
            do { try saveCreated() } catch { noteError("bridge \(name) is destroyed but still listed: \(error)") }
        }
    }

    /// Ends a bridge without touching the state file (shutdown, reload).
    private func stop(_ name: String) throws(ControlError) {
        guard let entry = state.withLock({ s -> Entry? in
            guard let e = s.bridges.removeValue(forKey: name) else { return nil }
            s.order.removeAll { $0 == name }
            s.config.bridges.removeAll { $0.name == name }
            return e
        }) else { throw ControlError("unknown-bridge", "no bridge named \(name)") }
        entry.bridge.stop()
        entry.thread.join()
        logger.notice("bridge \(name) stopped")
    }

    public func bridge(_ name: String) throws(ControlError) -> Bridge {
        guard let b = state.withLock({ $0.bridges[name]?.bridge }) else { throw ControlError("unknown-bridge", "no bridge named \(name)") }
        return b
    }

    public func bridgeConfig(_ name: String) -> BridgeConfig? { state.withLock { $0.bridges[name]?.config } }

    /// One line for systemd's STATUS= (and `status`): bridges, sessions and
    /// the last error.
    public var statusLine: String {
        let all = bridgeNames.compactMap { try? bridge($0).statistics }
        var line = "\(all.count) bridge(s), \(all.filter(\.activeSession).count) VM1 session(s), \(all.filter(\.peer.connected).count) VM2(s) connected"
        if let e = lastError { line += "; last error: \(e)" }
        return line
    }

    /// One watchdog round, never blocking: a bridge whose loop ran since the
    /// last round answered. Every bridge is then poked (woken), so a live one
    /// has moved its count by the next round, idle or not. Returns the
    /// bridges silent for longer than `Liveness.allowance` (their longest
    /// bounded wait on a peer, plus a grace period).
    public func stuckBridges() -> [String] {
        var answered: [String: Bool] = [:]
        let live = state.withLock { $0.bridges.mapValues(\.bridge) }
        let beats = live.mapValues(\.heartbeatCount)
        let deadlines = Dictionary(uniqueKeysWithValues: config.bridges.map { ($0.name, $0.revocationDeadlineMilliseconds) })
        let stuck = liveness.withLock { s -> [String] in
            for (name, beat) in beats {
                answered[name] = s.beats[name].map { $0 != beat } ?? true
                s.beats[name] = beat
            }
            s.beats = s.beats.filter { beats[$0.key] != nil }
            return s.liveness.round(answered, now: .now) { Liveness.allowance(revocationDeadlineMilliseconds: deadlines[$0] ?? 0) }
        }
        for b in live.values { b.poke() }
        return stuck
    }
    private struct WatchdogState { var liveness = Liveness(); var beats: [String: UInt64] = [:] }
    private let liveness = Locked(WatchdogState())

    /// The one reload path, for SIGHUP and `reload`: re-reads the config
    /// through `source` and applies it. systemd hears RELOADING=1 before and
    /// READY=1 with the new STATUS= after; a refused reload changes nothing,
    /// becomes the last error, and is returned as the failure.
    public func reload(from source: () -> Result<DaemonConfig, ControlError>) -> Result<ReloadReport, ControlError> {
        notify(["RELOADING=1", "STATUS=reloading"])
        defer { notify(["READY=1", "STATUS=" + statusLine]) }
        let outcome = operations.withLock { _ -> Result<ReloadReport, ControlError> in
            switch source() {
            case .failure(let e): return .failure(e)
            case .success(let new):
                // The file's bridges with the ones made at run time must fit
                // together (names, sockets, VM2 budgets) before anything changes.
                var combined = new
                let created = Set(createdBridgeNames)
                combined.bridges += config.bridges.filter { created.contains($0.name) && !new.bridges.map(\.name).contains($0.name) }
                do { try combined.validate() } catch { return .failure(ControlError("invalid-config", "with the bridges made at run time: \(error)")) }
                return .success(reloadLocked(new))
            }
        }
        if case .failure(let e) = outcome { noteError("reload refused, the running config stays: \(e.message)") }
        return outcome
    }

    /// Bridges made with `create` are not the file's: a reload keeps them.
    /// Settings that only take effect at start (control socket, its group
    /// and mode, runtime and state directories) are reported under
    /// `needsRestart` when they changed; `socket-directories`, the log level
    /// and the VM2 budgets apply at once.
    public func reload(_ new: DaemonConfig) -> ReloadReport {
        operations.withLock { _ in reloadLocked(new) }
    }

    private func reloadLocked(_ new: DaemonConfig) -> ReloadReport {
        let old = config
        let created = Set(createdBridgeNames)
        JournalLogHandler.level.withLock { $0 = new.logLevel }
        var report = ReloadReport(logLevel: new.logLevel.rawValue)
        let oldByName = Dictionary(uniqueKeysWithValues: old.bridges.map { ($0.name, $0) })
        let newByName = Dictionary(uniqueKeysWithValues: new.bridges.map { ($0.name, $0) })
        for name in old.bridges.map(\.name) where newByName[name] == nil && !created.contains(name) {
            try? stop(name)
            report.removed.append(name)
        }
        state.withLock { s in
            s.config.logLevel = new.logLevel
            s.config.vm2Budgets = new.vm2Budgets
            s.config.socketDirectories = new.socketDirectories
        }
        for (key, changed) in [("control-socket", old.controlSocket != new.controlSocket),
                               ("control-group", old.controlGroup != new.controlGroup),
                               ("control-mode", old.controlMode != new.controlMode),
                               ("runtime-directory", old.runtimeDirectory != new.runtimeDirectory),
                               ("state-directory", old.stateDirectory != new.stateDirectory)] where changed {
            report.needsRestart.append(key)
        }
        let served = state.withLock { $0.inheritedServed }
        for b in new.bridges {
            if let fd = b.inheritedConnection, served.contains(fd), oldByName[b.name] == nil {
                continue // the --fd bridge was destroyed: its connection is gone, nothing to start
            }
            if created.contains(b.name) {
                report.failed[b.name] = "a bridge created at run time has this name; destroy it first"
            } else if let before = oldByName[b.name] {
                if before != b { report.needsRestart.append(b.name) }
            } else {
                do { try createLocked(b); report.added.append(b.name) } catch { report.failed[b.name] = error.message }
            }
        }
        logger.notice("reloaded: added \(report.added), removed \(report.removed), need a restart \(report.needsRestart)")
        if !report.failed.isEmpty {
            noteError("reload: " + report.failed.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: "; "))
        }
        return report
    }

    public func stopAll() {
        operations.withLock { _ in
            for name in bridgeNames.reversed() { try? stop(name) }
        }
    }

    public var uptimeSeconds: Double {
        startTime.duration(to: .now) / .seconds(1)
    }
}
