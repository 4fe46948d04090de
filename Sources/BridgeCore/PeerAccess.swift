/// Who may use one of a bridge's sockets: the socket file's owner, group and
/// mode, and allow-lists checked against the connecting process's
/// credentials (SO_PEERCRED, SO_PEERGROUPS). Empty allow-lists admit anyone
/// the file mode lets in; root is always admitted.
public struct PeerAccess: Equatable, Sendable {
    public var owner: UInt32?
    public var group: UInt32?
    /// nil: the mode the daemon's umask gives (0600 under the shipped unit).
    public var mode: UInt32?
    public var allowedUsers: [UInt32]
    public var allowedGroups: [UInt32]

    public init(owner: UInt32? = nil, group: UInt32? = nil, mode: UInt32? = nil,
                allowedUsers: [UInt32] = [], allowedGroups: [UInt32] = []) {
        self.owner = owner; self.group = group; self.mode = mode
        self.allowedUsers = allowedUsers; self.allowedGroups = allowedGroups
    }

    public var setsPermissions: Bool { owner != nil || group != nil || mode != nil }

    /// Whether a process with these credentials may stay connected.
    /// Supplementary groups count like the primary one.
    public func admits(uid: UInt32, gid: UInt32, groups: [UInt32]) -> Bool {
        if uid == 0 { return true }
        if allowedUsers.isEmpty && allowedGroups.isEmpty { return true }
        if allowedUsers.contains(uid) { return true }
        return allowedGroups.contains(gid) || groups.contains { allowedGroups.contains($0) }
    }
}
