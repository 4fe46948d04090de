import CLinuxShim
#if canImport(Glibc)
import Glibc
#endif

/// The process limits a long-running daemon holding many peers' fds and
/// mappings depends on.
public enum ResourceLimits {
    /// RLIMIT_NOFILE (soft, hard).
    public static var openFiles: (soft: UInt64, hard: UInt64) {
        guard let limit = try? openFilesLimit() else { return (0, 0) }
        return (UInt64(limit.rlim_cur), UInt64(limit.rlim_max))
    }

    private static func openFilesLimit() throws(SystemCallError) -> rlimit {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { throw .current("getrlimit(RLIMIT_NOFILE)") }
        return limit
    }

    private static func setOpenFilesLimit(_ limit: rlimit) throws(SystemCallError) {
        var limit = limit
        guard setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { throw .current("setrlimit(RLIMIT_NOFILE, \(limit.rlim_cur))") }
    }

    /// Raises the soft RLIMIT_NOFILE to the hard limit (or to `target` when
    /// that is lower). Every VM1 session holds its memory, kick, call and err
    /// fds; the default soft limit of 1024 is reached by a handful of
    /// bridges. Returns the soft limit in force afterwards.
    @discardableResult
    public static func raiseOpenFiles(to target: UInt64 = UInt64.max) throws(SystemCallError) -> UInt64 {
        var limit = try openFilesLimit()
        let wanted = min(UInt64(limit.rlim_max), target)
        guard wanted > UInt64(limit.rlim_cur) else { return UInt64(limit.rlim_cur) }
        limit.rlim_cur = rlim_t(wanted)
        try setOpenFilesLimit(limit)
        return wanted
    }

    /// Sets the soft RLIMIT_NOFILE (tests lower it to provoke EMFILE).
    public static func setOpenFilesSoftLimit(_ soft: UInt64) throws(SystemCallError) {
        var limit = try openFilesLimit()
        limit.rlim_cur = rlim_t(min(soft, UInt64(limit.rlim_max)))
        try setOpenFilesLimit(limit)
    }

    /// Sets another process's soft RLIMIT_NOFILE (prlimit(2)); returns the
    /// soft limit it had. Fault tests lower a running daemon's limit to see
    /// sessions refused cleanly, then put it back.
    @discardableResult
    public static func setOpenFilesSoftLimit(_ soft: UInt64, process pid: Int32) throws(SystemCallError) -> UInt64 {
        var current: UInt64 = 0, hard: UInt64 = 0
        guard shim_prlimit_nofile(pid, &current, &hard, 0) == 0 else { throw .current("prlimit(\(pid), RLIMIT_NOFILE)") }
        var wanted = min(soft, hard)
        guard shim_prlimit_nofile(pid, &wanted, &hard, 1) == 0 else { throw .current("prlimit(\(pid), RLIMIT_NOFILE, \(soft))") }
        return current
    }

    /// `vm.max_map_count`: how many VMAs the kernel lets this process have
    /// (65530 by default). nil when it cannot be read.
    public static func maxMapCount() -> Int? {
        let fd = open("/proc/sys/vm/max_map_count", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 32)
        let n = read(fd, &buffer, buffer.count)
        guard n > 0 else { return nil }
        let text = String(decoding: buffer[0..<n], as: UTF8.self).trimmingSuffix()
        guard let value = Int(text), value > 0 else { return nil }
        return value
    }

    /// How many VMAs this process has now (lines of /proc/self/maps).
    public static func mapCount() -> Int {
        guard let file = fopen("/proc/self/maps", "r") else { return 0 }
        defer { fclose(file) }
        var count = 0
        while true {
            let c = fgetc(file)
            if c == EOF { break }
            if c == 10 { count += 1 }
        }
        return count
    }
}

private extension String {
    func trimmingSuffix() -> String {
        var s = Substring(self)
        while let last = s.last, last == "\n" || last == " " { s = s.dropLast() }
        return String(s)
    }
}
