import CLinuxShim
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Credentials of the process at the other end (SO_PEERCRED).
public struct PeerCredentials: Equatable, Sendable {
    public let pid: Int32
    public let uid: UInt32
    public let gid: UInt32
    /// Supplementary groups (SO_PEERGROUPS), as of when the peer connected.
    public let groups: [UInt32]
    public init(pid: Int32, uid: UInt32, gid: UInt32, groups: [UInt32] = []) {
        self.pid = pid; self.uid = uid; self.gid = gid; self.groups = groups
    }
}

/// One message read with `UnixSocket.receive`: the bytes, and every fd that
/// came with them, each now owned by the caller.
public struct ReceivedMessage: Sendable {
    public let bytes: [UInt8]
    public let fds: [OwnedFileDescriptor]
    /// The kernel or the fd limit cut something off (payload or fds); the
    /// surplus fds were already closed.
    public let truncated: Bool

    /// Closes every fd that came with the message (e.g. on a request that
    /// takes none). Idempotent.
    public func closeAllFDs() {
        for fd in fds { try? fd.close() }
    }
}

/// An AF_UNIX socket (stream, seqpacket or datagram) that owns its fd.
public struct UnixSocket: Sendable {
    public enum Kind: Sendable {
        case stream, seqpacket, datagram
        var raw: Int32 {
            switch self {
            case .stream: shim_sock_stream()
            case .seqpacket: shim_sock_seqpacket()
            case .datagram: shim_sock_dgram()
            }
        }
    }

    /// Most fds one `receive` accepts; more than this are closed and the
    /// message is marked truncated. vhost-user uses at most 8 per message.
    public static let defaultMaximumFDs = 8

    public let fd: OwnedFileDescriptor
    public let kind: Kind
    /// The socket file `listen` bound (its device and inode as of the
    /// bind); nil for any other socket.
    public let boundFile: BoundSocketFile?

    public init(adopting fd: OwnedFileDescriptor, kind: Kind) {
        self.init(adopting: fd, kind: kind, boundFile: nil)
    }

    private init(adopting fd: OwnedFileDescriptor, kind: Kind, boundFile: BoundSocketFile?) {
        self.fd = fd
        self.kind = kind
        self.boundFile = boundFile
    }

    /// Why `fd`, given to the daemon as an already connected vhost-user
    /// connection (`--fd`), cannot be one; nil when it is an open stream
    /// socket (it is then made close-on-exec). Checked before the daemon
    /// opens any fd of its own, so a number that is not open is never
    /// confused with one the daemon made.
    public static func inheritedStreamRefusal(_ fd: Int32) -> String? {
        guard fcntl(fd, F_GETFD) >= 0 else { return "fd \(fd) is not open" }
        let kind = OwnedFileDescriptor.borrowingKind(fd)
        guard kind == .socket else { return "fd \(fd) is \(kind), not a socket" }
        var type: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) == 0, type == shim_sock_stream() else {
            return "fd \(fd) is not a stream socket"
        }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return nil
    }

    public static func pair(_ kind: Kind = .stream) throws(SystemCallError) -> (UnixSocket, UnixSocket) {
        var sv: [Int32] = [-1, -1]
        _ = try retryingInterrupts("socketpair") { shim_socketpair_unix(kind.raw, &sv) }
        return (UnixSocket(adopting: OwnedFileDescriptor(adopting: sv[0]), kind: kind),
                UnixSocket(adopting: OwnedFileDescriptor(adopting: sv[1]), kind: kind))
    }

    private static func make(_ kind: Kind) throws(SystemCallError) -> UnixSocket {
        let raw = try retryingInterrupts("socket(AF_UNIX)") { shim_socket_unix(kind.raw) }
        return UnixSocket(adopting: OwnedFileDescriptor(adopting: raw), kind: kind)
    }

    /// Binds and listens on `path`, and records the socket file it made
    /// (`boundFile`: what to remove later, and only that). A stale socket
    /// file at `path` (nobody accepting on it) is removed first; a live one
    /// is left alone (EADDRINUSE). With `requireSafeDirectory` (the daemon's
    /// own sockets), a directory others could change the entries of is
    /// refused before anything is bound (`SocketDirectoryRule`).
    public static func listen(path: String, kind: Kind = .stream, backlog: Int32 = 16,
                              requireSafeDirectory: Bool = false) throws(SystemCallError) -> UnixSocket {
        guard path.utf8.count <= shim_sun_path_max() else {
            throw SystemCallError("bind(\(path))", errno: .fileNameTooLong)
        }
        if requireSafeDirectory { try SocketDirectory.checkHolding(path, operation: "bind(\(path))") }
        let socket = try make(kind)
        let raw = socket.fd.rawValue
        if shim_bind_unix(raw, path) < 0 {
            let error = SystemCallError.current("bind(\(path))")
            guard error.errno == .addressInUse, isStale(path: path, kind: kind) else { throw error }
            unlink(path)
            _ = try retryingInterrupts("bind(\(path))") { shim_bind_unix(raw, path) }
        }
        let file = try BoundSocketFile.record(path) // right after bind: the file this socket made
        if kind != .datagram {
            do throws(SystemCallError) {
                _ = try retryingInterrupts("listen(\(path))") { Glibc.listen(raw, backlog) }
            } catch {
                file.remove()
                throw error
            }
        }
        return UnixSocket(adopting: socket.fd, kind: kind, boundFile: file)
    }

    /// A socket file nobody accepts on. Only a socket is ever called stale:
    /// anything else at `path` (a regular file, a symlink, a directory) is
    /// left alone, so a bad path can never make the daemon unlink a file.
    private static func isStale(path: String, kind: Kind) -> Bool {
        guard SocketFile.isSocket(path), let probe = try? make(kind) else { return false }
        return shim_connect_unix(probe.fd.rawValue, path) < 0 && Glibc.errno == ECONNREFUSED
    }

    public static func connect(path: String, kind: Kind = .stream) throws(SystemCallError) -> UnixSocket {
        let socket = try make(kind)
        try socket.connect(to: path)
        return socket
    }

    /// A socket not connected yet (`connect(to:)` later needs no new fd).
    public static func unconnected(_ kind: Kind = .stream) throws(SystemCallError) -> UnixSocket {
        try make(kind)
    }

    public func connect(to path: String) throws(SystemCallError) {
        let raw = fd.rawValue
        _ = try retryingInterrupts("connect(\(path))") { shim_connect_unix(raw, path) }
    }

    /// Blocks until a peer connects.
    public func accept() throws(SystemCallError) -> UnixSocket {
        let raw = fd.rawValue
        let new = try retryingInterrupts("accept") { shim_accept(raw) }
        return UnixSocket(adopting: OwnedFileDescriptor(adopting: new), kind: kind)
    }

    /// Sends `bytes` with `fds` attached (SCM_RIGHTS). The fds stay owned by
    /// the caller (the kernel duplicates them into the message). For stream
    /// sockets a short send of the payload is completed without fds.
    /// With `nonBlocking`, a full socket buffer is EAGAIN instead of a wait.
    public func send(_ bytes: [UInt8], fds: [Int32] = [], nonBlocking: Bool = false) throws(SystemCallError) {
        try sendAll(bytes, fds: fds, flags: nonBlocking ? shim_msg_dontwait() : 0) { error throws(SystemCallError) in throw error }
    }

    /// Sends the whole message by `deadline` or not at all: each piece goes
    /// out without blocking, and a full socket buffer is waited on only until
    /// the deadline — so a peer that reads a byte now and then cannot stretch
    /// one message over minutes (SO_SNDTIMEO restarts with every byte it
    /// reads). Past the deadline: ETIMEDOUT (part of the message may be gone:
    /// the connection cannot go on).
    public func send(_ bytes: [UInt8], fds: [Int32] = [], deadline: ContinuousClock.Instant) throws(SystemCallError) {
        let raw = fd.rawValue
        try sendAll(bytes, fds: fds, flags: shim_msg_dontwait()) { _ throws(SystemCallError) in
            try Poll.wait(raw, for: .writable, until: deadline, operation: "sendmsg")
        }
    }

    /// sendmsg until every byte is out; `wouldBlock` gets each EAGAIN (it
    /// waits for the next try, or throws to give up).
    private func sendAll(_ bytes: [UInt8], fds: [Int32], flags: Int32,
                         wouldBlock: (SystemCallError) throws(SystemCallError) -> Void) throws(SystemCallError) {
        let raw = fd.rawValue
        var sent = 0
        var fdsSent = false
        while !fdsSent || sent < bytes.count {
            let offset = sent
            let attach = fdsSent ? [] : fds
            let n: Int
            do {
                n = try retryingInterrupts("sendmsg") {
                    bytes.withUnsafeBytes { buffer in
                        attach.withUnsafeBufferPointer { fdBuffer in
                            shim_send_with_fds(raw, buffer.baseAddress.map { $0 + offset }, buffer.count - offset,
                                               fdBuffer.baseAddress, fdBuffer.count, flags)
                        }
                    }
                }
            } catch where error.errno == .resourceTemporarilyUnavailable {
                try wouldBlock(error)
                continue
            }
            fdsSent = true
            sent += n
        }
    }

    /// Receives one message of at most `maxBytes` (for a stream, up to
    /// `maxBytes` of whatever is queued) with up to `maxFDs` fds. An empty
    /// `bytes` with no fds means the peer closed the connection.
    public func receive(maxBytes: Int, maxFDs: Int = UnixSocket.defaultMaximumFDs,
                        peek: Bool = false, nonBlocking: Bool = false) throws(SystemCallError) -> ReceivedMessage {
        var buffer = [UInt8](repeating: 0, count: max(0, maxBytes))
        var fds = [Int32](repeating: -1, count: max(0, maxFDs))
        var nfds = 0
        var truncated: Int32 = 0
        var flags: Int32 = 0
        if peek { flags |= shim_msg_peek() }
        if nonBlocking { flags |= shim_msg_dontwait() }
        let raw = fd.rawValue
        let n = try retryingInterrupts("recvmsg") {
            buffer.withUnsafeMutableBytes { b in
                fds.withUnsafeMutableBufferPointer { f in
                    shim_recv_with_fds(raw, b.baseAddress, b.count, flags, f.baseAddress, f.count, &nfds, &truncated)
                }
            }
        }
        let owned = fds.prefix(nfds).map { OwnedFileDescriptor(adopting: $0) }
        return ReceivedMessage(bytes: Array(buffer.prefix(n)), fds: owned, truncated: truncated != 0)
    }

    /// Reads exactly `count` bytes from a stream (no fds expected: any that
    /// arrive are closed). Returns fewer only when the peer closed.
    /// With a `deadline`, the bytes must all have arrived by then
    /// (ETIMEDOUT otherwise), however they trickle in.
    public func receiveExactly(_ count: Int, deadline: ContinuousClock.Instant? = nil) throws(SystemCallError) -> [UInt8] {
        var result: [UInt8] = []
        result.reserveCapacity(count)
        while result.count < count {
            let message = try receive(maxBytes: count - result.count, maxFDs: 0, deadline: deadline)
            if message.bytes.isEmpty { break }
            result += message.bytes
        }
        return result
    }

    /// `receive`, bounded by `deadline` (nil: a plain blocking receive):
    /// it tries without blocking and waits for more only until the deadline.
    public func receive(maxBytes: Int, maxFDs: Int, deadline: ContinuousClock.Instant?) throws(SystemCallError) -> ReceivedMessage {
        guard let deadline else { return try receive(maxBytes: maxBytes, maxFDs: maxFDs) }
        while true {
            do {
                return try receive(maxBytes: maxBytes, maxFDs: maxFDs, nonBlocking: true)
            } catch where error.errno == .resourceTemporarilyUnavailable {
                try Poll.wait(fd.rawValue, for: .readable, until: deadline, operation: "recvmsg")
            }
        }
    }

    public func peerCredentials() throws(SystemCallError) -> PeerCredentials {
        var pid: pid_t = 0, uid: uid_t = 0, gid: gid_t = 0
        let raw = fd.rawValue
        _ = try retryingInterrupts("getsockopt(SO_PEERCRED)") { shim_peercred(raw, &pid, &uid, &gid) }
        var groups = [UInt32](repeating: 0, count: 256) // NGROUPS_MAX is 65536; 256 covers real users
        let n = groups.withUnsafeMutableBufferPointer { shim_peergroups(raw, $0.baseAddress, Int32($0.count)) }
        return PeerCredentials(pid: pid, uid: uid, gid: gid, groups: n > 0 ? Array(groups.prefix(Int(n))) : [])
    }

    /// shutdown(SHUT_RDWR): wakes a thread blocked in receive/accept.
    public func shutdown() {
        _ = Glibc.shutdown(fd.rawValue, Int32(SHUT_RDWR))
    }
}
