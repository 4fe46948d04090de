import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import Testing
import TestSupport
import VhostUser

/// The kernel's pool of default-size huge pages. Tests that need real
/// hugetlbfs memory grow it (as root) and give it back.
enum HugePagePool {
    static let path = "/proc/sys/vm/nr_hugepages"
    static var count: Int? {
        (try? String(contentsOfFile: path, encoding: .utf8)).flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }
    static func set(_ n: Int) -> Bool {
        (try? "\(n)\n".write(toFile: path, atomically: false, encoding: .utf8)) != nil && count == n
    }
    /// Root, a writable pool, and an MFD_HUGETLB memfd that really gets pages.
    static let available: Bool = {
        guard getuid() == 0, let before = count, set(before + 2) else { return false }
        defer { _ = set(before) }
        return (try? Memfd(name: "probe", size: 2 << 20, hugePages: true)) != nil
    }()
    /// Runs `body` with `pages` more huge pages reserved, then restores the pool.
    static func with(_ pages: Int, _ body: () throws -> Void) throws {
        let before = try #require(count)
        try #require(set(before + pages), "cannot reserve \(pages) huge pages")
        defer { _ = set(before) }
        try body()
    }
}

extension Integration {
    @Suite(.enabled(if: HugePagePool.available, "needs root and hugetlbfs (vm.nr_hugepages)"))
    struct HugePages {
        /// Identity mode with VM1's RAM in 2 MiB huge pages: every region is
        /// mapped whole, in the daemon and in VM2, and traffic flows.
        @Test func identityTrafficOverHugePageRAM() throws {
            try HugePagePool.with(24) {
                let running = try RunningBridge("huge-id", mode: .identity)
                defer { running.stop() }
                let vm2 = try connectVM2(running)
                defer { vm2.stop() }
                var c = VM1Configuration()
                c.ramSize = 32 << 20
                c.hugePageRAM = true
                let vm1 = try EmulatedVM1(socketPath: running.path, configuration: c)
                defer { vm1.disconnect() }
                #expect(vm1.ram.memfd.fd.hugePageSize() == 2 << 20)
                try vm1.start()
                let result = try vm1.runTraffic(count: 40, sizes: [64, 1500, 9000])
                #expect(result.completed && result.verified == 40, "\(result)")
                #expect(vm2.statistics.packetsCorrupt == 0 && vm2.statistics.descriptorsRefused == 0)
            }
        }

        /// iommu mode over hugetlbfs memory: a 4 KiB update is refused with
        /// its rule, a whole huge page is granted to the daemon's window and
        /// VM2's, and a 4 KiB invalidate revokes the whole huge page in both
        /// before VM1's ack.
        @Test func iommuGrantsAndRevokesWholeHugePages() throws {
            try HugePagePool.with(8) {
                let running = try RunningBridge("huge-iommu", mode: .iommu)
                defer { running.stop() }
                let vm2 = try connectVM2(running)
                defer { vm2.stop() }
                let huge: UInt64 = 2 << 20
                let ram = try GuestRAM(size: 8 << 20, hugePages: true)
                let f = try VhostUserFrontend(connectingTo: running.path)
                defer { f.close() }
                try f.setProtocolFeatures([.replyAck])
                try f.send(.setOwner)
                try f.send(.setFeatures(FeatureBit.version1 | FeatureBit.protocolFeatures | FeatureBit.iommuPlatform))
                try f.send(.setMemTable([ram.region]), fds: [ram.memfd.fd.rawValue], ack: true)
                let iova: UInt64 = 1 << 32
                func update(_ at: UInt64, _ size: UInt64, gpa: UInt64) throws {
                    try f.send(.iotlb(IOTLBMessage(iova: at, size: size, userAddress: ram.userAddress(of: GuestPhysicalAddress(gpa)).rawValue,
                                                   permission: .readWrite, type: .update)), ack: true)
                }
                #expect(throws: FrontendError.self) { try update(iova, 4096, gpa: huge) }
                #expect(pollUntil { running.bridge.statistics.refusals["huge-page"] == 1 })
                try update(iova, huge, gpa: huge)
                #expect(running.bridge.window.probeInChild(BusAddress(iova + huge - 4096)) == .accessible)
                #expect(pollUntil { vm2.window?.probeInChild(BusAddress(iova)) == .accessible })
                #expect(ram.write([7, 7], at: GuestPhysicalAddress(huge + 100)))
                #expect(vm2.window?.withBytes(at: BusAddress(iova + 100), length: 2) { Array($0) } == [7, 7])
                try f.send(.iotlb(IOTLBMessage(iova: iova + 8192, size: 4096, userAddress: 0, permission: .none, type: .invalidate)), ack: true)
                for at in [iova, iova + huge - 4096] {
                    #expect(running.bridge.window.probeInChild(BusAddress(at)) == .faulted)
                    #expect(vm2.window?.probeInChild(BusAddress(at)) == .faulted)
                }
            }
        }
    }
}
