import Foundation
import Testing
import SystemPackage
@testable import LinuxIO
#if canImport(Glibc)
import Glibc
#endif

/// A fresh directory under /tmp (mkdtemp: 0700, this process's user).
private func temporaryDirectory(_ name: String) throws -> String {
    var template = Array("/tmp/vpb-test-\(getpid())-\(name)-XXXXXX".utf8CString)
    guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
        throw SystemCallError("mkdtemp", errno: Errno(rawValue: errno))
    }
    return String(cString: made)
}

private func lstatOf(_ path: String) -> stat? {
    var st = stat()
    return lstat(path, &st) == 0 ? st : nil
}

extension LinuxIOTests {
    /// Issue 20, hole 8 and the last part of hole 9: the daemon's socket
    /// files are chowned, chmodded and removed as the very files it bound —
    /// never through a symlink a local user swapped in, never another
    /// process's socket bound at the same path since — and only in
    /// directories no one else can change the entries of.
    @Suite struct SocketFiles {
        /// A symlink swapped in for the socket between bind and the
        /// permissions: its target keeps its owner and mode (it used to be
        /// chowned and chmodded), and the change is refused.
        @Test func permissionsNeverFollowASymlinkSwappedInForTheSocket() throws {
            let dir = try temporaryDirectory("perm")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let path = "\(dir)/s.sock", target = "\(dir)/precious"
            let socket = try UnixSocket.listen(path: path, requireSafeDirectory: true)
            let file = try #require(socket.boundFile)
            // In place, the owner, group and mode are set (also through
            // glibc's fchmodat(AT_SYMLINK_NOFOLLOW) on a socket).
            try SocketPermissions.apply(to: file, mode: 0o640, group: 4242, owner: 4343)
            let set = try #require(lstatOf(path))
            #expect(set.st_mode & 0o7777 == 0o640 && set.st_uid == 4343 && set.st_gid == 4242)

            #expect(FileManager.default.createFile(atPath: target, contents: Data("root's".utf8)))
            #expect(chmod(target, 0o600) == 0)
            #expect(unlink(path) == 0 && symlink(target, path) == 0)
            #expect(throws: SystemCallError.self) { try SocketPermissions.apply(to: file, mode: 0o666, group: 4242, owner: 4242) }
            let after = try #require(lstatOf(target))
            #expect(after.st_mode & 0o7777 == 0o600 && after.st_uid == 0 && after.st_gid == 0, "the symlink's target is untouched")
            #expect(lstatOf(path).map { $0.st_mode & S_IFMT == S_IFLNK } == true)

            // Another socket bound at the path since is not ours either.
            #expect(unlink(path) == 0)
            let other = try UnixSocket.listen(path: path)
            do {
                try SocketPermissions.apply(to: file, mode: 0o666, group: nil)
                Issue.record("another process's socket was chmodded")
            } catch {
                #expect(error.errno == .permissionDenied && error.description.contains("is no longer the socket bound there"))
            }
            #expect(lstatOf(path).map { $0.st_mode & 0o777 } != 0o666)
            try other.fd.close()
            try socket.fd.close()
        }

        /// A directory others can write is refused — before anything is
        /// bound, with the path and the reason — unless it is sticky and
        /// root's (/tmp); so is a symlink as the directory, and a directory
        /// made writable after the bind when the permissions are set.
        @Test func aSocketDirectoryOthersCanWriteIsRefusedUnlessStickyAndRoots() throws {
            let dir = try temporaryDirectory("dirs")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let path = "\(dir)/s.sock"
            let refused: [(mode: mode_t, owner: uid_t, why: String)] = [
                (0o777, 0, "is writable by its group and others (mode 0777) and is not both sticky and owned by root"),
                (0o757, 0, "is writable by others (mode 0757)"),
                (0o775, 0, "is writable by its group (mode 0775)"),
                (0o1777, 65534, "is owned by uid 65534"),
                (0o755, 65534, "is owned by uid 65534"),
            ]
            for (mode, owner, why) in refused {
                #expect(chown(dir, owner, 0) == 0 && chmod(dir, mode) == 0)
                do {
                    _ = try UnixSocket.listen(path: path, requireSafeDirectory: true)
                    Issue.record("mode \(String(mode, radix: 8)) owner \(owner): accepted")
                } catch {
                    #expect(error.errno == .permissionDenied)
                    #expect(error.description.contains("socket directory \(dir) \(why)"), "\(error)")
                    #expect(error.description.hasPrefix("bind(\(path)): refused: "), "\(error)")
                }
                #expect(lstatOf(path) == nil, "nothing was bound")
            }
            for mode: mode_t in [0o1777, 0o1770, 0o755, 0o700] {
                #expect(chown(dir, 0, 0) == 0 && chmod(dir, mode) == 0)
                let s = try UnixSocket.listen(path: path, requireSafeDirectory: true)
                try #require(s.boundFile).remove()
                try s.fd.close()
            }
            // /tmp itself: sticky and root's.
            let inTmp = "/tmp/vpb-test-\(getpid())-in-tmp.sock"
            let s = try UnixSocket.listen(path: inTmp, requireSafeDirectory: true)
            #expect(try #require(s.boundFile).remove())
            try s.fd.close()
            // A symlink as the directory is refused, not followed.
            let link = "\(dir)-link"
            #expect(symlink(dir, link) == 0)
            defer { unlink(link) }
            #expect(throws: SystemCallError.self) { _ = try UnixSocket.listen(path: "\(link)/s.sock", requireSafeDirectory: true) }
            // Made writable by others after the bind: the permissions are refused.
            #expect(chmod(dir, 0o755) == 0)
            let late = try UnixSocket.listen(path: path, requireSafeDirectory: true)
            let lateFile = try #require(late.boundFile)
            #expect(chmod(dir, 0o777) == 0)
            do {
                try SocketPermissions.apply(to: lateFile, mode: 0o600, group: nil)
                Issue.record("permissions set in a world-writable directory")
            } catch {
                #expect(error.description.contains("socket directory \(dir) is writable by"))
            }
            try late.fd.close()
        }

        /// `remove` unlinks the socket it bound, and leaves alone a socket
        /// another process bound at the same path since (it used to unlink
        /// any socket there), a symlink, or a regular file.
        @Test func removeLeavesASocketReboundAtThePathBySomeoneElse() throws {
            let dir = try temporaryDirectory("rebound")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let path = "\(dir)/s.sock"
            let first = try UnixSocket.listen(path: path)
            let mine = try #require(first.boundFile)
            #expect(mine.isInPlace)
            try first.fd.close()
            // Someone else takes the path over: the stale socket is replaced by theirs.
            let theirs = try UnixSocket.listen(path: path)
            #expect(!mine.isInPlace)
            #expect(!mine.remove())
            #expect(lstatOf(path) != nil, "their socket is still there")
            let client = try UnixSocket.connect(path: path)
            try client.fd.close()
            // A symlink or a regular file where the socket was: left alone.
            #expect(try #require(theirs.boundFile).remove())
            try theirs.fd.close()
            for make in [{ symlink("/etc/hostname", path) }, { FileManager.default.createFile(atPath: path, contents: nil) ? 0 : -1 }] {
                #expect(make() == 0)
                #expect(!mine.remove())
                #expect(lstatOf(path) != nil)
                #expect(unlink(path) == 0)
            }
        }
    }
}
