import CLinuxShim
#if canImport(Glibc)
import Glibc
#endif

/// A pidfd: a handle on one process that stays valid (and keeps naming that
/// process, never a recycled pid) until closed. Taken when a peer connects,
/// so a policy can kill exactly that peer later.
public struct ProcessHandle: Sendable {
    public let fd: OwnedFileDescriptor
    public let pid: Int32

    public init(pid: Int32) throws(SystemCallError) {
        let raw = try retryingInterrupts("pidfd_open(\(pid))") { shim_pidfd_open(pid) }
        fd = OwnedFileDescriptor(adopting: raw)
        self.pid = pid
    }

    /// The process that connected `socket` (SO_PEERPIDFD, Linux 6.5+): the
    /// kernel took the pidfd when that process called connect(), so it names
    /// that process even when it exited in the backlog and its pid number was
    /// given to another — unlike `init(pid:)` with SO_PEERCRED's pid, which
    /// opens whatever holds the number *now*. ENOPROTOOPT on older kernels.
    public init(peerOf socket: UnixSocket) throws(SystemCallError) {
        let sock = socket.fd.rawValue
        let raw = try retryingInterrupts("getsockopt(SO_PEERPIDFD)") { shim_peer_pidfd(sock) }
        fd = OwnedFileDescriptor(adopting: raw)
        pid = shim_pidfd_pid(raw)
    }

    /// Whether this kernel gives a connecting process's pidfd
    /// (SO_PEERPIDFD): probed once on a socket pair.
    public static let peerPidfdSupported: Bool = {
        guard let (a, b) = try? UnixSocket.pair() else { return false }
        defer { try? a.fd.close(); try? b.fd.close() }
        return (try? ProcessHandle(peerOf: a)) != nil
    }()

    /// Whether the process is still there (not yet reaped).
    public var isAlive: Bool { shim_pidfd_pid(fd.rawValue) > 0 }

    /// SIGKILL to the process (ESRCH once it is gone).
    public func kill() throws(SystemCallError) { try send(signal: SIGKILL) }

    /// Sends `signal` to the process (ESRCH once it is gone).
    public func send(signal: Int32) throws(SystemCallError) {
        let raw = fd.rawValue
        _ = try retryingInterrupts("pidfd_send_signal(\(pid), \(signal))") { shim_pidfd_send_signal(raw, signal) }
    }

    /// Waits until the process has exited (its pidfd turns readable once its
    /// memory is gone), at most `milliseconds`. True when it has.
    public func waitForExit(milliseconds: Int32) -> Bool {
        let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int(milliseconds)))
        return (try? Poll.wait(fd.rawValue, for: .readable, until: deadline, operation: "poll(pidfd \(pid))")) != nil
    }
}

extension OwnedFileDescriptor {
    /// A new read-only open of the same file (through /proc/self/fd): what a
    /// read-only grant hands out, so it cannot be mapped writable.
    public func reopenReadOnly() throws(SystemCallError) -> OwnedFileDescriptor {
        let raw = rawValue
        return OwnedFileDescriptor(adopting: try retryingInterrupts("open(/proc/self/fd/\(raw), O_RDONLY)") { shim_open_readonly_via_proc(raw) })
    }

    /// Whether the fd was opened read-only (O_ACCMODE == O_RDONLY).
    public var isReadOnly: Bool { shim_access_mode(rawValue) == O_RDONLY }
}

/// Who owns a file, its permission bits and how many names it has (fstat).
public struct FileOwnership: Sendable, Equatable {
    public var uid: UInt32
    /// The permission bits (st_mode & 07777).
    public var mode: UInt32
    /// Names in directories: 0 for a memfd or an unlinked file, which nobody
    /// can open by a path (only through an fd, or /proc/PID/fd).
    public var links: UInt64
}

extension OwnedFileDescriptor {
    public func ownership() throws(SystemCallError) -> FileOwnership {
        var st = stat()
        let raw = rawValue
        _ = try retryingInterrupts("fstat(\(raw))") { fstat(raw, &st) }
        return FileOwnership(uid: st.st_uid, mode: UInt32(st.st_mode) & 0o7777, links: UInt64(st.st_nlink))
    }

    /// Changes the file's permission bits (fchmod; the owner, or CAP_FOWNER).
    public func changeMode(to mode: UInt32) throws(SystemCallError) {
        let raw = rawValue
        _ = try retryingInterrupts("fchmod(\(raw), \(String(mode, radix: 8)))") { fchmod(raw, mode_t(mode)) }
    }
}
