import BridgeCore

/// What a bridge offers its vhost-user front end.
public struct BackendConfiguration: Equatable, Sendable {
    public var bridgeName: String
    public var addressSpace: AddressSpaceConfiguration
    /// Device feature bits VM2's device implements (VERSION_1, EVENT_IDX and
    /// MRG_RXBUF by default: what `DeviceEngine` serves).
    /// Transport bits are added by `offeredFeatures`.
    public var deviceFeatures: UInt64
    public var protocolFeatures: ProtocolFeatures
    /// GET_QUEUE_NUM answer; the session accepts vring indices below 2 × this.
    public var queuePairs: Int
    /// GET_MAX_MEM_SLOTS answer and the memory-table limit.
    public var maxMemSlots: Int

    public static let defaultProtocolFeatures: ProtocolFeatures = [.mq, .logShmfd, .replyAck, .backendReq, .configureMemSlots, .resetDevice, .status]

    /// Queue pairs offered unless configured otherwise, and the most a bridge offers.
    public static let defaultQueuePairs = 8
    public static let maximumQueuePairs = 128

    public init(bridgeName: String, addressSpace: AddressSpaceConfiguration,
                deviceFeatures: UInt64 = VirtioNetFeatures.defaultOffer.rawValue,
                protocolFeatures: ProtocolFeatures = BackendConfiguration.defaultProtocolFeatures,
                queuePairs: Int = BackendConfiguration.defaultQueuePairs, maxMemSlots: Int = 32) {
        self.bridgeName = bridgeName
        self.addressSpace = addressSpace
        self.deviceFeatures = deviceFeatures
        self.protocolFeatures = protocolFeatures
        self.queuePairs = max(1, min(queuePairs, Self.maximumQueuePairs))
        self.maxMemSlots = max(VhostUserCodec.maxMemTableRegions, maxMemSlots)
    }

    /// GET_FEATURES: the device's bits, PROTOCOL_FEATURES, VHOST_F_LOG_ALL
    /// (VM1 can live-migrate: VM2 logs the pages it writes) when LOG_SHMFD
    /// is offered, and IOMMU_PLATFORM in the modes where VM1 has a vIOMMU.
    public var offeredFeatures: UInt64 {
        var f = deviceFeatures | FeatureBit.protocolFeatures
        // Several queue pairs: MQ, and the control queue front ends use to
        // enable them (QEMU and DPDK's virtio-user serve it themselves and
        // turn it into SET_VRING_ENABLE; it never reaches the back end).
        if queuePairs > 1 { f |= VirtioNetFeatures.mq.rawValue | VirtioNetFeatures.ctrlVq.rawValue }
        if addressSpace.mode != .identity { f |= FeatureBit.iommuPlatform } else { f &= ~FeatureBit.iommuPlatform }
        if protocolFeatures.contains(.logShmfd) { f |= FeatureBit.vhostLogAll } else { f &= ~FeatureBit.vhostLogAll }
        return f
    }

    public var vringCount: Int { 2 * queuePairs }
}
