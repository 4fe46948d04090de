import BridgeCore
@testable import PeerProtocol
import Testing

/// Dirty logging in `PeerSession`: who may log, LOG and LOG_DONE, their
/// deadlines, and the VM2 that cannot follow a migrating VM1.
@Suite struct PeerSessionLogTests {
    typealias T = PeerSessionTests

    @Test func dirtyLogNeedsTheChannel() {
        var withChannel = T.session()
        _ = withChannel.received(.hello(PeerHello(features: .all, deviceFeatures: T.served)))
        #expect(withChannel.features.contains(.dirtyLog))
        var socketOnly = T.session()
        _ = socketOnly.received(.hello(PeerHello(features: PeerFeatures.all.subtracting(.sharedRevocations), deviceFeatures: T.served)))
        #expect(!socketOnly.features.contains(.dirtyLog), "MAP's guest-physical address travels only in channel records")
        #expect(socketOnly.requestLog(now: T.t0) == nil)
        var noStopAck = T.session()
        _ = noStopAck.received(.hello(PeerHello(features: PeerFeatures.all.subtracting(.vringStopAck), deviceFeatures: T.served)))
        #expect(!noStopAck.features.contains(.dirtyLog), "VM1 must learn where a ring stopped only once its marks are in the log")
    }

    @Test func aVM2ThatCannotLogIsRefusedWhileVM1Migrates() {
        var s = T.session()
        s.noteVM1Logging(true)
        let effects = s.received(.hello(PeerHello(features: PeerFeatures.all.subtracting(.dirtyLog), deviceFeatures: T.served)))
        #expect(T.isRefusal(effects, rule: "dirty-log", code: .features))
        #expect(s.isClosed)
        var able = T.session()
        able.noteVM1Logging(true)
        #expect(able.received(.hello(T.hello)) == [.greet(T.hello, features: .all)])
        // Once VM1 stopped logging, any VM2 is welcome again.
        var later = T.session()
        later.noteVM1Logging(true)
        later.noteVM1Logging(false)
        #expect(!T.isRefusal(later.received(.hello(PeerHello(features: [], deviceFeatures: T.served))), rule: "dirty-log", code: .features))
    }

    @Test func logDoneAnswersItsLogOnce() {
        var s = T.ready(.all)
        guard let serial = s.requestLog(now: T.t0) else { Issue.record("no serial"); return }
        #expect(s.deadline(ofLog: serial) == T.t0.advanced(by: T.deadline))
        #expect(s.nextDeadline == T.t0.advanced(by: T.deadline))
        #expect(s.received(.logDone(PeerLogDone(serial: serial))) == [.logAnswered(serial: serial)])
        #expect(s.deadline(ofLog: serial) == nil && s.nextDeadline == nil)
        #expect(s.takeLogAnswer(serial) == .some(nil))
        #expect(s.takeLogAnswer(serial) == nil, "taken once")
        // A failure is an answer too, with its reason.
        let second = s.requestLog(now: T.t0) ?? 0
        #expect(second == serial + 1)
        _ = s.received(.logDone(PeerLogDone(serial: second, failure: "cannot map")))
        #expect(s.takeLogAnswer(second) == .some("cannot map"))
    }

    @Test func aLogDoneNobodyAskedForIsAProtocolError() {
        var s = T.ready(.all)
        #expect(T.isRefusal(s.received(.logDone(PeerLogDone(serial: 1))), rule: "log-done"))
        var twice = T.ready(.all)
        let serial = twice.requestLog(now: T.t0) ?? 0
        _ = twice.received(.logDone(PeerLogDone(serial: serial)))
        #expect(T.isRefusal(twice.received(.logDone(PeerLogDone(serial: serial))), rule: "log-done"))
        var before = T.session()
        #expect(T.isRefusal(before.received(.logDone(PeerLogDone(serial: 1))), rule: "peer-state"))
    }

    @Test func anUnansweredLogMissesItsDeadline() {
        var s = T.ready(.all, kill: true)
        _ = s.requestLog(now: T.t0)
        #expect(s.expire(now: T.t0.advanced(by: .milliseconds(50))).isEmpty)
        let effects = s.expire(now: T.t0.advanced(by: T.deadline))
        guard case .close(let reason)? = effects.last else { Issue.record("\(effects)"); return }
        #expect(reason.contains("a LOG"))
        #expect(effects.first == .kill(reason: reason))
        #expect(s.isClosed && s.requestLog(now: T.t0) == nil)
    }
}
