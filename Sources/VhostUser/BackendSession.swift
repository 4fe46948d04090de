import BridgeCore

/// What a bridge offers its vhost-user front end.
public struct BackendConfiguration: Equatable, Sendable {
    public var bridgeName: String
    public var addressSpace: AddressSpaceConfiguration
    /// Device feature bits VM2's device implements (VERSION_1 by default).
    /// Transport bits are added by `offeredFeatures`.
    public var deviceFeatures: UInt64
    public var protocolFeatures: ProtocolFeatures
    /// GET_QUEUE_NUM answer; the session accepts vring indices below 2 × this.
    public var queuePairs: Int
    /// GET_MAX_MEM_SLOTS answer and the memory-table limit.
    public var maxMemSlots: Int

    public static let defaultProtocolFeatures: ProtocolFeatures = [.mq, .replyAck, .backendReq, .configureMemSlots, .resetDevice, .status]

    public init(bridgeName: String, addressSpace: AddressSpaceConfiguration, deviceFeatures: UInt64 = FeatureBit.version1,
                protocolFeatures: ProtocolFeatures = BackendConfiguration.defaultProtocolFeatures,
                queuePairs: Int = 1, maxMemSlots: Int = 32) {
        self.bridgeName = bridgeName
        self.addressSpace = addressSpace
        self.deviceFeatures = deviceFeatures
        self.protocolFeatures = protocolFeatures
        self.queuePairs = max(1, min(queuePairs, 128))
        self.maxMemSlots = max(VhostUserCodec.maxMemTableRegions, maxMemSlots)
    }

    /// GET_FEATURES: the device's bits, PROTOCOL_FEATURES, and
    /// IOMMU_PLATFORM in the modes where VM1 has a vIOMMU.
    public var offeredFeatures: UInt64 {
        var f = deviceFeatures | FeatureBit.protocolFeatures
        if addressSpace.mode != .identity { f |= FeatureBit.iommuPlatform } else { f &= ~FeatureBit.iommuPlatform }
        return f & ~FeatureBit.vhostLogAll
    }

    public var vringCount: Int { 2 * queuePairs }
}

/// One fd that came with the message being handled: its position in the
/// message, what the kernel says it is, and for memory fds the file's size
/// (fstat) so regions can be checked against it.
public struct ReceivedFile: Equatable, Sendable {
    public var index: Int
    public var size: UInt64?
    public var kind: FileKind
    /// Huge page size of hugetlbfs memory (fstatfs), 0 for ordinary pages.
    public var hugePageSize: UInt64
    public init(index: Int, size: UInt64?, kind: FileKind, hugePageSize: UInt64 = 0) {
        self.index = index; self.size = size; self.kind = kind; self.hugePageSize = hugePageSize
    }
}

public enum VringFileKind: String, Sendable, Equatable { case kick, call, err }

/// What the connection must do, in order, after a request was handled. Fds
/// are named by their index in the message; any received fd no effect claims
/// is closed by the connection.
public enum SessionEffect: Equatable, Sendable {
    case reply([UInt8])
    /// Take ownership of the message's fd as the backing of `region`.
    /// Always comes before the window plan that maps it.
    case adoptRegionFile(RegionID, fdIndex: Int)
    case window(WindowPlan)
    /// Close the fd backing `region` (after the plan that unmapped it).
    case releaseRegionFile(RegionID)
    /// Replace vring `index`'s kick/call/err fd (nil: none, i.e. polling);
    /// the old one is closed.
    case setVringFile(VringFileKind, index: Int, fdIndex: Int?)
    case adoptBackendChannel(fdIndex: Int)
    /// Send on the back-end channel (an IOTLB miss).
    case sendBackend([UInt8])
    /// A ring needs `bus` mapped with `permission` before it can start: raise
    /// an IOTLB miss (`missMessage`) unless one for that page is still
    /// outstanding — the connection keeps track (`OutstandingMisses`).
    case raiseMiss(bus: BusAddress, permission: Permission)
    case ringStarted(index: Int, VringLayout)
    case ringStopped(index: Int)
    /// The device starts (just before its first ring) or stops (just after
    /// its last ring stopped), with VM1's negotiated features.
    case deviceStarted(features: UInt64)
    case deviceStopped(features: UInt64)
    /// The session ended: whatever VM2 held of it is gone.
    case deviceReset
    case ringEnabled(index: Int, Bool)
}

/// Why the session refused a request. Each case names the request and rule.
public enum SessionError: Error, Equatable, Sendable, CustomStringConvertible {
    case ownerNotSet(RequestCode)
    case featureNotNegotiated(RequestCode, feature: String)
    case protocolFeatureNotNegotiated(RequestCode, ProtocolFeatures)
    case unsupportedFeatures(UInt64)
    case unsupportedProtocolFeatures(ProtocolFeatures)
    case modeNeedsIOMMUPlatform(BridgeMode)
    case unsupportedRequest(RequestCode, reason: String)
    case vringIndex(RequestCode, index: UInt32, count: Int)
    case queueSize(UInt32)
    case vringNotConfigured(index: Int, missing: String)
    case ringAddressNotTranslatable(index: Int, part: String, address: UInt64)
    case iotlbTypeFromFrontend(IOTLBType)
    case memory(MemoryRegionError)
    case addressSpace(AddressSpaceError)
    case vringBaseOutOfRange(UInt32)
    /// A fd that is not what the request needs (checked on the fd itself).
    case wrongFileKind(RequestCode, vring: Int?, got: FileKind, needed: FileKind)

    /// Stable label for metrics ("refusals by rule").
    public var rule: String {
        switch self {
        case .ownerNotSet: "owner"
        case .featureNotNegotiated, .protocolFeatureNotNegotiated: "negotiation"
        case .unsupportedFeatures, .unsupportedProtocolFeatures: "unsupported-feature"
        case .modeNeedsIOMMUPlatform: "mode"
        case .unsupportedRequest: "unsupported-request"
        case .vringIndex: "vring-index"
        case .queueSize: "queue-size"
        case .vringNotConfigured: "vring-state"
        case .ringAddressNotTranslatable: "ring-address"
        case .iotlbTypeFromFrontend: "iotlb-type"
        case .memory(let e): e.rule
        case .addressSpace(let e): e.rule
        case .vringBaseOutOfRange: "vring-base"
        case .wrongFileKind: "fd-kind"
        }
    }

    public var description: String {
        switch self {
        case .ownerNotSet(let code): "\(code) before SET_OWNER"
        case .featureNotNegotiated(let code, let feature): "\(code) needs \(feature), which was not negotiated"
        case .protocolFeatureNotNegotiated(let code, let f): "\(code) needs protocol feature \(f), which was not negotiated"
        case .unsupportedFeatures(let bits): "SET_FEATURES acks bits \(Hex(bits)) the back end did not offer"
        case .unsupportedProtocolFeatures(let f): "SET_PROTOCOL_FEATURES acks \(f), which the back end did not offer"
        case .modeNeedsIOMMUPlatform(let mode): "the bridge is in \(mode) mode: the front end must negotiate VIRTIO_F_IOMMU_PLATFORM (VM1 needs a vIOMMU)"
        case .unsupportedRequest(let code, let reason): "\(code) is not supported: \(reason)"
        case .vringIndex(let code, let index, let count): "\(code) names vring \(index); this device has \(count)"
        case .queueSize(let n): "queue size \(n) is not a power of two in 1...32768"
        case .vringNotConfigured(let i, let missing): "vring \(i) cannot start: \(missing) not set"
        case .ringAddressNotTranslatable(let i, let part, let a): "vring \(i) \(part) address \(Hex(a)) is not inside a memory region"
        case .iotlbTypeFromFrontend(let t): "IOTLB \(t) is a back-end message; the front end may only send update or invalidate"
        case .memory(let e): e.description
        case .addressSpace(let e): e.description
        case .vringBaseOutOfRange(let n): "vring base \(n) does not fit a 16-bit ring index"
        case .wrongFileKind(let code, let vring, let got, let needed):
            "\(code)\(vring.map { " for vring \($0)" } ?? ""): the fd is \(got), not \(needed)"
        }
    }
}

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
    public var started = false
    /// Waiting for IOTLB updates for its ring addresses (iommu mode).
    public var awaitingTranslation = false
    public var layout: VringLayout?
}

/// Counters a session keeps; the daemon aggregates them per bridge.
public struct SessionStatistics: Equatable, Sendable {
    public var requests = 0
    public var iotlbUpdates = 0
    public var iotlbInvalidates = 0
    public var iotlbMissesSent = 0
    public var refusals: [String: Int] = [:]
    /// The first requests of the session, in order (at most 200): what a
    /// front end actually sends.
    public var requestLog: [RequestCode] = []
    public init() {}
}

/// The vhost-user back end of one bridge for one front-end connection: a pure
/// state machine. `handle` takes a decoded request and the fds that came with
/// it, and returns the effects to carry out. A refused request changes nothing
/// (every handler validates before its first mutation).
public struct BackendSession: Sendable {
    public let configuration: BackendConfiguration
    public private(set) var ownerSet = false
    /// nil until SET_FEATURES.
    public private(set) var ackedFeatures: UInt64?
    public private(set) var ackedProtocolFeatures: ProtocolFeatures = []
    private var protocolFeaturesSet = false
    public private(set) var regions: MemoryRegionTable
    public private(set) var addressSpace: AddressSpace
    public private(set) var vrings: [VringSetup]
    public private(set) var hasBackendChannel = false
    public private(set) var status: UInt64 = 0
    public private(set) var statistics = SessionStatistics()
    /// Some ring is started (the device runs, as VM2 was told).
    public private(set) var deviceRunning = false

    /// The observable state, for tests ("nothing changed") and for status output.
    public struct Snapshot: Equatable, Sendable {
        public var ownerSet: Bool
        public var ackedFeatures: UInt64?
        public var ackedProtocolFeatures: ProtocolFeatures
        public var regions: [MemoryRegion]
        public var mappings: [Mapping]
        public var vrings: [VringSetup]
        public var hasBackendChannel: Bool
        public var status: UInt64
    }

    public var snapshot: Snapshot {
        Snapshot(ownerSet: ownerSet, ackedFeatures: ackedFeatures, ackedProtocolFeatures: ackedProtocolFeatures,
                 regions: regions.regions, mappings: addressSpace.mappings, vrings: vrings,
                 hasBackendChannel: hasBackendChannel, status: status)
    }

    public init(_ configuration: BackendConfiguration) throws(ConfigurationError) {
        self.configuration = configuration
        self.addressSpace = try AddressSpace(configuration.addressSpace)
        self.regions = MemoryRegionTable(maxRegions: configuration.maxMemSlots)
        self.vrings = Array(repeating: VringSetup(enabled: true), count: configuration.vringCount)
    }

    /// The outcome of one request: effects to carry out, and the error when it
    /// was refused (the effects then hold the nack, or nothing).
    public struct Outcome: Equatable, Sendable {
        public var effects: [SessionEffect]
        public var error: SessionError?
        /// The request was refused and no ack was asked for: per the spec the
        /// back end then closes the connection.
        public var closeConnection: Bool
    }

    /// Whether PROTOCOL_FEATURES is in force (SET_PROTOCOL_FEATURES seen, or
    /// bit 30 acked): rings then start disabled.
    public var protocolFeaturesNegotiated: Bool {
        protocolFeaturesSet || (ackedFeatures ?? 0) & FeatureBit.protocolFeatures != 0
    }

    public var iommuPlatform: Bool { (ackedFeatures ?? 0) & FeatureBit.iommuPlatform != 0 }

    private var replyAck: Bool { ackedProtocolFeatures.contains(.replyAck) }

    /// Handles one request. `needReply` is the header's NEED_REPLY flag.
    public mutating func handle(_ request: FrontendRequest, needReply: Bool = false, files: [ReceivedFile] = []) -> Outcome {
        statistics.requests += 1
        if statistics.requestLog.count < 200 { statistics.requestLog.append(request.code) }
        let wantsAck = needReply && replyAck
        do {
            var effects = deviceTransitions(try apply(request, files: files))
            if wantsAck && !request.code.hasReply {
                effects.append(.reply(VhostUserCodec.encodeReply(to: request.code, .u64(0))))
            }
            return Outcome(effects: effects, error: nil, closeConnection: false)
        } catch {
            statistics.refusals[error.rule, default: 0] += 1
            if request.code == .getConfig {
                return Outcome(effects: [.reply(VhostUserCodec.encodeReply(to: .getConfig, .empty))], error: error, closeConnection: false)
            }
            if wantsAck && !request.code.hasReply {
                return Outcome(effects: [.reply(VhostUserCodec.encodeReply(to: request.code, .u64(1)))], error: error, closeConnection: false)
            }
            return Outcome(effects: [], error: error, closeConnection: true)
        }
    }

    /// Caps the mappings the next requests may leave (the process-wide
    /// mapping budget's share for this bridge; nil: no cap but `maxMappings`).
    public mutating func limitMappings(to ceiling: Int?) {
        addressSpace.mappingCeiling = ceiling
    }

    /// Adds device start before the first ring that starts and device stop
    /// after the last ring that stops (the one place that decides when the
    /// device runs).
    private mutating func deviceTransitions(_ effects: [SessionEffect]) -> [SessionEffect] {
        var out: [SessionEffect] = []
        out.reserveCapacity(effects.count + 1)
        for effect in effects {
            if case .ringStarted = effect, !deviceRunning {
                deviceRunning = true
                out.append(.deviceStarted(features: ackedFeatures ?? 0))
            }
            out.append(effect)
        }
        if deviceRunning, !vrings.contains(where: \.started) {
            deviceRunning = false
            let last = out.lastIndex { if case .ringStopped = $0 { true } else { false } }
            out.insert(.deviceStopped(features: ackedFeatures ?? 0), at: last.map { $0 + 1 } ?? out.endIndex)
        }
        return out
    }

    /// A message refused before it reached `handle` (its header or payload did
    /// not decode): counted like any other refusal, so `stats` shows it.
    public mutating func noteUndecodable(_ code: RequestCode?, _ error: VhostUserError) {
        statistics.requests += 1
        if let code, statistics.requestLog.count < 200 { statistics.requestLog.append(code) }
        statistics.refusals[error.rule, default: 0] += 1
    }

    // MARK: dispatch

    private func requireOwner(_ code: RequestCode) throws(SessionError) {
        guard ownerSet else { throw .ownerNotSet(code) }
    }

    private func requireProtocol(_ code: RequestCode, _ feature: ProtocolFeatures) throws(SessionError) {
        guard ackedProtocolFeatures.contains(feature) else { throw .protocolFeatureNotNegotiated(code, feature) }
    }

    /// Guest memory arrives as regular files (memfd, tmpfs, hugetlbfs): a
    /// pipe, socket or eventfd cannot back a mapping.
    private func requireMemoryFiles(_ code: RequestCode, _ files: [ReceivedFile]) throws(SessionError) {
        if let bad = files.first(where: { $0.kind != .regularFile }) {
            throw .wrongFileKind(code, vring: nil, got: bad.kind, needed: .regularFile)
        }
    }

    private func vringIndex(_ code: RequestCode, _ index: UInt32) throws(SessionError) -> Int {
        guard index < UInt32(vrings.count) else { throw .vringIndex(code, index: index, count: vrings.count) }
        return Int(index)
    }

    private func reply(_ code: RequestCode, _ payload: VhostUserCodec.ReplyPayload) -> SessionEffect {
        .reply(VhostUserCodec.encodeReply(to: code, payload))
    }

    private mutating func apply(_ request: FrontendRequest, files: [ReceivedFile]) throws(SessionError) -> [SessionEffect] {
        let code = request.code
        switch request {
        case .getFeatures:
            return [reply(code, .u64(configuration.offeredFeatures))]

        case .setFeatures(let features):
            try requireOwner(code)
            let extra = features & ~configuration.offeredFeatures
            guard extra == 0 else { throw .unsupportedFeatures(extra) }
            if configuration.addressSpace.mode != .identity, features & FeatureBit.iommuPlatform == 0 {
                throw .modeNeedsIOMMUPlatform(configuration.addressSpace.mode)
            }
            let firstTime = ackedFeatures == nil
            ackedFeatures = features
            if firstTime && protocolFeaturesNegotiated {
                // Rings start disabled once PROTOCOL_FEATURES is in force —
                // unless the front end already said otherwise.
                for i in vrings.indices where !vrings[i].started && !vrings[i].enableExplicit { vrings[i].enabled = false }
            }
            return []

        case .getProtocolFeatures:
            return [reply(code, .u64(configuration.protocolFeatures.rawValue))]

        case .setProtocolFeatures(let raw):
            let requested = ProtocolFeatures(rawValue: raw)
            let extra = requested.subtracting(configuration.protocolFeatures)
            guard extra.isEmpty else { throw .unsupportedProtocolFeatures(extra) }
            ackedProtocolFeatures = requested
            if !protocolFeaturesSet {
                protocolFeaturesSet = true
                for i in vrings.indices where !vrings[i].started && !vrings[i].enableExplicit { vrings[i].enabled = false }
            }
            return []

        case .setOwner:
            ownerSet = true
            return []

        case .resetOwner:
            // Deprecated: disable all rings, keep every other state.
            try requireOwner(code)
            var effects: [SessionEffect] = []
            for i in vrings.indices where vrings[i].enabled {
                vrings[i].enabled = false
                effects.append(.ringEnabled(index: i, false))
            }
            return effects

        case .getQueueNum:
            guard configuration.protocolFeatures.contains(.mq) else { throw .protocolFeatureNotNegotiated(code, .mq) }
            return [reply(code, .u64(UInt64(configuration.queuePairs)))]

        case .getMaxMemSlots:
            try requireProtocol(code, .configureMemSlots)
            return [reply(code, .u64(UInt64(configuration.maxMemSlots)))]

        case .setMemTable(let descriptors):
            try requireOwner(code)
            try requireMemoryFiles(code, files)
            return try setMemTable(descriptors, files: files)

        case .addMemReg(let d):
            try requireOwner(code)
            try requireProtocol(code, .configureMemSlots)
            try requireMemoryFiles(code, files)
            return try addRegion(d, file: files.first)

        case .remMemReg(let d):
            try requireOwner(code)
            try requireProtocol(code, .configureMemSlots)
            let region: MemoryRegion
            do { region = try regions.remove(matching: d) } catch { throw .memory(error) }
            return [.window(addressSpace.unmapRegion(region.id)), .releaseRegionFile(region.id)]

        case .setBackendReqFD:
            try requireProtocol(code, .backendReq)
            if let file = files.first, file.kind != .socket {
                throw .wrongFileKind(code, vring: nil, got: file.kind, needed: .socket)
            }
            hasBackendChannel = true
            return [.adoptBackendChannel(fdIndex: files.first?.index ?? 0)]

        case .setVringNum(let state):
            try requireOwner(code)
            let i = try vringIndex(code, state.index)
            let n = state.num
            guard n >= 1, n <= VringLayout.maximumQueueSize, n.nonzeroBitCount == 1 else { throw .queueSize(n) }
            vrings[i].size = n
            return []

        case .setVringAddr(let address):
            try requireOwner(code)
            let i = try vringIndex(code, address.index)
            guard address.flags & VringAddress.flagLog == 0 else {
                throw .unsupportedRequest(code, reason: "dirty logging (VHOST_VRING_F_LOG) is not offered")
            }
            guard address.flags & ~VringAddress.flagLog == 0 else {
                throw .unsupportedRequest(code, reason: "unknown vring flags \(Hex(UInt64(address.flags)))")
            }
            let previous = vrings[i]
            vrings[i].address = address
            if previous.started || previous.awaitingTranslation {
                vrings[i].started = false
                vrings[i].awaitingTranslation = false
                do {
                    return try startIfReady(i)
                } catch {
                    vrings[i] = previous
                    throw error
                }
            }
            return []

        case .setVringBase(let state):
            try requireOwner(code)
            let i = try vringIndex(code, state.index)
            guard state.num <= 0xffff else { throw .vringBaseOutOfRange(state.num) }
            vrings[i].base = state.num
            return []

        case .getVringBase(let state):
            try requireOwner(code)
            let i = try vringIndex(code, state.index)
            var effects: [SessionEffect] = []
            if vrings[i].started || vrings[i].awaitingTranslation {
                effects.append(.ringStopped(index: i))
            }
            vrings[i].started = false
            vrings[i].awaitingTranslation = false
            vrings[i].layout = nil
            if vrings[i].kick == .fd { effects.append(.setVringFile(.kick, index: i, fdIndex: nil)) }
            vrings[i].kick = .unset
            effects.append(reply(code, .vringState(VringState(index: UInt32(i), num: vrings[i].base))))
            return effects

        case .setVringKick(let ref), .setVringCall(let ref), .setVringErr(let ref):
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

        case .setVringEnable(let state):
            try requireOwner(code)
            guard protocolFeaturesNegotiated else {
                throw .featureNotNegotiated(code, feature: "VHOST_USER_F_PROTOCOL_FEATURES")
            }
            let i = try vringIndex(code, state.index)
            guard state.num <= 1 else { throw .unsupportedRequest(code, reason: "enable value \(state.num) is not 0 or 1") }
            vrings[i].enabled = state.num == 1
            vrings[i].enableExplicit = true
            return [.ringEnabled(index: i, state.num == 1)]

        case .iotlb(let message):
            try requireOwner(code)
            guard iommuPlatform else { throw .featureNotNegotiated(code, feature: "VIRTIO_F_IOMMU_PLATFORM") }
            return try iotlb(message)

        case .setStatus(let value):
            try requireOwner(code)
            try requireProtocol(code, .status)
            status = value
            return []

        case .getStatus:
            try requireProtocol(code, .status)
            return [reply(code, .u64(status))]

        case .resetDevice:
            try requireProtocol(code, .resetDevice)
            return resetDevice()

        case .setLogBase, .setLogFD:
            throw .unsupportedRequest(code, reason: "dirty-page logging (live migration) is not offered")
        case .sendRARP:
            throw .protocolFeatureNotNegotiated(code, .rarp)
        case .netSetMTU:
            throw .protocolFeatureNotNegotiated(code, .mtu)
        case .setVringEndian:
            throw .protocolFeatureNotNegotiated(code, .crossEndian)
        case .getConfig, .setConfig:
            try requireProtocol(code, .config)
            throw .unsupportedRequest(code, reason: "no device config space is relayed yet")
        case .vringKick:
            throw .protocolFeatureNotNegotiated(code, .inbandNotifications)
        }
    }

    // MARK: memory table

    private mutating func setMemTable(_ descriptors: [RegionDescriptor], files: [ReceivedFile]) throws(SessionError) -> [SessionEffect] {
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

    private mutating func addRegion(_ d: RegionDescriptor, file: ReceivedFile?) throws(SessionError) -> [SessionEffect] {
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

    private mutating func iotlb(_ m: IOTLBMessage) throws(SessionError) -> [SessionEffect] {
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
                vrings[i].awaitingTranslation = false
                if let more = try? startIfReady(i) { effects += more } else { vrings[i].awaitingTranslation = true }
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

    /// A back-end IOTLB miss for `bus` (what the front end must map).
    public mutating func missMessage(bus: BusAddress, permission: Permission) -> SessionEffect? {
        guard hasBackendChannel, iommuPlatform else { return nil }
        statistics.iotlbMissesSent += 1
        return .sendBackend(VhostUserCodec.encodeBackendIOTLB(
            IOTLBMessage(iova: bus.rawValue, size: 0, userAddress: 0, permission: permission, type: .miss)))
    }

    // MARK: rings

    /// Starts vring `i` when it has a size, addresses and a kick: translates
    /// the ring addresses to bus addresses and validates them. In iommu mode
    /// an unmapped part raises an IOTLB miss and the ring waits.
    private mutating func startIfReady(_ i: Int) throws(SessionError) -> [SessionEffect] {
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
                vrings[i].awaitingTranslation = true
                let perm: Permission = purpose == .usedRing ? .readWrite : .read
                return hasBackendChannel ? [.raiseMiss(bus: missing, permission: perm)] : []
            }
            throw .addressSpace(error)
        }
        vrings[i].started = true
        vrings[i].layout = layout
        return [.ringStarted(index: i, layout)]
    }

    private mutating func resetDevice() -> [SessionEffect] {
        var effects: [SessionEffect] = []
        for i in vrings.indices {
            if vrings[i].started || vrings[i].awaitingTranslation { effects.append(.ringStopped(index: i)) }
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
        return effects
    }

    /// Everything to undo when the connection ends: stop rings, unmap every
    /// mapping, release every region fd.
    public mutating func teardown() -> [SessionEffect] {
        var effects: [SessionEffect] = []
        for i in vrings.indices where vrings[i].started || vrings[i].awaitingTranslation {
            effects.append(.ringStopped(index: i))
        }
        if deviceRunning { effects.append(.deviceStopped(features: ackedFeatures ?? 0)) }
        deviceRunning = false
        let plan = addressSpace.unmapAll()
        if !plan.isEmpty { effects.append(.window(plan)) }
        for region in regions.regions { effects.append(.releaseRegionFile(region.id)) }
        regions = MemoryRegionTable(maxRegions: configuration.maxMemSlots)
        vrings = Array(repeating: VringSetup(enabled: true), count: configuration.vringCount)
        effects.append(.deviceReset)
        return effects
    }
}
