import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import PeerProtocol
import Testing
import TestSupport
import VhostUser

let packetSizes = [64, 128, 512, 1500, 4096, 9000, 16384, 65536]

/// Starts VM2 and waits until the daemon finished its handshake.
func connectVM2(_ running: RunningBridge, _ config: VM2Configuration = VM2Configuration(),
                sourceLocation: SourceLocation = #_sourceLocation) throws -> EmulatedVM2 {
    let vm2 = try EmulatedVM2(peerSocketPath: running.peerPath, configuration: config)
    let ok = pollUntil { vm2.statistics.ready && running.bridge.statistics.peer.ready }
    #expect(ok, "VM2 handshake did not complete", sourceLocation: sourceLocation)
    return vm2
}

func vm1Config(iommu: Bool, eager: Bool = true) -> VM1Configuration {
    var c = VM1Configuration()
    c.iommu = iommu ? .iommu : .none
    c.eagerBufferMaps = eager
    return c
}

extension Integration {
    @Suite struct TwoGuests {
        private func zeroCopyRun(mode: BridgeMode, eager: Bool = true, count: Int = 160,
                                 notifications: NotificationMode = .relay) throws {
            try withTwoGuests("zc-\(mode)-\(eager)-\(notifications)", mode: mode, notifications: notifications, vm1: vm1Config(iommu: mode != .identity, eager: eager)) { running, vm1, vm2 in
                #expect(pollUntil { vm2.statistics.mapsApplied > 0 })

                let result = try vm1.runTraffic(count: count, sizes: packetSizes)
                #expect(result.completed, "\(result)")
                #expect(result.verified == count && result.corrupt == 0)
                let s = vm2.statistics
                #expect(s.packetsVerified == count && s.packetsCorrupt == 0 && s.packetsSent == count)
                #expect(s.descriptorsRefused == 0)
                #expect(s.bytesReceived == result.bytesSent)
                let bridge = running.bridge.statistics
                if notifications == .passthrough {
                    #expect(bridge.kicksRelayed == 0 && bridge.callsRelayed == 0, "passthrough: the daemon sees no notification")
                } else {
                    // Every kick VM1 sent and every doorbell VM2 rang went through the relay.
                    #expect(bridge.kicksRelayed > 0 && bridge.callsRelayed > 0)
                    #expect(bridge.notificationsDropped == 0)
                }

                // Zero copy: VM2 reads VM1's pages through its own mapping of the same
                // memfd. Identity: at BAR offset = GPA. A byte VM1 writes now shows up
                // in VM2's BAR with no daemon action.
                if mode == .identity {
                    let window = try #require(vm2.window)
                    let before = running.bridge.statistics.requests
                    #expect(vm1.ram.write([0xA5, 0x5A], at: GuestPhysicalAddress(0x70_0000)))
                    #expect(window.withBytes(at: BusAddress(0x70_0000), length: 2) { Array($0) } == [0xA5, 0x5A])
                    #expect(running.bridge.statistics.requests == before)
                }
            }
        }

        @Test func zeroCopyBothDirectionsIdentity() throws { try zeroCopyRun(mode: .identity) }
        @Test func zeroCopyBothDirectionsIOMMU() throws { try zeroCopyRun(mode: .iommu) }
        @Test func passthroughNotificationsMoveTheSameTraffic() throws { try zeroCopyRun(mode: .identity, notifications: .passthrough) }
        @Test func sqpollRelayMovesTheSameTraffic() throws { try zeroCopyRun(mode: .identity, notifications: .relaySQPoll) }

        /// Passthrough hands VM1's own eventfds to VM2: a VM2 that reconnects
        /// gets them again (the daemon keeps its copies), and kicks and calls
        /// work with each new VM2; no fd of a departed VM2 is left.
        @Test func passthroughFdsReachEveryReconnectingVM2() throws {
            let running = try RunningBridge("pt-reconnect", mode: .identity, notifications: .passthrough)
            defer { running.stop() }
            let vm1 = try EmulatedVM1(socketPath: running.path)
            defer { vm1.disconnect() }
            try vm1.start()
            let first = try connectVM2(running)
            #expect(try vm1.runTraffic(count: 30, sizes: [64, 1500]).completed)
            first.stop()
            #expect(pollUntil { !running.bridge.statistics.peer.connected })
            let before = settledOpenFileDescriptorCount()
            for round in 0..<3 {
                let vm2 = try connectVM2(running)
                let r = try vm1.runTraffic(count: 30, sizes: [64, 1500])
                #expect(r.completed, "round \(round): \(r)")
                #expect(vm2.statistics.kicksReceived > 0 && vm2.statistics.notificationsSent > 0, "VM1's own eventfds, round \(round)")
                vm2.stop()
                #expect(pollUntil { !running.bridge.statistics.peer.connected })
            }
            #expect(settledOpenFileDescriptorCount() == before, "each VM2's copies of VM1's eventfds were closed")
        }

        /// VM1 replaces a running ring's call fd (QEMU does when it masks
        /// and unmasks the vector, at every device start): with no traffic
        /// at all the new fd gets one call, so a doorbell the relay moved
        /// to the old fd at the instant of the swap cannot leave the ring
        /// stalled (seen once in the migration interop test: the guest's
        /// receive ring on the destination never got its interrupt); and
        /// traffic goes on through the new fd. In passthrough mode VM2 holds
        /// VM1's call fds itself and gives the new one its call.
        @Test(arguments: [NotificationMode.relay, .relaySQPoll, .passthrough])
        func aCallFdReplacedOnARunningRingIsCalledOnce(_ notifications: NotificationMode) throws {
            try withTwoGuests("call-swap-\(notifications.rawValue)", mode: .identity, notifications: notifications) { _, vm1, _ in
                let fresh = try EventFD()
                try vm1.frontend.send(.setVringCall(VringFileRef(index: 0, noFD: false)), fds: [fresh.fd.rawValue], ack: true)
                var calls: UInt64 = 0
                #expect(pollUntil(seconds: 10) { calls += (try? fresh.read()).flatMap { $0 } ?? 0; return calls > 0 },
                        "the new call fd was never called")
                #expect(calls == 1, "one call for the swap, nothing else moved: \(calls)")
                // The device's receive ring (VM1's 0) reports through the new fd from now on.
                let r = try vm1.runTraffic(count: 24, sizes: [64, 1500])
                #expect(r.completed && r.verified == 24, "\(r)")
            }
        }

        @Test func lazyIOTLBThroughTranslationRequests() throws {
            // QEMU-like VM1: no eager updates; VM2 asks, the daemon raises misses, VM1 answers.
            try zeroCopyRun(mode: .iommu, eager: false, count: 40)
        }

        @Test func iommuZeroCopyIsVisibleAtTheIOVA() throws {
            try withTwoGuests("zc-iova", mode: .iommu, vm1: vm1Config(iommu: true)) { running, vm1, vm2 in
                let iommu = try #require(vm1.iommu)
                let iova = try iommu.map(GuestPhysicalAddress(0x80_0000), length: 4096, permission: .read, eager: true)
                #expect(pollUntil { vm2.window?.probeInChild(iova) == .accessible })
                #expect(vm1.ram.write([1, 2, 3], at: GuestPhysicalAddress(0x80_0000)))
                #expect(vm2.window?.withBytes(at: iova, length: 3) { Array($0) } == [1, 2, 3])

                // Revocation: once VM1's invalidate is acked, VM2's BAR faults there.
                try iommu.unmap(iova)
                #expect(vm2.window?.probeInChild(iova) == .faulted)
                #expect(vm2.statistics.unmapsApplied >= 1)
                #expect(running.bridge.statistics.peer.revocationTimeouts == 0)
            }
        }

        /// An IOTLB update that lowers a mapping's permission (RW → RO) takes
        /// write access away: it is a revocation, acknowledged by VM2 before
        /// VM1 is. With a VM2 that applies it, VM2's BAR refuses writes right
        /// after VM1's ack; with one that never acks, VM2 is disconnected at
        /// the deadline — while a plain grant never waits.
        @Test(arguments: [true, false])
        func loweringAPermissionIsARevocation(vm2Acks: Bool) throws {
            var config = VM2Configuration()
            config.acknowledges = vm2Acks
            try withTwoGuests("lower-\(vm2Acks)", mode: .iommu, revocationDeadline: 50, vm1: vm1Config(iommu: true), vm2: config) { running, vm1, vm2 in
                let iommu = try #require(vm1.iommu)
                let iova = try iommu.map(GuestPhysicalAddress(0xa0_0000), length: 4096, permission: .readWrite, eager: true)
                #expect(pollUntil { vm2.window?.probeInChild(iova, write: true) == .accessible })
                #expect(running.bridge.statistics.peer.revocationTimeouts == 0, "a grant does not wait for VM2")
                // The same IOVA again, read-only.
                try vm1.frontend.send(.iotlb(IOTLBMessage(iova: iova.rawValue, size: 4096,
                                                          userAddress: vm1.ram.userAddress(of: GuestPhysicalAddress(0xa0_0000)).rawValue,
                                                          permission: .read, type: .update)), ack: true)
                #expect(running.bridge.window.probeInChild(iova, write: true) == .faulted)
                if vm2Acks {
                    #expect(vm2.window?.probeInChild(iova, write: true) == .faulted, "VM2 lost write access before VM1's ack")
                    #expect(vm2.window?.probeInChild(iova) == .accessible, "and kept read access")
                    #expect(running.bridge.statistics.peer.revocationTimeouts == 0)
                } else {
                    #expect(running.bridge.statistics.peer.revocationTimeouts == 1, "the downgrade waited for VM2")
                    #expect(pollUntil { vm2.isFinished }, "VM2 must be disconnected")
                }
            }
        }

        /// A write-only IOTLB grant (how a driver maps an RX buffer): VM2 may
        /// write it, never read it. The MMU cannot express write-only, so the
        /// checks do: the daemon refuses a read translation, and VM2's device
        /// refuses a TX chain that points at it (reading a buffer it may only
        /// write), while RX traffic into write-only buffers flows.
        @Test func aWriteOnlyGrantIsWrittenNeverRead() throws {
            try withTwoGuests("wo", mode: .iommu, vm1: vm1Config(iommu: true)) { running, vm1, vm2 in
                let iommu = try #require(vm1.iommu)
                let iova = try iommu.map(GuestPhysicalAddress(0xb0_0000), length: 4096, permission: .write, eager: true)
                let read = vm2.translate(barOffset: iova.rawValue, length: 64, access: .read)
                #expect(read?.status == .refused, "\(String(describing: read))")
                #expect(vm2.translate(barOffset: iova.rawValue, length: 64, access: .write)?.status == .granted)
                // A TX descriptor naming the write-only buffer: refused by the device.
                let refusedBefore = vm2.statistics.descriptorsRefused
                vm1.queues[1].add([.init(address: iova.rawValue, length: 64, deviceWritable: false)])
                try vm1.queues[1].kick.signal()
                #expect(pollUntil { vm2.statistics.descriptorsRefused > refusedBefore }, "\(vm2.statistics.refusalReasons)")
                #expect(vm2.statistics.packetsVerified == 0)
                // RX buffers are write-only grants too: echoes into them work.
                #expect(try vm1.runTraffic(count: 20, sizes: [64, 1500]).completed)
            }
        }

        @Test func aVM2ThatNeverAcksIsDisconnectedAndVM1StillCompletes() throws {
            var config = VM2Configuration()
            config.acknowledges = false
            try withTwoGuests("noack", mode: .iommu, revocationDeadline: 50, vm1: vm1Config(iommu: true), vm2: config) { running, vm1, vm2 in
                let iommu = try #require(vm1.iommu)
                let iova = try iommu.map(GuestPhysicalAddress(0x90_0000), length: 4096, permission: .readWrite, eager: true)
                try iommu.unmap(iova) // returns once the daemon acked: after the deadline at worst
                #expect(running.bridge.statistics.peer.revocationTimeouts == 1)
                #expect(pollUntil { vm2.isFinished }, "VM2 must be disconnected")
                #expect(running.bridge.window.probeInChild(iova) == .faulted)
                // VM1 is unaffected: its session goes on.
                #expect(try vm1.frontend.getU64(.getFeatures) != 0)
                #expect(running.bridge.statistics.session?.startedRings == [0, 1])
            }
        }

        @Test func translationRequestsAndRefusals() throws {
            let dma = BusWindow(base: BusAddress(4 * GiB), limit: 16 * GiB)!
            var config = vm1Config(iommu: true)
            config.dmaWindow = dma
            try withTwoGuests("translate", mode: .iommu, dmaWindow: dma, vm1: config) { running, vm1, vm2 in
                let iommu = try #require(vm1.iommu)
                let iova = try iommu.map(GuestPhysicalAddress(0xA0_0000), length: 8192, permission: .read, eager: false)
                #expect(vm2.window?.probeInChild(iova) == .faulted, "not mapped before anyone asks")

                // VM2 asks from its own thread; VM1 answers the miss here.
                let pending = Locked<PeerTranslateReply?>(nil)
                let asker = try JoinableThread(name: "ask") {
                    let r = vm2.translate(barOffset: iova.rawValue, length: 8192, access: .read)
                    pending.withLock { $0 = r }
                }
                #expect(pollUntil {
                    try? vm1.settleMisses()
                    return pending.withLock { $0 != nil }
                })
                asker.join()
                #expect(pending.withLock { $0?.status } == .granted)
                #expect(vm2.window?.probeInChild(iova) == .accessible)

                // Refusals name the rule and are counted; VM1 is untouched.
                let outside = vm2.translate(barOffset: 64 * GiB - 4096, length: 8192, access: .read)
                #expect(outside?.status == .refused)
                #expect(outside?.reason.contains("[bar-bounds]") == true)
                let lowIOVA = vm2.translate(barOffset: 0x1000, length: 4096, access: .read)
                #expect(lowIOVA?.status == .refused)
                #expect(lowIOVA?.reason.contains("[dma-window]") == true)
                let write = vm2.translate(barOffset: iova.rawValue, length: 4096, access: .write)
                #expect(write?.status == .refused)
                #expect(write?.reason.contains("[permission]") == true)
                let stats = running.bridge.statistics
                #expect(stats.peer.refusals["bar-bounds"] == 1 && stats.peer.refusals["dma-window"] == 1 && stats.peer.refusals["permission"] == 1)
                #expect(stats.peer.translationsGranted == 1)
                #expect(try vm1.frontend.getU64(.getFeatures) != 0)
            }
        }

        @Test func maliciousVM2InIdentityModeIsRefusedAndTrafficGoesOn() throws {
            try withTwoGuests("evil-vm2", mode: .identity) { running, vm1, vm2 in
                #expect(vm2.translate(barOffset: 64 * GiB, length: 4096, access: .read)?.status == .refused)
                #expect(vm2.translate(barOffset: 512 * MiB, length: 4096, access: .read)?.reason.contains("[not-mapped]") == true)
                #expect(vm2.translate(barOffset: UInt64.max - 10, length: 4096, access: .read)?.reason.contains("[wrap-around]") == true)
                #expect(running.bridge.statistics.peer.translationsRefused == 3)
                let result = try vm1.runTraffic(count: 50, sizes: [1500])
                #expect(result.completed)
            }
        }

        @Test func hostileDescriptorsFromVM1AreRefusedByTheDevice() throws {
            try withTwoGuests("evil-desc", mode: .identity) { running, vm1, vm2 in
                let tx = vm1.queues[1]
                // Past the BAR, in an unmapped hole, and a loop is impossible to build here; two bad ones:
                tx.add([.init(address: 64 * GiB - 16, length: 64, deviceWritable: false)])
                tx.add([.init(address: 300 * MiB, length: 64, deviceWritable: false)])
                // A TX descriptor that claims to be device-writable is malformed for TX.
                tx.add([.init(address: 0x80_0000, length: 64, deviceWritable: true)])
                try tx.kick.signal()
                #expect(pollUntil { vm2.statistics.descriptorsRefused >= 3 })
                #expect(vm2.statistics.packetsVerified == 0)
                #expect(try vm1.frontend.getU64(.getFeatures) != 0)
            }
        }

        @Test func aLateVM2GetsTheFullStateAndASecondOneIsTurnedAway() throws {
            let running = try RunningBridge("late", mode: .identity)
            defer { running.stop() }
            let vm1 = try EmulatedVM1(socketPath: running.path)
            defer { vm1.disconnect() }
            try vm1.start()
            let vm2 = try connectVM2(running)
            defer { vm2.stop() }
            // The state follows HELLO's reply: wait for it, do not race it.
            #expect(pollUntil { vm2.statistics.bytesMapped == 256 * MiB }, "\(vm2.statistics)")
            let second = try EmulatedVM2(peerSocketPath: running.peerPath)
            #expect(pollUntil { second.isFinished })
            #expect(second.statistics.disconnectReason?.contains("already has a VM2") == true, "\(String(describing: second.statistics.disconnectReason))")
            second.stop()
            let result = try vm1.runTraffic(count: 30, sizes: [512])
            #expect(result.completed)
        }

        @Test func vm2RestartsDuringTrafficAndVM1ReconnectsLeakNothing() throws {
            let running = try RunningBridge("restarts", mode: .identity)
            defer { running.stop() }
            // Warm-up pass so lazily created runtime fds are not counted.
            do {
                let vm2 = try connectVM2(running)
                let vm1 = try EmulatedVM1(socketPath: running.path)
                try vm1.start()
                _ = try vm1.runTraffic(count: 10, sizes: [64])
                vm1.disconnect()
                vm2.stop()
                running.waitForSessions(1)
                // The daemon closes a departed VM2's socket when its peer thread
                // sees it go: count only after that.
                #expect(pollUntil { !running.bridge.statistics.peer.connected })
            }
            let before = settledOpenFileDescriptorCount()
            do {
                let vm1 = try EmulatedVM1(socketPath: running.path)
                try vm1.start()
                var delivered = 0
                for round in 0..<50 {
                    let vm2 = try connectVM2(running)
                    let r = try vm1.runTraffic(count: 8, sizes: [64, 1500])
                    delivered += r.verified
                    #expect(r.completed, "round \(round): \(r)")
                    vm2.stop() // killed: no goodbye
                    #expect(pollUntil { !running.bridge.statistics.peer.connected })
                }
                #expect(delivered == 400)
                #expect(running.bridge.statistics.peer.connections == 51)
                vm1.disconnect()
                running.waitForSessions(2)
            }
            do {
                // VM1 reconnects and works with a fresh VM2.
                let again = try EmulatedVM1(socketPath: running.path)
                try again.start()
                let vm2 = try connectVM2(running)
                #expect(try again.runTraffic(count: 20, sizes: [256]).completed)
                vm2.stop()
                again.disconnect()
                running.waitForSessions(3)
                #expect(pollUntil { !running.bridge.statistics.peer.connected })
            }
            #expect(settledOpenFileDescriptorCount() == before)
        }
    }
}
