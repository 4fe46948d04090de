import Testing
@testable import BridgeCore

/// Issue 20, hole 8: which directories may hold the daemon's sockets, for
/// every permission bit pattern and three kinds of owner.
@Suite struct SocketDirectoryRuleTests {
    @Test func everyModeAndOwner() {
        let daemon: UInt32 = 0, other: UInt32 = 1000
        for mode in UInt32(0)...0o7777 {
            let writableByOthers = mode & 0o022 != 0, sticky = mode & 0o1000 != 0
            let forRoot = SocketDirectoryRule.refusal(mode: 0o040000 | mode, owner: 0, daemonUser: daemon)
            #expect((forRoot == nil) == (!writableByOthers || sticky), "mode \(String(mode, radix: 8))")
            #expect(SocketDirectoryRule.refusal(mode: mode, owner: other, daemonUser: daemon) != nil, "another user's directory")
            // The daemon's own user (a daemon not running as root): its
            // directory, not writable by others; sticky does not help, only root's does.
            let forDaemonUser = SocketDirectoryRule.refusal(mode: mode, owner: other, daemonUser: other)
            #expect((forDaemonUser == nil) == !writableByOthers, "mode \(String(mode, radix: 8)), the daemon's user")
        }
    }

    @Test func reasonsNameTheModeAndWhoCanWrite() {
        #expect(SocketDirectoryRule.refusal(mode: 0o777, owner: 0, daemonUser: 0)
                == "is writable by its group and others (mode 0777) and is not both sticky and owned by root")
        #expect(SocketDirectoryRule.refusal(mode: 0o775, owner: 0, daemonUser: 0)
                == "is writable by its group (mode 0775) and is not both sticky and owned by root")
        #expect(SocketDirectoryRule.refusal(mode: 0o1777, owner: 1000, daemonUser: 0)
                == "is owned by uid 1000 (mode 1777): only root or the daemon's own user may own a socket directory")
        #expect(SocketDirectoryRule.refusal(mode: 0o1777, owner: 0, daemonUser: 0) == nil, "/tmp")
        #expect(SocketDirectoryRule.refusal(mode: 0o755, owner: 0, daemonUser: 0) == nil, "/run/vhost-pci-bridge")
    }
}
