import CLinuxShim
#if canImport(Glibc)
import Glibc
#endif

/// A forked process that connects to a Unix socket as another user (tests:
/// allow-lists, a VM2 VMM that ignores the protocol). It writes `hello`,
/// then reads until the other end closes. The child runs only C after fork.
public struct ChildPeer: Sendable {
    public enum Termination: Equatable, Sendable {
        /// 0: the other end closed the connection; 2: connect failed; 3: could not drop privileges.
        case exited(Int32)
        case signaled(Int32)
        case unknown(Int32)

        /// A raw waitpid status (negative: waitpid failed).
        init(waitStatus status: Int32) {
            if status < 0 {
                self = .unknown(status)
            } else if shim_wifexited(status) != 0 {
                self = .exited(shim_wexitstatus(status))
            } else if shim_wifsignaled(status) != 0 {
                self = .signaled(shim_wtermsig(status))
            } else {
                self = .unknown(status)
            }
        }
    }

    public let pid: Int32

    /// What the child does with what it reads.
    public enum Reading: Int32, Sendable {
        /// Never reads (a VMM that stopped reading its socket).
        case nothing = 0
        /// Reads (and drops) everything until the other end closes.
        case everything = 1
        /// Reads peer-protocol frames; at the first UNMAP it closes its
        /// socket and lives on (a VMM that hangs up to dodge a revocation).
        case hangsUpAtUnmap = 2
        /// Reads peer-protocol frames; answers the first UNMAP with an ACK
        /// far beyond its sequence (a protocol error) and lives on.
        case acksFromTheFutureAtUnmap = 3
        /// Reads peer-protocol frames; hangs up (and lives on) at a MAP that
        /// takes away a permission an earlier MAP of the same offset gave.
        case hangsUpAtRevokingMap = 4
        /// Negotiated the revocation channel (its HELLO must say so): maps
        /// CHANNEL and hangs up (and lives on) at the first UNMAP record
        /// posted there.
        case hangsUpAtChannelUnmap = 5
    }

    public static func spawn(connectingTo path: String, uid: UInt32? = nil, gid: UInt32? = nil, groups: [UInt32] = [],
                             hello: [UInt8] = [], lifetimeSeconds: UInt32 = 20, reading: Reading = .everything) throws(SystemCallError) -> ChildPeer {
        let pid = groups.withUnsafeBufferPointer { g in
            hello.withUnsafeBytes { h in
                shim_fork_peer(path, uid.map { Int($0) } ?? -1, gid.map { Int($0) } ?? -1, g.baseAddress, Int32(g.count),
                               h.baseAddress, h.count, lifetimeSeconds, reading.rawValue)
            }
        }
        guard pid > 0 else { throw .current("fork") }
        return ChildPeer(pid: pid)
    }

    /// How a VM2 VMM running as `uid` fared against the read-only promise
    /// (see `shim_fork_read_only_prober`).
    public enum ReadOnlyProbe: Int32, Sendable {
        /// It reopened the read-only fd read-write at once and wrote VM1's memory.
        case reopened = 20
        /// It reopened it after changing the file's mode (it owns the file) and wrote.
        case reopenedAfterChmod = 21
        /// Neither: the read-only grant held.
        case refused = 22
        case writeFailed = 23
        /// The daemon closed the connection before any read-only MAP.
        case noReadOnlyMap = 0
    }

    /// A VM2 VMM as `uid`/`gid` that, on the first read-only MAP, tries to
    /// reopen its fd read-write (see `shim_fork_read_only_prober`);
    /// `marker` is what it writes at the MAP's fd offset when it can.
    public static func spawnReadOnlyProber(connectingTo path: String, uid: UInt32?, gid: UInt32?, hello: [UInt8],
                                           marker: UInt8, lifetimeSeconds: UInt32 = 20) throws(SystemCallError) -> ChildPeer {
        let pid = hello.withUnsafeBytes { h in
            shim_fork_read_only_prober(path, uid.map { Int($0) } ?? -1, gid.map { Int($0) } ?? -1, h.baseAddress, h.count,
                                       marker, lifetimeSeconds)
        }
        guard pid > 0 else { throw .current("fork") }
        return ChildPeer(pid: pid)
    }

    /// Waits for the child to end.
    public func wait() -> Termination {
        Termination(waitStatus: shim_wait(pid))
    }

    public func kill() { _ = Glibc.kill(pid, SIGKILL) }

    /// How the child ended, if it has (WNOHANG); nil while it runs. A child
    /// reported here is reaped.
    public func ended() -> Termination? {
        let status = shim_wait_nohang(pid)
        return status == -2 ? nil : Termination(waitStatus: status)
    }
}
