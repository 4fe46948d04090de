import BridgeCore
import DeviceEngine
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import PeerProtocol
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// An identity bridge, an emulated VM2 (`vm2`) and an emulated VM1 whose
/// RAM is not sealed against shrinking (QEMU `seal=off`), started.
func withUnsealedVM1(_ name: String, vm2 configuration: VM2Configuration,
                     _ body: (RunningBridge, EmulatedVM1, EmulatedVM2) throws -> Void) throws {
    let running = try RunningBridge(name, mode: .identity)
    defer { running.stop() }
    let vm2 = try connectVM2(running, configuration)
    defer { vm2.stop() }
    var c1 = vm1Config(iommu: false)
    c1.sealedRAM = false
    let vm1 = try EmulatedVM1(socketPath: running.path, configuration: c1)
    defer { vm1.disconnect() }
    try vm1.start()
    try body(running, vm1, vm2)
}

/// Issue 20, holes 5 and 6: what a read-only grant means for a memfd, and
/// what VM2 gets of memory VM1 can truncate.
extension Integration {
    @Suite struct MemoryTrust {
        /// Hole 5. A memfd is created mode 0777: whoever holds its read-only
        /// fd could reopen it read-write through /proc/self/fd. The daemon
        /// takes group/other write off a nameless file it adopts, so a VM2
        /// VMM of another uid cannot (nor can it chmod a file it does not
        /// own); one running as the file's owner still can, as documented.
        @Test(arguments: [(vmmUID: UInt32(65533), expected: ChildPeer.ReadOnlyProbe.refused),
                          (vmmUID: UInt32(65534), expected: ChildPeer.ReadOnlyProbe.reopened)])
        func aReadOnlyGrantHoldsAgainstAnotherUidOnly(vmmUID: UInt32, expected: ChildPeer.ReadOnlyProbe) throws {
            let owner: UInt32 = 65534 // VM1's VMM, as QEMU runs under its own user
            let running = try RunningBridge("ro-uid-\(vmmUID)", mode: .iommu) { $0.vm2Access = PeerAccess(mode: 0o666) }
            defer { running.stop() }
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: true))
            defer { vm1.disconnect() }
            #expect(fchown(vm1.ram.memfd.fd.rawValue, owner, owner) == 0)
            #expect(try vm1.ram.memfd.fd.ownership().mode == 0o777, "memfd_create makes mode 0777")
            try vm1.start()
            let iommu = try #require(vm1.iommu)
            let gpa = GuestPhysicalAddress(0xa0_0000)
            _ = try iommu.map(gpa, length: 4096, permission: .read, eager: true)
            #expect(try vm1.ram.memfd.fd.ownership().mode == 0o755, "the daemon took group/other write off VM1's memfd")

            let hello = PeerCodec.encode(.hello(PeerHello(features: [], deviceFeatures: NetDevice.served)))
            let vmm = try ChildPeer.spawnReadOnlyProber(connectingTo: running.peerPath, uid: vmmUID, gid: vmmUID, hello: hello,
                                                        marker: 0x5a)
            let end = vmm.wait()
            #expect(end == .exited(expected.rawValue), "VMM as uid \(vmmUID) (file owner \(owner)): \(end)")
            let written = vm1.ram.read(1, at: gpa)?.first
            #expect((written == 0x5a) == (expected == .reopened), "VM1's byte under the read-only grant: \(String(describing: written))")
        }

        /// Hole 6, `refuse`: memory VM1 can truncate never reaches VM2; the
        /// rule is counted and VM2's translation is refused with the reason.
        @Test func refuseSendsNoMapForAnUnsealedRegion() throws {
            let running = try RunningBridge("unsealed-refuse", mode: .iommu) { $0.unsealedRegions = .refuse }
            defer { running.stop() }
            let vm2 = try connectVM2(running)
            defer { vm2.stop() }
            var c1 = vm1Config(iommu: true)
            c1.sealedRAM = false
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: c1)
            defer { vm1.disconnect() }
            try vm1.start()
            let iommu = try #require(vm1.iommu)
            let iova = try iommu.map(GuestPhysicalAddress(0xa0_0000), length: 4096, permission: .readWrite, eager: true)
            #expect(pollUntil { running.bridge.statistics.peer.refusals["unsealed-region", default: 0] > 0 })
            let reply = vm2.translate(barOffset: iova.rawValue, length: 4096, access: .read)
            #expect(reply?.status == .refused && reply?.reason.hasPrefix("[unsealed-region]") == true, "\(String(describing: reply))")
            let s = vm2.statistics
            #expect(s.mapsApplied == 0 && s.bytesMapped == 0, "VM2 was sent unsealed memory: \(s)")
            #expect(running.bridge.statistics.peer.mapsSent == 0)
        }

        /// Hole 6, `mark` (the default): the MAP carries the unsealed flag to
        /// a VM2 that negotiated `unsealedMaps`, never to one that did not.
        @Test(arguments: [true, false])
        func markFlagsUnsealedMapsOnlyForAVM2ThatGuards(guards: Bool) throws {
            var c2 = VM2Configuration()
            c2.guardsUnsealedMemory = guards
            try withUnsealedVM1("unsealed-mark-\(guards)", vm2: c2) { running, vm1, vm2 in
            #expect(running.bridge.settings.unsealedRegions == .mark)
            if guards {
                #expect(pollUntil { vm2.statistics.unsealedMapsApplied > 0 })
                #expect(vm2.statistics.mapsApplied == vm2.statistics.unsealedMapsApplied)
                let result = try vm1.runTraffic(count: 20, sizes: [64, 1500])
                #expect(result.completed, "\(result)")
                #expect(vm2.statistics.faultsAbsorbed == 0)
            } else {
                #expect(pollUntil { running.bridge.statistics.peer.refusals["unsealed-region", default: 0] > 0 })
                #expect(vm2.statistics.mapsApplied == 0)
            }
            }
        }

        /// Hole 6: VM1 truncates its unsealed memory under a polling VM2.
        /// VM2's engine takes the SIGBUS in its guard (not the process),
        /// withdraws the unsealed grants, and takes the queue whose ring was
        /// there out of service; the device thread lives on, and so does the
        /// daemon. (Without the guard this test dies of SIGBUS.)
        @Test func aTruncateDoesNotKillVM2() throws {
            var c2 = VM2Configuration()
            c2.pollFor = .seconds(60) // VM2 reads VM1's avail rings all the time
            try withUnsealedVM1("unsealed-trunc", vm2: c2) { running, vm1, vm2 in
            let result = try vm1.runTraffic(count: 20, sizes: [64])
            #expect(result.completed, "\(result)")
            #expect(vm2.statistics.unsealedMapsApplied > 0)
            // VM1 must not touch its own RAM while it is truncated: only VM2 does.
            try vm1.ram.memfd.resize(to: 0)
            let absorbed = pollUntil { vm2.statistics.faultsAbsorbed > 0 }
            try vm1.ram.memfd.resize(to: vm1.ram.size)
            #expect(absorbed, "VM2 never touched the truncated memory")
            // The zeros it read took the queue out of service (a ring area
            // withdrawn, or an avail index the zeros made impossible).
            #expect(pollUntil { vm2.statistics.descriptorsRefused > 0 }, "\(vm2.statistics)")
            // Withdrawn: a second truncate is never touched again.
            let faults = vm2.statistics.faultsAbsorbed
            try vm1.ram.memfd.resize(to: 0)
            usleep(300_000)
            try vm1.ram.memfd.resize(to: vm1.ram.size)
            #expect(vm2.statistics.faultsAbsorbed == faults)
            #expect(!vm2.isFinished && vm2.statistics.connected, "\(String(describing: vm2.statistics.disconnectReason))")
            #expect(running.bridge.statistics.peer.connected)
            }
        }
    }
}
