@testable import BridgeDaemon
import BridgeCore
import LinuxIO
import PeerProtocol
import Synchronization
import Testing
import TestSupport

/// `PeerLink`, the peer side's executor, driven by hand: socket pairs play
/// VM1 and VM2, the test plays the peer thread (it hands VM2's messages to
/// `received` when it chooses), and nothing waits on a clock unless the
/// test is about a deadline.
@Suite(.serialized) struct PeerLinkTests {
    struct Rig {
        let inbox: BridgeInbox
        let link: PeerLink
        let daemonEnd: UnixSocket
        let vm2: UnixSocket
        let generation: Int

        init(revocationDeadline: Duration = .seconds(60)) throws {
            inbox = try BridgeInbox()
            link = try PeerLink(logger: quietLogger(),
                                policy: .init(offeredDeviceFeatures: .version1, revocationDeadline: revocationDeadline), inbox: inbox)
            (daemonEnd, vm2) = try UnixSocket.pair()
            generation = try #require(link.attach(daemonEnd))
        }

        /// HELLO as the peer thread hands it over, the greeting the bridge
        /// thread takes from its mailbox, and the end of the replay.
        func greet(_ features: PeerFeatures = PeerFeatures.all.subtracting(.sharedRevocations)) throws {
            #expect(link.received(.hello(PeerHello(features: features, deviceFeatures: .version1)), replyFlag: false,
                                  generation: generation, on: daemonEnd) == nil)
            let taken = inbox.take()
            guard taken.count == 1, case .peer(.greet(_, let f, let g)) = taken[0].1 else {
                Issue.record("no greeting in the mailbox: \(taken.map(\.1))")
                return
            }
            // dirtyLog travels with the channel only.
            let expected = features.contains(.sharedRevocations) ? features.intersection(.all) : features.intersection(.all).subtracting(.dirtyLog)
            #expect(f == expected && g == generation)
            #expect(!link.isReady)
            link.replayed(generation: generation)
            #expect(link.isReady)
        }

        /// An UNMAP sent to VM2 (its ticket): a revocation VM2 now holds.
        func revoke() -> PeerLink.Ticket {
            let ticket = link.takeSequence(revoking: true)
            #expect(link.send(.unmap(PeerUnmap(sequence: ticket.sequence, barOffset: 0, length: 4096))))
            return ticket
        }

        func close() {
            try? daemonEnd.fd.close()
            try? vm2.fd.close()
        }
    }

    /// A VM2 that cannot log, greeted just before VM1 turned logging on
    /// (its HELLO was read first): VM1's LOG_ALL does not wait for it, and
    /// its replay sends it away instead of leaving it ready and unlogged.
    @Test func aVM2GreetedBeforeVM1LogsIsSentAwayAtItsReplay() throws {
        let rig = try Rig()
        defer { rig.close() }
        // HELLO without dirtyLog: greeted, not ready yet.
        #expect(rig.link.received(.hello(PeerHello(features: PeerFeatures.all.subtracting(.dirtyLog), deviceFeatures: .version1)),
                                  replyFlag: false, generation: rig.generation, on: rig.daemonEnd) == nil)
        #expect(rig.link.expectDeviceLog() == .noDevice, "not ready: nothing to wait for, VM1's LOG_ALL goes through")
        let memfd = try Memfd(name: "log", size: 8192)
        defer { try? memfd.fd.close() }
        #expect(!rig.link.replayLog(try DirtyLogArea(size: 8192, offset: 0, fileSize: 8192, covering: MemoryRegionTable(maxRegions: 8)),
                                    fd: memfd.fd.rawValue, generation: rig.generation))
        #expect(!rig.link.isReady)
        #expect(rig.link.statistics.protocolErrors == 1)
        // It was told why, and its connection is shut.
        var text = ""
        while let m = try? rig.vm2.receive(maxBytes: 4096, maxFDs: 0, nonBlocking: true), !m.bytes.isEmpty { text += String(decoding: m.bytes, as: UTF8.self) }
        #expect(text.contains("cannot log"))
        // And a VM2 that can is what the next LOG_ALL waits for.
        let able = try Rig()
        defer { able.close() }
        try able.greet(PeerFeatures.all)
        #expect(able.link.expectDeviceLog() == .applied)
        let old = try Rig()
        defer { old.close() }
        try old.greet(PeerFeatures.all.subtracting(.dirtyLog))
        guard case .failed(let why) = old.link.expectDeviceLog() else { Issue.record("a ready VM2 that cannot log let VM1 log"); return }
        #expect(why.contains("dirtyLog"))
    }

    /// VM1's ack to a revocation goes out from the peer thread the moment
    /// the ACK is handed over — once, and before the bridge thread's wait
    /// returns (it finds it sent).
    @Test func theAckSendsVM1sHeldReplyOnceFromThePeerThread() throws {
        let rig = try Rig()
        defer { rig.close() }
        try rig.greet()
        let (vm1Daemon, vm1) = try UnixSocket.pair()
        defer { try? vm1Daemon.fd.close(); try? vm1.fd.close() }
        let ticket = rig.revoke()
        let peerThread = try JoinableThread(name: "peer") {
            // The bridge thread has handed the reply over: VM2 acks now.
            _ = pollUntil { rig.link.state.withLock { if case .waiting = $0.heldReply { true } else { false } } }
            _ = rig.link.received(.ack(ticket.sequence), replyFlag: false, generation: rig.generation, on: rig.daemonEnd)
        }
        let outcome = rig.link.waitForAck(ticket, replying: [7, 7, 7], on: vm1Daemon)
        peerThread.join()
        #expect(outcome == .sent)
        #expect(try vm1.receive(maxBytes: 16, maxFDs: 0, nonBlocking: true).bytes == [7, 7, 7])
        #expect(throws: SystemCallError.self) { try vm1.receive(maxBytes: 16, maxFDs: 0, nonBlocking: true) } // once
        let s = rig.link.statistics
        #expect(s.repliesSentOnAck == 1 && s.acks == 1 && s.revocationTimeouts == 0)
    }

    /// An ACK that came before the reply was handed over: nothing to hold,
    /// the caller sends it.
    @Test func anAckBeforeTheWaitLeavesTheReplyToTheCaller() throws {
        let rig = try Rig()
        defer { rig.close() }
        try rig.greet()
        let (vm1Daemon, vm1) = try UnixSocket.pair()
        defer { try? vm1Daemon.fd.close(); try? vm1.fd.close() }
        let ticket = rig.revoke()
        _ = rig.link.received(.ack(ticket.sequence), replyFlag: false, generation: rig.generation, on: rig.daemonEnd)
        #expect(rig.link.waitForAck(ticket, replying: [1], on: vm1Daemon) == .notSent)
        #expect(throws: SystemCallError.self) { try vm1.receive(maxBytes: 16, maxFDs: 0, nonBlocking: true) }
    }

    /// A wait ends the moment its connection is gone, not at its deadline
    /// (a minute here), and a newer connection's ACK never satisfies it.
    @Test func aWaitEndsWhenItsConnectionIsGone() throws {
        let rig = try Rig()
        defer { rig.close() }
        try rig.greet()
        let ticket = rig.revoke()
        let peerThread = try JoinableThread(name: "peer") {
            rig.link.detach(generation: rig.generation, reason: "closed")
        }
        #expect(rig.link.waitForAck(ticket)) // complete: that VM2 is gone
        peerThread.join()
        #expect(rig.link.statistics.revocationTimeouts == 0 && !rig.link.statistics.connected)
        // A new connection starts its own sequence; the old ticket is not its.
        let (d2, v2) = try UnixSocket.pair()
        defer { try? d2.fd.close(); try? v2.fd.close() }
        let g2 = try #require(rig.link.attach(d2))
        #expect(g2 == rig.generation + 1)
        #expect(rig.link.takeSequence(revoking: false).sequence == 1)
    }

    /// A revocation unanswered past its deadline: the session says missed,
    /// the executor counts it and disconnects VM2 (its socket is shut down).
    @Test func aMissedDeadlineDisconnects() throws {
        let rig = try Rig(revocationDeadline: .milliseconds(50))
        defer { rig.close() }
        try rig.greet()
        let ticket = rig.revoke()
        #expect(!rig.link.waitForAck(ticket))
        #expect(rig.link.statistics.revocationTimeouts == 1)
        #expect(!rig.link.isReady)
        // VM2 reads what was sent, then the end.
        var sawUnmap = false
        while let m = try? rig.vm2.receiveFramed(within: 5000, payloadSize: { Int(try PeerCodec.validate(header: $0).0.size) }) {
            if m.header.first == 3 { sawUnmap = true }
        }
        #expect(sawUnmap)
        #expect(!rig.link.send(.vringStop(0)), "nothing goes to a VM2 that missed a deadline")
    }

    /// VM2's protocol error: ERROR on its socket, the reason returned (the
    /// peer thread then detaches), counted under its rule.
    @Test func aProtocolErrorAnswersWithErrorAndCloses() throws {
        let rig = try Rig()
        defer { rig.close() }
        try rig.greet()
        let reason = rig.link.received(.ack(5), replyFlag: false, generation: rig.generation, on: rig.daemonEnd)
        #expect(reason == "protocol error: ACK 5 is beyond the last MAP/UNMAP sequence sent (0)")
        let frame = try #require(try rig.vm2.receiveFramed(within: 5000) { Int(try PeerCodec.validate(header: $0).0.size) })
        let (header, type) = try PeerCodec.validate(header: frame.header)
        #expect(try PeerCodec.decode(header, type, payload: frame.payload, fdCount: 0)
                == .error(PeerError(code: .protocolError, text: "ACK 5 is beyond the last MAP/UNMAP sequence sent (0)")))
        #expect(rig.link.statistics.refusals["ack-sequence"] == 1 && rig.link.statistics.protocolErrors == 1)
    }

    /// A pass's TRANSLATE replies share one message deadline: once it is
    /// spent, a reply that finds VM2's socket full is not waited for — VM2
    /// counts as stopped reading; one that fits still goes out.
    @Test func aPassSpendsAtMostOneDeadlineOnTranslateReplies() throws {
        let rig = try Rig()
        defer { rig.close() }
        try rig.greet()
        let reply = PeerMessage.translateReply(PeerTranslateReply(requestID: 1, status: .refused, reason: "no"))
        rig.link.beginPass(now: .now.advanced(by: .seconds(-5))) // this pass's budget is spent
        #expect(rig.link.send(reply), "room in the socket: it goes out at once")
        while (try? rig.daemonEnd.send([UInt8](repeating: 0, count: 4096), nonBlocking: true)) != nil {} // VM2 stops reading
        #expect(!rig.link.send(reply))
        #expect(!rig.link.isReady, "disconnected as a VM2 that stopped reading")
    }

    /// One mailbox: commands and VM2's events, oldest first, at most a
    /// pass's worth at a time, the rest keeping the signal raised.
    @Test func theMailboxHandsOutABoundedPassInOrder() throws {
        let inbox = try BridgeInbox()
        let pass = PeerLink.eventsPerPass
        for i in 0..<(pass + 8) { inbox.post(.peer(.gone(generation: i, reason: ""))) }
        let first = inbox.take(limit: pass)
        #expect(first.count == pass)
        guard case .peer(.gone(let g, _)) = first[pass - 1].1 else { Issue.record("\(first[pass - 1].1)"); return }
        #expect(g == pass - 1)
        #expect(try Poll.readable([inbox.signal.fd.rawValue], timeoutMilliseconds: 0) == [true], "the rest wait for the next pass")
        #expect(inbox.take(limit: PeerLink.eventsPerPass).count == 8 && inbox.pending == 0)
    }
}
