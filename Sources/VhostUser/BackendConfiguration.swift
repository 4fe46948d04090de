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
