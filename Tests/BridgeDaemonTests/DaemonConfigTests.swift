import BridgeCore
import BridgeDaemon
import Foundation
import Testing
import TestSupport

let goodConfig = """
runtime-directory: /run/vpb
control-socket: /run/vpb/control.sock
control-group: kvm
control-mode: "0660"
log-level: notice
vm2-budgets:
  vm2-a: 2T
bridges:
  - name: net0
    vhost-user-socket: /run/vpb/net0.sock
    peer-socket: /run/vpb/net0-peer.sock
    vm2: vm2-a
    bar-size: 1T
    mode: iommu
    dma-window: 4G:16G
    notifications: relay-sqpoll
    busy-poll-us: 20
    revocation-deadline-ms: 50
    revocation-spin-us: 200
    max-mappings: 4096
    queue-pairs: 2
    device-features: [event-idx]
  - name: net1
    vm2: vm2-a
    bar-size: 64G
    mode: static
    static-windows: ["0:1G", "2G:3G"]
"""

func configError(_ text: String) -> ConfigError? {
    do { _ = try DaemonConfig.parse(text); return nil } catch { return error }
}

@Suite struct DaemonConfigTests {
    @Test func theShippedConfigParses() throws {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("config/vhost-pci-bridged.yaml")
        let config = try DaemonConfig.parse(try String(contentsOf: url, encoding: .utf8))
        #expect(!config.bridges.isEmpty)
    }

    /// What `make install` and the package put in /etc: valid, no bridge,
    /// the paths the unit and the CLI expect.
    @Test func theProductionTemplateParsesWithNoBridge() throws {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("config/production.yaml")
        let config = try DaemonConfig.parse(try String(contentsOf: url, encoding: .utf8))
        #expect(config.bridges.isEmpty)
        #expect(config.controlSocket == "/run/vhost-pci-bridged/control.sock" && config.runtimeDirectory == "/run/vhost-pci-bridged")
    }

    @Test func cpuAffinityListsAndRanges() throws {
        func cpus(_ v: String) throws -> [Int] {
            try DaemonConfig.parse("bridges:\n  - name: a\n    bar-size: 1G\n    cpu-affinity: \(v)\n").bridges[0].cpuAffinity
        }
        #expect(try cpus("[3, 1, 1]") == [1, 3])
        #expect(try cpus("\"0-2,6\"") == [0, 1, 2, 6])
        #expect(try cpus("5") == [5])
        for bad in ["\"2-1\"", "\"-1\"", "1024", "\"a\"", "[]", "\"0-\""] {
            #expect(configError("bridges:\n  - name: a\n    bar-size: 1G\n    cpu-affinity: \(bad)\n")?.key == "bridges[0].cpu-affinity", "\(bad)")
        }
    }

    /// A runtime directory moves the control socket with it unless the
    /// file names one.
    @Test func theControlSocketFollowsTheRuntimeDirectory() throws {
        #expect(try DaemonConfig.parse("runtime-directory: /run/x\n").controlSocket == "/run/x/control.sock")
        #expect(try DaemonConfig.parse("runtime-directory: /run/x\ncontrol-socket: /run/c.sock\n").controlSocket == "/run/c.sock")
    }

    @Test func aFullConfigParses() throws {
        let c = try DaemonConfig.parse(goodConfig)
        #expect(c.controlMode == 0o660 && c.controlGroup == "kvm" && c.logLevel == .notice)
        #expect(c.vm2Budgets["vm2-a"] == 2 << 40)
        #expect(c.bridges.count == 2)
        let a = c.bridges[0]
        #expect(a.addressSpace.barSize == 1 << 40 && a.addressSpace.mode == .iommu)
        #expect(a.addressSpace.dmaWindow == BusWindow(base: BusAddress(4 << 30), limit: 16 << 30))
        #expect(a.notifications == .relaySQPoll && a.busyPollMicroseconds == 20 && a.revocationDeadlineMilliseconds == 50)
        #expect(a.revocationSpinMicroseconds == 200 && a.settings.revocationSpinMicroseconds == 200)
        #expect(a.addressSpace.maxMappings == 4096 && a.queuePairs == 2)
        #expect(a.deviceFeatures == [.version1, .eventIdx])
        #expect(a.settings.backend.offeredFeatures & VirtioNetFeatures.mrgRxbuf.rawValue == 0)
        #expect(a.settings.backend.offeredFeatures & (VirtioNetFeatures.mq.rawValue | VirtioNetFeatures.ctrlVq.rawValue) != 0,
                "two queue pairs: MQ and CTRL_VQ")
        // Defaults: sockets in the runtime directory, identity of VM2 = bridge name.
        let b = c.bridges[1]
        #expect(b.vhostUserSocket == "/run/vpb/net1-vm1.sock" && b.peerSocket == "/run/vpb/net1-vm2.sock")
        #expect(b.addressSpace.staticWindows.count == 2)
        #expect(b.deviceFeatures == VirtioNetFeatures.defaultOffer && b.queuePairs == 8, "defaults")
        let single = try DaemonConfig.parse("bridges:\n  - name: s\n    bar-size: 1G\n    queue-pairs: 1\n    device-features: \"\"")
        #expect(single.bridges[0].settings.backend.offeredFeatures & ~(1 << 30 | 1 << 26) == VirtioNetFeatures.version1.rawValue,
                "one pair and no optional features: VERSION_1 (and PROTOCOL_FEATURES, LOG_ALL) only")
    }

    /// Each bad config and the text its error must carry (the key, then the reason).
    static let bad: [(String, String)] = [
        ("bridges: [", "(file): not valid YAML"),
        ("- a\n- b", "(file): the top level must be a mapping"),
        ("colour: blue", "colour: unknown key"),
        ("log-level: loud", "log-level: 'loud' is not one of"),
        ("control-mode: rw", "control-mode: 'rw' is not an octal mode"),
        ("control-socket: relative.sock", "control-socket: must be an absolute path"),
        ("bridges: {name: x}", "bridges: must be a list"),
        ("bridges:\n  - bar-size: 1G", "bridges[0].name: is required"),
        ("bridges:\n  - name: a b\n    bar-size: 1G", "bridges[0].name: 'a b' must be"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n  - name: a\n    bar-size: 1G", "bridges[1].name: 'a' is used by another bridge"),
        ("bridges:\n  - name: a", "bridges[0].bar-size: is required"),
        ("bridges:\n  - name: a\n    bar-size: lots", "bridges[0].bar-size: 'lots' is not a size"),
        ("bridges:\n  - name: a\n    bar-size: 3G", "bridges[0].bar-size: 0xc0000000 is not a power of two"),
        ("bridges:\n  - name: a\n    bar-size: 512T", "bridges[0].bar-size: 512 TiB is outside"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    mode: magic", "bridges[0].mode: 'magic' is not identity, iommu or static"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    static-windows: [\"0:1M\"]", "bridges[0].static-windows: only allowed in static mode"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    mode: static", "bridges[0].static-windows: static mode needs at least one window"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    mode: static\n    static-windows: [\"5:1\"]", "bridges[0].static-windows[0]: '5:1' is not BASE:LIMIT"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    mode: iommu\n    dma-window: 0:2G", "bridges[0].dma-window: window [0x0, 0x80000000) does not fit in a BAR of 1 GiB"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    notifications: carrier-pigeon", "bridges[0].notifications: 'carrier-pigeon' is not relay"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    revocation-deadline-ms: 0", "bridges[0].revocation-deadline-ms: '0' is not a whole number in 1...60000"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    revocation-spin-us: 20000", "bridges[0].revocation-spin-us: '20000' is not a whole number in 0...10000"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    busy-poll-us: 99999", "bridges[0].busy-poll-us: '99999' is not a whole number"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    queue-pairs: many", "bridges[0].queue-pairs: 'many' is not a whole number"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    speed: fast", "bridges[0].speed: unknown key"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    device-features: [tso]", "bridges[0].device-features: 'tso' is not one of event-idx, mrg-rxbuf, version-1"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    device-features: [mq]", "bridges[0].device-features: 'mq' is not one of"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    queue-pairs: 129", "bridges[0].queue-pairs: '129' is not a whole number in 1...128"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    client: maybe", "bridges[0].client: must be true or false"),
        ("bridges:\n  - name: a\n    bar-size: 1G\n    vhost-user-socket: /s\n  - name: b\n    bar-size: 1G\n    vhost-user-socket: /s",
         "bridges[1].vhost-user-socket: '/s' is already used by bridge a"),
        ("vm2-budgets: {v: 1G}\nbridges:\n  - name: a\n    vm2: v\n    bar-size: 1G\n  - name: b\n    vm2: v\n    bar-size: 1G",
         "vm2-budgets: VM2 'v' would need 2 GiB of BAR space for bridges a, b; its budget is 1 GiB"),
        ("vm2-budgets: {v: none}", "vm2-budgets.v: 'none' is not a size"),
        // Found by fuzz-config when Yams parsed the file: its load trapped on a mapping used as a key.
        ("{{}}", "(file): a mapping key is not a plain name"),
        // Also fuzz-config: Yams' sexagesimal integers overflowed (a trap); here a string.
        ("bridges:\n  - name: a\n    bar-size: 1G\n    busy-poll-us: 3333333333333333333:3", "bridges[0].busy-poll-us: '3333333333333333333:3' is not a whole number"),
        ("bridges:\n  - {[a]: 1}", "bridges[0]: a mapping key is not a plain name"),
        ("log-level: info\nlog-level: debug", "log-level: is given twice (line 2, column 1)"),
        (String(repeating: "[", count: 40) + String(repeating: "]", count: 40), "[0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0]: nested deeper than 32 levels"),
        ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
         + "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]",
         "e[7]: the file has more than 100000 YAML nodes"),
    ]

    @Test(arguments: bad.indices)
    func badConfigsNameTheKeyAndTheReason(index: Int) {
        let (text, expected) = Self.bad[index]
        guard let error = configError(text) else { Issue.record("accepted: \(text)"); return }
        #expect(error.description.hasPrefix(expected), "got: \(error)")
    }
}

@Suite struct AccessConfigTests {
    @Test func accessDeadlineActionTranslationsAndSocketDirectories() throws {
        let c = try DaemonConfig.parse("""
        socket-directories: [/run/vpb-extra]
        bridges:
          - name: a
            bar-size: 1G
            vm1-access: {owner: "0", group: "4242", mode: "0660", allow-users: [root, "1000"], allow-groups: ["4242"]}
            vm2-access: {mode: "0600"}
            vm2-deadline-action: kill
            max-pending-translations: 16
        """)
        let b = try #require(c.bridges.first)
        #expect(c.socketDirectories == ["/run/vpb-extra"])
        #expect(b.vm1Access == PeerAccess(owner: 0, group: 4242, mode: 0o660, allowedUsers: [0, 1000], allowedGroups: [4242]))
        #expect(b.vm2Access == PeerAccess(mode: 0o600))
        #expect(b.settings.vm2DeadlineAction == .kill && b.settings.maxPendingTranslations == 16)
        #expect(b.settings.vm1Access == b.vm1Access)
    }

    /// `unsealed-regions`: mark by default (DPDK's memory is never sealed),
    /// refuse when asked; anything else names the key.
    @Test func unsealedRegionsPolicy() throws {
        let base = "bridges:\n  - name: a\n    bar-size: 1G\n"
        #expect(try DaemonConfig.parse(base).bridges[0].settings.unsealedRegions == .mark)
        #expect(try DaemonConfig.parse(base + "    unsealed-regions: refuse\n").bridges[0].settings.unsealedRegions == .refuse)
        #expect(try DaemonConfig.parse(base + "    unsealed-regions: mark\n").bridges[0].settings.unsealedRegions == .mark)
        let error = configError(base + "    unsealed-regions: allow\n")
        #expect(error?.key == "bridges[0].unsealed-regions")
        #expect(error?.description.contains("is not refuse or mark") == true)
    }

    @Test func badAccessKeysNameTheKey() {
        let base = "bridges:\n  - name: a\n    bar-size: 1G\n"
        #expect(configError(base + "    vm1-access: {mode: \"999\"}\n")?.key == "bridges[0].vm1-access.mode")
        #expect(configError(base + "    vm2-access: {colour: blue}\n")?.key == "bridges[0].vm2-access.colour")
        #expect(configError(base + "    vm1-access: {allow-users: [no-such-user-here]}\n")?.key == "bridges[0].vm1-access.allow-users[0]")
        #expect(configError(base + "    vm1-access: {allow-groups: nope}\n")?.key == "bridges[0].vm1-access.allow-groups")
        #expect(configError(base + "    vm2-deadline-action: explode\n")?.key == "bridges[0].vm2-deadline-action")
        #expect(configError(base + "    max-pending-translations: 0\n")?.key == "bridges[0].max-pending-translations")
        #expect(configError("socket-directories: [/a/../b]\n")?.key == "socket-directories[0]")
    }

    @Test func accessPolicy() {
        let open = PeerAccess()
        #expect(open.admits(uid: 1000, gid: 1000, groups: []))
        let strict = PeerAccess(allowedUsers: [1001], allowedGroups: [42])
        #expect(strict.admits(uid: 0, gid: 0, groups: []), "root")
        #expect(strict.admits(uid: 1001, gid: 7, groups: []))
        #expect(strict.admits(uid: 1002, gid: 42, groups: []))
        #expect(strict.admits(uid: 1002, gid: 7, groups: [3, 42]))
        #expect(!strict.admits(uid: 1002, gid: 7, groups: [3]))
    }
}
