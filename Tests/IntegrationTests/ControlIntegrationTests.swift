import BridgeCore
import BridgeDaemon
import DaemonTestSupport
import EmulatedGuests
import Foundation
import LinuxIO
import Testing
import TestSupport

extension Integration {
    /// Operator commands on a live VM1 session, through the control socket.
    @Suite struct ControlWithGuests {
    @Test func staticMapFreezeAndCountedRefusals() throws {
        let d = try LiveDaemon("bridges:\n  - name: s\n    bar-size: 4G\n    mode: static\n    static-windows: [\"0:16M\", \"1G:1040M\"]\n")
        defer { d.stop() }
        let c = try d.client()
        // No VM1 yet: nothing to map from.
        #expect(errorCode(try c.call(["command": "map", "name": "s", "bus": "0", "gpa": "0", "length": "4K"])) == "no-session")
        // A VM1 with a vIOMMU limited to the second window (a static bridge needs IOMMU_PLATFORM).
        var config = VM1Configuration()
        config.iommu = .iommu
        config.dmaWindow = BusWindow(base: BusAddress(1 << 30), limit: 1040 << 20)!
        let vm1 = try EmulatedVM1(socketPath: "\(d.dir)/s-vm1.sock", configuration: config)
        defer { vm1.disconnect() }
        try vm1.start()
        #expect(ok(try c.call(["command": "map", "name": "s", "bus": "0x100000", "gpa": "0x100000", "length": "1M", "perm": "rw"])) != nil)
        let b = try d.controller.bridge("s")
        #expect(b.window.probeInChild(BusAddress(0x100000)) == .accessible)
        let outside = try c.call(["command": "map", "name": "s", "bus": "0x2000000", "gpa": "0", "length": "4K"])
        #expect(errorCode(outside) == "refused" && errorMessage(outside).hasPrefix("[static-window]"))
        #expect(ok(try c.call(["command": "freeze", "name": "s"])) != nil)
        for _ in 0..<3 {
            let frozen = try c.call(["command": "map", "name": "s", "bus": "0x200000", "gpa": "0", "length": "4K"])
            #expect(errorCode(frozen) == "refused" && errorMessage(frozen).hasPrefix("[frozen]"))
        }
        #expect(b.window.probeInChild(BusAddress(0x100000)) == .accessible, "frozen: nothing granted, nothing lost")
        // Freeze blocks grants only: an operator unmap still revokes.
        #expect(ok(try c.call(["command": "unmap", "name": "s", "bus": "0x100000", "length": "4K"])) != nil)
        #expect(b.window.probeInChild(BusAddress(0x100000)) == .faulted)
        #expect(b.window.probeInChild(BusAddress(0x101000)) == .accessible)
        let show = try #require(ok(try c.call(["command": "show", "name": "s"])) as? [String: Any])
        #expect(((show["session"] as? [String: Any])?["frozen"] as? Bool) == true)
        let refusals = try #require(((ok(try c.call(["command": "stats", "name": "s"])) as? [String: Any])?["refusals"]) as? [String: Any])
        _ = refusals // counted in the live session; checked after it ends:
        vm1.disconnect()
        #expect(pollUntil { b.statistics.sessionsServed == 1 })
        #expect(b.statistics.refusals["frozen"] == 3 && b.statistics.refusals["static-window"] == 1)
    }
    }
}
