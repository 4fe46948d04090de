import BridgeCore
import LinuxIO
import Logging
import PeerProtocol
#if canImport(Glibc)
import Glibc
#endif

/// What a bridge's VM2 side did (one VM2 connection at a time; summed over
/// connections since the bridge started).
public struct PeerStatistics: Sendable, Equatable {
    public var connections = 0
    public var connected = false
    public var ready = false
    public var mapsSent = 0
    public var unmapsSent = 0
    public var acks = 0
    public var revocationTimeouts = 0
    /// Connections ended for a protocol error (bad framing, a message in
    /// the wrong state, an ACK the daemon never asked for, ...).
    public var protocolErrors = 0
    /// VM2 VMMs killed (SIGKILL through their pidfd) for missing a deadline.
    public var killed = 0
    public var translationsGranted = 0
    public var translationsRefused = 0
    public var refusals: [String: Int] = [:]
    /// Longest wait for a revocation ack, in microseconds.
    public var slowestRevocationMicroseconds: UInt64 = 0
    /// Every acknowledged revocation's wait for VM2's ack.
    public var revocationLatency = LatencyHistogram()
    /// Every IOTLB message from VM1, received to answered: the window change
    /// and, for an invalidate, VM2's ack; kept here because it is mostly the
    /// round trip to VM2, and with the peer counters it outlives sessions.
    public var iotlbLatency = LatencyHistogram()
    /// Replies to VM1 that the peer thread sent the moment VM2 acknowledged
    /// the revocation they waited for (the rest the bridge thread sends).
    public var repliesSentOnAck = 0
    public init() {}

    /// A connection ended for a protocol error, counted under its rule.
    mutating func noteProtocolError(rule: String) {
        protocolErrors += 1
        refusals[rule, default: 0] += 1
    }
}

/// The bridge's connection to VM2, shared between the peer thread (which
/// reads VM2's socket) and the bridge thread (which owns all bridge state and
/// does all sending). The peer thread never touches bridge state: it posts
/// events, and wakes the bridge thread through `eventSignal`; acks wake a
/// revocation wait through `ackSignal`.
///
/// Sendable without `@unchecked`: all mutable state is behind a `Locked` (pthread mutex); the
/// eventfds are Sendable owners.
final class PeerLink: Sendable {
    enum Event: Sendable {
        case hello(PeerHello, generation: Int)
        case translate(PeerTranslate, generation: Int)
        case gone(generation: Int, reason: String)
    }

    typealias Statistics = PeerStatistics


    private struct State {
        var socket: UnixSocket?
        /// The VMM at the other end, when the deadline action is `kill`.
        var process: ProcessHandle?
        var generation = 0
        var ready = false
        var nextSequence: UInt64 = 1
        var acked: UInt64 = 0
        /// Peer features negotiated in HELLO.
        var features: PeerFeatures = []
        var stopsRequested: Set<UInt32> = []
        var stopsReported: [UInt32: UInt16?] = [:]
        /// The sequence of the last UNMAP meant for this connection, taken
        /// before it is sent: while `acked` is below it, VM2 holds access it
        /// was told (or is being told) to drop.
        var lastRevocation: UInt64 = 0
        /// SIGKILL was sent to this connection's VMM (counted once).
        var killSent = false
        var events: [Event] = []
        var statistics = Statistics()
        /// VM1's reply to a request that revoked access, handed over for
        /// the time of the bridge thread's wait for VM2's ack.
        var heldReply = HeldReply.none
    }

    /// A reply held for VM1 while its revocation waits for VM2's ack. The
    /// peer thread sends it the moment it reads the ack — VM1 then waits for
    /// one thread hand-off fewer (VM2 → peer thread → VM1 instead of VM2 →
    /// peer thread → bridge thread → VM1) — and the bridge thread sends it
    /// when the wait ends any other way. Sent once, in order: the bridge
    /// thread sends nothing to VM1 until the peer thread's send is over.
    enum HeldReply: Sendable {
        case none
        case waiting(Ticket, [UInt8], UnixSocket)
        case sending
        case sent
        case failed(String)
    }

    /// How a held reply went.
    enum HeldReplyOutcome: Equatable {
        /// The peer thread sent it when VM2 acknowledged.
        case sent
        /// The peer thread's send failed (the session is over).
        case failed(String)
        /// Nobody sent it: the caller does.
        case notSent
    }

    private let state = Locked(State())
    let eventSignal: EventFD
    let ackSignal: EventFD
    let logger: Logger
    let revocationDeadlineMilliseconds: Int
    /// The bridge thread's proof of life: moved after every bounded wait
    /// it does here (a send, an ack or ring-stop wait), so a thread that
    /// works through many slow but punctual peer operations in one loop pass
    /// is never taken for a stuck one.
    let heartbeat: Heartbeat

    /// How long one whole message to or from VM2 may take: a VM2 that does
    /// not read (or write) a message within this is treated as one that
    /// stopped — however it drips the bytes.
    var messageDeadline: Duration { .milliseconds(max(1000, revocationDeadlineMilliseconds)) }

    init(logger: Logger, revocationDeadlineMilliseconds: Int, heartbeat: Heartbeat = Heartbeat()) throws(SystemCallError) {
        eventSignal = try EventFD()
        ackSignal = try EventFD()
        self.logger = logger
        self.revocationDeadlineMilliseconds = revocationDeadlineMilliseconds
        self.heartbeat = heartbeat
    }

    var statistics: Statistics { state.withLock { $0.statistics } }
    var isReady: Bool { state.withLock { $0.ready } }
    /// Peer features the ready VM2 negotiated ([] before it is ready).
    var features: PeerFeatures { state.withLock { $0.features } }

    // MARK: peer thread

    /// Takes a new VM2 connection; nil when one is already attached.
    func attach(_ socket: UnixSocket, process: ProcessHandle? = nil) -> Int? {
        state.withLock { s -> Int? in
            guard s.socket == nil else { return nil }
            s.socket = socket
            s.process = process
            s.generation += 1
            s.ready = false
            s.nextSequence = 1
            s.acked = 0
            s.features = []
            s.stopsRequested = []
            s.stopsReported = [:]
            s.lastRevocation = 0
            s.killSent = false
            s.statistics.connections += 1
            s.statistics.connected = true
            return s.generation
        }
    }

    /// Events the bridge thread has not taken yet.
    var queuedEvents: Int { state.withLock { $0.events.count } }

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
                s.statistics.noteProtocolError(rule: "ack-sequence")
                throw .fromTheFuture(sequence, lastSent: lastSent)
            }
            s.acked = max(s.acked, sequence)
            s.statistics.acks += 1
            return true
        }
        guard accepted else { return }
        sendHeldReply(acknowledged: generation)
        _ = try? ackSignal.signal()
    }

    /// On the peer thread, after an ack: sends VM1's held reply if that ack
    /// covers its revocation. The bridge thread is waiting meanwhile, and
    /// waits until this send is over before it touches VM1's socket again.
    private func sendHeldReply(acknowledged generation: Int) {
        let held = state.withLock { s -> (bytes: [UInt8], socket: UnixSocket)? in
            guard case .waiting(let ticket, let bytes, let socket) = s.heldReply,
                  ticket.generation == generation, s.acked >= ticket.sequence else { return nil }
            s.heldReply = .sending
            return (bytes, socket)
        }
        guard let held else { return }
        // The whole reply within VM1's message deadline: a VM1 that does not
        // read holds this thread no longer than it would hold the bridge thread.
        let outcome: HeldReply
        do {
            try held.socket.send(held.bytes, deadline: .now.advanced(by: VhostUserConnectionTuning.messageDeadline))
            outcome = .sent
        } catch { outcome = .failed("reply failed: \(error)") }
        state.withLock { s in
            s.heldReply = outcome
            if case .sent = outcome { s.statistics.repliesSentOnAck += 1 }
        }
    }

    func countProtocolError(rule: String) {
        count { $0.noteProtocolError(rule: rule) }
    }

    /// The connection of `generation` ended (EOF, error, or disconnected by
    /// us). The socket is shut down and forgotten here; its fd is closed when
    /// the last holder lets go — the peer thread that owns it, or a bridge
    /// thread still inside a send — never under a sender's feet, so a new
    /// VM2 can never receive the tail of a message meant for the old one.
    ///
    /// A VM2 that leaves — hangs up, breaks the protocol, or cannot be sent
    /// to — while it holds a revocation it has not acknowledged has missed
    /// that revocation's deadline: with the `kill` action its VMM is killed
    /// and gone *before* the connection counts as gone, so the revocation
    /// (and VM1's ack) cannot complete while the process still maps the range.
    func detach(generation: Int, reason: String) {
        let holder = state.withLock { s -> ProcessHandle? in
            guard s.generation == generation, s.socket != nil, s.acked < s.lastRevocation else { return nil }
            return s.process
        }
        if let holder {
            kill(holder, generation: generation,
                 reason: "VM2 left (\(reason)) holding revocation \(state.withLock { $0.lastRevocation }) unacknowledged")
        }
        let socket = state.withLock { s -> UnixSocket? in
            guard s.generation == generation, let socket = s.socket else { return nil }
            s.socket = nil
            s.process = nil // its pidfd closes with the last reference
            s.ready = false
            s.statistics.connected = false
            s.statistics.ready = false
            return socket
        }
        guard let socket else { return }
        socket.shutdown()
        post(.gone(generation: generation, reason: reason))
        _ = try? ackSignal.signal() // a revocation or ring-stop wait on this connection ends now, not at its deadline
    }

    // MARK: bridge thread

    /// Takes at most `limit` queued events, oldest first: one loop pass of
    /// the bridge thread does a bounded amount of VM2's work (each event may
    /// send a reply), and what is left keeps the signal raised for the next.
    func drainEvents(limit: Int = PeerLink.eventsPerPass) -> [Event] {
        _ = try? eventSignal.read()
        let (taken, more) = state.withLock { s -> ([Event], Bool) in
            let taken = Array(s.events.prefix(limit))
            s.events.removeFirst(taken.count)
            return (taken, !s.events.isEmpty)
        }
        if more { _ = try? eventSignal.signal() }
        return taken
    }

    /// Events the bridge thread handles per loop pass.
    static let eventsPerPass = 32

    var currentGeneration: Int? { state.withLock { $0.socket == nil ? nil : $0.generation } }

    func markReady(generation: Int, features: PeerFeatures) {
        state.withLock { s in
            guard s.generation == generation, s.socket != nil else { return }
            s.ready = true
            s.features = features
            s.statistics.ready = true
        }
    }

    func count(_ update: (inout Statistics) -> Void) {
        state.withLock { update(&$0.statistics) }
    }

    /// Sends to the attached VM2 (blocking, bounded by SO_SNDTIMEO). Returns
    /// false when that fails, and VM2 is disconnected. A VM2 that stopped
    /// reading (the send timed out) is treated as one that missed a
    /// deadline: with the `kill` action its VMM is killed first, since it
    /// would otherwise keep every mapping it holds while the revocations it
    /// never read are acked to VM1. A connection VM2 closed is just gone (as
    /// when the peer thread sees it end). With `onlyIfReady`,
    /// nothing is sent before the handshake and state replay are done.
    /// With `generation`, only that connection gets it (a reply to a request).
    @discardableResult
    func send(_ message: PeerMessage, fds: [Int32] = [], onlyIfReady: Bool = true, generation only: Int? = nil) -> Bool {
        guard let (socket, generation) = state.withLock({ s -> (UnixSocket, Int)? in
            guard let socket = s.socket, !onlyIfReady || s.ready, only == nil || only == s.generation else { return nil }
            // An UNMAP counts as held from now: should VM2 be lost before
            // it acknowledges, even before this send completes, it is lost
            // holding the range.
            if case .unmap(let u) = message { s.lastRevocation = max(s.lastRevocation, u.sequence) }
            return (socket, s.generation)
        }) else { return false }
        defer { heartbeat.beat() }
        do {
            try socket.send(PeerCodec.encode(message), fds: fds, deadline: .now.advanced(by: messageDeadline))
            return true
        } catch {
            if error.errno == .timedOut { // the whole message did not go out in time: VM2 stopped reading
                logger.warning("sending \(message.type) to VM2 failed: \(error); disconnecting VM2")
                missedDeadline(generation: generation, reason: "VM2 stopped reading: sending \(message.type) timed out")
            } else {
                // A VM2 that closed its end is gone: an ordinary event
                // (detach logs it), unless it held a revocation — then detach kills.
                logger.info("VM2 went away while \(message.type) was sent to it (\(error.errno)); disconnecting it")
                disconnect(generation: generation, reason: "send failed: \(error)")
            }
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

    private enum WaitOutcome<T> { case done(T), gone, timedOut(generation: Int) }

    /// Waits (at most the revocation deadline) until `satisfied` returns a
    /// value for the state of connection `generation`. Ends early when that
    /// connection is gone: a newer one never satisfies an older wait.
    private func wait<T>(on generation: Int, _ satisfied: (State) -> T?) -> WaitOutcome<T> {
        defer { heartbeat.beat() }
        let deadline = ContinuousClock.now.advanced(by: .milliseconds(revocationDeadlineMilliseconds))
        let outcome = ackSignal.wait(until: deadline) {
            state.withLock { s -> WaitOutcome<T>? in
                guard s.socket != nil, s.generation == generation else { return .gone }
                return satisfied(s).map { .done($0) }
            }
        }
        return outcome ?? .timedOut(generation: generation)
    }

    /// Waits until VM2 acknowledged `ticket`, at most the revocation
    /// deadline. On time-out VM2 is disconnected (it then holds no mapping)
    /// and false is returned; either way the revocation is complete when this
    /// returns. A wait belongs to the connection its ticket was taken on: when
    /// that one is gone, nothing is left to wait for, and a newer connection's
    /// acks (its sequences start again at 1) never satisfy it.
    @discardableResult
    func waitForAck(_ ticket: Ticket) -> Bool {
        let start = ContinuousClock.now
        switch wait(on: ticket.generation, { $0.acked >= ticket.sequence ? true : nil }) {
        case .done:
            let waited = start.duration(to: .now)
            let us = UInt64(max(0, (waited / .microseconds(1)).rounded(.down)))
            count {
                $0.slowestRevocationMicroseconds = max($0.slowestRevocationMicroseconds, us)
                $0.revocationLatency.record(waited)
            }
            return true
        case .gone:
            return true // that VM2 is gone: nothing to wait for
        case .timedOut(let generation):
            count { $0.revocationTimeouts += 1 }
            logger.warning("VM2 did not acknowledge revocation \(ticket.sequence) within \(revocationDeadlineMilliseconds) ms; disconnecting VM2")
            missedDeadline(generation: generation, reason: "revocation deadline missed")
            return false
        }
    }

    /// `waitForAck`, with VM1's reply to the revoking request handed to the
    /// peer thread, which sends it on `socket` as soon as it reads the ack.
    /// When this returns, nobody is sending: `.notSent` leaves the reply to
    /// the caller (VM2 left, missed its deadline, or had acked already).
    func waitForAck(_ ticket: Ticket, replying bytes: [UInt8], on socket: UnixSocket) -> HeldReplyOutcome {
        state.withLock { s in
            guard s.socket != nil, s.generation == ticket.generation, s.acked < ticket.sequence else { return }
            s.heldReply = .waiting(ticket, bytes, socket)
        }
        waitForAck(ticket)
        // The ack may have been read just now, its reply still going out.
        return ackSignal.wait(until: nil) {
            state.withLock { s -> HeldReplyOutcome? in
                switch s.heldReply {
                case .sending: return nil
                case .sent: s.heldReply = .none; return .sent
                case .failed(let reason): s.heldReply = .none; return .failed(reason)
                case .none, .waiting: s.heldReply = .none; return .notSent
                }
            }
        } ?? .notSent
    }

    // MARK: ring stops (peer feature vringStopAck)

    /// Where a VRING_STOP went.
    enum RingStopSent: Equatable {
        /// No ready VM2 (or the send failed: it is being disconnected).
        case notSent
        /// Sent to connection `generation`, which answers with VRING_STOPPED
        /// (it negotiated `vringStopAck`).
        case awaitingAnswer(generation: Int)
        /// Sent to connection `generation`, a version-1 peer: no answer.
        case sent(generation: Int)

        var generation: Int? {
            switch self {
            case .notSent: nil
            case .awaitingAnswer(let g), .sent(let g): g
            }
        }
    }

    /// Sends VRING_STOP for ring `index` to the ready VM2, whatever it
    /// negotiated: every VM2 must stop a ring VM1 stopped. One that
    /// negotiated `vringStopAck` answers each VRING_STOP, so the stop is
    /// registered before it goes out (the answer may come at once).
    @discardableResult
    func sendVringStop(_ index: UInt32) -> RingStopSent {
        guard let (generation, answers) = state.withLock({ s -> (Int, Bool)? in
            guard s.socket != nil, s.ready else { return nil }
            let answers = s.features.contains(.vringStopAck)
            if answers {
                s.stopsRequested.insert(index)
                s.stopsReported[index] = nil
            }
            return (s.generation, answers)
        }) else { return .notSent }
        guard send(.vringStop(index), generation: generation) else { return .notSent }
        return answers ? .awaitingAnswer(generation: generation) : .sent(generation: generation)
    }

    enum RingStopError: Error, Equatable, CustomStringConvertible {
        case notRequested(UInt32)
        var description: String {
            switch self {
            case .notRequested(let i): "VRING_STOPPED for vring \(i), which the daemon did not ask to stop"
            }
        }
    }

    /// VM2 reports ring `index` stopped (peer thread). Only an answer to a
    /// VRING_STOP is accepted.
    func reportRingStop(_ index: UInt32, lastAvail: UInt16?, generation: Int) throws(RingStopError) {
        let accepted = try state.withLock { s throws(RingStopError) -> Bool in
            guard s.generation == generation else { return false }
            guard s.stopsRequested.remove(index) != nil else {
                s.statistics.noteProtocolError(rule: "ring-stop")
                throw .notRequested(index)
            }
            s.stopsReported[index] = .some(lastAvail)
            return true
        }
        if accepted { _ = try? ackSignal.signal() }
    }

    /// The avail index VM2 reached on ring `index` (nil: VM2 did not run it,
    /// is gone, or missed the deadline — then it is disconnected).
    func waitForRingStop(_ index: UInt32, generation: Int) -> UInt16? {
        switch wait(on: generation, { $0.stopsReported[index] }) {
        case .done(let lastAvail): return lastAvail
        case .gone: return nil
        case .timedOut(let generation):
            count { $0.revocationTimeouts += 1 }
            logger.warning("VM2 did not report vring \(index) stopped within \(revocationDeadlineMilliseconds) ms; disconnecting VM2")
            missedDeadline(generation: generation, reason: "ring stop deadline missed")
            return nil
        }
    }

    /// A VM2 that ignores a deadline (or stops reading) is disconnected, and
    /// with a pidfd (the `kill` deadline action) its VMM is killed: a VMM
    /// that ignores the protocol would otherwise keep the mappings it was
    /// told to drop. The caller acks VM1 only after the VMM has exited (its
    /// memory is gone then), waiting at most `killWaitMilliseconds`.
    private func missedDeadline(generation: Int, reason: String) {
        // Killed first, disconnected second: the VMM never gets to act on
        // the disconnection (nor to exit on its own as if nothing happened).
        if let process = state.withLock({ s in s.generation == generation ? s.process : nil }) {
            kill(process, generation: generation, reason: reason)
        }
        disconnect(generation: generation, reason: reason)
    }

    /// SIGKILL to connection `generation`'s VMM through its pidfd, then a
    /// wait (at most `killWaitMilliseconds`) until it is gone. The bridge
    /// thread (a missed deadline) and the peer thread (VM2 left holding a
    /// revocation) may both get here for one connection: the signal is
    /// counted and logged once, and both wait for the exit.
    private func kill(_ process: ProcessHandle, generation: Int, reason: String) {
        let first = state.withLock { s -> Bool in
            guard s.generation == generation, !s.killSent else { return false }
            s.killSent = true
            return true
        }
        do {
            try process.send(signal: SIGKILL)
        } catch where error.errno == .noSuchProcess {
            // Already gone (reaped): nothing holds the memory any more.
        } catch {
            if first { logger.error("could not kill VM2's VMM (pid \(process.pid)): \(error)") }
            return
        }
        let exited = process.waitForExit(milliseconds: Self.killWaitMilliseconds)
        heartbeat.beat()
        guard first else { return }
        count { $0.killed += 1 }
        logger.warning("killed VM2's VMM (pid \(process.pid))\(exited ? "" : ", not yet gone after \(Self.killWaitMilliseconds) ms"): \(reason)")
    }

    /// How long a revocation waits for a killed VM2 VMM to be gone.
    static var killWaitMilliseconds: Int32 { Liveness.killWaitMilliseconds }

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
