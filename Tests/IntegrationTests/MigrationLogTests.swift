import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import PeerProtocol
import Testing
import TestSupport
import VhostUser

/// VM1's live migration, below QEMU: an emulated VM1 turns dirty logging on
/// as QEMU does, traffic runs, and every page VM2 wrote is marked in VM1's
/// log — at its guest-physical page, through a vIOMMU too — and nothing
/// else is; logs VM1 cannot back and VM2s that cannot log fail the
/// migration, never the session.
extension Integration {
    @Suite struct MigrationLog {
        /// The pages of `[gpa, gpa + length)`.
        private func pages(_ gpa: UInt64, _ length: UInt64) -> Set<UInt64> {
            guard let r = DirtyLog.pages(GuestPhysicalAddress(gpa), length: length) else { return [] }
            return Set(r)
        }

        @Test(arguments: [BridgeMode.identity, .iommu])
        func everyPageVM2WritesIsMarkedAndNoOther(mode: BridgeMode) throws {
            let before = settledOpenFileDescriptorCount()
            do {
                try withTwoGuests("log-\(mode)", mode: mode) { running, vm1, vm2 in
                    let ramPages = vm1.configuration.ramSize / DirtyLog.pageSize
                    // Twice the log VM1's memory needs: a page marked past its memory would show.
                    let log = try VM1DirtyLog(ramSize: vm1.configuration.ramSize, size: 2 * DirtyLog.bytesNeeded(toCover: vm1.configuration.ramSize))
                    try vm1.startLogging(log)
                    #expect(vm2.statistics.logging && vm2.statistics.logsApplied == 1, "VM2 logs before VM1's LOG_ALL is acked")
                    #expect(pollUntil { running.bridge.statistics.session?.dirtyLogging == true })

                    var expected: Set<UInt64> = []
                    for q in vm1.queues { expected.formUnion(pages(q.usedGPA.rawValue, VringLayout.usedRingSize(UInt32(q.size)))) }
                    var rxBuffers = 0
                    let result = try vm1.runTraffic(count: 48, sizes: [64, 1500, 9000], written: { gpa, length in
                        expected.formUnion(pages(gpa.rawValue, UInt64(length)))
                        rxBuffers += 1
                    })
                    #expect(result.completed && result.corrupt == 0, "\(result)")
                    #expect(rxBuffers == 48)
                    let marked = log.markedPages
                    #expect(expected.isSubset(of: marked), "pages VM2 wrote but did not mark: \(expected.subtracting(marked).sorted().prefix(8))")
                    #expect(marked.isSubset(of: expected), "pages marked that VM2 did not write: \(marked.subtracting(expected).sorted().prefix(8))")
                    #expect(marked.allSatisfy { $0 < ramPages }, "a page outside VM1's memory is marked")
                    #expect(pollUntil { vm2.statistics.writesLogged > 0 })
                    #expect(vm2.statistics.writesUnlogged == 0)

                    // Logging off: VM2 stops marking, the session goes on.
                    try vm1.stopLogging()
                    #expect(!vm2.statistics.logging)
                    let after = try vm1.runTraffic(count: 16, sizes: [64])
                    #expect(after.completed)
                    #expect(log.markedPages == marked, "nothing is marked while logging is off")
                }
            }
            #expect(pollUntil { openFileDescriptorCount() == before }, "fds: \(before) before, \(openFileDescriptorCount()) after")
        }

        /// QEMU starting the device while it migrates VM1 (a guest that
        /// resets its NIC, a reconnect): LOG_ALL comes first, the rings next
        /// and SET_LOG_BASE last. The rings must not reach VM2 before the
        /// log: what VM2 writes from the first frame on is marked.
        @Test(arguments: [BridgeMode.identity, .iommu])
        func aDeviceStartedDuringAMigrationLogsFromItsFirstWrite(mode: BridgeMode) throws {
            try withTwoGuests("log-restart-\(mode)", mode: mode) { running, vm1, vm2 in
                let warm = try vm1.runTraffic(count: 8, sizes: [64])
                #expect(warm.completed)
                let bases = try vm1.stopDevice()
                let log = try VM1DirtyLog(ramSize: vm1.configuration.ramSize)
                try vm1.restartDuringMigration(at: bases, log: nil)
                #expect(pollUntil { running.bridge.statistics.session?.dirtyLogging == true })
                // Frames and receive buffers wait in the rings VM2 was not given yet.
                try vm1.postReceiveBuffers(16)
                for n in 0..<16 { try vm1.send(TestPacket.make(sequence: UInt32(n), size: 1500)) }
                _ = pollUntil(seconds: 1, everyMilliseconds: 10) { vm2.statistics.packetsVerified > warm.sent } // a bug would show here
                #expect(vm2.statistics.packetsVerified == warm.sent, "VM2 served a ring before it had the log")
                try vm1.frontend.send(.setLogBase(LogArea(size: log.size, offset: 0)), fds: [log.memfd.fd.rawValue])
                #expect(pollUntil { vm2.statistics.logging })
                var expected: Set<UInt64> = []
                for q in vm1.queues { expected.formUnion(pages(q.usedGPA.rawValue, VringLayout.usedRingSize(UInt32(q.size)))) }
                var got = 0
                #expect(pollUntil {
                    for (gpa, length) in (try? vm1.reclaim(queue: 0)) ?? [] { expected.formUnion(pages(gpa.rawValue, UInt64(length))); got += 1 }
                    _ = try? vm1.reclaim(queue: 1)
                    try? vm1.settleMisses()
                    return got == 16
                }, "VM2 echoed \(got) of 16")
                let marked = log.markedPages
                #expect(expected.isSubset(of: marked), "written but not marked: \(expected.subtracting(marked).sorted().prefix(8))")
                #expect(vm2.statistics.writesUnlogged == 0)
            }
        }

        /// A log fd the daemon cannot trust: SET_LOG_BASE is still answered,
        /// LOG_ALL is refused (the migration fails), the session and its
        /// traffic go on, and nothing of the log stays open.
        @Test func logsVM1CannotBackAreRefusedAndTheSessionGoesOn() throws {
            let before = settledOpenFileDescriptorCount()
            do {
                try withTwoGuests("log-hostile", mode: .identity) { running, vm1, vm2 in
                    let f = vm1.frontend
                    let logAll = vm1.ackedFeatures | FeatureBit.vhostLogAll
                    func refusedLogAll(_ fd: Int32, size: UInt64, sourceLocation: SourceLocation = #_sourceLocation) {
                        do {
                            try f.send(.setLogBase(LogArea(size: size, offset: 0)), fds: [fd]) // answered: VM1 reads the reply
                            try f.send(.setFeatures(logAll), ack: true)
                            Issue.record("LOG_ALL was acked", sourceLocation: sourceLocation)
                        } catch FrontendError.nack(let code) {
                            #expect(code == .setFeatures, sourceLocation: sourceLocation)
                        } catch {
                            Issue.record("\(error)", sourceLocation: sourceLocation)
                        }
                    }
                    var ends: [Int32] = [0, 0]
                    guard pipe(&ends) == 0 else { throw SystemCallError("pipe", errno: .init(rawValue: errno)) }
                    defer { close(ends[0]); close(ends[1]) }
                    refusedLogAll(ends[0], size: 8192)
                    let unsealed = try Memfd(name: "log", size: 8192)
                    defer { try? unsealed.fd.close() }
                    refusedLogAll(unsealed.fd.rawValue, size: 8192)
                    let small = try VM1DirtyLog(ramSize: 0, size: 4096) // 128 MiB of pages for 256 MiB of RAM
                    refusedLogAll(small.memfd.fd.rawValue, size: 4096)
                    #expect(pollUntil { running.bridge.statistics.refusals["dirty-log", default: 0] >= 3 })
                    #expect(pollUntil { running.bridge.statistics.refusals["fd-kind", default: 0] >= 1 })
                    #expect(!vm2.statistics.logging && vm2.statistics.logsApplied == 0)
                    let result = try vm1.runTraffic(count: 16, sizes: [64, 1500])
                    #expect(result.completed, "the session survives every refused log")
                }
            }
            #expect(pollUntil { openFileDescriptorCount() == before }, "fds: \(before) before, \(openFileDescriptorCount()) after")
        }

        /// A VM2 that cannot log: LOG_ALL is refused while it is attached;
        /// while VM1 logs, such a VM2 is refused at HELLO and one that can
        /// log gets the log in its replay.
        @Test func aVM2ThatCannotLogKeepsVM1FromMigratingAndIsRefusedWhileItDoes() throws {
            var old = VM2Configuration()
            old.logsDirtyPages = false
            try withTwoGuests("log-old-vm2", mode: .identity, vm2: old) { running, vm1, vm2 in
                let log = try VM1DirtyLog(ramSize: vm1.configuration.ramSize)
                do {
                    try vm1.startLogging(log)
                    Issue.record("LOG_ALL was acked with a VM2 that cannot log")
                } catch FrontendError.nack(let code) {
                    #expect(code == .setFeatures)
                }
                #expect(pollUntil { running.bridge.statistics.refusals["dirty-log", default: 0] == 1 })
                #expect(running.bridge.statistics.session?.dirtyLogging == false)
                // Without that VM2 the migration may start: nobody writes VM1's memory.
                vm2.stop()
                #expect(pollUntil { !running.bridge.statistics.peer.connected })
                try vm1.startLogging(log)
                #expect(pollUntil { running.bridge.statistics.session?.dirtyLogging == true })
                // An old VM2 is turned away while VM1 migrates...
                let late = try EmulatedVM2(peerSocketPath: running.peerPath, configuration: old)
                defer { late.stop() }
                #expect(pollUntil { late.statistics.disconnectReason != nil || late.statistics.lastError != nil })
                #expect("\(late.statistics.disconnectReason ?? "") \(late.statistics.lastError ?? "")".contains("live-migrating"))
                #expect(!late.statistics.ready)
                // ... a new one logs before it serves a ring, and carries the traffic.
                let able = try connectVM2(running)
                defer { able.stop() }
                #expect(able.statistics.logging)
                let result = try vm1.runTraffic(count: 16, sizes: [1500])
                #expect(result.completed)
                #expect(log.markedPages.count > 2, "the replayed VM2 marks what it writes")
            }
        }
    }
}
