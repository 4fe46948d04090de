import BridgeCore

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
    /// Dirty-page logging (live migration) cannot be done as asked.
    case dirtyLog(RequestCode, reason: String)

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
        case .dirtyLog: "dirty-log"
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
        case .dirtyLog(let code, let reason): "\(code): \(reason)"
        case .wrongFileKind(let code, let vring, let got, let needed):
            "\(code)\(vring.map { " for vring \($0)" } ?? ""): the fd is \(got), not \(needed)"
        }
    }
}
