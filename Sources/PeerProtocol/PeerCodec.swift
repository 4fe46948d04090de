import BridgeCore

/// Pure encode/decode of the peer protocol. Same framing as vhost-user.
public enum PeerCodec {
    public static let version: UInt32 = 1
    public static let headerSize = 12
    public static let flagReply: UInt32 = 1 << 2
    public static let maximumPayload = 264

    public struct Header: Equatable, Sendable {
        public var type: UInt32
        public var flags: UInt32
        public var size: UInt32
        public var isReply: Bool { flags & PeerCodec.flagReply != 0 }
    }

    /// Header checks; returns the type and the payload size to read.
    public static func validate(header bytes: [UInt8]) throws(PeerProtocolError) -> (Header, PeerMessageType) {
        guard bytes.count == headerSize else { throw .truncated(needed: headerSize, got: bytes.count) }
        guard let frame = FrameHeader(decoding: bytes) else { throw .truncated(needed: headerSize, got: bytes.count) }
        let h = Header(type: frame.code, flags: frame.flags, size: frame.size)
        guard h.flags & 3 == version else { throw .badVersion(flags: h.flags) }
        guard h.flags & ~(3 | flagReply) == 0 else { throw .unknownFlags(flags: h.flags) }
        guard let type = PeerMessageType(rawValue: h.type) else { throw .unknownType(h.type) }
        guard Int(h.size) <= maximumPayload else {
            throw .payloadSize(type, size: Int(h.size), expected: "at most \(maximumPayload)")
        }
        return (h, type)
    }

    static func exact(_ type: PeerMessageType, _ payload: [UInt8], _ size: Int) throws(PeerProtocolError) {
        guard payload.count == size else { throw .payloadSize(type, size: payload.count, expected: "\(size)") }
    }

    static func permission(_ type: PeerMessageType, _ field: String, _ raw: UInt32) throws(PeerProtocolError) -> Permission {
        guard raw <= 3, raw != 0 else { throw .badValue(type, field: field, value: UInt64(raw)) }
        return Permission(rawValue: UInt8(raw))
    }

    static func text(_ type: PeerMessageType, _ r: inout Reader, maximum: Int) throws(PeerProtocolError) -> String {
        let n = try r.u32()
        guard Int(n) <= maximum else { throw .textTooLong(type, length: n, maximum: maximum) }
        guard r.remaining == Int(n) else { throw .payloadSize(type, size: r.offset + r.remaining, expected: "\(r.offset + Int(n))") }
        return String(decoding: try r.take(Int(n)), as: UTF8.self)
    }

    /// Decodes a payload whose header passed `validate`, and checks the fd count.
    public static func decode(_ header: Header, _ type: PeerMessageType, payload: [UInt8], fdCount: Int) throws(PeerProtocolError) -> PeerMessage {
        var r = Reader(payload)
        let message: PeerMessage
        switch type {
        case .hello where header.isReply:
            try exact(type, payload, 40)
            let version = try r.u32()
            let modeRaw = try r.u32()
            let mode: BridgeMode
            switch modeRaw {
            case 0: mode = .identity
            case 1: mode = .iommu
            case 2: mode = .static
            default: throw .badValue(type, field: "mode", value: UInt64(modeRaw))
            }
            let features = PeerFeatures(rawValue: try r.u64())
            let barSize = try r.u64()
            let pageSize = try r.u32()
            let count = try r.u32()
            guard barSize.nonzeroBitCount == 1 else { throw .badValue(type, field: "barSize", value: barSize) }
            guard pageSize >= 4096, pageSize.nonzeroBitCount == 1 else { throw .badValue(type, field: "pageSize", value: UInt64(pageSize)) }
            message = .helloReply(PeerBARInfo(version: version, mode: mode, features: features, barSize: barSize,
                                              pageSize: pageSize, vringCount: count))
        case .hello:
            // 16 bytes; 24 with the device features VM2 serves (peer feature
            // bit 2, and only then).
            guard payload.count == 16 || payload.count == 24 else { throw .payloadSize(type, size: payload.count, expected: "16 or 24") }
            let version = try r.u32()
            _ = try r.u32()
            let features = PeerFeatures(rawValue: try r.u64())
            guard features.contains(.deviceFeatures) == (payload.count == 24) else {
                throw .payloadSize(type, size: payload.count, expected: features.contains(.deviceFeatures) ? "24 (DEVICE_FEATURES is set)" : "16 (DEVICE_FEATURES is not set)")
            }
            let device = payload.count == 24 ? VirtioNetFeatures(rawValue: try r.u64()) : nil
            message = .hello(PeerHello(version: version, features: features, deviceFeatures: device))
        case .map:
            try exact(type, payload, 40)
            let seq = try r.u64(), off = try r.u64(), len = try r.u64(), fdOff = try r.u64()
            let perm = try permission(type, "prot", try r.u32())
            let flags = try r.u32()
            guard flags & ~PeerMap.flagUnsealed == 0 else { throw .badValue(type, field: "flags", value: UInt64(flags)) }
            message = .map(PeerMap(sequence: seq, barOffset: off, length: len, fdOffset: fdOff, permission: perm,
                                   unsealed: flags & PeerMap.flagUnsealed != 0))
        case .unmap:
            try exact(type, payload, 24)
            message = .unmap(PeerUnmap(sequence: try r.u64(), barOffset: try r.u64(), length: try r.u64()))
        case .ack:
            try exact(type, payload, 8)
            message = .ack(try r.u64())
        case .vring:
            try exact(type, payload, 40)
            let index = try r.u32(), num = try r.u32()
            let desc = try r.u64(), avail = try r.u64(), used = try r.u64()
            let lastAvail = try r.u16(), flags = try r.u16()
            guard flags & ~7 == 0 else { throw .badValue(type, field: "flags", value: UInt64(flags)) }
            message = .vring(PeerVring(index: index, num: num, desc: desc, avail: avail, used: used, lastAvail: lastAvail, flags: flags))
        case .vringStop:
            try exact(type, payload, 8)
            message = .vringStop(try r.u32())
        case .vringStopped:
            try exact(type, payload, 8)
            let index = try r.u32(), lastAvail = try r.u16(), flags = try r.u16()
            guard flags & ~1 == 0 else { throw .badValue(type, field: "flags", value: UInt64(flags)) }
            message = .vringStopped(index: index, lastAvail: flags & 1 != 0 ? lastAvail : nil)
        case .device:
            try exact(type, payload, 16)
            let raw = try r.u32()
            guard let event = PeerDeviceEvent(rawValue: raw) else { throw .badValue(type, field: "event", value: UInt64(raw)) }
            _ = try r.u32()
            message = .device(PeerDevice(event: event, features: try r.u64()))
        case .translate:
            try exact(type, payload, 32)
            let id = try r.u64(), off = try r.u64(), len = try r.u64()
            let access = try permission(type, "access", try r.u32())
            message = .translate(PeerTranslate(requestID: id, barOffset: off, length: len, access: access))
        case .translateReply:
            let id = try r.u64()
            let raw = try r.u32()
            guard let status = TranslateStatus(rawValue: raw) else { throw .badValue(type, field: "status", value: UInt64(raw)) }
            message = .translateReply(PeerTranslateReply(requestID: id, status: status,
                                                         reason: try text(type, &r, maximum: PeerTranslateReply.maximumReason)))
        case .channel:
            try exact(type, payload, 16)
            let capacity = try r.u32(), recordSize = try r.u32(), size = try r.u64()
            guard capacity > 0, capacity <= RevocationChannel.maximumCapacity else { throw .badValue(type, field: "capacity", value: UInt64(capacity)) }
            guard recordSize == UInt32(RevocationChannel.recordSize) else { throw .badValue(type, field: "recordSize", value: UInt64(recordSize)) }
            guard size == RevocationChannel.size(capacity: capacity) else { throw .badValue(type, field: "size", value: size) }
            message = .channel(PeerChannel(capacity: capacity, recordSize: recordSize, size: size))
        case .region:
            try exact(type, payload, 16)
            let slot = try r.u32()
            let perm = try permission(type, "prot", try r.u32())
            guard perm.contains(.read) else { throw .badValue(type, field: "prot", value: UInt64(perm.rawValue)) }
            message = .region(PeerRegion(slot: slot, permission: perm, size: try r.u64()))
        case .wake:
            try exact(type, payload, 0)
            message = .wake
        case .log:
            try exact(type, payload, 32)
            let serial = try r.u64(), flags = try r.u32()
            _ = try r.u32()
            let size = try r.u64(), offset = try r.u64()
            guard flags & ~PeerLog.flagOn == 0 else { throw .badValue(type, field: "flags", value: UInt64(flags)) }
            let on = flags & PeerLog.flagOn != 0
            guard on || (size == 0 && offset == 0) else { throw .badValue(type, field: "size (logging off)", value: size) }
            guard !on || size > 0 else { throw .badValue(type, field: "size", value: size) }
            guard !on || offset <= UInt64.max - size else { throw .badValue(type, field: "offset", value: offset) }
            message = .log(PeerLog(serial: serial, on: on, size: size, offset: offset))
        case .logDone:
            let serial = try r.u64()
            let status = try r.u32()
            guard status <= 1 else { throw .badValue(type, field: "status", value: UInt64(status)) }
            let reason = try text(type, &r, maximum: PeerLogDone.maximumReason)
            message = .logDone(PeerLogDone(serial: serial, failure: status == 0 ? nil : reason))
        case .error:
            let raw = try r.u32()
            let code = PeerErrorCode(rawValue: raw) ?? .protocolError
            message = .error(PeerError(code: code, text: try text(type, &r, maximum: PeerError.maximumText)))
        }
        guard fdCount == message.fdCount else { throw .fdCount(type, got: fdCount, expected: message.fdCount) }
        return message
    }

    /// Header + payload.
    public static func encode(_ message: PeerMessage) -> [UInt8] {
        var w = Writer()
        var flags = version
        switch message {
        case .hello(let h):
            w.u32(h.version); w.u32(0); w.u64(h.features.rawValue)
            if let device = h.deviceFeatures { w.u64(device.rawValue) }
        case .helloReply(let b):
            flags |= flagReply
            w.u32(b.version)
            w.u32(b.mode == .identity ? 0 : b.mode == .iommu ? 1 : 2)
            w.u64(b.features.rawValue); w.u64(b.barSize); w.u32(b.pageSize); w.u32(b.vringCount); w.u64(0)
        case .map(let m):
            w.u64(m.sequence); w.u64(m.barOffset); w.u64(m.length); w.u64(m.fdOffset)
            w.u32(UInt32(m.permission.rawValue)); w.u32(m.unsealed ? PeerMap.flagUnsealed : 0)
        case .unmap(let u):
            w.u64(u.sequence); w.u64(u.barOffset); w.u64(u.length)
        case .ack(let seq):
            w.u64(seq)
        case .vring(let v):
            w.u32(v.index); w.u32(v.num); w.u64(v.desc); w.u64(v.avail); w.u64(v.used)
            w.u16(v.lastAvail); w.u16(v.flags); w.u32(0)
        case .vringStop(let index):
            w.u32(index); w.u32(0)
        case .vringStopped(let index, let lastAvail):
            w.u32(index); w.u16(lastAvail ?? 0); w.u16(lastAvail == nil ? 0 : 1)
        case .device(let d):
            w.u32(d.event.rawValue); w.u32(0); w.u64(d.features)
        case .translate(let t):
            w.u64(t.requestID); w.u64(t.barOffset); w.u64(t.length); w.u32(UInt32(t.access.rawValue)); w.u32(0)
        case .translateReply(let t):
            let reason = Array(t.reason.utf8.prefix(PeerTranslateReply.maximumReason))
            w.u64(t.requestID); w.u32(t.status.rawValue); w.u32(UInt32(reason.count)); w.append(reason)
        case .channel(let c):
            w.u32(c.capacity); w.u32(c.recordSize); w.u64(c.size)
        case .region(let r):
            w.u32(r.slot); w.u32(UInt32(r.permission.rawValue)); w.u64(r.size)
        case .wake:
            break
        case .log(let l):
            w.u64(l.serial); w.u32(l.on ? PeerLog.flagOn : 0); w.u32(0); w.u64(l.size); w.u64(l.offset)
        case .logDone(let d):
            let reason = Array((d.failure ?? "").utf8.prefix(PeerLogDone.maximumReason))
            w.u64(d.serial); w.u32(d.failure == nil ? 0 : 1); w.u32(UInt32(reason.count)); w.append(reason)
        case .error(let e):
            let text = Array(e.text.utf8.prefix(PeerError.maximumText))
            w.u32(e.code.rawValue); w.u32(UInt32(text.count)); w.append(text)
        }
        return FrameHeader(code: message.type.rawValue, flags: flags, size: UInt32(w.bytes.count)).encoded + w.bytes
    }
}

/// `LittleEndianReader` with the peer protocol's typed error.
struct Reader {
    var inner: LittleEndianReader
    init(_ bytes: [UInt8]) { inner = LittleEndianReader(bytes) }
    var remaining: Int { inner.remaining }
    var offset: Int { inner.offset }
    mutating func take(_ n: Int) throws(PeerProtocolError) -> [UInt8] {
        guard let b = inner.take(n) else { throw .truncated(needed: inner.offset + max(0, n), got: inner.bytes.count) }
        return b
    }
    mutating func int<T: FixedWidthInteger>(_: T.Type) throws(PeerProtocolError) -> T {
        guard let v = inner.read(T.self) else { throw .truncated(needed: inner.offset + MemoryLayout<T>.size, got: inner.bytes.count) }
        return v
    }
    mutating func u16() throws(PeerProtocolError) -> UInt16 { try int(UInt16.self) }
    mutating func u32() throws(PeerProtocolError) -> UInt32 { try int(UInt32.self) }
    mutating func u64() throws(PeerProtocolError) -> UInt64 { try int(UInt64.self) }
}

struct Writer {
    var inner = LittleEndianWriter()
    var bytes: [UInt8] { inner.bytes }
    mutating func u16(_ v: UInt16) { inner.write(v) }
    mutating func u32(_ v: UInt32) { inner.write(v) }
    mutating func u64(_ v: UInt64) { inner.write(v) }
    mutating func append(_ v: [UInt8]) { inner.append(v) }
}
