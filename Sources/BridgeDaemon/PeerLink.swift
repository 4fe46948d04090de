import BridgeCore
import LinuxIO
import Logging
import PeerProtocol

/// The bridge's connection to VM2, shared between the peer thread (which
/// reads VM2's socket) and the bridge thread (which owns all bridge state and
/// does all sending). Every decision is the connection's `PeerSession`'s
/// (pure, in PeerProtocol); this type only carries out its effects: sends,
/// waits, kills, closes, counts. The peer thread never touches bridge state:
/// it posts events to the bridge thread's mailbox (`inbox`); acks
/// and ring stops wake a wait through `ackSignal`.
///
/// Sendable without `@unchecked`: all mutable state is behind a `Locked` (pthread mutex); the
/// eventfds are Sendable owners.
final class PeerLink: Sendable {
    enum Event: Sendable {
        /// HELLO accepted with `features`: answer, replay, `replayed()`.
        case greet(PeerHello, features: PeerFeatures, generation: Int)
        case translate(PeerTranslate, generation: Int)
        case gone(generation: Int, reason: String)
    }

    typealias Statistics = PeerStatistics

    struct State {
        var socket: UnixSocket?
        /// The VMM at the other end, when the deadline action is `kill`.
        var process: ProcessHandle?
        var generation = 0
        /// The attached connection's protocol state (nil: none attached).
        var session: PeerSession?
        /// SIGKILL was sent to this connection's VMM (counted once).
        var killSent = false
        var statistics = Statistics()
        /// VM1's reply to a request that revoked access, handed over for
        /// the time of the bridge thread's wait for VM2's ack.
        var heldReply = HeldReply.none
        /// When the bridge thread's current pass must be done sending
        /// TRANSLATE replies (`beginPass`).
        var replyBudgetEnds: ContinuousClock.Instant?
        /// The revocation channel of the attached connection (with
        /// `sharedRevocations`), and the REGION fds it sent VM2.
        var channel: Channel?
        var slots: [ObjectIdentifier: Slot] = [:]
        var nextSlot: UInt32 = 0
        /// VM1 is live-migrating (dirty logging on): every new session
        /// learns it, so a VM2 that cannot log is refused at HELLO.
        var vm1Logging = false
    }

    let state = Locked(State())
    /// The bridge thread's mailbox: VM2's events are posted there.
    let inbox: BridgeInbox
    let ackSignal: EventFD
    let logger: Logger
    let policy: PeerSession.Policy
    var revocationDeadlineMilliseconds: Int { Int(policy.revocationDeadline / .milliseconds(1)) }
    /// The bridge thread's proof of life: moved after every bounded wait
    /// it does here (a send, an ack or ring-stop wait, a kill), so a thread
    /// that works through many slow but punctual peer operations in one loop
    /// pass is never taken for a stuck one.
    let heartbeat: Heartbeat

    /// How long one whole message to or from VM2 may take: a VM2 that does
    /// not read (or write) a message within this is treated as one that
    /// stopped — however it drips the bytes.
    var messageDeadline: Duration { max(.seconds(1), policy.revocationDeadline) }

    init(logger: Logger, policy: PeerSession.Policy, inbox: BridgeInbox, heartbeat: Heartbeat = Heartbeat()) throws(SystemCallError) {
        self.inbox = inbox
        ackSignal = try EventFD()
        self.logger = logger
        self.policy = policy
        self.heartbeat = heartbeat
    }

    var statistics: Statistics { state.withLock { $0.statistics } }
    var isReady: Bool { state.withLock { $0.session?.isReady == true } }
    /// Peer features the ready VM2 negotiated ([] before it is ready).
    var features: PeerFeatures { state.withLock { $0.session?.isReady == true ? $0.session?.features ?? [] : [] } }
    var currentGeneration: Int? { state.withLock { $0.socket == nil ? nil : $0.generation } }

    func count(_ update: (inout Statistics) -> Void) {
        state.withLock { update(&$0.statistics) }
    }

    // MARK: peer thread

    /// Takes a new VM2 connection; nil when one is already attached.
    func attach(_ socket: UnixSocket, process: ProcessHandle? = nil) -> Int? {
        state.withLock { s -> Int? in
            guard s.socket == nil else { return nil }
            s.socket = socket
            s.process = process
            s.generation += 1
            s.session = PeerSession(policy: policy)
            s.session?.noteVM1Logging(s.vm1Logging)
            s.killSent = false
            s.statistics.connections += 1
            s.statistics.connected = true
            s.statistics.ready = false
            return s.generation
        }
    }

    /// Messages the bridge thread has not taken yet (VM2's and commands).
    var queuedEvents: Int { inbox.pending }

    private func post(_ event: Event) {
        inbox.post(.peer(event))
    }

    /// A message VM2 sent on connection `generation` (peer thread). Returns
    /// why the connection must close, or nil while it goes on.
    func received(_ message: PeerMessage, replyFlag: Bool, generation: Int, on socket: UnixSocket) -> String? {
        execute(withSession(generation) { $0.received(message, replyFlag: replyFlag) }, generation: generation, replyingOn: socket)
    }

    /// A message from VM2 could not be read (framing, decoding, its deadline).
    func unreadable(_ reason: String, rule: String, generation: Int, on socket: UnixSocket) -> String? {
        execute(withSession(generation) { $0.unreadable(reason, rule: rule) }, generation: generation, replyingOn: socket) ?? reason
    }

    /// The connection of `generation` ended (EOF, error, or disconnected by
    /// us). A VM2 lost holding a revocation is killed first when the policy
    /// says so (the session decides). The socket is shut down and forgotten
    /// here; its fd is closed when the last holder lets go — the peer thread
    /// that owns it, or a bridge thread still inside a send — never under a
    /// sender's feet, so a new VM2 can never receive the tail of a message
    /// meant for the old one.
    func detach(generation: Int, reason: String) {
        noteFinalAck(generation: generation)
        _ = execute(withSession(generation) { $0.ended(reason) }, generation: generation, replyingOn: nil)
        let (socket, channel) = state.withLock { s -> (UnixSocket?, Channel?) in
            guard s.generation == generation, let socket = s.socket else { return (nil, nil) }
            s.socket = nil
            s.session = nil
            s.process = nil // its pidfd closes with the last reference
            s.statistics.connected = false
            s.statistics.ready = false
            defer { s.channel = nil; s.slots = [:]; s.nextSlot = 0 } // unmapped and closed with the last reference
            return (socket, s.channel)
        }
        guard let socket else { return }
        socket.shutdown()
        channel?.interrupt() // a wait on its ack ends now
        post(.gone(generation: generation, reason: reason))
        _ = try? ackSignal.signal() // a revocation or ring-stop wait on this connection ends now, not at its deadline
    }

    /// Runs `change` on connection `generation`'s session (none: no effects).
    func withSession(_ generation: Int, _ change: (inout PeerSession) -> [PeerSession.Effect]) -> [PeerSession.Effect] {
        state.withLock { s in
            guard s.generation == generation, var session = s.session.take() else { return [] }
            defer { s.session = session }
            let effects = change(&session)
            if effects.contains(.releaseHeldReply), case .waiting(let bytes, let socket) = s.heldReply {
                s.heldReply = .released(bytes, socket)
            }
            return effects
        }
    }

    /// Carries out the session's effects for connection `generation`, in
    /// order. Returns why the connection must close, if it must.
    /// `replyingOn`: the socket an ERROR goes to (the peer thread's).
    @discardableResult
    func execute(_ effects: [PeerSession.Effect], generation: Int, replyingOn socket: UnixSocket?) -> String? {
        var closing: String?
        // Who waits is woken once, after everything: VM1's held ack goes out
        // first, so the bridge thread wakes to find it sent (one hand-off,
        // not two).
        var wake = false
        defer { if wake { _ = try? ackSignal.signal() } }
        for effect in effects {
            switch effect {
            case .greet(let hello, let features):
                post(.greet(hello, features: features, generation: generation))
            case .translate(let t):
                post(.translate(t, generation: generation))
            case .acknowledged:
                count { $0.acks += 1 }
                wake = true
            case .releaseHeldReply:
                sendHeldReply()
                wake = true
            case .ringStopped, .logAnswered:
                wake = true
            case .kill(let reason):
                if let process = state.withLock({ s in s.generation == generation ? s.process : nil }) {
                    kill(process, generation: generation, reason: reason)
                }
            case .refuse(let code, let text, let rule):
                count { $0.noteProtocolError(rule: rule) }
                logger.warning("VM2 protocol error: \(text)", metadata: ["rule": "\(rule)"])
                if let socket { Self.sendError(socket, code, text) }
                closing = "protocol error: \(text)"
                disconnect(generation: generation)
            case .close(let reason):
                closing = reason
                disconnect(generation: generation)
            }
        }
        return closing
    }

    /// ERROR to a VM2 that is about to be closed (best effort, never blocks).
    static func sendError(_ socket: UnixSocket, _ code: PeerErrorCode, _ text: String) {
        try? socket.send(PeerCodec.encode(.error(PeerError(code: code, text: text))), nonBlocking: true)
    }

    // MARK: bridge thread

    /// Messages the bridge thread takes per loop pass: one pass does a
    /// bounded amount of VM2's work (each event may send a reply); what is
    /// left keeps the mailbox raised for the next.
    static let eventsPerPass = 256

    /// A bridge loop pass starts: the TRANSLATE replies it sends must all be
    /// out within one message deadline. A VM2 that reads its answers just
    /// fast enough for each to make its own deadline still cannot hold the
    /// bridge thread (and VM1) longer than that per pass: past it, it counts
    /// as a VM2 that stopped reading.
    func beginPass(now: ContinuousClock.Instant = .now) {
        state.withLock { $0.replyBudgetEnds = now.advanced(by: messageDeadline) }
    }

    /// The greeting and the replay to connection `generation` are done.
    func replayed(generation: Int) {
        state.withLock { s in
            guard s.generation == generation else { return }
            s.session?.replayed()
            s.statistics.ready = s.session?.isReady == true
        }
    }

    /// Sends to the attached VM2 (the whole message within
    /// `messageDeadline`). Returns false when that fails, and VM2 is
    /// disconnected: one that stopped reading missed a deadline (killed
    /// first with the `kill` action, since it would otherwise keep every
    /// mapping it holds); one that closed its end is gone (killed first only
    /// if it held a revocation). Before the handshake and the replay are
    /// done nothing is sent, unless `duringReplay`. With `generation`, only
    /// that connection gets it (a reply to a request).
    @discardableResult
    func send(_ message: PeerMessage, fds: [Int32] = [], duringReplay: Bool = false, generation only: Int? = nil) -> Bool {
        var deadline = ContinuousClock.now.advanced(by: messageDeadline)
        guard let (socket, generation) = state.withLock({ s -> (UnixSocket, Int)? in
            guard let socket = s.socket, s.session?.maySend(duringReplay: duringReplay) == true,
                  only == nil || only == s.generation else { return nil }
            if case .translateReply = message, let budget = s.replyBudgetEnds { deadline = min(deadline, budget) }
            return (socket, s.generation)
        }) else { return false }
        defer { heartbeat.beat() }
        do {
            try socket.send(PeerCodec.encode(message), fds: fds, deadline: deadline)
            return true
        } catch {
            if error.errno == .timedOut { // the whole message did not go out in time: VM2 stopped reading
                logger.warning("sending \(message.type) to VM2 failed: \(error); disconnecting VM2")
                execute(withSession(generation) { $0.missedDeadline("VM2 stopped reading: sending \(message.type) timed out") },
                        generation: generation, replyingOn: nil)
            } else {
                // A VM2 that closed its end is gone: an ordinary event
                // (detach logs it), unless it held a revocation.
                logger.info("VM2 went away while \(message.type) was sent to it (\(error.errno)); disconnecting it")
                execute(withSession(generation) { $0.ended("send failed: \(error)") }, generation: generation, replyingOn: nil)
            }
            return false
        }
    }

    /// A MAP/UNMAP sequence number on one VM2 connection.
    struct Ticket: Equatable {
        var sequence: UInt64
        var generation: Int
    }

    /// The next MAP (or, `revoking`, UNMAP) sequence number of the attached
    /// connection. An UNMAP's deadline runs from now.
    func takeSequence(revoking: Bool) -> Ticket {
        state.withLock { s in
            let now = ContinuousClock.now
            let sequence = (revoking ? s.session?.takeRevocationSequence(now: now) : s.session?.takeMapSequence()) ?? 0
            return Ticket(sequence: sequence, generation: s.generation)
        }
    }

    enum WaitOutcome<T> { case done(T), gone, timedOut }

    /// Waits until `satisfied` returns a value for connection `generation`'s
    /// session, at most until `deadline(session)`. Ends early when that
    /// connection is gone: a newer one never satisfies an older wait.
    func wait<T>(on generation: Int, until deadline: (PeerSession) -> ContinuousClock.Instant?,
                         _ satisfied: (inout PeerSession) -> T?) -> WaitOutcome<T> {
        defer { heartbeat.beat() }
        let end = state.withLock { s in s.generation == generation ? s.session.flatMap(deadline) : nil }
            ?? .now.advanced(by: policy.revocationDeadline)
        let outcome = ackSignal.wait(until: end) {
            state.withLock { s -> WaitOutcome<T>? in
                guard s.socket != nil, s.generation == generation, var session = s.session.take() else { return .gone }
                defer { s.session = session }
                // Ending (another thread carries out its effects — a kill,
                // perhaps): wait for the detach that follows them.
                if session.isClosed { return nil }
                return satisfied(&session).map { .done($0) }
            }
        }
        return outcome ?? .timedOut
    }

    /// Waits until connection `generation` is detached — at most as long as
    /// a kill and a message take: whoever ends it carries out its effects
    /// (a kill waits for the VMM's exit) before it detaches.
    func awaitDetach(_ generation: Int) {
        let end = ContinuousClock.now.advanced(by: .milliseconds(Int(Liveness.killWaitMilliseconds))).advanced(by: messageDeadline)
        _ = ackSignal.wait(until: end) {
            state.withLock { s in s.socket == nil || s.generation != generation ? true : nil }
        }
    }

    /// A wait on connection `generation` ran out: the session decides (an
    /// UNMAP or ring stop past its deadline: disconnect, and kill with the
    /// policy). Either way the caller's revocation is complete.
    func expired(generation: Int, what: String) {
        count { $0.revocationTimeouts += 1 }
        logger.warning("VM2 did not answer \(what) within \(revocationDeadlineMilliseconds) ms; disconnecting VM2")
        let alreadyEnding = state.withLock { s in s.generation == generation && s.session?.isClosed == true }
        if alreadyEnding {
            awaitDetach(generation) // the thread ending it kills first, when it must
            return
        }
        var effects = withSession(generation) { $0.expire(now: .now) }
        if effects.isEmpty { effects = withSession(generation) { $0.missedDeadline("\(what) not answered in time") } }
        execute(effects, generation: generation, replyingOn: nil)
    }

    /// Waits until VM2 acknowledged `ticket`, at most its deadline. On
    /// time-out VM2 is disconnected (it then holds no mapping; with `kill`
    /// its VMM is gone) and false is returned; either way the revocation is
    /// complete when this returns. A wait belongs to the connection its
    /// ticket was taken on: when that one is gone, nothing is left to wait
    /// for, and a newer connection's acks never satisfy it.
    @discardableResult
    func waitForAck(_ ticket: Ticket) -> Bool {
        if let channel = state.withLock({ s in s.generation == ticket.generation ? s.channel : nil }) {
            return waitForChannelAck(ticket, channel)
        }
        let start = ContinuousClock.now
        switch wait(on: ticket.generation, until: { $0.deadline(ofRevocation: ticket.sequence) },
                    { $0.isAcknowledged(ticket.sequence) ? true : nil }) {
        case .done:
            noteRevocationWait(since: start)
            return true
        case .gone:
            return true // that VM2 is gone (killed first, if it held this): nothing to wait for
        case .timedOut:
            expired(generation: ticket.generation, what: "revocation \(ticket.sequence)")
            return false
        }
    }

    /// A revocation VM2 acknowledged after waiting since `start`.
    func noteRevocationWait(since start: ContinuousClock.Instant) {
        let waited = start.duration(to: .now)
        let us = UInt64(max(0, (waited / .microseconds(1)).rounded(.down)))
        count {
            $0.slowestRevocationMicroseconds = max($0.slowestRevocationMicroseconds, us)
            $0.revocationLatency.record(waited)
        }
    }

    // MARK: ending

    /// SIGKILL to connection `generation`'s VMM through its pidfd, then a
    /// wait (at most `Liveness.killWaitMilliseconds`) until it is gone. The
    /// bridge thread (a missed deadline) and the peer thread (VM2 left
    /// holding a revocation) may both get here for one connection: the
    /// signal is counted and logged once, and both wait for the exit.
    private func kill(_ process: ProcessHandle, generation: Int, reason: String) {
        let first = state.withLock { s -> Bool in
            guard s.generation == generation, !s.killSent else { return false }
            s.killSent = true
            return true
        }
        do {
            try process.kill()
        } catch where error.errno == .noSuchProcess {
            // Already gone (reaped): nothing holds the memory any more, and
            // nobody was killed.
            if first { logger.info("VM2's VMM, the process that connected, was already gone: \(reason)") }
            return
        } catch {
            if first { logger.error("could not kill VM2's VMM (pid \(process.pid)): \(error)") }
            return
        }
        let wait = Liveness.killWaitMilliseconds
        let exited = process.waitForExit(milliseconds: wait)
        heartbeat.beat()
        guard first else { return }
        count { $0.killed += 1 }
        logger.warning("killed VM2's VMM (pid \(process.pid))\(exited ? "" : ", not yet gone after \(wait) ms"): \(reason)")
    }

    /// Drops VM2's connection (the peer thread sees it end and detaches it).
    private func disconnect(generation: Int) {
        let socket = state.withLock { s -> UnixSocket? in
            guard s.generation == generation else { return nil }
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
