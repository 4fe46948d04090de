/// One message of a `{12-byte header, payload}` protocol (vhost-user and the
/// peer protocol share this framing), with the fds that came with it.
public struct FramedMessage: Sendable {
    public let header: [UInt8]
    public let payload: [UInt8]
    public let fds: [OwnedFileDescriptor]
    /// More fds arrived than allowed; the surplus was closed.
    public let fdsTruncated: Bool
}

public enum FramingError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The peer closed the connection in the middle of a message.
    case truncated(expected: Int, got: Int)
    /// The message was not complete by its deadline (a peer that drips).
    case tooSlow(expected: Int, got: Int, milliseconds: Int)
    public var description: String {
        switch self {
        case .truncated(let expected, let got): "connection closed mid-message: \(got) of \(expected) bytes"
        case .tooSlow(let expected, let got, let ms): "message not complete within \(ms) ms: \(got) of \(expected) bytes"
        }
    }
}

extension UnixSocket {
    public static let framedHeaderSize = 12

    /// Reads one framed message from a stream socket: the 12-byte header
    /// (collecting the fds sent with the message), then asks `payloadSize`
    /// how many payload bytes the header announces — it validates the header
    /// and may throw *before* any payload is read — then reads exactly that
    /// many. Returns nil on an orderly close before the first byte.
    ///
    /// With `within`, the whole message — header and payload — must arrive
    /// within that many milliseconds of the call (`FramingError.tooSlow`
    /// otherwise): a receive timeout per `recv` would let a peer that sends
    /// one byte at a time hold the reading thread for minutes.
    public func receiveFramed(maxFDs: Int = UnixSocket.defaultMaximumFDs, within milliseconds: Int? = nil,
                              payloadSize: ([UInt8]) throws -> Int) throws -> FramedMessage? {
        let deadline = milliseconds.map { ContinuousClock.now.advanced(by: .milliseconds($0)) }
        var header: [UInt8] = []
        var fds: [OwnedFileDescriptor] = []
        var truncated = false
        while header.count < Self.framedHeaderSize {
            let part = try within(deadline, milliseconds, expected: Self.framedHeaderSize, got: header.count) { () throws(SystemCallError) in
                try receive(maxBytes: Self.framedHeaderSize - header.count, maxFDs: fds.isEmpty ? maxFDs : 0, deadline: deadline)
            }
            if part.bytes.isEmpty && part.fds.isEmpty {
                if header.isEmpty { return nil }
                throw FramingError.truncated(expected: Self.framedHeaderSize, got: header.count)
            }
            header += part.bytes
            fds += part.fds
            truncated = truncated || part.truncated
        }
        let size = try payloadSize(header)
        let payload = try within(deadline, milliseconds, expected: Self.framedHeaderSize + size, got: Self.framedHeaderSize) { () throws(SystemCallError) in
            try receiveExactly(size, deadline: deadline)
        }
        guard payload.count == size else { throw FramingError.truncated(expected: size, got: payload.count) }
        return FramedMessage(header: header, payload: payload, fds: fds, fdsTruncated: truncated)
    }

    /// Runs a receive, turning its deadline running out into `tooSlow`.
    /// (Fds already received close with their owners.)
    private func within<T>(_ deadline: ContinuousClock.Instant?, _ milliseconds: Int?, expected: Int, got: Int,
                           _ body: () throws(SystemCallError) -> T) throws -> T {
        do {
            return try body()
        } catch {
            guard deadline != nil, error.errno == .timedOut else { throw error }
            throw FramingError.tooSlow(expected: expected, got: got, milliseconds: milliseconds ?? 0)
        }
    }
}
