import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import PeerProtocol
import Synchronization
import Testing
import TestSupport
import VhostUser

/// A raw VM2 that negotiated `sharedRevocations`: it has the channel's
/// memory and does with it whatever a hostile VM2 could.
final class ChannelVM2: Sendable {
    let raw: RawVM2
    let memory: ChannelMemory
    let capacity: UInt32

    init(_ path: String) throws {
        raw = try RawVM2(path)
        guard try raw.greet(features: .all) != nil else { throw SystemCallError("greet", errno: .protocolError) }
        while true {
            guard let (message, fds) = try raw.receiveWithFDs() else { throw SystemCallError("CHANNEL", errno: .protocolError) }
            if case .channel(let c) = message, let fd = fds.first {
                memory = try ChannelMemory(adopting: OwnedFileDescriptor(adopting: fd.release()), size: Int(c.size))
                capacity = c.capacity
                return
            }
            for fd in fds { try? fd.close() }
        }
    }

    var posted: UInt64 { memory.loadAcquire64(at: RevocationChannel.postedOffset) }
    func ack(_ value: UInt64) { memory.storeRelease64(value, at: RevocationChannel.ackedOffset) }
    /// Wakes a daemon that sleeps on the ack (as an honest VM2 does).
    func wakeDaemon() {
        memory.fetchAdd32(1, at: RevocationChannel.ackEventOffset)
        memory.wake(at: RevocationChannel.ackEventOffset)
    }
    func record(_ sequence: UInt64) throws -> ChannelRecord {
        let bytes = try #require(memory.read(RevocationChannel.recordSize,
                                             at: RevocationChannel.recordOffset(sequence: sequence, capacity: capacity)))
        return try ChannelRecord.decode(bytes, expecting: sequence)
    }
}

extension Integration {
    /// The revocation channel against a VM2 that lies in it: every lie is a
    /// protocol error with the socket's consequences, VM1's invalidate still
    /// completes (VM2 is gone with what it held), and the daemon never
    /// touches memory VM2 could take away.
    @Suite(.serialized) struct ChannelAttacks {
        /// An iommu bridge, VM1 with one page granted through the channel,
        /// the invalidate of that page sent (NEED_REPLY) and its UNMAP
        /// record posted; `body` plays VM2, then VM1's reply is read.
        private func withPostedUnmap(_ name: String, deadline: Int = 60_000,
                                     _ body: (RunningBridge, ChannelVM2, _ unmap: UInt64) throws -> Void) throws {
            let running = try RunningBridge(name, mode: .iommu, revocationDeadline: deadline)
            defer { running.stop() }
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: true))
            defer { vm1.disconnect() }
            try vm1.start()
            let before = settledOpenFileDescriptorCount()
            do {
                let vm2 = try ChannelVM2(running.peerPath)
                #expect(pollUntil { running.bridge.statistics.peer.ready })
                let iommu = try #require(vm1.iommu)
                let iova = try iommu.map(GuestPhysicalAddress(0x90_0000), length: 4096, permission: .readWrite, eager: true)
                let mapped = vm2.posted
                guard case .map(let m, _) = try vm2.record(mapped) else { Issue.record("no MAP record at \(mapped)"); return }
                #expect(m.barOffset == iova.rawValue && m.permission == .readWrite)
                let invalidate = IOTLBMessage(iova: iova.rawValue, size: 4096, userAddress: 0, permission: .none, type: .invalidate)
                try vm1.frontend.socket.send(VhostUserCodec.encode(.iotlb(invalidate), needReply: true))
                #expect(pollUntil { vm2.posted == mapped + 1 })
                guard case .unmap(let u) = try vm2.record(mapped + 1) else { Issue.record("no UNMAP record"); return }
                #expect(u.barOffset == iova.rawValue && u.length == 4096)
                try body(running, vm2, mapped + 1)
                // VM1's invalidate is answered (0: done) whatever VM2 did.
                let reply = try #require(try vm1.frontend.socket.receiveFramed(maxFDs: 0) { bytes in
                    Int(try MessageHeader.decode(bytes).size)
                })
                #expect(reply.payload == [UInt8](repeating: 0, count: 8))
                #expect(running.bridge.window.probeInChild(iova) == .faulted)
            }
            // Whatever VM2 did, nothing of its connection stays open here.
            #expect(pollUntil { !running.bridge.statistics.peer.connected })
            #expect(pollUntil { openFileDescriptorCount() == before }, "fds: \(before) before, \(openFileDescriptorCount()) after")
        }

        @Test func anHonestAckInTheChannelCompletesTheRevocation() throws {
            try withPostedUnmap("ch-honest") { running, vm2, unmap in
                // Not acknowledged yet: VM1 hears nothing.
                let vm1Waits = running.bridge.statistics.peer.revocationLatency.count
                #expect(vm1Waits == 0)
                vm2.ack(unmap)
                vm2.wakeDaemon()
                #expect(pollUntil { running.bridge.statistics.peer.revocationLatency.count == 1 })
                #expect(running.bridge.statistics.peer.protocolErrors == 0 && running.bridge.statistics.peer.revocationTimeouts == 0)
                #expect(running.bridge.statistics.peer.connected)
                vm2.raw.socket.shutdown()
            }
        }

        @Test func anAckFromTheFutureInTheChannelIsAProtocolError() throws {
            try withPostedUnmap("ch-future") { running, vm2, unmap in
                vm2.ack(unmap + 1_000)
                vm2.wakeDaemon()
                let e = try vm2.raw.expectErrorThenClose()
                #expect(e?.text.hasPrefix("ACK \(unmap + 1_000) is beyond the last MAP/UNMAP sequence sent (\(unmap))") == true, "\(e?.text ?? "")")
                #expect(running.bridge.statistics.peer.refusals["ack-sequence"] == 1)
            }
        }

        @Test func anAckThatGoesBackIsAProtocolError() throws {
            try withPostedUnmap("ch-back") { running, vm2, unmap in
                vm2.ack(unmap - 1) // the MAP: fine, the UNMAP is still held
                vm2.wakeDaemon()
                #expect(pollUntil { running.bridge.statistics.peer.acks >= 1 })
                vm2.ack(0) // torn, wrapped or rewritten: back it goes
                vm2.wakeDaemon()
                let e = try vm2.raw.expectErrorThenClose()
                #expect(e?.text == "the channel's ack went back from \(unmap - 1) to 0", "\(e?.text ?? "")")
                #expect(running.bridge.statistics.peer.refusals["channel-ack"] == 1)
            }
        }

        /// The memfd is sealed: VM2 cannot shrink it (the daemon reads it,
        /// a SIGBUS there would kill it); a hole it punches reads as zeros,
        /// an ack that went back.
        @Test func aVM2ThatTruncatesOrPunchesTheChannelCannotHurtTheDaemon() throws {
            try withPostedUnmap("ch-punch") { running, vm2, unmap in
                vm2.ack(unmap - 1)
                vm2.wakeDaemon()
                #expect(pollUntil { running.bridge.statistics.peer.acks >= 1 })
                #expect(ftruncate(vm2.memory.fd.rawValue, 0) == -1 && errno == EPERM, "the channel can be shrunk")
                #expect(ftruncate(vm2.memory.fd.rawValue, 1 << 20) == -1 && errno == EPERM, "the channel can be grown")
                try Memfd(adopting: vm2.memory.fd).punchHole(offset: 0, length: 4096)
                vm2.wakeDaemon()
                let e = try vm2.raw.expectErrorThenClose()
                #expect(e?.text == "the channel's ack went back from \(unmap - 1) to 0", "\(e?.text ?? "")")
            }
        }

        @Test func aVM2ThatNeverAcksInTheChannelMissesTheDeadline() throws {
            try withPostedUnmap("ch-silent", deadline: 100) { running, vm2, _ in
                #expect(pollUntil { running.bridge.statistics.peer.revocationTimeouts == 1 })
                #expect(running.bridge.statistics.peer.channelSleeps >= 1, "the daemon spun, then slept")
            }
        }

        /// A VM2 that says it sleeps is sent WAKE once the record is posted.
        @Test func aSleepingVM2IsWokenOnTheSocket() throws {
            try withPostedUnmap("ch-wake") { running, vm2, unmap in
                // Too late for this record (posted already): the next one.
                vm2.memory.storeRelease32(1, at: RevocationChannel.vm2SleepingOffset)
                vm2.ack(unmap)
                vm2.wakeDaemon()
                #expect(pollUntil { running.bridge.statistics.peer.revocationLatency.count == 1 })
                var sawWake = false
                _ = running.bridge.perform(.map(bus: BusAddress(0x80_0000), gpa: GuestPhysicalAddress(0x80_0000),
                                                    length: 4096, permission: .readWrite)) // (a read-only grant would open a read-only fd that lives as long as the region)
                let unmapped = Atomic(false)
                let bridge = running.bridge
                let operatorThread = try JoinableThread(name: "operator") {
                    _ = bridge.perform(.unmap(bus: BusAddress(0x80_0000), length: 4096))
                    unmapped.store(true, ordering: .releasing)
                }
                while !sawWake, let m = try vm2.raw.receive() { if case .wake = m { sawWake = true } }
                #expect(sawWake)
                #expect(running.bridge.statistics.peer.channelWakes >= 1)
                vm2.ack(vm2.posted)
                vm2.wakeDaemon()
                operatorThread.join()
                let done = unmapped.load(ordering: .acquiring)
                #expect(done)
                vm2.raw.socket.shutdown()
            }
        }
    }
}
