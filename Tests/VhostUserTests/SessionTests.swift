import BridgeCore
import Testing
import TestSupport
@testable import VhostUser

let ramUser: UInt64 = 0x7f00_0000_0000
let ram = RegionDescriptor(guestPhysical: GuestPhysicalAddress(0), size: 256 * MiB,
                           userAddress: FrontendUserAddress(ramUser), mmapOffset: 0)

func makeSession(_ mode: BridgeMode, bar: UInt64 = 64 * GiB) -> BackendSession {
    try! BackendSession(BackendConfiguration(bridgeName: "test", addressSpace: AddressSpaceConfiguration(barSize: bar, mode: mode), queuePairs: 1))
}

extension BackendSession {
    /// Handles a request and requires success; returns the effects.
    @discardableResult
    mutating func ok(_ request: FrontendRequest, needReply: Bool = false, files: [ReceivedFile] = [],
                     sourceLocation: SourceLocation = #_sourceLocation) -> [SessionEffect] {
        let outcome = handle(request, needReply: needReply, files: files)
        #expect(outcome.error == nil, "\(request.code): \(String(describing: outcome.error))", sourceLocation: sourceLocation)
        return outcome.effects
    }

    /// Handles a request that must be refused with `expected`, and checks
    /// that the session's state did not change.
    mutating func refused(_ request: FrontendRequest, _ expected: SessionError, needReply: Bool = false,
                          files: [ReceivedFile] = [], sourceLocation: SourceLocation = #_sourceLocation) {
        let before = snapshot
        let outcome = handle(request, needReply: needReply, files: files)
        #expect(outcome.error == expected, sourceLocation: sourceLocation)
        #expect(snapshot == before, "state changed by a refused \(request.code)", sourceLocation: sourceLocation)
    }

    /// What QEMU does before it starts the device: negotiate, own, set features, send the memory table.
    mutating func negotiateLikeQEMU(iommu: Bool = false, region: RegionDescriptor = ram) {
        ok(.getFeatures)
        ok(.getProtocolFeatures)
        ok(.setProtocolFeatures(configuration.protocolFeatures.rawValue))
        ok(.getQueueNum)
        ok(.getMaxMemSlots)
        ok(.setOwner)
        ok(.setFeatures(FeatureBit.version1 | FeatureBit.protocolFeatures | (iommu ? FeatureBit.iommuPlatform : 0)))
        ok(.setMemTable([region]), needReply: true, files: [ReceivedFile(index: 0, size: region.mmapOffset + region.size, kind: .regularFile)])
    }

    /// Ring `i` laid out in VM1 memory at `base` (user address or IOVA): desc, avail, used in consecutive pages.
    mutating func configureRing(_ i: UInt32, base: UInt64, size: UInt32 = 256) {
        ok(.setVringNum(VringState(index: i, num: size)))
        ok(.setVringBase(VringState(index: i, num: 0)))
        ok(.setVringAddr(VringAddress(index: i, descriptor: base, used: base + 0x2000, available: base + 0x1000)))
    }
}

func isDevice(_ effect: SessionEffect) -> Bool {
    switch effect {
    case .deviceStarted, .deviceStopped, .deviceReset: true
    default: false
    }
}

func replyU64(_ effects: [SessionEffect]) -> UInt64? {
    for effect in effects {
        switch effect {
        case .reply(let bytes), .windowThenReply(_, let bytes):
            return try? VhostUserCodec.decodeU64Reply(Array(bytes.dropFirst(12)), to: .getFeatures)
        default: continue
        }
    }
    return nil
}

@Suite struct NegotiationTests {
    @Test func getFeaturesOffersIOMMUPlatformOnlyOutsideIdentity() {
        var identity = makeSession(.identity)
        let f = replyU64(identity.ok(.getFeatures)) ?? 0
        #expect(f & FeatureBit.version1 != 0 && f & FeatureBit.protocolFeatures != 0 && f & FeatureBit.iommuPlatform == 0)
        var iommu = makeSession(.iommu)
        #expect((replyU64(iommu.ok(.getFeatures)) ?? 0) & FeatureBit.iommuPlatform != 0)
    }

    @Test func replyAckAcksSuccessWithZero() {
        var s = makeSession(.identity)
        s.ok(.setProtocolFeatures(ProtocolFeatures.replyAck.rawValue))
        let effects = s.ok(.setOwner, needReply: true)
        #expect(effects == [.reply(VhostUserCodec.encodeReply(to: .setOwner, .u64(0)))])
        // Without NEED_REPLY: no ack.
        #expect(s.ok(.setOwner).isEmpty)
    }

    @Test func withoutReplyAckNoAckIsSentEvenWhenAsked() {
        var s = makeSession(.identity)
        #expect(s.ok(.setOwner, needReply: true).isEmpty)
    }

    @Test func refusalWithAckIsANackAndKeepsTheConnection() {
        var s = makeSession(.identity)
        s.negotiateLikeQEMU()
        let outcome = s.handle(.setVringNum(VringState(index: 0, num: 3)), needReply: true)
        #expect(outcome.error == .queueSize(3))
        #expect(!outcome.closeConnection)
        #expect(outcome.effects == [.reply(VhostUserCodec.encodeReply(to: .setVringNum, .u64(1)))])
    }

    @Test func refusalWithoutAckClosesTheConnection() {
        var s = makeSession(.identity)
        s.negotiateLikeQEMU()
        let outcome = s.handle(.setVringNum(VringState(index: 0, num: 3)))
        #expect(outcome.closeConnection)
        #expect(outcome.effects.isEmpty)
        #expect(s.statistics.refusals["queue-size"] == 1)
    }

    @Test func ringsStartDisabledWithProtocolFeaturesAndEnabledWithout() {
        var with = makeSession(.identity)
        with.negotiateLikeQEMU()
        #expect(with.vrings.allSatisfy { !$0.enabled })
        var without = makeSession(.identity)
        without.ok(.setOwner)
        without.ok(.setFeatures(FeatureBit.version1))
        #expect(without.vrings.allSatisfy { $0.enabled })
    }

    @Test func statusRoundTrips() {
        var s = makeSession(.identity)
        s.negotiateLikeQEMU()
        s.ok(.setStatus(0xf))
        #expect(replyU64(s.ok(.getStatus)) == 0xf)
    }
}

@Suite struct IdentityModeSessionTests {
    @Test func memTableMapsTheRegionAtItsGPA() {
        var s = makeSession(.identity)
        s.ok(.setOwner)
        let effects = s.ok(.setMemTable([ram]), files: [ReceivedFile(index: 0, size: 256 * MiB, kind: .regularFile)])
        guard case .adoptRegionFile(let id, 0) = effects.first else { Issue.record("no adopt: \(effects)"); return }
        #expect(effects.dropFirst().first == .window(WindowPlan([.map(bus: BusAddress(0), length: 256 * MiB, permission: .readWrite,
                                                                    region: id, fdOffset: 0)])))
        // A second table replaces the first: unmap + release old, adopt + map new.
        let moved = RegionDescriptor(guestPhysical: GuestPhysicalAddress(GiB), size: 256 * MiB,
                                     userAddress: FrontendUserAddress(ramUser), mmapOffset: 0)
        let replaced = s.ok(.setMemTable([moved]), files: [ReceivedFile(index: 0, size: 256 * MiB, kind: .regularFile)])
        #expect(replaced.first == .window(WindowPlan([.unmap(bus: BusAddress(0), length: 256 * MiB)])))
        #expect(replaced.dropFirst().first == .releaseRegionFile(id))
        #expect(s.addressSpace.lookup(BusAddress(GiB)) != nil)
        #expect(s.addressSpace.lookup(BusAddress(0)) == nil)
    }

    @Test func ringStartsOnKickWithGPABusAddresses() {
        var s = makeSession(.identity)
        s.negotiateLikeQEMU()
        s.configureRing(0, base: ramUser + 0x10000)
        let effects = s.ok(.setVringKick(VringFileRef(index: 0, noFD: false)), files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
        let features = FeatureBit.version1 | FeatureBit.protocolFeatures
        #expect(effects == [.setVringFile(.kick, index: 0, fdIndex: 0), .deviceStarted(features: features),
                            .ringStarted(index: 0, VringLayout(queueSize: 256, descriptorTable: BusAddress(0x10000),
                                                               availRing: BusAddress(0x11000), usedRing: BusAddress(0x12000)))])
        #expect(s.vrings[0].started && s.deviceRunning)
    }

    /// The device starts with its first ring and stops with its last, once each.
    @Test func deviceStartsWithTheFirstRingAndStopsWithTheLast() {
        var s = makeSession(.identity)
        s.negotiateLikeQEMU()
        let features = FeatureBit.version1 | FeatureBit.protocolFeatures
        s.configureRing(0, base: ramUser + 0x10000)
        s.configureRing(1, base: ramUser + 0x20000)
        let kick = [ReceivedFile(index: 0, size: nil, kind: .eventfd)]
        #expect(s.ok(.setVringKick(VringFileRef(index: 0, noFD: false)), files: kick).filter(isDevice) == [.deviceStarted(features: features)])
        #expect(s.ok(.setVringKick(VringFileRef(index: 1, noFD: false)), files: kick).filter(isDevice).isEmpty)
        #expect(s.ok(.getVringBase(VringState(index: 0, num: 0))).filter(isDevice).isEmpty)
        let last = s.ok(.getVringBase(VringState(index: 1, num: 0)))
        #expect(last.filter(isDevice) == [.deviceStopped(features: features)])
        #expect(last.firstIndex(of: .deviceStopped(features: features)) == 2, "right after the ring stopped (after it stopped at the device)")
        #expect(!s.deviceRunning)
        #expect(s.teardown().filter(isDevice) == [.deviceReset])
    }

    @Test func getVringBaseStopsTheRingAndReturnsTheBase() throws {
        var s = makeSession(.identity)
        s.negotiateLikeQEMU()
        s.configureRing(1, base: ramUser + 0x20000)
        s.ok(.setVringBase(VringState(index: 1, num: 42)))
        s.ok(.setVringKick(VringFileRef(index: 1, noFD: false)), files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
        let layout = s.vrings[1].layout
        #expect(layout != nil)
        let effects = s.ok(.getVringBase(VringState(index: 1, num: 0)))
        // Stopped at the device first (with the layout it ran with), then
        // answered with the base as it is once the device said how far it got.
        #expect(effects.first == .stopRingAtDevice(index: 1, layout))
        #expect(effects.dropFirst().first == .ringStopped(index: 1))
        #expect(effects.contains(.setVringFile(.kick, index: 1, fdIndex: nil)))
        #expect(effects.last == .replyVringBase(index: 1))
        #expect(!s.vrings[1].started)
        func base() throws -> UInt32? {
            guard case .reply(let bytes) = s.vringBaseReply(1) else { return nil }
            return try VhostUserCodec.decodeVringStateReply(Array(bytes.dropFirst(12)), to: .getVringBase).num
        }
        #expect(try base() == 42) // nothing reported: SET_VRING_BASE's value
        s.noteDeviceProgress(ring: 1, lastAvail: 57)
        #expect(try base() == 57)
        // A ring that is not running is answered at once, nothing to stop.
        let idle = s.ok(.getVringBase(VringState(index: 1, num: 0)))
        guard case .reply(let bytes)? = idle.last, idle.count == 1 else { Issue.record("\(idle)"); return }
        #expect(try VhostUserCodec.decodeVringStateReply(Array(bytes.dropFirst(12)), to: .getVringBase) == VringState(index: 1, num: 57))
    }

    @Test func resetOwnerDisablesRingsAndKeepsState() {
        var s = makeSession(.identity)
        s.negotiateLikeQEMU()
        s.ok(.setVringEnable(VringState(index: 0, num: 1)))
        let before = s.addressSpace.mappings
        #expect(s.ok(.resetOwner) == [.ringEnabled(index: 0, false)])
        #expect(s.addressSpace.mappings == before)
        #expect(s.regions.count == 1)
    }

    @Test func addAndRemoveMemoryRegions() {
        var s = makeSession(.identity)
        s.negotiateLikeQEMU()
        let extra = RegionDescriptor(guestPhysical: GuestPhysicalAddress(4 * GiB), size: 64 * MiB,
                                     userAddress: FrontendUserAddress(0x7f80_0000_0000), mmapOffset: 0)
        let added = s.ok(.addMemReg(extra), files: [ReceivedFile(index: 0, size: 64 * MiB, kind: .regularFile)])
        #expect(added.count == 2)
        #expect(s.addressSpace.lookup(BusAddress(4 * GiB))?.length == 64 * MiB)
        let removed = s.ok(.remMemReg(extra))
        #expect(removed.first == .window(WindowPlan([.unmap(bus: BusAddress(4 * GiB), length: 64 * MiB)])))
        #expect(s.addressSpace.lookup(BusAddress(4 * GiB)) == nil)
    }

    @Test func teardownReleasesEverything() {
        var s = makeSession(.identity)
        s.negotiateLikeQEMU()
        s.configureRing(0, base: ramUser)
        s.ok(.setVringKick(VringFileRef(index: 0, noFD: false)), files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
        let effects = s.teardown()
        #expect(effects.first == .ringStopped(index: 0))
        #expect(effects.contains(.window(WindowPlan([.unmap(bus: BusAddress(0), length: 256 * MiB)]))))
        #expect(effects.contains { if case .releaseRegionFile = $0 { true } else { false } })
        #expect(s.addressSpace.mappings.isEmpty && s.regions.count == 0)
    }
}

@Suite struct IOMMUModeSessionTests {
    @Test func kickOnUnmappedRingRaisesAMissAndAnUpdateStartsIt() throws {
        var s = makeSession(.iommu)
        s.negotiateLikeQEMU(iommu: true)
        s.ok(.setBackendReqFD, files: [ReceivedFile(index: 0, size: nil, kind: .socket)])
        s.configureRing(0, base: 0x1_0000_0000)
        let kick = s.ok(.setVringKick(VringFileRef(index: 0, noFD: false)), files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
        #expect(kick.last == .raiseMiss(bus: BusAddress(0x1_0000_0000), permission: .read))
        #expect(s.vrings[0].phase == .awaitingTranslation && s.vrings[0].active && s.vrings[0].layout == nil)
        #expect(s.ringTranslationsNeeded().map(\.bus) == [BusAddress(0x1_0000_0000)])
        guard case .sendBackend(let bytes)? = s.missMessage(bus: BusAddress(0x1_0000_0000), permission: .read) else {
            Issue.record("no miss message"); return
        }
        let (header, payload) = split(bytes)
        let miss = try VhostUserCodec.decodeBackendIOTLB(header, payload: payload)
        #expect(miss == IOTLBMessage(iova: 0x1_0000_0000, size: 0, userAddress: 0, permission: .read, type: .miss))
        // Part of the ring mapped: what is still needed moves on (avail, then used).
        s.ok(.iotlb(IOTLBMessage(iova: 0x1_0000_0000, size: 0x1000, userAddress: ramUser + 0x8000, permission: .read, type: .update)))
        #expect(s.ringTranslationsNeeded().map(\.bus) == [BusAddress(0x1_0000_1000)])
        // The front end answers with an update covering all three parts.
        let update = s.ok(.iotlb(IOTLBMessage(iova: 0x1_0000_0000, size: 0x4000, userAddress: ramUser + 0x8000,
                                              permission: .readWrite, type: .update)), needReply: true)
        #expect(update.contains(.ringStarted(index: 0, VringLayout(queueSize: 256, descriptorTable: BusAddress(0x1_0000_0000),
                                                                    availRing: BusAddress(0x1_0000_1000), usedRing: BusAddress(0x1_0000_2000)))))
        #expect(s.statistics.iotlbMissesSent == 1 && s.statistics.iotlbUpdates == 2)
        #expect(s.ringTranslationsNeeded().isEmpty)
        #expect(s.vrings[0].phase == .started(VringLayout(queueSize: 256, descriptorTable: BusAddress(0x1_0000_0000),
                                                          availRing: BusAddress(0x1_0000_1000), usedRing: BusAddress(0x1_0000_2000))))
        #expect(replyU64(update) == 0)
    }

    /// SET_VRING_ADDR moving the only started ring to unmapped memory: the
    /// ring waits for a translation, but VM2 was not told it stopped, so the
    /// device is not stopped either (no DEVICE stop without a VRING_STOP).
    @Test func aRingWaitingAgainDoesNotStopTheDevice() throws {
        var s = makeSession(.iommu)
        s.negotiateLikeQEMU(iommu: true)
        s.ok(.setBackendReqFD, files: [ReceivedFile(index: 0, size: nil, kind: .socket)])
        s.ok(.iotlb(IOTLBMessage(iova: 0x1_0000_0000, size: 0x4000, userAddress: ramUser + 0x8000, permission: .readWrite, type: .update)))
        s.configureRing(0, base: 0x1_0000_0000)
        #expect(s.ok(.setVringKick(VringFileRef(index: 0, noFD: false)), files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
                    .contains { if case .deviceStarted = $0 { true } else { false } })
        let moved = s.ok(.setVringAddr(VringAddress(index: 0, descriptor: 0x2_0000_0000, used: 0x2_0000_2000, available: 0x2_0000_1000)))
        #expect(moved.filter(isDevice).isEmpty, "\(moved)")
        #expect(s.vrings[0].phase == .awaitingTranslation && s.deviceRunning)
        // The update that maps the new addresses starts the ring again, with no second DEVICE start.
        let again = s.ok(.iotlb(IOTLBMessage(iova: 0x2_0000_0000, size: 0x4000, userAddress: ramUser + 0x8000, permission: .readWrite, type: .update)))
        #expect(again.filter(isDevice).isEmpty && s.vrings[0].started)
        #expect(s.teardown().filter(isDevice) == [.deviceStopped(features: FeatureBit.version1 | FeatureBit.protocolFeatures | FeatureBit.iommuPlatform), .deviceReset])
    }

    @Test func invalidateRevokesAndInvalidatingNothingIsAcked() {
        var s = makeSession(.iommu)
        s.negotiateLikeQEMU(iommu: true)
        s.ok(.iotlb(IOTLBMessage(iova: 0x10_0000, size: 0x2000, userAddress: ramUser, permission: .read, type: .update)))
        let effects = s.ok(.iotlb(IOTLBMessage(iova: 0x10_0000, size: 0x1000, userAddress: 0, permission: .none, type: .invalidate)), needReply: true)
        // The ack follows VM2's: one effect says so (the executor infers nothing).
        guard case .windowThenReply(let plan, _)? = effects.first, effects.count == 1 else { Issue.record("\(effects)"); return }
        #expect(plan == WindowPlan([.unmap(bus: BusAddress(0x10_0000), length: 0x1000)]))
        #expect(replyU64(effects) == 0)
        // Invalidating a range nothing maps: no window change, and with
        // NEED_REPLY still an ack of 0 (QEMU waits for it). Sent without
        // NEED_REPLY, as before, the test could not see a missing ack.
        let before = s.snapshot
        let nothing = s.ok(.iotlb(IOTLBMessage(iova: 0x50_0000, size: 0x1000, userAddress: 0, permission: .none, type: .invalidate)),
                           needReply: true)
        #expect(nothing.count == 1 && replyU64(nothing) == 0, "\(nothing)")
        #expect(s.snapshot == before)
    }

    @Test func memTableAloneMapsNothingInIOMMUMode() {
        var s = makeSession(.iommu)
        s.negotiateLikeQEMU(iommu: true)
        #expect(s.addressSpace.mappings.isEmpty)
        #expect(s.regions.count == 1)
    }
}

/// Hostile input: each case asserts the exact error and that nothing changed.
@Suite struct HostileSessionTests {
    private func ready(_ mode: BridgeMode = .identity) -> BackendSession {
        var s = makeSession(mode)
        s.negotiateLikeQEMU(iommu: mode != .identity)
        return s
    }

    private let fileOK = [ReceivedFile(index: 0, size: 256 * MiB, kind: .regularFile)]

    @Test func regionOfSizeZero() {
        var s = ready()
        var d = ram; d.size = 0
        s.refused(.setMemTable([d]), .memory(.zeroSize(GuestPhysicalAddress(0))), files: fileOK)
    }

    @Test func regionGPAPlusSizeOverflows() {
        var s = ready()
        var d = ram; d.guestPhysical = GuestPhysicalAddress(UInt64.max - 0xfff)
        s.refused(.setMemTable([d]), .memory(.overflow(field: "guest_phys_addr", value: UInt64.max - 0xfff, size: 256 * MiB)), files: fileOK)
    }

    @Test func overlappingRegions() {
        var s = ready()
        var b = ram; b.guestPhysical = GuestPhysicalAddress(128 * MiB); b.userAddress = FrontendUserAddress(0x7f80_0000_0000)
        let existing = s.regions.regions[0].id
        s.refused(.setMemTable([ram, b]), .memory(.overlapsGuestPhysical(GuestPhysicalAddress(128 * MiB), size: 256 * MiB, existing: RegionID(existing.rawValue + 1))),
                  files: fileOK + fileOK)
        s.refused(.addMemReg(b), .memory(.overlapsGuestPhysical(GuestPhysicalAddress(128 * MiB), size: 256 * MiB, existing: existing)), files: fileOK)
    }

    @Test func mmapOffsetPastTheEndOfTheFile() {
        var s = ready()
        var d = ram; d.mmapOffset = 4096
        s.refused(.setMemTable([d]), .memory(.beyondFile(mmapOffset: 4096, size: 256 * MiB, fileSize: 256 * MiB)), files: fileOK)
    }

    @Test func identityRegionPastTheBAR() {
        var s = makeSession(.identity, bar: 128 * MiB)
        s.ok(.setOwner)
        s.refused(.setMemTable([ram]), .addressSpace(.outsideBAR(BusAddress(0), length: 256 * MiB, barSize: 128 * MiB)), files: fileOK)
        s.ok(.setProtocolFeatures(ProtocolFeatures.configureMemSlots.rawValue))
        s.refused(.addMemReg(ram), .addressSpace(.outsideBAR(BusAddress(0), length: 256 * MiB, barSize: 128 * MiB)), files: fileOK)
    }

    @Test func iotlbUpdateOutsideEveryRegion() {
        var s = ready(.iommu)
        s.refused(.iotlb(IOTLBMessage(iova: 0x1000, size: 0x1000, userAddress: 0x1000, permission: .read, type: .update)),
                  .addressSpace(.notBacked(.user(FrontendUserAddress(0x1000)), length: 0x1000)))
    }

    @Test func iotlbUpdateOutsideTheBAR() {
        var s = ready(.iommu)
        s.refused(.iotlb(IOTLBMessage(iova: 64 * GiB, size: 0x1000, userAddress: ramUser, permission: .read, type: .update)),
                  .addressSpace(.outsideBAR(BusAddress(64 * GiB), length: 0x1000, barSize: 64 * GiB)))
    }

    @Test func iotlbIOVAPlusSizeWraps() {
        var s = ready(.iommu)
        s.refused(.iotlb(IOTLBMessage(iova: UInt64.max - 0xfff, size: 0x2000, userAddress: ramUser, permission: .read, type: .update)),
                  .addressSpace(.rangeWraps(start: UInt64.max - 0xfff, length: 0x2000)))
        // An invalidate is clipped instead (revocation is never refused for its size).
        #expect(s.handle(.iotlb(IOTLBMessage(iova: UInt64.max - 0xfff, size: 0x2000, userAddress: 0, permission: .none, type: .invalidate))).error == nil)
    }

    @Test func iotlbPermissionZero() {
        var s = ready(.iommu)
        s.refused(.iotlb(IOTLBMessage(iova: 0x1000, size: 0x1000, userAddress: ramUser, permission: .none, type: .update)),
                  .addressSpace(.emptyPermission(BusAddress(0x1000))))
    }

    @Test func iotlbMissOrAccessFailFromTheFrontEnd() {
        var s = ready(.iommu)
        s.refused(.iotlb(IOTLBMessage(iova: 0, size: 0x1000, userAddress: 0, permission: .read, type: .miss)), .iotlbTypeFromFrontend(.miss))
        s.refused(.iotlb(IOTLBMessage(iova: 0, size: 0x1000, userAddress: 0, permission: .read, type: .accessFail)), .iotlbTypeFromFrontend(.accessFail))
    }

    @Test func iotlbWithoutIOMMUPlatform() {
        var s = ready(.identity)
        s.refused(.iotlb(IOTLBMessage(iova: 0, size: 0x1000, userAddress: ramUser, permission: .read, type: .update)),
                  .featureNotNegotiated(.iotlbMsg, feature: "VIRTIO_F_IOMMU_PLATFORM"))
    }

    @Test func iommuModeWithoutIOMMUPlatform() {
        var s = makeSession(.iommu)
        s.ok(.setOwner)
        s.refused(.setFeatures(FeatureBit.version1), .modeNeedsIOMMUPlatform(.iommu))
    }

    @Test func featuresThatWereNotOffered() {
        var s = makeSession(.identity)
        s.ok(.setOwner)
        s.refused(.setFeatures(FeatureBit.version1 | FeatureBit.iommuPlatform), .unsupportedFeatures(FeatureBit.iommuPlatform))
        s.refused(.setFeatures(FeatureBit.ringPacked), .unsupportedFeatures(FeatureBit.ringPacked))
        s.refused(.setProtocolFeatures(ProtocolFeatures([.replyAck, .inbandNotifications]).rawValue),
                  .unsupportedProtocolFeatures(.inbandNotifications))
    }

    @Test func vringIndexOutOfRange() {
        var s = ready()
        s.refused(.setVringNum(VringState(index: 2, num: 256)), .vringIndex(.setVringNum, index: 2, count: 2))
        s.refused(.setVringAddr(VringAddress(index: 0xffff_ffff, descriptor: 0, used: 0, available: 0)),
                  .vringIndex(.setVringAddr, index: 0xffff_ffff, count: 2))
        s.refused(.setVringKick(VringFileRef(index: 200, noFD: true)), .vringIndex(.setVringKick, index: 200, count: 2))
        s.refused(.getVringBase(VringState(index: 9, num: 0)), .vringIndex(.getVringBase, index: 9, count: 2))
    }

    @Test(arguments: [0, 3, 255, 65536, 32769] as [UInt32])
    func queueSizeNotAPowerOfTwoOrTooLarge(size: UInt32) {
        var s = ready()
        s.refused(.setVringNum(VringState(index: 0, num: size)), .queueSize(size))
    }

    @Test func ringAddressesOutsideVM1Memory() {
        var s = ready()
        s.configureRing(0, base: 0x1000)
        s.refused(.setVringKick(VringFileRef(index: 0, noFD: false)), .ringAddressNotTranslatable(index: 0, part: "descriptor", address: 0x1000),
                  files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
    }

    @Test func ringStraddlingTheEndOfVM1Memory() {
        var s = ready()
        s.configureRing(0, base: ramUser + 256 * MiB - 0x2000)
        s.refused(.setVringKick(VringFileRef(index: 0, noFD: false)),
                  .ringAddressNotTranslatable(index: 0, part: "used", address: ramUser + 256 * MiB), files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
    }

    @Test func usedRingInReadOnlyMemory() {
        var s = ready(.iommu)
        s.ok(.iotlb(IOTLBMessage(iova: 0x10_0000, size: 0x2000, userAddress: ramUser, permission: .readWrite, type: .update)))
        s.ok(.iotlb(IOTLBMessage(iova: 0x10_2000, size: 0x1000, userAddress: ramUser + 0x2000, permission: .read, type: .update)))
        s.configureRing(0, base: 0x10_0000)
        s.refused(.setVringKick(VringFileRef(index: 0, noFD: false)),
                  .addressSpace(.accessDenied(.usedRing, BusAddress(0x10_2000), needed: .readWrite, granted: .read)),
                  files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
    }

    @Test func kickBeforeTheRingIsConfigured() {
        var s = ready()
        s.refused(.setVringKick(VringFileRef(index: 0, noFD: false)), .vringNotConfigured(index: 0, missing: "SET_VRING_NUM"),
                  files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
    }

    @Test func requestsBeforeSetOwner() {
        var s = makeSession(.identity)
        s.refused(.setFeatures(FeatureBit.version1), .ownerNotSet(.setFeatures))
        s.refused(.setMemTable([ram]), .ownerNotSet(.setMemTable), files: fileOK)
        s.refused(.setVringNum(VringState(index: 0, num: 256)), .ownerNotSet(.setVringNum))
        s.refused(.setVringKick(VringFileRef(index: 0, noFD: true)), .ownerNotSet(.setVringKick))
    }

    @Test func requestsThatNeedAProtocolFeature() {
        var s = makeSession(.identity)
        s.ok(.setOwner)
        s.refused(.addMemReg(ram), .protocolFeatureNotNegotiated(.addMemReg, .configureMemSlots), files: fileOK)
        s.refused(.getMaxMemSlots, .protocolFeatureNotNegotiated(.getMaxMemSlots, .configureMemSlots))
        s.refused(.setBackendReqFD, .protocolFeatureNotNegotiated(.setBackendReqFD, .backendReq), files: [ReceivedFile(index: 0, size: nil, kind: .socket)])
        s.refused(.setStatus(1), .protocolFeatureNotNegotiated(.setStatus, .status))
        s.refused(.resetDevice, .protocolFeatureNotNegotiated(.resetDevice, .resetDevice))
        s.refused(.vringKick(VringState(index: 0, num: 0)), .protocolFeatureNotNegotiated(.vringKick, .inbandNotifications))
        s.refused(.sendRARP(0), .protocolFeatureNotNegotiated(.sendRARP, .rarp))
        s.refused(.netSetMTU(1500), .protocolFeatureNotNegotiated(.netSetMTU, .mtu))
        s.refused(.setVringEnable(VringState(index: 0, num: 1)), .featureNotNegotiated(.setVringEnable, feature: "VHOST_USER_F_PROTOCOL_FEATURES"))
    }

    /// Kick, call and err fds are checked on the fd itself: a pipe (SIGPIPE
    /// on write), a regular file (always readable: a relay would spin), a
    /// socket — each refused, naming the vring and what the fd is.
    @Test(arguments: [FileKind.pipe, .regularFile, .socket, .unknown, .other("anon_inode:[timerfd]")])
    func vringFilesMustBeEventfds(kind: FileKind) {
        var s = ready()
        s.configureRing(1, base: ramUser)
        let file = [ReceivedFile(index: 0, size: nil, kind: kind)]
        s.refused(.setVringCall(VringFileRef(index: 1, noFD: false)), .wrongFileKind(.setVringCall, vring: 1, got: kind, needed: .eventfd), files: file)
        s.refused(.setVringErr(VringFileRef(index: 1, noFD: false)), .wrongFileKind(.setVringErr, vring: 1, got: kind, needed: .eventfd), files: file)
        s.refused(.setVringKick(VringFileRef(index: 1, noFD: false)), .wrongFileKind(.setVringKick, vring: 1, got: kind, needed: .eventfd), files: file)
        #expect(s.vrings[1].started == false)
        #expect(SessionError.wrongFileKind(.setVringKick, vring: 1, got: kind, needed: .eventfd).description.contains("vring 1"))
        // Polling (no fd) needs no fd kind.
        s.ok(.setVringCall(VringFileRef(index: 1, noFD: true)))
    }

    @Test func memoryAndChannelFdsAreCheckedToo() {
        var s = ready()
        s.refused(.setMemTable([ram]), .wrongFileKind(.setMemTable, vring: nil, got: .pipe, needed: .regularFile),
                  files: [ReceivedFile(index: 0, size: 0, kind: .pipe)])
        var t = makeSession(.iommu)
        t.negotiateLikeQEMU(iommu: true)
        t.refused(.setBackendReqFD, .wrongFileKind(.setBackendReqFD, vring: nil, got: .eventfd, needed: .socket),
                  files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
    }

    @Test func badEnableValueAndBase() {
        var s = ready()
        s.refused(.setVringEnable(VringState(index: 0, num: 2)), .unsupportedRequest(.setVringEnable, reason: "enable value 2 is not 0 or 1"))
        s.refused(.setVringBase(VringState(index: 0, num: 0x1_0000)), .vringBaseOutOfRange(0x1_0000))
    }

    @Test func removingARegionThatDoesNotExist() {
        var s = ready()
        var d = ram; d.size = 4096
        s.refused(.remMemReg(d), .memory(.noMatchingRegion(d)))
    }

    @Test func aBadMemTableLeavesTheOldOneInPlace() {
        var s = ready()
        let mapped = s.addressSpace.mappings
        var bad = ram; bad.userAddress = FrontendUserAddress(0x7f90_0000_0000); bad.size = 0
        s.refused(.setMemTable([ram, bad]), .memory(.zeroSize(GuestPhysicalAddress(0))), files: fileOK + fileOK)
        #expect(s.addressSpace.mappings == mapped)
    }

    @Test func configIsNotRelayedAndGetConfigFailsWithAnEmptyReply() {
        var s = ready()
        let outcome = s.handle(.getConfig(ConfigSpace(offset: 0, flags: 0, bytes: [0, 0])))
        #expect(outcome.error == .protocolFeatureNotNegotiated(.getConfig, .config))
        #expect(outcome.effects == [.reply(VhostUserCodec.encodeReply(to: .getConfig, .empty))])
        #expect(!outcome.closeConnection)
    }
}

@Suite struct QEMUOrderingTests {
    /// QEMU enables the rings of a vhost-user net device before it sends
    /// SET_FEATURES; negotiation must not disable them again (found with QEMU 7.2).
    @Test func enableBeforeSetFeaturesSticks() {
        var s = makeSession(.identity)
        s.ok(.getFeatures)
        s.ok(.setProtocolFeatures(s.configuration.protocolFeatures.rawValue))
        s.ok(.setOwner)
        s.ok(.setVringEnable(VringState(index: 0, num: 1)))
        s.ok(.setVringEnable(VringState(index: 1, num: 1)))
        s.ok(.setFeatures(FeatureBit.version1 | FeatureBit.protocolFeatures))
        #expect(s.vrings.allSatisfy { $0.enabled })
    }
}

@Suite struct MultiQueueSessionTests {
    /// The default bridge takes front ends with up to 8 queue pairs: it says
    /// so in GET_QUEUE_NUM, offers MQ and CTRL_VQ, and accepts vrings 0…15.
    @Test func theDefaultOffersEightQueuePairs() throws {
        var s = try BackendSession(BackendConfiguration(bridgeName: "mq", addressSpace: AddressSpaceConfiguration(barSize: 1 << 32, mode: .identity)))
        #expect(s.configuration.queuePairs == BackendConfiguration.defaultQueuePairs)
        let offered = s.configuration.offeredFeatures
        #expect(offered & VirtioNetFeatures.mq.rawValue != 0 && offered & VirtioNetFeatures.ctrlVq.rawValue != 0)
        #expect(offered & VirtioNetFeatures.eventIdx.rawValue != 0 && offered & VirtioNetFeatures.mrgRxbuf.rawValue != 0)
        s.ok(.getFeatures)
        s.ok(.setProtocolFeatures(s.configuration.protocolFeatures.rawValue))
        s.ok(.setOwner)
        #expect(s.vrings.count == 16)
        s.ok(.setVringNum(VringState(index: 15, num: 256)))
        s.refused(.setVringNum(VringState(index: 16, num: 256)), .vringIndex(.setVringNum, index: 16, count: 16))
    }
}

/// Requests nothing else covered: values the session answers, a successful
/// RESET_DEVICE, the slot limit, and refusals made by the session itself
/// (not the codec).
@Suite struct UncoveredRequestTests {
    func negotiated(_ mode: BridgeMode = .identity, protocol features: ProtocolFeatures? = nil) -> BackendSession {
        var s = makeSession(mode)
        s.ok(.getFeatures)
        s.ok(.setProtocolFeatures((features ?? s.configuration.protocolFeatures).rawValue))
        s.ok(.setOwner)
        return s
    }

    @Test func queueNumAndMemSlotsAnswerTheConfiguration() {
        var s = negotiated()
        #expect(replyU64(s.ok(.getQueueNum)) == UInt64(s.configuration.queuePairs))
        #expect(replyU64(s.ok(.getMaxMemSlots)) == 32)
        // The spec allows GET_QUEUE_NUM when MQ is among the *queried*
        // (offered) protocol features; a bridge that does not offer it refuses.
        var noMQ = BackendConfiguration(bridgeName: "t", addressSpace: AddressSpaceConfiguration(barSize: 1 << 36, mode: .identity))
        noMQ.protocolFeatures.remove(.mq)
        var t = try! BackendSession(noMQ)
        t.ok(.setOwner)
        t.refused(.getQueueNum, .protocolFeatureNotNegotiated(.getQueueNum, .mq))
    }

    @Test func oneSlotTooManyIsRefusedAndChangesNothing() {
        var s = negotiated()
        s.ok(.setFeatures(FeatureBit.version1 | FeatureBit.protocolFeatures))
        let slots = s.configuration.maxMemSlots
        for i in 0..<slots {
            let d = RegionDescriptor(guestPhysical: GuestPhysicalAddress(UInt64(i) << 30), size: 1 << 20,
                                     userAddress: FrontendUserAddress(ramUser + UInt64(i) << 30), mmapOffset: 0)
            s.ok(.addMemReg(d), files: [ReceivedFile(index: 0, size: 1 << 20, kind: .regularFile)])
        }
        #expect(s.regions.count == slots)
        let extra = RegionDescriptor(guestPhysical: GuestPhysicalAddress(UInt64(slots) << 30), size: 1 << 20,
                                     userAddress: FrontendUserAddress(ramUser + UInt64(slots) << 30), mmapOffset: 0)
        s.refused(.addMemReg(extra), .memory(.tooManyRegions(limit: slots)),
                  files: [ReceivedFile(index: 0, size: 1 << 20, kind: .regularFile)])
    }

    @Test func aSuccessfulResetDeviceStopsRingsForgetsFeaturesAndUnmaps() {
        var s = makeSession(.iommu)
        s.negotiateLikeQEMU(iommu: true)
        s.ok(.iotlb(IOTLBMessage(iova: 0x10_0000, size: 0x4000, userAddress: ramUser, permission: .readWrite, type: .update)))
        s.configureRing(0, base: 0x10_0000, size: 64)
        s.ok(.setVringCall(VringFileRef(index: 0, noFD: false)), files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
        s.ok(.setVringEnable(VringState(index: 0, num: 1)))
        s.ok(.setVringKick(VringFileRef(index: 0, noFD: false)), files: [ReceivedFile(index: 0, size: nil, kind: .eventfd)])
        #expect(s.vrings[0].started)
        let effects = s.ok(.resetDevice)
        #expect(effects.contains(.ringStopped(index: 0)))
        #expect(effects.contains(.window(WindowPlan([.unmap(bus: BusAddress(0x10_0000), length: 0x4000)]))))
        #expect(effects.contains(.setVringFile(.kick, index: 0, fdIndex: nil)) && effects.contains(.setVringFile(.call, index: 0, fdIndex: nil)))
        #expect(s.ackedFeatures == nil && s.addressSpace.mappings.isEmpty && !s.vrings[0].started)
        #expect(s.regions.count == 1, "the memory table survives a device reset")
        // And it is usable again: features, a ring, traffic.
        s.ok(.setFeatures(FeatureBit.version1 | FeatureBit.protocolFeatures | FeatureBit.iommuPlatform))
        s.ok(.iotlb(IOTLBMessage(iova: 0x10_0000, size: 0x4000, userAddress: ramUser, permission: .readWrite, type: .update)))
        #expect(s.addressSpace.mappings.count == 1)
    }

    @Test func sessionRefusesALogFDThatIsNoEventfdEndiannessAndConfigSpace() {
        var s = negotiated()
        s.ok(.setFeatures(FeatureBit.version1 | FeatureBit.protocolFeatures))
        s.refused(.setLogFD, .wrongFileKind(.setLogFD, vring: nil, got: .regularFile, needed: .eventfd),
                  files: [ReceivedFile(index: 0, size: 4096, kind: .regularFile)])
        s.refused(.setVringEndian(VringState(index: 0, num: 1)), .protocolFeatureNotNegotiated(.setVringEndian, .crossEndian))
        s.refused(.setConfig(ConfigSpace(offset: 0, flags: 0, bytes: [1, 2, 3, 4])), .protocolFeatureNotNegotiated(.setConfig, .config))
    }
}
