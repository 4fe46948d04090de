import BridgeCore
import Foundation
import LinuxIO
import Logging
import VhostUser

/// A refused control request.
public struct ControlError: Error, Equatable, Sendable, CustomStringConvertible {
    public var code: String
    public var message: String
    public init(_ code: String, _ message: String) { self.code = code; self.message = message }
    public var description: String { "\(code): \(message)" }
}

/// What a reload changed.
public struct ReloadReport: Sendable, Equatable {
    public var added: [String] = []
    public var removed: [String] = []
    /// Bridges whose settings changed: they keep running with the old ones
    /// until the daemon restarts (a live bridge's BAR cannot be resized).
    public var needsRestart: [String] = []
    public var logLevel: String
    public var failed: [String: String] = [:]
}

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
    }
    private let state: Locked<State>
    private let logger: Logger
    public let startTime = ContinuousClock.now
    public static let protocolVersion = 1

    public init(config: DaemonConfig, logger: Logger) {
        state = Locked(State(config: config))
        self.logger = logger
        JournalLogHandler.level.withLock { $0 = config.logLevel }
    }

    public var config: DaemonConfig { state.withLock { $0.config } }
    public var bridgeNames: [String] { state.withLock { $0.order } }

    /// Creates and starts every bridge of the config; returns the failures.
    @discardableResult
    public func startConfiguredBridges() -> [String: String] {
        var failed: [String: String] = [:]
        for b in config.bridges {
            do { try start(b) } catch { failed[b.name] = error.message }
        }
        return failed
    }

    private func start(_ b: BridgeConfig) throws(ControlError) {
        let bridge: Bridge
        do { bridge = try Bridge(b.settings, logger: logger) } catch { throw ControlError("bridge-failed", "\(error)") }
        let thread: JoinableThread
        do { thread = try JoinableThread(name: "bridge-\(b.name)") { bridge.serve() } } catch {
            bridge.stop()
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
        guard !bridgeNames.contains(b.name) else { throw ControlError("exists", "bridge \(b.name) already exists") }
        var next = config
        next.bridges.removeAll { $0.name == b.name }
        next.bridges.append(b)
        do { try next.validate() } catch { throw ControlError("invalid", error.description) }
        try start(b)
    }

    /// `create` from a control client: its sockets must be inside the
    /// runtime directory or `socket-directories` (the config file, written by
    /// root, may name any path).
    public func createFromClient(_ b: BridgeConfig) throws(ControlError) {
        let allowed = [config.runtimeDirectory] + config.socketDirectories
        for (key, path) in [("vhost-user-socket", b.vhostUserSocket), ("peer-socket", b.peerSocket)] {
            if let path, let reason = SocketPathPolicy.refusal(path, allowed: allowed) {
                throw ControlError("invalid", "bridge.\(key): \(reason)")
            }
        }
        try create(b)
    }

    /// `destroy`: ends the bridge's sessions (revoking everything from VM2) and frees its BAR.
    public func destroy(_ name: String) throws(ControlError) {
        guard let entry = state.withLock({ s -> Entry? in
            guard let e = s.bridges.removeValue(forKey: name) else { return nil }
            s.order.removeAll { $0 == name }
            s.config.bridges.removeAll { $0.name == name }
            return e
        }) else { throw ControlError("unknown-bridge", "no bridge named \(name)") }
        entry.bridge.stop()
        entry.thread.join()
        logger.notice("bridge \(name) destroyed")
    }

    public func bridge(_ name: String) throws(ControlError) -> Bridge {
        guard let b = state.withLock({ $0.bridges[name]?.bridge }) else { throw ControlError("unknown-bridge", "no bridge named \(name)") }
        return b
    }

    public func bridgeConfig(_ name: String) -> BridgeConfig? { state.withLock { $0.bridges[name]?.config } }

    /// Applies a new config: new bridges start, missing ones stop, changed ones
    /// are reported (they need a restart), and the log level applies at once.
    public func reload(_ new: DaemonConfig) -> ReloadReport {
        let old = config
        JournalLogHandler.level.withLock { $0 = new.logLevel }
        var report = ReloadReport(logLevel: new.logLevel.rawValue)
        let oldByName = Dictionary(uniqueKeysWithValues: old.bridges.map { ($0.name, $0) })
        let newByName = Dictionary(uniqueKeysWithValues: new.bridges.map { ($0.name, $0) })
        for name in old.bridges.map(\.name) where newByName[name] == nil {
            try? destroy(name)
            report.removed.append(name)
        }
        state.withLock { s in
            s.config.logLevel = new.logLevel
            s.config.vm2Budgets = new.vm2Budgets
        }
        for b in new.bridges {
            if let before = oldByName[b.name] {
                if before != b { report.needsRestart.append(b.name) }
            } else {
                do { try create(b); report.added.append(b.name) } catch { report.failed[b.name] = error.message }
            }
        }
        logger.notice("reloaded: added \(report.added), removed \(report.removed), need a restart \(report.needsRestart)")
        return report
    }

    public func stopAll() {
        for name in bridgeNames.reversed() { try? destroy(name) }
    }

    public var uptimeSeconds: Double {
        startTime.duration(to: .now) / .seconds(1)
    }
}
