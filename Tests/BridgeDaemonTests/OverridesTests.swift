import BridgeCore
import BridgeDaemon
import DaemonTestSupport
import Foundation
import Logging
import LinuxIO
import Testing
import TestSupport

@Suite struct DaemonOverridesTests {
    let file = try! DaemonConfig.parse("""
    runtime-directory: /run/a
    bridges:
      - name: defaulted
        bar-size: 1G
      - name: named
        bar-size: 1G
        vhost-user-socket: /srv/named-vm1.sock
    """)

    func flagBridge(_ name: String) -> BridgeConfig {
        BridgeConfig(name: name, vhostUserSocket: "/tmp/\(name)-vm1.sock", peerSocket: nil, vm2: name,
                     addressSpace: AddressSpaceConfiguration(barSize: 1 << 30, mode: .identity))
    }

    @Test func theCommandLineIsAppliedOverTheFile() throws {
        let o = DaemonOverrides(runtimeDirectory: "/run/b", controlSocket: nil, logLevel: .debug, bridge: flagBridge("flag"))
        let c = try o.applied(to: file)
        #expect(c.runtimeDirectory == "/run/b" && c.controlSocket == "/run/b/control.sock", "defaulted paths follow the runtime directory")
        #expect(c.bridges.map(\.vhostUserSocket) == ["/run/b/defaulted-vm1.sock", "/srv/named-vm1.sock", "/tmp/flag-vm1.sock"])
        #expect(c.bridges[0].peerSocket == "/run/b/defaulted-vm2.sock")
        #expect(c.logLevel == .debug)
        #expect(try DaemonOverrides(controlSocket: "/tmp/x.ctl").applied(to: file).controlSocket == "/tmp/x.ctl")
        // Applied again to the same file (a reload): the same result.
        #expect(try o.applied(to: file) == c)
    }

    @Test func aFlagBridgeMayNotShadowAFileBridge() {
        #expect(throws: ConfigError.self) { try DaemonOverrides(bridge: flagBridge("named")).applied(to: file) }
        var clash = flagBridge("other")
        clash.vhostUserSocket = "/srv/named-vm1.sock"
        #expect((try? DaemonOverrides(bridge: clash).applied(to: file)) == nil, "socket paths stay unique")
    }

    @Test func aControlSocketOnlyWhenAskedFor() {
        #expect(!DaemonOverrides(bridge: flagBridge("f")).servesControlSocket(withConfigFile: false))
        #expect(DaemonOverrides(controlSocket: "/tmp/c").servesControlSocket(withConfigFile: false))
        #expect(DaemonOverrides(runtimeDirectory: "/tmp/r").servesControlSocket(withConfigFile: false))
        #expect(DaemonOverrides().servesControlSocket(withConfigFile: true))
    }
}

@Suite struct CreatedBridgesTests {
    let dir = "/tmp/vpb-created-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"

    @Test func entriesRoundTripAndAreParsedLikeCreate() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = CreatedBridges(directory: dir)
        #expect(try store.load().isEmpty, "no file yet: nothing")
        let entries = [CreatedBridges.Entry(name: "c1", spec: #"{"bar-size":"1G","mode":"iommu","name":"c1"}"#)]
        try store.save(entries)
        #expect(try store.load() == entries)
        let b = try store.bridge(entries[0], runtimeDirectory: "/run/x")
        #expect(b.addressSpace.mode == .iommu && b.vhostUserSocket == "/run/x/c1-vm1.sock")
        #expect(throws: ConfigError.self) { try store.bridge(.init(name: "c1", spec: #"{"bar-size":"3G","name":"c1"}"#), runtimeDirectory: "/run/x") }
        #expect(throws: ConfigError.self) { try store.bridge(.init(name: "c1", spec: #"{"bar-size":"1G","name":"c2"}"#), runtimeDirectory: "/run/x") }
    }

    /// A restored bridge is checked like the `create` that made it: an entry
    /// whose socket lies outside the allowed directories (an edited file) is
    /// reported and not started; the others are.
    @Test func restoredBridgesAreCheckedLikeCreate() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = CreatedBridges(directory: dir)
        try store.save([.init(name: "good", spec: #"{"bar-size":"1G","name":"good"}"#),
                        .init(name: "evil", spec: #"{"bar-size":"1G","name":"evil","vhost-user-socket":"/etc/evil.sock"}"#)])
        let controller = DaemonController(config: try DaemonConfig.parse("runtime-directory: \(dir)\n"), logger: quietLogger(),
                                          createdBridges: store)
        defer { controller.stopAll() }
        let failed = controller.startCreatedBridges()
        #expect(failed.keys.sorted() == ["evil"] && controller.bridgeNames == ["good"], "\(failed)")
        #expect(controller.lastError?.contains("evil") == true)
        #expect(try store.load().map(\.name) == ["good", "evil"], "the entry stays for the operator to fix")
        try controller.destroy("evil") // not running, still removable
        #expect(try store.load().map(\.name) == ["good"])
        #expect(throws: ControlError.self) { try controller.destroy("evil") }
    }

    /// Creates and destroys from many control connections at once: one
    /// bridge per name however they race, and the state file ends as the
    /// final list (no save overtaken by an older one).
    @Test func concurrentCreatesAndDestroysKeepTheStateFileExact() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let store = CreatedBridges(directory: dir)
        let controller = DaemonController(config: try DaemonConfig.parse("runtime-directory: \(dir)\n"), logger: quietLogger(),
                                          createdBridges: store)
        defer { controller.stopAll() }
        let outcomes = Locked<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 12) { i in
            let name = i < 4 ? "same" : "b\(i)"
            let reply = controller.handle(line: #"{"command":"create","bridge":{"name":"\#(name)","bar-size":"1G"}}"#)
            outcomes.withLock { $0.append(reply.contains(#""ok":true"#) ? "ok \(name)" : "refused \(name)") }
        }
        let all = outcomes.withLock { $0 }
        #expect(all.filter { $0 == "ok same" }.count == 1 && all.filter { $0 == "refused same" }.count == 3, "\(all)")
        #expect(controller.bridgeNames.count == 9)
        DispatchQueue.concurrentPerform(iterations: 4) { i in _ = try? controller.destroy("b\(i + 4)") }
        #expect(try store.load().map(\.name).sorted() == controller.bridgeNames.sorted(), "the file is the running list")
    }

    @Test func aDamagedFileIsAnErrorNamingIt() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let store = CreatedBridges(directory: dir)
        for text in ["{", #"{"version":2,"bridges":[]}"#, #"{"version":1,"bridges":[{"name":"x"}]}"#] {
            try text.write(toFile: store.path, atomically: true, encoding: .utf8)
            #expect(throws: ConfigError.self, "\(text)") { try store.load() }
        }
    }

    /// In process: a created bridge is kept by a reload that does not name
    /// it, a file bridge of the same name is refused, and `destroy` drops it
    /// from the state file.
    @Test func theControllerKeepsCreatedBridgesAcrossReloads() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let base = "runtime-directory: \(dir)\ncontrol-socket: \(dir)/control.sock\n"
        let controller = DaemonController(config: try DaemonConfig.parse(base + "bridges:\n  - name: f\n    bar-size: 1G\n"),
                                          logger: quietLogger(), createdBridges: CreatedBridges(directory: dir))
        defer { controller.stopAll() }
        #expect(controller.startConfiguredBridges().isEmpty)
        let reply = controller.handle(line: #"{"command":"create","bridge":{"name":"c","bar-size":"1G"}}"#)
        #expect(reply.contains(#""persistent":true"#), "\(reply)")
        let report = controller.reload(try DaemonConfig.parse(base + "bridges: []\n"))
        #expect(report.removed == ["f"] && controller.bridgeNames == ["c"])
        let clash = controller.reload(try DaemonConfig.parse(base + "bridges:\n  - name: c\n    bar-size: 2G\n"))
        #expect(clash.failed["c"]?.contains("created at run time") == true && controller.lastError?.contains("reload") == true)
        #expect(try CreatedBridges(directory: dir).load().map(\.name) == ["c"])
        try controller.destroy("c")
        #expect(try CreatedBridges(directory: dir).load().isEmpty)
    }
}

@Suite struct LivenessTests {
    /// A missed ping is not a stuck bridge: only silence longer than the
    /// allowance (a bridge may wait out a revocation deadline) is.
    @Test func onlySilenceLongerThanTheAllowanceIsStuck() {
        var l = Liveness()
        let t0 = ContinuousClock.now
        let allowance: (String) -> Duration = { $0 == "slow" ? .seconds(65) : .seconds(5) }
        #expect(l.round(["a": true, "slow": false], now: t0, allowance: allowance).isEmpty, "first sight starts the clock")
        #expect(l.round(["a": false, "slow": false], now: t0 + .seconds(4), allowance: allowance).isEmpty)
        #expect(l.round(["a": false, "slow": false], now: t0 + .seconds(6), allowance: allowance) == ["a"])
        #expect(l.round(["a": true, "slow": false], now: t0 + .seconds(7), allowance: allowance).isEmpty, "an answer clears it")
        #expect(l.round(["a": true, "slow": false], now: t0 + .seconds(66), allowance: allowance) == ["slow"])
        #expect(l.round(["a": true], now: t0 + .seconds(67), allowance: allowance).isEmpty, "a destroyed bridge is forgotten")
        #expect(l.round(["a": true, "slow": false], now: t0 + .seconds(68), allowance: allowance).isEmpty, "and starts afresh if it returns")
    }
}

@Suite struct StatusTests {
    /// The watchdog's question: a bridge whose thread does not run its loop
    /// does not move its heartbeat when poked; once it runs, it does.
    @Test func onlyARunningBridgeThreadAnswers() throws {
        let dir = "/tmp/vpb-ping-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = BridgeConfig(name: "w", vhostUserSocket: "\(dir)/w.sock", peerSocket: nil, vm2: "w",
                                  addressSpace: AddressSpaceConfiguration(barSize: 1 << 30, mode: .identity))
        let bridge = try Bridge(config.settings, logger: quietLogger())
        bridge.poke()
        usleep(50_000)
        #expect(bridge.heartbeatCount == 0, "no thread, no beat")
        let thread = try JoinableThread(name: "w") { bridge.serve() }
        #expect(pollUntil { bridge.heartbeatCount > 0 })
        let idle = bridge.heartbeatCount
        bridge.poke()
        #expect(pollUntil { bridge.heartbeatCount > idle }, "an idle loop woken by a poke beats")
        bridge.stop()
        thread.join()
        let last = bridge.heartbeatCount
        bridge.poke()
        usleep(50_000)
        #expect(bridge.heartbeatCount == last && bridge.wasStopped, "a stopped bridge does not beat")
    }

    /// `log-level` changes what `status` reports, not only the logging.
    @Test func logLevelShowsInStatus() throws {
        let d = try LiveDaemon("bridges: []\n")
        defer { d.stop(); JournalLogHandler.level.withLock { $0 = .info } }
        let c = try d.client()
        #expect(ok(try c.call(["command": "log-level", "level": "error"])) != nil)
        #expect((ok(try c.call(["command": "status"])) as? [String: Any])?["logLevel"] as? String == "error")
        #expect(d.controller.statusLine == "0 bridge(s), 0 VM1 session(s), 0 VM2(s) connected")
        d.controller.noteError("something broke")
        #expect(d.controller.statusLine.hasSuffix("; last error: something broke"))
    }
}
