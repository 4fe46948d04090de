import BridgeCore
import LinuxIO
import VhostUser

public enum FrontendError: Error, CustomStringConvertible {
    case nack(RequestCode)
    case closed(RequestCode)
    case wire(VhostUserError)
    case system(SystemCallError)
    case framing(String)

    public var description: String {
        switch self {
        case .nack(let code): "the back end refused \(code) (non-zero ack)"
        case .closed(let code): "the back end closed the connection during \(code)"
        case .wire(let e): "\(e)"
        case .system(let e): "\(e)"
        case .framing(let s): s
        }
    }
}

/// A vhost-user front end, the way QEMU and DPDK virtio-user drive one:
/// requests on the main socket, replies and acks read synchronously, and a
/// back-end channel (a socketpair whose other end was sent with
/// SET_BACKEND_REQ_FD) on which the back end raises IOTLB misses.
///
/// Used from one thread.
public final class VhostUserFrontend {
    public let socket: UnixSocket
    public private(set) var backendChannel: UnixSocket?
    public private(set) var protocolFeatures: ProtocolFeatures = []
    /// Every request sent, in order (the "message sequence" of the issue note).
    public private(set) var sent: [RequestCode] = []
    /// Called for each IOTLB miss read from the back-end channel.
    public var onMiss: ((IOTLBMessage) throws -> Void)?

    public init(socket: UnixSocket) {
        self.socket = socket
    }

    public convenience init(connectingTo path: String) throws(SystemCallError) {
        self.init(socket: try UnixSocket.connect(path: path))
    }

    var replyAck: Bool { protocolFeatures.contains(.replyAck) }

    /// Sends a request; waits for its reply (GET_*) or, when `ack` is asked and
    /// REPLY_ACK is negotiated, for its ack. Returns the reply payload, if any.
    @discardableResult
    public func send(_ request: FrontendRequest, fds: [Int32] = [], ack: Bool = false) throws -> [UInt8]? {
        try serviceBackendChannel()
        let wantsAck = ack && replyAck
        do { try socket.send(VhostUserCodec.encode(request, needReply: wantsAck), fds: fds) } catch { throw FrontendError.system(error) }
        sent.append(request.code)
        let code = request.code
        let inherent = code.hasReply || (code == .setLogBase && protocolFeatures.contains(.logShmfd))
        guard inherent || wantsAck else { return nil }
        let payload = try readReply(to: code)
        if !inherent {
            let value = try VhostUserCodec.decodeU64Reply(payload, to: code)
            if value != 0 { throw FrontendError.nack(code) }
            return nil
        }
        return payload
    }

    private func readReply(to code: RequestCode) throws -> [UInt8] {
        let message: FramedMessage?
        do {
            message = try socket.receiveFramed(maxFDs: 0) { bytes in
                let header = try MessageHeader.decode(bytes)
                try VhostUserCodec.validateReply(header, to: code)
                return Int(header.size)
            }
        } catch let e as VhostUserError { throw FrontendError.wire(e) }
        guard let message else { throw FrontendError.closed(code) }
        return message.payload
    }

    public func getU64(_ request: FrontendRequest) throws -> UInt64 {
        guard let payload = try send(request) else { throw FrontendError.framing("\(request.code) had no reply") }
        return try VhostUserCodec.decodeU64Reply(payload, to: request.code)
    }

    /// SET_PROTOCOL_FEATURES, remembering what is in force.
    public func setProtocolFeatures(_ features: ProtocolFeatures) throws {
        try send(.setProtocolFeatures(features.rawValue))
        protocolFeatures = features
    }

    /// Creates the back-end channel and hands one end to the back end.
    public func setUpBackendChannel() throws {
        let (ours, theirs) = try UnixSocket.pair(.stream)
        try send(.setBackendReqFD, fds: [theirs.fd.rawValue], ack: true)
        try theirs.fd.close()
        backendChannel = ours
    }

    /// Reads every pending back-end message without blocking and hands
    /// misses to `onMiss` (which answers with IOTLB updates, like QEMU).
    public func serviceBackendChannel() throws {
        guard let channel = backendChannel else { return }
        while true {
            let peek: ReceivedMessage
            do { peek = try channel.receive(maxBytes: 1, maxFDs: 0, peek: true, nonBlocking: true) } catch {
                if error.errno == .resourceTemporarilyUnavailable || error.errno == .wouldBlock { return }
                throw FrontendError.system(error)
            }
            if peek.bytes.isEmpty { backendChannel = nil; return } // back end closed it
            guard let message = try channel.receiveFramed(maxFDs: 0, payloadSize: { bytes in
                let header = try MessageHeader.decode(bytes)
                guard header.size <= 64 else { throw VhostUserError.payloadTooLarge(.iotlbMsg, size: header.size, maximum: 64) }
                return Int(header.size)
            }) else { backendChannel = nil; return }
            let header = try MessageHeader.decode(message.header)
            let iotlb = try VhostUserCodec.decodeBackendIOTLB(header, payload: message.payload)
            if iotlb.type == .miss { try onMiss?(iotlb) }
        }
    }

    /// Closes the connection (the back end sees EOF and tears down).
    public func close() {
        try? backendChannel?.fd.close()
        try? socket.fd.close()
    }
}
