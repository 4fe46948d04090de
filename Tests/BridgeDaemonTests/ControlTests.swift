import BridgeCore
import BridgeDaemon
import ControlClient
import Foundation
import LinuxIO
import Logging
import DaemonTestSupport
import Testing
import TestSupport
import VhostUser

@Suite(.serialized) struct ControlTests {
    @Test func statusListShowAndStats() throws {
        let d = try LiveDaemon("bridges:\n  - name: a\n    bar-size: 64G\n  - name: b\n    bar-size: 1T\n    mode: iommu\n")
        defer { d.stop() }
        let c = try d.client()
        let status = try #require(ok(try c.call(["command": "status"])) as? [String: Any])
        #expect((status["bridges"] as? Int) == 2 && (status["version"] as? Int) == 1)
        let list = try #require(ok(try c.call(["command": "list"])) as? [[String: Any]])
        #expect(list.map { $0["name"] as? String } == ["a", "b"])
        let show = try #require(ok(try c.call(["command": "show", "name": "b"])) as? [String: Any])
        #expect(((show["config"] as? [String: Any])?["mode"] as? String) == "iommu")
        let stats = try #require(ok(try c.call(["command": "stats"])) as? [[String: Any]])
        #expect(stats.count == 2)
        let metrics = try #require(ok(try c.call(["command": "metrics"])) as? [String: Any])
        let text = metrics["text"] as? String ?? ""
        #expect(text.contains("# TYPE vhost_pci_bridge_mappings gauge"))
        #expect(text.contains("vhost_pci_bridge_mapped_bytes{bridge=\"a\"} 0"))
        #expect(text.contains("vhost_pci_bridge_notifications_relayed_total{bridge=\"b\",direction=\"kick\"} 0"))
        #expect(text.contains("vhost_pci_bridge_accept_failures_total{bridge=\"a\"} 0"))
        #expect(text.contains("vhost_pci_mapping_budget_limit \(MappingBudget.process.total)\n"))
        // Every sample line is "name[{labels}] value".
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            #expect(line.split(separator: " ").count == 2, "malformed sample: \(line)")
        }
    }

    /// Every CLI call is a connection: finished ones leave no fd behind.
    /// (Threads are detached; their count is not asserted because the test
    /// runtime's own pool grows and shrinks on its own.)
    @Test func manyShortConnectionsLeaveNothingBehind() throws {
        let d = try LiveDaemon("bridges: []\n")
        defer { d.stop() }
        _ = ok(try d.client().call(["command": "status"])) // warm-up
        let fdsBefore = openFileDescriptorCount()
        for _ in 0..<100 {
            let c = try d.client()
            _ = ok(try c.call(["command": "status"]))
        }
        // `<=`: the warm-up connection's server side may still have been closing when counted.
        #expect(pollUntil { openFileDescriptorCount() <= fdsBefore }, "fds \(openFileDescriptorCount()) vs \(fdsBefore)")
    }

    /// Clients that vanish mid-request (half a line; a whole request but gone
    /// before the answer; a reset with unread data) cost the daemon nothing:
    /// the next client is answered and no fd is left behind.
    @Test func clientsVanishingMidRequestLeaveNothing() throws {
        let d = try LiveDaemon("bridges:\n  - name: b0\n    bar-size: 1G\n")
        defer { d.stop() }
        _ = ok(try d.client().call(["command": "status"])) // warm-up
        let before = settledOpenFileDescriptorCount()
        for i in 0..<30 {
            let s = try UnixSocket.connect(path: "\(d.dir)/control.sock")
            switch i % 3 {
            case 0: try s.send(Array(#"{"command": "sta"#.utf8))
            case 1: try s.send(Array(#"{"command": "show", "name": "b0"}"#.utf8) + [10])
            default: try s.send(Array(repeating: UInt8(ascii: "x"), count: 70_000))
            }
            try s.fd.close()
        }
        let answer = ok(try d.client().call(["command": "list"]))
        #expect(answer != nil, "the daemon still answers")
        // Each connection's thread notices its client is gone on its next read:
        // under a sanitizer that can take longer than a settle interval.
        #expect(pollUntil { openFileDescriptorCount() == before }, "every vanished client's connection was closed: \(openFileDescriptorCount()) vs \(before)")
    }

    @Test func badRequestsGetAnErrorAndTheConnectionStays() throws {
        let d = try LiveDaemon("bridges: []\n")
        defer { d.stop() }
        let c = try d.client()
        #expect(errorCode(try c.call(["command": "dance"])) == "unknown-command")
        let raw = try c.callRaw("{not json")
        #expect(raw.contains("\"bad-json\""))
        #expect(try c.callRaw("[1,2]").contains("\"bad-json\""))
        #expect(errorCode(try c.call(["nothing": 1])) == "bad-request")
        #expect(errorCode(try c.call(["command": "status", "version": 9])) == "version")
        #expect(errorCode(try c.call(["command": "show", "name": "ghost"])) == "unknown-bridge")
        #expect(errorCode(try c.call(["command": "log-level", "level": "loud"])) == "bad-request")
        // Oversized line: one error, then the same connection still works.
        let long = try c.callRaw(String(repeating: "x", count: ControlProtocol.maximumLine + 10))
        #expect(long.contains("\"too-long\""))
        #expect(ok(try c.call(["command": "status"])) != nil)
    }

    @Test func anUnauthorisedPeerIsRefused() throws {
        // The seam: the real policy is uid 0 or the control group; here nobody passes.
        let d = try LiveDaemon("bridges: []\n", authorize: { _ in false })
        defer { d.stop() }
        let c = try d.client()
        let r = try c.call(["command": "status"])
        #expect(errorCode(r) == "denied")
        #expect(throws: ControlClient.Failure.self) { _ = try c.call(["command": "status"]) }
        // And the default policy itself.
        let policy = ControlServer.policy(group: 1234)
        #expect(policy(PeerCredentials(pid: 1, uid: 0, gid: 0)))
        #expect(policy(PeerCredentials(pid: 1, uid: 1000, gid: 1234)))
        #expect(!policy(PeerCredentials(pid: 1, uid: 1000, gid: 1000)))
        #expect(!ControlServer.policy(group: nil)(PeerCredentials(pid: 1, uid: 1000, gid: 1000)))
        // A supplementary group counts (usermod -aG vhost-pci alice).
        #expect(policy(PeerCredentials(pid: 1, uid: 1000, gid: 1000, groups: [27, 1234])))
        #expect(!policy(PeerCredentials(pid: 1, uid: 1000, gid: 1000, groups: [27, 100])))
    }

    @Test func createDestroyAndTheVM2Budget() throws {
        let d = try LiveDaemon("vm2-budgets:\n  shared: 128G\nbridges:\n  - name: one\n    vm2: shared\n    bar-size: 64G\n")
        defer { d.stop() }
        let c = try d.client()
        #expect(ok(try c.call(["command": "create", "bridge": ["name": "two", "vm2": "shared", "bar-size": "64G"]])) != nil)
        let over = try c.call(["command": "create", "bridge": ["name": "three", "vm2": "shared", "bar-size": "4K"]])
        #expect(errorCode(over) == "invalid")
        #expect(errorMessage(over).contains("VM2 'shared' would need 128 GiB + 4096") || errorMessage(over).contains("budget is 128 GiB"))
        #expect(errorCode(try c.call(["command": "create", "bridge": ["name": "two", "bar-size": "1G"]])) == "exists")
        #expect(errorCode(try c.call(["command": "create", "bridge": ["name": "bad", "bar-size": "3G"]])) == "invalid")
        #expect(ok(try c.call(["command": "destroy", "name": "two"])) != nil)
        #expect(errorCode(try c.call(["command": "destroy", "name": "two"])) == "unknown-bridge")
        #expect(d.controller.bridgeNames == ["one"])
    }

    /// A control client cannot make the daemon bind outside the runtime
    /// directory (or `socket-directories`), and nothing that is not a socket
    /// is ever unlinked as "stale".
    @Test func createIsConfinedAndNeverUnlinksAFile() throws {
        let extra = "/tmp/vpb-ctl-extra-\(getpid())"
        try FileManager.default.createDirectory(atPath: extra, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: extra) }
        let d = try LiveDaemon("socket-directories: [\(extra)]\nbridges: []\n")
        defer { d.stop() }
        let c = try d.client()
        let victim = "\(d.dir)/precious.txt"
        #expect(FileManager.default.createFile(atPath: victim, contents: Array("keep me".utf8).withUnsafeBytes { Data($0) }))
        for path in ["/etc/vpb-evil.sock", "\(d.dir)/../escape.sock", "\(d.dir)//x.sock", "\(d.dir)/./x.sock", d.dir] {
            let r = try c.call(["command": "create", "bridge": ["name": "evil", "bar-size": "1G", "vhost-user-socket": path]])
            #expect(errorCode(r) == "invalid" && errorMessage(r).hasPrefix("bridge.vhost-user-socket: "), "\(path): \(r)")
        }
        let peer = try c.call(["command": "create", "bridge": ["name": "evil", "bar-size": "1G", "peer-socket": "/var/tmp/x.sock"]])
        #expect(errorCode(peer) == "invalid" && errorMessage(peer).hasPrefix("bridge.peer-socket: "))
        // Inside the runtime directory, over an existing regular file: refused
        // by bind (address in use), and the file is still there.
        let onFile = try c.call(["command": "create", "bridge": ["name": "f", "bar-size": "1G", "vhost-user-socket": victim]])
        #expect(errorCode(onFile) != nil)
        #expect(FileManager.default.contents(atPath: victim).map { Array($0) } == Array("keep me".utf8))
        // An allowed extra directory works.
        #expect(ok(try c.call(["command": "create", "bridge": ["name": "ok", "bar-size": "1G", "vhost-user-socket": "\(extra)/ok.sock",
                                                               "peer-socket": "\(extra)/ok-vm2.sock"]])) != nil)
        #expect(d.controller.bridgeNames == ["ok"])
    }

    /// Issue 20, hole 8: `create` in a socket directory others can write is
    /// refused with the path and the reason; a sticky root-owned one (/tmp)
    /// is accepted.
    @Test func createIsRefusedInASocketDirectoryOthersCanWrite() throws {
        let writable = "/tmp/vpb-ctl-writable-\(getpid())"
        try FileManager.default.createDirectory(atPath: writable, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: writable) }
        #expect(chmod(writable, 0o777) == 0)
        let d = try LiveDaemon("socket-directories: [\(writable), /tmp]\nbridges: []\n")
        defer { d.stop() }
        let c = try d.client()
        let r = try c.call(["command": "create", "bridge": ["name": "w", "bar-size": "1G", "vhost-user-socket": "\(writable)/w.sock"]])
        #expect(errorCode(r) != nil)
        #expect(errorMessage(r).contains("socket directory \(writable) is writable by its group and others (mode 0777) and is not both sticky and owned by root"), "\(r)")
        #expect(!FileManager.default.fileExists(atPath: "\(writable)/w.sock"))
        let inTmp = "/tmp/vpb-ctl-sticky-\(getpid()).sock"
        #expect(ok(try c.call(["command": "create", "bridge": ["name": "t", "bar-size": "1G", "vhost-user-socket": inTmp]])) != nil)
        #expect(ok(try c.call(["command": "destroy", "name": "t"])) != nil)
        #expect(!FileManager.default.fileExists(atPath: inTmp))
    }

    @Test func socketPathPolicy() {
        #expect(SocketPathPolicy.refusal("/run/v/a.sock", allowed: ["/run/v"]) == nil)
        #expect(SocketPathPolicy.refusal("/run/v/sub/a.sock", allowed: ["/run/v/"]) == nil)
        #expect(SocketPathPolicy.refusal("/run/vx/a.sock", allowed: ["/run/v"]) != nil, "a sibling sharing the prefix")
        #expect(SocketPathPolicy.refusal("/run/v", allowed: ["/run/v"]) != nil)
        #expect(SocketPathPolicy.refusal("run/v/a.sock", allowed: ["/run/v"]) != nil)
        #expect(SocketPathPolicy.refusal("/run/v/../a.sock", allowed: ["/run/v"]) != nil)
        #expect(!SocketPathPolicy.isPlain("/a//b") && SocketPathPolicy.isPlain("/a/b"))
    }


    @Test func reloadAddsRemovesAndReportsRestarts() throws {
        let d = try LiveDaemon("bridges:\n  - name: old\n    bar-size: 1G\n")
        defer { d.stop() }
        let c = try d.client()
        let r = try #require(ok(try c.call(["command": "reload"])) as? [String: Any])
        #expect((r["added"] as? [String]) == ["fresh"] && (r["removed"] as? [String]) == ["old"])
        #expect(d.controller.bridgeNames == ["fresh"])
        #expect(JournalLogHandler.level.withLock { $0 } == .debug)
        JournalLogHandler.level.withLock { $0 = .info }
        // Changed settings of a live bridge are reported, not applied.
        var changed = d.controller.config
        changed.bridges[0].revocationDeadlineMilliseconds = 7
        #expect(d.controller.reload(changed).needsRestart == ["fresh"])
        // The file may name any socket path (root wrote it): a reload adds
        // such a bridge, only control clients' `create` is confined.
        var outside = d.controller.config
        var b = outside.bridges[0]
        b.name = "elsewhere"
        b.vhostUserSocket = "/tmp/vpb-reload-\(getpid())-vm1.sock"
        b.peerSocket = "/tmp/vpb-reload-\(getpid())-vm2.sock"
        outside.bridges.append(b)
        let report = d.controller.reload(outside)
        #expect(report.added == ["elsewhere"] && report.failed.isEmpty, "\(report)")
    }
}

@Suite struct MappingBudgetUnitTests {
    /// One share is always kept for a bridge created later: a bridge alone
    /// cannot take everything, and a newcomer is never left with nothing.
    @Test func aBridgeCreatedLaterIsNotStarved() {
        let budget = MappingBudget(total: 1000)
        let a = budget.register()
        #expect(budget.reserve(a, current: 0) == 500)
        budget.settle(a, count: 500)
        let b = budget.register()
        let ceilingB = budget.reserve(b, current: 0)
        #expect(ceilingB == 1000 - 333 - 500, "total − newcomer reserve − what A holds")
        budget.settle(b, count: ceilingB)
        #expect(budget.used == 500 + ceilingB)
        // A cannot grow into B's guarantee or the reserve.
        let ceilingA = budget.reserve(a, current: 500)
        #expect(ceilingA == 1000 - 333 - 333 && ceilingA < 500, "A borrowed while alone; it keeps what it has but cannot grow")
        budget.settle(a, count: 500)
        budget.unregister(b)
        #expect(budget.reserve(b, current: 0) == 0, "an unregistered bridge gets nothing (and is not re-registered)")
        #expect(budget.used == 500)
    }
}

@Suite struct CLIRenderTests {
    @Test func listTable() {
        let rows = [
            BridgeSummary(name: "net0", mode: "identity", barSize: 1 << 36, vhostUserSocket: "/run/vhost-pci-bridged/net0-vm1.sock",
                          peerSocket: "", vm2: "net0", vm1Connected: true, vm2Connected: false, mappings: 1, bytesMapped: 256 << 20),
            BridgeSummary(name: "storage-backend", mode: "iommu", barSize: 1 << 40, vhostUserSocket: "/run/x.sock",
                          peerSocket: "", vm2: "storage-backend", vm1Connected: false, vm2Connected: false, mappings: 0, bytesMapped: 0),
        ]
        #expect(Render.list(rows) == """
        NAME             MODE      BAR  VM1   VM2   MAPPINGS  MAPPED  VHOST-USER SOCKET
        net0             identity  64G  up    down  1         256M    /run/vhost-pci-bridged/net0-vm1.sock
        storage-backend  iommu     1T   down  down  0         0       /run/x.sock

        """)
    }

    @Test func keyValuesAndStats() {
        #expect(Render.keyValues(["uptimeSeconds": 12.5, "bridges": 2, "logLevel": "info", "vm1Sessions": 1]) == """
        bridges        2
        logLevel       info
        uptimeSeconds  12.5
        vm1Sessions    1

        """)
        var a = BridgeCounters(name: "a")
        (a.sessionsServed, a.requests, a.iotlbUpdates, a.iotlbInvalidates, a.iotlbMisses) = (3, 120, 7, 2, 4)
        (a.refusals, a.kicksRelayed, a.callsRelayed, a.revocationTimeouts) = (["frozen": 2, "bar-bounds": 1], 900, 880, 0)
        #expect(Render.stats([a]) == """
        NAME  SESSIONS  REQUESTS  IOTLB UPD  IOTLB INV  MISSES  REFUSED  KICKS  CALLS  REVOKE TIMEOUTS
        a     3         120       7          2          4       3        900    880    0

        """)
    }
}

@Suite struct ControlJSONSnapshotTests {
    /// What `--json` shows and scripts parse: stable keys, sorted.
    @Test func responsesAreStableJSON() {
        #expect(ControlProtocol.response(ok: ["created": "net1"]) == #"{"ok":true,"result":{"created":"net1"},"version":1}"#)
        #expect(ControlProtocol.response(error: ControlError("unknown-bridge", "no bridge named x"))
                == #"{"error":{"code":"unknown-bridge","message":"no bridge named x"},"ok":false,"version":1}"#)
        struct Row: Encodable { var name = "a"; var mappings = 2 }
        #expect(ControlProtocol.response(ok: [Row()]) == #"{"ok":true,"result":[{"mappings":2,"name":"a"}],"version":1}"#)
    }
}
