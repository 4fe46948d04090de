import BridgeCore

/// Peer protocol message types (docs/peer-protocol.md).
public enum PeerMessageType: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case hello = 1, map = 2, unmap = 3, ack = 4, vring = 5, vringStop = 6, device = 7
    case translate = 8, translateReply = 9, error = 10, vringStopped = 11
    case channel = 12, region = 13, wake = 14, log = 15, logDone = 16

    public var description: String {
        switch self {
        case .hello: "HELLO"
        case .map: "MAP"
        case .unmap: "UNMAP"
        case .ack: "ACK"
        case .vring: "VRING"
        case .vringStop: "VRING_STOP"
        case .device: "DEVICE"
        case .translate: "TRANSLATE"
        case .translateReply: "TRANSLATE_REPLY"
        case .error: "ERROR"
        case .vringStopped: "VRING_STOPPED"
        case .channel: "CHANNEL"
        case .region: "REGION"
        case .wake: "WAKE"
        case .log: "LOG"
        case .logDone: "LOG_DONE"
        }
    }
}

public struct PeerFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let translate = PeerFeatures(rawValue: 1)
    /// VM2 answers VRING_STOP with VRING_STOPPED (the index it reached), and
    /// the daemon answers VM1's GET_VRING_BASE from it.
    public static let vringStopAck = PeerFeatures(rawValue: 2)
    /// HELLO carries the virtio device features VM2 can serve (24 bytes).
    public static let deviceFeatures = PeerFeatures(rawValue: 4)
    /// MAP's flags bit 0 marks a range of VM1 memory that is not sealed
    /// against shrinking: VM1 can truncate it, and an access after that is
    /// a SIGBUS in VM2. Only a VM2 that negotiated this gets such ranges
    /// (with `unsealed-regions: mark`); it must guard its accesses to them
    /// (or not touch them). Without it the daemon never sends them.
    public static let unsealedMaps = PeerFeatures(rawValue: 8)
    /// MAP and UNMAP travel through a ring in memory shared with VM2 (the
    /// revocation channel: CHANNEL, REGION, WAKE), and VM2 acknowledges by
    /// storing its cumulative ack there instead of sending ACK
    /// (docs/peer-protocol.md, "The revocation channel").
    public static let sharedRevocations = PeerFeatures(rawValue: 16)
    /// VM1 can live-migrate: VM2 logs every write it makes into VM1's
    /// memory in the dirty log LOG hands it, and answers each LOG with
    /// LOG_DONE; channel MAP records carry the range's guest-physical
    /// address (flag bit 1). Only with `sharedRevocations` (the daemon
    /// drops it otherwise). Without it, VM1's VHOST_F_LOG_ALL is refused
    /// while this VM2 is attached, and this VM2 is refused while VM1 logs.
    public static let dirtyLog = PeerFeatures(rawValue: 32)
    public static let all: PeerFeatures = [.translate, .vringStopAck, .deviceFeatures, .unsealedMaps, .sharedRevocations, .dirtyLog]
}

public struct PeerHello: Equatable, Sendable {
    public var version: UInt32
    public var features: PeerFeatures
    /// The virtio-net device features VM2's device serves (with the
    /// `deviceFeatures` peer feature); nil: VERSION_1 only.
    public var deviceFeatures: VirtioNetFeatures?

    public init(version: UInt32 = PeerCodec.version, features: PeerFeatures, deviceFeatures: VirtioNetFeatures? = nil) {
        self.version = version
        self.features = deviceFeatures == nil ? features.subtracting(.deviceFeatures) : features.union(.deviceFeatures)
        self.deviceFeatures = deviceFeatures
    }

    /// What VM2 serves: its declaration, or VERSION_1 alone for a peer that
    /// does not declare.
    public var served: VirtioNetFeatures { deviceFeatures ?? .version1 }

    /// Device features the bridge offers VM1 that this VM2 cannot serve:
    /// VM1 may negotiate any offered bit, so VM2 must serve them all. The
    /// control queue is served by the front end (QEMU and DPDK's
    /// virtio-user), never by VM2.
    public func missing(offered: VirtioNetFeatures) -> VirtioNetFeatures {
        offered.subtracting(.ctrlVq).subtracting(served)
    }
}

/// HELLO reply: the BAR info.
public struct PeerBARInfo: Equatable, Sendable {
    public var version: UInt32
    public var mode: BridgeMode
    public var features: PeerFeatures
    public var barSize: UInt64
    public var pageSize: UInt32
    public var vringCount: UInt32
    public init(version: UInt32 = PeerCodec.version, mode: BridgeMode, features: PeerFeatures, barSize: UInt64, pageSize: UInt32, vringCount: UInt32) {
        self.version = version; self.mode = mode; self.features = features
        self.barSize = barSize; self.pageSize = pageSize; self.vringCount = vringCount
    }
}

public struct PeerMap: Equatable, Sendable {
    public var sequence: UInt64
    public var barOffset: UInt64
    public var length: UInt64
    public var fdOffset: UInt64
    public var permission: Permission
    /// flags bit 0 (peer feature `unsealedMaps` only): VM1 can truncate the
    /// file under this range, so an access to it can SIGBUS.
    public var unsealed: Bool
    /// VM1's guest-physical address of the range's first byte (channel
    /// records, peer feature `dirtyLog`: flags bit 1): where the dirty log
    /// marks a write into the range. nil: not sent.
    public var guestPhysical: UInt64?
    public static let flagUnsealed: UInt32 = 1
    public static let flagGuestPhysical: UInt32 = 2
    public init(sequence: UInt64, barOffset: UInt64, length: UInt64, fdOffset: UInt64, permission: Permission, unsealed: Bool = false,
                guestPhysical: UInt64? = nil) {
        self.sequence = sequence; self.barOffset = barOffset; self.length = length
        self.fdOffset = fdOffset; self.permission = permission; self.unsealed = unsealed
        self.guestPhysical = guestPhysical
    }
}

public struct PeerUnmap: Equatable, Sendable {
    public var sequence: UInt64
    public var barOffset: UInt64
    public var length: UInt64
    public init(sequence: UInt64, barOffset: UInt64, length: UInt64) {
        self.sequence = sequence; self.barOffset = barOffset; self.length = length
    }
}

public struct PeerVring: Equatable, Sendable {
    public static let flagEnabled: UInt16 = 1
    public static let flagKickFD: UInt16 = 2
    public static let flagCallFD: UInt16 = 4
    public var index: UInt32
    public var num: UInt32
    public var desc: UInt64
    public var avail: UInt64
    public var used: UInt64
    public var lastAvail: UInt16
    public var flags: UInt16
    public init(index: UInt32, num: UInt32, desc: UInt64, avail: UInt64, used: UInt64, lastAvail: UInt16, flags: UInt16) {
        self.index = index; self.num = num; self.desc = desc; self.avail = avail; self.used = used
        self.lastAvail = lastAvail; self.flags = flags
    }
    public var enabled: Bool { flags & Self.flagEnabled != 0 }
    public var hasKick: Bool { flags & Self.flagKickFD != 0 }
    public var hasCall: Bool { flags & Self.flagCallFD != 0 }
    public var fdCount: Int { (hasKick ? 1 : 0) + (hasCall ? 1 : 0) }
}

public enum PeerDeviceEvent: UInt32, Sendable { case start = 1, stop = 2, reset = 3 }

public struct PeerDevice: Equatable, Sendable {
    public var event: PeerDeviceEvent
    public var features: UInt64
    public init(event: PeerDeviceEvent, features: UInt64) { self.event = event; self.features = features }
}

public struct PeerTranslate: Equatable, Sendable {
    public var requestID: UInt64
    public var barOffset: UInt64
    public var length: UInt64
    public var access: Permission
    public init(requestID: UInt64, barOffset: UInt64, length: UInt64, access: Permission) {
        self.requestID = requestID; self.barOffset = barOffset; self.length = length; self.access = access
    }
}

public enum TranslateStatus: UInt32, Sendable { case granted = 0, refused = 1, timedOut = 2 }

public struct PeerTranslateReply: Equatable, Sendable {
    public static let maximumReason = 200
    public var requestID: UInt64
    public var status: TranslateStatus
    public var reason: String
    public init(requestID: UInt64, status: TranslateStatus, reason: String = "") {
        self.requestID = requestID; self.status = status; self.reason = reason
    }
}

public enum PeerErrorCode: UInt32, Sendable { case protocolError = 1, busy = 2, version = 3, shuttingDown = 4, features = 5 }

public struct PeerError: Equatable, Sendable {
    public static let maximumText = 256
    public var code: PeerErrorCode
    public var text: String
    public init(code: PeerErrorCode, text: String) { self.code = code; self.text = text }
}

/// CHANNEL: the revocation channel's memory (one fd: a sealed memfd of
/// `size` bytes holding `capacity` records of `recordSize` bytes after the
/// header page).
public struct PeerChannel: Equatable, Sendable {
    public var capacity: UInt32
    public var recordSize: UInt32
    public var size: UInt64
    public init(capacity: UInt32, recordSize: UInt32 = UInt32(RevocationChannel.recordSize), size: UInt64) {
        self.capacity = capacity; self.recordSize = recordSize; self.size = size
    }
}

/// REGION: one fd of VM1 memory, which channel MAP records name by `slot`
/// (sent once, before the first record that names it; `permission` is what
/// the fd allows: read, or read/write).
public struct PeerRegion: Equatable, Sendable {
    public var slot: UInt32
    public var permission: Permission
    public var size: UInt64
    public init(slot: UInt32, permission: Permission, size: UInt64) {
        self.slot = slot; self.permission = permission; self.size = size
    }
}

/// LOG: from now on log into this log (one fd: `size` bytes at `offset`
/// in it; a bitmap, bit `page % 8` of byte `page / 8` for each 4 KiB page
/// of VM1's guest-physical memory the device writes), or stop logging
/// (`on` false, no fd). Each LOG replaces the one before; VM2 answers
/// `serial` with LOG_DONE once it logs (or stopped logging) as told.
public struct PeerLog: Equatable, Sendable {
    public static let flagOn: UInt32 = 1
    public var serial: UInt64
    public var on: Bool
    public var size: UInt64
    public var offset: UInt64
    public init(serial: UInt64, on: Bool, size: UInt64 = 0, offset: UInt64 = 0) {
        self.serial = serial; self.on = on; self.size = on ? size : 0; self.offset = on ? offset : 0
    }
}

/// LOG_DONE: VM2 applied LOG `serial` (`failure` nil), or could not (it
/// then does not log, and says why).
public struct PeerLogDone: Equatable, Sendable {
    public static let maximumReason = 200
    public var serial: UInt64
    public var failure: String?
    public init(serial: UInt64, failure: String? = nil) { self.serial = serial; self.failure = failure }
}

/// One decoded peer message.
public enum PeerMessage: Equatable, Sendable {
    case hello(PeerHello)
    case helloReply(PeerBARInfo)
    case map(PeerMap)
    case unmap(PeerUnmap)
    case ack(UInt64)
    case vring(PeerVring)
    case vringStop(UInt32)
    case device(PeerDevice)
    case translate(PeerTranslate)
    case translateReply(PeerTranslateReply)
    case error(PeerError)
    /// VM2 stopped ring `index`; the next avail entry it would have consumed
    /// is `lastAvail` (what GET_VRING_BASE returns to VM1), nil when VM2 was
    /// not running that ring (the daemon then answers from what it knows).
    case vringStopped(index: UInt32, lastAvail: UInt16?)
    /// The revocation channel (sharedRevocations), once, before any MAP.
    case channel(PeerChannel)
    /// A VM1 memory fd that channel records name by slot.
    case region(PeerRegion)
    /// Channel records wait and VM2 said it sleeps: look at the ring.
    case wake
    /// Log into this dirty log, or stop (`dirtyLog`).
    case log(PeerLog)
    /// VM2's answer to LOG.
    case logDone(PeerLogDone)

    public var type: PeerMessageType {
        switch self {
        case .hello, .helloReply: .hello
        case .map: .map
        case .unmap: .unmap
        case .ack: .ack
        case .vring: .vring
        case .vringStop: .vringStop
        case .device: .device
        case .translate: .translate
        case .translateReply: .translateReply
        case .error: .error
        case .vringStopped: .vringStopped
        case .channel: .channel
        case .region: .region
        case .wake: .wake
        case .log: .log
        case .logDone: .logDone
        }
    }

    /// How many fds travel with this message.
    public var fdCount: Int {
        switch self {
        case .map, .channel, .region: 1
        case .log(let l): l.on ? 1 : 0
        case .vring(let v): v.fdCount
        default: 0
        }
    }
}

public enum PeerProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    case truncated(needed: Int, got: Int)
    case badVersion(flags: UInt32)
    case unknownFlags(flags: UInt32)
    case unknownType(UInt32)
    case payloadSize(PeerMessageType, size: Int, expected: String)
    case fdCount(PeerMessageType, got: Int, expected: Int)
    case badValue(PeerMessageType, field: String, value: UInt64)
    case textTooLong(PeerMessageType, length: UInt32, maximum: Int)

    public var description: String {
        switch self {
        case .truncated(let n, let g): "message truncated: needed \(n) bytes, got \(g)"
        case .badVersion(let f): "header version \(f & 3) is not 1"
        case .unknownFlags(let f): "header flags \(Hex(UInt64(f))) set undefined bits"
        case .unknownType(let t): "unknown message type \(t)"
        case .payloadSize(let t, let s, let e): "\(t) payload of \(s) bytes, expected \(e)"
        case .fdCount(let t, let g, let e): "\(t) came with \(g) fd(s), expected \(e)"
        case .badValue(let t, let field, let v): "\(t) field \(field) has invalid value \(v)"
        case .textTooLong(let t, let l, let m): "\(t) text of \(l) bytes exceeds \(m)"
        }
    }
}
