import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import Testing
import TestSupport
import VhostUser

/// Reads one reply, or nil when the daemon closed the connection.
func readReply(_ socket: UnixSocket) throws -> [UInt8]? {
    try socket.receiveFramed(maxFDs: 0) { bytes in Int(try MessageHeader.decode(bytes).size) }?.payload
}

extension Integration {
    @Suite struct WireHostility {
        @Test func fdsOnARequestThatTakesNoneAreClosedAndTheConnectionDropped() throws {
            let running = try RunningBridge("fds", mode: .identity)
            defer { running.stop() }
            let before = settledOpenFileDescriptorCount()
            do {
                let socket = try UnixSocket.connect(path: running.path)
                let stray = try EventFD()
                try socket.send(VhostUserCodec.encode(.getFeatures), fds: [stray.fd.rawValue])
                #expect(try readReply(socket) == nil, "the daemon must close, not answer")
            }
            running.waitForSessions(1)
            #expect(settledOpenFileDescriptorCount() == before)
            #expect(running.bridge.statistics.lastEnd != .frontEndClosed)
        }

        @Test func badVersionOversizeAndUnknownRequestCloseTheConnection() throws {
            let running = try RunningBridge("hdr", mode: .identity)
            defer { running.stop() }
            let headers: [MessageHeader] = [
                MessageHeader(request: 1, flags: 2, size: 0),            // version 2
                MessageHeader(request: 22, flags: 1, size: 0xffff_ffff),  // 4 GiB payload announced
                MessageHeader(request: 99, flags: 1, size: 0),           // unknown request
                MessageHeader(request: 5, flags: 1, size: 300),          // memory table too large
            ]
            for (i, header) in headers.enumerated() {
                let socket = try UnixSocket.connect(path: running.path)
                try socket.send(header.encoded)
                #expect(try readReply(socket) == nil)
                running.waitForSessions(i + 1)
            }
            // The bridge still serves a well-behaved front end afterwards.
            let vm1 = try EmulatedVM1(socketPath: running.path)
            try vm1.start()
            #expect(running.bridge.statistics.session?.startedRings == [0, 1])
            vm1.disconnect()
        }

        @Test func truncatedMessageClosesTheConnection() throws {
            let running = try RunningBridge("trunc", mode: .identity)
            defer { running.stop() }
            let socket = try UnixSocket.connect(path: running.path)
            // A SET_FEATURES header announcing 8 bytes, then only 3 and EOF.
            try socket.send(MessageHeader(request: 2, flags: 1, size: 8).encoded + [1, 2, 3])
            socket.shutdown()
            running.waitForSessions(1)
            #expect(running.bridge.statistics.requests == 0)
        }

        @Test func withReplyAckARefusalIsANackAndTheSessionGoesOn() throws {
            let running = try RunningBridge("nack", mode: .identity)
            defer { running.stop() }
            let f = try VhostUserFrontend(connectingTo: running.path)
            try f.setProtocolFeatures([.replyAck])
            try f.send(.setOwner, ack: true)
            #expect(throws: FrontendError.self) {
                try f.send(.setVringNum(VringState(index: 0, num: 1000)), ack: true)
            }
            // Still connected, still answering.
            #expect(try f.getU64(.getFeatures) & FeatureBit.version1 != 0)
            // A payload the codec refuses, with NEED_REPLY: also a nack, not a close.
            var bad = VhostUserCodec.encode(.setVringNum(VringState(index: 0, num: 256)), needReply: true)
            bad[8] = 4; bad.removeLast(4)
            try f.socket.send(bad)
            #expect(try readReply(f.socket) == [1, 0, 0, 0, 0, 0, 0, 0])
            #expect(try f.getU64(.getFeatures) != 0)
            f.close()
            running.waitForSessions(1)
            #expect(running.bridge.statistics.refusals["queue-size"] == 1)
        }

        @Test func requestsBeforeSetOwnerCloseTheConnectionWithoutReplyAck() throws {
            let running = try RunningBridge("owner", mode: .identity)
            defer { running.stop() }
            let socket = try UnixSocket.connect(path: running.path)
            try socket.send(VhostUserCodec.encode(.setVringNum(VringState(index: 0, num: 256))))
            #expect(try readReply(socket) == nil)
            running.waitForSessions(1)
            #expect(running.bridge.statistics.refusals["owner"] == 1)
        }
    }
}

extension Integration.WireHostility {
    /// Half a message and then silence: the bridge drops that front end
    /// at its message deadline instead of hanging, and serves the next one.
    @Test func aFrontEndStallingMidMessageIsDropped() throws {
        let running = try RunningBridge("stall", mode: .identity)
        defer { running.stop() }
        let socket = try UnixSocket.connect(path: running.path)
        try socket.send(MessageHeader(request: 2, flags: 1, size: 8).encoded + [1, 2]) // 2 of 8 payload bytes, then nothing
        running.waitForSessions(1)
        if case .closedByBridge(let reason)? = running.bridge.statistics.lastEnd {
            #expect(reason.contains("message not complete within 2000 ms: 12 of 20 bytes"), "\(reason)")
        } else {
            Issue.record("expected the bridge to close the stalled connection, got \(String(describing: running.bridge.statistics.lastEnd))")
        }
        let vm1 = try EmulatedVM1(socketPath: running.path)
        try vm1.start()
        vm1.disconnect()
    }
}
