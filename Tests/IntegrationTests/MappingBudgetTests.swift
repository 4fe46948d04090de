import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import Testing
import TestSupport
import VhostUser

extension Integration {
    @Suite struct MappingBudgets {
        /// Maps `count` single pages that cannot coalesce (every other GPA
        /// page); returns how many VM1 got acked.
        private func fill(_ vm1: EmulatedVM1, count: Int, from gpa: UInt64 = 0x200_0000) throws -> Int {
            let iommu = try #require(vm1.iommu)
            var granted = 0
            for i in 0..<count {
                do {
                    _ = try iommu.map(GuestPhysicalAddress(gpa + UInt64(i) * 0x2000), length: 0x1000, permission: .read, eager: true)
                    granted += 1
                } catch {}
            }
            return granted
        }

        /// Two VM1s that map as much as they can cannot take the third
        /// bridge's share of the process's mappings (vm.max_map_count is per
        /// process: without a shared budget they would make every other
        /// bridge's mmaps fail).
        @Test func twoBridgesCannotStarveAThird() throws {
            let budget = MappingBudget(total: 400) // 3 bridges: 100 each, 100 kept for a fourth
            let bridges = try ["a", "b", "c"].map { try RunningBridge("starve-\($0)", mode: .iommu, mappingBudget: budget) }
            defer { for b in bridges { b.stop() } }
            #expect(budget.guaranteedShare == 100)
            let vm1s = try bridges.map { try EmulatedVM1(socketPath: $0.path, configuration: vm1Config(iommu: true)) }
            defer { for v in vm1s { v.disconnect() } }
            for v in vm1s { try v.start() }

            let grantedA = try fill(vm1s[0], count: 250)
            let grantedB = try fill(vm1s[1], count: 250)
            #expect(grantedA < 250 && grantedB < 250, "a: \(grantedA), b: \(grantedB)")
            #expect(pollUntil { bridges[0].bridge.statistics.refusals["mapping-budget"] == 250 - grantedA })
            #expect(budget.used <= budget.total - budget.guaranteedShare, "the newcomer reserve is untouched")

            // The third bridge still gets its whole share.
            let heldC = try #require(bridges[2].bridge.statistics.session).mappings
            let grantedC = try fill(vm1s[2], count: 100 - heldC)
            #expect(grantedC == 100 - heldC)
            #expect(budget.used <= budget.total)
            // Past its share, it is refused like the others.
            #expect(try fill(vm1s[2], count: 1, from: 0x400_0000) == 0)

            // A VM1 that leaves gives its mappings back, but its bridge keeps
            // its share: A still cannot grow into it, and B's next VM1 gets it all.
            let usedBefore = budget.used
            vm1s[1].disconnect()
            bridges[1].waitForSessions(1)
            #expect(pollUntil { budget.used <= usedBefore - grantedB })
            #expect(try fill(vm1s[0], count: 10, from: 0x600_0000) == 0)
            let again = try EmulatedVM1(socketPath: bridges[1].path, configuration: vm1Config(iommu: true))
            defer { again.disconnect() }
            try again.start()
            let heldB = try #require(bridges[1].bridge.statistics.session).mappings
            #expect(try fill(again, count: 100 - heldB) == 100 - heldB)
        }
    }
}
