import BridgeCore
import LinuxIO
import Logging
import PeerProtocol
import Synchronization
import VhostUser
#if canImport(Glibc)
import Glibc
#endif

public enum DeadlineAction: String, Sendable, Equatable {
    case disconnect, kill
}

/// Everything that defines one bridge (flags and the config file mean the
/// same thing).
public struct BridgeSettings: Sendable, Equatable {
    public var name: String
    /// Where the vhost-user socket listens.
    public var socketPath: String?
    /// Where VM2 connects (the peer protocol); nil: no VM2 side.
    public var peerSocketPath: String?
    public var backend: BackendConfiguration
    /// How long VM2 has to acknowledge a revocation before it is disconnected.
    public var revocationDeadlineMilliseconds: Int
    /// How vring notifications travel between VM1 and VM2.
    public var notifications: NotificationMode
    /// Relay modes: spin this long reaping completions before blocking.
    public var busyPollMicroseconds: Int
    /// Connect to `socketPath` (created by the front end, e.g. QEMU
    /// `server=on`) instead of listening, and reconnect whenever it drops —
    /// so the daemon can restart under a running VM.
    public var client: Bool = false
    /// VM2 translation requests that may wait on VM1 at once; more are
    /// refused (`translation-limit`).
    public var maxPendingTranslations: Int = BridgeSettings.defaultMaxPendingTranslations
    public static let defaultMaxPendingTranslations = 256
    /// Who may connect to the vhost-user socket (VM1's VMM) and to the peer
    /// socket (VM2's VMM).
    public var vm1Access = PeerAccess()
    public var vm2Access = PeerAccess()
    /// What happens to a VM2 that misses the revocation deadline: it is
    /// always disconnected; `kill` also sends its VMM SIGKILL (through a
    /// pidfd taken when it connected).
    public var vm2DeadlineAction: DeadlineAction = .disconnect

    public init(name: String, socketPath: String?, peerSocketPath: String? = nil, backend: BackendConfiguration,
                revocationDeadlineMilliseconds: Int = 100, notifications: NotificationMode = .relay,
                busyPollMicroseconds: Int = 0) {
        self.name = name
        self.socketPath = socketPath
        self.peerSocketPath = peerSocketPath
        self.backend = backend
        self.revocationDeadlineMilliseconds = revocationDeadlineMilliseconds
        self.notifications = notifications
        self.busyPollMicroseconds = busyPollMicroseconds
    }
}

public enum BridgeError: Error, CustomStringConvertible {
    case configuration(String, ConfigurationError)
    case window(String, BARWindowError)
    case socket(String, String, SystemCallError)
    case relay(String, RelayError)

    public var description: String {
        switch self {
        case .configuration(let name, let e): "bridge \(name): \(e)"
        case .window(let name, let e): "bridge \(name): BAR window: \(e)"
        case .socket(let name, let which, let e): "bridge \(name): \(which) socket: \(e)"
        case .relay(let name, let e): "bridge \(name): \(e)"
        }
    }
}

/// What an operator can ask a bridge to do (control socket).
public enum BridgeCommand: Sendable, Equatable, CustomStringConvertible {
    case map(bus: BusAddress, gpa: GuestPhysicalAddress, length: UInt64, permission: Permission)
    case unmap(bus: BusAddress, length: UInt64)
    case freeze

    public var description: String {
        switch self {
        case .map(let bus, let gpa, let length, let perm): "map \(bus)+\(Hex(length)) from \(gpa) \(perm)"
        case .unmap(let bus, let length): "unmap \(bus)+\(Hex(length))"
        case .freeze: "freeze"
        }
    }
}

public enum BridgeCommandError: Error, Equatable, Sendable, CustomStringConvertible {
    case noSession
    case refused(String, rule: String)
    case failed(String)
    case timedOut
    public var description: String {
        switch self {
        case .noSession: "no VM1 session is connected to this bridge"
        case .refused(let reason, _): reason
        case .failed(let reason): reason
        case .timedOut: "the bridge did not answer in time"
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
    /// The requests of the last finished session, in order (at most 200).
    public var lastRequestLog: [RequestCode] = []
    /// The live session, nil between sessions.
    public var session: SessionView?
    // VM2 side
    public var peerConnections = 0
    public var peerConnected = false
    public var peerReady = false
    public var peerMapsSent = 0
    public var peerUnmapsSent = 0
    public var peerAcks = 0
    public var revocationTimeouts = 0
    /// VM2 connections ended for a protocol error.
    public var peerProtocolErrors = 0
    public var translationsGranted = 0
    public var translationsRefused = 0
    public var peerRefusals: [String: Int] = [:]
    public var slowestRevocationMicroseconds: UInt64 = 0
    // Notifications (relay modes), summed over every vring since start.
    public var notificationMode: NotificationMode = .relay
    public var kicksRelayed: UInt64 = 0
    public var callsRelayed: UInt64 = 0
    public var notificationsDropped: UInt64 = 0
    public var notificationsCoalesced: UInt64 = 0
    /// accept() on the vhost-user or peer socket failed for lack of fds or
    /// memory (each pauses accepting for a moment).
    public var acceptFailures = 0
    /// Connections refused by the sockets' allow-lists.
    public var accessDenied = 0
    /// VM2 VMMs killed for missing a deadline (`vm2-deadline-action: kill`).
    public var peerKilled = 0

    /// Adds one session's counters.
    mutating func add(_ session: SessionStatistics) {
        requests += session.requests
        iotlbUpdates += session.iotlbUpdates
        iotlbInvalidates += session.iotlbInvalidates
        iotlbMissesSent += session.iotlbMissesSent
        for (rule, n) in session.refusals { refusals[rule, default: 0] += n }
    }
}

/// One bridge: a BAR window reserved once for the bridge's lifetime, a
/// vhost-user socket with one front-end session at a time, and a peer socket
/// with one VM2 at a time.
///
/// Threads: the *bridge thread* (`serve`) owns the session and does all the
/// work, waking on the vhost-user socket, on VM2 events, and on stop; the
/// *peer thread* only reads VM2's socket and posts events. When a session
/// ends, everything it mapped (in the window and in VM2) and every fd it held
/// are released, and the next front end may connect.
public final class Bridge: Sendable {
    public let settings: BridgeSettings
    public let window: BARWindow
    private let logger: Logger
    private let listener: UnixSocket?
    private let peerListener: UnixSocket?
    private let peer: PeerLink
    private let relay: NotificationRelay?
    private let stopSignal: EventFD
    private let mappingBudget: MappingBudget
    private let budgetID: MappingBudget.ID
    private struct State {
        var stopping = false
        var statistics = BridgeStatistics()
        var commands: [(UInt64, BridgeCommand)] = []
        var results: [UInt64: Result<String, BridgeCommandError>] = [:]
        var nextCommand: UInt64 = 1
        var frozen = false
    }
    private let commandSignal: EventFD
    private let resultSignal: EventFD
    private let state = Mutex(State())

    /// Validates the settings, reserves the BAR, and starts listening on the
    /// vhost-user and peer sockets.
    /// `mappingBudget`: shared by every bridge of the process (tests give a
    /// group of bridges a small one of their own).
    public init(_ settings: BridgeSettings, logger: Logger, mappingBudget: MappingBudget = .process) throws(BridgeError) {
        do { try settings.backend.addressSpace.validate() } catch { throw .configuration(settings.name, error) }
        self.settings = settings
        self.mappingBudget = mappingBudget
        var logger = logger
        logger[metadataKey: "bridge"] = "\(settings.name)"
        self.logger = logger
        do { window = try BARWindow(size: settings.backend.addressSpace.barSize) } catch { throw .window(settings.name, error) }
        do {
            peer = try PeerLink(logger: logger, revocationDeadlineMilliseconds: settings.revocationDeadlineMilliseconds)
            stopSignal = try EventFD()
            commandSignal = try EventFD()
            resultSignal = try EventFD()
        } catch { throw .socket(settings.name, "eventfd", error) }
        if settings.notifications == .passthrough {
            relay = nil
        } else {
            do {
                relay = try NotificationRelay(mode: settings.notifications, busyPollMicroseconds: settings.busyPollMicroseconds,
                                              logger: logger)
            } catch { throw .relay(settings.name, error) }
        }
        if let path = settings.socketPath, !settings.client {
            do {
                listener = try UnixSocket.listen(path: path)
                try Self.applyPermissions(settings.vm1Access, to: path)
            } catch { throw .socket(settings.name, "vhost-user", error) }
        } else {
            listener = nil
        }
        if let path = settings.peerSocketPath {
            do {
                peerListener = try UnixSocket.listen(path: path)
                try Self.applyPermissions(settings.vm2Access, to: path)
            } catch { throw .socket(settings.name, "peer", error) }
        } else {
            peerListener = nil
        }
        budgetID = mappingBudget.register() // last: a failed init registers nothing
    }

    deinit { mappingBudget.unregister(budgetID) }

    private static func applyPermissions(_ access: PeerAccess, to path: String) throws(SystemCallError) {
        guard access.setsPermissions else { return }
        try SocketPermissions.apply(path: path, mode: access.mode ?? (access.group != nil ? 0o660 : 0o600),
                                    group: access.group, owner: access.owner)
    }

    /// SO_PEERCRED against the socket's allow-lists; a refused peer is
    /// logged, counted and closed by the caller.
    private func admits(_ connection: UnixSocket, _ access: PeerAccess, _ which: String) -> (Bool, PeerCredentials?) {
        let creds = try? connection.peerCredentials()
        guard let creds else {
            if access.allowedUsers.isEmpty && access.allowedGroups.isEmpty { return (true, nil) }
            state.withLock { $0.statistics.accessDenied += 1 }
            logger.warning("refused a \(which) connection: its credentials cannot be read")
            return (false, nil)
        }
        guard access.admits(uid: creds.uid, gid: creds.gid, groups: creds.groups) else {
            state.withLock { $0.statistics.accessDenied += 1 }
            logger.warning("refused a \(which) connection from pid \(creds.pid) uid \(creds.uid) gid \(creds.gid): not in the allow-lists",
                           metadata: ["rule": "peer-credentials"])
            return (false, creds)
        }
        return (true, creds)
    }

    public var statistics: BridgeStatistics {
        var s = state.withLock { $0.statistics }
        let p = peer.statistics
        s.peerConnections = p.connections
        s.peerConnected = p.connected
        s.peerReady = p.ready
        s.peerMapsSent = p.mapsSent
        s.peerUnmapsSent = p.unmapsSent
        s.peerAcks = p.acks
        s.revocationTimeouts = p.revocationTimeouts
        s.peerProtocolErrors = p.protocolErrors
        s.peerKilled = p.killed
        s.translationsGranted = p.translationsGranted
        s.translationsRefused = p.translationsRefused
        s.peerRefusals = p.refusals
        s.slowestRevocationMicroseconds = p.slowestRevocationMicroseconds
        s.notificationMode = settings.notifications
        if let view = s.session {
            add(relayStatistics(view), to: &s)
            s.add(view.statistics) // the live session's counters, on top of the finished sessions'
        }
        return s
    }

    private var stopping: Bool { state.withLock { $0.stopping } }

    /// Runs the bridge until `stop()`: accepts front ends one after another
    /// (or serves `connection` only, for `--fd`), and VM2s on a second thread.
    public func serve(connection: UnixSocket? = nil) {
        logger.info("serving \(settings.socketPath ?? "an inherited socket") (\(settings.backend.addressSpace.mode) mode, BAR \(ByteCount(settings.backend.addressSpace.barSize)))\(settings.peerSocketPath.map { ", VM2 on \($0)" } ?? "")")
        let peerThread = peerListener.flatMap { listener in
            try? JoinableThread(name: "peer-\(settings.name)") { [self] in self.servePeers(listener) }
        }
        var session: VhostUserConnection?
        var acceptPausedUntil: ContinuousClock.Instant?
        var pendingConnection = connection
        var servedInherited = false
        while !stopping {
            if session == nil, let c = pendingConnection {
                pendingConnection = nil
                servedInherited = true
                session = open(c)
            }
            if session == nil, connection != nil, servedInherited { break } // --fd: one session only
            var retryMilliseconds: Int32?
            if session == nil, connection == nil, settings.client, let path = settings.socketPath {
                if let c = try? UnixSocket.connect(path: path) {
                    session = open(c)
                } else {
                    retryMilliseconds = 200 // the front end is not there (yet): try again
                }
            }
            var fds = [stopSignal.fd.rawValue, peer.eventSignal.fd.rawValue, commandSignal.fd.rawValue]
            let now = ContinuousClock.now
            if let until = acceptPausedUntil, now >= until { acceptPausedUntil = nil }
            if let session { fds.append(session.socket.fd.rawValue) } else if let listener, acceptPausedUntil == nil { fds.append(listener.fd.rawValue) }
            var next = session?.expireTranslations(now: now)
            if let session, next != nil { publish(session) }
            if let until = acceptPausedUntil { next = min(next ?? until, until) }
            var timeout: Int32 = next.map { d in
                Int32(max(1, min(Double(Int32.max), (now.duration(to: d) / .milliseconds(1)).rounded(.down) + 1)))
            } ?? -1
            if let retry = retryMilliseconds { timeout = timeout < 0 ? retry : min(timeout, retry) }
            guard let ready = try? Poll.readable(fds, timeoutMilliseconds: timeout) else { continue }
            if ready[0] { break }
            if ready[1] {
                handlePeerEvents(session)
                if let session { publish(session) } // translations raise misses and count
            }
            if ready[2] { runCommands(session) }
            if ready.count > 3, ready[3] {
                if let current = session {
                    if let end = current.step() {
                        close(current, end: end)
                        session = nil
                    } else {
                        publish(current)
                    }
                } else if let listener {
                    do {
                        session = open(try listener.accept())
                    } catch {
                        if error.isResourceExhaustion { acceptPausedUntil = pauseAccepting("vhost-user", error) }
                    }
                }
            }
        }
        if let session { close(session, end: .stopped) }
        peerListener?.shutdown()
        peer.shutdownActive()
        peerThread?.join()
        relay?.stop()
        if let path = settings.socketPath, !settings.client { unlink(path) }
        if let path = settings.peerSocketPath { unlink(path) }
    }

    /// Out of fds (or kernel memory): the listener stays readable, so stop
    /// polling it for a moment instead of spinning; counted and logged.
    private func pauseAccepting(_ which: String, _ error: SystemCallError) -> ContinuousClock.Instant {
        state.withLock { $0.statistics.acceptFailures += 1 }
        logger.warning("\(which) socket: accept failed: \(error); retrying in \(SystemCallError.acceptBackoffMilliseconds) ms")
        return ContinuousClock.now.advanced(by: .milliseconds(Int(SystemCallError.acceptBackoffMilliseconds)))
    }

    /// Runs an operator command on the bridge thread and waits for its result.
    public func perform(_ command: BridgeCommand) -> Result<String, BridgeCommandError> {
        let id = state.withLock { s -> UInt64 in
            defer { s.nextCommand += 1 }
            s.commands.append((s.nextCommand, command))
            return s.nextCommand
        }
        _ = try? commandSignal.signal()
        for _ in 0..<5000 {
            if let r = state.withLock({ $0.results.removeValue(forKey: id) }) { return r }
            _ = try? Poll.readable([resultSignal.fd.rawValue], timeoutMilliseconds: 2)
            _ = try? resultSignal.read()
        }
        return .failure(.timedOut)
    }

    private func runCommands(_ session: VhostUserConnection?) {
        _ = try? commandSignal.read()
        let commands = state.withLock { s in defer { s.commands = [] }; return s.commands }
        for (id, command) in commands {
            let result = session.map { $0.perform(command) } ?? .failure(.noSession)
            if let session { publish(session) }
            state.withLock { $0.results[id] = result }
        }
        if !commands.isEmpty { _ = try? resultSignal.signal() }
    }

    private func open(_ connection: UnixSocket) -> VhostUserConnection? {
        let (admitted, creds) = admits(connection, settings.vm1Access, "vhost-user")
        guard admitted else { try? connection.fd.close(); return nil }
        let who = creds.map { "pid \($0.pid) uid \($0.uid)" } ?? "unknown peer"
        logger.info("front end connected (\(who))")
        // Messages are read once the socket is readable; a front end that then
        // stalls in the middle of one is dropped instead of holding the bridge.
        try? connection.setReceiveTimeout(milliseconds: 2000)
        try? connection.setSendTimeout(milliseconds: 2000)
        do {
            let session = try VhostUserConnection(socket: connection, configuration: settings.backend, window: window,
                                                  peer: peer, relay: relay, logger: logger,
                                                  maxPendingTranslations: settings.maxPendingTranslations,
                                                  budget: mappingBudget, budgetID: budgetID)
            state.withLock { $0.statistics.activeSession = true }
            publish(session)
            return session
        } catch {
            logger.error("cannot start a session: \(error)")
            try? connection.fd.close()
            return nil
        }
    }

    private func publish(_ session: VhostUserConnection) {
        let view = session.view
        state.withLock { $0.statistics.session = view }
    }

    /// Live relay counters of a session's links: (kick, call) per vring.
    /// (Live links, plus the ones the session already retired under key -1.)
    public func relayStatistics(_ view: SessionView) -> [Int: (kick: RelayLinkStatistics, call: RelayLinkStatistics)] {
        guard let relay else { return [:] }
        var out: [Int: (kick: RelayLinkStatistics, call: RelayLinkStatistics)] = [-1: view.relayRetired]
        for (i, links) in view.relayLinks {
            out[i] = (relay.statistics(links.kick) ?? RelayLinkStatistics(), relay.statistics(links.call) ?? RelayLinkStatistics())
        }
        return out
    }

    private func add(_ relayed: [Int: (kick: RelayLinkStatistics, call: RelayLinkStatistics)], to s: inout BridgeStatistics) {
        s.kicksRelayed += relayed.values.reduce(0) { $0 + $1.kick.notifications }
        s.callsRelayed += relayed.values.reduce(0) { $0 + $1.call.notifications }
        s.notificationsDropped += relayed.values.reduce(0) { $0 + $1.kick.dropped + $1.call.dropped }
        s.notificationsCoalesced += relayed.values.reduce(0) { $0 + $1.kick.coalesced + $1.call.coalesced }
    }

    private func close(_ session: VhostUserConnection, end: ConnectionSummary.End) {
        session.tearDown() // retires every relay link into the session's totals
        let relayed = relayStatistics(session.view)
        let summary = session.session.statistics
        state.withLock { s in
            self.add(relayed, to: &s.statistics)
            s.statistics.session = nil
            s.statistics.activeSession = false
            s.statistics.sessionsServed += 1
            s.statistics.add(summary)
            s.statistics.lastEnd = end
            s.statistics.lastRequestLog = summary.requestLog
        }
        logger.info("front end session ended: \(end); \(summary.requests) requests, \(summary.refusals.values.reduce(0, +)) refused")
    }

    private func handlePeerEvents(_ session: VhostUserConnection?) {
        for event in peer.drainEvents() {
            switch event {
            case .hello(let hello, let generation):
                guard peer.currentGeneration == generation else { continue }
                let space = settings.backend.addressSpace
                let info = PeerBARInfo(mode: space.mode, features: hello.features.intersection(.all), barSize: space.barSize,
                                       pageSize: UInt32(space.pageSize), vringCount: UInt32(settings.backend.vringCount))
                guard peer.send(.helloReply(info), onlyIfReady: false, generation: generation) else { continue }
                session?.replayState(to: generation)
                peer.markReady(generation: generation, features: info.features)
                logger.info("VM2 ready (generation \(generation))")
            case .translate(let request, let generation):
                guard peer.currentGeneration == generation, peer.isReady else { continue }
                if let session {
                    session.translate(request, generation: generation)
                } else {
                    peer.count { $0.translationsRefused += 1; $0.refusals["no-session", default: 0] += 1 }
                    peer.send(.translateReply(PeerTranslateReply(requestID: request.requestID, status: .refused,
                                                                 reason: "no VM1 session is connected")))
                }
            case .gone(let generation, let reason):
                logger.info("VM2 disconnected (generation \(generation)): \(reason)")
                session?.dropTranslations(of: generation)
            }
        }
    }

    // MARK: peer thread

    private func servePeers(_ listener: UnixSocket) {
        var active: (socket: UnixSocket, generation: Int, greeted: Bool)?
        var acceptPausedUntil: ContinuousClock.Instant?
        while !stopping {
            var fds: [Int32] = []
            let now = ContinuousClock.now
            if let until = acceptPausedUntil, now >= until { acceptPausedUntil = nil }
            if acceptPausedUntil == nil { fds.append(listener.fd.rawValue) }
            // A VM2 that sends faster than the bridge thread takes its
            // requests is not read until the queue drains: its messages wait
            // in its socket, not in the daemon's memory.
            let throttled = peer.queuedEvents >= settings.maxPendingTranslations
            if let active, !throttled { fds.append(active.socket.fd.rawValue) }
            var timeout = acceptPausedUntil.map { Int32(max(1, min(1000, (now.duration(to: $0) / .milliseconds(1)).rounded(.up)))) } ?? -1
            if throttled { timeout = timeout < 0 ? 5 : min(timeout, 5) }
            guard let polled = try? Poll.readable(fds, timeoutMilliseconds: timeout) else { continue }
            if stopping { break }
            // Index 0 is the listener (false while paused), index 1 the VM2 (false while throttled).
            var ready = acceptPausedUntil == nil ? polled : [false] + polled
            if throttled, active != nil { ready.append(false) }
            var accepted: UnixSocket?
            if ready[0] {
                do { accepted = try listener.accept() } catch {
                    if error.isResourceExhaustion { acceptPausedUntil = pauseAccepting("peer", error) }
                }
            }
            if let socket = accepted {
                let (admitted, creds) = admits(socket, settings.vm2Access, "peer")
                guard admitted else {
                    try? socket.send(PeerCodec.encode(.error(PeerError(code: .protocolError,
                                                                       text: "bridge \(settings.name): this user may not connect as VM2"))), nonBlocking: true)
                    try? socket.fd.close()
                    continue
                }
                // A VM2 that stops reading holds the bridge thread (and so
                // VM1) for at most one revocation deadline per message.
                try? socket.setSendTimeout(milliseconds: max(20, settings.revocationDeadlineMilliseconds))
                var process: ProcessHandle?
                if settings.vm2DeadlineAction == .kill, let pid = creds?.pid {
                    do { process = try ProcessHandle(pid: pid) } catch { logger.warning("no pidfd for VM2 pid \(pid): \(error); it can only be disconnected") }
                }
                if let generation = peer.attach(socket, process: process) {
                    active = (socket, generation, false)
                } else {
                    try? socket.send(PeerCodec.encode(.error(PeerError(code: .busy, text: "bridge \(settings.name) already has a VM2"))),
                                     nonBlocking: true)
                    try? socket.fd.close()
                    logger.warning("refused a second VM2 connection")
                }
            }
            if ready.count > 1, ready[1], let current = active {
                var greeted = current.greeted
                if let reason = readPeerMessage(current.socket, generation: current.generation, greeted: &greeted) {
                    peer.detach(generation: current.generation, reason: reason)
                    active = nil
                } else {
                    active?.greeted = greeted
                }
            }
        }
        if let active { peer.detach(generation: active.generation, reason: "bridge stopping") }
    }

    /// Reads one message from VM2; returns a reason when the connection is over.
    private func readPeerMessage(_ socket: UnixSocket, generation: Int, greeted: inout Bool) -> String? {
        let message: PeerMessage
        do {
            var parsed: (PeerCodec.Header, PeerMessageType)?
            guard let framed = try socket.receiveFramed(payloadSize: { bytes in
                let v = try PeerCodec.validate(header: bytes)
                parsed = v
                return Int(v.0.size)
            }), let (header, type) = parsed else { return "closed" }
            message = try PeerCodec.decode(header, type, payload: framed.payload, fdCount: framed.fds.count)
        } catch {
            if stopping { return "bridge stopping" }
            peer.countProtocolError(rule: "peer-protocol")
            logger.warning("VM2 protocol error: \(error)")
            try? socket.send(PeerCodec.encode(.error(PeerError(code: .protocolError, text: "\(error)"))), nonBlocking: true)
            return "protocol error: \(error)"
        }
        switch message {
        case .hello(let hello) where !greeted:
            guard hello.version == PeerCodec.version else {
                peer.countProtocolError(rule: "peer-version")
                try? socket.send(PeerCodec.encode(.error(PeerError(code: .version, text: "peer protocol version \(hello.version) is not 1"))), nonBlocking: true)
                return "version \(hello.version)"
            }
            greeted = true
            peer.post(.hello(hello, generation: generation))
        case .ack(let seq) where greeted:
            do {
                try peer.acknowledge(seq, generation: generation)
            } catch {
                logger.warning("VM2 protocol error: \(error)", metadata: ["rule": "ack-sequence"])
                try? socket.send(PeerCodec.encode(.error(PeerError(code: .protocolError, text: "\(error)"))), nonBlocking: true)
                return "protocol error: \(error)"
            }
        case .translate(let t) where greeted:
            peer.post(.translate(t, generation: generation))
        case .vringStopped(let index, let lastAvail) where greeted:
            do {
                try peer.reportRingStop(index, lastAvail: lastAvail, generation: generation)
            } catch {
                logger.warning("VM2 protocol error: \(error)", metadata: ["rule": "ring-stop"])
                try? socket.send(PeerCodec.encode(.error(PeerError(code: .protocolError, text: "\(error)"))), nonBlocking: true)
                return "protocol error: \(error)"
            }
        case .error(let e):
            return "VM2 reported error \(e.code): \(e.text)"
        default:
            let text = "\(message.type) is not allowed \(greeted ? "from VM2" : "before HELLO")"
            peer.countProtocolError(rule: "peer-state")
            logger.warning("VM2 protocol error: \(text)")
            try? socket.send(PeerCodec.encode(.error(PeerError(code: .protocolError, text: text))), nonBlocking: true)
            return text
        }
        return nil
    }

    /// Stops accepting, ends the active session (revoking everything from the
    /// window and VM2) and VM2's connection. Safe from any thread.
    public func stop() {
        state.withLock { $0.stopping = true }
        _ = try? stopSignal.signal()
        listener?.shutdown()
        peerListener?.shutdown()
    }
}
