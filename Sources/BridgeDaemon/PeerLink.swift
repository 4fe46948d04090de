import BridgeCore
import LinuxIO
import Logging
import PeerProtocol
import Synchronization

/// The bridge's connection to VM2, shared between the peer thread (which
/// reads VM2's socket) and the bridge thread (which owns all bridge state and
/// does all sending). The peer thread never touches bridge state: it posts
/// events, and wakes the bridge thread through `eventSignal`; acks wake a
/// revocation wait through `ackSignal`.
///
/// Sendable without `@unchecked`: all mutable state is behind a `Mutex`; the
/// eventfds are Sendable owners.
final class PeerLink: Sendable {
    enum Event: Sendable {
        case hello(PeerHello, generation: Int)
        case translate(PeerTranslate, generation: Int)
        case gone(generation: Int, reason: String)
    }

    struct Statistics: Sendable, Equatable {
        var connections = 0
        var connected = false
        var ready = false
        var mapsSent = 0
        var unmapsSent = 0
        var acks = 0
        var revocationTimeouts = 0
        /// Connections ended for a protocol error (bad framing, a message in
        /// the wrong state, an ACK the daemon never asked for, ...).
        var protocolErrors = 0
        var translationsGranted = 0
        var translationsRefused = 0
        var refusals: [String: Int] = [:]
        /// Longest wait for a revocation ack, in microseconds.
        var slowestRevocationMicroseconds: UInt64 = 0
    }

    private struct State {
        var socket: UnixSocket?
        var generation = 0
        var ready = false
        var nextSequence: UInt64 = 1
        var acked: UInt64 = 0
        var events: [Event] = []
        var statistics = Statistics()
    }

    private let state = Mutex(State())
    let eventSignal: EventFD
    let ackSignal: EventFD
    let logger: Logger
    let revocationDeadlineMilliseconds: Int

    init(logger: Logger, revocationDeadlineMilliseconds: Int) throws(SystemCallError) {
        eventSignal = try EventFD()
        ackSignal = try EventFD()
        self.logger = logger
        self.revocationDeadlineMilliseconds = revocationDeadlineMilliseconds
    }

    var statistics: Statistics { state.withLock { $0.statistics } }
    var isReady: Bool { state.withLock { $0.ready } }

    // MARK: peer thread

    /// Takes a new VM2 connection; nil when one is already attached.
    func attach(_ socket: UnixSocket) -> Int? {
        state.withLock { s -> Int? in
            guard s.socket == nil else { return nil }
            s.socket = socket
            s.generation += 1
            s.ready = false
            s.nextSequence = 1
            s.acked = 0
            s.statistics.connections += 1
            s.statistics.connected = true
            return s.generation
        }
    }

    func post(_ event: Event) {
        state.withLock { $0.events.append(event) }
        _ = try? eventSignal.signal()
    }

    enum AckError: Error, Equatable, CustomStringConvertible {
        /// VM2 acknowledged a sequence the daemon has not sent yet: accepting
        /// it would satisfy a later revocation before VM2 even saw it.
        case fromTheFuture(UInt64, lastSent: UInt64)
        var description: String {
            switch self {
            case .fromTheFuture(let seq, let last): "ACK \(seq) is beyond the last MAP/UNMAP sequence sent (\(last))"
            }
        }
    }

    /// VM2 acknowledged every MAP/UNMAP up to `sequence` on connection
    /// `generation`. An ACK for a sequence not sent yet is a protocol error.
    func acknowledge(_ sequence: UInt64, generation: Int) throws(AckError) {
        let accepted = try state.withLock { s throws(AckError) -> Bool in
            guard s.generation == generation else { return false }
            let lastSent = s.nextSequence - 1
            guard sequence <= lastSent else {
                s.statistics.protocolErrors += 1
                s.statistics.refusals["ack-sequence", default: 0] += 1
                throw .fromTheFuture(sequence, lastSent: lastSent)
            }
            s.acked = max(s.acked, sequence)
            s.statistics.acks += 1
            return true
        }
        if accepted { _ = try? ackSignal.signal() }
    }

    func countProtocolError(rule: String) {
        count { $0.protocolErrors += 1; $0.refusals[rule, default: 0] += 1 }
    }

    /// The connection of `generation` ended (EOF, error, or disconnected by
    /// us). The socket is shut down and forgotten here; its fd is closed when
    /// the last holder lets go — the peer thread that owns it, or a bridge
    /// thread still inside a send — never under a sender's feet, so a new
    /// VM2 can never receive the tail of a message meant for the old one.
    func detach(generation: Int, reason: String) {
        let socket = state.withLock { s -> UnixSocket? in
            guard s.generation == generation, let socket = s.socket else { return nil }
            s.socket = nil
            s.ready = false
            s.statistics.connected = false
            s.statistics.ready = false
            return socket
        }
        guard let socket else { return }
        socket.shutdown()
        post(.gone(generation: generation, reason: reason))
    }

    // MARK: bridge thread

    func drainEvents() -> [Event] {
        _ = try? eventSignal.read()
        return state.withLock { s in
            defer { s.events = [] }
            return s.events
        }
    }

    var currentGeneration: Int? { state.withLock { $0.socket == nil ? nil : $0.generation } }

    func markReady(generation: Int) {
        state.withLock { s in
            guard s.generation == generation, s.socket != nil else { return }
            s.ready = true
            s.statistics.ready = true
        }
    }

    func count(_ update: (inout Statistics) -> Void) {
        state.withLock { update(&$0.statistics) }
    }

    /// Sends to the attached VM2 (blocking, bounded by SO_SNDTIMEO). Returns
    /// false — and disconnects VM2 — when that fails. With `onlyIfReady`,
    /// nothing is sent before the handshake and state replay are done.
    /// With `generation`, only that connection gets it (a reply to a request).
    @discardableResult
    func send(_ message: PeerMessage, fds: [Int32] = [], onlyIfReady: Bool = true, generation only: Int? = nil) -> Bool {
        guard let (socket, generation) = state.withLock({ s -> (UnixSocket, Int)? in
            guard let socket = s.socket, !onlyIfReady || s.ready, only == nil || only == s.generation else { return nil }
            return (socket, s.generation)
        }) else { return false }
        do {
            try socket.send(PeerCodec.encode(message), fds: fds)
            return true
        } catch {
            logger.warning("sending \(message.type) to VM2 failed: \(error); disconnecting VM2")
            disconnect(generation: generation, reason: "send failed: \(error)")
            return false
        }
    }

    /// A MAP/UNMAP sequence number on one VM2 connection.
    struct Ticket: Equatable {
        var sequence: UInt64
        var generation: Int
    }

    /// The next MAP/UNMAP sequence number of the attached connection.
    func takeSequence() -> Ticket {
        state.withLock { s in
            defer { s.nextSequence += 1 }
            return Ticket(sequence: s.nextSequence, generation: s.generation)
        }
    }

    /// Waits until VM2 acknowledged `ticket`, at most the revocation
    /// deadline. On time-out VM2 is disconnected (it then holds no mapping)
    /// and false is returned; either way the revocation is complete when this
    /// returns. A wait belongs to the connection its ticket was taken on: when
    /// that one is gone, nothing is left to wait for, and a newer connection's
    /// acks (its sequences start again at 1) never satisfy it.
    @discardableResult
    func waitForAck(_ ticket: Ticket) -> Bool {
        let sequence = ticket.sequence
        let clock = ContinuousClock()
        let start = clock.now
        let deadline = start.advanced(by: .milliseconds(revocationDeadlineMilliseconds))
        while true {
            let (acked, generation) = state.withLock { s in
                (s.acked, s.socket != nil && s.generation == ticket.generation ? Optional(s.generation) : nil)
            }
            guard let generation else { return true } // that VM2 is gone: nothing to wait for
            if acked >= sequence {
                let us = UInt64(max(0, (start.duration(to: clock.now) / .microseconds(1)).rounded(.down)))
                count { $0.slowestRevocationMicroseconds = max($0.slowestRevocationMicroseconds, us) }
                return true
            }
            let now = clock.now
            if now >= deadline {
                count { $0.revocationTimeouts += 1 }
                logger.warning("VM2 did not acknowledge revocation \(sequence) within \(revocationDeadlineMilliseconds) ms; disconnecting VM2")
                disconnect(generation: generation, reason: "revocation deadline missed")
                return false
            }
            let ms = Int32(max(1, (now.duration(to: deadline) / .milliseconds(1)).rounded(.down)))
            _ = try? Poll.readable([ackSignal.fd.rawValue], timeoutMilliseconds: ms)
            _ = try? ackSignal.read()
        }
    }

    /// Drops VM2's connection (the peer thread sees it end and reports `.gone`).
    func disconnect(generation: Int, reason: String) {
        let socket = state.withLock { s -> UnixSocket? in
            guard s.generation == generation else { return nil }
            s.ready = false
            s.statistics.ready = false
            return s.socket
        }
        socket?.shutdown()
    }

    /// Disconnects whatever VM2 is attached (daemon stop).
    func shutdownActive() {
        let socket = state.withLock { $0.socket }
        socket?.shutdown()
    }
}
