import BridgeCore

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
    public internal(set) var ownerSet = false
    /// nil until SET_FEATURES.
    public internal(set) var ackedFeatures: UInt64?
    public internal(set) var ackedProtocolFeatures: ProtocolFeatures = []
    var protocolFeaturesSet = false
    public internal(set) var regions: MemoryRegionTable
    public internal(set) var addressSpace: AddressSpace
    public internal(set) var vrings: [VringSetup]
    public internal(set) var hasBackendChannel = false
    public internal(set) var status: UInt64 = 0
    public internal(set) var statistics = SessionStatistics()
    /// Some ring is started (the device runs, as VM2 was told).
    public internal(set) var deviceRunning = false
    /// Dirty-page logging (live migration): the log, and whether it is on.
    public internal(set) var logging = LoggingState()

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

    /// Whether `code` is answered whatever NEED_REPLY says: the GET_*
    /// requests, and SET_LOG_BASE once LOG_SHMFD is negotiated (QEMU reads
    /// its reply then; without LOG_SHMFD there is none).
    public func repliesInherently(_ code: RequestCode) -> Bool {
        code.hasReply || (code == .setLogBase && ackedProtocolFeatures.contains(.logShmfd))
    }

    /// Handles one request. `needReply` is the header's NEED_REPLY flag.
    public mutating func handle(_ request: FrontendRequest, needReply: Bool = false, files: [ReceivedFile] = []) -> Outcome {
        statistics.requests += 1
        if statistics.requestLog.count < 200 { statistics.requestLog.append(request.code) }
        let wantsAck = needReply && replyAck
        let inherent = repliesInherently(request.code)
        do {
            var effects = deviceTransitions(try apply(request, files: files))
            if wantsAck && !inherent {
                let ack = VhostUserCodec.encodeReply(to: request.code, .u64(0))
                // The ack to a request that took access away follows VM2's ack.
                if case .window(let plan)? = effects.last, plan.revokesAccess {
                    effects[effects.count - 1] = .windowThenReply(plan, reply: ack)
                } else if let i = effects.firstIndex(where: \.startsLoggingUnanswered) {
                    // LOG_ALL is acked once VM2 logs; nacked when it cannot.
                    effects[i] = effects[i].answered(ack, refusal: VhostUserCodec.encodeReply(to: request.code, .u64(1)))
                } else {
                    effects.append(.reply(ack))
                }
            }
            return Outcome(effects: effects, error: nil, closeConnection: false)
        } catch {
            statistics.refusals[error.rule, default: 0] += 1
            if request.code == .setLogBase, inherent { return refusedLogBase(error) }
            if request.code == .getConfig {
                return Outcome(effects: [.reply(VhostUserCodec.encodeReply(to: .getConfig, .empty))], error: error, closeConnection: false)
            }
            if wantsAck && !inherent {
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

    /// A message refused before it reached `handle` (its header or payload did
    /// not decode): counted like any other refusal, so `stats` shows it.
    public mutating func noteUndecodable(_ code: RequestCode?, _ error: VhostUserError) {
        statistics.requests += 1
        if let code, statistics.requestLog.count < 200 { statistics.requestLog.append(code) }
        statistics.refusals[error.rule, default: 0] += 1
    }

    /// The connection was refused for something outside any one request
    /// (e.g. `message-deadline`: a message that did not arrive in time),
    /// counted under `rule`.
    public mutating func noteRefusal(rule: String) {
        statistics.refusals[rule, default: 0] += 1
    }

    // MARK: dispatch

    func requireOwner(_ code: RequestCode) throws(SessionError) {
        guard ownerSet else { throw .ownerNotSet(code) }
    }

    func requireProtocol(_ code: RequestCode, _ feature: ProtocolFeatures) throws(SessionError) {
        guard ackedProtocolFeatures.contains(feature) else { throw .protocolFeatureNotNegotiated(code, feature) }
    }

    /// Guest memory arrives as regular files (memfd, tmpfs, hugetlbfs): a
    /// pipe, socket or eventfd cannot back a mapping.
    func requireMemoryFiles(_ code: RequestCode, _ files: [ReceivedFile]) throws(SessionError) {
        if let bad = files.first(where: { $0.kind != .regularFile }) {
            throw .wrongFileKind(code, vring: nil, got: bad.kind, needed: .regularFile)
        }
    }

    func vringIndex(_ code: RequestCode, _ index: UInt32) throws(SessionError) -> Int {
        guard index < UInt32(vrings.count) else { throw .vringIndex(code, index: index, count: vrings.count) }
        return Int(index)
    }

    func reply(_ code: RequestCode, _ payload: VhostUserCodec.ReplyPayload) -> SessionEffect {
        .reply(VhostUserCodec.encodeReply(to: code, payload))
    }

    mutating func apply(_ request: FrontendRequest, files: [ReceivedFile]) throws(SessionError) -> [SessionEffect] {
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
            let logEffects = try loggingChange(to: features)
            let firstTime = ackedFeatures == nil
            ackedFeatures = features
            logging.on = features & FeatureBit.vhostLogAll != 0
            if firstTime && protocolFeaturesNegotiated {
                // Rings start disabled once PROTOCOL_FEATURES is in force —
                // unless the front end already said otherwise.
                for i in vrings.indices where !vrings[i].started && !vrings[i].enableExplicit { vrings[i].enabled = false }
            }
            return logEffects

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
            try requireLogCovers(descriptors, adding: false, code: code)
            return try setMemTable(descriptors, files: files)

        case .addMemReg(let d):
            try requireOwner(code)
            try requireProtocol(code, .configureMemSlots)
            try requireMemoryFiles(code, files)
            try requireLogCovers([d], adding: true, code: code)
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
            return try setVringNum(state, code: code)

        case .setVringAddr(let address):
            return try setVringAddr(address, code: code)

        case .setVringBase(let state):
            return try setVringBase(state, code: code)

        case .getVringBase(let state):
            return try getVringBase(state, code: code)

        case .setVringKick(let ref), .setVringCall(let ref), .setVringErr(let ref):
            return try setVringFile(ref, code: code, files: files)

        case .setVringEnable(let state):
            return try setVringEnable(state, code: code)

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

        case .setLogBase(let log):
            return try setLogBase(log, files: files)

        case .setLogFD:
            // The eventfd a back end may signal after logging without
            // LOG_SHMFD; with a shared log nobody waits on it: checked,
            // then closed (the connection closes what no effect claims).
            try requireOwner(code)
            if let file = files.first, file.kind != .eventfd {
                throw .wrongFileKind(code, vring: nil, got: file.kind, needed: .eventfd)
            }
            return []
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


}
