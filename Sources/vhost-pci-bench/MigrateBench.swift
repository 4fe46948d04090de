import ArgumentParser
import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import Logging
import VhostUser

/// VM1's live migration: the Linux guest under QEMU TCG migrated (QMP
/// `migrate` to a second QEMU with `-incoming`) from bridge A to bridge B
/// while it streams datagrams that VM2 sends back, versus the same guest
/// and QEMU lines on DPDK's vhost back end (two testpmds in 5tswap).
struct MigrateBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "VM1's live migration: a Linux guest (QEMU TCG) streaming datagrams that come back to it, migrated between two bridges (each with a VM2 that logs its writes), versus between two DPDK vhost back ends (testpmd 5tswap); QEMU's total time and downtime, and what the guest lost (needs QEMU, dpdk-testpmd and make interop-deps)."
    )

    @Option(help: "Seconds the guest streams per run (the migration starts --migrate-after seconds in).")
    var seconds: Double = 12

    @Option(help: "Seconds of traffic before QEMU migrates.")
    var migrateAfter: Double = 3

    @Option(help: "UDP payload bytes per datagram.")
    var size: Int = 512

    @Option(help: "Which runs: none, strict or both.")
    var viommu: String = "both"

    @Flag(help: "Print one JSON object instead of Markdown.")
    var json = false

    struct Run: Codable {
        var backEnd: String
        var viommu: String
        var outcome: LinuxGuest.Migration.Outcome
        /// Pages VM2 A marked in the log (bridge runs).
        var writesLogged: UInt64?
        /// Why a run has no guest report (the destination's console, last lines).
        var note: String?
    }

    func migration(_ iommu: Bool) -> LinuxGuest.Migration {
        var m = LinuxGuest.Migration(iommu: iommu)
        m.seconds = seconds
        m.migrateAfter = migrateAfter
        m.size = size
        return m
    }

    func throughBridges(iommu: Bool, dir: String) throws -> Run {
        var logger = Logger(label: "bench")
        logger.logLevel = .critical
        var bridges: [(Bridge, JoinableThread)] = []
        defer { for (b, t) in bridges { b.stop(); t.join() } }
        var vm2s: [EmulatedVM2] = []
        defer { for v in vm2s { v.stop() } }
        for side in ["a", "b"] {
            let settings = BridgeSettings(name: "mig-\(side)", socketPath: "\(dir)/vm1-\(side).sock", peerSocketPath: "\(dir)/vm2-\(side).sock",
                                          backend: BackendConfiguration(bridgeName: "mig-\(side)",
                                                                        addressSpace: AddressSpaceConfiguration(barSize: 64 << 30, mode: iommu ? .iommu : .identity)),
                                          revocationDeadlineMilliseconds: 2000)
            let bridge = try Bridge(settings, logger: logger)
            bridges.append((bridge, try JoinableThread(name: "bench-bridge-\(side)") { bridge.serve() }))
            var config = VM2Configuration()
            config.reflectsGuestDatagrams = true
            vm2s.append(try EmulatedVM2(peerSocketPath: "\(dir)/vm2-\(side).sock", configuration: config))
        }
        let outcome = try migration(iommu).run(source: "\(dir)/vm1-a.sock", destination: "\(dir)/vm1-b.sock", directory: dir)
        return Run(backEnd: "vhost-pci-bridged", viommu: iommu ? "strict" : "none", outcome: outcome, writesLogged: vm2s[0].statistics.writesLogged)
    }

    func throughDPDK(iommu: Bool, dir: String) throws -> Run {
        var testpmds: [GuestProcess] = []
        defer { for t in testpmds { t.finish() } }
        for side in ["a", "b"] {
            let sock = "\(dir)/dpdk-\(side).sock"
            testpmds.append(try GuestProcess(LinuxGuestBench.testpmd, [
                "-l", "0,1", "--main-lcore", "1", "--no-huge", "-m", "256", "--no-pci", "--file-prefix=vpb-mig-\(getpid())-\(side)",
                "--vdev=net_vhost0,iface=\(sock),queues=1\(iommu ? ",iommu-support=1" : "")",
                "--", "--total-num-mbufs=16384", "--auto-start", "--forward-mode=5tswap", "--txpkts=\(14 + 20 + 8 + size)",
                "--eth-peer=0,\(LinuxGuest.guestMAC)", "--tx-ip=10.0.0.2,10.0.0.1", "--tx-udp=9999,9999",
            ], log: "\(dir)/testpmd-\(side).log"))
            for _ in 0..<500 where !FileManager.default.fileExists(atPath: sock) { usleep(10_000) }
        }
        let outcome = try migration(iommu).run(source: "\(dir)/dpdk-a.sock", destination: "\(dir)/dpdk-b.sock", directory: dir)
        return Run(backEnd: "DPDK vhost (testpmd 5tswap)", viommu: iommu ? "strict" : "none", outcome: outcome, writesLogged: nil)
    }

    func run() throws {
        guard FileManager.default.isExecutableFile(atPath: LinuxGuestBench.qemu), FileManager.default.isExecutableFile(atPath: LinuxGuestBench.testpmd) else {
            throw ValidationError("needs qemu-system-x86_64 and dpdk-testpmd: make interop-deps")
        }
        guard LinuxGuest.isBuilt else { throw ValidationError(LinuxGuest.missing) }
        var runs: [Run] = []
        for iommu in (viommu == "none" ? [false] : viommu == "strict" ? [true] : [false, true]) {
            for bridge in [true, false] {
                let dir = "/tmp/vpb-mig-bench-\(getpid())-\(iommu)-\(bridge)"
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
                defer { try? FileManager.default.removeItem(atPath: dir) }
                FileHandle.standardError.write(Data("migrate: \(iommu ? "intel-iommu strict" : "no vIOMMU"), \(bridge ? "through the bridges" : "DPDK's back end")…\n".utf8))
                var r = bridge ? try throughBridges(iommu: iommu, dir: dir) : try throughDPDK(iommu: iommu, dir: dir)
                if r.outcome.status != "completed" || r.outcome.guest == nil {
                    let console = (try? String(contentsOfFile: "\(dir)/qemu-b.log", encoding: .utf8)) ?? ""
                    let why = "\(r.backEnd), \(r.viommu): migration \(r.outcome.status), no guest report from the destination; its console ends: "
                        + console.split(whereSeparator: \.isNewline).suffix(4).joined(separator: " / ")
                    // The bridge must migrate; DPDK's reference is reported as it went.
                    if bridge { throw ValidationError(why) }
                    r.note = why
                }
                runs.append(r)
            }
        }
        if json {
            try printJSON(["migrate": runs])
            return
        }
        print("### Live migration of VM1 (`vhost-pci-bench migrate`, \(seconds) s of traffic, migrated after \(migrateAfter) s)\n")
        print("A Debian guest (QEMU TCG, 256 MiB) sends \(size)-byte UDP datagrams and checks every one that comes back (sequence number and every byte); QEMU migrates it over a Unix socket to a second QEMU started with `-incoming`. Through the bridges: bridge A with VM2 A to bridge B with VM2 B, each VM2 sending the guest's datagrams back to it (VM2 A logging every page it writes while QEMU migrates). DPDK: the same QEMU lines on DPDK's vhost back end, two testpmds in 5tswap. Times are QEMU's (`query-migrate`); \"missing\" is datagrams between the first and the last sequence that never came back (lost anywhere: a full receive ring, the switch-over), \"longest gap\" the longest time the guest received nothing.\n")
        print("| vIOMMU | back end | total, ms | downtime, ms | RAM sent, MiB | guest sent | came back valid | corrupt | missing | longest gap, s | writes VM2 A logged |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in runs {
            guard let g = r.outcome.guest else {
                print("| \(r.viommu) | \(r.backEnd) | \(r.outcome.status) | | | | | | | | |")
                continue
            }
            print(String(format: "| %@ | %@ | %.0f | %.0f | %.0f | %d | %d | %d | %d | %.3f | %@ |", r.viommu, r.backEnd, r.outcome.totalTimeMilliseconds,
                         r.outcome.downtimeMilliseconds, r.outcome.ramTransferredBytes / 1048576, g.sent, g.valid, g.corrupt, g.missing,
                         g.longestGapSeconds, r.writesLogged.map { "\($0) writes" } ?? "—"))
        }
        for note in runs.compactMap(\.note) { print("\n" + note) }
        for iommu in ["none", "strict"] {
            guard let b = runs.first(where: { $0.viommu == iommu && $0.writesLogged != nil }), let d = runs.first(where: { $0.viommu == iommu && $0.writesLogged == nil }),
                  d.outcome.guest != nil, d.outcome.totalTimeMilliseconds > 0 else { continue }
            print(String(format: "\n%@: migration time bridge / DPDK %.2f×, downtime %.0f vs %.0f ms.", iommu == "none" ? "No vIOMMU" : "intel-iommu strict",
                         b.outcome.totalTimeMilliseconds / d.outcome.totalTimeMilliseconds, b.outcome.downtimeMilliseconds, d.outcome.downtimeMilliseconds))
        }
    }
}
