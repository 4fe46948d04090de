import BridgeCore

/// The daemon's side of one VM2 connection, pure: what the peer protocol
/// allows in which state, sequence numbers and cumulative acks, what VM2
/// holds that it was told to drop, ring stops and their answers, deadlines,
/// and what follows from each message — as effects. No syscalls, threads or
/// clocks of its own (the caller passes `now`): the executor (`PeerLink` and
/// `PeerServer` in BridgeDaemon) sends, waits, kills and closes.
///
/// A new peer message is a codec case, a case in `received`, and at most one
/// executor change.
public struct PeerSession: Sendable, Equatable {
    public struct Policy: Sendable, Equatable {
        /// Device features the bridge offers VM1: a VM2 must serve them.
        public var offeredDeviceFeatures: VirtioNetFeatures
        /// `vm2-deadline-action: kill`: a VM2 that misses a deadline — or
        /// leaves holding a revocation — is killed, not only disconnected.
        public var killOnMissedDeadline: Bool
        /// How long an UNMAP or a VRING_STOP may go unanswered.
        public var revocationDeadline: Duration
        /// Peer features the daemon supports.
        public var supported: PeerFeatures
        /// Records in the revocation channel (`sharedRevocations`).
        public var channelCapacity: UInt32
        /// How long the daemon spins on the channel's ack before it sleeps.
        public var revocationSpin: Duration

        public init(offeredDeviceFeatures: VirtioNetFeatures, killOnMissedDeadline: Bool = false,
                    revocationDeadline: Duration = .milliseconds(100), supported: PeerFeatures = .all,
                    channelCapacity: UInt32 = RevocationChannel.defaultCapacity, revocationSpin: Duration = .microseconds(50)) {
            self.offeredDeviceFeatures = offeredDeviceFeatures
            self.killOnMissedDeadline = killOnMissedDeadline
            self.revocationDeadline = revocationDeadline
            self.supported = supported
            self.channelCapacity = max(1, min(channelCapacity, RevocationChannel.maximumCapacity))
            self.revocationSpin = revocationSpin
        }
    }

    public enum State: Sendable, Equatable {
        /// Connected: only HELLO is allowed.
        case awaitingHello
        /// HELLO accepted with these features: the bridge answers it and
        /// replays its state (`replayed()`); nothing else goes out before.
        case greeted(PeerFeatures)
        case ready(PeerFeatures)
        /// Over, and why: nothing more is read, sent or waited for.
        case closed(String)
    }

    public enum Effect: Sendable, Equatable {
        /// HELLO accepted with `features` (what both sides support): answer
        /// it with the BAR info, replay the state, then call `replayed()`.
        case greet(PeerHello, features: PeerFeatures)
        /// A translation for the bridge thread.
        case translate(PeerTranslate)
        /// Every MAP/UNMAP through `through` is done at VM2: wake who waits.
        case acknowledged(through: UInt64)
        /// The revocation VM1's reply was held for is acknowledged: send
        /// that reply now (once; see `holdReply`).
        case releaseHeldReply
        /// VM2 stopped ring `index` (VRING_STOPPED): wake who waits.
        case ringStopped(index: UInt32, lastAvail: UInt16?)
        /// VM2 answered LOG `serial` (LOG_DONE): wake who waits.
        case logAnswered(serial: UInt64)
        /// Kill VM2's VMM and wait until it is gone — before the connection
        /// counts as gone, so before any revocation it held completes.
        case kill(reason: String)
        /// Send ERROR (best effort), then close; counted under `rule`.
        case refuse(PeerErrorCode, String, rule: String)
        /// Close the connection (nothing to send).
        case close(reason: String)
    }

    public let policy: Policy
    public private(set) var state: State = .awaitingHello
    /// The next MAP/UNMAP sequence number (the first is 1).
    public private(set) var nextSequence: UInt64 = 1
    /// VM2's cumulative acknowledgement.
    public private(set) var acknowledged: UInt64 = 0
    /// UNMAPs not acknowledged yet, oldest first, with their deadlines. An
    /// UNMAP counts from the moment its sequence is taken: a VM2 lost while
    /// it is being sent still holds the range.
    private var revocations: [(sequence: UInt64, deadline: ContinuousClock.Instant)] = []
    /// VRING_STOPs waiting for their VRING_STOPPED (with `vringStopAck`).
    private var stopsRequested: [UInt32: ContinuousClock.Instant] = [:]
    /// Answers not collected yet (nil: VM2 did not run that ring).
    private var stopsReported: [UInt32: UInt16?] = [:]
    /// The revocation VM1's reply is held for, until it is acknowledged.
    public private(set) var heldReplyFor: UInt64?
    /// VM1 is live-migrating: the device must log what it writes. A VM2
    /// that cannot (no `dirtyLog`) is refused at HELLO.
    public private(set) var vm1Logging = false
    /// LOGs waiting for their LOG_DONE, with deadlines; answers not
    /// collected yet (nil: applied, else why not).
    private var logsRequested: [UInt64: ContinuousClock.Instant] = [:]
    private var logsAnswered: [UInt64: String?] = [:]
    private var nextLogSerial: UInt64 = 1

    public init(policy: Policy) {
        self.policy = policy
    }

    public static func == (a: PeerSession, b: PeerSession) -> Bool {
        a.policy == b.policy && a.state == b.state && a.nextSequence == b.nextSequence && a.acknowledged == b.acknowledged
            && a.revocations.map(\.sequence) == b.revocations.map(\.sequence) && a.stopsRequested == b.stopsRequested
            && a.stopsReported == b.stopsReported && a.heldReplyFor == b.heldReplyFor && a.vm1Logging == b.vm1Logging
            && a.logsRequested == b.logsRequested && a.logsAnswered == b.logsAnswered && a.nextLogSerial == b.nextLogSerial
    }

    /// Peer features in effect: [] before HELLO is accepted and once closed.
    public var features: PeerFeatures {
        switch state {
        case .greeted(let f), .ready(let f): f
        case .awaitingHello, .closed: []
        }
    }

    public var isReady: Bool { if case .ready = state { true } else { false } }

    /// MAP and UNMAP go through the revocation channel, and acks come from
    /// it (VM2 negotiated `sharedRevocations`).
    public var usesChannel: Bool { features.contains(.sharedRevocations) }

    /// Records posted to the channel that VM2 has not acknowledged: every
    /// sequence taken is a record there once the channel is in use.
    public var recordsInFlight: UInt64 { (nextSequence &- 1) &- acknowledged }

    /// Whether one more record fits in the channel now.
    public var channelHasRoom: Bool { recordsInFlight < UInt64(policy.channelCapacity) }
    public var isClosed: Bool { if case .closed = state { true } else { false } }

    /// Whether VM2 holds access it was told (or is being told) to drop.
    public var holdsRevocation: Bool { acknowledged < (revocations.last?.sequence ?? 0) }

    /// The earliest deadline of an UNMAP, ring stop or LOG still unanswered.
    public var nextDeadline: ContinuousClock.Instant? {
        [revocations.first?.deadline, stopsRequested.values.min(), logsRequested.values.min()].compactMap { $0 }.min()
    }

    // MARK: what VM2 sends

    /// One decoded message from VM2 (`replyFlag`: its header carried the
    /// daemon's REPLY flag).
    public mutating func received(_ message: PeerMessage, replyFlag: Bool = false) -> [Effect] {
        if case .closed = state { return [] }
        if replyFlag { return protocolError("\(message.type) from VM2 with the REPLY flag set", rule: "peer-protocol") }
        switch (state, message) {
        case (.awaitingHello, .hello(let hello)):
            guard hello.version == PeerCodec.version else {
                return refuse(.version, "peer protocol version \(hello.version) is not \(PeerCodec.version)", rule: "peer-version")
            }
            let missing = hello.missing(offered: policy.offeredDeviceFeatures)
            guard missing.isEmpty else {
                return refuse(.features, "VM2 cannot serve device features this bridge offers VM1: \(missing) (VM2 serves \(hello.served))",
                              rule: "device-features")
            }
            var features = hello.features.intersection(policy.supported)
            // The dirty log's guest-physical addresses travel in channel
            // records; and a ring's stop must be answered (the log is
            // complete when VM1 is told where the ring stopped).
            if !features.isSuperset(of: [.sharedRevocations, .vringStopAck]) { features.remove(.dirtyLog) }
            if vm1Logging, !features.contains(.dirtyLog) {
                return refuse(.features, "VM1 is live-migrating (dirty-page logging is on) and this VM2 cannot log the pages it writes "
                                + "(peer features dirtyLog, sharedRevocations and vringStopAck)", rule: "dirty-log")
            }
            state = .greeted(features)
            return [.greet(hello, features: features)]
        case (.greeted, .ack(let sequence)), (.ready, .ack(let sequence)):
            guard !usesChannel else {
                return protocolError("ACK \(sequence) on the socket: with sharedRevocations acks go through the channel", rule: "peer-state")
            }
            return acknowledge(sequence)
        case (.greeted, .translate(let t)), (.ready, .translate(let t)):
            return [.translate(t)]
        case (.greeted, .vringStopped(let index, let lastAvail)), (.ready, .vringStopped(let index, let lastAvail)):
            guard stopsRequested.removeValue(forKey: index) != nil else {
                return protocolError("VRING_STOPPED for vring \(index), which the daemon did not ask to stop", rule: "ring-stop")
            }
            stopsReported[index] = .some(lastAvail)
            return [.ringStopped(index: index, lastAvail: lastAvail)]
        case (.greeted, .logDone(let done)), (.ready, .logDone(let done)):
            guard logsRequested.removeValue(forKey: done.serial) != nil else {
                return protocolError("LOG_DONE for LOG \(done.serial), which is not waiting for an answer", rule: "log-done")
            }
            logsAnswered[done.serial] = .some(done.failure)
            return [.logAnswered(serial: done.serial)]
        case (_, .error(let e)):
            return end("VM2 reported error \(e.code): \(e.text)")
        default:
            let text = "\(message.type) is not allowed \(state == .awaitingHello ? "before HELLO" : "from VM2")"
            return protocolError(text, rule: "peer-state")
        }
    }

    /// VM2's `acked` word in the channel, as just read. Acks are cumulative
    /// and only grow: a value past the last record posted (an ack from the
    /// future) or below the last one seen (torn, wrapped, or a hole punched
    /// in the channel) is a protocol error, with the same consequences as on
    /// the socket — a kill first while VM2 holds a revocation.
    public mutating func observeChannelAck(_ value: UInt64) -> [Effect] {
        guard usesChannel, !isClosed, value != acknowledged else { return [] }
        guard value > acknowledged else {
            return protocolError("the channel's ack went back from \(acknowledged) to \(value)", rule: "channel-ack")
        }
        return acknowledge(value)
    }

    /// A message from VM2 could not be read: bad framing, an undecodable
    /// payload (`rule` "peer-protocol"), or a message not whole by its
    /// deadline ("message-deadline").
    public mutating func unreadable(_ reason: String, rule: String) -> [Effect] {
        if case .closed = state { return [] }
        return protocolError(reason, rule: rule)
    }

    /// The connection ended without a word: VM2 hung up, or a send to it
    /// failed. Leaving with a revocation outstanding misses its deadline.
    public mutating func ended(_ reason: String) -> [Effect] {
        if case .closed = state { return [] }
        return end(reason)
    }

    /// A deadline passed, or VM2 stopped reading (a send did not go out in
    /// time): disconnected, and with the `kill` policy killed first.
    public mutating func missedDeadline(_ reason: String) -> [Effect] {
        if case .closed = state { return [] }
        var effects: [Effect] = policy.killOnMissedDeadline ? [.kill(reason: reason)] : []
        state = .closed(reason)
        effects.append(.close(reason: reason))
        clearWaits()
        return effects
    }

    /// At `now`: an UNMAP or ring stop unanswered past its deadline is a
    /// missed deadline; nothing otherwise.
    public mutating func expire(now: ContinuousClock.Instant) -> [Effect] {
        guard let deadline = nextDeadline, now >= deadline else { return [] }
        let what = revocations.first.flatMap { $0.deadline <= now ? "revocation \($0.sequence)" : nil }
            ?? (stopsRequested.values.contains { $0 <= now } ? "a ring stop" : "a LOG")
        return missedDeadline("\(what) not answered within \(policy.revocationDeadline)")
    }

    // MARK: what the daemon sends

    /// The greeting and the replay are done: from now on everything goes out.
    public mutating func replayed() {
        if case .greeted(let f) = state { state = .ready(f) }
    }

    /// Whether a message may go out now: everything once ready; with
    /// `duringReplay`, also between HELLO and `replayed()`.
    public func maySend(duringReplay: Bool = false) -> Bool {
        switch state {
        case .ready: true
        case .greeted: duringReplay
        case .awaitingHello, .closed: false
        }
    }

    /// The sequence of the next MAP that gives access (and takes none away).
    public mutating func takeMapSequence() -> UInt64 {
        defer { nextSequence += 1 }
        return nextSequence
    }

    /// The sequence of the next message that takes access away — an UNMAP,
    /// or a MAP that lowers a permission or moves a range (it replaces what
    /// VM2 had) — from now VM2 holds a revocation until it acknowledges it,
    /// at the latest by `now` + the revocation deadline.
    public mutating func takeRevocationSequence(now: ContinuousClock.Instant) -> UInt64 {
        defer { nextSequence += 1 }
        revocations.append((nextSequence, now.advanced(by: policy.revocationDeadline)))
        return nextSequence
    }

    public func isAcknowledged(_ sequence: UInt64) -> Bool { acknowledged >= sequence }

    /// When revocation `sequence` must be acknowledged (nil: it is, or it
    /// is no longer waited for).
    public func deadline(ofRevocation sequence: UInt64) -> ContinuousClock.Instant? {
        revocations.first { $0.sequence >= sequence }?.deadline
    }

    /// When ring `index`'s VRING_STOPPED must come (nil: it came, or none
    /// is waited for).
    public func deadline(ofRingStop index: UInt32) -> ContinuousClock.Instant? { stopsRequested[index] }

    /// VM1's reply waits for revocation `sequence`: `releaseHeldReply` comes
    /// with its ack. False when there is nothing to wait for (acknowledged
    /// already, or closed): the caller sends the reply itself.
    public mutating func holdReply(for sequence: UInt64) -> Bool {
        guard !isClosed, acknowledged < sequence else { return false }
        heldReplyFor = sequence
        return true
    }

    /// The wait for the held reply's revocation ended without its ack (a
    /// deadline, VM2 gone): true when the reply is still held, and the
    /// caller sends it now.
    public mutating func dropHeldReply() -> Bool {
        defer { heldReplyFor = nil }
        return heldReplyFor != nil
    }

    /// VRING_STOP for ring `index` goes out now: true when VM2 will answer
    /// (it negotiated `vringStopAck`), by `now` + the revocation deadline.
    public mutating func requestRingStop(_ index: UInt32, now: ContinuousClock.Instant) -> Bool {
        guard features.contains(.vringStopAck) else { return false }
        stopsRequested[index] = now.advanced(by: policy.revocationDeadline)
        stopsReported[index] = nil
        return true
    }

    /// VM2's answer to the VRING_STOP of ring `index`, once it came (taken:
    /// asked once). `.some(nil)`: VM2 did not run that ring.
    public mutating func takeRingStopAnswer(_ index: UInt32) -> UInt16?? {
        stopsReported.removeValue(forKey: index)
    }

    // MARK: dirty logging

    /// VM1's dirty logging went on or off (a VM2 that cannot log is refused
    /// at HELLO while it is on).
    public mutating func noteVM1Logging(_ on: Bool) { vm1Logging = on }

    /// A LOG goes out now: its serial, answered by LOG_DONE by `now` + the
    /// revocation deadline. nil when this VM2 cannot log (no `dirtyLog`) or
    /// the connection is closed.
    public mutating func requestLog(now: ContinuousClock.Instant) -> UInt64? {
        guard features.contains(.dirtyLog), !isClosed else { return nil }
        defer { nextLogSerial += 1 }
        logsRequested[nextLogSerial] = now.advanced(by: policy.revocationDeadline)
        return nextLogSerial
    }

    /// When LOG `serial`'s LOG_DONE must come (nil: it came, or is not waited for).
    public func deadline(ofLog serial: UInt64) -> ContinuousClock.Instant? { logsRequested[serial] }

    /// VM2's answer to LOG `serial`, once it came (taken: asked once).
    /// `.some(nil)`: applied; `.some(reason)`: VM2 could not.
    public mutating func takeLogAnswer(_ serial: UInt64) -> String?? {
        logsAnswered.removeValue(forKey: serial)
    }

    // MARK: internals

    private mutating func acknowledge(_ sequence: UInt64) -> [Effect] {
        let lastSent = nextSequence - 1
        guard sequence <= lastSent else {
            return protocolError("ACK \(sequence) is beyond the last MAP/UNMAP sequence sent (\(lastSent))", rule: "ack-sequence")
        }
        acknowledged = max(acknowledged, sequence)
        revocations.removeAll { $0.sequence <= acknowledged }
        var effects: [Effect] = [.acknowledged(through: acknowledged)]
        if let held = heldReplyFor, acknowledged >= held {
            heldReplyFor = nil
            effects.append(.releaseHeldReply)
        }
        return effects
    }

    /// ERROR, close — and, leaving a revocation outstanding, a kill first.
    private mutating func protocolError(_ text: String, rule: String) -> [Effect] {
        refuse(.protocolError, text, rule: rule)
    }

    private mutating func refuse(_ code: PeerErrorCode, _ text: String, rule: String) -> [Effect] {
        let effects = killIfHolding(text) + [.refuse(code, text, rule: rule)]
        state = .closed(text)
        clearWaits()
        return effects
    }

    private mutating func end(_ reason: String) -> [Effect] {
        let effects = killIfHolding(reason) + [.close(reason: reason)]
        state = .closed(reason)
        clearWaits()
        return effects
    }

    private func killIfHolding(_ reason: String) -> [Effect] {
        guard policy.killOnMissedDeadline, holdsRevocation, let last = revocations.last else { return [] }
        return [.kill(reason: "VM2 left (\(reason)) holding revocation \(last.sequence) unacknowledged")]
    }

    /// Nothing is waited for on a closed connection (a newer one never
    /// satisfies an older wait: it has a session of its own).
    private mutating func clearWaits() {
        revocations = []
        stopsRequested = [:]
        logsRequested = [:]
    }
}
