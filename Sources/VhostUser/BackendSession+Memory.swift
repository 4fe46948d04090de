import BridgeCore

/// Memory: the memory table, IOTLB updates and invalidates, the operator's
/// map/unmap/freeze, and the misses raised toward VM1.
extension BackendSession {
    // MARK: memory table

    mutating func setMemTable(_ descriptors: [RegionDescriptor], files: [ReceivedFile]) throws(SessionError) -> [SessionEffect] {
        var nextRegions = regions
        let change: (removed: [MemoryRegion], added: [MemoryRegion])
        do {
            change = try nextRegions.replaceAll(with: descriptors, fileSizes: files.map(\.size), hugePageSizes: files.map(\.hugePageSize))
        } catch { throw .memory(error) }
        var nextSpace = addressSpace
        var effects: [SessionEffect] = []
        for old in change.removed {
            let plan = nextSpace.unmapRegion(old.id)
            if !plan.isEmpty { effects.append(.window(plan)) }
            effects.append(.releaseRegionFile(old.id))
        }
        for (i, region) in change.added.enumerated() {
            effects.append(.adoptRegionFile(region.id, fdIndex: i < files.count ? files[i].index : i))
            if nextSpace.mode == .identity {
                do { effects.append(.window(try nextSpace.mapRegion(region))) } catch { throw .addressSpace(error) }
            }
        }
        regions = nextRegions
        addressSpace = nextSpace
        return effects
    }

    mutating func addRegion(_ d: RegionDescriptor, file: ReceivedFile?) throws(SessionError) -> [SessionEffect] {
        let region: MemoryRegion
        do { region = try regions.add(d, fileSize: file?.size, hugePageSize: file?.hugePageSize ?? 0) } catch { throw .memory(error) }
        var effects: [SessionEffect] = [.adoptRegionFile(region.id, fdIndex: file?.index ?? 0)]
        if addressSpace.mode == .identity {
            do {
                effects.append(.window(try addressSpace.mapRegion(region)))
            } catch {
                _ = try? regions.remove(matching: d)
                throw .addressSpace(error)
            }
        }
        return effects
    }

    // MARK: IOTLB

    mutating func iotlb(_ m: IOTLBMessage) throws(SessionError) -> [SessionEffect] {
        switch m.type {
        case .update:
            let plan: WindowPlan
            do {
                plan = try addressSpace.update(bus: BusAddress(m.iova), length: m.size,
                                               source: .user(FrontendUserAddress(m.userAddress)),
                                               permission: m.permission, regions: regions)
            } catch { throw .addressSpace(error) }
            statistics.iotlbUpdates += 1
            var effects: [SessionEffect] = plan.isEmpty ? [] : [.window(plan)]
            // Rings waiting for a translation may be startable now.
            for i in vrings.indices where vrings[i].awaitingTranslation {
                vrings[i].phase = .configuring
                if let more = try? startIfReady(i) { effects += more } else { vrings[i].phase = .awaitingTranslation }
            }
            return effects
        case .invalidate:
            let plan: WindowPlan
            do { plan = try addressSpace.invalidate(bus: BusAddress(m.iova), length: m.size) } catch { throw .addressSpace(error) }
            statistics.iotlbInvalidates += 1
            return plan.isEmpty ? [] : [.window(plan)]
        case .miss, .accessFail:
            throw .iotlbTypeFromFrontend(m.type)
        }
    }

    // MARK: operator commands (control socket)

    /// An operator's map of guest-physical memory at a bus address (static
    /// windows, or an iommu bridge whose VM1 cannot be asked). Same checks as
    /// an IOTLB update; refusals are counted by rule.
    public mutating func operatorMap(bus: BusAddress, guestPhysical: GuestPhysicalAddress, length: UInt64,
                                     permission: Permission) -> Outcome {
        do {
            let plan = try addressSpace.update(bus: bus, length: length, source: .guestPhysical(guestPhysical),
                                               permission: permission, regions: regions)
            return Outcome(effects: plan.isEmpty ? [] : [.window(plan)], error: nil, closeConnection: false)
        } catch {
            let e = SessionError.addressSpace(error)
            statistics.refusals[e.rule, default: 0] += 1
            return Outcome(effects: [], error: e, closeConnection: false)
        }
    }

    /// An operator's unmap (revocation: synchronous through VM2 like an invalidate).
    public mutating func operatorUnmap(bus: BusAddress, length: UInt64) -> Outcome {
        do {
            let plan = try addressSpace.invalidate(bus: bus, length: length)
            return Outcome(effects: plan.isEmpty ? [] : [.window(plan)], error: nil, closeConnection: false)
        } catch {
            let e = SessionError.addressSpace(error)
            statistics.refusals[e.rule, default: 0] += 1
            return Outcome(effects: [], error: e, closeConnection: false)
        }
    }

    /// Static mode: freeze the address space; later changes are refused and counted.
    public mutating func freeze() -> SessionError? {
        do { try addressSpace.freeze(); return nil } catch {
            let e = SessionError.addressSpace(error)
            statistics.refusals[e.rule, default: 0] += 1
            return e
        }
    }

    public var isFrozen: Bool { addressSpace.isFrozen }

    /// A back-end IOTLB miss for `bus` (what the front end must map).
    public mutating func missMessage(bus: BusAddress, permission: Permission) -> SessionEffect? {
        guard hasBackendChannel, iommuPlatform else { return nil }
        statistics.iotlbMissesSent += 1
        return .sendBackend(VhostUserCodec.encodeBackendIOTLB(
            IOTLBMessage(iova: bus.rawValue, size: 0, userAddress: 0, permission: permission, type: .miss)))
    }
}
