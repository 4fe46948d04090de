import BridgeCore

/// Pure encode / decode of vhost-user messages. No I/O: the connection reads
/// the 12-byte header, calls `validate(_:)` (which bounds the payload size
/// *before* anything more is read), reads exactly `size` bytes, then calls
/// `decode(_:payload:fdCount:)`.
public enum VhostUserCodec {
    /// Regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS).
    public static let maxMemTableRegions = 8
    static let regionSize = 32

    /// The largest payload each request may carry.
    public static func maximumPayload(_ code: RequestCode) -> Int {
        switch code {
        case .getFeatures, .setOwner, .resetOwner, .setLogFD, .getProtocolFeatures, .getQueueNum,
             .setBackendReqFD, .resetDevice, .getMaxMemSlots, .getStatus:
            0
        case .setFeatures, .setProtocolFeatures, .setVringKick, .setVringCall, .setVringErr, .sendRARP,
             .netSetMTU, .setStatus, .setVringNum, .setVringBase, .getVringBase, .setVringEnable,
             .setVringEndian, .vringKick:
            8
        case .setLogBase: 16
        case .setVringAddr: 40
        case .setMemTable: 8 + maxMemTableRegions * regionSize
        case .iotlbMsg: IOTLBMessage.encodedSize
        case .getConfig, .setConfig: ConfigSpace.headerSize + ConfigSpace.maximumSize
        case .addMemReg, .remMemReg: 8 + regionSize
        }
    }

    /// Header checks: version 1, no undefined flag bits, not a reply, a known
    /// request, and a payload size within that request's maximum.
    public static func validate(_ header: MessageHeader) throws(VhostUserError) -> RequestCode {
        guard header.flags & HeaderFlags.versionMask == HeaderFlags.version else { throw .badVersion(flags: header.flags) }
        guard header.flags & ~HeaderFlags.known == 0 else { throw .unknownFlags(flags: header.flags) }
        guard let code = RequestCode(rawValue: header.request) else { throw .unknownRequest(header.request) }
        guard !header.isReply else { throw .unexpectedReplyFlag(code) }
        let maximum = maximumPayload(code)
        guard Int(header.size) <= maximum else { throw .payloadTooLarge(code, size: header.size, maximum: maximum) }
        return code
    }

    private static func expectSize(_ code: RequestCode, _ payload: [UInt8], _ sizes: Int...) throws(VhostUserError) {
        guard sizes.contains(payload.count) else {
            throw .payloadSize(code, size: payload.count, expected: sizes.map { "\($0)" }.joined(separator: " or "))
        }
    }

    private static func region(_ r: inout ByteReader) throws(VhostUserError) -> RegionDescriptor {
        RegionDescriptor(guestPhysical: GuestPhysicalAddress(try r.u64()), size: try r.u64(),
                         userAddress: FrontendUserAddress(try r.u64()), mmapOffset: try r.u64())
    }

    private static func vringFile(_ code: RequestCode, _ raw: UInt64) throws(VhostUserError) -> VringFileRef {
        guard raw & ~(VringFileRef.noFDBit | 0xff) == 0 else { throw .vringFileFlags(code, raw: raw) }
        return VringFileRef(index: UInt8(raw & 0xff), noFD: raw & VringFileRef.noFDBit != 0)
    }

    /// Decodes a payload whose header passed `validate`, then checks the fd
    /// count against the request's rule.
    public static func decode(_ code: RequestCode, payload: [UInt8], fdCount: Int) throws(VhostUserError) -> FrontendRequest {
        var r = ByteReader(payload)
        let request: FrontendRequest
        switch code {
        case .getFeatures, .setOwner, .resetOwner, .setLogFD, .getProtocolFeatures, .getQueueNum,
             .setBackendReqFD, .resetDevice, .getMaxMemSlots, .getStatus:
            try expectSize(code, payload, 0)
            switch code {
            case .getFeatures: request = .getFeatures
            case .setOwner: request = .setOwner
            case .resetOwner: request = .resetOwner
            case .setLogFD: request = .setLogFD
            case .getProtocolFeatures: request = .getProtocolFeatures
            case .getQueueNum: request = .getQueueNum
            case .setBackendReqFD: request = .setBackendReqFD
            case .resetDevice: request = .resetDevice
            case .getMaxMemSlots: request = .getMaxMemSlots
            default: request = .getStatus
            }
        case .setFeatures, .setProtocolFeatures, .sendRARP, .netSetMTU, .setStatus:
            try expectSize(code, payload, 8)
            let v = try r.u64()
            switch code {
            case .setFeatures: request = .setFeatures(v)
            case .setProtocolFeatures: request = .setProtocolFeatures(v)
            case .sendRARP: request = .sendRARP(v)
            case .netSetMTU: request = .netSetMTU(v)
            default: request = .setStatus(v)
            }
        case .setVringKick, .setVringCall, .setVringErr:
            try expectSize(code, payload, 8)
            let ref = try vringFile(code, try r.u64())
            request = code == .setVringKick ? .setVringKick(ref) : code == .setVringCall ? .setVringCall(ref) : .setVringErr(ref)
        case .setVringNum, .setVringBase, .getVringBase, .setVringEnable, .setVringEndian, .vringKick:
            try expectSize(code, payload, 8)
            let state = VringState(index: try r.u32(), num: try r.u32())
            switch code {
            case .setVringNum: request = .setVringNum(state)
            case .setVringBase: request = .setVringBase(state)
            case .getVringBase: request = .getVringBase(state)
            case .setVringEnable: request = .setVringEnable(state)
            case .setVringEndian: request = .setVringEndian(state)
            default: request = .vringKick(state)
            }
        case .setLogBase:
            try expectSize(code, payload, 8, 16)
            let size = try r.u64()
            request = .setLogBase(LogArea(size: size, offset: payload.count == 16 ? try r.u64() : 0))
        case .setVringAddr:
            try expectSize(code, payload, 40)
            request = .setVringAddr(VringAddress(index: try r.u32(), flags: try r.u32(), descriptor: try r.u64(),
                                                 used: try r.u64(), available: try r.u64(), log: try r.u64()))
        case .setMemTable:
            let count = try r.u32()
            _ = try r.u32() // padding
            guard count <= maxMemTableRegions else { throw .tooManyRegions(count: count, maximum: maxMemTableRegions) }
            // Exact size for `count` regions, or the whole fixed-size C struct.
            try expectSize(code, payload, 8 + Int(count) * regionSize, 8 + maxMemTableRegions * regionSize)
            var regions: [RegionDescriptor] = []
            for _ in 0..<count { regions.append(try region(&r)) }
            request = .setMemTable(regions)
        case .addMemReg, .remMemReg:
            try expectSize(code, payload, 8 + regionSize)
            try r.skip(8)
            let d = try region(&r)
            request = code == .addMemReg ? .addMemReg(d) : .remMemReg(d)
        case .iotlbMsg:
            try expectSize(code, payload, IOTLBMessage.encodedSize, IOTLBMessage.packedSize)
            let iova = try r.u64(), size = try r.u64(), uaddr = try r.u64()
            let permRaw = try r.u8(), typeRaw = try r.u8()
            guard let type = IOTLBType(rawValue: typeRaw) else { throw .iotlbType(typeRaw) }
            // Only an update grants anything: an invalidate's perm byte means
            // nothing (QEMU 7.2 leaves it uninitialised) and must never make a
            // revocation fail, so it is read as "none" whatever it holds.
            let perm: Permission
            if type == .invalidate {
                perm = []
            } else {
                guard let p = Permission(iotlbEncoding: permRaw) else { throw .iotlbPermission(permRaw) }
                perm = p
            }
            request = .iotlb(IOTLBMessage(iova: iova, size: size, userAddress: uaddr, permission: perm, type: type))
        case .getConfig, .setConfig:
            guard payload.count >= ConfigSpace.headerSize else {
                throw .payloadSize(code, size: payload.count, expected: "at least \(ConfigSpace.headerSize)")
            }
            let offset = try r.u32(), size = try r.u32(), flags = try r.u32()
            guard size <= ConfigSpace.maximumSize else { throw .configSize(size, maximum: ConfigSpace.maximumSize) }
            try expectSize(code, payload, ConfigSpace.headerSize + Int(size))
            let space = ConfigSpace(offset: offset, flags: flags, bytes: try r.take(Int(size)))
            request = code == .getConfig ? .getConfig(space) : .setConfig(space)
        }
        try checkFDs(request, fdCount: fdCount)
        return request
    }

    /// The fd rule of a request.
    public static func fdRule(_ request: FrontendRequest) -> FDRule {
        switch request {
        case .setMemTable: .onePerRegion
        case .addMemReg, .setLogFD, .setBackendReqFD: .exactly(1)
        case .setLogBase: .exactly(1)
        case .setVringKick, .setVringCall, .setVringErr: .oneUnlessNoFDBit
        case .remMemReg: .noneOrOneIgnored
        default: .none
        }
    }

    static func checkFDs(_ request: FrontendRequest, fdCount: Int) throws(VhostUserError) {
        let rule = fdRule(request)
        let ok: Bool
        switch (rule, request) {
        case (.none, _): ok = fdCount == 0
        case (.exactly(let n), _): ok = fdCount == n
        case (.onePerRegion, .setMemTable(let regions)): ok = fdCount == regions.count
        case (.oneUnlessNoFDBit, .setVringKick(let ref)), (.oneUnlessNoFDBit, .setVringCall(let ref)),
             (.oneUnlessNoFDBit, .setVringErr(let ref)):
            ok = fdCount == (ref.noFD ? 0 : 1)
        case (.noneOrOneIgnored, _): ok = fdCount <= 1
        default: ok = false
        }
        guard ok else { throw .fdCount(request.code, got: fdCount, rule: rule) }
    }

    // MARK: encoding (front end side: the emulated VM1 and tests)

    /// Encodes header + payload of a front-end request.
    public static func encode(_ request: FrontendRequest, needReply: Bool = false) -> [UInt8] {
        var w = ByteWriter()
        switch request {
        case .getFeatures, .setOwner, .resetOwner, .setLogFD, .getProtocolFeatures, .getQueueNum,
             .setBackendReqFD, .resetDevice, .getMaxMemSlots, .getStatus:
            break
        case .setFeatures(let v), .setProtocolFeatures(let v), .sendRARP(let v), .netSetMTU(let v), .setStatus(let v):
            w.u64(v)
        case .setVringKick(let ref), .setVringCall(let ref), .setVringErr(let ref):
            w.u64(ref.raw)
        case .setVringNum(let s), .setVringBase(let s), .getVringBase(let s), .setVringEnable(let s),
             .setVringEndian(let s), .vringKick(let s):
            w.u32(s.index); w.u32(s.num)
        case .setLogBase(let log):
            w.u64(log.size); w.u64(log.offset)
        case .setVringAddr(let a):
            w.u32(a.index); w.u32(a.flags); w.u64(a.descriptor); w.u64(a.used); w.u64(a.available); w.u64(a.log)
        case .setMemTable(let regions):
            w.u32(UInt32(regions.count)); w.u32(0)
            for d in regions { encodeRegion(d, into: &w) }
        case .addMemReg(let d), .remMemReg(let d):
            w.u64(0)
            encodeRegion(d, into: &w)
        case .iotlb(let m):
            encodeIOTLB(m, into: &w)
        case .getConfig(let c), .setConfig(let c):
            w.u32(c.offset); w.u32(UInt32(c.bytes.count)); w.u32(c.flags); w.append(c.bytes)
        }
        let flags = HeaderFlags.version | (needReply ? HeaderFlags.needReply : 0)
        return MessageHeader(request: request.code.rawValue, flags: flags, size: UInt32(w.bytes.count)).encoded + w.bytes
    }

    static func encodeRegion(_ d: RegionDescriptor, into w: inout ByteWriter) {
        w.u64(d.guestPhysical.rawValue); w.u64(d.size); w.u64(d.userAddress.rawValue); w.u64(d.mmapOffset)
    }

    static func encodeIOTLB(_ m: IOTLBMessage, into w: inout ByteWriter) {
        w.u64(m.iova); w.u64(m.size); w.u64(m.userAddress)
        w.u8(m.permission.rawValue); w.u8(m.type.rawValue); w.zeros(6)
    }

    // MARK: replies (back end → front end)

    public enum ReplyPayload: Equatable, Sendable {
        case u64(UInt64)
        case vringState(VringState)
        case config(ConfigSpace)
        /// GET_CONFIG failure: a reply with an empty payload.
        case empty
    }

    public static func encodeReply(to code: RequestCode, _ payload: ReplyPayload) -> [UInt8] {
        var w = ByteWriter()
        switch payload {
        case .u64(let v): w.u64(v)
        case .vringState(let s): w.u32(s.index); w.u32(s.num)
        case .config(let c): w.u32(c.offset); w.u32(UInt32(c.bytes.count)); w.u32(c.flags); w.append(c.bytes)
        case .empty: break
        }
        return MessageHeader(request: code.rawValue, flags: HeaderFlags.version | HeaderFlags.reply,
                             size: UInt32(w.bytes.count)).encoded + w.bytes
    }

    /// Front end side: checks a reply's header against the request it answers.
    public static func validateReply(_ header: MessageHeader, to code: RequestCode) throws(VhostUserError) {
        guard header.flags & HeaderFlags.versionMask == HeaderFlags.version else { throw .badVersion(flags: header.flags) }
        guard header.request == code.rawValue, header.isReply else {
            throw .unexpectedReply(expected: code.rawValue, got: header.request)
        }
        guard header.size <= 268 else { throw .payloadTooLarge(code, size: header.size, maximum: 268) }
    }

    public static func decodeU64Reply(_ payload: [UInt8], to code: RequestCode) throws(VhostUserError) -> UInt64 {
        try expectSize(code, payload, 8)
        var r = ByteReader(payload)
        return try r.u64()
    }

    public static func decodeVringStateReply(_ payload: [UInt8], to code: RequestCode) throws(VhostUserError) -> VringState {
        try expectSize(code, payload, 8)
        var r = ByteReader(payload)
        return VringState(index: try r.u32(), num: try r.u32())
    }

    // MARK: back-end channel

    /// A back-end → front-end IOTLB message (miss or access failure).
    public static func encodeBackendIOTLB(_ m: IOTLBMessage, needReply: Bool = false) -> [UInt8] {
        var w = ByteWriter()
        encodeIOTLB(m, into: &w)
        let flags = HeaderFlags.version | (needReply ? HeaderFlags.needReply : 0)
        return MessageHeader(request: BackendRequestCode.iotlbMsg.rawValue, flags: flags, size: UInt32(w.bytes.count)).encoded + w.bytes
    }

    /// Front end side: decodes a back-end IOTLB message.
    public static func decodeBackendIOTLB(_ header: MessageHeader, payload: [UInt8]) throws(VhostUserError) -> IOTLBMessage {
        guard header.flags & HeaderFlags.versionMask == HeaderFlags.version else { throw .badVersion(flags: header.flags) }
        guard header.request == BackendRequestCode.iotlbMsg.rawValue else { throw .unknownRequest(header.request) }
        guard payload.count == IOTLBMessage.encodedSize || payload.count == IOTLBMessage.packedSize else {
            throw .payloadSize(.iotlbMsg, size: payload.count, expected: "32 or 26")
        }
        var r = ByteReader(payload)
        let iova = try r.u64(), size = try r.u64(), uaddr = try r.u64()
        let permRaw = try r.u8(), typeRaw = try r.u8()
        guard let perm = Permission(iotlbEncoding: permRaw) else { throw .iotlbPermission(permRaw) }
        guard let type = IOTLBType(rawValue: typeRaw) else { throw .iotlbType(typeRaw) }
        return IOTLBMessage(iova: iova, size: size, userAddress: uaddr, permission: perm, type: type)
    }
}
