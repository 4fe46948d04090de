#if canImport(Glibc)
import Glibc
#endif

/// Plain file operations the daemon needs beyond Foundation's.
public enum Files {
    /// Renames `path` to `newPath` (rename(2): atomic within one file system;
    /// replaces `newPath` if it exists).
    public static func rename(_ path: String, to newPath: String) throws(SystemCallError) {
        guard Glibc.rename(path, newPath) == 0 else { throw .current("rename(\(path), \(newPath))") }
    }
}
