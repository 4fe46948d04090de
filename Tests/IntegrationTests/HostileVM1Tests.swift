import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import PeerProtocol
import Testing
import TestSupport
import VhostUser
#if canImport(Glibc)
import Glibc
#endif

extension Integration {
    @Suite struct HostileVM1 {
        enum BadFile: String, CaseIterable { case deadPipe, socket, regularFile }

        private func make(_ kind: BadFile) throws -> OwnedFileDescriptor {
            switch kind {
            case .deadPipe:
                var ends: [Int32] = [0, 0]
                guard pipe(&ends) == 0 else { throw SystemCallError("pipe", errno: .init(rawValue: errno)) }
                close(ends[0]) // nobody will ever read: a write would raise SIGPIPE
                return OwnedFileDescriptor(adopting: ends[1])
            case .socket:
                let (a, b) = try UnixSocket.pair()
                try b.fd.close()
                return OwnedFileDescriptor(adopting: a.fd.release())
            case .regularFile:
                return try Memfd(name: "not-an-eventfd", size: 4096).fd.duplicate() // always readable: a relay would spin
            }
        }

        /// A pipe, a socket or a regular file as a kick, call or err fd is
        /// refused (the fd itself is examined), the ring keeps its old fds,
        /// and traffic goes on.
        @Test(arguments: BadFile.allCases)
        func nonEventfdVringFilesAreRefused(_ kind: BadFile) throws {
          try withTwoGuests("bad-\(kind)", mode: .identity) { running, vm1, _ in
            let before = settledOpenFileDescriptorCount()
            do {
                let bad = try make(kind)
                for request in [FrontendRequest.setVringCall(VringFileRef(index: 0, noFD: false)),
                                .setVringKick(VringFileRef(index: 1, noFD: false)),
                                .setVringErr(VringFileRef(index: 0, noFD: false))] {
                    #expect(throws: FrontendError.self) { try vm1.frontend.send(request, fds: [bad.rawValue], ack: true) }
                }
            }
            // (The daemon closes a refused fd right after sending the nack.)
            #expect(pollUntil { openFileDescriptorCount() == before }, "the refused fds are closed: \(openFileDescriptorCount()) vs \(before)")
            #expect(pollUntil { running.bridge.statistics.refusals["fd-kind"] == 3 }, "\(running.bridge.statistics.refusals)")
            let result = try vm1.runTraffic(count: 24, sizes: [64, 1500])
            #expect(result.completed && result.verified == 24, "\(result)")
            #expect(running.bridge.statistics.notificationsDropped == 0)
          }
        }

        /// An iommu bridge with VM2 and VM1 running, and one IOVA mapped
        /// read/write and visible in both windows.
        private func mappedIOVA(_ name: String, mode: BridgeMode = .iommu, staticWindows: [BusWindow] = [],
                                _ body: (RunningBridge, EmulatedVM1, EmulatedVM2, BusAddress) throws -> Void) throws {
            try withTwoGuests(name, mode: mode, staticWindows: staticWindows) { running, vm1, vm2 in
                let iommu = try #require(vm1.iommu)
                let iova = try iommu.map(GuestPhysicalAddress(0x80_0000), length: 0x4000, permission: .readWrite, eager: true)
                #expect(pollUntil { vm2.window?.probeInChild(iova) == .accessible })
                #expect(running.bridge.window.probeInChild(iova) == .accessible)
                try body(running, vm1, vm2, iova)
            }
        }

        /// A raw IOTLB invalidate with NEED_REPLY; returns VM1's ack value.
        private func invalidate(_ vm1: EmulatedVM1, iova: UInt64, size: UInt64, permByte: UInt8) throws -> UInt64? {
            var bytes = VhostUserCodec.encode(.iotlb(IOTLBMessage(iova: iova, size: size, userAddress: 0, permission: .none,
                                                                   type: .invalidate)), needReply: true)
            bytes[12 + 24] = permByte
            try vm1.frontend.socket.send(bytes)
            guard let reply = try readReply(vm1.frontend.socket) else { return nil }
            return try VhostUserCodec.decodeU64Reply(reply, to: .iotlbMsg)
        }

        /// QEMU 7.2 leaves an invalidate's perm byte uninitialised: whatever
        /// it holds, the range is revoked from the daemon and from VM2 before
        /// VM1 gets its ack.
        @Test(arguments: [UInt8(0), 3, 4, 6, 178, 255])
        func invalidatesRevokeWhateverTheirPermByte(_ perm: UInt8) throws {
            try mappedIOVA("perm-\(perm)") { running, vm1, vm2, iova in
                let ack = try invalidate(vm1, iova: iova.rawValue, size: 0x4000, permByte: perm)
                #expect(ack == 0)
                #expect(running.bridge.window.probeInChild(iova) == .faulted)
                #expect(vm2.window?.probeInChild(BusAddress(iova.rawValue + 0x3000)) == .faulted)
                // Counters are published after the message is handled, which is
                // after VM1's ack: wait for them rather than race them.
                #expect(pollUntil { running.bridge.statistics.iotlbInvalidates >= 1 })
                #expect(running.bridge.statistics.refusals.isEmpty, "\(running.bridge.statistics.refusals)")
            }
        }

        /// Size 0 means "from iova to the end of the address space" (Linux
        /// vhost): everything from the IOVA on is revoked, nothing below it.
        @Test func aZeroLengthInvalidateRevokesToTheEnd() throws {
            try mappedIOVA("zero-len") { running, vm1, vm2, iova in
                let ack = try invalidate(vm1, iova: iova.rawValue + 0x1000, size: 0, permByte: 0)
                #expect(ack == 0)
                #expect(running.bridge.window.probeInChild(BusAddress(iova.rawValue + 0x1000)) == .faulted)
                #expect(vm2.window?.probeInChild(BusAddress(iova.rawValue + 0x3000)) == .faulted)
                #expect(running.bridge.window.probeInChild(iova) == .accessible, "below the IOVA stays")
                #expect(vm2.window?.probeInChild(iova) == .accessible)
            }
        }

        /// Freeze blocks grants only: VM1's invalidate after freeze revokes.
        @Test func anInvalidateAfterFreezeRevokes() throws {
            let window = BusWindow(base: BusAddress(1 << 32), limit: 1 << 36)!
            try mappedIOVA("frozen", mode: .static, staticWindows: [window]) { running, vm1, vm2, iova in
                let frozen = try running.bridge.perform(.freeze).get()
                #expect(frozen == "frozen")
                let iommu = try #require(vm1.iommu)
                try iommu.unmap(iova) // acked, or this throws
                #expect(running.bridge.window.probeInChild(iova) == .faulted)
                #expect(vm2.window?.probeInChild(iova) == .faulted)
                // A new grant is refused (a nack), and counted.
                #expect(throws: FrontendError.self) {
                    _ = try iommu.map(GuestPhysicalAddress(0x90_0000), length: 0x1000, permission: .read, eager: true)
                }
                // (Counters are published once the bridge thread finished the message.)
                #expect(pollUntil { running.bridge.statistics.refusals["frozen"] == 1 }, "\(running.bridge.statistics.refusals)")
            }
        }

        /// A refusal found while decoding (before the session saw the
        /// request) is still counted with its rule.
        @Test func decodeRefusalsAreCounted() throws {
            let running = try RunningBridge("decode-count", mode: .iommu)
            defer { running.stop() }
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: true))
            defer { vm1.disconnect() }
            try vm1.start()
            for _ in 0..<5 {
                var bytes = VhostUserCodec.encode(.iotlb(IOTLBMessage(iova: 1 << 32, size: 0x1000, userAddress: 0, permission: .read,
                                                                       type: .update)), needReply: true)
                bytes[12 + 24] = 9 // an update's permission is checked
                try vm1.frontend.socket.send(bytes)
                let reply = try #require(try readReply(vm1.frontend.socket))
                let value = try VhostUserCodec.decodeU64Reply(reply, to: .iotlbMsg)
                #expect(value == 1)
            }
            #expect(pollUntil { running.bridge.statistics.refusals["iotlb-permission"] == 5 }, "\(running.bridge.statistics.refusals)")
        }
    }
}

extension Integration.HostileVM1 {
    /// QEMU replaces a started ring's kick fd (e.g. on vhost_dev_start after
    /// a migration or a guest driver change): in relay mode VM2 keeps its
    /// eventfds and must keep getting kicks from the new fd.
    @Test func aNewKickFdOnAStartedRingKeepsTheKicksComing() throws {
      try withTwoGuests("new-kick", mode: .identity) { running, vm1, vm2 in
        for q in vm1.queues {
            let replacement = try q.kick.fd.duplicate() // same eventfd, a new fd for the daemon
            try vm1.frontend.send(.setVringKick(VringFileRef(index: UInt8(q.index), noFD: false)), fds: [replacement.rawValue], ack: true)
            try replacement.close()
        }
        let result = try vm1.runTraffic(count: 40, sizes: [64, 1500])
        #expect(result.completed && result.verified == 40, "\(result)")
        #expect(running.bridge.statistics.notificationsDropped == 0)
        #expect(vm2.statistics.packetsVerified == 40)
      }
    }
}

extension Integration.HostileVM1 {
    /// GET_VRING_BASE answers where VM2 stopped, not a stale index: with
    /// unsealed memory the daemon cannot read the used ring safely, and only
    /// VM2 knows its last avail index. A VM2 with `vringStopAck` reports it.
    @Test(arguments: [true, false])
    func getVringBaseAnswersWhereVM2Stopped(vm2Reports: Bool) throws {
        var c2 = VM2Configuration()
        c2.acknowledgesRingStops = vm2Reports
        var c1 = VM1Configuration()
        c1.sealedRAM = false
      try withTwoGuests("base-\(vm2Reports)", mode: .identity, vm1: c1, vm2: c2) { running, vm1, vm2 in
        let result = try vm1.runTraffic(count: 30, sizes: [64, 1500])
        #expect(result.completed, "\(result)")
        // VM2 publishes its counters after the used ring it wrote: VM1 may
        // see the echoes first.
        #expect(pollUntil { vm2.statistics.packetsSent == 30 && vm2.statistics.packetsReceived == 30 })
        let s = vm2.statistics
        let bases = try vm1.stopDevice()
        if vm2Reports {
            // Queue 0 is VM1's RX (VM2 consumed one buffer per echo), queue 1 its TX.
            #expect(bases == [UInt32(s.packetsSent), UInt32(s.packetsReceived)], "bases \(bases), VM2 \(s.packetsSent)/\(s.packetsReceived)")
            #expect(bases != [0, 0])
        } else {
            // A version-1 VM2: unsealed memory is never read, so the daemon can
            // only answer what SET_VRING_BASE set.
            #expect(bases == [0, 0])
        }
        #expect(running.bridge.statistics.peer.revocationTimeouts == 0)
        #expect(running.bridge.statistics.peer.connected)
      }
    }
}
