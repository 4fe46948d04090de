import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import Testing
import TestSupport

extension Interop {
    /// VM1 live-migrates: Debian's cloud kernel under QEMU TCG on bridge A
    /// with VM2 A is migrated by QEMU (`migrate` to a second QEMU started
    /// with `-incoming`) to bridge B with VM2 B, while the guest sends its
    /// datagrams and VM2 sends every one back. VM2 A logs every page it
    /// writes into the log QEMU gave, QEMU finishes the migration, VM2 B
    /// carries the traffic after the switch, and the guest finds every
    /// datagram that came back intact.
    @Suite struct LiveMigrationSuite {
        /// The guest kernel under QEMU TCG sometimes breaks on the destination
        /// after the switch-over, whatever the back end: "scheduling while
        /// atomic" in swapper, a NULL dereference, "softirq: huh" (a
        /// preempt count off after NET_RX), soft lockups. DPDK's vhost back
        /// end, with no vhost-pci code involved, did it in 1 of 3 runs of
        /// `vhost-pci-bench migrate --viommu none` (2026-12-07: "watchdog:
        /// BUG: soft lockup" and no report); the bridge's first attempt did it
        /// in 3 of 7 CI runs. Such a run reports nothing and proves nothing
        /// either way: it is said aloud, with the kernel's line, and made
        /// again, up to three attempts; a run without such a line, or a third
        /// one with it, fails.
        private func migrates(iommu: Bool) throws {
            for attempt in 1...3 {
                if try migrates(iommu: iommu, attempt: attempt, mayRetry: attempt < 3) { return }
            }
        }

        /// What the guest kernel prints when it broke by itself.
        static let guestKernelFailures = ["BUG: ", "Kernel panic", "softirq: huh", "Oops: ", "WARNING: CPU"]

        /// One migration; false when the guest kernel crashed and `mayRetry`.
        private func migrates(iommu: Bool, attempt: Int, mayRetry: Bool) throws -> Bool {
            let name = (iommu ? "mig-iommu" : "mig") + (attempt > 1 ? "\(attempt)" : "")
            let dir = "/tmp/vpb-interop-\(getpid())-\(name)"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let mode: BridgeMode = iommu ? .iommu : .identity
            let a = try InteropBridge(name + "-a", mode: mode)
            defer { a.stop() }
            let b = try InteropBridge(name + "-b", mode: mode)
            defer { b.stop() }
            var config = VM2Configuration()
            config.reflectsGuestDatagrams = true
            let vm2a = try EmulatedVM2(peerSocketPath: a.peerPath, configuration: config)
            defer { vm2a.stop() }
            let vm2b = try EmulatedVM2(peerSocketPath: b.peerPath, configuration: config)
            defer { vm2b.stop() }
            #expect(pollUntil { vm2a.statistics.ready && vm2b.statistics.ready })
            var migration = LinuxGuest.Migration(iommu: iommu)
            migration.seconds = 12
            migration.migrateAfter = 3
            let outcome = try migration.run(source: a.path, destination: b.path, directory: dir)
            let log = (try? String(contentsOfFile: "\(dir)/qemu-b.log", encoding: .utf8)) ?? ""
            if mayRetry, outcome.guest == nil,
               let bug = log.split(separator: "\n").first(where: { line in Self.guestKernelFailures.contains { line.contains($0) } }) {
                print("\(name): the guest kernel crashed on the destination (\(bug.trimmingCharacters(in: .whitespaces))): migrating once more")
                return false
            }
            #expect(outcome.status == "completed", "QEMU: \(outcome.status); source: \((try? String(contentsOfFile: "\(dir)/qemu-a.log", encoding: .utf8))?.suffix(1200) ?? "")")
            #expect(outcome.destinationRunning)
            let report = try #require(outcome.guest, "no report on the destination: \(log.suffix(1500))")
            let sa = vm2a.statistics, sb = vm2b.statistics
            print("\(name): migration \(outcome.totalTimeMilliseconds) ms, downtime \(outcome.downtimeMilliseconds) ms, "
                  + "\(Int(outcome.ramTransferredBytes) >> 20) MiB; guest sent \(report.sent), got back \(report.valid) valid, "
                  + "\(report.corrupt) corrupt, \(report.other) other, missing \(report.missing), longest gap \(report.longestGapSeconds) s; "
                  + "VM2 A \(sa.packetsVerified) verified, \(sa.writesLogged) writes logged, \(sa.writesUnlogged) unlogged; VM2 B \(sb.packetsVerified) verified")
            #expect(report.valid > 0 && report.corrupt == 0 && report.other == 0, "every datagram that came back is intact")
            #expect(report.dmarFaults == 0)
            // VM2 A logged while QEMU migrated, every write of it.
            #expect(sa.logsApplied >= 1 && sa.writesLogged > 0 && sa.writesUnlogged == 0, "\(sa)")
            #expect(!sa.logging, "QEMU's source stopped logging when it let the device go")
            // VM2 B carried the traffic after the switch, and the guest got it.
            #expect(sb.packetsVerified > 0 && sb.packetsSent > 0, "\(sb)")
            #expect(report.sequenceLast > sa.packetsVerified, "datagrams the guest sent after the switch came back")
            #expect(sa.packetsCorrupt == 0 && sb.packetsCorrupt == 0 && sa.descriptorsRefused == 0 && sb.descriptorsRefused == 0)
            #expect(a.bridge.statistics.refusals.isEmpty && b.bridge.statistics.refusals.isEmpty,
                    "refused: A \(a.bridge.statistics.refusals), B \(b.bridge.statistics.refusals)")
            return true
        }

        @Test(.enabled(if: Peers.hasLinuxGuest, Comment(rawValue: Peers.linuxGuestMissing)))
        func aLinuxGuestLiveMigratesBetweenBridges() throws { try migrates(iommu: false) }

        @Test(.enabled(if: Peers.hasLinuxGuest, Comment(rawValue: Peers.linuxGuestMissing)))
        func aLinuxGuestUnderIntelIOMMUStrictLiveMigratesBetweenBridges() throws { try migrates(iommu: true) }
    }
}
