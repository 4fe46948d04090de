import BridgeCore
import Testing
import TestSupport
@testable import VhostUser

/// Dirty-page logging (VM1's live migration) in the pure session: which log,
/// on or off, and every way a log is refused.
@Suite struct LoggingSessionTests {
    /// 256 MiB of RAM: 65536 pages, 8 KiB of log.
    static let logBytes: UInt64 = 8192
    static func logFile(size: UInt64 = logBytes, kind: FileKind = .regularFile, sealed: Bool = true) -> [ReceivedFile] {
        [ReceivedFile(index: 0, size: size, kind: kind, sealedAgainstShrinking: sealed)]
    }
    static let features = FeatureBit.version1 | FeatureBit.protocolFeatures

    private func ready(_ mode: BridgeMode = .identity) -> BackendSession {
        var s = makeSession(mode)
        s.negotiateLikeQEMU(iommu: mode != .identity)
        return s
    }

    private func logBaseReplied(_ effects: [SessionEffect]) -> Bool {
        effects.contains {
            switch $0 {
            case .reply(let bytes): bytes == BackendSession.logBaseReply
            case .deviceLog(_, let reply, _): reply == BackendSession.logBaseReply
            default: false
            }
        }
    }

    @Test func logAllAndLogShmfdAreOffered() {
        var s = makeSession(.identity)
        #expect((replyU64(s.ok(.getFeatures)) ?? 0) & FeatureBit.vhostLogAll != 0)
        #expect(ProtocolFeatures(rawValue: replyU64(s.ok(.getProtocolFeatures)) ?? 0).contains(.logShmfd))
        // A bridge configured without LOG_SHMFD offers no LOG_ALL either.
        var t = try! BackendSession(BackendConfiguration(bridgeName: "t", addressSpace: AddressSpaceConfiguration(barSize: GiB, mode: .identity),
                                                         protocolFeatures: [.mq, .replyAck], queuePairs: 1))
        #expect((replyU64(t.ok(.getFeatures)) ?? 0) & FeatureBit.vhostLogAll == 0)
    }

    @Test func migrationStartsLikeQEMU() {
        var s = ready()
        s.configureRing(0, base: ramUser)
        s.ok(.setVringKick(VringFileRef(index: 0, noFD: false)), files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
        #expect(s.vrings[0].started)
        // SET_LOG_BASE: the fd is taken, the header-only reply goes out, nothing at VM2 yet.
        let base = s.ok(.setLogBase(LogArea(size: Self.logBytes, offset: 0)), files: Self.logFile())
        #expect(base.first == .adoptLogFile(fdIndex: 0, try! DirtyLogArea(size: Self.logBytes, offset: 0, fileSize: Self.logBytes, covering: s.regions)))
        #expect(base.last == .reply(BackendSession.logBaseReply))
        #expect(BackendSession.logBaseReply.count == 12)
        // LOG_ALL: VM2 starts logging before the ack, and a nack is ready in case it cannot.
        let on = s.ok(.setFeatures(Self.features | FeatureBit.vhostLogAll), needReply: true)
        guard case .deviceLog(let area?, let reply?, let refusal?)? = on.first else { Issue.record("no deviceLog: \(on)"); return }
        #expect(area.size == Self.logBytes)
        #expect(reply == VhostUserCodec.encodeReply(to: .setFeatures, .u64(0)))
        #expect(refusal == VhostUserCodec.encodeReply(to: .setFeatures, .u64(1)))
        #expect(on.count == 1, "the ack is the deviceLog's, not a second one")
        #expect(s.logging.on)
        // VRING_F_LOG at the used ring's GPA: the running ring runs on, nothing at VM2.
        let addr = s.ok(.setVringAddr(VringAddress(index: 0, flags: VringAddress.flagLog, descriptor: ramUser, used: ramUser + 0x2000,
                                                   available: ramUser + 0x1000, log: 0x2000)))
        #expect(addr.isEmpty && s.vrings[0].started)
        // A new log while on: VM2 switches before VM1 hears back.
        let resized = s.ok(.setLogBase(LogArea(size: 2 * Self.logBytes, offset: 0)), files: Self.logFile(size: 2 * Self.logBytes))
        #expect(resized.count == 2)
        guard case .deviceLog(let newArea?, let newReply?, nil) = resized.last else { Issue.record("\(resized)"); return }
        #expect(newArea.size == 2 * Self.logBytes && newReply == BackendSession.logBaseReply)
        // Off: VM2 stops, the log is let go.
        let off = s.ok(.setFeatures(Self.features))
        #expect(off == [.deviceLog(nil, reply: nil, refusal: nil), .releaseLogFile])
        #expect(!s.logging.on && s.logging.area == nil)
    }

    /// QEMU's device start during a migration: LOG_ALL, the rings, then
    /// SET_LOG_BASE. The log is pending until then (rings wait for it).
    @Test func logAllBeforeTheLogWaitsForIt() {
        var s = ready()
        let on = s.ok(.setFeatures(Self.features | FeatureBit.vhostLogAll), needReply: true)
        #expect(on == [.awaitLog(reply: VhostUserCodec.encodeReply(to: .setFeatures, .u64(0)),
                                 refusal: VhostUserCodec.encodeReply(to: .setFeatures, .u64(1)))])
        #expect(s.logPending)
        s.configureRing(0, base: ramUser)
        let kick = s.ok(.setVringKick(VringFileRef(index: 0, noFD: false)), files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
        #expect(kick.contains { if case .ringStarted = $0 { true } else { false } }, "the ring starts here; the connection holds it from VM2")
        let base = s.ok(.setLogBase(LogArea(size: Self.logBytes, offset: 0)), files: Self.logFile())
        guard case .deviceLog(let area?, let reply?, nil)? = base.last else { Issue.record("\(base)"); return }
        #expect(area.size == Self.logBytes && reply == BackendSession.logBaseReply)
        #expect(!s.logPending && s.logging.on)
    }

    @Test func logAllNeedsLogShmfd() {
        var s = makeSession(.identity)
        s.ok(.setOwner)
        s.ok(.setProtocolFeatures(ProtocolFeatures.replyAck.rawValue))
        s.refused(.setFeatures(Self.features | FeatureBit.vhostLogAll),
                  .dirtyLog(.setFeatures, reason: "VHOST_F_LOG_ALL needs protocol feature LOG_SHMFD (the log in shared memory), which was not negotiated"))
    }

    @Test func aLogThatNoLongerCoversTheMemoryIsRefusedWhenLoggingStarts() {
        var s = ready()
        s.ok(.setLogBase(LogArea(size: Self.logBytes, offset: 0)), files: Self.logFile())
        let high = RegionDescriptor(guestPhysical: GuestPhysicalAddress(4 * GiB), size: 256 * MiB,
                                    userAddress: FrontendUserAddress(ramUser + 4 * GiB), mmapOffset: 0)
        s.ok(.addMemReg(high), files: [ReceivedFile(index: 0, size: 256 * MiB, kind: .regularFile)]) // not logging yet: fine
        let outcome = s.handle(.setFeatures(Self.features | FeatureBit.vhostLogAll))
        guard case .dirtyLog(.setFeatures, let reason)? = outcome.error else { Issue.record("\(String(describing: outcome.error))"); return }
        #expect(reason.contains("needs"))
        #expect(!s.logging.on)
    }

    @Test func aRefusedLogIsStillAnsweredAndLogAllThenNamesWhy() {
        var s = ready()
        // Not sealed against shrinking: a truncation would fault VM2.
        let outcome = s.handle(.setLogBase(LogArea(size: Self.logBytes, offset: 0)), files: Self.logFile(sealed: false))
        #expect(outcome.error?.rule == "dirty-log")
        #expect(!outcome.closeConnection, "VM1 keeps its connection: only the migration fails")
        #expect(logBaseReplied(outcome.effects), "QEMU waits for SET_LOG_BASE's reply even when it is refused")
        #expect(outcome.effects.contains(.releaseLogFile))
        let logAll = s.handle(.setFeatures(Self.features | FeatureBit.vhostLogAll), needReply: true)
        guard case .dirtyLog(_, let reason)? = logAll.error else { Issue.record("\(String(describing: logAll.error))"); return }
        #expect(reason.contains("the last SET_LOG_BASE was refused") && reason.contains("F_SEAL_SHRINK"))
        #expect(logAll.effects == [.reply(VhostUserCodec.encodeReply(to: .setFeatures, .u64(1)))])
    }

    @Test(arguments: [
        (FileKind.pipe, LoggingSessionTests.logBytes, UInt64(0), true, "fd-kind"),
        (.socket, logBytes, 0, true, "fd-kind"),
        (.regularFile, logBytes, 0, false, "dirty-log"),           // unsealed
        (.regularFile, 4096, 0, true, "dirty-log"),                 // too small for 256 MiB
        (.regularFile, logBytes, 0, true, "dirty-log"),             // the file holds less than size + offset (below)
        (.regularFile, logBytes, UInt64.max - 4, true, "dirty-log"), // offset + size wraps
        (.regularFile, 0, 0, true, "dirty-log"),                    // empty
        (.regularFile, 2 * logBytes + (1 << 20) + 8, 0, true, "dirty-log"), // larger than VM2 should map
    ] as [(FileKind, UInt64, UInt64, Bool, String)])
    func hostileLogs(kind: FileKind, size: UInt64, offset: UInt64, sealed: Bool, rule: String) {
        var s = ready()
        let fileSize = size == Self.logBytes && offset == 0 && kind == .regularFile && sealed ? size - 8 : size
        let outcome = s.handle(.setLogBase(LogArea(size: size, offset: offset)),
                               files: [ReceivedFile(index: 0, size: fileSize, kind: kind, sealedAgainstShrinking: sealed)])
        #expect(outcome.error?.rule == rule, "\(String(describing: outcome.error))")
        #expect(s.logging.area == nil && s.logging.refusal != nil)
        #expect(logBaseReplied(outcome.effects))
        #expect(!outcome.effects.contains { if case .adoptLogFile = $0 { true } else { false } }, "a refused log is never taken")
    }

    /// Without LOG_SHMFD SET_LOG_BASE has no reply of its own: refused as
    /// any request is (a nack with REPLY_ACK, else the connection closes).
    @Test func withoutLogShmfdSetLogBaseIsRefusedWithoutItsReply() {
        var s = makeSession(.identity)
        s.ok(.setOwner)
        s.ok(.setProtocolFeatures(ProtocolFeatures.replyAck.rawValue))
        let outcome = s.handle(.setLogBase(LogArea(size: Self.logBytes, offset: 0)), files: Self.logFile())
        #expect(outcome.error == .protocolFeatureNotNegotiated(.setLogBase, .logShmfd))
        #expect(outcome.closeConnection && outcome.effects.isEmpty)
        let acked = s.handle(.setLogBase(LogArea(size: Self.logBytes, offset: 0)), needReply: true, files: Self.logFile())
        #expect(acked.effects == [.reply(VhostUserCodec.encodeReply(to: .setLogBase, .u64(1)))] && !acked.closeConnection)
        #expect(!s.repliesInherently(.setLogBase))
        var t = ready()
        #expect(t.repliesInherently(.setLogBase))
        // With LOG_SHMFD and NEED_REPLY: the one reply is SET_LOG_BASE's own.
        let one = t.ok(.setLogBase(LogArea(size: Self.logBytes, offset: 0)), needReply: true, files: Self.logFile())
        #expect(one.filter { if case .reply = $0 { true } else { false } } == [.reply(BackendSession.logBaseReply)])
    }

    @Test func aBadReplacementWhileLoggingClosesTheConnection() {
        var s = ready()
        s.ok(.setLogBase(LogArea(size: Self.logBytes, offset: 0)), files: Self.logFile())
        s.ok(.setFeatures(Self.features | FeatureBit.vhostLogAll))
        let outcome = s.handle(.setLogBase(LogArea(size: 16, offset: 0)), files: Self.logFile(size: 16))
        #expect(outcome.error?.rule == "dirty-log")
        #expect(outcome.closeConnection, "VM2 must not go on writing a log VM1 frees: nothing more is written")
        #expect(outcome.effects.first == .deviceLog(nil, reply: nil, refusal: nil))
    }

    @Test func memoryTheLogDoesNotCoverIsRefusedWhileLogging() {
        var s = ready()
        s.ok(.setLogBase(LogArea(size: Self.logBytes, offset: 0)), files: Self.logFile())
        s.ok(.setFeatures(Self.features | FeatureBit.vhostLogAll))
        let high = RegionDescriptor(guestPhysical: GuestPhysicalAddress(4 * GiB), size: 256 * MiB,
                                    userAddress: FrontendUserAddress(ramUser + 4 * GiB), mmapOffset: 0)
        let outcome = s.handle(.addMemReg(high), files: [ReceivedFile(index: 0, size: 256 * MiB, kind: .regularFile)])
        guard case .dirtyLog(.addMemReg, let reason)? = outcome.error else { Issue.record("\(String(describing: outcome.error))"); return }
        #expect(reason.contains("does not cover"))
        #expect(s.regions.count == 1)
        let table = s.handle(.setMemTable([ram, high]), files: [ReceivedFile(index: 0, size: 256 * MiB, kind: .regularFile),
                                                                 ReceivedFile(index: 1, size: 256 * MiB, kind: .regularFile)])
        #expect(table.error?.rule == "dirty-log")
    }

    @Test func theLogAddressMustBeTheUsedRings() {
        var s = ready()
        s.refused(.setVringAddr(VringAddress(index: 0, flags: VringAddress.flagLog, descriptor: ramUser, used: ramUser + 0x2000,
                                             available: ramUser + 0x1000, log: 0x3000)),
                  .dirtyLog(.setVringAddr, reason: "vring 0: log address 0x3000 is not the used ring's own (0x2000); the device logs the used ring where it is"))
        s.refused(.setVringAddr(VringAddress(index: 0, flags: VringAddress.flagLog, descriptor: ramUser, used: 0x10,
                                             available: ramUser + 0x1000, log: 0x10)),
                  .dirtyLog(.setVringAddr, reason: "vring 0: the used ring 0x10 is not in VM1's memory table, so its log address cannot be checked"))
        // With a vIOMMU the used ring's IOVA is its log address.
        var t = ready(.iommu)
        t.ok(.setVringAddr(VringAddress(index: 0, flags: VringAddress.flagLog, descriptor: 1 << 32, used: (1 << 32) + 0x2000,
                                        available: (1 << 32) + 0x1000, log: (1 << 32) + 0x2000)))
    }

    @Test func aDeviceThatCannotLogTakesLogAllBack() {
        var s = ready()
        s.ok(.setLogBase(LogArea(size: Self.logBytes, offset: 0)), files: Self.logFile())
        s.ok(.setFeatures(Self.features | FeatureBit.vhostLogAll))
        s.deviceLogFailed("VM2 did not negotiate dirtyLog")
        #expect(!s.logging.on && s.logging.area == nil, "the log is let go with it: turning on again needs a new one")
        #expect((s.ackedFeatures ?? 0) & FeatureBit.vhostLogAll == 0)
        #expect(s.statistics.refusals["dirty-log"] == 1)
    }

    @Test func teardownAndResetLetTheLogGo() {
        var s = ready()
        s.ok(.setLogBase(LogArea(size: Self.logBytes, offset: 0)), files: Self.logFile())
        s.ok(.setFeatures(Self.features | FeatureBit.vhostLogAll))
        #expect(s.teardown().contains(.releaseLogFile))
        #expect(!s.logging.on && s.logging.area == nil)
        var r = ready()
        r.ok(.setProtocolFeatures((r.configuration.protocolFeatures.union(.resetDevice)).rawValue))
        r.ok(.setLogBase(LogArea(size: Self.logBytes, offset: 0)), files: Self.logFile())
        r.ok(.setFeatures(Self.features | FeatureBit.vhostLogAll))
        let reset = r.ok(.resetDevice)
        #expect(reset.contains(.deviceLog(nil, reply: nil, refusal: nil)) && reset.contains(.releaseLogFile))
    }

    @Test func setLogFDTakesOnlyAnEventfd() {
        var s = ready()
        #expect(s.ok(.setLogFD, files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)]).isEmpty)
        s.refused(.setLogFD, .wrongFileKind(.setLogFD, vring: nil, got: .pipe, needed: .eventfd),
                  files: [ReceivedFile(index: 0, size: nil, kind: .pipe)])
    }
}
