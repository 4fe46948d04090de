import BridgeCore
import BridgeDaemon
import ControlClient
import DaemonTestSupport
import EmulatedGuests
import Foundation
import LinuxIO
import SystemPackage
import Testing
import TestSupport
import VhostUser

/// A built binary of this package (`swift build` puts them side by side).
func builtBinary(_ name: String) -> String {
    URL(fileURLWithPath: GuestProcess.executable).deletingLastPathComponent().appendingPathComponent(name).path
}

/// A child started with posix_spawn, stdout and stderr to a log file, and
/// optionally one of our fds as its fd 3 (Foundation's Process closes every
/// fd it was not told about, so `--fd` cannot be tested through it).
final class SpawnedProcess {
    let pid: pid_t
    let log: String
    private var status: Int32?

    /// `unsetting`: names taken out of the environment the child inherits
    /// (before `environment` is added).
    init(_ executable: String, _ arguments: [String], environment: [String: String] = [:], unsetting: [String] = [],
         fd3: Int32? = nil) throws {
        log = "/tmp/vpb-spawn-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log"
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var moved: Int32 = -1
        if let fd3 {
            // dup2 onto itself would keep FD_CLOEXEC: go through another number.
            moved = fcntl(fd3, F_DUPFD_CLOEXEC, 10)
            posix_spawn_file_actions_adddup2(&actions, moved, 3)
        }
        defer { if moved >= 0 { close(moved) } }
        var env = ProcessInfo.processInfo.environment
        for k in unsetting { env[k] = nil }
        for (k, v) in environment { env[k] = v }
        env["NOTIFY_SOCKET"] = environment["NOTIFY_SOCKET"] // never the test runner's
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for p in argv + envp { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, executable, &actions, nil, argv, envp)
        guard rc == 0 else { throw SystemCallError("posix_spawn(\(executable))", errno: Errno(rawValue: rc)) }
        self.pid = pid
    }

    var output: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

    /// The exit status once the child ended (waits up to `seconds`); nil if
    /// it still runs, or was killed by a signal (then -signal).
    @discardableResult
    func wait(seconds: Int = 20) -> Int32? {
        if let status { return status }
        for _ in 0..<(seconds * 100) {
            var raw: Int32 = 0
            if waitpid(pid, &raw, WNOHANG) == pid {
                status = (raw & 0x7f) == 0 ? (raw >> 8) & 0xff : -(raw & 0x7f)
                return status
            }
            usleep(10_000)
        }
        return nil
    }

    func signal(_ s: Int32) { if status == nil { kill(pid, s) } }

    deinit {
        if status == nil { kill(pid, SIGKILL); wait() }
        unlink(log)
    }
}

/// The daemon's control socket answering `command` (polls while it starts).
func control(_ path: String, _ request: [String: Any]) throws -> [String: Any] {
    #expect(pollUntil { DaemonProcess.accepts(path) }, "control socket \(path)")
    return try ControlClient(path: path).call(request)
}

func result(_ r: [String: Any], sourceLocation: SourceLocation = #_sourceLocation) -> [String: Any] {
    #expect(r["ok"] as? Bool == true, "\(r)", sourceLocation: sourceLocation)
    return r["result"] as? [String: Any] ?? [:]
}

/// glibc malloc's arenas besides the main one in process `pid`: each is a
/// 64 MiB reservation aligned to 64 MiB, its used part read-write and the
/// rest PROT_NONE (glibc's `new_heap`).
func mallocArenas(of pid: pid_t) -> Int {
    let maps = (try? String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8)) ?? ""
    let heapSize: UInt64 = 64 << 20
    var ranges: [(start: UInt64, end: UInt64, perms: Substring, anonymous: Bool)] = []
    for line in maps.split(separator: "\n") {
        let fields = line.split(separator: " ", omittingEmptySubsequences: true)
        guard fields.count >= 5 else { continue }
        let bounds = fields[0].split(separator: "-")
        guard bounds.count == 2, let start = UInt64(bounds[0], radix: 16), let end = UInt64(bounds[1], radix: 16) else { continue }
        ranges.append((start, end, fields[1], fields[4] == "0" && fields.count == 5))
    }
    var arenas = 0
    for (i, r) in ranges.enumerated() where r.anonymous && r.perms == "rw-p" && r.start % heapSize == 0 {
        let end = i + 1 < ranges.count && ranges[i + 1].start == r.end && ranges[i + 1].perms == "---p" ? ranges[i + 1].end : r.end
        if end - r.start == heapSize { arenas += 1 }
    }
    return arenas
}

func names(_ list: [String: Any]) -> [String] { ((list["result"] as? [[String: Any]]) ?? []).compactMap { $0["name"] as? String }.sorted() }

extension Integration {
    /// Operating the daemon: flags mean the same however it is started, a
    /// reload keeps what the command line and the operator added.
    @Suite(.serialized) struct Operations {
        let dir = "/tmp/vpb-ops-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        init() throws { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }

        /// Writes `dir/config.yaml`: the runtime directory and control socket
        /// in `dir`, then `rest` (top-level keys and the bridges); returns its path.
        func writeConfig(_ rest: String) throws -> String {
            let file = "\(dir)/config.yaml"
            try "runtime-directory: \(dir)\ncontrol-socket: \(dir)/control.sock\n\(rest)".write(toFile: file, atomically: true, encoding: .utf8)
            return file
        }

        /// Two daemons started from flags alone, side by side: each serves
        /// its control socket where --control-socket said (they do not
        /// collide), in the log level --log-level said.
        @Test func daemonsStartedFromFlagsHonourControlSocketAndLogLevel() throws {
            defer { try? FileManager.default.removeItem(atPath: dir) }
            var daemons: [SpawnedProcess] = []
            for name in ["a", "b"] {
                daemons.append(try SpawnedProcess(builtBinary("vhost-pci-bridged"), [
                    "--socket-path", "\(dir)/\(name)-vm1.sock", "--name", name, "--bar-size", "1G",
                    "--control-socket", "\(dir)/\(name).ctl", "--log-level", "debug"]))
            }
            for name in ["a", "b"] {
                let status = result(try control("\(dir)/\(name).ctl", ["command": "status"]))
                #expect(status["logLevel"] as? String == "debug" && status["controlSocket"] as? String == "\(dir)/\(name).ctl")
                #expect(names(try control("\(dir)/\(name).ctl", ["command": "list"])) == [name])
            }
            for d in daemons { d.signal(SIGTERM); #expect(d.wait() == 0, "\(d.output)") }
        }

        /// `--fd`: the inherited connection is served with every bridge flag
        /// (queue pairs, mode, DMA window, mapping limit, deadline), one
        /// session, then the daemon exits 0.
        @Test func anInheritedConnectionGetsEveryBridgeFlag() throws {
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let (ours, theirs) = try UnixSocket.pair(.stream)
            let daemon = try SpawnedProcess(builtBinary("vhost-pci-bridged"), [
                "--fd", "3", "--name", "f", "--bar-size", "16G", "--mode", "iommu", "--dma-window", "4G:8G",
                "--queue-pairs", "2", "--max-mappings", "8", "--revocation-deadline", "500", "--control-socket", "\(dir)/f.ctl"],
                fd3: theirs.fd.rawValue)
            try theirs.fd.close()
            let frontend = VhostUserFrontend(socket: ours)
            let features = try frontend.getU64(.getFeatures)
            #expect(features & FeatureBit.protocolFeatures != 0)
            try frontend.setProtocolFeatures(.mq)
            #expect(try frontend.getU64(.getQueueNum) == 2, "--queue-pairs reached the --fd bridge")
            let show = result(try control("\(dir)/f.ctl", ["command": "show", "name": "f"]))
            let config = show["config"] as? [String: Any] ?? [:]
            #expect(config["mode"] as? String == "iommu" && config["maxMappings"] as? Int == 8 && config["revocationDeadlineMs"] as? Int == 500,
                    "\(config)")
            #expect((config["dmaWindow"] as? String)?.isEmpty == false)
            frontend.close()
            #expect(daemon.wait() == 0, "one session, then exit: \(daemon.output)")
        }

        /// `--fd` must name an open stream socket, checked before the daemon
        /// opens anything of its own (a number that is not open would
        /// otherwise be taken by the daemon's first fd, e.g. the journal's).
        @Test func anInheritedFdMustBeAnOpenStreamSocket() throws {
            let notOpen = try SpawnedProcess(builtBinary("vhost-pci-bridged"), ["--fd", "987", "--name", "x"])
            #expect(notOpen.wait() != 0)
            #expect(notOpen.output.contains("fd 987 is not open"), "\(notOpen.output)")
            let file = open("/etc/hostname", O_RDONLY | O_CLOEXEC)
            defer { close(file) }
            let regular = try SpawnedProcess(builtBinary("vhost-pci-bridged"), ["--fd", "3", "--name", "x"], fd3: file)
            #expect(regular.wait() != 0)
            #expect(regular.output.contains("a regular file, not a socket"), "\(regular.output)")
            let (a, b) = try UnixSocket.pair(.datagram)
            defer { try? a.fd.close(); try? b.fd.close() }
            let datagram = try SpawnedProcess(builtBinary("vhost-pci-bridged"), ["--fd", "3", "--name", "x"], fd3: b.fd.rawValue)
            #expect(datagram.wait() != 0)
            #expect(datagram.output.contains("not a stream socket"), "\(datagram.output)")
        }

        /// Destroying the `--fd` bridge leaves the daemon (and its file's
        /// bridges) running, and a reload does not adopt the served fd again.
        @Test func destroyingTheInheritedBridgeKeepsTheDaemon() throws {
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let file = try writeConfig("bridges:\n  - name: c\n    bar-size: 1G\n")
            let (ours, theirs) = try UnixSocket.pair(.stream)
            defer { try? ours.fd.close() }
            let daemon = try SpawnedProcess(builtBinary("vhost-pci-bridged"), ["--config", file, "--fd", "3", "--name", "f", "--bar-size", "1G"],
                                            fd3: theirs.fd.rawValue)
            try theirs.fd.close()
            let ctl = "\(dir)/control.sock"
            #expect(names(try control(ctl, ["command": "list"])) == ["c", "f"], "\(daemon.output)")
            #expect(result(try control(ctl, ["command": "destroy", "name": "f"]))["destroyed"] as? String == "f")
            let reload = result(try control(ctl, ["command": "reload"]))
            #expect((reload["failed"] as? [String: Any])?.isEmpty == true && (reload["added"] as? [String])?.isEmpty == true,
                    "the served connection is not started again, nor reported as a failure: \(reload)")
            #expect(names(try control(ctl, ["command": "list"])) == ["c"], "the daemon and the file's bridge run on")
            daemon.signal(SIGTERM)
            #expect(daemon.wait() == 0, "\(daemon.output)")
        }

        /// `--fd` with `--mode static` (it used to always fail).
        @Test func anInheritedConnectionInStaticMode() throws {
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let (ours, theirs) = try UnixSocket.pair(.stream)
            let daemon = try SpawnedProcess(builtBinary("vhost-pci-bridged"), [
                "--fd", "3", "--name", "s", "--bar-size", "4G", "--mode", "static", "--static-window", "0:16M",
                "--control-socket", "\(dir)/s.ctl"], fd3: theirs.fd.rawValue)
            try theirs.fd.close()
            let frontend = VhostUserFrontend(socket: ours)
            #expect(try frontend.getU64(.getFeatures) & FeatureBit.protocolFeatures != 0)
            let list = try control("\(dir)/s.ctl", ["command": "list"])
            #expect(((list["result"] as? [[String: Any]])?.first?["mode"] as? String) == "static", "\(list); \(daemon.output)")
            frontend.close()
            #expect(daemon.wait() == 0, "\(daemon.output)")
        }

        /// A reload keeps the flag bridge and --log-level, and bridges made
        /// with `create` survive reloads and restarts (the state file) until
        /// destroyed.
        @Test func reloadsKeepFlagsAndCreatedBridgesRestartsRestoreThem() throws {
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let file = "\(dir)/config.yaml"
            let ctl = "\(dir)/control.sock"
            func write(_ bridges: [String], level: String) throws {
                try ("runtime-directory: \(dir)\ncontrol-socket: \(ctl)\nlog-level: \(level)\nbridges:\n"
                     + bridges.map { "  - name: \($0)\n    bar-size: 1G\n" }.joined())
                    .write(toFile: file, atomically: true, encoding: .utf8)
            }
            try write(["file1"], level: "info")
            let arguments = ["--config", file, "--state-directory", "\(dir)/state", "--socket-path", "\(dir)/flagged-vm1.sock",
                             "--name", "flagged", "--bar-size", "1G", "--log-level", "debug"]
            do {
                let daemon = try SpawnedProcess(builtBinary("vhost-pci-bridged"), arguments)
                #expect(names(try control(ctl, ["command": "list"])) == ["file1", "flagged"], "\(daemon.output)")
                let created = result(try control(ctl, ["command": "create", "bridge": ["name": "made", "bar-size": "1G"]]))
                #expect(created["persistent"] as? Bool == true)
                try write(["file1", "file2"], level: "info")
                let reload = result(try control(ctl, ["command": "reload"]))
                #expect(reload["added"] as? [String] == ["file2"] && (reload["removed"] as? [String])?.isEmpty == true, "\(reload)")
                #expect(names(try control(ctl, ["command": "list"])) == ["file1", "file2", "flagged", "made"])
                #expect(result(try control(ctl, ["command": "status"]))["logLevel"] as? String == "debug", "--log-level survives a reload")
                daemon.signal(SIGTERM)
                #expect(daemon.wait() == 0, "\(daemon.output)")
            }
            let state = try String(contentsOfFile: "\(dir)/state/\(CreatedBridges.fileName)", encoding: .utf8)
            #expect(state.contains("\"made\"") && !state.contains("file1"), "\(state)")
            do {
                let daemon = try SpawnedProcess(builtBinary("vhost-pci-bridged"), arguments)
                #expect(names(try control(ctl, ["command": "list"])) == ["file1", "file2", "flagged", "made"], "a restart brings created bridges back")
                #expect(result(try control(ctl, ["command": "destroy", "name": "made"]))["destroyed"] as? String == "made")
                daemon.signal(SIGTERM)
                #expect(daemon.wait() == 0, "\(daemon.output)")
            }
            do {
                let daemon = try SpawnedProcess(builtBinary("vhost-pci-bridged"), arguments)
                #expect(names(try control(ctl, ["command": "list"])) == ["file1", "file2", "flagged"], "destroyed is gone for good")
                daemon.signal(SIGTERM)
                #expect(daemon.wait() == 0, "\(daemon.output)")
            }
        }

        /// A config whose bridges cannot all start is refused whole: exit 1
        /// naming the bridge, nothing left listening, no READY=1.
        @Test func aBridgeThatCannotStartStopsTheStart() throws {
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let file = try writeConfig("bridges:\n  - name: good\n    bar-size: 1G\n  - name: bad\n    bar-size: 1G\n    vhost-user-socket: /nonexistent-dir/bad.sock\n")
            let daemon = try SpawnedProcess(builtBinary("vhost-pci-bridged"), ["--config", file])
            #expect(daemon.wait() == 1)
            #expect(daemon.output.contains("bad:") && daemon.output.contains("none runs"), "\(daemon.output)")
            #expect(!FileManager.default.fileExists(atPath: "\(dir)/good-vm1.sock"), "the bridge that started was stopped again")
        }

        /// Bad flags are named as flags.
        @Test func badBridgeFlagsAreNamedAsFlags() throws {
            let daemon = try SpawnedProcess(builtBinary("vhost-pci-bridged"), ["--socket-path", "/tmp/x.sock", "--bar-size", "3G"])
            #expect(daemon.wait() != 0)
            #expect(daemon.output.contains("--bar-size"), "\(daemon.output)")
            let windows = try SpawnedProcess(builtBinary("vhost-pci-bridged"), ["--socket-path", "/tmp/x.sock", "--mode", "static", "--static-window", "5:1"])
            #expect(windows.wait() != 0)
            #expect(windows.output.contains("--static-window"), "\(windows.output)")
        }

        /// After IOMMU traffic the exposition has the revocation and IOTLB
        /// latency histograms filled (cumulative buckets ending in +Inf =
        /// count), build_info, and passes `promtool check metrics` — the
        /// Prometheus project's own parser and naming linter — with no
        /// complaint.
        @Test func metricsPassPromtoolWithLatencyHistograms() throws {
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let daemon = try DaemonProcess(dir: dir, mode: "iommu")
            let vm2 = try EmulatedVM2(peerSocketPath: daemon.vm2Path)
            defer { vm2.stop() }
            do {
                let vm1 = try EmulatedVM1(socketPath: daemon.vm1Path, configuration: vm1Config(iommu: true, eager: false))
                defer { vm1.disconnect() }
                try vm1.start()
                #expect(try vm1.runTraffic(count: 100, sizes: [64, 1500]).completed)
            }
            let text = result(try control("\(dir)/control.sock", ["command": "metrics"]))["text"] as? String ?? ""
            func samples(_ prefix: String) -> [UInt64] {
                text.split(separator: "\n").filter { $0.hasPrefix(prefix) }.compactMap { $0.split(separator: " ").last.flatMap { UInt64($0) } }
            }
            for family in ["vhost_pci_bridge_revocation_duration_seconds", "vhost_pci_bridge_iotlb_handling_duration_seconds"] {
                let buckets = samples("\(family)_bucket{bridge=\"f\"")
                let count = samples("\(family)_count{bridge=\"f\"}").first ?? 0
                #expect(count > 0, "\(family) recorded the traffic's revocations: \(text)")
                #expect(buckets.count == LatencyHistogram.bounds.count + 1 && buckets == buckets.sorted() && buckets.last == count, "\(family): \(buckets)")
                #expect(text.contains("# TYPE \(family) histogram"))
            }
            #expect(text.contains("vhost_pci_build_info{version=\"\(BuildInfo.version)\"} 1"))
            let promtool = "/usr/bin/promtool"
            try #require(FileManager.default.isExecutableFile(atPath: promtool), "promtool is missing: make check-deps installs it (Debian package prometheus)")
            let check = Process()
            check.executableURL = URL(fileURLWithPath: promtool)
            check.arguments = ["check", "metrics"]
            let input = Pipe(), output = Pipe()
            check.standardInput = input
            check.standardOutput = output
            check.standardError = output
            try check.run()
            input.fileHandleForWriting.write(Data(text.utf8))
            try input.fileHandleForWriting.close()
            let said = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            check.waitUntilExit()
            #expect(check.terminationStatus == 0 && said.isEmpty, "promtool check metrics: \(said)")
            daemon.signal(SIGTERM)
        }

        /// io_uring refused (a seccomp filter makes io_uring_setup fail with
        /// EPERM, as a container policy does): both relay modes fall back to
        /// epoll with one warning for the process, and notifications flow.
        @Test func withoutIOURingTheRelayFallsBackToEpoll() throws {
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let file = try writeConfig("log-level: warning\nbridges:\n  - name: a\n    bar-size: 64G\n    notifications: relay\n  - name: b\n    bar-size: 1G\n    notifications: relay-sqpoll\n")
            let daemon = try SpawnedProcess(GuestProcess.executable, ["without-io-uring", "--", builtBinary("vhost-pci-bridged"), "--config", file])
            let ctl = "\(dir)/control.sock"
            #expect(names(try control(ctl, ["command": "list"])) == ["a", "b"], "the bridges started: \(daemon.output)")
            let vm2 = try EmulatedVM2(peerSocketPath: "\(dir)/a-vm2.sock")
            defer { vm2.stop() }
            do {
                let vm1 = try EmulatedVM1(socketPath: "\(dir)/a-vm1.sock")
                defer { vm1.disconnect() }
                try vm1.start()
                #expect(try vm1.runTraffic(count: 200, sizes: [64, 1500]).completed)
                // Notifications went through the epoll relay (while the session
                // is up: its links' counters are read live).
                #expect(pollUntil {
                    let s = (try? control(ctl, ["command": "stats", "name": "a"]))?["result"] as? [String: Any] ?? [:]
                    return (s["kicksRelayed"] as? Int ?? 0) + (s["callsRelayed"] as? Int ?? 0) > 0
                })
            }
            for name in ["a", "b"] {
                let stats = result(try control(ctl, ["command": "stats", "name": name]))
                #expect(stats["relayEngine"] as? String == "epoll", "\(name): \(stats)")
            }
            daemon.signal(SIGTERM)
            #expect(daemon.wait() == 0)
            let warnings = daemon.output.components(separatedBy: "io_uring is not available").count - 1
            #expect(warnings == 1, "one warning for the process: \(daemon.output)")
        }

        /// The daemon's threads (three per bridge) share two malloc arenas,
        /// the main one and one more, instead of glibc's one per thread up to
        /// 8 per CPU (each arena keeps the pages its thread touched: 14
        /// arenas, about 0.5 MiB, with 16 bridges); MALLOC_ARENA_MAX in the
        /// environment still decides when set.
        @Test(.disabled(if: sanitizerAllocator, "a sanitizer's allocator replaces glibc's and ignores mallopt"))
        func theDaemonsThreadsShareTwoMallocArenas() throws {
            defer { try? FileManager.default.removeItem(atPath: dir) }
            var bridges = "log-level: warning\nbridges:\n"
            for i in 0..<8 { bridges += "  - name: b\(i)\n    bar-size: 1G\n    notifications: relay\n" }
            let file = try writeConfig(bridges)
            for (environment, limited) in [([String: String](), true), (["MALLOC_ARENA_MAX": "64"], false)] {
                // The runner's own malloc settings must not decide either case.
                let daemon = try SpawnedProcess(builtBinary("vhost-pci-bridged"), ["--config", file], environment: environment,
                                                unsetting: ["MALLOC_ARENA_MAX", "GLIBC_TUNABLES"])
                #expect(names(try control("\(dir)/control.sock", ["command": "list"])).count == 8, "\(daemon.output)")
                let arenas = mallocArenas(of: daemon.pid)
                if limited {
                    #expect(arenas <= 1, "\(arenas) arenas besides the main one")
                } else {
                    // The check can see arenas: left to glibc, 25 threads get several.
                    #expect(arenas > 1, "\(arenas) arenas besides the main one with MALLOC_ARENA_MAX=64")
                }
                daemon.signal(SIGTERM)
                #expect(daemon.wait() == 0, "\(daemon.output)")
            }
        }

        /// cpu-affinity pins each bridge's relay thread, and binds the SQPOLL
        /// kernel thread of a relay-sqpoll bridge, as the kernel reports them.
        @Test func cpuAffinityPinsRelayAndSQPollThreads() throws {
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let file = try writeConfig("bridges:\n  - name: a\n    bar-size: 1G\n    cpu-affinity: \"0\"\n  - name: b\n    bar-size: 1G\n    notifications: relay-sqpoll\n    cpu-affinity: [0]\n")
            let daemon = try SpawnedProcess(builtBinary("vhost-pci-bridged"), ["--config", file])
            let show = result(try control("\(dir)/control.sock", ["command": "show", "name": "b"]))
            #expect((show["config"] as? [String: Any])?["cpuAffinity"] as? [Int] == [0], "\(show)")
            func tasks(_ prefix: String) -> [String] {
                let dir = "/proc/\(daemon.pid)/task"
                return ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).compactMap { tid in
                    guard let comm = try? String(contentsOfFile: "\(dir)/\(tid)/comm", encoding: .utf8), comm.hasPrefix(prefix),
                          let status = try? String(contentsOfFile: "\(dir)/\(tid)/status", encoding: .utf8) else { return nil }
                    return status.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") }
                        .map { $0.split(separator: "\t").last.map(String.init) ?? "" }
                }
            }
            #expect(tasks("relay") == ["0", "0"], "both relay threads pinned: \(tasks("relay")); \(daemon.output)")
            #expect(tasks("iou-sqp") == ["0"], "the SQPOLL thread bound: \(tasks("iou-sqp"))")
            #expect(tasks("bridge-").allSatisfy { $0 != "0" } || ProcessInfo.processInfo.activeProcessorCount == 1,
                    "only the relay threads are pinned")
            daemon.signal(SIGTERM)
            #expect(daemon.wait() == 0)
        }

        /// `--version` on every binary this package installs or ships.
        @Test func everyBinaryAnswersVersion() throws {
            for name in ["vhost-pci-bridged", "vhost-pci-bridgectl", "vhost-pci-guest", "vhost-pci-demo", "vhost-pci-bench"] {
                let p = try SpawnedProcess(builtBinary(name), ["--version"])
                #expect(p.wait() == 0)
                #expect(p.output.trimmingCharacters(in: .whitespacesAndNewlines) == BuildInfo.version, "\(name): \(p.output)")
            }
        }
    }
}
