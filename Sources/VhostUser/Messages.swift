import BridgeCore

/// The 12-byte header every vhost-user message starts with.
public struct MessageHeader: Equatable, Sendable {
    public static let size = 12
    public var request: UInt32
    public var flags: UInt32
    public var size: UInt32

    public init(request: UInt32, flags: UInt32, size: UInt32) {
        self.request = request
        self.flags = flags
        self.size = size
    }

    public var needsReply: Bool { flags & HeaderFlags.needReply != 0 }
    public var isReply: Bool { flags & HeaderFlags.reply != 0 }

    public var encoded: [UInt8] { FrameHeader(code: request, flags: flags, size: size).encoded }

    /// Decodes 12 bytes; no validation beyond the length.
    public static func decode(_ bytes: [UInt8]) throws(VhostUserError) -> MessageHeader {
        guard let h = FrameHeader(decoding: bytes) else { throw .truncatedHeader(got: bytes.count) }
        return MessageHeader(request: h.code, flags: h.flags, size: h.size)
    }
}

/// `{u32 index, u32 num}`.
public struct VringState: Equatable, Sendable {
    public var index: UInt32
    public var num: UInt32
    public init(index: UInt32, num: UInt32) { self.index = index; self.num = num }
}

/// `{u32 index, u32 flags, u64 desc, u64 used, u64 avail, u64 log}` — note
/// the wire order: descriptor, used, available.
public struct VringAddress: Equatable, Sendable {
    public static let flagLog: UInt32 = 1
    public var index: UInt32
    public var flags: UInt32
    public var descriptor: UInt64
    public var used: UInt64
    public var available: UInt64
    public var log: UInt64
    public init(index: UInt32, flags: UInt32 = 0, descriptor: UInt64, used: UInt64, available: UInt64, log: UInt64 = 0) {
        self.index = index; self.flags = flags; self.descriptor = descriptor
        self.used = used; self.available = available; self.log = log
    }
}

/// SET_VRING_KICK / CALL / ERR payload: bits 0–7 index, bit 8 "no fd".
public struct VringFileRef: Equatable, Sendable {
    public static let noFDBit: UInt64 = 1 << 8
    public var index: UInt8
    public var noFD: Bool
    public init(index: UInt8, noFD: Bool) { self.index = index; self.noFD = noFD }
    public var raw: UInt64 { UInt64(index) | (noFD ? Self.noFDBit : 0) }
}

/// IOTLB message types.
public enum IOTLBType: UInt8, Sendable, CustomStringConvertible {
    case miss = 1, update = 2, invalidate = 3, accessFail = 4
    public var description: String {
        switch self {
        case .miss: "miss"
        case .update: "update"
        case .invalidate: "invalidate"
        case .accessFail: "access-fail"
        }
    }
}

/// `struct vhost_iotlb_msg`: iova, size, uaddr, perm, type. The C struct is
/// 32 bytes (26 + padding); packed encoders send 26. Both are accepted.
public struct IOTLBMessage: Equatable, Sendable {
    public static let encodedSize = 32
    public static let packedSize = 26
    public var iova: UInt64
    public var size: UInt64
    public var userAddress: UInt64
    public var permission: Permission
    public var type: IOTLBType
    public init(iova: UInt64, size: UInt64, userAddress: UInt64, permission: Permission, type: IOTLBType) {
        self.iova = iova; self.size = size; self.userAddress = userAddress
        self.permission = permission; self.type = type
    }
}

/// GET_CONFIG / SET_CONFIG payload.
public struct ConfigSpace: Equatable, Sendable {
    public static let headerSize = 12
    public static let maximumSize = 256
    public var offset: UInt32
    public var flags: UInt32
    public var bytes: [UInt8]
    public init(offset: UInt32, flags: UInt32, bytes: [UInt8]) { self.offset = offset; self.flags = flags; self.bytes = bytes }
}

/// SET_LOG_BASE payload.
public struct LogArea: Equatable, Sendable {
    public var size: UInt64
    public var offset: UInt64
    public init(size: UInt64, offset: UInt64) { self.size = size; self.offset = offset }
}

/// One decoded front-end request with its typed payload. Fds travel
/// separately (the codec only checks how many there are).
public enum FrontendRequest: Equatable, Sendable {
    case getFeatures
    case setFeatures(UInt64)
    case setOwner
    case resetOwner
    case setMemTable([RegionDescriptor])
    case setLogBase(LogArea)
    case setLogFD
    case setVringNum(VringState)
    case setVringAddr(VringAddress)
    case setVringBase(VringState)
    case getVringBase(VringState)
    case setVringKick(VringFileRef)
    case setVringCall(VringFileRef)
    case setVringErr(VringFileRef)
    case getProtocolFeatures
    case setProtocolFeatures(UInt64)
    case getQueueNum
    case setVringEnable(VringState)
    case sendRARP(UInt64)
    case netSetMTU(UInt64)
    case setBackendReqFD
    case iotlb(IOTLBMessage)
    case setVringEndian(VringState)
    case getConfig(ConfigSpace)
    case setConfig(ConfigSpace)
    case resetDevice
    case vringKick(VringState)
    case getMaxMemSlots
    case addMemReg(RegionDescriptor)
    case remMemReg(RegionDescriptor)
    case setStatus(UInt64)
    case getStatus

    public var code: RequestCode {
        switch self {
        case .getFeatures: .getFeatures
        case .setFeatures: .setFeatures
        case .setOwner: .setOwner
        case .resetOwner: .resetOwner
        case .setMemTable: .setMemTable
        case .setLogBase: .setLogBase
        case .setLogFD: .setLogFD
        case .setVringNum: .setVringNum
        case .setVringAddr: .setVringAddr
        case .setVringBase: .setVringBase
        case .getVringBase: .getVringBase
        case .setVringKick: .setVringKick
        case .setVringCall: .setVringCall
        case .setVringErr: .setVringErr
        case .getProtocolFeatures: .getProtocolFeatures
        case .setProtocolFeatures: .setProtocolFeatures
        case .getQueueNum: .getQueueNum
        case .setVringEnable: .setVringEnable
        case .sendRARP: .sendRARP
        case .netSetMTU: .netSetMTU
        case .setBackendReqFD: .setBackendReqFD
        case .iotlb: .iotlbMsg
        case .setVringEndian: .setVringEndian
        case .getConfig: .getConfig
        case .setConfig: .setConfig
        case .resetDevice: .resetDevice
        case .vringKick: .vringKick
        case .getMaxMemSlots: .getMaxMemSlots
        case .addMemReg: .addMemReg
        case .remMemReg: .remMemReg
        case .setStatus: .setStatus
        case .getStatus: .getStatus
        }
    }
}

/// How many fds a request may carry.
public enum FDRule: Equatable, Sendable, CustomStringConvertible {
    case none
    case exactly(Int)
    /// SET_MEM_TABLE: one per region.
    case onePerRegion
    /// KICK / CALL / ERR: one, or none when the "no fd" bit is set.
    case oneUnlessNoFDBit
    /// REM_MEM_REG: none, or one that must be closed unused (spec allowance).
    case noneOrOneIgnored

    public var description: String {
        switch self {
        case .none: "no fds"
        case .exactly(let n): "exactly \(n) fd\(n == 1 ? "" : "s")"
        case .onePerRegion: "one fd per region"
        case .oneUnlessNoFDBit: "one fd unless bit 8 (no fd) is set, then none"
        case .noneOrOneIgnored: "no fd (one is tolerated and closed)"
        }
    }
}

/// Everything that can be wrong with a message on the wire. Each case names
/// the request and the rule.
public enum VhostUserError: Error, Equatable, Sendable, CustomStringConvertible {
    case truncatedHeader(got: Int)
    case truncatedPayload(needed: Int, got: Int)
    case badVersion(flags: UInt32)
    case unknownFlags(flags: UInt32)
    case unexpectedReplyFlag(RequestCode)
    case unknownRequest(UInt32)
    case payloadTooLarge(RequestCode, size: UInt32, maximum: Int)
    case payloadSize(RequestCode, size: Int, expected: String)
    case fdCount(RequestCode, got: Int, rule: FDRule)
    /// The kernel dropped the message's fds (MSG_CTRUNC): more were sent
    /// than a message may carry, or the receiver is out of file descriptors.
    case fdsLost(RequestCode)
    case tooManyRegions(count: UInt32, maximum: Int)
    case vringFileFlags(RequestCode, raw: UInt64)
    case iotlbType(UInt8)
    case iotlbPermission(UInt8)
    case configSize(UInt32, maximum: Int)
    case unexpectedReply(expected: UInt32, got: UInt32)

    /// Stable label for metrics ("refusals by rule"), like `SessionError.rule`.
    public var rule: String {
        switch self {
        case .truncatedHeader, .truncatedPayload: "truncated"
        case .badVersion, .unknownFlags, .unexpectedReplyFlag: "header-flags"
        case .unknownRequest: "unknown-request"
        case .payloadTooLarge, .payloadSize, .configSize: "payload-size"
        case .fdCount, .fdsLost: "fd-count"
        case .tooManyRegions: "memory-slots"
        case .vringFileFlags: "vring-file-flags"
        case .iotlbType: "iotlb-type"
        case .iotlbPermission: "iotlb-permission"
        case .unexpectedReply: "unexpected-reply"
        }
    }

    public var description: String {
        switch self {
        case .truncatedHeader(let got): "header truncated: \(got) of 12 bytes"
        case .truncatedPayload(let needed, let got): "payload truncated: needed \(needed) bytes, got \(got)"
        case .badVersion(let flags): "header version \(flags & HeaderFlags.versionMask) is not 1 (flags \(Hex(UInt64(flags))))"
        case .unknownFlags(let flags): "header flags \(Hex(UInt64(flags))) set bits the spec does not define"
        case .unexpectedReplyFlag(let code): "\(code) arrived with the REPLY flag set"
        case .unknownRequest(let code): "unknown request \(code)"
        case .payloadTooLarge(let code, let size, let max): "\(code) payload of \(size) bytes exceeds its maximum of \(max)"
        case .payloadSize(let code, let size, let expected): "\(code) payload of \(size) bytes, expected \(expected)"
        case .fdCount(let code, let got, let rule): "\(code) came with \(got) fd(s); it takes \(rule)"
        case .fdsLost(let code): "\(code)'s fds did not arrive: more than \(VhostUserCodec.maxMemTableRegions) were sent, or this process is out of file descriptors (RLIMIT_NOFILE)"
        case .tooManyRegions(let count, let max): "memory table has \(count) regions; at most \(max)"
        case .vringFileFlags(let code, let raw): "\(code) payload \(Hex(raw)) sets bits other than the index (0-7) and no-fd (8)"
        case .iotlbType(let t): "IOTLB message type \(t) is not 1-4"
        case .iotlbPermission(let p): "IOTLB permission \(p) is not 0-3"
        case .configSize(let s, let max): "config space access of \(s) bytes exceeds \(max)"
        case .unexpectedReply(let expected, let got): "expected a reply to request \(expected), got \(got)"
        }
    }
}
