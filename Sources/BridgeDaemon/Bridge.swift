import BridgeCore
import LinuxIO
import Logging
import Synchronization
import VhostUser

/// Everything that defines one bridge (flags and, later, the config file
/// mean the same thing).
public struct BridgeSettings: Sendable, Equatable {
    public var name: String
    /// Where the vhost-user socket listens (or, with `client`, connects).
    public var socketPath: String?
    public var backend: BackendConfiguration

    public init(name: String, socketPath: String?, backend: BackendConfiguration) {
        self.name = name
        self.socketPath = socketPath
        self.backend = backend
    }
}

public enum BridgeError: Error, CustomStringConvertible {
    case configuration(String, ConfigurationError)
    case window(String, BARWindowError)
    case socket(String, SystemCallError)
    case noSocketPath(String)

    public var description: String {
        switch self {
        case .configuration(let name, let e): "bridge \(name): \(e)"
        case .window(let name, let e): "bridge \(name): BAR window: \(e)"
        case .socket(let name, let e): "bridge \(name): vhost-user socket: \(e)"
        case .noSocketPath(let name): "bridge \(name): no --socket-path or --fd given"
        }
    }
}

/// Per-bridge counters, readable from any thread.
public struct BridgeStatistics: Sendable, Equatable {
    public var sessionsServed = 0
    public var activeSession = false
    public var requests = 0
    public var iotlbUpdates = 0
    public var iotlbInvalidates = 0
    public var iotlbMissesSent = 0
    public var refusals: [String: Int] = [:]
    public var lastEnd: ConnectionSummary.End?
    /// The live session, nil between sessions.
    public var session: SessionView?
}

/// One bridge: a BAR window reserved once for the bridge's lifetime, a
/// vhost-user socket, and one front-end session at a time. When a session
/// ends, everything it mapped and every fd it held are released and the next
/// front end may connect (reconnect).
public final class Bridge: Sendable {
    public let settings: BridgeSettings
    public let window: BARWindow
    private let logger: Logger
    private let listener: UnixSocket?
    private struct State {
        var stopping = false
        var active: UnixSocket?
        var statistics = BridgeStatistics()
    }
    private let state = Mutex(State())

    /// Validates the settings, reserves the BAR, and (with a socket path)
    /// starts listening.
    public init(_ settings: BridgeSettings, logger: Logger) throws(BridgeError) {
        do { try settings.backend.addressSpace.validate() } catch { throw .configuration(settings.name, error) }
        self.settings = settings
        var logger = logger
        logger[metadataKey: "bridge"] = "\(settings.name)"
        self.logger = logger
        do { window = try BARWindow(size: settings.backend.addressSpace.barSize) } catch { throw .window(settings.name, error) }
        if let path = settings.socketPath {
            do { listener = try UnixSocket.listen(path: path) } catch { throw .socket(settings.name, error) }
        } else {
            listener = nil
        }
    }

    public var statistics: BridgeStatistics { state.withLock { $0.statistics } }

    /// Accepts front ends one after another until `stop()`.
    public func serve() {
        guard let listener else { return }
        logger.info("listening on \(settings.socketPath ?? "?") (\(settings.backend.addressSpace.mode) mode, BAR \(ByteCount(settings.backend.addressSpace.barSize)))")
        while !state.withLock({ $0.stopping }) {
            let connection: UnixSocket
            do {
                connection = try listener.accept()
            } catch {
                if state.withLock({ $0.stopping }) { break }
                logger.error("accept failed: \(error)")
                continue
            }
            serve(connection: connection)
        }
        if let path = settings.socketPath { _ = path.withCString { unlink($0) } }
    }

    /// Serves one already connected front end (`--fd`, or an accepted one).
    public func serve(connection: UnixSocket) {
        let accepted = state.withLock { s -> Bool in
            guard !s.stopping else { return false }
            s.active = connection
            s.statistics.activeSession = true
            return true
        }
        guard accepted else { try? connection.fd.close(); return }
        let peer = (try? connection.peerCredentials()).map { "pid \($0.pid) uid \($0.uid)" } ?? "unknown peer"
        logger.info("front end connected (\(peer))")
        let summary: ConnectionSummary
        do {
            let session = try VhostUserConnection(socket: connection, configuration: settings.backend, window: window,
                                                  logger: logger, isStopping: { [self] in self.state.withLock { $0.stopping } },
                                                  publish: { [self] view in self.state.withLock { $0.statistics.session = view } })
            summary = session.run()
        } catch {
            logger.error("cannot start a session: \(error)")
            try? connection.fd.close()
            summary = ConnectionSummary(end: .closedByBridge("\(error)"), statistics: SessionStatistics())
        }
        state.withLock { s in
            s.active = nil
            s.statistics.activeSession = false
            s.statistics.sessionsServed += 1
            s.statistics.requests += summary.statistics.requests
            s.statistics.iotlbUpdates += summary.statistics.iotlbUpdates
            s.statistics.iotlbInvalidates += summary.statistics.iotlbInvalidates
            s.statistics.iotlbMissesSent += summary.statistics.iotlbMissesSent
            for (rule, n) in summary.statistics.refusals { s.statistics.refusals[rule, default: 0] += n }
            s.statistics.lastEnd = summary.end
        }
        logger.info("front end session ended: \(summary.end); \(summary.statistics.requests) requests, \(summary.statistics.refusals.values.reduce(0, +)) refused")
    }

    /// Stops accepting and ends the active session (its teardown revokes
    /// every mapping). Safe from any thread; `serve` returns soon after.
    public func stop() {
        let (listener, active) = state.withLock { s -> (UnixSocket?, UnixSocket?) in
            s.stopping = true
            return (self.listener, s.active)
        }
        listener?.shutdown()
        active?.shutdown()
    }
}

#if canImport(Glibc)
import Glibc
#endif
