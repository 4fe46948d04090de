import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Plain file operations the daemon and its CLI need (the packaged binaries
/// link no Foundation).
public enum Files {
    /// Renames `path` to `newPath` (rename(2): atomic within one file system;
    /// replaces `newPath` if it exists).
    public static func rename(_ path: String, to newPath: String) throws(SystemCallError) {
        guard Glibc.rename(path, newPath) == 0 else { throw .current("rename(\(path), \(newPath))") }
    }

    /// The whole file, refused (EFBIG) beyond `limit` bytes.
    public static func read(_ path: String, limit: Int = 16 << 20) throws(SystemCallError) -> [UInt8] {
        let fd = try retryingInterrupts("open(\(path))") { open(path, O_RDONLY | O_CLOEXEC) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = try retryingInterrupts("read(\(path))") {
                chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            }
            if n == 0 { return bytes }
            guard bytes.count + n <= limit else {
                throw SystemCallError("read(\(path))", errno: .fileTooLarge, detail: "larger than \(limit) bytes")
            }
            bytes += chunk[..<n]
        }
    }

    /// Asks the kernel to drop `path`'s clean pages from the page cache
    /// (written out, then posix_fadvise POSIX_FADV_DONTNEED; pages some process
    /// maps stay).
    /// The benchmarks start a binary this way, as after a boot: how much of
    /// it ends up resident depends on how its pages came into the cache
    /// (just written by a copy or an install, the kernel maps them in
    /// larger pieces: about 0.8 MiB more for the daemon). No effect on
    /// tmpfs, whose pages are the file.
    public static func dropCachedPages(_ path: String) throws(SystemCallError) {
        let fd = try retryingInterrupts("open(\(path))") { open(path, O_RDONLY | O_CLOEXEC) }
        defer { close(fd) }
        // Dirty pages are not dropped: write them out first (a binary just built).
        guard fdatasync(fd) == 0 else { throw .current("fdatasync(\(path))") }
        let rc = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
        guard rc == 0 else { throw SystemCallError("posix_fadvise(\(path), DONTNEED)", errno: Errno(rawValue: rc)) }
    }

    /// Replaces `path` with `bytes` atomically: a temporary file in the same
    /// directory (`.NAME.tmp-PID`), written and synced, then renamed over
    /// it. A new file gets `mode` less the umask.
    public static func writeAtomically(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o666) throws(SystemCallError) {
        let directory = directory(of: path)
        let name = path.split(separator: "/").last.map(String.init) ?? path
        let temporary = (directory.isEmpty ? "" : directory == "/" ? "/" : directory + "/") + ".\(name).tmp-\(getpid())"
        let fd = try retryingInterrupts("open(\(temporary))") {
            open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode)
        }
        do {
            defer { close(fd) }
            var written = 0
            while written < bytes.count {
                written += try retryingInterrupts("write(\(temporary))") {
                    bytes.withUnsafeBytes { write(fd, $0.baseAddress! + written, $0.count - written) }
                }
            }
            _ = try retryingInterrupts("fsync(\(temporary))") { fsync(fd) }
        } catch {
            unlink(temporary)
            throw error
        }
        do { try rename(temporary, to: path) } catch {
            unlink(temporary)
            throw error
        }
    }

    /// Makes `path` and every missing directory above it (`mkdir -p`).
    public static func createDirectories(_ path: String, mode: mode_t = 0o755) throws(SystemCallError) {
        var prefix = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            prefix += "/" + component
            if mkdir(prefix, mode) != 0 && Glibc.errno != EEXIST { throw .current("mkdir(\(prefix))") }
        }
    }

    /// The directory part of a path, as `dirname` without its `.`:
    /// `/a/b` → `/a`, `/a` → `/`, `a` → ``, trailing slashes ignored.
    public static func directory(of path: String) -> String {
        var p = Substring(path)
        while p.count > 1, p.hasSuffix("/") { p = p.dropLast() }
        guard let slash = p.lastIndex(of: "/") else { return "" }
        let head = p[..<slash]
        return head.isEmpty ? "/" : String(head)
    }

    /// Writes `text` to standard error, whole (write(2), no buffering);
    /// errors are ignored — there is nowhere left to report them.
    public static func writeStandardError(_ text: String) {
        var text = text
        text.withUTF8 { buffer in
            var offset = 0
            while offset < buffer.count {
                let n = write(STDERR_FILENO, buffer.baseAddress! + offset, buffer.count - offset)
                if n < 0 && Glibc.errno == EINTR { continue }
                if n <= 0 { return }
                offset += n
            }
        }
    }
}
