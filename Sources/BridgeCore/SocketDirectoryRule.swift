/// Which directories the daemon binds its sockets in. The daemon runs as
/// root and, after `bind`, gives the socket file its owner and mode; it also
/// removes the file when it stops. Whoever can change the directory's
/// entries could swap the file for a symlink (and have root chown or chmod
/// the target) or for a socket of their own. So the directory must be
/// writable by nobody but root or the daemon's own user — or, like `/tmp`,
/// be sticky and owned by root (others may add entries there, but not
/// rename or remove the daemon's). Pure: the caller passes what `fstat`
/// of the opened directory reported.
public enum SocketDirectoryRule {
    /// nil when a directory with permission bits `mode` (`st_mode`, the
    /// file type bits are ignored) owned by `owner` is fit for the sockets
    /// of a daemon running as `daemonUser`; else why not, as a phrase that
    /// follows the directory's name ("… is writable by its group …").
    public static func refusal(mode: UInt32, owner: UInt32, daemonUser: UInt32) -> String? {
        let permissions = mode & 0o7777
        let digits = String(permissions, radix: 8)
        let octal = "mode " + String(repeating: "0", count: max(0, 4 - digits.count)) + digits
        guard owner == 0 || owner == daemonUser else {
            return "is owned by uid \(owner) (\(octal)): only root or the daemon's own user may own a socket directory"
        }
        let writers = [(0o020, "its group"), (0o002, "others")].filter { permissions & UInt32($0.0) != 0 }.map(\.1)
        guard !writers.isEmpty else { return nil }
        if permissions & 0o1000 != 0 && owner == 0 { return nil } // sticky and root's: nobody else removes or renames our entries
        return "is writable by \(writers.joined(separator: " and ")) (\(octal)) and is not both sticky and owned by root"
    }
}
