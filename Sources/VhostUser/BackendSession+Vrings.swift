import BridgeCore

/// Per-vring state as the front end configured it.
public struct VringSetup: Equatable, Sendable {
    public enum FileState: Equatable, Sendable { case unset, fd, polling }
    public var size: UInt32?
    public var address: VringAddress?
    /// Last avail index (SET_VRING_BASE; returned by GET_VRING_BASE).
    public var base: UInt32 = 0
    public var kick: FileState = .unset
    public var call: FileState = .unset
    public var err: FileState = .unset
    public var enabled: Bool
    /// SET_VRING_ENABLE was received for this ring (QEMU may send it before
    /// SET_FEATURES; negotiation must not undo it).
    public var enableExplicit = false

    /// Where the ring is in its life: one value, so "started without a
    /// layout" or "started and waiting" cannot be written.
    public enum Phase: Equatable, Sendable {
        /// Being configured (or stopped): not served.
        case configuring
        /// Complete, but waiting for IOTLB updates of its ring addresses (iommu mode).
        case awaitingTranslation
        /// Served by the device at this (validated) layout.
        case started(VringLayout)
    }
    public internal(set) var phase: Phase = .configuring

    public var started: Bool { if case .started = phase { true } else { false } }
    public var awaitingTranslation: Bool { phase == .awaitingTranslation }
    /// Started or waiting: a GET_VRING_BASE or a reset has something to stop.
    public var active: Bool { phase != .configuring }
    public var layout: VringLayout? { if case .started(let l) = phase { l } else { nil } }
}

/// Vrings: starting a ring once it is complete and its memory mapped, what
/// the waiting rings still need, the device's progress, stop and teardown.
extension BackendSession {
    // MARK: vring requests

    mutating func setVringNum(_ state: VringState, code: RequestCode) throws(SessionError) -> [SessionEffect] {
        try requireOwner(code)
        let i = try vringIndex(code, state.index)
        let n = state.num
        guard n >= 1, n <= VringLayout.maximumQueueSize, n.nonzeroBitCount == 1 else { throw .queueSize(n) }
        vrings[i].size = n
        return []
    }

    mutating func setVringAddr(_ address: VringAddress, code: RequestCode) throws(SessionError) -> [SessionEffect] {
        try requireOwner(code)
        let i = try vringIndex(code, address.index)
        guard address.flags & ~VringAddress.flagLog == 0 else {
            throw .unsupportedRequest(code, reason: "unknown vring flags \(Hex(UInt64(address.flags)))")
        }
        try checkLogAddress(address, index: i)
        let previous = vrings[i]
        vrings[i].address = address
        // Only VRING_F_LOG (and its address) changed — QEMU's way of
        // turning used-ring logging on at migration: the ring runs on.
        if let old = previous.address, old.descriptor == address.descriptor, old.used == address.used,
           old.available == address.available {
            return []
        }
        if previous.active {
            vrings[i].phase = .configuring
            do {
                return try startIfReady(i)
            } catch {
                vrings[i] = previous
                throw error
            }
        }
        return []
    }

    mutating func setVringBase(_ state: VringState, code: RequestCode) throws(SessionError) -> [SessionEffect] {
        try requireOwner(code)
        let i = try vringIndex(code, state.index)
        guard state.num <= 0xffff else { throw .vringBaseOutOfRange(state.num) }
        vrings[i].base = state.num
        return []
    }

    mutating func getVringBase(_ state: VringState, code: RequestCode) throws(SessionError) -> [SessionEffect] {
        try requireOwner(code)
        let i = try vringIndex(code, state.index)
        var effects: [SessionEffect] = []
        let running = vrings[i].active
        if running {
            // How far the device got is known only once it stopped: the
            // reply is made after that (`replyVringBase`).
            effects.append(.stopRingAtDevice(index: i, vrings[i].layout))
            effects.append(.ringStopped(index: i))
        }
        vrings[i].phase = .configuring
        if vrings[i].kick == .fd { effects.append(.setVringFile(.kick, index: i, fdIndex: nil)) }
        vrings[i].kick = .unset
        effects.append(running ? .replyVringBase(index: i) : vringBaseReply(i))
        return effects
    }

    /// GET_VRING_BASE's answer for ring `index`: its base as it is now.
    public func vringBaseReply(_ index: Int) -> SessionEffect {
        let base = vrings.indices.contains(index) ? vrings[index].base : 0
        return reply(.getVringBase, .vringState(VringState(index: UInt32(index), num: base)))
    }

    mutating func setVringFile(_ ref: VringFileRef, code: RequestCode, files: [ReceivedFile]) throws(SessionError) -> [SessionEffect] {
        try requireOwner(code)
        let i = try vringIndex(code, UInt32(ref.index))
        let kind: VringFileKind = code == .setVringKick ? .kick : code == .setVringCall ? .call : .err
        let state: VringSetup.FileState = ref.noFD ? .polling : .fd
        // A pipe whose reader is gone raises SIGPIPE on write, a regular
        // file is always readable (a relay would spin): only eventfds.
        if !ref.noFD, let file = files.first, file.kind != .eventfd {
            throw .wrongFileKind(code, vring: i, got: file.kind, needed: .eventfd)
        }
        var effects: [SessionEffect] = [.setVringFile(kind, index: i, fdIndex: ref.noFD ? nil : files.first?.index ?? 0)]
        switch kind {
        case .kick:
            let previous = vrings[i]
            vrings[i].kick = state
            do {
                effects += try startIfReady(i)
            } catch {
                vrings[i] = previous
                throw error
            }
        case .call: vrings[i].call = state
        case .err: vrings[i].err = state
        }
        return effects
    }

    mutating func setVringEnable(_ state: VringState, code: RequestCode) throws(SessionError) -> [SessionEffect] {
        try requireOwner(code)
        guard protocolFeaturesNegotiated else {
            throw .featureNotNegotiated(code, feature: "VHOST_USER_F_PROTOCOL_FEATURES")
        }
        let i = try vringIndex(code, state.index)
        guard state.num <= 1 else { throw .unsupportedRequest(code, reason: "enable value \(state.num) is not 0 or 1") }
        vrings[i].enabled = state.num == 1
        vrings[i].enableExplicit = true
        return [.ringEnabled(index: i, state.num == 1)]
    }

    /// Adds device start before the first ring that starts and device stop
    /// after the last ring that stops (the one place that decides when the
    /// device runs).
    mutating func deviceTransitions(_ effects: [SessionEffect]) -> [SessionEffect] {
        var out: [SessionEffect] = []
        out.reserveCapacity(effects.count + 1)
        for effect in effects {
            if case .ringStarted = effect, !deviceRunning {
                deviceRunning = true
                out.append(.deviceStarted(features: ackedFeatures ?? 0))
            }
            out.append(effect)
        }
        // The device stops with the VRING_STOP of its last ring. A ring that
        // only went back to waiting for a translation (SET_VRING_ADDR on a
        // started ring, new addresses unmapped) was not stopped at VM2: the
        // device keeps running until that ring starts again or stops.
        if deviceRunning, !vrings.contains(where: \.started),
           let last = out.lastIndex(where: { if case .ringStopped = $0 { true } else { false } }) {
            deviceRunning = false
            out.insert(.deviceStopped(features: ackedFeatures ?? 0), at: last + 1)
        }
        return out
    }

    /// The device (VM2) reports how far it consumed ring `index`; GET_VRING_BASE
    /// returns this. Ignored for an unknown ring.
    public mutating func noteDeviceProgress(ring index: Int, lastAvail: UInt16) {
        guard vrings.indices.contains(index) else { return }
        vrings[index].base = UInt32(lastAvail)
    }

    /// What the rings waiting for a translation still miss: the first
    /// unmapped address of each and the access it needs (to raise a miss
    /// again once the last one went unanswered for long enough).
    public func ringTranslationsNeeded() -> [(bus: BusAddress, permission: Permission)] {
        var needed: [(bus: BusAddress, permission: Permission)] = []
        for ring in vrings where ring.awaitingTranslation {
            guard let size = ring.size, let a = ring.address else { continue }
            let parts: [(UInt64, UInt64, Permission)] = [
                (a.descriptor, VringLayout.descriptorTableSize(size), .read),
                (a.available, VringLayout.availRingSize(size), .read),
                (a.used, VringLayout.usedRingSize(size), .readWrite),
            ]
            for (address, length, permission) in parts {
                do {
                    try addressSpace.checkAccess(BusAddress(address), length: length, needed: permission)
                } catch {
                    if case .notMapped(_, _, _, let missing) = error { needed.append((missing, permission)) }
                    break
                }
            }
        }
        return needed
    }

    // MARK: rings

    /// Starts vring `i` when it has a size, addresses and a kick: translates
    /// the ring addresses to bus addresses and validates them. In iommu mode
    /// an unmapped part raises an IOTLB miss and the ring waits.
    mutating func startIfReady(_ i: Int) throws(SessionError) -> [SessionEffect] {
        let ring = vrings[i]
        guard !ring.started, ring.kick != .unset else { return [] }
        guard let size = ring.size else { throw .vringNotConfigured(index: i, missing: "SET_VRING_NUM") }
        guard let address = ring.address else { throw .vringNotConfigured(index: i, missing: "SET_VRING_ADDR") }
        let parts: [(String, UInt64, UInt64)] = [
            ("descriptor", address.descriptor, VringLayout.descriptorTableSize(size)),
            ("avail", address.available, VringLayout.availRingSize(size)),
            ("used", address.used, VringLayout.usedRingSize(size)),
        ]
        var bus: [BusAddress] = []
        for (name, value, length) in parts {
            if iommuPlatform {
                bus.append(BusAddress(value))
            } else {
                guard let gpa = regions.guestPhysical(ofUser: FrontendUserAddress(value), length: length) else {
                    throw .ringAddressNotTranslatable(index: i, part: name, address: value)
                }
                bus.append(BusAddress(gpa.rawValue))
            }
        }
        let layout = VringLayout(queueSize: size, descriptorTable: bus[0], availRing: bus[1], usedRing: bus[2])
        do {
            try addressSpace.validate(layout)
        } catch {
            if iommuPlatform, case .notMapped(let purpose, _, _, let missing) = error {
                vrings[i].phase = .awaitingTranslation
                let perm: Permission = purpose == .usedRing ? .readWrite : .read
                return hasBackendChannel ? [.raiseMiss(bus: missing, permission: perm)] : []
            }
            throw .addressSpace(error)
        }
        vrings[i].phase = .started(layout)
        return [.ringStarted(index: i, layout)]
    }

    mutating func resetDevice() -> [SessionEffect] {
        var effects: [SessionEffect] = []
        for i in vrings.indices {
            if vrings[i].active { effects.append(.ringStopped(index: i)) }
            for (kind, state) in [(VringFileKind.kick, vrings[i].kick), (.call, vrings[i].call), (.err, vrings[i].err)] where state == .fd {
                effects.append(.setVringFile(kind, index: i, fdIndex: nil))
            }
            vrings[i] = VringSetup(enabled: !protocolFeaturesNegotiated)
        }
        if addressSpace.mode != .identity {
            let plan = addressSpace.unmapAll()
            if !plan.isEmpty { effects.append(.window(plan)) }
        }
        status = 0
        ackedFeatures = nil
        if logging.on || logging.area != nil {
            if logging.on { effects.append(.deviceLog(nil, reply: nil, refusal: nil)) }
            effects.append(.releaseLogFile)
        }
        logging = LoggingState()
        return effects
    }

    /// Everything to undo when the connection ends: stop rings, unmap every
    /// mapping, release every region fd.
    public mutating func teardown() -> [SessionEffect] {
        var effects: [SessionEffect] = []
        for i in vrings.indices where vrings[i].active {
            effects.append(.ringStopped(index: i))
        }
        if deviceRunning { effects.append(.deviceStopped(features: ackedFeatures ?? 0)) }
        deviceRunning = false
        let plan = addressSpace.unmapAll()
        if !plan.isEmpty { effects.append(.window(plan)) }
        for region in regions.regions { effects.append(.releaseRegionFile(region.id)) }
        regions = MemoryRegionTable(maxRegions: configuration.maxMemSlots)
        vrings = Array(repeating: VringSetup(enabled: true), count: configuration.vringCount)
        // DEVICE reset ends VM2's logging too.
        if logging.area != nil { effects.append(.releaseLogFile) }
        logging = LoggingState()
        effects.append(.deviceReset)
        return effects
    }
}
