import CLinuxShim
#if canImport(Glibc)
import Glibc
#endif

/// journald's native protocol endpoint: one datagram per entry to
/// /run/systemd/journal/socket (systemd.journal-fields(7), "Native Journal
/// Protocol"). `available` is nil when there is no journal to talk to.
public final class JournalSocket: Sendable {
    public static let defaultPath = "/run/systemd/journal/socket"
    public var path: String { sender.path }
    private let sender: DatagramSender

    private init(_ sender: DatagramSender) {
        self.sender = sender
    }

    /// A sender to `path` if a datagram can be addressed to it (the socket
    /// exists and is a socket); nil otherwise.
    public static func available(path: String = defaultPath) -> JournalSocket? {
        var st = stat()
        guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFSOCK else { return nil }
        return DatagramSender(path: path).map(JournalSocket.init)
    }

    /// Whether stderr is the journal stream `$JOURNAL_STREAM` names
    /// ("DEVICE:INODE"): systemd's way to tell, since the variable is
    /// inherited by children whose stderr may go elsewhere.
    public static func stderrIsJournal(_ journalStream: String?) -> Bool {
        guard let parts = journalStream?.split(separator: ":"), parts.count == 2,
              let device = UInt64(parts[0]), let inode = UInt64(parts[1]) else { return false }
        var st = stat()
        guard fstat(2, &st) == 0 else { return false }
        return UInt64(st.st_dev) == device && UInt64(st.st_ino) == inode
    }

    /// Sends one encoded entry; false when the journal did not take it (the
    /// caller then writes the line to stderr instead).
    public func send(_ entry: [UInt8]) -> Bool { sender.send(entry) }
}

/// One datagram socket that sends whole datagrams to one Unix socket path:
/// what sd_notify and journald's native protocol both are.
public final class DatagramSender: Sendable {
    public let path: String
    private let socket: UnixSocket

    /// nil when no datagram socket can be made.
    public init?(path: String) {
        let raw = shim_socket_unix(shim_sock_dgram())
        guard raw >= 0 else { return nil }
        self.path = path
        socket = UnixSocket(adopting: OwnedFileDescriptor(adopting: raw), kind: .datagram)
    }

    /// Whether the whole datagram was sent.
    public func send(_ bytes: [UInt8]) -> Bool {
        let n = bytes.withUnsafeBytes { shim_sendto_unix(socket.fd.rawValue, path, $0.baseAddress, $0.count) }
        return n == bytes.count
    }
}
