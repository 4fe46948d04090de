import BridgeCore
import CLinuxShim
#if canImport(Glibc)
import Glibc
#endif

/// A file system path that may hold a socket.
public enum SocketFile {
    /// Whether `path` itself (not what a symlink there points to) is a socket.
    public static func isSocket(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0 && st.st_mode & S_IFMT == S_IFSOCK
    }
}

/// A socket file this process bound: its path, and the device and inode
/// it had right after `bind`. Removing it or setting its owner and mode
/// acts on that very file only: a symlink, or another process's socket
/// bound at the same path since, is left alone.
///
/// The file is held open (an O_PATH fd, for as long as any copy of this
/// value lives), so its inode cannot be freed and its number given to
/// another file: on ext4 a socket unlinked and bound again at once gets the
/// same inode number, and a device and inode merely remembered would then
/// match someone else's socket.
public struct BoundSocketFile: Equatable, Sendable, CustomStringConvertible {
    public let path: String
    public let device: UInt64
    public let inode: UInt64
    private let pin: OwnedFileDescriptor

    /// The socket at `path` now, held open; it must be a socket (a symlink
    /// there is not followed: it is refused, ENOTSOCK).
    public static func record(_ path: String) throws(SystemCallError) -> BoundSocketFile {
        let pin = OwnedFileDescriptor(adopting: try retryingInterrupts("open(\(path))") { shim_open_path_nofollow(path) })
        var mode: UInt32 = 0, owner: UInt32 = 0, device: UInt64 = 0, inode: UInt64 = 0
        let raw = pin.rawValue
        _ = try retryingInterrupts("fstat(\(path))") { shim_stat_at_nofollow(raw, "", &mode, &owner, &device, &inode) }
        guard mode & UInt32(S_IFMT) == shim_s_ifsock() else {
            throw SystemCallError("bind(\(path))", errno: .notSocket, detail: "refused: \(path) is not the socket just bound there")
        }
        return BoundSocketFile(path: path, device: device, inode: inode, pin: pin)
    }

    private init(path: String, device: UInt64, inode: UInt64, pin: OwnedFileDescriptor) {
        self.path = path; self.device = device; self.inode = inode; self.pin = pin
    }

    public static func == (a: BoundSocketFile, b: BoundSocketFile) -> Bool {
        a.path == b.path && a.device == b.device && a.inode == b.inode
    }

    /// Whether `path` still names this socket file.
    public var isInPlace: Bool {
        var st = stat()
        return lstat(path, &st) == 0 && st.st_mode & S_IFMT == S_IFSOCK
            && UInt64(st.st_dev) == device && UInt64(st.st_ino) == inode
    }

    /// Removes `path` if — and only if — it is still this socket: a process
    /// that cleans up after itself never unlinks a file that replaced its
    /// socket, nor a socket someone else bound at the path since. (Between
    /// the check and the unlink only whoever may change the directory's
    /// entries could swap the file: the daemon's socket directories admit
    /// no one else, `SocketDirectoryRule`.)
    @discardableResult
    public func remove() -> Bool {
        isInPlace && unlink(path) == 0
    }

    public var description: String { "\(path) (dev \(device), inode \(inode))" }
}

/// The directory a socket file lives in, worked on by fd.
enum SocketDirectory {
    /// `path`'s directory and last component ("." for a bare name).
    static func split(_ path: String) -> (directory: String, name: String) {
        guard let slash = path.lastIndex(of: "/") else { return (".", path) }
        let directory = String(path[..<slash])
        return (directory.isEmpty ? "/" : directory, String(path[path.index(after: slash)...]))
    }

    /// Opens `directory` (O_PATH, O_DIRECTORY, O_NOFOLLOW: a symlink as its
    /// last component is refused) for the socket at `socketPath`.
    static func open(_ directory: String, for socketPath: String) throws(SystemCallError) -> OwnedFileDescriptor {
        do {
            return OwnedFileDescriptor(adopting: try retryingInterrupts("open(\(directory))") { shim_open_directory_nofollow(directory) })
        } catch where error.errno == .notDirectory || error.errno == .tooManySymbolicLinkLevels {
            throw SystemCallError("open(\(directory))", errno: error.errno,
                                  detail: "refused: socket directory \(directory) (for \(socketPath)) is a symlink or not a directory; give its real path")
        }
    }

    /// Refuses a directory others could change the entries of
    /// (`SocketDirectoryRule`), naming it and why, as the failure of `operation`.
    static func check(_ dirfd: OwnedFileDescriptor, _ directory: String, operation: String) throws(SystemCallError) {
        let me = try entry("", in: dirfd, of: directory)
        if let why = SocketDirectoryRule.refusal(mode: me.mode, owner: me.owner, daemonUser: geteuid()) {
            throw SystemCallError(operation, errno: .permissionDenied,
                                  detail: "refused: socket directory \(directory) \(why); another user could swap the socket file for a symlink or a socket of their own")
        }
    }

    /// Opens and checks the directory that will hold the socket at `path`.
    static func checkHolding(_ path: String, operation: String) throws(SystemCallError) {
        let directory = split(path).directory
        try check(try open(directory, for: path), directory, operation: operation)
    }

    struct Entry {
        var mode: UInt32, owner: UInt32, device: UInt64, inode: UInt64
        var isSocket: Bool { mode & UInt32(S_IFMT) == shim_s_ifsock() }
    }

    /// fstatat(AT_SYMLINK_NOFOLLOW) of `name` in `dirfd` ("" for the directory itself).
    static func entry(_ name: String, in dirfd: OwnedFileDescriptor, of path: String) throws(SystemCallError) -> Entry {
        var e = Entry(mode: 0, owner: 0, device: 0, inode: 0)
        let raw = dirfd.rawValue
        _ = try retryingInterrupts("lstat(\(path))") { shim_stat_at_nofollow(raw, name, &e.mode, &e.owner, &e.device, &e.inode) }
        return e
    }
}

/// Owner, group and mode of the daemon's sockets and runtime directory.
public enum SocketPermissions {
    public static func groupID(named name: String) -> UInt32? {
        if let n = UInt32(name) { return n }
        let id = shim_group_id(name)
        return id >= 0 ? UInt32(id) : nil
    }

    public static func userID(named name: String) -> UInt32? {
        if let n = UInt32(name) { return n }
        let id = shim_user_id(name)
        return id >= 0 ? UInt32(id) : nil
    }

    /// Sets `file`'s owner (and group) and mode, on that very socket only:
    /// the directory is opened without following a symlink and must pass
    /// `SocketDirectoryRule`; the entry must still be the socket bound there
    /// (same device and inode, not a symlink); `fchownat` and `fchmodat`
    /// then act on the entry itself (AT_SYMLINK_NOFOLLOW), never on what a
    /// symlink swapped in would point to.
    public static func apply(to file: BoundSocketFile, mode: UInt32, group: UInt32?, owner: UInt32? = nil) throws(SystemCallError) {
        let (directory, name) = SocketDirectory.split(file.path)
        let dirfd = try SocketDirectory.open(directory, for: file.path)
        try SocketDirectory.check(dirfd, directory, operation: "chmod(\(file.path))")
        let entry = try SocketDirectory.entry(name, in: dirfd, of: file.path)
        guard entry.isSocket, entry.device == file.device, entry.inode == file.inode else {
            throw SystemCallError("chmod(\(file.path))", errno: .permissionDenied,
                                  detail: "refused: \(file.path) is no longer the socket bound there (\(entry.isSocket ? "another socket" : "not a socket, e.g. a symlink") replaced it)")
        }
        let raw = dirfd.rawValue
        if owner != nil || group != nil {
            let uid = owner.map { Int($0) } ?? -1, gid = group.map { Int($0) } ?? -1
            _ = try retryingInterrupts("chown(\(file.path))") { shim_chown_at_nofollow(raw, name, uid, gid) }
        }
        _ = try retryingInterrupts("chmod(\(file.path))") { shim_chmod_at_nofollow(raw, name, mode) }
    }

    /// Sets a directory's group and mode (the runtime directory), by fd: a
    /// symlink at `path` is refused, not followed.
    public static func applyToDirectory(path: String, mode: UInt32, group: UInt32?) throws(SystemCallError) {
        let raw = try retryingInterrupts("open(\(path))") { shim_open_directory_readonly_nofollow(path) }
        let fd = OwnedFileDescriptor(adopting: raw)
        let gid = group.map { Int($0) } ?? -1
        _ = try retryingInterrupts("chmod(\(path))") { shim_fchown_fchmod(fd.rawValue, gid, mode) }
    }
}
