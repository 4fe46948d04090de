/// Front-end → back-end request codes (vhost-user spec, "Front-end message types").
public enum RequestCode: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case getFeatures = 1
    case setFeatures = 2
    case setOwner = 3
    case resetOwner = 4
    case setMemTable = 5
    case setLogBase = 6
    case setLogFD = 7
    case setVringNum = 8
    case setVringAddr = 9
    case setVringBase = 10
    case getVringBase = 11
    case setVringKick = 12
    case setVringCall = 13
    case setVringErr = 14
    case getProtocolFeatures = 15
    case setProtocolFeatures = 16
    case getQueueNum = 17
    case setVringEnable = 18
    case sendRARP = 19
    case netSetMTU = 20
    case setBackendReqFD = 21
    case iotlbMsg = 22
    case setVringEndian = 23
    case getConfig = 24
    case setConfig = 25
    case resetDevice = 34
    case vringKick = 35
    case getMaxMemSlots = 36
    case addMemReg = 37
    case remMemReg = 38
    case setStatus = 39
    case getStatus = 40

    /// Requests the back end always answers with a reply body (spec,
    /// "Communication"); every other one is acked only with REPLY_ACK.
    public var hasReply: Bool {
        switch self {
        // (SET_LOG_BASE too, once LOG_SHMFD is negotiated:
        // `BackendSession.repliesInherently`.)
        case .getFeatures, .getProtocolFeatures, .getVringBase, .getQueueNum, .getConfig, .getMaxMemSlots, .getStatus: true
        default: false
        }
    }

    /// The spec's name, for logs and errors.
    public var description: String {
        switch self {
        case .getFeatures: "GET_FEATURES"
        case .setFeatures: "SET_FEATURES"
        case .setOwner: "SET_OWNER"
        case .resetOwner: "RESET_OWNER"
        case .setMemTable: "SET_MEM_TABLE"
        case .setLogBase: "SET_LOG_BASE"
        case .setLogFD: "SET_LOG_FD"
        case .setVringNum: "SET_VRING_NUM"
        case .setVringAddr: "SET_VRING_ADDR"
        case .setVringBase: "SET_VRING_BASE"
        case .getVringBase: "GET_VRING_BASE"
        case .setVringKick: "SET_VRING_KICK"
        case .setVringCall: "SET_VRING_CALL"
        case .setVringErr: "SET_VRING_ERR"
        case .getProtocolFeatures: "GET_PROTOCOL_FEATURES"
        case .setProtocolFeatures: "SET_PROTOCOL_FEATURES"
        case .getQueueNum: "GET_QUEUE_NUM"
        case .setVringEnable: "SET_VRING_ENABLE"
        case .sendRARP: "SEND_RARP"
        case .netSetMTU: "NET_SET_MTU"
        case .setBackendReqFD: "SET_BACKEND_REQ_FD"
        case .iotlbMsg: "IOTLB_MSG"
        case .setVringEndian: "SET_VRING_ENDIAN"
        case .getConfig: "GET_CONFIG"
        case .setConfig: "SET_CONFIG"
        case .resetDevice: "RESET_DEVICE"
        case .vringKick: "VRING_KICK"
        case .getMaxMemSlots: "GET_MAX_MEM_SLOTS"
        case .addMemReg: "ADD_MEM_REG"
        case .remMemReg: "REM_MEM_REG"
        case .setStatus: "SET_STATUS"
        case .getStatus: "GET_STATUS"
        }
    }
}

/// Back-end → front-end request codes (on the back-end channel).
public enum BackendRequestCode: UInt32, Sendable, CustomStringConvertible {
    case iotlbMsg = 1
    case configChange = 2
    public var description: String { self == .iotlbMsg ? "BACKEND_IOTLB_MSG" : "BACKEND_CONFIG_CHANGE_MSG" }
}

/// Header flag bits.
public enum HeaderFlags {
    public static let versionMask: UInt32 = 0x3
    public static let version: UInt32 = 0x1
    public static let reply: UInt32 = 1 << 2
    public static let needReply: UInt32 = 1 << 3
    /// Every bit the spec defines; anything else from a peer is refused.
    public static let known: UInt32 = versionMask | reply | needReply
}

/// Virtio / vhost feature bits the bridge cares about.
public enum FeatureBit {
    public static let notifyOnEmpty: UInt64 = 1 << 24
    public static let vhostLogAll: UInt64 = 1 << 26
    public static let protocolFeatures: UInt64 = 1 << 30
    public static let version1: UInt64 = 1 << 32
    public static let iommuPlatform: UInt64 = 1 << 33
    public static let ringPacked: UInt64 = 1 << 34
}

/// vhost-user protocol feature bits.
public struct ProtocolFeatures: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let mq = ProtocolFeatures(rawValue: 1 << 0)
    public static let logShmfd = ProtocolFeatures(rawValue: 1 << 1)
    public static let rarp = ProtocolFeatures(rawValue: 1 << 2)
    public static let replyAck = ProtocolFeatures(rawValue: 1 << 3)
    public static let mtu = ProtocolFeatures(rawValue: 1 << 4)
    public static let backendReq = ProtocolFeatures(rawValue: 1 << 5)
    public static let crossEndian = ProtocolFeatures(rawValue: 1 << 6)
    public static let config = ProtocolFeatures(rawValue: 1 << 9)
    public static let backendSendFD = ProtocolFeatures(rawValue: 1 << 10)
    public static let hostNotifier = ProtocolFeatures(rawValue: 1 << 11)
    public static let inflightShmfd = ProtocolFeatures(rawValue: 1 << 12)
    public static let resetDevice = ProtocolFeatures(rawValue: 1 << 13)
    public static let inbandNotifications = ProtocolFeatures(rawValue: 1 << 14)
    public static let configureMemSlots = ProtocolFeatures(rawValue: 1 << 15)
    public static let status = ProtocolFeatures(rawValue: 1 << 16)

    static let names: [(ProtocolFeatures, String)] = [
        (.mq, "MQ"), (.logShmfd, "LOG_SHMFD"), (.rarp, "RARP"), (.replyAck, "REPLY_ACK"), (.mtu, "MTU"),
        (.backendReq, "BACKEND_REQ"), (.crossEndian, "CROSS_ENDIAN"), (.config, "CONFIG"),
        (.backendSendFD, "BACKEND_SEND_FD"), (.hostNotifier, "HOST_NOTIFIER"), (.inflightShmfd, "INFLIGHT_SHMFD"),
        (.resetDevice, "RESET_DEVICE"), (.inbandNotifications, "INBAND_NOTIFICATIONS"),
        (.configureMemSlots, "CONFIGURE_MEM_SLOTS"), (.status, "STATUS"),
    ]

    public var names: [String] {
        var out = Self.names.filter { contains($0.0) }.map(\.1)
        let known = Self.names.reduce(0) { $0 | $1.0.rawValue }
        if rawValue & ~known != 0 { out.append("0x" + String(rawValue & ~known, radix: 16)) }
        return out
    }

    public var description: String { names.isEmpty ? "none" : names.joined(separator: ",") }
}
