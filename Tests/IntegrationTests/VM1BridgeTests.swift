import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import Testing
import TestSupport
import VhostUser

extension Integration {
    @Suite struct VM1Bridge {
        @Test func identityModeShowsVM1BytesAtTheirGPA() throws {
            let running = try RunningBridge("ident", mode: .identity)
            defer { running.stop() }
            let vm1 = try EmulatedVM1(socketPath: running.path)
            try vm1.start()
            let view = try #require(running.bridge.statistics.session)
            #expect(view.startedRings == [0, 1])
            #expect(view.enabledRings == [0, 1])
            #expect(view.mappings == 1 && view.mappedBytes == 256 * MiB)
            #expect(view.ringLayouts[1]?.descriptorTable == BusAddress(0x20_0000))

            // VM1 writes, VM2's window sees it in place at BAR offset = GPA (and back).
            #expect(vm1.ram.write(Array("vm1 data".utf8), at: GuestPhysicalAddress(0x30_0000)))
            let window = running.bridge.window
            #expect(window.withBytes(at: BusAddress(0x30_0000), length: 8) { Array($0) } == Array("vm1 data".utf8))
            _ = window.withBytes(at: BusAddress(0x40_0000), length: 3) { $0.copyBytes(from: [7, 8, 9]) }
            #expect(vm1.ram.read(3, at: GuestPhysicalAddress(0x40_0000)) == [7, 8, 9])

            // A TX packet: the device would find it through the ring, at its GPA.
            let packet = (0..<1500).map { UInt8(truncatingIfNeeded: $0 * 7) }
            let bus = try vm1.send(packet)
            #expect(window.withBytes(at: BusAddress(bus.rawValue + 12), length: packet.count) { Array($0) } == packet)
            let descAddr = window.withBytes(at: BusAddress(0x20_0000), length: 8) { $0.loadUnaligned(as: UInt64.self) }
            #expect(descAddr == bus.rawValue)

            // Beyond VM1's RAM nothing is mapped.
            #expect(window.probeInChild(BusAddress(256 * MiB)) == .faulted)

            #expect(try vm1.stopDevice() == [0, 0])
            vm1.disconnect()
            running.waitForSessions(1)
            #expect(running.bridge.statistics.session == nil)
            #expect(window.probeInChild(BusAddress(0x30_0000)) == .faulted, "a closed session must leave nothing mapped")
            #expect(running.bridge.statistics.lastEnd == .frontEndClosed)
        }

        @Test func iommuModeMapsOnlyIOTLBRangesAndInvalidateRevokes() throws {
            let running = try RunningBridge("iommu", mode: .iommu)
            defer { running.stop() }
            var config = VM1Configuration()
            config.iommu = .iommu
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: config)
            try vm1.start()
            let view = try #require(running.bridge.statistics.session)
            #expect(view.startedRings == [0, 1], "rings start once misses were answered")
            #expect(running.bridge.statistics.session?.ringLayouts[0]?.descriptorTable == vm1.ringBus[0])
            #expect((vm1.iommu?.missesAnswered ?? 0) >= 2)
            let window = running.bridge.window
            // Guest-physical addresses are not visible in iommu mode.
            #expect(window.probeInChild(BusAddress(0x30_0000)) == .faulted)

            let packet = Array("through an IOVA".utf8)
            let iova = try vm1.send(packet)
            #expect(iova.rawValue >= 1 << 32, "IOVAs come from the DMA window")
            #expect(window.withBytes(at: BusAddress(iova.rawValue + 12), length: packet.count) { Array($0) } == packet)
            // Zero copy: a later write by VM1 shows through the same mapping.
            #expect(vm1.ram.write([0x42], at: GuestPhysicalAddress(16 * MiB + 12)))
            #expect(window.withBytes(at: BusAddress(iova.rawValue + 12), length: 1) { $0[0] } == 0x42)

            // VM1 unmaps: once the invalidate is acked the range faults.
            try vm1.iommu?.unmap(iova)
            #expect(window.probeInChild(BusAddress(iova.rawValue + 12)) == .faulted)
            #expect(running.bridge.statistics.session?.mappings == 2, "only the two ring areas remain")
            // Live counters, while the session is still up (what `stats` and `metrics` show).
            let live = running.bridge.statistics
            #expect(live.iotlbUpdates >= 3 && live.iotlbInvalidates == 1 && live.iotlbMissesSent >= 2)
            vm1.disconnect()
            running.waitForSessions(1)
            let stats = running.bridge.statistics
            #expect(stats.iotlbMissesSent >= 2 && stats.iotlbUpdates >= 3 && stats.iotlbInvalidates == 1)
        }

        @Test func lazyIOTLBMapsNothingUntilAMiss() throws {
            let running = try RunningBridge("lazy", mode: .iommu)
            defer { running.stop() }
            var config = VM1Configuration()
            config.iommu = .iommu
            config.eagerBufferMaps = false
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: config)
            try vm1.start()
            let iova = try vm1.send(Array(repeating: 1, count: 64))
            try vm1.settle()
            #expect(running.bridge.window.probeInChild(iova) == .faulted, "QEMU-style: buffers appear only after a miss")
            let ringMisses = running.bridge.statistics.iotlbMissesSent // the rings' own, raised when they start
            // Now the miss: VM2 comes, reads the packet, asks for its buffer;
            // the daemon raises a miss, VM1 answers, the buffer is mapped.
            let vm2 = try EmulatedVM2(peerSocketPath: running.peerPath)
            defer { vm2.stop() }
            #expect(pollUntil { try? vm1.settle(); return vm2.statistics.packetsReceived >= 1 }, "\(vm2.statistics)")
            #expect(running.bridge.statistics.iotlbMissesSent > ringMisses, "a miss for the buffer")
            #expect(running.bridge.window.probeInChild(iova) == .accessible, "mapped after the miss was answered")
            vm1.disconnect()
        }

        @Test func identityBridgeRefusesAFrontEndWithAVIOMMU() throws {
            let running = try RunningBridge("mismatch", mode: .identity)
            defer { running.stop() }
            var config = VM1Configuration()
            config.iommu = .iommu
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: config)
            // IOMMU_PLATFORM is not offered, so VM1 cannot ack it; its first IOTLB message is refused.
            #expect(throws: (any Error).self) { try vm1.start() }
            vm1.disconnect()
            running.waitForSessions(1)
        }

        @Test func reconnectingAHundredTimesLeaksNothing() throws {
            let running = try RunningBridge("reconnect", mode: .identity)
            defer { running.stop() }
            // Warm up once so lazily created runtime fds are not counted.
            do {
                let vm1 = try EmulatedVM1(socketPath: running.path)
                try vm1.start()
                vm1.disconnect()
                running.waitForSessions(1)
            }
            let before = settledOpenFileDescriptorCount()
            for i in 0..<100 {
                let vm1 = try EmulatedVM1(socketPath: running.path)
                try vm1.start()
                try vm1.send(Array(repeating: UInt8(i & 0xff), count: 100))
                vm1.disconnect()
                running.waitForSessions(i + 2)
            }
            #expect(settledOpenFileDescriptorCount() == before)
            #expect(running.bridge.statistics.sessionsServed == 101)
            #expect(running.bridge.window.probeInChild(BusAddress(0)) == .faulted)
        }

        @Test func iommuReconnectsLeakNothing() throws {
            let running = try RunningBridge("reconnect-iommu", mode: .iommu)
            defer { running.stop() }
            var config = VM1Configuration()
            config.iommu = .iommu
            let before = settledOpenFileDescriptorCount()
            for i in 0..<20 {
                let vm1 = try EmulatedVM1(socketPath: running.path, configuration: config)
                try vm1.start()
                _ = try vm1.send(Array(repeating: 3, count: 2000))
                vm1.disconnect()
                running.waitForSessions(i + 1)
            }
            #expect(settledOpenFileDescriptorCount() == before)
        }
    }
}
