import BridgeCore
import DeviceEngine
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import PeerProtocol
import Synchronization
import Testing
import TestSupport
import VhostUser

/// An iommu bridge with an emulated VM1 (device started) and a raw VM2
/// (greeted and ready), torn down after `body`.
func withRawVM2(_ name: String, revocationDeadline: Int,
                _ body: (RunningBridge, EmulatedVM1, RawVM2, EmulatedIOMMU) throws -> Void) throws {
    let running = try RunningBridge(name, mode: .iommu, revocationDeadline: revocationDeadline)
    defer { running.stop() }
    let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: true))
    defer { vm1.disconnect() }
    try vm1.start()
    let raw = try RawVM2(running.peerPath)
    #expect(try raw.greet() != nil)
    #expect(pollUntil { running.bridge.statistics.peer.ready })
    try body(running, vm1, raw, try #require(vm1.iommu))
}

/// A VM2 that speaks raw peer-protocol bytes: whatever a hostile or broken
/// VM2 VMM could send.
final class RawVM2: Sendable {
    let socket: UnixSocket
    init(_ path: String) throws {
        socket = try UnixSocket.connect(path: path)
        try socket.setReceiveTimeout(milliseconds: 5000)
    }
    deinit { try? socket.fd.close() }

    func send(_ message: PeerMessage, fds: [Int32] = []) throws { try socket.send(PeerCodec.encode(message), fds: fds) }

    /// The next message from the daemon, nil at EOF (fds it carries are closed).
    func receive() throws -> PeerMessage? {
        guard let (message, fds) = try receiveWithFDs() else { return nil }
        for fd in fds { try? fd.close() }
        return message
    }

    /// The next message and the fds it carried (the caller closes them).
    func receiveWithFDs() throws -> (PeerMessage, [OwnedFileDescriptor])? {
        var parsed: (PeerCodec.Header, PeerMessageType)?
        guard let framed = try socket.receiveFramed(payloadSize: { bytes in
            let v = try PeerCodec.validate(header: bytes)
            parsed = v
            return Int(v.0.size)
        }), let (header, type) = parsed else { return nil }
        return (try PeerCodec.decode(header, type, payload: framed.payload, fdCount: framed.fds.count), framed.fds)
    }

    /// Reads until an ERROR (returned) and then EOF; nil when EOF comes first.
    func expectErrorThenClose(sourceLocation: SourceLocation = #_sourceLocation) throws -> PeerError? {
        var error: PeerError?
        while let message = try receive() {
            if case .error(let e) = message { error = e }
        }
        #expect(error != nil, "no ERROR before the daemon closed", sourceLocation: sourceLocation)
        return error
    }

    /// HELLO, then everything up to the reply (the daemon's BAR info).
    func greet(features: PeerFeatures = PeerFeatures.all.subtracting(.sharedRevocations)) throws -> PeerBARInfo? {
        try send(.hello(PeerHello(features: features, deviceFeatures: NetDevice.served)))
        while let message = try receive() {
            if case .helloReply(let info) = message { return info }
        }
        return nil
    }
}

extension Integration {
    @Suite struct HostileVM2 {
        /// Runs `attack` against a bridge whose VM1 is connected and running;
        /// afterwards the bridge must still serve VM1 (traffic through a
        /// well-behaved VM2), and no fd may have leaked.
        private func attack(_ name: String, mode: BridgeMode = .identity,
                            _ body: (RunningBridge) throws -> Void) throws {
            let running = try RunningBridge(name, mode: mode)
            defer { running.stop() }
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: mode != .identity))
            defer { vm1.disconnect() }
            try vm1.start()
            let before = settledOpenFileDescriptorCount()
            try body(running)
            #expect(pollUntil { !running.bridge.statistics.peer.connected }, "the hostile VM2 must be gone")
            #expect(pollUntil { openFileDescriptorCount() == before }, "fds: \(before) before, \(openFileDescriptorCount()) after")
            // VM1 is unaffected, and the next VM2 serves it.
            let vm2 = try connectVM2(running)
            defer { vm2.stop() }
            let result = try vm1.runTraffic(count: 16, sizes: [64, 1500])
            #expect(result.completed && result.verified == 16, "\(result)")
            #expect(running.bridge.statistics.session?.startedRings == [0, 1])
        }

        @Test func anythingBeforeHelloIsAProtocolError() throws {
            try attack("h-before") { running in
                let raw = try RawVM2(running.peerPath)
                try raw.send(.ack(0))
                let e = try raw.expectErrorThenClose()
                #expect(e?.code == .protocolError && e?.text == "ACK is not allowed before HELLO")
                #expect(running.bridge.statistics.peer.refusals["peer-state"] == 1)
            }
        }

        /// A VM2 that leaves with messages unread (it finished its run, or
        /// died) resets the connection: the daemon's read fails with
        /// ECONNRESET. That is VM2 hanging up, an ordinary end — no
        /// protocol error, no warning.
        @Test func aVM2LeavingWithMessagesUnreadIsNoProtocolError() throws {
            try attack("h-reset") { running in
                do {
                    let raw = try RawVM2(running.peerPath)
                    #expect(try raw.greet() != nil)
                    try raw.send(.translate(PeerTranslate(requestID: 1, barOffset: 1 << 20, length: 4096, access: .read)))
                    // Its reply sits unread when VM2 closes its end.
                    #expect(pollUntil { (try? Poll.readable([raw.socket.fd.rawValue], timeoutMilliseconds: 0))?.first == true })
                } // raw closes here
                #expect(pollUntil { !running.bridge.statistics.peer.connected })
                let s = running.bridge.statistics.peer
                #expect(s.protocolErrors == 0 && s.refusals.isEmpty, "\(s.refusals)")
            }
        }

        @Test func anotherVersionIsRefused() throws {
            try attack("h-version") { running in
                let raw = try RawVM2(running.peerPath)
                try raw.send(.hello(PeerHello(version: 2, features: PeerFeatures.all.subtracting(.sharedRevocations), deviceFeatures: NetDevice.served)))
                let e = try raw.expectErrorThenClose()
                #expect(e?.code == .version && e?.text == "peer protocol version 2 is not 1")
            }
        }

        @Test func aSecondHelloAndDaemonOnlyTypesAreProtocolErrors() throws {
            try attack("h-second") { running in
                let raw = try RawVM2(running.peerPath)
                #expect(try raw.greet() != nil)
                try raw.send(.hello(PeerHello(features: PeerFeatures.all.subtracting(.sharedRevocations), deviceFeatures: NetDevice.served)))
                let e = try raw.expectErrorThenClose()
                #expect(e?.code == .protocolError && e?.text == "HELLO is not allowed from VM2")
                let again = try RawVM2(running.peerPath)
                #expect(try again.greet() != nil)
                try again.send(.unmap(PeerUnmap(sequence: 1, barOffset: 0, length: 4096)))
                let f = try again.expectErrorThenClose()
                #expect(f?.code == .protocolError && f?.text == "UNMAP is not allowed from VM2")
                #expect(running.bridge.statistics.peer.protocolErrors == 2)
            }
        }

        /// VM1 may negotiate any feature the bridge offers, so a VM2 that does
        /// not serve one of them is refused at HELLO, with the features named;
        /// the bridge and VM1 carry on, and a VM2 that serves them gets in.
        @Test(arguments: [nil, VirtioNetFeatures.version1, [.version1, .eventIdx, .mq]] as [VirtioNetFeatures?])
        func aVM2ThatCannotServeTheOfferedFeaturesIsRefusedAtHello(_ served: VirtioNetFeatures?) throws {
            try attack("h-feat") { running in
                let raw = try RawVM2(running.peerPath)
                try raw.send(.hello(PeerHello(features: PeerFeatures.all.subtracting(.sharedRevocations), deviceFeatures: served)))
                let e = try raw.expectErrorThenClose()
                #expect(e?.code == .features)
                let missing = e?.text.components(separatedBy: " (VM2 serves").first ?? ""
                #expect(missing.contains("mrg-rxbuf"), "\(e?.text ?? "")")
                #expect(missing.contains("event-idx") == (served?.contains(.eventIdx) != true), "\(e?.text ?? "")")
                #expect(running.bridge.statistics.peer.refusals["device-features"] == 1)
                #expect(running.bridge.statistics.peer.ready == false)
                let good = try RawVM2(running.peerPath)
                #expect(try good.greet() != nil)
            }
        }

        /// ACKs are cumulative: a VM2 that acknowledges only UNMAPs (each
        /// with its own, higher sequence) also acknowledges every MAP before
        /// it; no revocation waits for a MAP's ACK, none times out.
        @Test func acksAreCumulative() throws {
            let running = try RunningBridge("cumulative", mode: .iommu, revocationDeadline: 2000)
            defer { running.stop() }
            let raw = try RawVM2(running.peerPath)
            #expect(try raw.greet() != nil)
            let unmapsAcked = Locked(0)
            let reader = try JoinableThread(name: "raw-vm2") {
                while let message = try? raw.receive() {
                    if case .unmap(let u) = message {
                        // Counted before the ACK goes out: VM1's ack follows
                        // it at once, and the test reads the count then.
                        unmapsAcked.withLock { $0 += 1 }
                        try? raw.send(.ack(u.sequence))
                    }
                }
            }
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: true))
            try vm1.start()
            let iommu = try #require(vm1.iommu)
            for i in 0..<20 {
                let iova = try iommu.map(GuestPhysicalAddress(0x80_0000 + UInt64(i) * 4096), length: 4096, permission: .readWrite, eager: true)
                try iommu.unmap(iova) // waits for VM2's ACK of this UNMAP, which covers the MAP before it
            }
            let s = running.bridge.statistics.peer
            #expect(s.revocationTimeouts == 0 && s.connected)
            #expect(unmapsAcked.withLock { $0 } == 20 && s.acks == 20, "one ACK per UNMAP, none for the MAPs: \(s.acks)")
            #expect(s.mapsSent >= 20)
            vm1.disconnect()
            raw.socket.shutdown() // the reader sees EOF
            reader.join()
        }

        @Test func anOversizeHeaderIsRefusedBeforeItsPayloadIsRead() throws {
            try attack("h-oversize") { running in
                let raw = try RawVM2(running.peerPath)
                var header = LittleEndianWriter()
                header.write(PeerMessageType.translate.rawValue); header.write(UInt32(1)); header.write(UInt32(0x10_0000))
                try raw.socket.send(header.bytes)
                let e = try raw.expectErrorThenClose()
                #expect(e?.code == .protocolError)
                #expect(e?.text == "TRANSLATE payload of 1048576 bytes, expected at most 264", "\(e?.text ?? "")")
            }
        }

        @Test func fdsWhereNoneBelongAreClosedAndRefused() throws {
            try attack("h-fds") { running in
                let raw = try RawVM2(running.peerPath)
                #expect(try raw.greet() != nil)
                let stray = try EventFD()
                try raw.send(.ack(0), fds: [stray.fd.rawValue])
                let e = try raw.expectErrorThenClose()
                #expect(e?.code == .protocolError && e?.text == "ACK came with 1 fd(s), expected 0", "\(e?.text ?? "")")
            }
        }

        /// REPLY is the daemon's flag: a VM2 message carrying it is refused.
        @Test func theReplyFlagFromVM2IsAProtocolError() throws {
            try attack("h-reply") { running in
                let raw = try RawVM2(running.peerPath)
                #expect(try raw.greet() != nil)
                var bytes = PeerCodec.encode(.translate(PeerTranslate(requestID: 1, barOffset: 0, length: 4096, access: .read)))
                bytes[4] = 5 // version 1 | REPLY
                try raw.socket.send(bytes)
                let e = try raw.expectErrorThenClose()
                #expect(e?.code == .protocolError && e?.text == "TRANSLATE from VM2 with the REPLY flag set")
            }
        }

        /// A VM2 that answers UNMAP by leaving: the revocation completes as
        /// soon as it is gone, not at the deadline (here two minutes).
        @Test func aRevocationEndsWhenVM2Leaves() throws {
            try withRawVM2("h-leaves", revocationDeadline: 120_000) { running, _, raw, iommu in
                let iova = try iommu.map(GuestPhysicalAddress(0x90_0000), length: 4096, permission: .read, eager: true)
                let done = Atomic<Bool>(false), timely = Atomic<Bool>(false)
                // VM2: read until the UNMAP, leave without acknowledging, then
                // watch (a hang guard, far below the deadline) for VM1's ack.
                let vm2 = try JoinableThread(name: "leaving-vm2") {
                    while let m = try? raw.receive() { if case .unmap = m { break } }
                    raw.socket.shutdown()
                    timely.store(pollUntil(seconds: 30) { done.load(ordering: .acquiring) }, ordering: .releasing)
                }
                try iommu.unmap(iova) // returns once the daemon acked VM1
                done.store(true, ordering: .releasing)
                vm2.join()
                let wasTimely = timely.load(ordering: .acquiring)
                #expect(wasTimely, "VM1's invalidate waited for the deadline")
                #expect(running.bridge.window.probeInChild(iova) == .faulted)
                #expect(running.bridge.statistics.peer.revocationTimeouts == 0)
            }
        }

        /// VM1's ack to an invalidate leaves the moment VM2's ACK is read,
        /// from the peer thread (one thread hand-off fewer than waking the
        /// bridge thread to send it), never before that ACK, and ahead of
        /// the answer to a request VM1 sent right behind the invalidate.
        @Test func vm1sAckLeavesWithVM2sAckAndInOrder() throws {
            try withRawVM2("h-reply", revocationDeadline: 60_000) { running, vm1, raw, iommu in
                let iova = try iommu.map(GuestPhysicalAddress(0x90_0000), length: 4096, permission: .readWrite, eager: true)
                let sentBefore = running.bridge.statistics.peer.repliesSentOnAck
                // VM1 pipelines the invalidate (NEED_REPLY) and GET_FEATURES.
                let invalidate = IOTLBMessage(iova: iova.rawValue, size: 4096, userAddress: 0, permission: .none, type: .invalidate)
                try vm1.frontend.socket.send(VhostUserCodec.encode(.iotlb(invalidate), needReply: true) + VhostUserCodec.encode(.getFeatures, needReply: false))
                var unmap: PeerUnmap?
                while unmap == nil, let m = try raw.receive() { if case .unmap(let u) = m { unmap = u } }
                let held = try #require(unmap)
                // VM2 has not acked: VM1 hears nothing (neither reply may pass the ack).
                let early = try Poll.readable([vm1.frontend.socket.fd.rawValue], timeoutMilliseconds: 300)
                #expect(early == [false], "VM1 got a reply before VM2 acknowledged the revocation")
                try raw.send(.ack(held.sequence))
                func nextReply() throws -> (code: UInt32, payload: [UInt8])? {
                    var code: UInt32 = 0
                    guard let m = try vm1.frontend.socket.receiveFramed(maxFDs: 0, payloadSize: { bytes in
                        let header = try MessageHeader.decode(bytes)
                        code = header.request
                        return Int(header.size)
                    }) else { return nil }
                    return (code, m.payload)
                }
                let first = try #require(try nextReply()), second = try #require(try nextReply())
                #expect(first.code == RequestCode.iotlbMsg.rawValue && first.payload == [UInt8](repeating: 0, count: 8), "the invalidate's ack (0) comes first")
                #expect(second.code == RequestCode.getFeatures.rawValue, "then GET_FEATURES: \(second.code)")
                #expect(running.bridge.statistics.peer.repliesSentOnAck == sentBefore + 1, "the peer thread sent the ack")
                #expect(running.bridge.window.probeInChild(iova) == .faulted)
                raw.socket.shutdown()
            }
        }

        /// An ACK for a sequence never sent would satisfy a later revocation
        /// before VM2 even saw it: a protocol error, counted.
        @Test func anAckFromTheFutureIsAProtocolError() throws {
            try attack("h-future") { running in
                let raw = try RawVM2(running.peerPath)
                #expect(try raw.greet() != nil)
                try raw.send(.ack(1_000_000))
                let e = try raw.expectErrorThenClose()
                #expect(e?.code == .protocolError)
                #expect(e?.text.hasPrefix("ACK 1000000 is beyond the last MAP/UNMAP sequence sent") == true, "\(e?.text ?? "")")
                #expect(running.bridge.statistics.peer.refusals["ack-sequence"] == 1)
                #expect(running.bridge.statistics.peer.acks == 0)
            }
        }

        /// 10 000 TRANSLATEs: at most `max-pending-translations` wait, the
        /// rest are refused with the rule named; identical ones share one miss.
        @Test func aTranslateFloodIsBounded() throws {
            let running = try RunningBridge("h-flood", mode: .iommu)
            defer { running.stop() }
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: true))
            defer { vm1.disconnect() }
            try vm1.start()
            let missesBefore = running.bridge.statistics.iotlbMissesSent
            let started = ContinuousClock.now
            let raw = try RawVM2(running.peerPath)
            #expect(try raw.greet() != nil)
            // Unmapped IOVAs VM1 could map (inside its DMA window), never answered:
            // 100 distinct pages, each asked 100 times.
            let base: UInt64 = 1 << 35
            // Sent from another thread while this one reads the replies, as a
            // VM2 must: one that stops reading is disconnected at the deadline.
            let sender = try JoinableThread(name: "flood") {
                for id in 0..<10_000 as Range<UInt64> {
                    try? raw.send(.translate(PeerTranslate(requestID: id, barOffset: base + (id % 100) * 4096, length: 4096, access: .read)))
                }
            }
            defer { sender.join() }
            // Every request is answered once: refused at the limit, or timed
            // out (VM1 never answers). How many waited depends on how fast
            // this machine drained the flood — a slot frees when a waiting
            // one times out (every 2 s) — so the bound grows with the time
            // taken, never with the number sent.
            let capacity = BridgeSettings.defaultMaxPendingTranslations
            var limited = 0, timedOut = 0, other = 0
            var answered = Set<UInt64>()
            while limited + timedOut + other < 10_000, let m = try raw.receive() {
                guard case .translateReply(let r) = m else { continue }
                #expect(answered.insert(r.requestID).inserted, "request \(r.requestID) answered twice")
                if r.status == .refused, r.reason.hasPrefix("[translation-limit]") {
                    limited += 1
                } else if r.status == .timedOut {
                    timedOut += 1
                } else {
                    other += 1
                }
            }
            let elapsed = started.duration(to: .now)
            let deadlines = Int((elapsed / VhostUserConnectionTuning.translationDeadline).rounded(.down))
            #expect(other == 0 && limited + timedOut == 10_000, "limited \(limited), timed out \(timedOut), other \(other)")
            #expect(timedOut >= capacity && timedOut <= capacity * (1 + deadlines),
                    "\(timedOut) waited over \(deadlines) translation deadlines: at most \(capacity) at a time")
            let s = running.bridge.statistics
            #expect(s.peer.refusals["translation-limit"] == limited)
            // The waiting requests cover 100 pages: one miss each, raised
            // again at most once per retry interval (VM1 never answers). The
            // bound grows with the time a loaded machine took, so it holds
            // whatever the load; without the de-duplication it would be 256+.
            let misses = s.iotlbMissesSent - missesBefore
            let intervals = Int((elapsed / VhostUserConnectionTuning.missRetryInterval).rounded(.down))
            #expect(misses >= 100 && misses <= 100 * (1 + intervals), "misses: \(misses) over \(intervals) retry intervals")
            #expect(s.peer.connected, "refusing requests is not a reason to disconnect")
        }
    }
}
