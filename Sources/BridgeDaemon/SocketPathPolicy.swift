/// Where a bridge made over the control socket may listen: inside the runtime
/// directory or one of `socket-directories`, by a plain absolute path (no
/// `.`, `..` or empty components), so a control client cannot make the
/// daemon bind — or clean up — anywhere else.
public enum SocketPathPolicy {
    public static func isPlain(_ path: String) -> Bool {
        guard path.hasPrefix("/") else { return false }
        let parts = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst()
        return !parts.contains { $0.isEmpty || $0 == "." || $0 == ".." } || path == "/"
    }

    /// nil when allowed, else the reason.
    public static func refusal(_ path: String, allowed directories: [String]) -> String? {
        guard isPlain(path) else { return "'\(path)' is not a plain absolute path (no '.', '..' or '//')" }
        for dir in directories {
            let prefix = dir.hasSuffix("/") ? dir : dir + "/"
            if path.hasPrefix(prefix), path.count > prefix.count { return nil }
        }
        return "'\(path)' is outside the directories bridges may be created in (\(directories.joined(separator: ", ")))"
    }
}
