import BridgeCore
@testable import PeerProtocol
import Testing

/// `PeerSession` on values: every message VM2 can send in every state, every
/// protocol error, sequences and cumulative acks, the held reply, ring stops,
/// deadlines, and when a VMM is killed.
@Suite struct PeerSessionTests {
    static let offered: VirtioNetFeatures = [.version1, .eventIdx, .mrgRxbuf]
    static let served: VirtioNetFeatures = [.version1, .eventIdx, .mrgRxbuf, .mq]
    static let t0 = ContinuousClock.now
    static let deadline: Duration = .milliseconds(100)

    static func session(kill: Bool = false) -> PeerSession {
        PeerSession(policy: .init(offeredDeviceFeatures: offered, killOnMissedDeadline: kill, revocationDeadline: deadline))
    }

    static let hello = PeerHello(features: .all, deviceFeatures: served)

    /// A session in `ready` with `features`.
    /// Everything but the channel: acks come on the socket.
    static let socketFeatures = PeerFeatures.all.subtracting(.sharedRevocations)

    static func ready(_ features: PeerFeatures = socketFeatures, kill: Bool = false) -> PeerSession {
        var s = session(kill: kill)
        _ = s.received(.hello(PeerHello(features: features, deviceFeatures: served)))
        s.replayed()
        return s
    }

    /// Every message VM2 may never send (the daemon's own types).
    static let daemonOnly: [PeerMessage] = [
        .helloReply(PeerBARInfo(mode: .iommu, features: .all, barSize: 1 << 30, pageSize: 4096, vringCount: 2)),
        .map(PeerMap(sequence: 1, barOffset: 0, length: 4096, fdOffset: 0, permission: .read)),
        .unmap(PeerUnmap(sequence: 1, barOffset: 0, length: 4096)),
        .vring(PeerVring(index: 0, num: 256, desc: 0, avail: 4096, used: 8192, lastAvail: 0, flags: 1)),
        .vringStop(0),
        .device(PeerDevice(event: .start, features: 1)),
        .translateReply(PeerTranslateReply(requestID: 1, status: .granted)),
    ]

    static func isRefusal(_ effects: [PeerSession.Effect], rule: String, code: PeerErrorCode = .protocolError) -> Bool {
        guard case .refuse(let c, _, let r)? = effects.last else { return false }
        return c == code && r == rule
    }

    // MARK: awaiting HELLO

    @Test func helloIsGreetedWithTheFeaturesBothSupport() {
        var s = Self.session()
        let effects = s.received(.hello(PeerHello(features: PeerFeatures(rawValue: 0xff), deviceFeatures: Self.served)))
        #expect(effects == [.greet(PeerHello(features: PeerFeatures(rawValue: 0xff), deviceFeatures: Self.served), features: .all)])
        #expect(s.state == .greeted(.all))
        #expect(!s.isReady && s.maySend(duringReplay: true) && !s.maySend())
        s.replayed()
        #expect(s.state == .ready(.all) && s.maySend())
    }

    @Test func anotherVersionIsRefused() {
        var s = Self.session()
        let effects = s.received(.hello(PeerHello(version: 2, features: .all, deviceFeatures: Self.served)))
        #expect(Self.isRefusal(effects, rule: "peer-version", code: .version), "\(effects)")
        #expect(s.isClosed)
    }

    @Test func aVM2ThatCannotServeTheOfferIsRefused() {
        var s = Self.session()
        let effects = s.received(.hello(PeerHello(features: .all, deviceFeatures: .version1)))
        #expect(Self.isRefusal(effects, rule: "device-features", code: .features), "\(effects)")
        guard case .refuse(_, let text, _)? = effects.last else { return }
        #expect(text.contains("cannot serve device features"))
    }

    @Test(arguments: [PeerMessage.ack(0), .translate(PeerTranslate(requestID: 1, barOffset: 0, length: 4096, access: .read)),
                      .vringStopped(index: 0, lastAvail: 3)] + PeerSessionTests.daemonOnly)
    func anythingButHelloBeforeHelloIsAProtocolError(_ message: PeerMessage) {
        var s = Self.session()
        let effects = s.received(message)
        #expect(Self.isRefusal(effects, rule: "peer-state"), "\(effects)")
        guard case .refuse(_, let text, _)? = effects.last else { return }
        #expect(text == "\(message.type) is not allowed before HELLO")
        #expect(s.isClosed && s.features == [])
    }

    @Test func theReplyFlagIsAProtocolErrorInAnyState() {
        for var s in [Self.session(), Self.ready()] {
            let v1 = s.received(.hello(Self.hello), replyFlag: true)
            #expect(Self.isRefusal(v1, rule: "peer-protocol"))
        }
    }

    // MARK: greeted and ready

    @Test(arguments: [false, true])
    func aSecondHelloAndDaemonOnlyTypesAreProtocolErrors(replayed: Bool) {
        for message in [PeerMessage.hello(Self.hello)] + Self.daemonOnly {
            var s = Self.session()
            _ = s.received(.hello(Self.hello))
            if replayed { s.replayed() }
            let effects = s.received(message)
            #expect(Self.isRefusal(effects, rule: "peer-state"), "\(message): \(effects)")
        }
    }

    @Test func translationsGoToTheBridge() {
        var s = Self.ready()
        let t = PeerTranslate(requestID: 7, barOffset: 0x1000, length: 4096, access: .readWrite)
        let v2 = s.received(.translate(t))
        #expect(v2 == [.translate(t)])
        #expect(s.isReady)
    }

    @Test func acksAreCumulativeAndNeverFromTheFuture() {
        var s = Self.ready()
        let v3 = s.takeMapSequence()
        #expect(v3 == 1)
        let v4 = s.takeRevocationSequence(now: Self.t0)
        #expect(v4 == 2)
        let v5 = s.takeMapSequence()
        #expect(v5 == 3)
        #expect(s.holdsRevocation)
        let v6 = s.received(.ack(2))
        #expect(v6 == [.acknowledged(through: 2)])
        #expect(s.isAcknowledged(1) && s.isAcknowledged(2) && !s.isAcknowledged(3))
        #expect(!s.holdsRevocation)
        // An older ACK changes nothing.
        let v7 = s.received(.ack(1))
        #expect(v7 == [.acknowledged(through: 2)])
        // One beyond the last sequence sent: a protocol error.
        let effects = s.received(.ack(4))
        #expect(Self.isRefusal(effects, rule: "ack-sequence"), "\(effects)")
        guard case .refuse(_, let text, _)? = effects.last else { return }
        #expect(text == "ACK 4 is beyond the last MAP/UNMAP sequence sent (3)")
    }

    @Test func theHeldReplyIsReleasedByTheAckThatCoversIt() {
        var s = Self.ready()
        let seq = s.takeRevocationSequence(now: Self.t0)
        let v8 = s.holdReply(for: seq)
        #expect(v8)
        let v9 = s.received(.ack(seq))
        #expect(v9 == [.acknowledged(through: seq), .releaseHeldReply])
        #expect(s.heldReplyFor == nil)
        // Acknowledged already: nothing to hold; the caller sends.
        let v10 = s.holdReply(for: seq)
        #expect(!v10)
        // Held and never acknowledged: the caller takes it back once.
        let next = s.takeRevocationSequence(now: Self.t0)
        let v11 = s.holdReply(for: next)
        #expect(v11)
        let v12 = s.dropHeldReply()
        let v13 = s.dropHeldReply()
        #expect(v12 && !v13)
    }

    @Test func ringStopsAreAnsweredOnlyWhenAsked() {
        var s = Self.ready()
        let v14 = s.requestRingStop(1, now: Self.t0)
        #expect(v14)
        #expect(s.deadline(ofRingStop: 1) == Self.t0.advanced(by: Self.deadline))
        let v15 = s.received(.vringStopped(index: 1, lastAvail: 42))
        #expect(v15 == [.ringStopped(index: 1, lastAvail: 42)])
        let v16 = s.takeRingStopAnswer(1)
        #expect(v16 == .some(42))
        let v17 = s.takeRingStopAnswer(1)
        #expect(v17 == nil)
        // Not asked (or asked once and answered): a protocol error.
        let effects = s.received(.vringStopped(index: 1, lastAvail: 43))
        #expect(Self.isRefusal(effects, rule: "ring-stop"), "\(effects)")
    }

    @Test func aVersion1PeerIsNotAskedToAnswerRingStops() {
        var s = Self.ready([.translate])
        let v18 = s.requestRingStop(0, now: Self.t0)
        #expect(!v18)
        #expect(s.deadline(ofRingStop: 0) == nil)
    }

    @Test func anErrorFromVM2EndsTheConnection() {
        var s = Self.ready()
        let v19 = s.received(.error(PeerError(code: .shuttingDown, text: "bye")))
        #expect(v19 == [.close(reason: "VM2 reported error shuttingDown: bye")])
        #expect(s.isClosed)
        // Closed: nothing more is read.
        let v20 = s.received(.ack(0))
        let v21 = s.ended("late")
        let v22 = s.missedDeadline("late")
        #expect(v20.isEmpty && v21.isEmpty && v22.isEmpty)
    }

    // MARK: deadlines and kills

    @Test func deadlinesExpireAtTheirTime() {
        var s = Self.ready()
        let first = s.takeRevocationSequence(now: Self.t0)
        _ = s.takeRevocationSequence(now: Self.t0.advanced(by: .milliseconds(50)))
        #expect(s.deadline(ofRevocation: first) == Self.t0.advanced(by: Self.deadline))
        #expect(s.nextDeadline == Self.t0.advanced(by: Self.deadline))
        let v23 = s.expire(now: Self.t0.advanced(by: .milliseconds(99)))
        #expect(v23.isEmpty)
        let v24 = s.received(.ack(first))
        #expect(v24 == [.acknowledged(through: first)])
        // The second's deadline is its own.
        let v25 = s.expire(now: Self.t0.advanced(by: .milliseconds(120)))
        #expect(v25.isEmpty)
        let effects = s.expire(now: Self.t0.advanced(by: .milliseconds(150)))
        #expect(effects == [.close(reason: "revocation 2 not answered within 0.1 seconds")], "\(effects)")
        #expect(s.isClosed)
    }

    @Test func withKillAMissedDeadlineKillsFirst() {
        var s = Self.ready(kill: true)
        _ = s.takeRevocationSequence(now: Self.t0)
        let effects = s.expire(now: Self.t0.advanced(by: .seconds(1)))
        #expect(effects.count == 2)
        guard case .kill? = effects.first, case .close? = effects.last else {
            Issue.record("\(effects)")
            return
        }
    }

    /// Issue 20 hole 2: leaving — hanging up, a protocol error, a failed
    /// send — while an UNMAP is unacknowledged is a missed deadline.
    @Test func leavingHoldingARevocationIsKilledOnlyWithThePolicy() {
        for kill in [false, true] {
            var hangUp = Self.ready(kill: kill)
            _ = hangUp.takeRevocationSequence(now: Self.t0)
            let a = hangUp.ended("closed")
            #expect(a.last == .close(reason: "closed"))
            #expect(a.count == (kill ? 2 : 1), "\(a)")
            if kill { #expect(a.first == .kill(reason: "VM2 left (closed) holding revocation 1 unacknowledged")) }

            var future = Self.ready(kill: kill)
            _ = future.takeRevocationSequence(now: Self.t0)
            let b = future.received(.ack(99))
            #expect(Self.isRefusal(b, rule: "ack-sequence"))
            #expect(b.count == (kill ? 2 : 1), "\(b)")
        }
        // Nothing outstanding: leaving is just leaving.
        var clean = Self.ready(kill: true)
        let seq = clean.takeRevocationSequence(now: Self.t0)
        _ = clean.received(.ack(seq))
        let v26 = clean.ended("closed")
        #expect(v26 == [.close(reason: "closed")])
    }

    @Test func unreadableMessagesAreProtocolErrorsUnderTheirRule() {
        var s = Self.ready()
        let v27 = s.unreadable("message not complete within 1000 ms", rule: "message-deadline")
        #expect(Self.isRefusal(v27, rule: "message-deadline"))
        var t = Self.session()
        let v28 = t.unreadable("bad header", rule: "peer-protocol")
        #expect(Self.isRefusal(v28, rule: "peer-protocol"))
    }

    @Test func closingForgetsEveryWait() {
        var s = Self.ready()
        let seq = s.takeRevocationSequence(now: Self.t0)
        let v29 = s.requestRingStop(0, now: Self.t0)
        #expect(v29)
        _ = s.ended("gone")
        #expect(s.nextDeadline == nil && s.deadline(ofRevocation: seq) == nil && !s.holdsRevocation)
        #expect(!s.maySend(duringReplay: true) && s.features == [])
        let v30 = s.holdReply(for: seq)
        #expect(!v30)
    }

    // MARK: the revocation channel

    @Test func withTheChannelAcksComeFromMemoryAndOnlyGrow() {
        var s = Self.ready(.all)
        #expect(s.usesChannel)
        let m = s.takeMapSequence()
        let u = s.takeRevocationSequence(now: Self.t0)
        #expect(m == 1 && u == 2 && s.recordsInFlight == 2 && s.holdsRevocation)
        #expect(s.observeChannelAck(0) == [], "nothing new")
        let a1 = s.observeChannelAck(1)
        #expect(a1 == [.acknowledged(through: 1)] && s.holdsRevocation)
        let a2 = s.observeChannelAck(2)
        #expect(a2 == [.acknowledged(through: 2)] && !s.holdsRevocation && s.recordsInFlight == 0)
        #expect(s.observeChannelAck(2) == [], "the same value again is nothing")
        // An ACK on the socket is not how this VM2 acknowledges.
        let socket = s.received(.ack(2))
        #expect(Self.isRefusal(socket, rule: "peer-state"), "\(socket)")
    }

    @Test(arguments: [(UInt64(5), "ack-sequence"), (UInt64.max, "ack-sequence"), (UInt64(0), "channel-ack")])
    func aChannelAckFromTheFutureOrThePastIsAProtocolError(value: UInt64, rule: String) {
        var s = Self.ready(.all, kill: true)
        _ = s.takeRevocationSequence(now: Self.t0)
        _ = s.takeRevocationSequence(now: Self.t0)
        _ = s.observeChannelAck(1)
        let effects = s.observeChannelAck(value)
        #expect(Self.isRefusal(effects, rule: rule), "\(effects)")
        // Holding revocation 2 with the kill policy: killed first.
        guard case .kill? = effects.first else { Issue.record("no kill before the refusal: \(effects)"); return }
        #expect(s.isClosed)
        #expect(s.observeChannelAck(2) == [], "nothing after the end")
    }

    @Test func theChannelHasRoomForItsCapacityOfUnacknowledgedRecords() {
        var s = PeerSession(policy: .init(offeredDeviceFeatures: Self.offered, channelCapacity: 3))
        _ = s.received(.hello(PeerHello(features: .all, deviceFeatures: Self.served)))
        s.replayed()
        for _ in 0..<3 { #expect(s.channelHasRoom); _ = s.takeMapSequence() }
        #expect(!s.channelHasRoom && s.recordsInFlight == 3)
        _ = s.observeChannelAck(1)
        #expect(s.channelHasRoom)
        #expect(PeerSession.Policy(offeredDeviceFeatures: .version1, channelCapacity: 0).channelCapacity == 1)
        #expect(PeerSession.Policy(offeredDeviceFeatures: .version1, channelCapacity: .max).channelCapacity == RevocationChannel.maximumCapacity)
    }

    @Test func withoutTheFeatureTheChannelIsNotReadAndSocketAcksWork() {
        var s = Self.ready()
        #expect(!s.usesChannel)
        _ = s.takeRevocationSequence(now: Self.t0)
        #expect(s.observeChannelAck(1) == [], "a channel this VM2 did not negotiate is never read")
        #expect(s.received(.ack(1)) == [.acknowledged(through: 1)])
    }
}
